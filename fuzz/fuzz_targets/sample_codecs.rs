//! Stored samples: one chunk (`records::decode_chunk`, the value of a batch's sample
//! key) or a sample set (`swimlane_state::decode_sample_set`, the guard set blob). The
//! first byte picks the codec.
//!
//! Checks: never a panic; a decoded chunk holds windows of one length and only finite
//! values, re-encodes to a chunk that decodes to the same samples, and a non-empty
//! current-version chunk encodes back to exactly its bytes; a decoded set holds at most
//! as many values as its bytes allow.
#![no_main]
include!("../checks/sample_codecs.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
