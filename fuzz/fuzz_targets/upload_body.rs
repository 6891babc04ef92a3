//! The upload body as ingest decodes it (`swimlane_ingest::stage::decode_and_validate`:
//! gzip when asked, bounded, then `swimlane_core::batch::validate_upload`). The first
//! byte picks the `Content-Encoding` (odd: gzip), the rest is the body.
//!
//! Checks: never a panic; a refusal is a 4xx with a code and a message; an accepted
//! batch keeps every documented invariant, and its samples survive the stored chunk
//! codec unchanged.
#![no_main]
include!("../checks/upload_body.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
