//! ONNX model files (`swimlane_model::onnx::OnnxModel::from_bytes`).
//!
//! Checks: never a panic on loading; a file that loads is a swimlane micro model by
//! its metadata.
#![no_main]
use libfuzzer_sys::fuzz_target;
use swimlane_model::onnx::OnnxModel;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = OnnxModel::from_bytes(data) {
        assert!(m.metadata().contains_key("format"));
    }
});
