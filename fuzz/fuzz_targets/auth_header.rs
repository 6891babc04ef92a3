//! `Authorization` header values as ingest and the publisher parse them
//! (`swimlane_state::tokens::bearer_token`, then hashing and the admin match).
//!
//! Checks: never a panic; an accepted token is a non-empty token68 of at most
//! `MAX_TOKEN_LEN` bytes that appears in the header.
#![no_main]
include!("../checks/auth_header.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
