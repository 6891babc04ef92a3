//! `swimlane bench pipeline`: the pipeline's throughput and its own overhead, with the
//! workers as separate processes (`swimlane worker …`) on a fresh embedded store, over
//! the embedded bus or Kafka.
//!
//! One run per trainer count: `users` simulated swimmers each upload one batch of
//! corrections of the base model, all at once, through the ingest API; the run ends
//! when every batch has settled (published, rejected or deferred). It reports, from
//! the store's own records:
//! - throughput: batches published per minute, from the first upload to the last
//!   publish;
//! - per published batch, the pipeline's overhead: upload accepted (`staged_at_ms`) to
//!   model published (`published_at_ms`), minus the seconds the trainer spent training
//!   its run (`train_seconds`) and the validator spent scoring it
//!   (`validate_seconds`). p50 and p99, twice: for the burst above (where most of it
//!   is waiting behind other users' training), and for `paced` more swimmers who
//!   upload one at a time, each after the previous one settled (the bus, store
//!   transactions, polling and process scheduling alone).
//!
//! With `history` N, every swimmer (burst and paced) first uploads N earlier batches
//! (`night-0` …), all at once a round, each round settled before the next; the
//! measured batch is `night-N`. So each measured upload lands on a store that has run
//! for a while: the user's retained windows are trained and scored again, retention
//! retires the oldest batch once the budgets are full (ARCHITECTURE.md, "Each user's
//! history is bounded"), and the store reuses the pages retired batches freed. Only
//! the measured batches' runs and the workers' CPU from the measured burst on count.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use swimlane_bus::positions;
use swimlane_core::keys::Keys;
use swimlane_core::records::BatchStatus;
use swimlane_core::{topics, UserId};
use swimlane_model::synth::{corrections, Swimmer};
use swimlane_model::MicroModel;
use swimlane_runtime::Config;
use swimlane_state::Repo;

use crate::client::{Device, Upload};
use crate::procfleet::{FleetSpec, ProcFleet};

/// What to run.
#[derive(Clone, Debug)]
pub struct PipelineBenchOptions {
    /// `embedded` or `kafka://host:port`.
    pub bus: String,
    /// One run per entry: trainer processes.
    pub trainers: Vec<usize>,
    /// Swimmers, one batch each, uploaded at once.
    pub users: usize,
    /// More swimmers, one batch each, uploaded one at a time.
    pub paced: usize,
    pub seed: u64,
    /// Where the scratch stores go (default: the system temporary directory).
    pub dir: Option<PathBuf>,
    /// The `swimlane` binary to start workers from.
    pub exe: PathBuf,
    /// Partitions per topic.
    pub partitions: u32,
    /// Most corrections per batch (the phone's mistakes on the windows it observed).
    pub corrections: usize,
    /// Threads each trainer process trains with (`SWIMLANE_TRAINER_THREADS`); 0:
    /// candle's default, one per core.
    pub trainer_threads: usize,
    /// A Python with `ray`, `torch` and `safetensors`: after the runs, the Ray +
    /// PyTorch peer (`bench/ray_peer.py`) does the same job on the same users' windows
    /// (swimlane's split, read from the first run's store), and the report compares
    /// users retrained per core-minute.
    pub peer: Option<PathBuf>,
    /// How the uploads carry their windows (docs/batch-format.md).
    pub frames: crate::upload::Frames,
    /// Earlier batches every swimmer uploads before the measured one (module doc).
    pub history: usize,
}

/// One run's figures.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineBenchRun {
    pub trainers: usize,
    pub batches: usize,
    pub published: usize,
    pub rejected: usize,
    pub deferred: usize,
    /// First upload to last publish.
    pub seconds: f64,
    pub batches_published_per_min: f64,
    /// Upload accepted → model published, p50 / p99 (seconds).
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
    /// The same minus training and validation time, p50 / p99 (seconds).
    pub overhead_p50_s: f64,
    pub overhead_p99_s: f64,
    /// Batches uploaded one at a time, and how many of them were published.
    pub paced_batches: usize,
    pub paced_published: usize,
    /// Their upload → published latency and overhead, p50 / p99 (seconds).
    pub paced_latency_p50_s: f64,
    pub paced_latency_p99_s: f64,
    pub paced_overhead_p50_s: f64,
    pub paced_overhead_p99_s: f64,
    /// The paced overhead's two halves, p50 (seconds): upload accepted → candidate
    /// committed, minus training (the first hop and the trainer's reads and writes);
    /// candidate committed → published, minus scoring (two hops, the validator's and
    /// the publisher's own work).
    pub paced_to_trained_p50_s: f64,
    pub paced_trained_to_published_p50_s: f64,
    pub train_seconds_mean: f64,
    pub validate_seconds_mean: f64,
    /// Peak resident memory of each worker process at the end of the run (MiB).
    pub peak_rss_mib: std::collections::BTreeMap<String, f64>,
    /// The store's files (database and write-ahead log) over every user of the run.
    pub store_bytes_per_user: f64,
    /// First upload of the burst until every one of its batches settled.
    pub settled_seconds: f64,
    /// Burst batches (each trained and validated, and its model published with its
    /// ONNX file or the batch rejected or deferred) per minute per core.
    pub users_retrained_per_core_min: f64,
    /// That over the peer's users retrained per core-minute (with `--peer`).
    pub over_peer: Option<f64>,
    /// CPU seconds (user + system) each worker process used during the burst.
    pub burst_cpu_seconds: std::collections::BTreeMap<String, f64>,
    /// CPU seconds the bench process itself used during the burst (its devices'
    /// uploads and its polling for settled batches), on the same cores as the fleet.
    pub bench_cpu_seconds: f64,
    /// Every worker's burst CPU over the burst's users, in milliseconds (compare with
    /// `train_seconds_mean` and `validate_seconds_mean`, which are wall time).
    pub cpu_ms_per_user: f64,
    /// CPU seconds the burst's runs spent training (each trainer process's CPU over its
    /// runs' training) and scoring (the validator's over its scoring), from the run
    /// records (`train_cpu_seconds`, `validate_cpu_seconds`); every run counted,
    /// published or rejected.
    pub burst_model_cpu_seconds: f64,
    /// `burst_model_cpu_seconds`' training part (the trainers' `train_cpu_seconds`);
    /// the rest is the validator's scoring.
    pub burst_train_cpu_seconds: f64,
    /// The runs whose CPU that sums: those over the burst's measured batches (with
    /// `history`, not the earlier rounds').
    pub burst_model_runs: usize,
    /// The share of the burst's fleet CPU (`burst_cpu_seconds`, every worker) spent on
    /// anything but that training and scoring.
    pub cpu_outside_model_share: f64,
    /// That CPU outside training and scoring, per kind of worker, in milliseconds a
    /// burst user ([`outside_ms_per_user`]).
    pub outside_ms_per_user: std::collections::BTreeMap<String, f64>,
}

/// The burst's CPU outside training and scoring per kind of worker, in milliseconds a
/// user: `ingest` and `publisher` their whole CPU; `trainer` every trainer process's
/// CPU less their training (`train_cpu`); `validator` its CPU less its scoring
/// (`model_cpu - train_cpu`). Each is at least 0 (the clocks are read at different
/// moments, so a nearly idle part could come out a hair below it).
pub fn outside_ms_per_user(
    burst_cpu_seconds: &std::collections::BTreeMap<String, f64>,
    model_cpu: f64,
    train_cpu: f64,
    users: usize,
) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for (worker, cpu) in burst_cpu_seconds {
        let kind = worker.split('-').next().unwrap_or(worker);
        *out.entry(kind.to_string()).or_insert(0.0) += cpu;
    }
    let less = |out: &mut std::collections::BTreeMap<String, f64>, kind: &str, s: f64| {
        if let Some(v) = out.get_mut(kind) {
            *v -= s;
        }
    };
    less(&mut out, "trainer", train_cpu);
    less(&mut out, "validator", model_cpu - train_cpu);
    for v in out.values_mut() {
        *v = round3(v.max(0.0) * 1000.0 / users.max(1) as f64);
    }
    out
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineBenchReport {
    pub bus: String,
    pub users: usize,
    pub paced: usize,
    pub seed: u64,
    pub partitions: u32,
    pub corrections: usize,
    pub cores: usize,
    /// Threads per trainer process; 0: candle's default (one per core).
    pub trainer_threads: usize,
    /// `binary`, `numbers` or `f32le` (base64).
    pub frames: String,
    /// Earlier batches per swimmer before the measured one.
    pub history: usize,
    pub runs: Vec<PipelineBenchRun>,
    /// What the Ray + PyTorch peer printed (with `--peer`).
    pub peer: Option<serde_json::Value>,
}

const DEPLOYMENT: &str = "bench";
/// A swimmer is used only if the base model gets at least this many of its observed
/// windows wrong, so that its batch has enough held-out evidence to publish.
const MIN_CORRECTIONS: usize = 90;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1200);
/// Most earlier batches a swimmer uploads before the measured one (`history`).
pub const MAX_HISTORY: usize = 10;

/// The batch id of a swimmer's upload in round `round` (0 first).
fn batch_id(round: usize) -> String {
    format!("night-{round}")
}

/// Run the benchmark: one run per entry of `opts.trainers`.
pub fn run(opts: &PipelineBenchOptions) -> anyhow::Result<PipelineBenchReport> {
    anyhow::ensure!(opts.users >= 1, "--users must be at least 1");
    anyhow::ensure!(
        !opts.trainers.is_empty() && opts.trainers.iter().all(|t| (1..=16).contains(t)),
        "--trainers: between 1 and 16 processes per run"
    );
    let probe = Config {
        bus: opts.bus.clone(),
        ..Config::default()
    };
    probe.validate()?;
    anyhow::ensure!(
        (MIN_CORRECTIONS..=1000).contains(&opts.corrections),
        "--corrections must be between {MIN_CORRECTIONS} and 1000"
    );
    anyhow::ensure!(
        opts.history <= MAX_HISTORY,
        "--history must be at most {MAX_HISTORY}"
    );
    // The peer is given every window a user's batches hold; with earlier rounds that is
    // not what the measured run trained on (rejected batches' windows, for one).
    anyhow::ensure!(
        opts.history == 0 || opts.peer.is_none(),
        "--peer compares each swimmer's first upload: it cannot be combined with --history"
    );
    eprintln!("training the base model (seed {})...", opts.seed);
    let (base, _) = swimlane_model::experiment::train_default_base(opts.seed)?;
    let mut rounds = make_rounds(&base, opts.users + opts.paced, opts, opts.history + 1)?;
    let uploads = rounds.pop().expect("one round at least");
    let peer_dir = opts
        .peer
        .as_ref()
        .map(|_| tempfile::tempdir())
        .transpose()?;
    let mut runs = Vec::new();
    for (k, &n) in opts.trainers.iter().enumerate() {
        eprintln!(
            "run: {n} trainer process(es), {} batches at once, then {} one at a time",
            opts.users, opts.paced
        );
        // The peer gets the first run's users with swimlane's own split.
        let export = peer_dir.as_ref().filter(|_| k == 0).map(|d| d.path());
        let r = run_once(
            opts,
            scratch(opts, &base, &uploads, n)?,
            &rounds,
            &uploads,
            n,
            export,
        )?;
        eprintln!(
            "  {:.1} batches published/min; overhead p50 {:.3} s p99 {:.3} s; paced overhead p50 {:.3} s p99 {:.3} s (p50 to trained {:.3} s, trained to published {:.3} s)",
            r.batches_published_per_min,
            r.overhead_p50_s,
            r.overhead_p99_s,
            r.paced_overhead_p50_s,
            r.paced_overhead_p99_s,
            r.paced_to_trained_p50_s,
            r.paced_trained_to_published_p50_s
        );
        runs.push(r);
    }
    let peer = match (&opts.peer, &peer_dir) {
        (Some(python), Some(dir)) => {
            let p = run_peer(python, dir.path(), &base)?;
            let rate = p["users_per_core_min"]
                .as_f64()
                .context("peer: no users_per_core_min")?;
            for r in &mut runs {
                r.over_peer = Some(round3(r.users_retrained_per_core_min / rate));
            }
            Some(p)
        }
        _ => None,
    };
    Ok(PipelineBenchReport {
        bus: opts.bus.clone(),
        users: opts.users,
        paced: opts.paced,
        seed: opts.seed,
        partitions: opts.partitions,
        corrections: opts.corrections,
        cores: cores(),
        trainer_threads: opts.trainer_threads,
        frames: format!("{:?}", opts.frames).to_lowercase(),
        history: opts.history,
        runs,
        peer,
    })
}

/// The peer's script, written next to its data for each run.
const RAY_PEER: &str = include_str!("../../bench/ray_peer.py");

/// Write the burst users' samples for the peer into `dir`, split as swimlane split
/// them (`u{i}-train.safetensors`, `u{i}-heldout.safetensors`, swimlane-samples
/// format), one read transaction per user.
fn export_for_peer(
    db: &swimlane_store::Db,
    repo: &Repo,
    users: &[&str],
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    for (i, u) in users.iter().enumerate() {
        let (mut train, mut heldout) = (Vec::new(), Vec::new());
        let staged = db.transact(|tx| {
            let mut all = Vec::new();
            for (id, _) in repo.batches(tx, u)? {
                all.extend(repo.samples(tx, u, &id)?);
            }
            Ok(all)
        })?;
        for s in staged {
            let side = if s.heldout { &mut heldout } else { &mut train };
            side.push(swimlane_model::Sample {
                frames: s.frames,
                label: s.label,
            });
        }
        for (name, samples) in [("train", &train), ("heldout", &heldout)] {
            std::fs::write(
                dir.join(format!("u{i}-{name}.safetensors")),
                swimlane_model::dataset::to_bytes(samples)?,
            )?;
        }
    }
    Ok(())
}

/// Run the Ray + PyTorch peer on the data in `dir` with swimlane's fine-tuning rule and
/// gate; its JSON line.
fn run_peer(
    python: &std::path::Path,
    dir: &std::path::Path,
    base: &MicroModel,
) -> anyhow::Result<serde_json::Value> {
    std::fs::write(dir.join("base.safetensors"), base.to_bytes())?;
    let script = dir.join("ray_peer.py");
    std::fs::write(&script, RAY_PEER)?;
    let t = swimlane_model::TrainConfig::fine_tune();
    let policy = Config::default().validator.policy;
    let cfg = serde_json::json!({
        "epochs": t.epochs, "batch": t.batch_size, "lr": t.learning_rate,
        "weight_decay": t.weight_decay, "patience": t.patience,
        "val_fraction": t.val_fraction, "min_val_samples": t.min_val_samples,
        "anchor": t.anchor, "margin": policy.margin, "gain_z": policy.gain_z,
    });
    eprintln!(
        "peer: Ray + PyTorch on the same users ({})...",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(["--data", &dir.display().to_string()])
        .args(["--cpus", &cores().to_string()])
        .args(["--config", &cfg.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "the peer failed ({}); does {} have ray, torch and safetensors? (bench/vs_ray.sh installs them)",
        out.status,
        python.display()
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let last = line
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("the peer printed no JSON: {line}"))
}

/// One upload per user: (user, upload JSON).
fn make_uploads(
    base: &MicroModel,
    users: usize,
    opts: &PipelineBenchOptions,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    Ok(make_rounds(base, users, opts, 1)?.remove(0))
}

/// `rounds` uploads of each of `users` swimmers: `out[r][i]` is swimmer `i`'s batch
/// [`batch_id`]`(r)`, corrections of the base model on windows the swimmer swam (a
/// swimmer whose round has too few is replaced, in every round).
fn make_rounds(
    base: &MicroModel,
    users: usize,
    opts: &PipelineBenchOptions,
    rounds: usize,
) -> anyhow::Result<Vec<Vec<(String, Vec<u8>)>>> {
    let (max_corrections, seed) = (opts.corrections, opts.seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); rounds];
    let mut s = seed.wrapping_mul(1000) + 1;
    while out[0].len() < users {
        let sw = Swimmer::new(s);
        s += 1;
        // The base model gets about one window in six wrong.
        let observed = (max_corrections * 10).max(300);
        let mut batches = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let c = corrections(base, &sw, observed, max_corrections, &mut rng)?;
            if c.len() < MIN_CORRECTIONS {
                break;
            }
            batches.push(c);
        }
        if batches.len() < rounds {
            continue;
        }
        let user = format!("bench-{:03}", out[0].len());
        for (r, c) in batches.iter().enumerate() {
            let body = crate::upload::upload_body_as(&batch_id(r), c, opts.frames);
            out[r].push((user.clone(), body));
        }
    }
    Ok(out)
}

/// The training stage alone, one run per entry of `opts.trainers` (the same users'
/// batches each time): every batch staged while the trainers are paused, then the
/// clock runs from their release until every user's candidate is trained (no
/// validator, publisher or ingest running). A JSON report: per run, the trainer
/// processes, seconds, runs per minute and mean training seconds; and two trainers'
/// rate over one's.
pub fn training_alone(opts: &PipelineBenchOptions) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(opts.users >= 1, "--users must be at least 1");
    anyhow::ensure!(
        opts.history == 0,
        "--history is not measured with --training-alone"
    );
    eprintln!("training the base model (seed {})...", opts.seed);
    let (base, _) = swimlane_model::experiment::train_default_base(opts.seed)?;
    let uploads = make_uploads(&base, opts.users, opts)?;
    let mut runs = Vec::new();
    let mut per_min = std::collections::BTreeMap::new();
    for &n in &opts.trainers {
        let sc = scratch(opts, &base, &uploads, n)?;
        let (seconds, train_seconds) = run_training(opts, sc, &uploads, n)?;
        let rate = round3(uploads.len() as f64 / seconds * 60.0);
        eprintln!("  {n} trainer process(es): {rate:.0} runs/min ({seconds:.2} s)");
        per_min.insert(n, rate);
        runs.push(serde_json::json!({
            "trainers": n, "seconds": round3(seconds), "runs_per_min": rate,
            "train_seconds_mean": round3(mean(&train_seconds)),
        }));
    }
    let two_over_one = per_min
        .get(&2)
        .zip(per_min.get(&1))
        .map(|(b, a)| round3(b / a));
    Ok(serde_json::json!({
        "users": opts.users, "corrections": opts.corrections, "cores": cores(),
        "trainer_threads": opts.trainer_threads, "runs": runs, "two_over_one": two_over_one,
    }))
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn run_training(
    opts: &PipelineBenchOptions,
    mut sc: Scratch,
    uploads: &[(String, Vec<u8>)],
    trainers: usize,
) -> anyhow::Result<(f64, Vec<f64>)> {
    // Slot 0 is ingest, 1..=trainers the trainers; the validator and publisher stay
    // down.
    for i in 0..=trainers {
        sc.procs.spawn(i)?;
    }
    for i in 0..=trainers {
        sc.procs.wait_ready(i, Duration::from_secs(120))?;
    }
    wait_split(&mut sc, opts.partitions, trainers)?;
    for i in 1..=trainers {
        sc.procs.signal(i, "STOP")?;
    }
    let staged = burst(&sc.devices, uploads, uploads.len());
    let t0_ms = now_ms();
    for i in 1..=trainers {
        sc.procs.signal(i, "CONT")?;
    }
    staged?;
    sc.procs.kill(0)?;
    // The clock stops at the last run record's creation (the trainer's commit), so the
    // bench polls seldom and reads only users not seen trained yet: its own polling
    // takes little CPU from the trainers it times.
    let mut pending: Vec<&str> = uploads.iter().map(|(u, _)| u.as_str()).collect();
    let (mut train_seconds, mut last_ms) = (Vec::new(), t0_ms);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !pending.is_empty() {
        sc.procs.check_alive()?;
        let runs = sc.db.transact(|tx| {
            let mut runs = Vec::new();
            for u in &pending {
                runs.push(sc.repo.runs(tx, u)?);
            }
            Ok(runs)
        })?;
        let mut still = Vec::new();
        for (u, r) in pending.iter().zip(runs) {
            if r.is_empty() {
                still.push(*u);
            }
            train_seconds.extend(r.iter().map(|r| r.train_seconds as f64));
            last_ms = r.iter().map(|r| r.created_at_ms).fold(last_ms, u64::max);
        }
        pending = still;
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {} candidates not trained after {SETTLE_TIMEOUT:?}",
            pending.len(),
            uploads.len()
        );
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(((last_ms - t0_ms) as f64 / 1000.0, train_seconds))
}

/// A run's scratch store (the base model installed, a token per user) and the worker
/// processes' slots, none started.
struct Scratch {
    _tmp: tempfile::TempDir,
    db: swimlane_store::Db,
    repo: Repo,
    keys: Keys,
    procs: ProcFleet,
    /// One client per device, made before anything is timed.
    devices: Vec<Device>,
}

fn scratch(
    opts: &PipelineBenchOptions,
    base: &MicroModel,
    uploads: &[(String, Vec<u8>)],
    trainers: usize,
) -> anyhow::Result<Scratch> {
    let tmp = match &opts.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let store = tmp.path().join("store");
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let prefix = format!("bench-{}-{nanos}.", std::process::id());
    let config = Config {
        deployment: DEPLOYMENT.into(),
        store: store.display().to_string(),
        bus: opts.bus.clone(),
        partitions: opts.partitions,
        topic_prefix: prefix.clone(),
        ..Config::default()
    };
    config.validate()?;
    swimlane_runtime::wiring::create_topics(&config, 1)?;
    let db = swimlane_runtime::open_store(&config)?;
    crate::init::install(&db, DEPLOYMENT, opts.seed, Some(base.clone()))?;
    let repo = Repo::new(Keys::new(DEPLOYMENT));
    let mut tokens = Vec::new();
    for (u, _) in uploads {
        let token = swimlane_state::tokens::new_token();
        let user = UserId::new(u.clone())?;
        db.transact(|tx| repo.put_token(tx, &user, &token, now_ms()))?;
        tokens.push(token);
    }

    let env: Vec<(String, String)> = vec![
        ("SWIMLANE_STORE".into(), config.store.clone()),
        ("SWIMLANE_DEPLOYMENT".into(), DEPLOYMENT.into()),
        ("SWIMLANE_BUS".into(), opts.bus.clone()),
        ("SWIMLANE_PARTITIONS".into(), opts.partitions.to_string()),
        ("SWIMLANE_TOPIC_PREFIX".into(), prefix),
        ("SWIMLANE_LOG".into(), "warn".into()),
        (
            "SWIMLANE_INGEST_MAX_SAMPLES_PER_BATCH".into(),
            "1000".into(),
        ),
        (
            "SWIMLANE_TRAINER_THREADS".into(),
            opts.trainer_threads.to_string(),
        ),
    ];
    let procs = ProcFleet::new(
        FleetSpec {
            exe: opts.exe.clone(),
            env,
            log_dir: logs,
        },
        trainers,
    )?;
    let http = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
        .build();
    let ingest_url = procs.ingest_url();
    let devices = uploads
        .iter()
        .zip(&tokens)
        .map(|((user, _), token)| Device {
            agent: http.clone(),
            ..Device::new(&ingest_url, "", user, token)
        })
        .collect();
    Ok(Scratch {
        _tmp: tmp,
        db,
        repo,
        keys: Keys::new(DEPLOYMENT),
        procs,
        devices,
    })
}

/// Wait until the trainers have split the partitions of the batches topic between
/// them (Kafka: the group has settled its assignment).
fn wait_split(sc: &mut Scratch, partitions: u32, trainers: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        sc.procs.check_alive()?;
        let owners = sc.db.transact(|tx| {
            let mut o = std::collections::BTreeSet::new();
            let mut all = true;
            for p in 0..partitions {
                let (g, t) = (swimlane_core::groups::TRAINERS, topics::BATCHES);
                match positions::owner(tx, &sc.keys, g, t, p)? {
                    Some(owner) => {
                        o.insert(owner.member);
                    }
                    None => all = false,
                }
            }
            Ok((all, o.len()))
        })?;
        if owners.0 && owners.1 >= trainers.min(partitions as usize) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the trainers did not take every partition in time ({owners:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Upload `uploads[i]` through its device; an error says whose and why.
fn upload_one(devices: &[Device], uploads: &[(String, Vec<u8>)], i: usize) -> Result<(), String> {
    let (user, body) = &uploads[i];
    match devices[i].upload(body) {
        Ok(Upload::Accepted(_)) => Ok(()),
        Ok(Upload::Retry(why)) => Err(format!("{user}: {why}")),
        Err(e) => Err(format!("{user}: {e}")),
    }
}

/// Upload `uploads[..n]` at once, from a few device threads.
fn burst(devices: &[Device], uploads: &[(String, Vec<u8>)], n: usize) -> anyhow::Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures: std::sync::Mutex<Vec<String>> = Default::default();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return;
                }
                if let Err(e) = upload_one(devices, uploads, i) {
                    failures.lock().unwrap().push(e);
                }
            });
        }
    });
    let f = failures.into_inner().unwrap();
    anyhow::ensure!(f.is_empty(), "uploads failed: {f:?}");
    Ok(())
}

fn run_once(
    opts: &PipelineBenchOptions,
    mut sc: Scratch,
    earlier: &[Vec<(String, Vec<u8>)>],
    uploads: &[(String, Vec<u8>)],
    trainers: usize,
    export: Option<&std::path::Path>,
) -> anyhow::Result<PipelineBenchRun> {
    sc.procs.start_all(Duration::from_secs(120))?;
    // The trainers split the partitions before the clock starts.
    wait_split(&mut sc, opts.partitions, trainers)?;
    let Scratch {
        _tmp,
        db,
        repo,
        mut procs,
        devices,
        ..
    } = sc;
    let upload = |i: usize| upload_one(&devices, uploads, i);
    // Every batch this bench uploads is in flight until it settles, and it waits for
    // each phase's batches before the next: the pipeline's pending index is empty
    // exactly when every batch uploaded so far is published, rejected or deferred
    // (`Repo::put_batch`). Asking it is one range read of at most one key, so the bench's
    // own polling takes almost no CPU from the workers it times (reading each user's
    // batch record took about a twentieth of a core during a 96-user burst).
    let measured = batch_id(opts.history);
    let wait_settled = |users: &[&str], batch: &str, procs: &mut ProcFleet| -> anyhow::Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            procs.check_alive()?;
            if db.transact(|tx| repo.oldest_pending_batch(tx))?.is_none() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let open = db.transact(|tx| {
                    let mut open = Vec::new();
                    for u in users {
                        let settled = repo.batch(tx, u, batch)?.is_some_and(|b| {
                            b.status.is_terminal()
                                || matches!(b.status, BatchStatus::Deferred { .. })
                        });
                        if !settled {
                            open.push(*u);
                        }
                    }
                    Ok(open)
                })?;
                anyhow::bail!(
                    "{} batches not settled after {SETTLE_TIMEOUT:?} (of users {open:?})",
                    open.len()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let burst_users: Vec<&str> = uploads[..opts.users]
        .iter()
        .map(|(u, _)| u.as_str())
        .collect();
    // The earlier rounds (`history`): every swimmer's at once, each round settled.
    let all_users: Vec<&str> = uploads.iter().map(|(u, _)| u.as_str()).collect();
    for (r, round) in earlier.iter().enumerate() {
        eprintln!("  history round {}: {} batches", r + 1, round.len());
        burst(&devices, round, round.len())?;
        wait_settled(&all_users, &batch_id(r), &mut procs)?;
    }

    // The burst: all uploads at once, from a few device threads.
    let t0_ms = now_ms();
    let t0 = Instant::now();
    let cpu0 = procs.cpu_seconds();
    let me = std::process::id();
    let bench_cpu0 = crate::procfleet::process_cpu_seconds(me).unwrap_or(0.0);
    burst(&devices, uploads, opts.users)?;
    wait_settled(&burst_users, &measured, &mut procs)?;
    let wall = t0.elapsed().as_secs_f64();
    let bench_cpu = crate::procfleet::process_cpu_seconds(me).unwrap_or(0.0) - bench_cpu0;
    let burst_cpu_seconds: std::collections::BTreeMap<String, f64> = procs
        .cpu_seconds()
        .into_iter()
        .map(|(w, c)| (w.clone(), round3(c - cpu0.get(&w).copied().unwrap_or(0.0))))
        .collect();
    let cpu: f64 = burst_cpu_seconds.values().sum();
    let b = figures(&db, &repo, &burst_users, &measured)?;

    // Paced: one upload at a time, each after the previous one settled.
    let paced: Vec<&str> = uploads[opts.users..]
        .iter()
        .map(|(u, _)| u.as_str())
        .collect();
    for (k, u) in paced.iter().enumerate() {
        upload(opts.users + k).map_err(|e| anyhow::anyhow!("upload failed: {e}"))?;
        wait_settled(&[u], &measured, &mut procs)?;
    }
    let peak_rss_mib = procs.peak_rss_mib();
    drop(procs);
    let p = figures(&db, &repo, &paced, &measured)?;
    if let Some(dir) = export {
        export_for_peer(&db, &repo, &burst_users, dir)?;
    }
    let store_bytes: u64 = std::fs::read_dir(_tmp.path().join("store"))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();

    let seconds = if b.published > 0 {
        (b.last_publish_ms.max(t0_ms) - t0_ms) as f64 / 1000.0
    } else {
        wall
    };
    let (mut train, mut validate) = (b.train.clone(), b.validate.clone());
    train.extend(&p.train);
    validate.extend(&p.validate);
    Ok(PipelineBenchRun {
        trainers,
        batches: burst_users.len(),
        published: b.published,
        rejected: b.rejected,
        deferred: b.deferred,
        seconds: round3(seconds),
        batches_published_per_min: round3(b.published as f64 / seconds * 60.0),
        latency_p50_s: round3(quantile(&b.latency, 0.5)),
        latency_p99_s: round3(quantile(&b.latency, 0.99)),
        overhead_p50_s: round3(quantile(&b.overhead, 0.5)),
        overhead_p99_s: round3(quantile(&b.overhead, 0.99)),
        paced_batches: paced.len(),
        paced_published: p.published,
        paced_latency_p50_s: round3(quantile(&p.latency, 0.5)),
        paced_latency_p99_s: round3(quantile(&p.latency, 0.99)),
        paced_overhead_p50_s: round3(quantile(&p.overhead, 0.5)),
        paced_overhead_p99_s: round3(quantile(&p.overhead, 0.99)),
        paced_to_trained_p50_s: round3(quantile(&p.to_trained, 0.5)),
        paced_trained_to_published_p50_s: round3(quantile(&p.to_published, 0.5)),
        train_seconds_mean: round3(mean(&train)),
        validate_seconds_mean: round3(mean(&validate)),
        peak_rss_mib,
        store_bytes_per_user: (store_bytes as f64 / uploads.len() as f64).round(),
        settled_seconds: round3(wall),
        users_retrained_per_core_min: round3(
            burst_users.len() as f64 / (wall / 60.0) / cores() as f64,
        ),
        over_peer: None,
        cpu_ms_per_user: round3(cpu * 1000.0 / burst_users.len() as f64),
        burst_model_cpu_seconds: round3(b.model_cpu),
        burst_train_cpu_seconds: round3(b.train_cpu),
        burst_model_runs: b.model_runs,
        cpu_outside_model_share: round3(if cpu > 0.0 {
            1.0 - b.model_cpu / cpu
        } else {
            0.0
        }),
        outside_ms_per_user: outside_ms_per_user(
            &burst_cpu_seconds,
            b.model_cpu,
            b.train_cpu,
            burst_users.len(),
        ),
        burst_cpu_seconds,
        bench_cpu_seconds: round3(bench_cpu),
    })
}

/// Many devices downloading their models (`swimlane bench downloads`): `opts.users`
/// swimmers' batches go through the whole fleet first (one trainer); then `devices`
/// concurrent devices, each one of the users whose model was published (several
/// devices per user), download the model in `format` over keep-alive connections for
/// `seconds`: the first request of each device in full, every later one with
/// `If-None-Match` of the ETag it got (a phone checking for a new version), so almost
/// every answer is 304. Reports each kind's count and p50/p99 latency, the errors, the
/// requests per second and the publisher's peak memory.
pub fn downloads(
    opts: &PipelineBenchOptions,
    devices: usize,
    seconds: f64,
    format: &str,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(devices >= 1, "--devices must be at least 1");
    anyhow::ensure!(seconds > 0.0, "--seconds must be positive");
    eprintln!("training the base model (seed {})...", opts.seed);
    let (base, _) = swimlane_model::experiment::train_default_base(opts.seed)?;
    let uploads = make_uploads(&base, opts.users, opts)?;
    let mut sc = scratch(opts, &base, &uploads, 1)?;
    sc.procs.start_all(Duration::from_secs(120))?;
    wait_split(&mut sc, opts.partitions, 1)?;
    burst(&sc.devices, &uploads, uploads.len())?;
    // Until every batch has settled.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let published: Vec<(String, String)> = loop {
        sc.procs.check_alive()?;
        let (open, heads) = sc.db.transact(|tx| {
            let (mut open, mut heads) = (0, Vec::new());
            for d in &sc.devices {
                match sc.repo.batch(tx, &d.user, "night-0")? {
                    Some(b)
                        if b.status.is_terminal()
                            || matches!(b.status, BatchStatus::Deferred { .. }) =>
                    {
                        if sc.repo.user_state(tx, &d.user)?.head.is_some() {
                            heads.push((d.user.clone(), d.token.clone()));
                        }
                    }
                    _ => open += 1,
                }
            }
            Ok((open, heads))
        })?;
        if open == 0 {
            break heads;
        }
        anyhow::ensure!(Instant::now() < deadline, "{open} batches not settled");
        std::thread::sleep(Duration::from_millis(50));
    };
    anyhow::ensure!(!published.is_empty(), "no user's model was published");
    let addr: std::net::SocketAddr = sc
        .procs
        .publisher_url()
        .trim_start_matches("http://")
        .parse()?;
    eprintln!(
        "{devices} devices of {} users with a published model download for {seconds} s...",
        published.len()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let label = format.to_string();
    let format = format.to_string();
    let run = rt.block_on(async move {
        let end = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::with_capacity(devices);
        for i in 0..devices {
            let (user, token) = published[i % published.len()].clone();
            let format = format.clone();
            tasks.push(tokio::spawn(async move {
                download_loop(addr, &user, &token, &format, end).await
            }));
        }
        let mut all = DeviceFigures::default();
        for t in tasks {
            let f = t.await.unwrap_or_else(|e| DeviceFigures {
                errors: vec![format!("device task: {e}")],
                ..Default::default()
            });
            all.full.extend(f.full);
            all.not_modified.extend(f.not_modified);
            all.errors.extend(f.errors);
        }
        all
    });
    let peak = sc.procs.peak_rss_mib();
    let total = run.full.len() + run.not_modified.len();
    let mut first_errors = run.errors.clone();
    first_errors.sort();
    first_errors.dedup();
    first_errors.truncate(5);
    let ms = |v: &[f64], q: f64| round3(quantile(v, q) * 1000.0);
    Ok(serde_json::json!({
        "devices": devices, "users": opts.users, "seconds": seconds, "format": label,
        "full_downloads": run.full.len(), "full_p50_ms": ms(&run.full, 0.5), "full_p99_ms": ms(&run.full, 0.99),
        "not_modified": run.not_modified.len(), "not_modified_p50_ms": ms(&run.not_modified, 0.5),
        "not_modified_p99_ms": ms(&run.not_modified, 0.99),
        "requests_per_sec": round3(total as f64 / seconds),
        "errors": run.errors.len(), "first_errors": first_errors,
        "publisher_peak_rss_mib": peak.get("publisher"), "cores": cores(),
    }))
}

/// What one device (or all of them) saw: latencies in seconds.
#[derive(Default)]
struct DeviceFigures {
    full: Vec<f64>,
    not_modified: Vec<f64>,
    errors: Vec<String>,
}

/// One device: a keep-alive connection (re-opened if the server closes it), the model
/// in full once, then `If-None-Match` until `end`.
async fn download_loop(
    addr: std::net::SocketAddr,
    user: &str,
    token: &str,
    format: &str,
    end: tokio::time::Instant,
) -> DeviceFigures {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut f = DeviceFigures::default();
    let mut etag: Option<String> = None;
    let mut conn: Option<tokio::io::BufReader<tokio::net::TcpStream>> = None;
    while tokio::time::Instant::now() < end {
        let t0 = Instant::now();
        let result: Result<(u16, Option<String>), String> = async {
            if conn.is_none() {
                let s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
                conn = Some(tokio::io::BufReader::new(s));
            }
            let c = conn.as_mut().expect("just set");
            let inm = etag.as_ref().map(|e| format!("If-None-Match: {e}\r\n")).unwrap_or_default();
            let req = format!(
                "GET /v1/users/{user}/model?format={format} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n{inm}\r\n"
            );
            c.get_mut().write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
            let mut status = 0u16;
            let (mut len, mut tag, mut close) = (0usize, None, false);
            let mut line = String::new();
            loop {
                line.clear();
                let n = c.read_line(&mut line).await.map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err("connection closed mid-answer".into());
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if status == 0 {
                    status = l.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                } else if let Some((k, v)) = l.split_once(':') {
                    let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                    match k.as_str() {
                        "content-length" => len = v.parse().unwrap_or(0),
                        "etag" => tag = Some(v.to_string()),
                        "connection" => close = v.eq_ignore_ascii_case("close"),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0u8; len];
            c.read_exact(&mut body).await.map_err(|e| format!("body: {e}"))?;
            if close {
                conn = None;
            }
            Ok((status, tag))
        }
        .await;
        let secs = t0.elapsed().as_secs_f64();
        match result {
            Ok((200, tag)) => {
                f.full.push(secs);
                etag = tag;
            }
            Ok((304, _)) => f.not_modified.push(secs),
            Ok((other, _)) => f.errors.push(format!("status {other}")),
            Err(e) => {
                f.errors.push(e);
                conn = None;
            }
        }
    }
    f
}

/// What the store says of a set of users' batches `batch`.
#[derive(Default)]
struct Figures {
    published: usize,
    rejected: usize,
    deferred: usize,
    latency: Vec<f64>,
    overhead: Vec<f64>,
    /// Upload accepted → candidate committed, minus training (seconds).
    to_trained: Vec<f64>,
    /// Candidate committed → published, minus scoring (seconds).
    to_published: Vec<f64>,
    train: Vec<f64>,
    validate: Vec<f64>,
    last_publish_ms: u64,
    /// Process CPU seconds of these users' runs over the batch: training plus scoring.
    model_cpu: f64,
    /// `model_cpu`'s training part.
    train_cpu: f64,
    /// The runs `model_cpu` sums.
    model_runs: usize,
}

fn figures(
    db: &swimlane_store::Db,
    repo: &Repo,
    users: &[&str],
    batch: &str,
) -> anyhow::Result<Figures> {
    let mut f = Figures::default();
    for u in users {
        // The runs over this batch (not those of earlier rounds).
        let runs = db.transact(|tx| repo.runs(tx, u))?;
        for run in runs.iter().filter(|r| r.batches.iter().any(|b| b == batch)) {
            f.model_runs += 1;
            f.train_cpu += run.train_cpu_seconds as f64;
            f.model_cpu += run.train_cpu_seconds as f64
                + run
                    .verdict
                    .as_ref()
                    .map_or(0.0, |v| v.validate_cpu_seconds as f64);
        }
        let b = db
            .transact(|tx| repo.batch(tx, u, batch))?
            .context("batch record missing")?;
        match &b.status {
            BatchStatus::Published { run_id, version } => {
                f.published += 1;
                let (run, versions) =
                    db.transact(|tx| Ok((repo.run(tx, u, run_id)?, repo.model_versions(tx, u)?)))?;
                let run = run.context("run record missing")?;
                let v = versions
                    .iter()
                    .find(|v| v.version == *version)
                    .context("version record missing")?;
                let lat = v.published_at_ms.saturating_sub(b.staged_at_ms) as f64 / 1000.0;
                let t = run.train_seconds as f64;
                let val = run
                    .verdict
                    .as_ref()
                    .map(|v| v.validate_seconds as f64)
                    .unwrap_or(0.0);
                f.latency.push(lat);
                f.overhead.push(lat - t - val);
                let secs = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1000.0;
                f.to_trained
                    .push(secs(b.staged_at_ms, run.created_at_ms) - t);
                f.to_published
                    .push(secs(run.created_at_ms, v.published_at_ms) - val);
                f.train.push(t);
                f.validate.push(val);
                f.last_publish_ms = f.last_publish_ms.max(v.published_at_ms);
            }
            BatchStatus::Rejected { .. } => f.rejected += 1,
            _ => f.deferred += 1,
        }
    }
    Ok(f)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// The `q` quantile by the nearest-rank method (NaN for no values).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// The report as a table.
pub fn print_table(r: &PipelineBenchReport) {
    println!(
        "swimlane bench pipeline: bus {}, {} batches (up to {} corrections each, windows as {}) at once + {} one at a time, {} partitions, {} cores, trainer threads {}, seed {}",
        r.bus,
        r.users,
        r.corrections,
        r.frames,
        r.paced,
        r.partitions,
        r.cores,
        if r.trainer_threads == 0 {
            "one per core".to_string()
        } else {
            r.trainer_threads.to_string()
        },
        r.seed
    );
    if r.history > 0 {
        println!(
            "  each swimmer uploaded {} earlier batch(es) first; the figures are the last batch's",
            r.history
        );
    }
    println!(
        "{:>8} {:>9} {:>8} {:>8} {:>11} {:>15} {:>16} {:>16} {:>9} {:>9}",
        "trainers",
        "published",
        "not pub.",
        "seconds",
        "batches/min",
        "latency p50/99",
        "overhead p50/99",
        "paced ovh p50/99",
        "train avg",
        "valid avg"
    );
    for x in &r.runs {
        println!(
            "{:>8} {:>9} {:>8} {:>8.1} {:>11.1} {:>15} {:>16} {:>16} {:>9.3} {:>9.3}",
            x.trainers,
            x.published,
            x.rejected + x.deferred,
            x.seconds,
            x.batches_published_per_min,
            format!("{:.2}/{:.2}", x.latency_p50_s, x.latency_p99_s),
            format!("{:.3}/{:.3}", x.overhead_p50_s, x.overhead_p99_s),
            format!(
                "{:.3}/{:.3}",
                x.paced_overhead_p50_s, x.paced_overhead_p99_s
            ),
            x.train_seconds_mean,
            x.validate_seconds_mean
        );
    }
    // `worker figure, ...` with `decimals` digits.
    let by_worker = |m: &std::collections::BTreeMap<String, f64>, decimals: usize| {
        let parts: Vec<String> = m
            .iter()
            .map(|(w, v)| format!("{w} {v:.decimals$}"))
            .collect();
        parts.join(", ")
    };
    for x in &r.runs {
        println!(
            "{} trainer(s): peak resident MiB: {}; store {:.0} bytes per user",
            x.trainers,
            by_worker(&x.peak_rss_mib, 0),
            x.store_bytes_per_user
        );
        println!(
            "{} trainer(s): burst CPU seconds: {}; {:.1} ms per user; training and scoring {:.2} s (training {:.2} s), {:.0}% of the CPU outside them; the bench itself {:.2} s",
            x.trainers,
            by_worker(&x.burst_cpu_seconds, 2),
            x.cpu_ms_per_user,
            x.burst_model_cpu_seconds,
            x.burst_train_cpu_seconds,
            x.cpu_outside_model_share * 100.0,
            x.bench_cpu_seconds
        );
        println!(
            "{} trainer(s): CPU outside training and scoring, ms per user: {}",
            x.trainers,
            by_worker(&x.outside_ms_per_user, 2),
        );
    }
    for x in &r.runs {
        let ratio = x
            .over_peer
            .map(|q| format!(" ({q:.2}x the peer)"))
            .unwrap_or_default();
        println!(
            "{} trainer(s): {:.1} users retrained per core-minute (every burst batch settled in {:.1} s){ratio}",
            x.trainers, x.users_retrained_per_core_min, x.settled_seconds
        );
    }
    if let Some(p) = &r.peer {
        println!(
            "peer {}: {} users in {} s (the median of rounds of {} s) on {} cores: {} users retrained per core-minute ({} candidates kept)",
            p["peer"], p["users"], p["seconds"], p["rounds_seconds"], p["cpus"], p["users_per_core_min"], p["candidates_kept"]
        );
    }
    println!("seconds: first upload of the burst to its last publish; latency: upload accepted to published; overhead: latency minus the run's training and validation seconds (in the burst most of it is waiting behind other users' training); paced: batches uploaded one at a time.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    /// Trainers are summed and lose their training, the validator loses its scoring,
    /// ingest and the publisher keep all of theirs; per user, in ms.
    #[test]
    fn the_cpu_outside_splits_by_kind_of_worker() {
        let burst: std::collections::BTreeMap<String, f64> = [
            ("ingest", 0.6),
            ("publisher", 0.3),
            ("trainer-0", 1.5),
            ("trainer-1", 1.2),
            ("validator", 0.5),
        ]
        .into_iter()
        .map(|(w, s)| (w.to_string(), s))
        .collect();
        // Training 2.4 s over both trainers, scoring 0.4 s: 300 users.
        let out = outside_ms_per_user(&burst, 2.8, 2.4, 300);
        let want = [
            ("ingest", 2.0),
            ("publisher", 1.0),
            ("trainer", 1.0),
            ("validator", 0.333),
        ];
        assert_eq!(out.len(), want.len(), "{out:?}");
        for (kind, ms) in want {
            assert!((out[kind] - ms).abs() < 1e-9, "{kind}: {out:?}");
        }
        // A part read a hair below its model CPU is 0, not negative.
        let out = outside_ms_per_user(&burst, 0.6, 0.0, 300);
        assert_eq!(out["validator"], 0.0);
    }
}
