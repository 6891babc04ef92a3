// The checks of the fuzz target `blob_header` (fuzz/fuzz_targets/blob_header.rs says what it
// feeds and what it checks). Included by that target and by the corpus replay in
// the workspace's tests (cli/tests/fuzz_corpus.rs): plain comments, no inner
// attributes, so `include!` takes it anywhere.
use swimlane_store::blob::BlobHeader;

pub fn check(data: &[u8]) {
    if let Ok(h) = BlobHeader::decode("fuzz", data) {
        assert!(h.chunk_size > 0);
        assert_eq!(h.len.div_ceil(h.chunk_size as u64), h.chunk_count as u64);
        assert_eq!(h.encode(), data);
    }
}
