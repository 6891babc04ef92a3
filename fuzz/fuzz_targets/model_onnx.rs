//! ONNX model files (`swimlane_model::onnx::OnnxModel::from_bytes`).
//!
//! Checks: never a panic on loading; a file that loads is a swimlane micro model by
//! its metadata.
#![no_main]
include!("../checks/model_onnx.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
