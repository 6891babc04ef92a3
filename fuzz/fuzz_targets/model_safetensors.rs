//! Safetensors files as loaded from the store or a file: model weights
//! (`swimlane_model::MicroModel::from_bytes`, what the trainer, validator and publisher
//! load) and sample-set files (`swimlane_model::dataset::from_bytes`).
//!
//! Checks: never a panic; a model that loads predicts on a window (an answer or an
//! error) and saves to bytes that load again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use swimlane_model::{dataset, MicroModel};

fuzz_target!(|data: &[u8]| {
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
});
