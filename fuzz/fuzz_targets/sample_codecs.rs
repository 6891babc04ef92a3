//! Stored samples: one chunk (`records::decode_chunk`, the value of a batch's sample
//! key) or a sample set (`swimlane_state::decode_sample_set`, the guard set blob). The
//! first byte picks the codec.
//!
//! Checks: never a panic; a decoded chunk holds windows of one length and only finite
//! values, re-encodes to a chunk that decodes to the same samples, and a non-empty
//! current-version chunk encodes back to exactly its bytes; a decoded set holds at most
//! as many values as its bytes allow.
#![no_main]
use libfuzzer_sys::fuzz_target;
use swimlane_core::records::{decode_chunk, encode_chunk, SAMPLES_PER_CHUNK};
use swimlane_core::spec::MAX_WINDOW_VALUES;
use swimlane_state::{decode_sample_set, encode_sample_set};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        if let Ok(samples) = decode_chunk(bytes) {
            assert!(samples.len() <= SAMPLES_PER_CHUNK);
            let len = samples.first().map_or(0, |s| s.frames.len());
            for s in &samples {
                assert_eq!(s.frames.len(), len);
                assert!(len <= MAX_WINDOW_VALUES);
                assert!(s.frames.iter().all(|v| v.is_finite()));
            }
            let again = encode_chunk(&samples);
            assert_eq!(decode_chunk(&again).expect("re-decodes"), samples);
            if !samples.is_empty() && bytes[0] == 2 {
                assert_eq!(again, bytes);
            }
        }
    } else if let Ok(samples) = decode_sample_set(bytes) {
        let values: usize = samples.iter().map(|s| s.frames.len()).sum();
        assert!(values * 4 <= bytes.len());
        assert_eq!(
            decode_sample_set(&encode_sample_set(&samples)).expect("re-decodes"),
            samples
        );
    }
});
