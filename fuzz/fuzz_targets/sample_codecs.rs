//! Stored samples: one chunk (`records::decode_chunk`, the value of a batch's sample
//! key) or a sample set (`swimlane_state::decode_sample_set`, the guard set blob). The
//! first byte picks the codec.
//!
//! Checks: never a panic; a decoded chunk encodes back to exactly its bytes and holds
//! only finite values; a decoded set holds at most as many samples as its bytes allow.
#![no_main]
use libfuzzer_sys::fuzz_target;
use swimlane_core::records::{decode_chunk, encode_chunk, SAMPLES_PER_CHUNK, WINDOW_VALUES};
use swimlane_state::{decode_sample_set, encode_sample_set};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        if let Ok(samples) = decode_chunk(bytes) {
            assert!(samples.len() <= SAMPLES_PER_CHUNK);
            for s in &samples {
                assert_eq!(s.frames.len(), WINDOW_VALUES);
                assert!(s.frames.iter().all(|v| v.is_finite()));
            }
            assert_eq!(encode_chunk(&samples), bytes);
        }
    } else if let Ok(samples) = decode_sample_set(bytes) {
        assert!(samples.len() * WINDOW_VALUES * 4 <= bytes.len());
        assert_eq!(
            decode_sample_set(&encode_sample_set(&samples)).expect("re-decodes"),
            samples
        );
    }
});
