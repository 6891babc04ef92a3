// The checks of the fuzz target `sample_codecs` (fuzz/fuzz_targets/sample_codecs.rs says what it
// feeds and what it checks). Included by that target and by the corpus replay in
// the workspace's tests (cli/tests/fuzz_corpus.rs): plain comments, no inner
// attributes, so `include!` takes it anywhere.
use swimlane_core::records::{decode_chunk, encode_chunk, SAMPLES_PER_CHUNK};
use swimlane_core::spec::MAX_WINDOW_VALUES;
use swimlane_state::{decode_sample_set, encode_sample_set};

pub fn check(data: &[u8]) {
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
}
