//! Issue 9's parity criterion: the ONNX export of the base model and of fine-tuned
//! personal models, evaluated on 1,200 windows of unseen swimmers, differs from the
//! candle model's probabilities by at most 1e-5 and predicts the same class for every
//! window; every file is at most 1 MiB. Evaluated twice: by `OnnxModel` (swimlane's own
//! evaluator) and, independently, by candle-onnx (its generated types decode the bytes,
//! `simple_eval` runs them); the two agree within the same tolerance.
use swimlane_model::onnx::{self, OnnxModel, PARITY_TOLERANCE};
use swimlane_model::MAX_MODEL_BYTES;

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "support/candle_onnx.rs"]
mod candle_onnx_support;
use candle_onnx_support::candle_onnx_proba;

#[test]
fn onnx_exports_compute_what_the_candle_models_compute() {
    // 3 personal swimmers (two versions each) + 3 others, 200 windows each.
    let set = onnx::parity_set(0, 3, 200).unwrap();
    assert!(set.windows.len() >= 1000, "{} windows", set.windows.len());
    assert!(set.models.len() >= 5, "{} models", set.models.len());
    let refs: Vec<&[f32]> = set.windows.iter().map(|s| s.frames.as_slice()).collect();
    let mut worst = 0f32;
    for (name, model, lineage) in &set.models {
        let bytes = onnx::export(model, lineage).unwrap();
        assert!(
            bytes.len() <= MAX_MODEL_BYTES,
            "{name}: {} bytes",
            bytes.len()
        );
        let o = OnnxModel::from_bytes(&bytes).unwrap();
        assert_eq!(
            o.metadata()["model_version"],
            lineage.model_version.to_string()
        );
        let p = onnx::parity(model, &o, &refs).unwrap();
        eprintln!("{name}: {} bytes, {p}", bytes.len());
        assert_eq!(p.windows, set.windows.len());
        assert!(
            p.max_abs_diff <= PARITY_TOLERANCE,
            "{name}: max abs diff {:e}",
            p.max_abs_diff
        );
        assert_eq!(p.class_mismatches, 0, "{name}: {p}");
        worst = worst.max(p.max_abs_diff);
        // The independent check: candle-onnx on the same bytes.
        let reference = candle_onnx_proba(&bytes, &refs);
        let ours = onnx::compare(&o.predict_proba(&refs).unwrap(), &reference);
        let candle = onnx::compare(&model.predict_proba(&refs).unwrap(), &reference);
        eprintln!("{name}: vs candle-onnx: this evaluator {ours}; candle {candle}");
        assert!(
            ours.holds(),
            "{name}: this evaluator vs candle-onnx: {ours}"
        );
        assert!(candle.holds(), "{name}: candle vs candle-onnx: {candle}");
        // The fine-tunes really are different models from the base.
        if name != "base" {
            let base = &set.models[0].1;
            let diff = onnx::compare(
                &base.predict_proba(&refs).unwrap(),
                &model.predict_proba(&refs).unwrap(),
            );
            assert!(diff.class_mismatches > 0, "{name} predicts like the base");
        }
    }
    eprintln!("largest difference over every model and window: {worst:e}");
}
