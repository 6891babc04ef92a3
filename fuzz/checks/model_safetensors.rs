// The checks of the fuzz target `model_safetensors` (fuzz/fuzz_targets/model_safetensors.rs says what it
// feeds and what it checks). Included by that target and by the corpus replay in
// the workspace's tests (cli/tests/fuzz_corpus.rs): plain comments, no inner
// attributes, so `include!` takes it anywhere.
use swimlane_model::{dataset, MicroModel};

pub fn check(data: &[u8]) {
    if let Ok(m) = MicroModel::from_bytes(data) {
        let window = vec![0.25f32; 512];
        if let Ok(p) = m.predict_proba(&[&window]) {
            assert_eq!(p.len(), 1);
        }
        MicroModel::from_bytes(&m.to_bytes()).expect("a saved model loads");
    }
    if let Ok(samples) = dataset::from_bytes(data) {
        for s in &samples {
            assert_eq!(s.frames.len(), 512);
        }
    }
}
