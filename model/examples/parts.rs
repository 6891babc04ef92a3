//! Times the model's parts every batch goes through outside training: the publisher's
//! export check (`onnx::export_device_parts_checked`, without the base-model fallback,
//! which doubles it), loading a model from its safetensors bytes (the validator loads
//! two a batch, the trainer and the publisher one), the probabilities of 250 windows
//! (the validator's scoring) and the familiarity of a trained model (the trainer's, over
//! a run's 250 windows and a population of 600). Wall time a call, three rounds, on one model thread as the
//! validator and the publisher run (`RAYON_NUM_THREADS=1` unless it is set):
//!
//!     cargo run --release -p swimlane-model --example parts
//!
//! bench/README.md ("Four of the model's parts") has what it measured.
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
    let population = Swimmer::new(2).windows(600, rng);
    let (mean, std) = model.normalisation();
    let labelled = |s: &[swimlane_model::Sample]| -> Vec<(Vec<f32>, swimlane_core::ClassId)> {
        s.iter().map(|s| (s.frames.clone(), s.label)).collect()
    };
    let (own, others) = (labelled(&samples), labelled(&population));
    // The publisher's case: a personal model with the base model's fallback.
    let base = MicroModel::init(&spec, &population, 2)?;
    let base_sha = onnx::weights_sha256(&base);
    let familiarity = swimlane_core::familiar::Familiarity::of(
        own.iter().take(100).map(|(w, c)| (w.as_slice(), *c)),
        others.iter().map(|(w, c)| (w.as_slice(), *c)),
        mean,
        std,
        swimlane_core::familiar::DEFAULT_SCALE,
    )
    .expect("familiarity");
    let fallback = onnx::Fallback {
        base: &base,
        base_weights_sha256: &base_sha,
        familiarity: &familiarity,
    };
    for round in 1..=3 {
        let export = per_call_ms(200, || {
            onnx::export_device_parts_checked(&model, &lineage, &sha, None).expect("export");
        });
        let export_fb = per_call_ms(200, || {
            onnx::export_device_parts_checked(&model, &lineage, &sha, Some(&fallback))
                .expect("export with fallback");
        });
        let load = per_call_ms(1000, || {
            MicroModel::from_bytes(&bytes).expect("load");
        });
        let score = per_call_ms(200, || {
            model.predict_proba(&windows).expect("score");
        });
        let familiar = per_call_ms(100, || {
            swimlane_core::familiar::Familiarity::of(
                own.iter().map(|(w, c)| (w.as_slice(), *c)),
                others.iter().map(|(w, c)| (w.as_slice(), *c)),
                mean,
                std,
                swimlane_core::familiar::DEFAULT_SCALE,
            )
            .expect("familiarity");
        });
        println!(
            "round {round}: export check {export:.3} ms (with the fallback {export_fb:.3} ms), load {load:.3} ms, 250 windows scored {score:.3} ms, familiarity {familiar:.3} ms"
        );
    }
    Ok(())
}
