// The checks of the fuzz target `model_onnx` (fuzz/fuzz_targets/model_onnx.rs says what it
// feeds and what it checks). Included by that target and by the corpus replay in
// the workspace's tests (cli/tests/fuzz_corpus.rs): plain comments, no inner
// attributes, so `include!` takes it anywhere.
use swimlane_model::onnx::OnnxModel;

pub fn check(data: &[u8]) {
    if let Ok(m) = OnnxModel::from_bytes(data) {
        assert!(m.metadata().contains_key("format"));
    }
}
