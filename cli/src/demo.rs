//! `swimlane demo`: the whole fleet in this process on a fresh embedded store, driven
//! by simulated swimmers through the real HTTP APIs.
//!
//! Each night every swimmer's phone runs its current model (the published one, or the
//! base model while it has none) on a fresh swim, the swimmer corrects the mistakes,
//! and the phone uploads the corrections. Some uploads are poisoned: the night's
//! windows with their labels shuffled, as a broken or hostile client would send.
//! After every night the demo waits until each upload has settled (published,
//! rejected, or deferred for more evidence). At the end every swimmer's final model is
//! scored on fresh windows of that swimmer that the pipeline never saw.
use std::io::Write;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use swimlane_core::keys::Keys;
use swimlane_core::UserId;
use swimlane_model::experiment::unseen_swimmer;
use swimlane_model::synth::{corrections_from, derive_seed, poison};
use swimlane_model::{evaluate, MicroModel};
use swimlane_runtime::Config;
use swimlane_state::tokens::new_token;
use swimlane_state::{Repo, BASE_MODEL_BLOB};

use crate::fleet::LocalFleet;

/// Knobs of the demo: `swimlane demo`'s flags, whose defaults are [`Default`]'s too.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoOptions {
    /// Simulated swimmers.
    #[arg(long, default_value_t = 20)]
    pub users: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Nights of uploads.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Share of (swimmer, night) uploads that are poisoned (labels shuffled).
    #[arg(long, default_value_t = 0.15)]
    pub poison_rate: f64,
    /// Trainer threads.
    #[arg(long, default_value_t = 2)]
    pub trainers: usize,
    /// Windows the phone classifies per night, and the most the swimmer corrects.
    #[arg(skip = 300usize)]
    pub observed: usize,
    #[arg(skip = 200usize)]
    pub max_corrections: usize,
    /// Fresh windows per swimmer the final score is measured on.
    #[arg(skip = 300usize)]
    pub test_windows: usize,
    #[arg(skip = true)]
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        crate::defaults_of_args()
    }
}

/// One swimmer's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct UserReport {
    pub user: String,
    pub base_accuracy: f64,
    /// The final personal model (the safetensors file) on the fresh windows.
    pub final_accuracy: f64,
    /// The device's file (ONNX, with its fallback to the base model for windows unlike
    /// every style the version trained on) on the same windows: what the phone gets.
    pub device_accuracy: f64,
    pub published_versions: usize,
    pub rejected_candidates: usize,
    pub uploads: usize,
    pub poisoned_uploads: usize,
    pub deferred_batches: usize,
}

/// What `--json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub users: Vec<UserReport>,
    pub poisoned_batches: usize,
    pub poisoned_batches_published: usize,
    pub batches: usize,
    pub median_base_accuracy: f64,
    pub median_final_accuracy: f64,
    pub median_device_accuracy: f64,
    pub base_model_seconds: f64,
    pub pipeline_seconds: f64,
    pub seconds: f64,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) use crate::client::{settled, Device};

/// Run the demo end to end; the fleet is stopped before this returns.
pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoReport> {
    let t_start = Instant::now();
    let dir = tempfile::tempdir()?;
    let mut config = LocalFleet::loopback(Config::default());
    config.deployment = "demo".into();
    config.store = dir.path().join("store").display().to_string();
    config.validate()?;
    let db = swimlane_runtime::open_store(&config)?;

    say(&opts, "training the base model on a synthetic population…");
    let t_base = Instant::now();
    crate::init::install(&db, &config.deployment, opts.seed, None)?;
    let base_model_seconds = t_base.elapsed().as_secs_f64();
    let repo = Repo::new(Keys::new(&config.deployment));
    let base = MicroModel::from_bytes(
        &db.transact(|tx| repo.blob(tx, BASE_MODEL_BLOB))?
            .expect("installed"),
    )?;

    // The fleet: ingest and publisher APIs, trainers and a validator.
    let fleet = LocalFleet::start(&config, &db, opts.trainers).await?;
    let (ingest_url, publisher_url) = (fleet.ingest_url.clone(), fleet.publisher_url.clone());

    let o = opts.clone();
    let (db2, repo2) = (db.clone(), repo.clone());
    let t_pipe = Instant::now();
    let drive = tokio::task::spawn_blocking(move || {
        drive(&o, &db2, &repo2, &base, &ingest_url, &publisher_url)
    })
    .await;

    let stopped = fleet.stop().await;
    let (users, poisoned_batches, poisoned_batches_published, batches) = drive??;
    stopped?;
    let pipeline_seconds = t_pipe.elapsed().as_secs_f64();
    Ok(DemoReport {
        median_base_accuracy: median(users.iter().map(|u| u.base_accuracy).collect()),
        median_final_accuracy: median(users.iter().map(|u| u.final_accuracy).collect()),
        median_device_accuracy: median(users.iter().map(|u| u.device_accuracy).collect()),
        users,
        poisoned_batches,
        poisoned_batches_published,
        batches,
        base_model_seconds,
        pipeline_seconds,
        seconds: t_start.elapsed().as_secs_f64(),
    })
}

fn say(opts: &DemoOptions, msg: &str) {
    if opts.progress {
        eprintln!("{msg}");
    }
}

fn progress(opts: &DemoOptions, night: usize, done: usize, total: usize, t0: Instant) {
    if !opts.progress {
        return;
    }
    let width = 30;
    let filled = if total == 0 {
        width
    } else {
        done * width / total
    };
    eprint!(
        "\rnight {}/{} [{}{}] {}/{} uploads settled  {:>5.1}s",
        night + 1,
        opts.rounds,
        "#".repeat(filled),
        ".".repeat(width - filled),
        done,
        total,
        t0.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().flush();
}

type Driven = (Vec<UserReport>, usize, usize, usize);

fn drive(
    opts: &DemoOptions,
    db: &swimlane_store::Db,
    repo: &Repo,
    base: &MicroModel,
    ingest: &str,
    publisher: &str,
) -> anyhow::Result<Driven> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let mut devices = Vec::new();
    let mut swimmers = Vec::new();
    let mut tests = Vec::new();
    let now = 0;
    for i in 0..opts.users {
        let user = format!("swimmer-{i:02}");
        let token = new_token();
        let uid = UserId::new(user.clone())?;
        db.transact(|tx| repo.put_token(tx, &uid, &token, now))?;
        devices.push(Device {
            user,
            token,
            ingest: ingest.into(),
            publisher: publisher.into(),
            agent: agent.clone(),
        });
        let swimmer = unseen_swimmer(opts.seed, i);
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(opts.seed, 0x7465_7374, i as u64));
        tests.push(swimmer.windows(opts.test_windows, &mut rng));
        swimmers.push(swimmer);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(opts.seed, 0x6e69_6768, 0));
    let mut uploads = vec![0usize; opts.users];
    let mut poisoned: Vec<Vec<String>> = vec![Vec::new(); opts.users];
    let mut batches = 0;
    let t0 = Instant::now();
    for night in 0..opts.rounds {
        let mut pending = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let model = d.current_model()?.unwrap_or_else(|| base.clone());
            let observed = swimmers[i].windows(opts.observed, &mut rng);
            let poison_it = rng.random_bool(opts.poison_rate);
            let id = format!("night-{night}");
            // An honest upload is the night's corrections; a poisoned one is what a
            // broken or hostile client sends: the night's windows with their labels
            // shuffled.
            let batch = if poison_it {
                let n = observed.len().min(opts.max_corrections);
                poisoned[i].push(id.clone());
                poison(&observed[..n], &mut rng)
            } else {
                corrections_from(&model, &observed, opts.max_corrections)?
            };
            if batch.is_empty() {
                continue;
            }
            d.post_batch(crate::upload::upload_json(&id, &batch))?;
            uploads[i] += 1;
            batches += 1;
            pending.push((i, id));
        }
        let total = pending.len();
        progress(opts, night, 0, total, t0);
        let deadline = Instant::now() + Duration::from_secs(600);
        while !pending.is_empty() {
            let mut still = Vec::new();
            for (i, id) in pending {
                let st = devices[i].status(&id)?;
                if !settled(st["status"].as_str().unwrap_or("")) {
                    still.push((i, id));
                }
            }
            pending = still;
            progress(opts, night, total - pending.len(), total, t0);
            if !pending.is_empty() {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "uploads did not settle within 10 minutes: {pending:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if opts.progress {
            eprintln!();
        }
    }
    let mut users = Vec::new();
    let (mut poisoned_total, mut poisoned_published) = (0, 0);
    for (i, d) in devices.iter().enumerate() {
        let final_model = d.current_model()?.unwrap_or_else(|| base.clone());
        let base_eval = evaluate(base, &tests[i])?;
        let device_accuracy = match d.current_onnx_versioned()? {
            Some((file, _)) => file.evaluate(&tests[i])?.accuracy,
            None => base_eval.accuracy,
        };
        let mut rejected_runs = std::collections::BTreeSet::new();
        let mut deferred = 0;
        for night in 0..opts.rounds {
            let id = format!("night-{night}");
            let Ok(st) = d.status(&id) else { continue };
            match st["status"].as_str() {
                Some("rejected") => {
                    rejected_runs.insert(st["run_id"].as_str().unwrap_or(&id).to_string());
                }
                Some("deferred") => deferred += 1,
                Some("published") if poisoned[i].contains(&id) => poisoned_published += 1,
                _ => {}
            }
        }
        poisoned_total += poisoned[i].len();
        users.push(UserReport {
            user: d.user.clone(),
            base_accuracy: base_eval.accuracy,
            final_accuracy: evaluate(&final_model, &tests[i])?.accuracy,
            device_accuracy,
            published_versions: d.versions()?,
            rejected_candidates: rejected_runs.len(),
            uploads: uploads[i],
            poisoned_uploads: poisoned[i].len(),
            deferred_batches: deferred,
        });
    }
    Ok((users, poisoned_total, poisoned_published, batches))
}

/// Print the report as a table.
pub fn print_table(r: &DemoReport) {
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "swimmer",
        "base",
        "final",
        "device",
        "versions",
        "rejected",
        "uploads",
        "poisoned",
        "deferred"
    );
    for u in &r.users {
        println!(
            "{:<12} {:>8.3} {:>8.3} {:>8.3} {:>9} {:>9} {:>8} {:>9} {:>9}",
            u.user,
            u.base_accuracy,
            u.final_accuracy,
            u.device_accuracy,
            u.published_versions,
            u.rejected_candidates,
            u.uploads,
            u.poisoned_uploads,
            u.deferred_batches
        );
    }
    println!(
        "\nmedian accuracy: base {:.3} -> final {:.3} (the device's file {:.3}); {} uploads, {} poisoned, {} poisoned published; base model {:.1}s, pipeline {:.1}s, total {:.1}s",
        r.median_base_accuracy,
        r.median_final_accuracy,
        r.median_device_accuracy,
        r.batches,
        r.poisoned_batches,
        r.poisoned_batches_published,
        r.base_model_seconds,
        r.pipeline_seconds,
        r.seconds
    );
}
