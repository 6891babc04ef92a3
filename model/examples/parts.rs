//! Times the model's parts every batch goes through outside training: the publisher's
//! export check (`onnx::export_device_parts_checked`, without the base-model fallback,
//! which doubles it), loading a model from its safetensors bytes (the validator loads
//! two a batch, the trainer and the publisher one) and the probabilities of 250 windows
//! (the validator's scoring). Wall time a call, three rounds, on one model thread as the
//! validator and the publisher run (`RAYON_NUM_THREADS=1` unless it is set):
//!
//!     cargo run --release -p swimlane-model --example parts
//!
//! bench/README.md ("Three of the model's parts") has what it measured.
use rand::SeedableRng;
use swimlane_model::synth::Swimmer;
use swimlane_model::{onnx, MicroModel};

fn per_call_ms(calls: u32, mut f: impl FnMut()) -> f64 {
    let t = std::time::Instant::now();
    for _ in 0..calls {
        f();
    }
    t.elapsed().as_secs_f64() / f64::from(calls) * 1e3
}

fn main() -> Result<(), swimlane_model::ModelError> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Before candle's first operation starts its thread pool.
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let rng = &mut rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let samples = Swimmer::new(1).windows(250, rng);
    let spec = swimlane_core::spec::ModelSpec::synthetic_pose();
    let model = MicroModel::init(&spec, &samples, 1)?;
    let bytes = model.to_bytes();
    let (lineage, sha) = (onnx::Lineage::base(), onnx::weights_sha256(&model));
    let windows: Vec<&[f32]> = samples.iter().map(|s| s.frames.as_slice()).collect();
    for round in 1..=3 {
        let export = per_call_ms(200, || {
            onnx::export_device_parts_checked(&model, &lineage, &sha, None).expect("export");
        });
        let load = per_call_ms(1000, || {
            MicroModel::from_bytes(&bytes).expect("load");
        });
        let score = per_call_ms(200, || {
            model.predict_proba(&windows).expect("score");
        });
        println!(
            "round {round}: export check {export:.3} ms, load {load:.3} ms, 250 windows scored {score:.3} ms"
        );
    }
    Ok(())
}
