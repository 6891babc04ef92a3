//! A blob's stored header (`swimlane_store::blob::BlobHeader::decode`).
//!
//! Checks: never a panic; a decoded header is self-consistent and encodes back to
//! exactly its bytes.
#![no_main]
include!("../checks/blob_header.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
