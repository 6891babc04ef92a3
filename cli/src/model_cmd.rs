//! `swimlane model ...`: train the base model, run the personalisation protocol, export
//! a model as ONNX, predict with either format, and the candle side of the benchmarks
//! (bench/model_vs_pytorch.sh, bench/onnx_check.sh).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Subcommand;
use swimlane_core::{ModelSpec, StrokeClass};
use swimlane_model::experiment::{self, Protocol};
use swimlane_model::onnx::{self, Lineage, ModelRef, OnnxModel};
use swimlane_model::synth::Population;
use swimlane_model::{dataset, train_base, MicroModel, TrainConfig};

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Train the base model on a synthetic population and write it (safetensors).
    TrainBase {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Personalisation protocol on unseen synthetic swimmers: base accuracy, accuracy
    /// after up to 5 rounds of corrections, and whether a poisoned round hurts.
    Evaluate {
        #[arg(long, default_value_t = 20)]
        swimmers: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Base model file; without it the base model is trained first (seed 0, seconds).
        #[arg(long)]
        base: Option<PathBuf>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a synthetic sample set (safetensors: x [n,32,16] f32, y [n] u8).
    ExportDataset {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 200)]
        swimmers: usize,
        #[arg(long, default_value_t = 60)]
        windows: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Convert a model file (safetensors) to another format. The app team bundles the
    /// base model this way: `--model base.safetensors --format onnx --out base.onnx`.
    Export {
        /// The model's weights (safetensors, as `train-base` writes or the publisher serves).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum)]
        format: ExportFormat,
        #[arg(long)]
        out: PathBuf,
        /// The version written into the file's metadata: `base` or a published version.
        #[arg(long, default_value = "base", value_parser = parse_model_ref)]
        model_version: ModelRef,
        /// The version it was fine-tuned from (`base` or a number); none for a base model.
        #[arg(long, value_parser = parse_model_ref)]
        parent_version: Option<ModelRef>,
        /// The training run that made it.
        #[arg(long)]
        training_run: Option<String>,
    },
    /// Class probabilities of a model (safetensors or ONNX, told apart by content) for
    /// the windows of a JSON file `{"samples": [{"frames": [[16 numbers] x 32]}, ...]}`
    /// (the upload format; ids and labels optional and ignored). Prints
    /// `{"labels": [...], "probabilities": [[one row per sample]]}`.
    Predict {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
    },
    /// Write the ONNX parity set (bench/onnx_check.sh): the base model and fine-tuned
    /// personal models as safetensors, `models.json` (names and lineage) and
    /// `windows.json` (unseen swimmers' windows in the upload format).
    #[command(hide = true)]
    OnnxParitySet {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Swimmers with personal models (two versions each); as many others add windows.
        #[arg(long, default_value_t = 3)]
        swimmers: usize,
        #[arg(long, default_value_t = 200)]
        windows_per_swimmer: usize,
    },
    /// Benchmark: train on a sample set for a fixed number of epochs (no early stopping)
    /// and time it; then time inference. Prints JSON.
    BenchTrain {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 5)]
        epochs: usize,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Compute threads (sets RAYON_NUM_THREADS before candle starts).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// Formats `swimlane model export` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// ONNX, opset 17 (swimlane_model::onnx).
    Onnx,
}

fn parse_model_ref(s: &str) -> Result<ModelRef, String> {
    if s == "base" {
        return Ok(ModelRef::Base);
    }
    s.parse::<u64>()
        .map(ModelRef::Version)
        .map_err(|_| format!("{s:?} is neither `base` nor a version number"))
}

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::TrainBase { out, seed } => {
            let t = Instant::now();
            let (model, report) = experiment::train_default_base(seed)?;
            let bytes = model.to_bytes();
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} bytes): {} swimmers x {} windows, {} epochs (best {}), {:.1} s",
                out.display(),
                bytes.len(),
                experiment::BASE_SWIMMERS,
                experiment::BASE_WINDOWS_PER_SWIMMER,
                report.epochs_run,
                report.best_epoch,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        ModelCommand::Evaluate {
            swimmers,
            seed,
            base,
            json,
        } => evaluate(swimmers, seed, base, json),
        ModelCommand::ExportDataset {
            out,
            swimmers,
            windows,
            seed,
        } => {
            let samples = Population::training(seed, swimmers).samples(windows, seed);
            std::fs::write(&out, dataset::to_bytes(&samples)?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} samples to {}", samples.len(), out.display());
            Ok(())
        }
        ModelCommand::Export {
            model,
            format: ExportFormat::Onnx,
            out,
            model_version,
            parent_version,
            training_run,
        } => {
            let m = load_safetensors(&model)?;
            let lineage = Lineage {
                model_version,
                parent_version,
                training_run,
            };
            let bytes = onnx::export_checked(&m, &lineage)
                .with_context(|| format!("exporting {}", model.display()))?;
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote {} ({} bytes, ONNX opset {}, sha256 {})",
                out.display(),
                bytes.len(),
                onnx::OPSET,
                swimlane_state::sha256_hex(&bytes)
            );
            Ok(())
        }
        ModelCommand::Predict { model, input } => predict(&model, &input),
        ModelCommand::OnnxParitySet {
            out,
            seed,
            swimmers,
            windows_per_swimmer,
        } => parity_set(&out, seed, swimmers, windows_per_swimmer),
        ModelCommand::BenchTrain {
            data,
            epochs,
            batch,
            lr,
            threads,
            seed,
        } => bench_train(data, epochs, batch, lr, threads, seed),
    }
}

fn load_safetensors(path: &std::path::Path) -> anyhow::Result<MicroModel> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    MicroModel::from_bytes(&bytes).with_context(|| format!("loading {}", path.display()))
}

/// One window of a predict input: the upload format's sample (`id`, `label` and any
/// other field ignored).
#[derive(serde::Deserialize)]
struct PredictSample {
    frames: Vec<Vec<f64>>,
}

#[derive(serde::Deserialize)]
struct PredictInput {
    samples: Vec<PredictSample>,
}

/// The windows of a predict input, flattened frame by frame; errors name the sample.
fn read_windows(path: &std::path::Path) -> anyhow::Result<Vec<Vec<f32>>> {
    use swimlane_core::{WINDOW_FEATURES, WINDOW_FRAMES};
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let input: PredictInput = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{}: expected {{\"samples\": [{{\"frames\": [[16 numbers] x 32]}}, ...]}}",
            path.display()
        )
    })?;
    input
        .samples
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            anyhow::ensure!(
                s.frames.len() == WINDOW_FRAMES
                    && s.frames.iter().all(|f| f.len() == WINDOW_FEATURES),
                "sample {i}: expected {WINDOW_FRAMES} frames of {WINDOW_FEATURES} values"
            );
            let w: Vec<f32> = s.frames.iter().flatten().map(|v| *v as f32).collect();
            anyhow::ensure!(
                w.iter().all(|v| v.is_finite()),
                "sample {i}: a value is not a finite f32"
            );
            Ok(w)
        })
        .collect()
}

fn predict(model: &std::path::Path, input: &std::path::Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    let windows = read_windows(input)?;
    let refs: Vec<&[f32]> = windows.iter().map(Vec::as_slice).collect();
    let probabilities = if onnx::looks_like_onnx(&bytes) {
        OnnxModel::from_bytes(&bytes)
            .with_context(|| format!("loading {} as ONNX", model.display()))?
            .predict_proba(&refs)?
    } else {
        MicroModel::from_bytes(&bytes)
            .with_context(|| format!("loading {} as safetensors", model.display()))?
            .predict_proba(&refs)?
    };
    let out = serde_json::json!({
        "labels": StrokeClass::ALL.map(|c| c.name()),
        "probabilities": probabilities,
    });
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// A window in the upload format: 32 frames of 16 values.
fn upload_frames(frames: &[f32]) -> Vec<&[f32]> {
    frames.chunks(swimlane_core::WINDOW_FEATURES).collect()
}

fn parity_set(
    out: &std::path::Path,
    seed: u64,
    swimmers: usize,
    windows_per_swimmer: usize,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let set = onnx::parity_set(seed, swimmers, windows_per_swimmer)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut models = Vec::new();
    for (name, model, lineage) in &set.models {
        let file = format!("{name}.safetensors");
        std::fs::write(out.join(&file), model.to_bytes())?;
        models.push(serde_json::json!({
            "name": name,
            "safetensors": file,
            "model_version": lineage.model_version.to_string(),
            "parent_version": lineage.parent_version.map(|p| p.to_string()),
            "training_run": lineage.training_run,
        }));
    }
    // The device's files: each personal model with the base-model fallback, its
    // familiarity made from the first swimmer's windows of the first two classes, with
    // every window as the population (so some check windows are familiar and the others
    // not), written here with candle's answer for them
    // (`onnx::predict_proba_with_fallback`).
    let (base, base_sha) = (&set.models[0].1, onnx::weights_sha256(&set.models[0].1));
    let refs: Vec<&[f32]> = set.windows.iter().map(|s| s.frames.as_slice()).collect();
    for (name, model, lineage) in set.models.iter().skip(1) {
        let (mean, std) = model.normalisation();
        let familiarity = swimlane_core::familiar::Familiarity::of(
            set.windows
                .iter()
                .take(windows_per_swimmer)
                .filter(|s| s.label.0 < 2)
                .map(|s| (s.frames.as_slice(), s.label)),
            set.windows.iter().map(|s| (s.frames.as_slice(), s.label)),
            mean,
            std,
            swimlane_core::familiar::DEFAULT_SCALE,
        )
        .context("no windows for the familiarity")?;
        let familiar = refs
            .iter()
            .filter(|w| familiarity.knows(w, mean, std))
            .count();
        anyhow::ensure!(
            familiar > 0 && familiar < refs.len(),
            "{name}: {familiar} of {} windows familiar: the check would exercise one branch",
            refs.len()
        );
        let fb = onnx::Fallback {
            base,
            base_weights_sha256: &base_sha,
            familiarity: &familiarity,
        };
        let device = format!("{name}-device");
        std::fs::write(
            out.join(format!("{device}.onnx")),
            onnx::export_with_fallback(model, lineage, &fb)?,
        )?;
        let probabilities = onnx::predict_proba_with_fallback(model, Some(&fb), &refs)?;
        std::fs::write(
            out.join(format!("{device}.candle.json")),
            serde_json::to_vec(&serde_json::json!({
                "labels": StrokeClass::ALL.map(|c| c.name()),
                "probabilities": probabilities,
            }))?,
        )?;
        models.push(serde_json::json!({
            "name": device,
            "onnx": format!("{device}.onnx"),
            "fallback": true,
            "familiar_windows": familiar,
            "model_version": lineage.model_version.to_string(),
            "parent_version": lineage.parent_version.map(|p| p.to_string()),
            "training_run": lineage.training_run,
        }));
    }
    let samples: Vec<serde_json::Value> = set
        .windows
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": format!("w{i}"), "frames": upload_frames(&s.frames), "label": swimlane_core::ModelSpec::synthetic_pose().class_name(s.label)})
        })
        .collect();
    std::fs::write(
        out.join("windows.json"),
        serde_json::to_vec(&serde_json::json!({ "samples": samples }))?,
    )?;
    std::fs::write(
        out.join("models.json"),
        serde_json::to_vec_pretty(&serde_json::json!({ "models": models }))?,
    )?;
    eprintln!(
        "wrote {} models and {} windows to {} in {:.1} s",
        set.models.len(),
        set.windows.len(),
        out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn evaluate(n: usize, seed: u64, base: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let t = Instant::now();
    let model = match &base {
        Some(p) => MicroModel::from_bytes(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("loading {}", p.display()))?,
        None => experiment::train_default_base(0)?.0,
    };
    let base_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let report = experiment::run(&model, n, seed, &Protocol::default())?;
    let protocol_secs = t.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["base_model"] = serde_json::json!(match &base {
            Some(p) => p.display().to_string(),
            None => "trained (seed 0)".to_string(),
        });
        v["base_seconds"] = serde_json::json!(base_secs);
        v["protocol_seconds"] = serde_json::json!(protocol_secs);
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!("swimmer  seed                  base   corrections per round   after rounds                    personal  poisoned");
    for s in &report.swimmers {
        let rounds: Vec<String> = s.round_accuracy.iter().map(|a| format!("{a:.3}")).collect();
        println!(
            "{:>7}  {:<20}  {:.3}  {:<22}  {:<30}  {:.3}     {:.3}{}",
            s.index,
            s.seed,
            s.base_accuracy,
            format!("{:?}", s.corrections),
            rounds.join(" "),
            s.personalized_accuracy,
            s.poisoned_accuracy,
            if s.poisoned_drop { "" } else { "  (no drop!)" }
        );
    }
    println!(
        "\nbase median accuracy {:.3}; personalised median {:.3}; poisoned round lowers accuracy for every swimmer: {}; model {} bytes",
        report.base_median_accuracy, report.personalized_median_accuracy, report.poisoned_drop_all, report.model_bytes
    );
    println!(
        "(base model {:.1} s, protocol {:.1} s; classes: {})",
        base_secs,
        protocol_secs,
        StrokeClass::ALL.map(|c| c.name()).join(", ")
    );
    Ok(())
}

fn bench_train(
    data: PathBuf,
    epochs: usize,
    batch: usize,
    lr: f64,
    threads: usize,
    seed: u64,
) -> anyhow::Result<()> {
    // Before candle or rayon start any thread pool.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let samples = dataset::from_bytes(
        &std::fs::read(&data).with_context(|| format!("reading {}", data.display()))?,
    )?;
    let cfg = TrainConfig {
        epochs,
        batch_size: batch,
        learning_rate: lr,
        weight_decay: 1e-2,
        seed,
        val_fraction: 0.0,
        ..TrainConfig::base()
    };
    // Warm-up: one short run so that thread pools and allocator are up for both peers.
    let warm = TrainConfig {
        epochs: 1,
        max_steps: Some(5),
        ..cfg.clone()
    };
    train_base(&ModelSpec::synthetic_pose(), &samples, &warm)?;
    let t = Instant::now();
    let (model, report) = train_base(&ModelSpec::synthetic_pose(), &samples, &cfg)?;
    let train_secs = t.elapsed().as_secs_f64();
    let final_loss = report.train_loss.last().copied().unwrap_or(f32::NAN);
    let acc = swimlane_model::evaluate(&model, &samples)?.accuracy;
    // Inference: one window at a time, and batches of 256.
    let one = [samples[0].frames.as_slice()];
    for _ in 0..50 {
        model.predict_proba(&one)?;
    }
    let reps = 2000;
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(model.predict_proba(&one)?);
    }
    let single_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let batch256: Vec<&[f32]> = samples
        .iter()
        .take(256)
        .map(|s| s.frames.as_slice())
        .collect();
    let reps_b = 100;
    let t = Instant::now();
    for _ in 0..reps_b {
        std::hint::black_box(model.predict_proba(&batch256)?);
    }
    let batched_us = t.elapsed().as_secs_f64() * 1e6 / (reps_b * batch256.len()) as f64;
    let out = serde_json::json!({
        "framework": "candle",
        "threads": threads,
        "samples": samples.len(),
        "epochs": report.epochs_run,
        "batch": batch,
        "train_seconds": train_secs,
        "train_samples_per_sec": report.samples_processed as f64 / train_secs,
        "final_train_loss": final_loss,
        "train_accuracy": acc,
        "infer_single_us_per_window": single_us,
        "infer_batch256_us_per_window": batched_us,
    });
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
