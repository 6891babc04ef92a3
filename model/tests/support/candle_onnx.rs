// The independent check of swimlane's ONNX files, shared by the unit tests of
// `src/onnx.rs` (through `#[path]`) and `tests/onnx_parity.rs`: candle-onnx's generated
// types decode the bytes (and encode them back byte for byte) and its evaluator
// computes the probabilities of `windows` (synthetic-pose windows, fed to the file's
// one input; the file's one output read back).
use prost::Message;

pub fn candle_onnx_proba(bytes: &[u8], windows: &[&[f32]]) -> Vec<Vec<f32>> {
    let proto = candle_onnx::onnx::ModelProto::decode(bytes).unwrap();
    assert!(
        proto.encode_to_vec() == bytes,
        "candle-onnx re-encodes other bytes"
    );
    let graph = proto.graph.as_ref().expect("a graph");
    let (input, output) = (graph.input[0].name.clone(), graph.output[0].name.clone());
    let x = candle_core::Tensor::from_vec(
        windows.concat(),
        (
            windows.len(),
            swimlane_core::WINDOW_FRAMES,
            swimlane_core::WINDOW_FEATURES,
        ),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut out =
        candle_onnx::simple_eval(&proto, std::collections::HashMap::from([(input, x)])).unwrap();
    out.remove(&output).unwrap().to_vec2().unwrap()
}
