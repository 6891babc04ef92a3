//! A blob's stored header (`swimlane_store::blob::BlobHeader::decode`).
//!
//! Checks: never a panic; a decoded header is self-consistent and encodes back to
//! exactly its bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use swimlane_store::blob::BlobHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = BlobHeader::decode("fuzz", data) {
        assert!(h.chunk_size > 0);
        assert_eq!(h.len.div_ceil(h.chunk_size as u64), h.chunk_count as u64);
        assert_eq!(h.encode(), data);
    }
});
