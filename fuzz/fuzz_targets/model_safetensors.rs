//! Safetensors files as loaded from the store or a file: model weights
//! (`swimlane_model::MicroModel::from_bytes`, what the trainer, validator and publisher
//! load) and sample-set files (`swimlane_model::dataset::from_bytes`).
//!
//! Checks: never a panic; a model that loads predicts on a window (an answer or an
//! error) and saves to bytes that load again.
#![no_main]
include!("../checks/model_safetensors.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
