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
//! - **Probation** (`policy::ProbationPolicy`): while the user's head version is on
//!   probation, the run's own batches (both splits: windows that neither the head nor
//!   its parent trained on; only format-2 windows, which the device reports whether
//!   confirmed or corrected, as an upload of corrections alone is a sample biased
//!   against the model that made them) also score the head against its parent, and the same
//!   transaction adds that to the version's evidence
//!   (`swimlane_state::lifecycle::probation`). Significantly worse: the head goes back
//!   to the parent and the run, judged against a version that is gone, is void (a
//!   non-accepting verdict that says so), so its batches train again from the parent. Significantly better, or
//!   `promote_windows` fresh windows without harm: promoted. Each batch counts once.
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
use swimlane_core::policy::{Decision, ProbationPolicy, Scores, ValidationPolicy};
use swimlane_core::records::{
    BatchRecord, BatchStatus, PairedEvidence, StagedSample, Standing, Verdict,
};
use swimlane_core::{topics, Event, UserId};
use swimlane_model::net::argmax_class;
use swimlane_model::{evaluate, MicroModel, Sample};
use swimlane_runtime::wiring::StageEnv;
use swimlane_runtime::RuntimeError;
use swimlane_state::lifecycle::ProbationEnd;
use swimlane_state::{
    decode_sample_set, lifecycle, KeptBlob, Repo, BASE_MODEL_BLOB, GUARD_SET_BLOB,
};
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
    /// How a newly published version is watched (`[probation]`).
    pub probation: ProbationPolicy,
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
        probation,
    } = config;
    let guard = None;
    deps.run(loop_options, stop, |env| Validator {
        env,
        policy,
        spec,
        guard,
        max_heldout_windows,
        probation,
        base: KeptBlob::default(),
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
    probation: ProbationPolicy,
    /// The installed base model's weights, the current model of every user without a
    /// version: read again only when the stored model's digest changes.
    base: KeptBlob,
}

/// The population guard set and how the deployment's base model does on it.
struct Guard {
    samples: Vec<Sample>,
    base_accuracy: f32,
}

struct Inputs {
    candidate: Vec<u8>,
    current: Arc<Vec<u8>>,
    /// The current model's guard accuracy when it was validated (`None`: the base
    /// model).
    current_guard: Option<f32>,
    /// Held-out windows: the first `history` are established (from published batches),
    /// the rest are the run's own.
    heldout: Vec<Sample>,
    history: usize,
    /// The batch of each of the run's own held-out windows (`heldout[history..]`).
    fresh_batches: Vec<String>,
    /// The head is on probation: what comparing it with its parent needs.
    probation: Option<ProbationInputs>,
}

/// The head version on probation, its parent's weights, and the run's windows that
/// neither trained on (from batches its evidence does not count yet).
struct ProbationInputs {
    version: u64,
    parent: Arc<Vec<u8>>,
    windows: Vec<Sample>,
    batches: Vec<String>,
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
        /// The head version on probation and its comparison with its parent on this
        /// run's windows.
        probation: Option<(u64, PairedEvidence)>,
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
            let (current, current_guard) = current_model(repo, tx, user, state.head, &self.base)?;
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
            let probation = match state.head {
                Some(v) => self.probation_inputs(tx, user, v, &run.batches, &batches)?,
                None => None,
            };
            Ok(Some(Inputs {
                probation,
                candidate,
                current,
                current_guard,
                heldout,
                history,
                fresh_batches,
            }))
        })
    }

    /// What comparing the head `version` with its parent needs, if it is on probation
    /// and the run has batches its evidence does not count yet: their windows (held-out
    /// ones all, training ones up to `promote_windows`), which neither model trained on.
    fn probation_inputs(
        &self,
        tx: &mut Transaction<'_>,
        user: &str,
        version: u64,
        run_batches: &[String],
        batches: &[(String, BatchRecord)],
    ) -> Result<Option<ProbationInputs>, KvError> {
        let repo = &self.env.repo;
        let Some(rec) = repo.model_version(tx, user, version)? else {
            return Ok(None);
        };
        if rec.standing != Standing::Probation {
            return Ok(None);
        }
        let (mut windows, mut counted) = (Vec::new(), Vec::new());
        let mut training_budget = self.probation.promote_windows as usize;
        for (id, r) in batches {
            if !run_batches.contains(id) || rec.probation.batches.contains(id) {
                continue;
            }
            let held = repo.samples_of(tx, user, id, r, true, usize::MAX)?;
            let train = repo.samples_of(tx, user, id, r, false, training_budget)?;
            training_budget = training_budget.saturating_sub(train.len());
            // Only windows the device reported whatever the outcome (format 2, each
            // confirmed or corrected): an upload of corrections alone holds exactly
            // the windows the device's model got wrong, a sample biased against it.
            windows.extend(
                held.into_iter()
                    .chain(train)
                    .filter(|s| s.feedback.is_some())
                    .map(to_sample),
            );
            counted.push(id.clone());
        }
        if windows.is_empty() {
            return Ok(None);
        }
        let (parent, _) = current_model(repo, tx, user, rec.parent_version, &self.base)?;
        Ok(Some(ProbationInputs {
            version,
            parent,
            windows,
            batches: counted,
        }))
    }

    fn score(&mut self, user: &UserId, run_id: &str) -> Result<Outcome, KvError> {
        let Some(inp) = self.inputs(user.as_str(), run_id)? else {
            return Ok(Outcome::Skip);
        };
        let guard = self.guard()?;
        let t0 = Instant::now();
        let cpu0 = swimlane_runtime::process_cpu_seconds();
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
        let probation = match &inp.probation {
            None => None,
            Some(p) => {
                let parent = match MicroModel::load_for(&p.parent, &self.spec) {
                    Ok(m) => m,
                    Err(e) => {
                        return Ok(Outcome::Dead(format!(
                            "the head's parent does not load: {e}"
                        )))
                    }
                };
                match paired(&cur, &parent, &p.windows) {
                    Ok(mut e) => {
                        e.batches = p.batches.clone();
                        Some((p.version, e))
                    }
                    Err(e) => return Ok(Outcome::Dead(format!("probation scoring failed: {e}"))),
                }
            }
        };
        let validate_seconds = t0.elapsed().as_secs_f64();
        let validate_cpu_seconds = swimlane_runtime::process_cpu_seconds() - cpu0;
        self.env.metrics.validate_seconds.observe(validate_seconds);
        let cpu = validate_cpu_seconds.max(0.0);
        self.env.metrics.score_cpu_seconds.inc_by(cpu);
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
            probation,
            verdict: Verdict {
                accepted: decision == Decision::Accept,
                reason,
                candidate_heldout_accuracy: s.candidate_heldout,
                current_heldout_accuracy: s.current_heldout,
                heldout_samples: s.heldout_samples,
                candidate_guard_accuracy: s.candidate_guard,
                current_guard_accuracy: s.current_guard,
                validate_seconds: validate_seconds as f32,
                validate_cpu_seconds: validate_cpu_seconds as f32,
            },
        })
    }
}

/// `head` against `parent` on `windows` (which neither trained on): the paired
/// evidence of probation.
fn paired(
    head: &MicroModel,
    parent: &MicroModel,
    windows: &[Sample],
) -> Result<PairedEvidence, swimlane_model::ModelError> {
    let mut e = PairedEvidence::default();
    if windows.is_empty() {
        return Ok(e);
    }
    let ph = head.predict_proba_samples(windows)?;
    let pp = parent.predict_proba_samples(windows)?;
    for (s, (h, p)) in windows.iter().zip(ph.iter().zip(&pp)) {
        let t = s.label;
        let (hr, pr) = (argmax_class(h) == t, argmax_class(p) == t);
        let lp = |v: &Vec<f32>| (v[t.index()] as f64).max(1e-6).ln();
        e.add(hr, pr, lp(h) - lp(p));
    }
    Ok(e)
}

/// The weights of the model a user's devices run now (the head version's, else the base), and
/// its guard accuracy when it was validated (`None` for the base).
pub fn current_model(
    repo: &Repo,
    tx: &mut Transaction<'_>,
    user: &str,
    head: Option<u64>,
    base: &KeptBlob,
) -> Result<(Arc<Vec<u8>>, Option<f32>), KvError> {
    let (bytes, guard) = match head {
        Some(v) => {
            let mv = repo.model_version(tx, user, v)?.ok_or_else(|| {
                missing(format!("user {user} head"), "head version has no record")
            })?;
            (
                repo.blob(tx, &mv.model_blob)?.map(Arc::new),
                Some(mv.guard_accuracy),
            )
        }
        None => (
            repo.blob_kept(tx, BASE_MODEL_BLOB, base, Ok)?
                .map(|(_, bytes)| bytes),
            None,
        ),
    };
    let bytes =
        bytes.ok_or_else(|| missing(format!("user {user} current model"), "weights missing"))?;
    Ok((bytes, guard))
}

impl Stage for Validator {
    /// A user's run with a candidate to judge.
    type Work = (UserId, String);
    type Prepared = Outcome;
    type Outcome = Judged;

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

    fn apply(&self, tx: &mut Transaction<'_>, out: &Outcome, now_ms: u64) -> Effect<Judged> {
        let Outcome::Verdict {
            user,
            run_id,
            decision,
            failed,
            verdict,
            probation,
        } = out
        else {
            return Ok(match out {
                Outcome::Dead(reason) => Applied::Dead(reason.clone()),
                _ => Applied::Stale,
            });
        };
        // An erasure began: nothing more of this user is written.
        if swimlane_state::forget::is_forgotten(&self.env.repo, tx, user.as_str())? {
            return Ok(Applied::Stale);
        }
        let mut ended = None;
        if let Some((version, fresh)) = probation {
            ended = lifecycle::probation(
                &self.env.repo,
                self.env.emitter.as_ref(),
                tx,
                user,
                run_id,
                *version,
                fresh,
                &self.probation,
                verdict,
                now_ms,
            )?;
            if ended == Some(ProbationEnd::RolledBack) {
                tracing::warn!(
                    version = *version,
                    "head rolled back to its parent on probation; the run judged against it is void"
                );
                return Ok(Applied::Done(Judged {
                    decision: Some(Decision::Reject),
                    probation: ended,
                }));
            }
        }
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
        Ok(match (done, ended) {
            (None, None) => Applied::Stale,
            (decision, probation) => Applied::Done(Judged {
                decision,
                probation,
            }),
        })
    }

    fn committed(&mut self, judged: Vec<Judged>) {
        for j in judged {
            if let Some(d) = j.decision {
                let label = match d {
                    Decision::Accept => "accepted",
                    Decision::Reject => "rejected",
                    Decision::Defer => "deferred",
                };
                self.env.metrics.verdicts.with_label_values(&[label]).inc();
            }
            if let Some(p) = j.probation {
                let label = match p {
                    ProbationEnd::RolledBack => "rolled_back",
                    ProbationEnd::Promoted => "promoted",
                };
                self.env
                    .metrics
                    .probations
                    .with_label_values(&[label])
                    .inc();
            }
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
            probation: config.probation.clone(),
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

/// What one event's commit did: the verdict recorded (`None` when the run was
/// abandoned because its head was rolled back) and how a probation ended, if it did.
pub struct Judged {
    pub decision: Option<Decision>,
    pub probation: Option<ProbationEnd>,
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
