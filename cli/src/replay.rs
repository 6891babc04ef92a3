//! `swimlane replay`: real swimmers' recordings through the real pipeline.
//!
//! 1. Every swimmer folder under `--data` (e.g. `../shared/data/swim-imu`) is read with
//!    the importer ([`crate::recording`]) into windows of the smartwatch spec, in time
//!    order (recordings by start time).
//! 2. The swimmers are split into `folds` seeded folds. Each fold gets a fresh fleet
//!    (embedded store, ingest and publisher over HTTP, trainers, validator) whose base
//!    model is trained only on the other folds' swimmers, and whose guard set is other
//!    folds' windows the base never trained on: no swimmer's data ever reaches the
//!    model that serves them before they upload it.
//! 3. Each swimmer's timeline is cut: the last `test_fraction` (30%) of every recording
//!    is never uploaded (the final test; `--split timeline` takes the last 30% of the
//!    whole timeline instead); the rest is cut into sessions in time order (a
//!    recording, or at most `session_windows` windows of one). Session by session, the
//!    device labels the windows with the model the publisher serves it at that moment,
//!    the swimmer corrects the wrong ones and confirms the others, and the phone uploads
//!    them all (format 2: corrected or confirmed, the predicted class and the version
//!    that predicted it) through ingest's HTTP API; the replay waits until every upload
//!    settles before the next session.
//! 4. The baseline, in the same run: plain per-swimmer fine-tuning with no gate on the
//!    same uploads (every session's windows, the model replaced after every session).
//!
//! Seeded and deterministic apart from thread timing inside the fleet (uploads of one
//! round settle before the next round starts, so every model is a function of the
//! data and the seed).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use swimlane_core::keys::Keys;
use swimlane_core::records::Feedback;
use swimlane_core::{ModelSpec, UserId};
use swimlane_model::synth::derive_seed;
use swimlane_model::{evaluate, fine_tune, train_base, MicroModel, Sample, TrainConfig};
use swimlane_runtime::Config;
use swimlane_state::tokens::new_token;
use swimlane_state::Repo;

use crate::demo::{median, settled, Device};
use crate::fleet::LocalFleet;
use crate::recording::{read_recording, recording_files, ImportOptions, Window};

/// Knobs of a replay: `swimlane replay`'s flags, whose defaults are [`Default`]'s too.
#[derive(Clone, Debug, clap::Args)]
pub struct ReplayOptions {
    /// The recordings: one sub-folder per swimmer (e.g. ../shared/data/swim-imu).
    #[arg(long, default_value = "../shared/data/swim-imu")]
    pub data: PathBuf,
    /// The model spec: a built-in name or a JSON spec file.
    #[arg(long, default_value = "smartwatch", value_parser = parse_spec)]
    pub spec: ModelSpec,
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Replay only the first N swimmers (by folder name) of the data; the folds and the
    /// base models still use every swimmer.
    #[arg(long)]
    pub swimmers: Option<usize>,
    #[arg(long, default_value_t = 14)]
    pub seed: u64,
    /// Share of each swimmer's windows (the latest) kept as the final test.
    #[arg(skip = 0.3)]
    pub test_fraction: f64,
    /// Most windows in one upload.
    #[arg(long, default_value_t = 120)]
    pub session_windows: usize,
    #[arg(long, default_value_t = 2)]
    pub trainers: usize,
    #[arg(skip = true)]
    pub progress: bool,
    /// Write a PNG plot of the device's accuracy over sessions here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// The final test: the last 30% of every recording, or of the whole timeline.
    #[arg(long, value_enum, default_value = "recording")]
    pub split: Split,
    /// Upload only the windows the device got wrong (what a format 1 client sends),
    /// instead of every window with its feedback; the baseline then trains on its own
    /// model's mistakes. Measures whether confirmed windows pay.
    #[arg(long)]
    pub corrections_only: bool,
}

fn parse_spec(name_or_file: &str) -> Result<ModelSpec, String> {
    swimlane_runtime::config::resolve_spec(name_or_file).map_err(|e| e.to_string())
}

/// Which windows of a swimmer are the final test (never uploaded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// The latest `test_fraction` of every recording: every style the swimmer swam is
    /// both uploaded (earlier in the recording) and tested (later in it). The default.
    Recording,
    /// The latest `test_fraction` of the whole timeline: later recordings are often a
    /// style the swimmer never uploaded, so the test then measures the base model.
    Timeline,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        crate::defaults_of_args()
    }
}

/// One swimmer's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct SwimmerReport {
    pub swimmer: String,
    pub fold: usize,
    pub windows: usize,
    pub test_windows: usize,
    /// Sessions replayed; each is uploaded (with `corrections_only`, unless the device
    /// made no mistake in it).
    pub uploads: usize,
    pub base_accuracy: f64,
    pub base_macro_f1: f64,
    pub final_accuracy: f64,
    pub final_macro_f1: f64,
    /// No gate: fine-tuned on every session, replaced every time.
    pub baseline_accuracy: f64,
    pub baseline_macro_f1: f64,
    /// The device's accuracy on each session before its upload (what the swimmer saw):
    /// its live accuracy, session by session.
    pub session_accuracy: Vec<f64>,
    /// The base model's accuracy on the same sessions.
    pub session_base_accuracy: Vec<f64>,
    /// Live accuracy at the end: the device's over the last [`LIVE_END_SESSIONS`]
    /// sessions, and the base model's on the same windows.
    pub live_end: f64,
    pub live_end_base: f64,
    /// Of the same windows: those only the device got right, and those only the base
    /// model got right (the discordant pairs of a paired comparison).
    pub live_end_device_only: usize,
    pub live_end_base_only: usize,
    /// How far the device's live accuracy at the end is below the base model's, in
    /// standard deviations of the paired sign test the gate uses:
    /// `(base_only - device_only) / sqrt(base_only + device_only)` (0 with no
    /// discordant window; negative when the device did better).
    pub live_end_below_z: f64,
    /// Versions rolled back on probation.
    pub rollbacks: usize,
    pub versions_published: usize,
    pub uploads_rejected: usize,
    pub uploads_deferred: usize,
    /// Every session after the first: windows, right by the device, right by the base,
    /// right by the device only, right by the base only.
    #[serde(skip)]
    pub later_live: [usize; 5],
    /// Why each upload that was not published was rejected or deferred, in order.
    pub reasons: Vec<String>,
}

/// Sessions over which "live accuracy at the end" is measured: the last one, what the
/// swimmer's device gave them at the end of the replay (after any rollback).
pub const LIVE_END_SESSIONS: usize = 1;

/// "Significantly below its base": `live_end_below_z` at least this (one-sided 5%).
pub const LIVE_BELOW_Z: f64 = 1.645;

/// Figures over every swimmer of one method.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub median_accuracy: f64,
    pub median_macro_f1: f64,
    pub worst_accuracy: f64,
    /// The lowest (final − base) accuracy of any swimmer.
    pub worst_change: f64,
    /// Swimmers more than 0.02 below their base accuracy.
    pub below_base: usize,
}

/// What `--json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    pub swimmers: Vec<SwimmerReport>,
    pub base: Summary,
    pub swimlane: Summary,
    pub no_gate_baseline: Summary,
    /// Swimmers whose live accuracy at the end is more than 0.02 below the base
    /// model's on the same windows.
    pub live_below_base: usize,
    /// Swimmers whose live accuracy at the end is significantly below the base
    /// model's on the same windows (`live_end_below_z` >= [`LIVE_BELOW_Z`]).
    pub live_significantly_below_base: usize,
    /// Over every swimmer and every session after their first (what a swimmer saw
    /// once swimlane could have changed their model): the device's live accuracy and
    /// the base model's on the same windows.
    pub live_accuracy: f64,
    pub live_accuracy_base: f64,
    /// Of the same windows: those the device got right, of those the base model got
    /// wrong (what personalisation fixed, out of what it could fix) ...
    pub live_fixed: (usize, usize),
    /// ... and those the device got wrong, of those the base model got right (what it
    /// broke, out of what it could break).
    pub live_broken: (usize, usize),
    /// Versions rolled back on probation, over every swimmer.
    pub rollbacks: usize,
    pub folds: usize,
    pub seed: u64,
    pub split: Split,
    pub corrections_only: bool,
    pub spec: String,
    pub seconds: f64,
}

struct Swimmer {
    name: String,
    /// Sessions to upload, in time order.
    sessions: Vec<Vec<Window>>,
    test: Vec<Sample>,
    all: Vec<Sample>,
}

fn say(opts: &ReplayOptions, msg: &str) {
    if opts.progress {
        eprintln!("{msg}");
    }
}

/// Read every swimmer folder of `data` (sub-folders holding recordings), in name order.
fn load(opts: &ReplayOptions, spec: &ModelSpec) -> anyhow::Result<Vec<Swimmer>> {
    let import = ImportOptions::for_spec(spec);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&opts.data)
        .map_err(|e| anyhow::anyhow!("{}: {e}", opts.data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for dir in dirs {
        let mut recordings = Vec::new();
        for f in recording_files(&dir)? {
            let r = read_recording(&f, spec, &import)?;
            if !r.windows.is_empty() {
                recordings.push(r);
            }
        }
        let total: usize = recordings.iter().map(|r| r.windows.len()).sum();
        if total < 10 {
            continue;
        }
        // Which windows are the final test: the latest `test_fraction` of the whole
        // timeline, or of every recording.
        let n_upload_total = total - ((total as f64) * opts.test_fraction).ceil() as usize;
        let mut sessions = Vec::new();
        let mut test = Vec::new();
        let mut all = Vec::new();
        let mut seen = 0;
        for r in recordings {
            let n = r.windows.len();
            let n_upload_here = n - ((n as f64) * opts.test_fraction).ceil() as usize;
            let mut current: Vec<Window> = Vec::new();
            for (k, w) in r.windows.into_iter().enumerate() {
                all.push(w.sample.clone());
                let upload = match opts.split {
                    Split::Timeline => seen < n_upload_total,
                    Split::Recording => k < n_upload_here,
                };
                if !upload {
                    test.push(w.sample);
                } else {
                    current.push(w);
                    if current.len() == opts.session_windows {
                        sessions.push(std::mem::take(&mut current));
                    }
                }
                seen += 1;
            }
            if !current.is_empty() {
                sessions.push(current);
            }
        }
        if sessions.is_empty() || test.is_empty() {
            continue;
        }
        out.push(Swimmer {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sessions,
            test,
            all,
        });
    }
    anyhow::ensure!(
        out.len() > opts.folds,
        "{}: {} swimmer folders with recordings, need more than {} (the folds)",
        opts.data.display(),
        out.len(),
        opts.folds
    );
    Ok(out)
}

/// Training configuration of the base models.
fn base_config(seed: u64) -> TrainConfig {
    TrainConfig {
        epochs: 12,
        ..TrainConfig::base().with_seed(seed)
    }
}

/// Run the replay; every fleet is stopped before this returns.
pub async fn run(opts: ReplayOptions) -> anyhow::Result<ReplayReport> {
    let t0 = Instant::now();
    let spec = opts.spec.clone();
    spec.validate()?;
    anyhow::ensure!(opts.folds >= 2, "--folds must be at least 2");
    say(&opts, &format!("reading {} …", opts.data.display()));
    let swimmers = load(&opts, &spec)?;
    // Seeded folds over every swimmer.
    let mut order: Vec<usize> = (0..swimmers.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(derive_seed(opts.seed, 1, 0)));
    let mut fold_of = vec![0; swimmers.len()];
    for (k, &i) in order.iter().enumerate() {
        fold_of[i] = k % opts.folds;
    }
    let replayed: Vec<usize> = (0..swimmers.len())
        .take(opts.swimmers.unwrap_or(usize::MAX))
        .collect();
    let mut reports: Vec<SwimmerReport> = Vec::new();
    for fold in 0..opts.folds {
        let members: Vec<usize> = replayed
            .iter()
            .copied()
            .filter(|&i| fold_of[i] == fold)
            .collect();
        if members.is_empty() {
            continue;
        }
        // Base and guard from the other folds only: every 10th window to the guard set
        // (at most 600), the rest to training.
        let (mut train, mut guard) = (Vec::new(), Vec::new());
        for (i, s) in swimmers.iter().enumerate() {
            if fold_of[i] == fold {
                continue;
            }
            for (k, w) in s.all.iter().enumerate() {
                if k % 10 == 5 {
                    guard.push(w.clone());
                } else {
                    train.push(w.clone());
                }
            }
        }
        guard.shuffle(&mut ChaCha8Rng::seed_from_u64(derive_seed(
            opts.seed,
            2,
            fold as u64,
        )));
        guard.truncate(600);
        say(
            &opts,
            &format!(
                "fold {}/{}: base model on {} windows of {} other swimmers; replaying {} swimmers",
                fold + 1,
                opts.folds,
                train.len(),
                swimmers.len() - fold_of.iter().filter(|f| **f == fold).count(),
                members.len()
            ),
        );
        let (base, _) = train_base(
            &spec,
            &train,
            &base_config(derive_seed(opts.seed, 3, fold as u64)),
        )?;
        let fold_swimmers: Vec<&Swimmer> = members.iter().map(|&i| &swimmers[i]).collect();
        let mut fold_reports = run_fold(&opts, &spec, fold, &base, guard, &fold_swimmers).await?;
        reports.append(&mut fold_reports);
    }
    reports.sort_by(|a, b| a.swimmer.cmp(&b.swimmer));
    let summary = |acc: &dyn Fn(&SwimmerReport) -> (f64, f64)| {
        let accs: Vec<f64> = reports.iter().map(|r| acc(r).0).collect();
        Summary {
            median_accuracy: median(accs.clone()),
            median_macro_f1: median(reports.iter().map(|r| acc(r).1).collect()),
            worst_accuracy: accs.iter().copied().fold(f64::INFINITY, f64::min),
            worst_change: reports
                .iter()
                .map(|r| acc(r).0 - r.base_accuracy)
                .fold(f64::INFINITY, f64::min),
            below_base: reports
                .iter()
                .filter(|r| acc(r).0 < r.base_accuracy - 0.02)
                .count(),
        }
    };
    // Every session after the first, summed over the swimmers (`later_live`).
    let later = reports.iter().fold([0usize; 5], |mut acc, r| {
        for (a, v) in acc.iter_mut().zip(r.later_live) {
            *a += v;
        }
        acc
    });
    let report = ReplayReport {
        live_below_base: reports
            .iter()
            .filter(|r| r.live_end < r.live_end_base - 0.02)
            .count(),
        live_significantly_below_base: reports
            .iter()
            .filter(|r| r.live_end_below_z >= LIVE_BELOW_Z)
            .count(),
        live_accuracy: later[1] as f64 / later[0].max(1) as f64,
        live_accuracy_base: later[2] as f64 / later[0].max(1) as f64,
        live_fixed: (later[3], later[0] - later[2]),
        live_broken: (later[4], later[2]),
        rollbacks: reports.iter().map(|r| r.rollbacks).sum(),
        base: summary(&|r| (r.base_accuracy, r.base_macro_f1)),
        swimlane: summary(&|r| (r.final_accuracy, r.final_macro_f1)),
        no_gate_baseline: summary(&|r| (r.baseline_accuracy, r.baseline_macro_f1)),
        swimmers: reports,
        folds: opts.folds,
        seed: opts.seed,
        split: opts.split,
        corrections_only: opts.corrections_only,
        spec: spec.name.clone(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    if let Some(path) = &opts.plot {
        crate::plot::session_accuracy_png(&report, path)?;
    }
    Ok(report)
}

async fn run_fold(
    opts: &ReplayOptions,
    spec: &ModelSpec,
    fold: usize,
    base: &MicroModel,
    guard: Vec<Sample>,
    swimmers: &[&Swimmer],
) -> anyhow::Result<Vec<SwimmerReport>> {
    let dir = tempfile::tempdir()?;
    // The deployment's settings (the validation policy above all) come from the
    // environment and a config file as for any process (SWIMLANE_VALIDATOR_MARGIN, ...);
    // the store, the spec and the addresses are the replay's own.
    let mut config = LocalFleet::loopback(Config::load(
        &swimlane_runtime::config::Args::default(),
        None,
    )?);
    config.deployment = format!("replay-{fold}");
    // The spec as a file in the fleet's directory, so a spec that is not built in
    // reaches every worker through the config like any deployment's.
    let spec_file = dir.path().join("spec.json");
    std::fs::write(&spec_file, spec.to_json())?;
    config.spec = spec_file.display().to_string();
    config.store = dir.path().join("store").display().to_string();
    config.validate()?;
    let db = swimlane_runtime::open_store(&config)?;
    crate::init::install_model(&db, &config.deployment, base, guard)?;

    let fleet = LocalFleet::start(&config, &db, opts.trainers).await?;
    let urls = (fleet.ingest_url.clone(), fleet.publisher_url.clone());
    let (o, s, b) = (opts.clone(), spec.clone(), base.clone());
    let owned: Vec<(String, Vec<Vec<Window>>, Vec<Sample>)> = swimmers
        .iter()
        .map(|w| (w.name.clone(), w.sessions.clone(), w.test.clone()))
        .collect();
    let repo = Repo::new(Keys::new(&config.deployment));
    let db2 = db.clone();
    let driven = tokio::task::spawn_blocking(move || {
        drive(&o, &s, fold, &db2, &repo, &b, &owned, &urls.0, &urls.1)
    })
    .await;
    let stopped = fleet.stop().await;
    let reports = driven??;
    stopped?;
    Ok(reports)
}

#[allow(clippy::too_many_arguments)]
fn drive(
    opts: &ReplayOptions,
    spec: &ModelSpec,
    fold: usize,
    db: &swimlane_store::Db,
    repo: &Repo,
    base: &MicroModel,
    swimmers: &[(String, Vec<Vec<Window>>, Vec<Sample>)],
    ingest: &str,
    publisher: &str,
) -> anyhow::Result<Vec<SwimmerReport>> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let mut devices = Vec::new();
    for (name, _, _) in swimmers {
        let token = new_token();
        let uid = UserId::new(name.clone())?;
        db.transact(|tx| repo.put_token(tx, &uid, &token, 0))?;
        devices.push(Device {
            user: name.clone(),
            token,
            ingest: ingest.into(),
            publisher: publisher.into(),
            agent: agent.clone(),
        });
    }
    let rounds = swimmers.iter().map(|s| s.1.len()).max().unwrap_or(0);
    let mut session_accuracy: Vec<Vec<f64>> = vec![Vec::new(); swimmers.len()];
    let mut session_base: Vec<Vec<f64>> = vec![Vec::new(); swimmers.len()];
    // Per swimmer and session: windows, right by the device, right by the base, right
    // by the device only, right by the base only.
    let mut live_counts: Vec<Vec<[usize; 5]>> = vec![Vec::new(); swimmers.len()];
    let mut statuses: Vec<BTreeMap<String, String>> = vec![BTreeMap::new(); swimmers.len()];
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); swimmers.len()];
    let t0 = Instant::now();
    for round in 0..rounds {
        let mut pending = Vec::new();
        for (i, (_, sessions, _)) in swimmers.iter().enumerate() {
            let Some(session) = sessions.get(round) else {
                continue;
            };
            let d = &devices[i];
            // What the phone runs: the published version's ONNX file (with its fallback
            // to the base model for windows the version does not know), or the base.
            let samples: Vec<Sample> = session.iter().map(|w| w.sample.clone()).collect();
            let (predicted, version) = match d.current_onnx_versioned()? {
                Some((m, v)) => {
                    spec.ensure_same(m.spec())?;
                    (m.predict(&samples)?, Some(v))
                }
                None => (base.predict(&samples)?, None),
            };
            let feedback: Vec<Feedback> = samples
                .iter()
                .zip(&predicted)
                .map(|(s, p)| Feedback {
                    corrected: s.label != *p,
                    predicted: *p,
                    model_version: version,
                })
                .collect();
            let right = feedback.iter().filter(|f| !f.corrected).count();
            session_accuracy[i].push(right as f64 / samples.len() as f64);
            let base_hits: Vec<bool> = base
                .predict(&samples)?
                .iter()
                .zip(&samples)
                .map(|(p, s)| *p == s.label)
                .collect();
            let base_right = base_hits.iter().filter(|h| **h).count();
            let (mut device_only, mut base_only) = (0, 0);
            for (f, b) in feedback.iter().zip(&base_hits) {
                match (!f.corrected, *b) {
                    (true, false) => device_only += 1,
                    (false, true) => base_only += 1,
                    _ => {}
                }
            }
            session_base[i].push(base_right as f64 / samples.len() as f64);
            live_counts[i].push([samples.len(), right, base_right, device_only, base_only]);
            let (samples, feedback): (Vec<Sample>, Vec<Feedback>) = samples
                .into_iter()
                .zip(feedback)
                .filter(|(_, f)| f.corrected || !opts.corrections_only)
                .unzip();
            if samples.is_empty() {
                continue;
            }
            let id = format!("session-{round:03}");
            d.post_batch(crate::upload::upload_json_with(
                spec,
                &id,
                &samples,
                Some(&feedback),
            ))?;
            pending.push((i, id));
        }
        let deadline = Instant::now() + Duration::from_secs(900);
        while !pending.is_empty() {
            let mut still = Vec::new();
            for (i, id) in pending {
                let st = devices[i].status(&id)?;
                let word = st["status"].as_str().unwrap_or("").to_string();
                if settled(&word) {
                    if let Some(r) = st["reason"].as_str() {
                        reasons[i].push(format!("{id} {word}: {r}"));
                    }
                    statuses[i].insert(id, word);
                } else {
                    still.push((i, id));
                }
            }
            pending = still;
            if !pending.is_empty() {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "uploads did not settle within 15 minutes: {pending:?}"
                );
                std::thread::sleep(Duration::from_millis(40));
            }
        }
        if opts.progress {
            eprint!(
                "\r  fold {} session {}/{} settled  {:>6.1}s",
                fold + 1,
                round + 1,
                rounds,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    if opts.progress {
        eprintln!();
    }
    let mut out = Vec::new();
    for (i, (name, sessions, test)) in swimmers.iter().enumerate() {
        let d = &devices[i];
        let b = evaluate(base, test)?;
        let f = match d.current_onnx_versioned()? {
            Some((m, _)) => m.evaluate(test)?,
            None => b.clone(),
        };
        let baseline = no_gate_baseline(opts, base, name, sessions)?;
        let g = evaluate(&baseline, test)?;
        let st = &statuses[i];
        let end = &live_counts[i][live_counts[i].len().saturating_sub(LIVE_END_SESSIONS)..];
        let sum = |sessions: &[[usize; 5]], k: usize| sessions.iter().map(|c| c[k]).sum::<usize>();
        let n = sum(end, 0).max(1) as f64;
        let (device_only, base_only) = (sum(end, 3), sum(end, 4));
        let later = live_counts[i].get(1..).unwrap_or(&[]);
        let versions = d.versions_json()?;
        let rollbacks = versions["versions"].as_array().map_or(0, |vs| {
            vs.iter()
                .filter(|v| v["standing"]["state"] == "rolled_back")
                .count()
        });
        out.push(SwimmerReport {
            session_base_accuracy: session_base[i].clone(),
            live_end: sum(end, 1) as f64 / n,
            live_end_base: sum(end, 2) as f64 / n,
            live_end_device_only: device_only,
            live_end_base_only: base_only,
            live_end_below_z: if device_only + base_only == 0 {
                0.0
            } else {
                (base_only as f64 - device_only as f64) / ((base_only + device_only) as f64).sqrt()
            },
            later_live: [0, 1, 2, 3, 4].map(|k| sum(later, k)),
            rollbacks,
            swimmer: name.clone(),
            fold,
            windows: sessions.iter().map(Vec::len).sum::<usize>() + test.len(),
            test_windows: test.len(),
            uploads: sessions.len(),
            base_accuracy: b.accuracy,
            base_macro_f1: b.macro_f1(),
            final_accuracy: f.accuracy,
            final_macro_f1: f.macro_f1(),
            baseline_accuracy: g.accuracy,
            baseline_macro_f1: g.macro_f1(),
            session_accuracy: session_accuracy[i].clone(),
            versions_published: versions["versions"].as_array().map_or(0, Vec::len),
            uploads_rejected: st.values().filter(|s| *s == "rejected").count(),
            uploads_deferred: st.values().filter(|s| *s == "deferred").count(),
            reasons: reasons[i].clone(),
        });
    }
    Ok(out)
}

/// Plain per-swimmer fine-tuning with no gate: after every session, fine-tune the
/// current model on every window uploaded so far and replace it.
fn no_gate_baseline(
    opts: &ReplayOptions,
    base: &MicroModel,
    name: &str,
    sessions: &[Vec<Window>],
) -> anyhow::Result<MicroModel> {
    let mut current = base.clone();
    let mut seen: Vec<Sample> = Vec::new();
    for (k, s) in sessions.iter().enumerate() {
        let session: Vec<Sample> = s.iter().map(|w| w.sample.clone()).collect();
        if opts.corrections_only {
            let predicted = current.predict(&session)?;
            seen.extend(
                session
                    .into_iter()
                    .zip(predicted)
                    .filter(|(w, p)| w.label != *p)
                    .map(|(w, _)| w),
            );
        } else {
            seen.extend(session);
        }
        if seen.is_empty() {
            continue;
        }
        let seed = derive_seed(opts.seed, 4, hash(name) ^ k as u64);
        current = fine_tune(&current, &seen, &TrainConfig::fine_tune().with_seed(seed))?.0;
    }
    Ok(current)
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Print the report as a table.
pub fn print_table(r: &ReplayReport) {
    println!(
        "{:<12} {:>4} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>7}",
        "swimmer",
        "fold",
        "uploads",
        "test",
        "base",
        "baseF1",
        "final",
        "finalF1",
        "no-gate",
        "ngF1",
        "versions",
        "rejected",
        "deferred",
        "rollbk",
        "liveEnd",
        "baseEnd"
    );
    for u in &r.swimmers {
        println!(
            "{:<12} {:>4} {:>7} {:>6} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>8.3} {:>8.3} {:>8} {:>8} {:>8} {:>6} {:>7.3} {:>7.3}",
            u.swimmer,
            u.fold,
            u.uploads,
            u.test_windows,
            u.base_accuracy,
            u.base_macro_f1,
            u.final_accuracy,
            u.final_macro_f1,
            u.baseline_accuracy,
            u.baseline_macro_f1,
            u.versions_published,
            u.uploads_rejected,
            u.uploads_deferred,
            u.rollbacks,
            u.live_end,
            u.live_end_base
        );
    }
    for (name, s) in [
        ("base", &r.base),
        ("swimlane", &r.swimlane),
        ("no-gate baseline", &r.no_gate_baseline),
    ] {
        println!(
            "{name:<17} median accuracy {:.3}, median macro-F1 {:.3}, worst {:.3}, worst change vs base {:+.3}, {} swimmers more than 0.02 below base",
            s.median_accuracy, s.median_macro_f1, s.worst_accuracy, s.worst_change, s.below_base
        );
    }
    println!(
        "live accuracy after each swimmer's first session: {:.3} (the base model on the same windows: {:.3}); of the windows the base model got wrong the device got {} of {} right, of those it got right the device got {} of {} wrong",
        r.live_accuracy, r.live_accuracy_base, r.live_fixed.0, r.live_fixed.1, r.live_broken.0, r.live_broken.1
    );
    println!(
        "live accuracy in each swimmer's last session (last {LIVE_END_SESSIONS}): {} swimmers significantly below the base model on the same windows (paired sign test, z >= {LIVE_BELOW_Z}), {} more than 0.02 below; {} versions rolled back on probation",
        r.live_significantly_below_base, r.live_below_base, r.rollbacks
    );
    println!(
        "{} swimmers, {} folds, seed {}, {:.1}s",
        r.swimmers.len(),
        r.folds,
        r.seed,
        r.seconds
    );
}

/// Whether the real-swimmer data folder is there (tests skip without it).
pub fn data_present(path: &Path) -> bool {
    path.join("README.md").is_file()
}
