//! The trainer: for each `BatchStaged` event, fine-tune the user's candidate from the
//! user's current model on the user's own training samples, and hand it to the
//! validator.
//!
//! Invariants:
//! - Training data are one user's non-held-out samples only: batches already in a
//!   published model plus the newly staged ones, the most recent
//!   `retention.max_training_windows` of them (newest batches first). Held-out samples,
//!   rejected and retired batches are never trained on; no other user's key is read.
//! - At most one run per user is in flight (between training and verdict). A batch
//!   staged meanwhile stays `Staged`; the stage that ends the in-flight run re-emits a
//!   trigger, and every staged batch of the user is then trained as one run.
//! - Training happens outside any store transaction. The candidate's weights, the run
//!   record, the batches' new status, the `CandidateTrained` event and this consumer's
//!   position commit in one transaction. The run id is a function of the user, the
//!   batch ids and the user's count of committed runs (`UserState::runs_started`), and
//!   training is seeded by the user and the batch ids, so a re-run after a crash makes
//!   the same candidate under the same id; training the same batches again later (after
//!   a deferral, or with a rejected run-mate taken out) is a new run with its own
//!   records; and a duplicate trigger finds the batches no longer staged, or the count
//!   moved on, and does nothing.
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use swimlane_bus::stage::{Applied, Decoded, Effect, LoopOptions, Stage, Stop};
use swimlane_bus::Record;
use swimlane_core::familiar::{Familiarity, Foreign};
use swimlane_core::records::{BatchStatus, RunRecord, StagedSample};
use swimlane_core::{topics, Event, UserId};
use swimlane_model::{fine_tune, MicroModel, Sample, TrainConfig};
use swimlane_runtime::wiring::StageEnv;
use swimlane_runtime::RuntimeError;
use swimlane_state::{
    decode_sample_set, lifecycle, Kept, KeptBlob, BASE_MODEL_BLOB, GUARD_SET_BLOB,
};
use swimlane_store::{KvError, Transaction};

mod metrics;
pub use metrics::TrainerMetrics;

/// Most records (and so candidates) one delivery, and one commit, may carry: 8
/// models of at most 1 MiB stay well inside the store's 10 MB transaction limit.
pub const MAX_RUNS_PER_COMMIT: usize = 8;

/// What the trainer needs to know.
#[derive(Clone, Debug)]
pub struct TrainerConfig {
    pub train: TrainConfig,
    pub loop_options: LoopOptions,
    /// The deployment's model spec: a parent of another spec is never trained on.
    pub spec: Arc<swimlane_core::ModelSpec>,
    /// A run trains on at most this many of the user's most recent training windows
    /// (`retention.max_training_windows`).
    pub max_training_windows: usize,
    /// `trainer.familiar_scale`: the radius of a candidate's familiar windows
    /// (`swimlane_core::familiar`); 0: no fallback.
    pub familiar_scale: f32,
    /// `trainer.personal_weight`: the personal model's share of the device's answer on
    /// a familiar window.
    pub personal_weight: f32,
}

/// What the trainer works with.
pub type TrainerDeps = swimlane_runtime::wiring::StageDeps<TrainerMetrics>;

/// Run the stage on the calling thread until `stop()`; in-flight work is either
/// committed whole or abandoned (and redone by whoever owns the partition next).
pub fn run(config: TrainerConfig, deps: TrainerDeps, stop: Stop<'_>) -> Result<(), RuntimeError> {
    let mut config = config;
    // Every candidate of a delivery commits in one transaction (10 MB limit): cap the
    // delivery so that its candidates (at most 1 MiB each) fit with room.
    config.loop_options.max_records = config
        .loop_options
        .max_records
        .clamp(1, MAX_RUNS_PER_COMMIT);
    let (train, spec) = (config.train, config.spec);
    let max_training_windows = config.max_training_windows.max(1);
    let (familiar_scale, personal_weight) = (config.familiar_scale, config.personal_weight);
    deps.run(config.loop_options, stop, |env| Trainer {
        env,
        train,
        spec,
        max_training_windows,
        familiar_scale,
        personal_weight,
        population: Kept::default(),
        base: KeptBlob::default(),
        foreign: Default::default(),
    })?;
    Ok(())
}

/// The population's windows (the installed guard set, `GUARD_SET_BLOB`), with the
/// SHA-256 (hex) of the stored set: they place a candidate's foreign centroids
/// (`swimlane_core::familiar`).
type Population = (String, Arc<Vec<Sample>>);

struct Trainer {
    env: StageEnv<TrainerMetrics>,
    train: TrainConfig,
    spec: Arc<swimlane_core::ModelSpec>,
    max_training_windows: usize,
    familiar_scale: f32,
    personal_weight: f32,
    /// Read once per process, and again only when the stored set's digest changes.
    population: Kept<Vec<Sample>>,
    /// The installed base model's weights, the parent of every user without a version:
    /// read again only when the stored model's digest changes.
    base: KeptBlob,
    /// The population's foreign centroids (`swimlane_core::familiar::Foreign`), with the
    /// digest of the population they are of (`None`: no guard set).
    foreign: std::sync::Mutex<Option<(Option<String>, Arc<Foreign>)>>,
}

/// Everything one run needs, read in one short transaction.
struct Plan {
    user: UserId,
    run_id: String,
    batches: Vec<String>,
    parent_version: Option<u64>,
    parent: Arc<Vec<u8>>,
    samples: Vec<Sample>,
    /// [`anchor_scale`] of these samples.
    anchor_scale: f64,
}

/// How much of the pull towards the parent (`TrainConfig::anchor`) a run keeps: the
/// share of its training windows that are not confirmed ones. The pull stands in for
/// what a set of corrections does not show (what the parent already gets right, which
/// a fine-tune on corrections alone forgets); windows the user confirmed (upload
/// format 2) show exactly that, so they replace the pull. Corrections only, or uploads
/// without feedback: the whole pull, as before.
pub fn anchor_scale(confirmed: usize, total: usize) -> f64 {
    if total == 0 {
        1.0
    } else {
        1.0 - confirmed as f64 / total as f64
    }
}

struct Trained {
    plan: Plan,
    weights: Vec<u8>,
    seconds: f32,
    /// The process's CPU seconds over the same span.
    cpu_seconds: f32,
    /// Which windows the candidate knows (from `plan.samples`).
    familiarity: Option<Familiarity>,
}

/// Deterministic run id of a user's run over `batches` (sorted), as its
/// `attempt`-th run (`UserState::runs_started` when planned): a re-run after a crash
/// gets the same id, training the same batches again later a new one.
pub fn run_id(user: &str, batches: &[String], attempt: u64) -> String {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update(attempt.to_le_bytes());
    for b in batches {
        h.update([0u8]);
        h.update(b.as_bytes());
    }
    format!("r-{}", &hex::encode(h.finalize())[..20])
}

fn to_sample(s: StagedSample) -> Sample {
    Sample {
        frames: s.frames,
        label: s.label,
    }
}

/// The training seed of a run over `batches` (sorted): a function of what is trained
/// (the user and the batch ids), not of the attempt, so a run id's counter changes
/// names, never the arithmetic.
fn training_seed(user: &str, batches: &[String]) -> u64 {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    for b in batches {
        h.update([0u8]);
        h.update(b.as_bytes());
    }
    // The seed earlier releases derived from their run ids (`r-` and 20 hex digits of
    // this digest): the same batches train the same candidate as before.
    let id = format!("r-{}", &hex::encode(h.finalize())[..20]);
    let d = Sha256::digest(id.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

impl Trainer {
    /// Read what a run for `user` needs; `None` when there is nothing to train (run in
    /// flight, or no staged batch left).
    fn plan(&self, user: &UserId) -> Result<Option<Plan>, KvError> {
        let repo = &self.env.repo;
        let u = user.as_str();
        self.env.db.transact(|tx| {
            let state = repo.user_state(tx, u)?;
            if state.inflight_run.is_some() {
                return Ok(None);
            }
            let batches = repo.batches(tx, u)?;
            // New corrections trigger a run; deferred batches ride along with them.
            if !batches.iter().any(|(_, r)| r.status == BatchStatus::Staged) {
                return Ok(None);
            }
            let staged: Vec<String> = batches
                .iter()
                .filter(|(_, r)| r.status.is_pending())
                .map(|(id, _)| id.clone())
                .collect();
            // The user's most recent training windows, at most `max_training_windows`
            // (`RetentionPolicy`): the read stays bounded whatever the user's history.
            let read = repo.recent_samples(
                tx,
                u,
                &batches,
                |_, r| r.status.is_pending() || matches!(r.status, BatchStatus::Published { .. }),
                false,
                self.max_training_windows,
            )?;
            let confirmed = read
                .iter()
                .filter(|s| s.feedback.is_some_and(|f| !f.corrected))
                .count();
            let samples: Vec<Sample> = read.into_iter().map(to_sample).collect();
            let parent = match state.head {
                Some(v) => {
                    let mv = repo
                        .model_version(tx, u, v)?
                        .ok_or_else(|| KvError::Corrupt {
                            what: format!("user {u} head"),
                            reason: format!("version {v} has no record"),
                        })?;
                    repo.blob(tx, &mv.model_blob)?.map(Arc::new)
                }
                None => repo
                    .blob_kept(tx, BASE_MODEL_BLOB, &self.base, Ok)?
                    .map(|(_, bytes)| bytes),
            }
            .ok_or_else(|| KvError::Corrupt {
                what: format!("user {u} parent model"),
                reason: "weights missing (was the base model installed? `swimlane admin init`)"
                    .into(),
            })?;
            Ok(Some(Plan {
                user: user.clone(),
                run_id: run_id(u, &staged, state.runs_started),
                batches: staged,
                parent_version: state.head,
                parent,
                anchor_scale: anchor_scale(confirmed, samples.len()),
                samples,
            }))
        })
    }

    /// The population's windows, from the cache while the stored guard set's digest is
    /// the same; read in a transaction of its own (up to about 1 MB), so that a run's
    /// plan stays within its read budget. `None` when no guard set is installed.
    fn population(&self) -> Result<Option<Population>, KvError> {
        let repo = &self.env.repo;
        self.env.db.transact(|tx| {
            repo.blob_kept(tx, GUARD_SET_BLOB, &self.population, |bytes| {
                Ok(decode_sample_set(&bytes)?
                    .into_iter()
                    .map(to_sample)
                    .collect())
            })
        })
    }

    /// The population's foreign centroids under `(mean, std)`: the kept ones while the
    /// population and the normalisation are the same (a fine-tune keeps its parent's, so
    /// once per process and base model), computed again otherwise.
    fn foreign(
        &self,
        population: Option<&Population>,
        (mean, std): (&[f32], &[f32]),
    ) -> Arc<Foreign> {
        let sha = population.map(|p| p.0.as_str());
        let mut kept = self.foreign.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, f)) = kept
            .as_ref()
            .filter(|(s, f)| s.as_deref() == sha && f.fits(mean, std, self.familiar_scale))
        {
            return f.clone();
        }
        let windows: &[Sample] = population.map_or(&[], |p| &p.1);
        let f = Arc::new(Foreign::of(
            windows.iter().map(|s| (s.frames.as_slice(), s.label)),
            mean,
            std,
            self.familiar_scale,
        ));
        *kept = Some((sha.map(str::to_string), f.clone()));
        f
    }

    /// Train `plan`'s candidate; `population` (`None`: no guard set installed, or no
    /// fallback) places its foreign centroids.
    fn train(&self, plan: Plan, population: Option<&Population>) -> Result<Trained, String> {
        let t0 = Instant::now();
        let cpu0 = swimlane_runtime::process_cpu_seconds();
        let parent = MicroModel::load_for(&plan.parent, &self.spec)
            .map_err(|e| format!("parent model: {e}"))?;
        let mut cfg = self
            .train
            .clone()
            .with_seed(training_seed(plan.user.as_str(), &plan.batches));
        cfg.anchor *= plan.anchor_scale;
        let (model, _report) =
            fine_tune(&parent, &plan.samples, &cfg).map_err(|e| format!("training: {e}"))?;
        let seconds = t0.elapsed().as_secs_f32();
        let cpu_seconds = (swimlane_runtime::process_cpu_seconds() - cpu0) as f32;
        // Which windows the candidate knows: the device's file answers the others with
        // the base model (`swimlane_core::familiar`).
        let foreign = self.foreign(population, model.normalisation());
        let familiarity = Familiarity::with_foreign(
            plan.samples.iter().map(|s| (s.frames.as_slice(), s.label)),
            &foreign,
        )
        .map(|f| f.with_personal_weight(self.personal_weight));
        Ok(Trained {
            familiarity,
            weights: model.to_bytes(),
            plan,
            seconds,
            cpu_seconds,
        })
    }
}

/// What preparing a user's run made.
enum Prepared {
    Trained(Trained),
    /// Training failed in a way retrying repeats (bad parent bytes, no samples): the
    /// batches are rejected with the reason.
    Failed {
        user: UserId,
        batches: Vec<String>,
        reason: String,
    },
}

impl Stage for Trainer {
    /// A user with staged corrections.
    type Work = UserId;
    type Prepared = Prepared;
    /// Whether a run was committed.
    type Outcome = bool;

    fn decode(&self, r: &Record) -> Decoded<UserId> {
        Decoded::event(r, topics::BATCHES, |e| match e {
            Event::BatchStaged { user, .. } => Some(Decoded::Work(user)),
            _ => None,
        })
    }

    fn prepare(&mut self, user: &UserId) -> Result<Option<Prepared>, KvError> {
        let span = tracing::info_span!("train", user_id = %user);
        let _g = span.enter();
        let Some(plan) = self.plan(user)? else {
            tracing::debug!("nothing to train");
            return Ok(None);
        };
        // No fallback (`trainer.familiar_scale` 0): no population to read.
        let population = if self.familiar_scale > 0.0 {
            self.population()?
        } else {
            None
        };
        tracing::info!(run_id = %plan.run_id, batch_ids = ?plan.batches, samples = plan.samples.len(), "training");
        let batches = plan.batches.clone();
        Ok(Some(match self.train(plan, population.as_ref()) {
            Ok(t) => {
                self.env.metrics.train_seconds.observe(t.seconds as f64);
                let cpu = f64::from(t.cpu_seconds.max(0.0));
                self.env.metrics.train_cpu_seconds.inc_by(cpu);
                Prepared::Trained(t)
            }
            Err(reason) => {
                tracing::error!(%reason, "training failed");
                self.env.metrics.runs_failed.inc();
                Prepared::Failed {
                    user: user.clone(),
                    batches,
                    reason,
                }
            }
        }))
    }

    fn apply(&self, tx: &mut Transaction<'_>, p: &Prepared, now_ms: u64) -> Effect<bool> {
        let repo = &self.env.repo;
        let user = match p {
            Prepared::Failed { user, .. } => user,
            Prepared::Trained(t) => &t.plan.user,
        };
        // An erasure began: nothing more of this user is written.
        if swimlane_state::forget::is_forgotten(repo, tx, user.as_str())? {
            return Ok(Applied::Stale);
        }
        let t = match p {
            Prepared::Failed {
                user,
                batches,
                reason,
            } => {
                lifecycle::fail_training(repo, tx, user.as_str(), batches, reason)?;
                return Ok(Applied::Done(false));
            }
            Prepared::Trained(t) => t,
        };
        let u = t.plan.user.as_str();
        let state = repo.user_state(tx, u)?;
        let mut still_staged = true;
        for b in &t.plan.batches {
            if !repo.batch(tx, u, b)?.is_some_and(|r| r.status.is_pending()) {
                still_staged = false;
            }
        }
        if state.inflight_run.is_some()
            || !still_staged
            || state.head != t.plan.parent_version
            || run_id(u, &t.plan.batches, state.runs_started) != t.plan.run_id
        {
            return Ok(Applied::Stale); // someone else moved this user on
        }
        let blob_id = format!("cand-{}-{}", u, t.plan.run_id);
        let model_sha256 = repo.put_blob(tx, &blob_id, &t.weights)?;
        let run = RunRecord {
            v: 1,
            run_id: t.plan.run_id.clone(),
            parent_version: t.plan.parent_version,
            batches: t.plan.batches.clone(),
            train_samples: t.plan.samples.len() as u32,
            model_blob: blob_id,
            model_sha256,
            model_bytes: t.weights.len() as u64,
            created_at_ms: now_ms,
            train_seconds: t.seconds,
            train_cpu_seconds: t.cpu_seconds,
            verdict: None,
            published_version: None,
            familiarity: t.familiarity.clone(),
        };
        lifecycle::begin_run(
            repo,
            self.env.emitter.as_ref(),
            tx,
            &t.plan.user,
            &run,
            state,
        )?;
        Ok(Applied::Done(true))
    }

    fn committed(&mut self, runs: Vec<bool>) {
        let n = runs.into_iter().filter(|r| *r).count();
        self.env.metrics.runs_committed.inc_by(n as u64);
    }
}

impl TrainerConfig {
    /// The trainer's settings from the process config.
    pub fn from_config(
        config: &swimlane_runtime::Config,
    ) -> Result<Self, swimlane_runtime::config::ConfigError> {
        Ok(TrainerConfig {
            loop_options: swimlane_runtime::wiring::loop_options(&config.trainer.consumer),
            spec: Arc::new(config.model_spec()?),
            train: TrainConfig::fine_tune(),
            max_training_windows: config.retention.max_training_windows as usize,
            familiar_scale: config.trainer.familiar_scale,
            personal_weight: config.trainer.personal_weight,
        })
    }
}

/// Run a whole trainer process from its config: store, metrics and health server,
/// signal handling, then the stage until SIGTERM/SIGINT. What `swimlane-trainer` and
/// `swimlane worker trainer` run.
pub async fn run_process(config: swimlane_runtime::Config) -> Result<(), RuntimeError> {
    let cfg = TrainerConfig::from_config(&config)?;
    swimlane_runtime::wiring::run_stage_process(
        &config,
        swimlane_runtime::Worker::Trainer,
        &[BASE_MODEL_BLOB],
        TrainerMetrics::register,
        move |deps, stop| run(cfg, deps, stop),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::run_id;

    #[test]
    fn training_the_same_batches_again_is_a_new_run_and_a_rerun_is_the_same() {
        let b = vec!["night-1".to_string(), "night-2".to_string()];
        assert_eq!(
            run_id("u", &b, 3),
            run_id("u", &b, 3),
            "a re-run after a crash"
        );
        assert_ne!(
            run_id("u", &b, 3),
            run_id("u", &b, 4),
            "the same batches trained again (after a deferral or a rejected run-mate)"
        );
        assert_ne!(run_id("u", &b, 3), run_id("v", &b, 3));
        assert_ne!(run_id("u", &b, 3), run_id("u", &b[..1], 3));
    }
}
