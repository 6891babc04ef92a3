//! The validator: for each `CandidateTrained` event, score the candidate and the
//! user's current model on the same held-out windows, and on the population guard set;
//! accept only a real gain without collapse (`swimlane_core::policy`).
//!
//! Invariants:
//! - The held-out windows are the user's own samples marked held-out when staged
//!   (never trained on), from the run's own batches (all of them) and from batches
//!   already in a published model (the most recent `retention.max_heldout_windows`).
//!   Rejected and retired batches' samples are not used.
//! - A run gets exactly one verdict: the verdict, the batches' new status, the event
//!   (`CandidateAccepted` or `CandidateRejected`) and the position commit together; a
//!   duplicate event finds the verdict and does nothing.
//! - A rejection ends the user's in-flight run; if batches were staged meanwhile, the
//!   same transaction re-emits a trigger so they are trained next.
//! - The guard set is scored once per run, on the candidate: the current model's guard
//!   accuracy is the one measured when it was itself a candidate (its version record's
//!   `guard_accuracy`; for the base model, measured once when the guard set is read).
//!   The guard set is installed with the deployment (`swimlane admin init` never
//!   replaces one), so the recorded figure is for the same windows; replacing the guard
//!   set under a running deployment is not supported (the validator also reads it once).
use std::sync::Arc;
use std::time::Instant;

use swimlane_bus::stage::{Applied, Decoded, Effect, LoopOptions, Stage, Stop};
use swimlane_bus::Record;
use swimlane_core::policy::{Decision, Scores, ValidationPolicy};
use swimlane_core::records::{BatchRecord, BatchStatus, StagedSample, Verdict};
use swimlane_core::{topics, Event, UserId};
use swimlane_model::net::argmax_class;
use swimlane_model::{evaluate, MicroModel, Sample};
use swimlane_runtime::wiring::StageEnv;
use swimlane_runtime::RuntimeError;
use swimlane_state::{decode_sample_set, lifecycle, Repo, BASE_MODEL_BLOB, GUARD_SET_BLOB};
use swimlane_store::{KvError, Transaction};

mod metrics;
pub use metrics::ValidatorMetrics;

/// What the validator works with.
pub type ValidatorDeps = swimlane_runtime::wiring::StageDeps<ValidatorMetrics>;

#[derive(Clone, Debug)]
pub struct ValidatorConfig {
    pub policy: ValidationPolicy,
    pub loop_options: LoopOptions,
    /// The deployment's model spec: a model of another spec is never scored.
    pub spec: Arc<swimlane_core::ModelSpec>,
    /// Most held-out windows of published batches (the user's most recent) checked for
    /// forgetting (`retention.max_heldout_windows`); a run's own are always all used.
    pub max_heldout_windows: usize,
}

/// Run the stage on the calling thread until `stop()`.
pub fn run(
    config: ValidatorConfig,
    deps: ValidatorDeps,
    stop: Stop<'_>,
) -> Result<(), RuntimeError> {
    let ValidatorConfig {
        policy,
        loop_options,
        spec,
        max_heldout_windows,
    } = config;
    let guard = None;
    deps.run(loop_options, stop, |env| Validator {
        env,
        policy,
        spec,
        guard,
        max_heldout_windows,
    })?;
    Ok(())
}

struct Validator {
    env: StageEnv<ValidatorMetrics>,
    policy: ValidationPolicy,
    spec: Arc<swimlane_core::ModelSpec>,
    /// The guard set and the base model's accuracy on it, read once (they only change
    /// with a redeploy).
    guard: Option<Arc<Guard>>,
    max_heldout_windows: usize,
}

/// The population guard set and how the deployment's base model does on it.
struct Guard {
    samples: Vec<Sample>,
    base_accuracy: f32,
}

struct Inputs {
    candidate: Vec<u8>,
    current: Vec<u8>,
    /// The current model's guard accuracy when it was validated (`None`: the base
    /// model).
    current_guard: Option<f32>,
    /// Held-out windows: the first `history` are established (from published batches),
    /// the rest are the run's own.
    heldout: Vec<Sample>,
    history: usize,
    /// The batch of each of the run's own held-out windows (`heldout[history..]`).
    fresh_batches: Vec<String>,
}

fn to_sample(s: StagedSample) -> Sample {
    Sample {
        frames: s.frames,
        label: s.label,
    }
}

fn missing(what: String, reason: &str) -> KvError {
    KvError::Corrupt {
        what,
        reason: reason.into(),
    }
}

/// Outcome for one event: a verdict to record, or a reason to dead-letter.
enum Outcome {
    Verdict {
        decision: Decision,
        /// Batches that failed on their own (the rest of the run is retrained).
        failed: Vec<(String, String)>,
        user: UserId,
        run_id: String,
        verdict: Verdict,
    },
    Skip,
    Dead(String),
}

impl Validator {
    fn guard(&mut self) -> Result<Arc<Guard>, KvError> {
        if let Some(g) = &self.guard {
            return Ok(g.clone());
        }
        let installed = |blob: &str, what: &str| -> Result<Vec<u8>, KvError> {
            self.env
                .repo
                .blob_db(&self.env.db, blob)?
                .ok_or_else(|| missing(what.into(), "not installed (run `swimlane admin init`)"))
        };
        let samples: Vec<Sample> = decode_sample_set(&installed(GUARD_SET_BLOB, "guard set")?)?
            .into_iter()
            .map(to_sample)
            .collect();
        let base_accuracy =
            MicroModel::load_for(&installed(BASE_MODEL_BLOB, "base model")?, &self.spec)
                .and_then(|base| evaluate(&base, &samples))
                .map_err(|e| missing("base model".into(), &format!("cannot be scored: {e}")))?
                .accuracy as f32;
        let g = Arc::new(Guard {
            samples,
            base_accuracy,
        });
        self.guard = Some(g.clone());
        Ok(g)
    }

    fn inputs(&self, user: &str, run_id: &str) -> Result<Option<Inputs>, KvError> {
        let repo = &self.env.repo;
        self.env.db.transact(|tx| {
            let Some(run) = repo.run(tx, user, run_id)? else {
                return Ok(None);
            };
            if run.verdict.is_some() {
                return Ok(None);
            }
            let state = repo.user_state(tx, user)?;
            if state.inflight_run.as_deref() != Some(run_id) {
                return Ok(None);
            }
            let candidate = repo.blob(tx, &run.model_blob)?.ok_or_else(|| {
                missing(
                    format!("run {run_id} of {user}"),
                    "candidate weights missing",
                )
            })?;
            let (current, current_guard) = current_model(repo, tx, user, state.head)?;
            // Established windows first, then the run's own: `history` is a prefix. The
            // run's own windows are all read (every batch proves itself on them); the
            // established ones are the most recent `max_heldout_windows` (newest
            // published batches first), so the read stays bounded.
            let (mut heldout, mut fresh, mut fresh_batches) = (Vec::new(), Vec::new(), Vec::new());
            let batches = repo.batches(tx, user)?;
            for (id, r) in &batches {
                if run.batches.contains(id) {
                    let held = repo.samples_of(tx, user, id, r, true, usize::MAX)?;
                    fresh_batches.extend(std::iter::repeat_n(id.clone(), held.len()));
                    fresh.extend(held.into_iter().map(to_sample));
                }
            }
            let established = |id: &str, r: &BatchRecord| {
                !run.batches.iter().any(|b| b == id)
                    && matches!(r.status, BatchStatus::Published { .. })
            };
            heldout.extend(
                repo.recent_samples(
                    tx,
                    user,
                    &batches,
                    established,
                    true,
                    self.max_heldout_windows,
                )?
                .into_iter()
                .map(to_sample),
            );
            let history = heldout.len();
            heldout.extend(fresh);
            Ok(Some(Inputs {
                candidate,
                current,
                current_guard,
                heldout,
                history,
                fresh_batches,
            }))
        })
    }

    fn score(&mut self, user: &UserId, run_id: &str) -> Result<Outcome, KvError> {
        let Some(inp) = self.inputs(user.as_str(), run_id)? else {
            return Ok(Outcome::Skip);
        };
        let guard = self.guard()?;
        let t0 = Instant::now();
        let cand = match MicroModel::load_for(&inp.candidate, &self.spec) {
            Ok(m) => m,
            Err(e) => return Ok(Outcome::Dead(format!("candidate does not load: {e}"))),
        };
        let cur = match MicroModel::load_for(&inp.current, &self.spec) {
            Ok(m) => m,
            Err(e) => return Ok(Outcome::Dead(format!("current model does not load: {e}"))),
        };
        // (improved, regressed, windows, current wrong) per batch of the run, on its own
        // held-out windows.
        let mut per_batch: std::collections::BTreeMap<String, (u32, u32, u32, u32)> =
            Default::default();
        let scored = (|| -> Result<Scores, swimlane_model::ModelError> {
            let truth: Vec<_> = inp.heldout.iter().map(|s| s.label).collect();
            let probs_c = cand.predict_proba_samples(&inp.heldout)?;
            let probs_u = cur.predict_proba_samples(&inp.heldout)?;
            let pc: Vec<_> = probs_c.iter().map(|p| argmax_class(p)).collect();
            let pu: Vec<_> = probs_u.iter().map(|p| argmax_class(p)).collect();
            let gains: Vec<f64> = truth
                .iter()
                .zip(probs_c.iter().zip(&probs_u))
                .map(|(t, (c, u))| {
                    let p = |v: &Vec<f32>| (v[t.index()] as f64).max(1e-6).ln();
                    p(c) - p(u)
                })
                .collect();
            let (gain_mean, gain_sd) = mean_sd(&gains);
            for (k, b) in inp.fresh_batches.iter().enumerate() {
                let i = inp.history + k;
                let (c, u) = (pc[i] == truth[i], pu[i] == truth[i]);
                let e = per_batch.entry(b.clone()).or_default();
                e.0 += (c && !u) as u32;
                e.1 += (u && !c) as u32;
                e.2 += 1;
                e.3 += !u as u32;
            }
            let (mut improved, mut regressed) = (0u32, 0u32);
            let (mut c_all, mut u_all, mut c_hist, mut u_hist) = (0u32, 0u32, 0u32, 0u32);
            for (i, t) in truth.iter().enumerate() {
                let (c, u) = (pc[i] == *t, pu[i] == *t);
                improved += (c && !u) as u32;
                regressed += (u && !c) as u32;
                c_all += c as u32;
                u_all += u as u32;
                if i < inp.history {
                    c_hist += c as u32;
                    u_hist += u as u32;
                }
            }
            let frac = |k: u32, n: usize| if n == 0 { 0.0 } else { k as f32 / n as f32 };
            let n = truth.len();
            Ok(Scores {
                loglik_gain_mean: gain_mean as f32,
                loglik_gain_sd: gain_sd as f32,
                candidate_heldout: frac(c_all, n),
                current_heldout: frac(u_all, n),
                heldout_samples: n as u32,
                improved,
                regressed,
                candidate_history: frac(c_hist, inp.history),
                current_history: frac(u_hist, inp.history),
                history_samples: inp.history as u32,
                candidate_guard: evaluate(&cand, &guard.samples)?.accuracy as f32,
                current_guard: inp.current_guard.unwrap_or(guard.base_accuracy),
                base_guard: guard.base_accuracy,
            })
        })();
        let s = match scored {
            Ok(s) => s,
            Err(e) => return Ok(Outcome::Dead(format!("scoring failed: {e}"))),
        };
        let validate_seconds = t0.elapsed().as_secs_f64();
        self.env.metrics.validate_seconds.observe(validate_seconds);
        let (mut decision, mut reason) = self.policy.decide(&s);
        // Each batch large enough to judge on its own held-out windows must show a
        // significant gain there, or it is rejected alone (and its run-mates, if any,
        // go back to staged and are retrained without it).
        let mut failed = Vec::new();
        for (b, (i, r, n, wrong)) in &per_batch {
            if let Err(why) = self.policy.judge_batch(*i, *r, *n, *wrong) {
                failed.push((b.clone(), why));
            }
        }
        if !failed.is_empty() {
            decision = Decision::Reject;
            reason = failed
                .iter()
                .map(|(b, why)| format!("batch {b}: {why}"))
                .collect::<Vec<_>>()
                .join("; ");
        }
        tracing::info!(run_id, ?decision, %reason, "verdict");
        Ok(Outcome::Verdict {
            user: user.clone(),
            run_id: run_id.to_string(),
            decision,
            failed,
            verdict: Verdict {
                accepted: decision == Decision::Accept,
                reason,
                candidate_heldout_accuracy: s.candidate_heldout,
                current_heldout_accuracy: s.current_heldout,
                heldout_samples: s.heldout_samples,
                candidate_guard_accuracy: s.candidate_guard,
                current_guard_accuracy: s.current_guard,
                validate_seconds: validate_seconds as f32,
            },
        })
    }
}

/// The weights of the model a user's devices run now (the head version's, else the base), and
/// its guard accuracy when it was validated (`None` for the base).
pub fn current_model(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    user: &str,
    head: Option<u64>,
) -> Result<(Vec<u8>, Option<f32>), KvError> {
    let (bytes, guard) = match head {
        Some(v) => {
            let mv = repo.model_version(tx, user, v)?.ok_or_else(|| {
                missing(format!("user {user} head"), "head version has no record")
            })?;
            (repo.blob(tx, &mv.model_blob)?, Some(mv.guard_accuracy))
        }
        None => (repo.blob(tx, BASE_MODEL_BLOB)?, None),
    };
    let bytes =
        bytes.ok_or_else(|| missing(format!("user {user} current model"), "weights missing"))?;
    Ok((bytes, guard))
}

impl Stage for Validator {
    /// A user's run with a candidate to judge.
    type Work = (UserId, String);
    type Prepared = Outcome;
    type Outcome = Decision;

    fn decode(&self, r: &Record) -> Decoded<(UserId, String)> {
        Decoded::event(r, topics::CANDIDATES, |e| match e {
            Event::CandidateTrained { user, run_id, .. } => Some(Decoded::Work((user, run_id))),
            _ => None,
        })
    }

    fn prepare(&mut self, (user, run_id): &(UserId, String)) -> Result<Option<Outcome>, KvError> {
        let span = tracing::info_span!("validate", user_id = %user, run_id = %run_id);
        let _g = span.enter();
        match self.score(user, run_id)? {
            Outcome::Skip => Ok(None),
            out => Ok(Some(out)),
        }
    }

    fn apply(&self, tx: &mut Transaction<'_>, out: &Outcome, _now_ms: u64) -> Effect<Decision> {
        let Outcome::Verdict {
            user,
            run_id,
            decision,
            failed,
            verdict,
        } = out
        else {
            return Ok(match out {
                Outcome::Dead(reason) => Applied::Dead(reason.clone()),
                _ => Applied::Stale,
            });
        };
        let done = lifecycle::record_verdict(
            &self.env.repo,
            self.env.emitter.as_ref(),
            tx,
            user,
            run_id,
            *decision,
            failed,
            verdict,
        )?;
        Ok(done.map_or(Applied::Stale, Applied::Done))
    }

    fn committed(&mut self, decisions: Vec<Decision>) {
        for d in decisions {
            let label = match d {
                Decision::Accept => "accepted",
                Decision::Reject => "rejected",
                Decision::Defer => "deferred",
            };
            self.env.metrics.verdicts.with_label_values(&[label]).inc();
        }
    }

    /// A run whose candidate cannot be judged ends, so its user trains again.
    fn abandon(
        &self,
        tx: &mut Transaction<'_>,
        (user, run_id): &(UserId, String),
    ) -> Result<(), KvError> {
        lifecycle::abandon_run(&self.env.repo, self.env.emitter.as_ref(), tx, user, run_id)
    }
}

impl ValidatorConfig {
    /// The validator's settings from the process config.
    pub fn from_config(
        config: &swimlane_runtime::Config,
    ) -> Result<Self, swimlane_runtime::config::ConfigError> {
        Ok(ValidatorConfig {
            policy: config.validator.policy.clone(),
            loop_options: swimlane_runtime::wiring::loop_options(&config.validator.consumer),
            spec: Arc::new(config.model_spec()?),
            max_heldout_windows: config.retention.max_heldout_windows as usize,
        })
    }
}

/// Run a whole validator process from its config: store, metrics and health server,
/// signal handling, then the stage until SIGTERM/SIGINT. What `swimlane-validator` and
/// `swimlane worker validator` run.
pub async fn run_process(config: swimlane_runtime::Config) -> Result<(), RuntimeError> {
    let cfg = ValidatorConfig::from_config(&config)?;
    swimlane_runtime::wiring::run_stage_process(
        &config,
        swimlane_runtime::Worker::Validator,
        &[BASE_MODEL_BLOB, GUARD_SET_BLOB],
        ValidatorMetrics::register,
        move |deps, stop| run(cfg, deps, stop),
    )
    .await
}

/// Mean and (sample) standard deviation; (0, 0) for fewer than two values.
fn mean_sd(v: &[f64]) -> (f64, f64) {
    if v.len() < 2 {
        return (v.first().copied().unwrap_or(0.0), 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}
