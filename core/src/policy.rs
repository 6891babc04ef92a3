//! The validation policy and the convergence rule: pure functions of measured
//! accuracies.
//!
//! The validator compares the candidate with the user's current model on the same
//! held-out windows (never trained on):
//! - **enough evidence**: with fewer than `min_heldout` held-out windows, or so few
//!   changed windows that even all of them improving could not pass the gain test
//!   below (fewer than `gain_z`²), and no net loss, the run is deferred: its batches
//!   wait and are trained again with the user's next batch.
//! - **a gain** on all held-out windows, counted per window: `improved` windows the
//!   candidate gets right and the current model wrong, `regressed` the reverse. The net
//!   gain must reach `margin` (as a share of the windows) and
//!   `improved - regressed >= gain_z * sqrt(improved + regressed)` (a one-sided sign
//!   test). Or, with no net accuracy loss, a gain in likelihood: the per-window
//!   difference of the log-probability the two models give the true class, in a
//!   one-sided paired z-test at `gain_z`, so that every held-out window is evidence,
//!   not only the few whose class flips. `gain_z` is low (0.5): on real swimmers most
//!   windows of a session are ones the current model already gets right, a session's
//!   honest gain is a few windows, and at 2.5 most uploads ended deferred.
//! - **every batch proves itself** ([`ValidationPolicy::judge_batch`]): a batch the
//!   current model gets often wrong must show a gain significant at `significance_z`
//!   (2.5) on its own held-out windows. Labels shuffled at random give
//!   `improved ≈ regressed`, so a poisoned batch passes only by chance (under 1%): this,
//!   not the run's gain test, is the defence against wrong labels.
//! - **no forgetting** on the established held-out windows (those of batches already in
//!   a published model): a candidate that loses more than `history_max_drop` there
//!   unlearned what was validated before, as training on wrong labels does.
//! - **no drift from the population**: on the guard set, at most `guard_max_drop`
//!   below the better of the current and the base model.
use serde::{Deserialize, Serialize};

/// When a candidate may replace a user's current model. The config's `[validator]`
/// keys (flattened there, hence no `deny_unknown_fields` here: the config loader
/// refuses unknown keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ValidationPolicy {
    /// Net held-out gain (improved minus regressed windows, as a share of all held-out
    /// windows) the candidate needs.
    pub margin: f32,
    /// Fewer held-out windows than this and the run is deferred (too little evidence):
    /// its batches wait and are trained again with the user's next batch.
    pub min_heldout: u32,
    /// One-sided significance, in standard deviations of a sign test, that each batch
    /// of a run the current model gets often wrong must show on its own held-out
    /// windows ([`ValidationPolicy::judge_batch`]): the defence against wrong labels.
    pub significance_z: f32,
    /// One-sided significance of the run's gain over all its held-out windows (the
    /// sign test and the likelihood test of [`ValidationPolicy::decide`]). Lower than
    /// `significance_z`: wrong labels are caught batch by batch, and on real swimmers a
    /// session's honest gain is a few windows (README "Real swimmers").
    pub gain_z: f32,
    /// Most accuracy the candidate may lose on the established held-out windows.
    pub history_max_drop: f32,
    /// Most accuracy the candidate may lose on the population guard set compared with
    /// the better of the current model and the base model; more means it collapsed
    /// (measured against the base too, so that small drops cannot add up version after
    /// version).
    pub guard_max_drop: f32,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        ValidationPolicy {
            margin: 0.0,
            min_heldout: 10,
            significance_z: 2.5,
            gain_z: 0.5,
            history_max_drop: 0.02,
            guard_max_drop: 0.05,
        }
    }
}

/// What the validator does with a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Accept,
    Reject,
    /// Not enough held-out evidence yet: neither publish nor discard the batches; train
    /// them again with the user's next batch.
    Defer,
}

/// The measurements a verdict is made from.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scores {
    /// All held-out windows: accuracy of each model, and the per-window comparison.
    pub candidate_heldout: f32,
    pub current_heldout: f32,
    pub heldout_samples: u32,
    pub improved: u32,
    pub regressed: u32,
    /// The established held-out windows (batches already in a published model).
    pub candidate_history: f32,
    pub current_history: f32,
    pub history_samples: u32,
    /// The population guard set.
    pub candidate_guard: f32,
    pub current_guard: f32,
    /// The deployment's base model on the guard set.
    pub base_guard: f32,
    /// Per held-out window, `ln p_candidate(true class) − ln p_current(true class)`
    /// (probabilities floored at 1e-6): its mean and standard deviation.
    pub loglik_gain_mean: f32,
    pub loglik_gain_sd: f32,
}

impl ValidationPolicy {
    /// Accept, reject or defer, with the reason.
    pub fn decide(&self, s: &Scores) -> (Decision, String) {
        if s.heldout_samples < self.min_heldout {
            return (
                Decision::Defer,
                format!(
                    "only {} held-out windows (need {}); waiting for more corrections",
                    s.heldout_samples, self.min_heldout
                ),
            );
        }
        let net = s.improved as f32 - s.regressed as f32;
        let changed = (s.improved + s.regressed) as f32;
        // The likelihood route: every held-out window counts, not only the ones whose
        // class flipped. A candidate that is no worse on held-out accuracy and whose
        // paired log-likelihood gain is significant (a one-sided paired z-test at
        // `gain_z`) passes this step too.
        let n = s.heldout_samples as f32;
        let lik_z = if s.loglik_gain_sd > 0.0 {
            s.loglik_gain_mean / (s.loglik_gain_sd / n.sqrt())
        } else if s.loglik_gain_mean > 0.0 {
            f32::INFINITY
        } else {
            0.0
        };
        let z = self.gain_z;
        let lik_pass = net >= 0.0 && s.loglik_gain_mean > 0.0 && lik_z >= z;
        if !lik_pass && net >= 0.0 && changed < z * z {
            // Even if every changed window improved, the sign test could not pass:
            // too little evidence either way, so wait for more corrections.
            return (
                Decision::Defer,
                format!(
                    "only {} of {} held-out windows changed ({} improved, {} regressed): too few to judge; waiting for more corrections",
                    s.improved + s.regressed,
                    s.heldout_samples,
                    s.improved,
                    s.regressed
                ),
            );
        }
        let share = net / s.heldout_samples as f32;
        let needed = z * ((s.improved + s.regressed) as f32).sqrt();
        if !lik_pass && (share < self.margin || net < needed || net <= 0.0) {
            return (
                Decision::Reject,
                format!(
                    "no significant held-out gain: {} windows improved, {} regressed of {} (net {:+.3}, need {:+.3} and {:.1} > {:.1})",
                    s.improved, s.regressed, s.heldout_samples, share, self.margin, net, needed
                ),
            );
        }
        if s.history_samples >= self.min_heldout
            && s.current_history - s.candidate_history > self.history_max_drop
        {
            return (
                Decision::Reject,
                format!(
                    "forgets validated behaviour: established held-out accuracy {:.3} -> {:.3} on {} windows",
                    s.current_history, s.candidate_history, s.history_samples
                ),
            );
        }
        let (reference, of) = if s.base_guard > s.current_guard {
            (s.base_guard, "the base model's")
        } else {
            (s.current_guard, "the current model's")
        };
        let drop = reference - s.candidate_guard;
        if drop > self.guard_max_drop {
            return (
                Decision::Reject,
                format!(
                    "guard-set accuracy {:.3} is {:.3} below {of} {:.3}, more than {:.3}: drifted from the population",
                    s.candidate_guard, drop, reference, self.guard_max_drop
                ),
            );
        }
        (
            Decision::Accept,
            format!(
                "held-out accuracy {:.3} -> {:.3} ({} improved, {} regressed of {})",
                s.current_heldout, s.candidate_heldout, s.improved, s.regressed, s.heldout_samples
            ),
        )
    }
}

impl ValidationPolicy {
    /// One batch of a run, on its own held-out windows, of which the current model gets
    /// `current_wrong` wrong. A batch with at least `min_heldout` held-out windows, on
    /// which the current model is wrong often enough that a gain could be shown (at
    /// least z² windows), must show a significant gain there by itself
    /// (`improved − regressed ≥ z·√(improved + regressed)` and at least z² net windows),
    /// else `Err(reason)`: honest corrections are windows the current model got wrong,
    /// so a candidate that learned them gets many of their held-out siblings right,
    /// while wrong (e.g. shuffled) labels cannot be learned and show no such gain, even
    /// when other batches of the run carry the run's overall gain (and shuffled labels
    /// make the current model wrong on most windows, so such a batch is always judged).
    /// A batch the current model already gets (nearly) right (windows the swimmer
    /// confirmed, upload format 2) cannot show a gain and need not: it rides along,
    /// judged as part of the run, unless the candidate is significantly worse on it.
    /// Smaller batches ride along too.
    pub fn judge_batch(
        &self,
        improved: u32,
        regressed: u32,
        heldout: u32,
        current_wrong: u32,
    ) -> Result<(), String> {
        if heldout < self.min_heldout {
            return Ok(());
        }
        let net = improved as f32 - regressed as f32;
        let z = self.significance_z;
        if (current_wrong as f32) < z * z {
            if -net >= z * ((improved + regressed) as f32).sqrt() && net < 0.0 {
                return Err(format!(
                    "significantly worse on its own held-out windows ({improved} improved, {regressed} regressed of {heldout})"
                ));
            }
            return Ok(());
        }
        if net < z * ((improved + regressed) as f32).sqrt() || net < z * z {
            return Err(format!(
                "no significant gain on its own held-out windows ({improved} improved, {regressed} regressed of {heldout})"
            ));
        }
        Ok(())
    }
}

/// `[probation]`: how a newly published version is watched on the user's next
/// uploads. The validator scores the version (the head) and its parent on the same
/// fresh windows, which neither trained on (the run's own batches, both splits), and
/// adds them up across uploads (`records::PairedEvidence`); [`ProbationPolicy::judge`]
/// decides with the gate's own sign test ([`ValidationPolicy::decide`]) at `z`, on
/// accuracy only: the likelihood route is left out, because on labels neither model
/// can learn (a poisoned, shuffled upload) it favours whichever model is less
/// confident, and a good version would be rolled back for being sure of itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbationPolicy {
    /// One-sided significance (standard deviations) at which the parent beating the
    /// head rolls the head back, and the head beating the parent promotes it. Higher
    /// than the per-batch test (`validator.significance_z`): a rollback discards a
    /// version that already passed the gate, so it needs strong evidence. Measured on
    /// the real swimmers (README, "Probation on the real swimmers"): at 2.5 one seed
    /// lost a swimmer to a rollback; at 3.0 no seed did worse than without probation.
    pub z: f32,
    /// Fewer fresh windows than this and nothing is decided yet.
    pub min_windows: u32,
    /// Fresh windows after which a version not significantly worse than its parent is
    /// promoted (probation ends without harm).
    pub promote_windows: u32,
}

impl Default for ProbationPolicy {
    fn default() -> Self {
        ProbationPolicy {
            z: 3.0,
            min_windows: 20,
            promote_windows: 300,
        }
    }
}

/// What [`ProbationPolicy::judge`] decided.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbationCall {
    /// Significantly worse than its parent: go back to the parent.
    RollBack(String),
    /// Probation ends well.
    Promote(String),
    /// Not decided yet.
    Continue,
}

impl ProbationPolicy {
    /// The call on a version on probation, from its evidence so far.
    pub fn judge(&self, e: &crate::records::PairedEvidence) -> ProbationCall {
        let gate = ValidationPolicy {
            margin: 0.0,
            min_heldout: self.min_windows,
            gain_z: self.z,
            ..ValidationPolicy::default()
        };
        let figures = format!(
            "on {} fresh windows neither trained on, the version got {} right and its parent {} ({} only it got right, {} only the parent)",
            e.windows, e.head_right, e.parent_right, e.head_only, e.parent_only
        );
        let accuracy_only = |head_first: bool| Scores {
            loglik_gain_mean: 0.0,
            loglik_gain_sd: 0.0,
            ..e.scores(head_first)
        };
        if gate.decide(&accuracy_only(false)).0 == Decision::Accept {
            return ProbationCall::RollBack(format!(
                "significantly worse than its parent (z {}): {figures}",
                self.z
            ));
        }
        if gate.decide(&accuracy_only(true)).0 == Decision::Accept {
            return ProbationCall::Promote(format!(
                "significantly better than its parent (z {}): {figures}",
                self.z
            ));
        }
        if e.windows >= self.promote_windows {
            return ProbationCall::Promote(format!(
                "{} fresh windows without significant harm: {figures}",
                self.promote_windows
            ));
        }
        ProbationCall::Continue
    }
}

/// Whether a model with this held-out accuracy is good enough that the user stops
/// being retrained until new corrections arrive.
pub fn converged(heldout_accuracy: f32, target: f32) -> bool {
    heldout_accuracy >= target
}

/// `[retention]`: how much of each user's history is kept, so that no user's reads,
/// training time or storage grow with the number of uploads.
///
/// The rule, over a user's batches from the newest (by `staged_at_ms`, then id):
/// - every batch not yet retired counts its training and held-out windows, whatever
///   became of it (a rejected batch too, so that rejected uploads cannot pile up);
/// - a staged, deferred, published or rejected batch is **retired** (its samples
///   erased, its status `retired` with the reason) once the newer batches already hold
///   `max_training_windows` training windows and `max_heldout_windows` held-out
///   windows: it can no longer be read for training or validation. A validating batch
///   is never retired (its run is in flight); it goes at a later upload;
/// - the record of a retired batch is **forgotten** (deleted) once the user has
///   `max_batch_records` newer batch records, so that listing a user's batches stays
///   bounded too.
///
/// Ingest applies it in the transaction that stages a batch
/// (`swimlane_state::lifecycle::apply_retention`). The trainer reads at most
/// `max_training_windows` training windows (newest batches first) and the validator at
/// most `max_heldout_windows` held-out windows of published batches, so a run's reads
/// are bounded even before the next upload retires anything: with the defaults and
/// the largest upload (`ingest.max_samples_per_batch`), a run's read transaction stays
/// under 2 MB (`cli/tests/retention.rs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionPolicy {
    /// The user's most recent training windows a run trains on, and kept.
    pub max_training_windows: u32,
    /// The user's most recent held-out windows of published batches the validator
    /// checks for forgetting, and kept (a run's own held-out windows are always used).
    pub max_heldout_windows: u32,
    /// Batch records kept per user (a retired batch's record is forgotten beyond it).
    pub max_batch_records: u32,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            max_training_windows: 600,
            max_heldout_windows: 150,
            max_batch_records: 1000,
        }
    }
}

/// What [`RetentionPolicy::plan`] does with one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fate {
    /// Erase its samples and mark it retired.
    Retire,
    /// Delete its record (already retired).
    Forget,
}

/// The counts [`RetentionPolicy::plan`] needs of one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchSummary<'a> {
    pub id: &'a str,
    pub staged_at_ms: u64,
    pub status: &'a crate::records::BatchStatus,
    /// Training windows (samples not held out).
    pub training: u32,
    pub heldout: u32,
}

impl RetentionPolicy {
    /// The reason a retired batch carries.
    pub fn retire_reason(&self) -> String {
        format!(
            "retention: newer batches hold the user's {} most recent training and {} held-out windows (retention.max_training_windows, retention.max_heldout_windows)",
            self.max_training_windows, self.max_heldout_windows
        )
    }

    /// Which batches leave, and how (see the type's doc). Pure: the caller applies it.
    pub fn plan(&self, batches: &[BatchSummary<'_>]) -> Vec<(usize, Fate)> {
        use crate::records::BatchStatus as S;
        let mut order: Vec<usize> = (0..batches.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&batches[a], &batches[b]);
            (b.staged_at_ms, b.id).cmp(&(a.staged_at_ms, a.id))
        });
        let (mut training, mut heldout) = (0u64, 0u64);
        let mut out = Vec::new();
        for (rank, &i) in order.iter().enumerate() {
            let b = &batches[i];
            let full = training >= self.max_training_windows as u64
                && heldout >= self.max_heldout_windows as u64;
            match b.status {
                S::Retired { .. } => {
                    if rank >= self.max_batch_records as usize {
                        out.push((i, Fate::Forget));
                    }
                    continue;
                }
                S::Validating { .. } => {}
                S::Staged | S::Deferred { .. } | S::Published { .. } | S::Rejected { .. } => {
                    if full {
                        out.push((i, Fate::Retire));
                        continue;
                    }
                }
            }
            training += b.training as u64;
            heldout += b.heldout as u64;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod retention {
        use super::super::*;
        use crate::records::BatchStatus as S;

        fn b<'a>(id: &'a str, at: u64, status: &'a S, training: u32) -> BatchSummary<'a> {
            BatchSummary {
                id,
                staged_at_ms: at,
                status,
                training,
                heldout: training / 4,
            }
        }

        #[test]
        fn batches_beyond_the_newest_windows_are_retired_and_old_records_forgotten() {
            let p = RetentionPolicy {
                max_training_windows: 100,
                max_heldout_windows: 25,
                max_batch_records: 4,
            };
            let published = S::Published {
                run_id: "r".into(),
                version: 1,
            };
            let validating = S::Validating { run_id: "r".into() };
            let rejected = S::Rejected {
                run_id: None,
                reason: "x".into(),
            };
            let retired = S::Retired {
                reason: "old".into(),
            };
            let staged = S::Staged;
            let list = vec![
                b("a", 1, &retired, 80),    // 6th newest: forgotten
                b("b", 2, &published, 80),  // beyond: retired
                b("c", 3, &rejected, 80),   // beyond: retired
                b("d", 4, &validating, 80), // never retired
                b("e", 5, &published, 60),  // 60 + 50 >= 100: full after it
                b("f", 6, &staged, 50),     // newest
            ];
            let mut plan = p.plan(&list);
            plan.sort();
            assert_eq!(
                plan,
                vec![(0, Fate::Forget), (1, Fate::Retire), (2, Fate::Retire)]
            );
            // Under the budget nothing goes.
            let roomy = RetentionPolicy::default();
            assert!(roomy.plan(&list[1..]).is_empty());
        }

        #[test]
        fn rejected_batches_count_so_that_rejected_uploads_cannot_pile_up() {
            let p = RetentionPolicy {
                max_training_windows: 100,
                max_heldout_windows: 20,
                max_batch_records: 100,
            };
            let rejected = S::Rejected {
                run_id: None,
                reason: "x".into(),
            };
            let list: Vec<_> = (0..5)
                .map(|i| b(["a", "b", "c", "d", "e"][i], i as u64, &rejected, 80))
                .collect();
            let mut plan = p.plan(&list);
            plan.sort();
            assert_eq!(
                plan,
                vec![(0, Fate::Retire), (1, Fate::Retire), (2, Fate::Retire)]
            );
        }
    }

    fn s(improved: u32, regressed: u32, n: u32) -> Scores {
        Scores {
            candidate_heldout: 0.9,
            current_heldout: 0.5,
            heldout_samples: n,
            improved,
            regressed,
            candidate_history: 0.95,
            current_history: 0.95,
            history_samples: 50,
            candidate_guard: 0.9,
            current_guard: 0.9,
            base_guard: 0.9,
            loglik_gain_mean: 0.0,
            loglik_gain_sd: 1.0,
        }
    }

    /// The run's gain judged at the batch's significance and with a margin, as before
    /// the real swimmers: the mechanisms at a setting where each one shows.
    fn strict() -> ValidationPolicy {
        ValidationPolicy {
            gain_z: 2.5,
            margin: 0.02,
            ..ValidationPolicy::default()
        }
    }

    #[test]
    fn a_significant_likelihood_gain_without_an_accuracy_loss_is_evidence_too() {
        use Decision::*;
        let p = strict();
        let lik = |improved, regressed, n, mean: f32, sd: f32| Scores {
            loglik_gain_mean: mean,
            loglik_gain_sd: sd,
            ..s(improved, regressed, n)
        };
        // 5 improved, 1 regressed of 40: too few flips for the sign test alone...
        assert_eq!(p.decide(&s(5, 1, 40)).0, Defer);
        // ...but every window more likely under the candidate: mean/(sd/sqrt(40)) = 3.2.
        assert_eq!(p.decide(&lik(5, 1, 40, 0.2, 0.4)).0, Accept);
        // Not significant (z = 1.6), or an accuracy loss, or forgetting: as before.
        assert_eq!(p.decide(&lik(5, 1, 40, 0.1, 0.4)).0, Defer);
        assert_eq!(p.decide(&lik(7, 1, 40, 0.1, 0.4)).0, Reject);
        assert_eq!(p.decide(&lik(1, 3, 40, 0.2, 0.4)).0, Reject);
        let forgets = Scores {
            candidate_history: 0.80,
            ..lik(5, 1, 40, 0.2, 0.4)
        };
        assert_eq!(p.decide(&forgets).0, Reject);
        // No window changed and nothing gained: wait.
        assert_eq!(p.decide(&lik(0, 0, 40, 0.0, 0.0)).0, Defer);
        assert_eq!(p.decide(&lik(0, 0, 40, -0.1, 0.2)).0, Defer);
    }

    #[test]
    fn accepts_only_a_significant_gain_without_forgetting_or_collapse() {
        use Decision::*;
        let p = strict();
        for (scores, want, why) in [
            (s(30, 2, 60), Accept, "a significant gain"),
            (s(9, 0, 5), Defer, "too little evidence"),
            (
                s(12, 10, 60),
                Reject,
                "a coin-flip difference is not a gain",
            ),
            (s(1, 0, 100), Defer, "too few changed windows to judge"),
            (s(0, 0, 60), Defer, "no change: nothing to judge yet"),
            (s(8, 0, 1000), Reject, "significant but under the margin"),
            (s(1, 5, 60), Reject, "worse is rejected at once"),
        ] {
            assert_eq!(p.decide(&scores).0, want, "{why}");
        }
        let mut forget = s(30, 2, 60);
        forget.candidate_history = 0.80;
        assert_eq!(p.decide(&forget).0, Reject);
        let mut few = forget;
        few.history_samples = 3;
        assert_eq!(
            p.decide(&few).0,
            Accept,
            "history too small to judge forgetting"
        );
        let mut collapse = s(30, 2, 60);
        collapse.candidate_guard = 0.5;
        assert_eq!(p.decide(&collapse).0, Reject);
    }

    /// How often a coin flip passes: over every (improved, regressed) split of `n`
    /// changed windows, weighted by its binomial probability.
    fn coin_flip_pass_rate(n: u32, passes: impl Fn(u32, u32) -> bool) -> f64 {
        let mut pass = 0.0f64;
        let mut binom = 1.0f64; // C(n, k)
        for k in 0..=n {
            if k > 0 {
                binom = binom * (n - k + 1) as f64 / k as f64;
            }
            if passes(k, n - k) {
                pass += binom / 2f64.powi(n as i32);
            }
        }
        pass
    }

    #[test]
    fn shuffled_labels_rarely_pass_the_batch_test() {
        // Shuffled labels make the current model wrong on most of a batch's windows, so
        // the batch is judged on its own, and a candidate that learned nothing flips
        // windows both ways equally often: at the default z it passes under 1% of the
        // time, whatever the run's (looser) gain test says.
        let p = ValidationPolicy::default();
        let rate = coin_flip_pass_rate(40, |i, r| p.judge_batch(i, r, 60, 50).is_ok());
        assert!(rate < 0.01, "{rate}");
        let run = coin_flip_pass_rate(40, |i, r| p.decide(&s(i, r, 200)).0 == Decision::Accept);
        assert!(run > 0.05, "the run's test alone is looser: {run}");
        let p = strict();
        let rate = coin_flip_pass_rate(40, |i, r| p.decide(&s(i, r, 200)).0 == Decision::Accept);
        assert!(rate < 0.01, "{rate}");
    }

    #[test]
    fn by_default_a_run_needs_a_half_sd_gain_and_must_stay_near_the_base_on_the_guard_set() {
        use Decision::*;
        let p = ValidationPolicy::default();
        // Real swimmers: a session's honest gain is a few windows of many.
        assert_eq!(p.decide(&s(2, 0, 66)).0, Accept);
        assert_eq!(p.decide(&s(4, 1, 30)).0, Accept);
        assert_eq!(p.decide(&s(0, 0, 66)).0, Defer);
        assert_eq!(p.decide(&s(1, 0, 66)).0, Accept);
        assert_eq!(p.decide(&s(3, 2, 66)).0, Reject, "net 1 < half a sd (1.1)");
        assert_eq!(p.decide(&s(1, 1, 66)).0, Reject);
        // The guard set: at most 0.05 below the better of the current and base models,
        // so that drops of 0.04 per version cannot add up.
        let guard = |candidate, current, base| Scores {
            candidate_guard: candidate,
            current_guard: current,
            base_guard: base,
            ..s(6, 0, 60)
        };
        assert_eq!(p.decide(&guard(0.86, 0.90, 0.90)).0, Accept);
        assert_eq!(p.decide(&guard(0.84, 0.88, 0.90)).0, Reject);
        let (d, why) = p.decide(&guard(0.84, 0.88, 0.90));
        assert_eq!(d, Reject);
        assert!(why.contains("base model's 0.900"), "{why}");
        assert_eq!(
            p.decide(&guard(0.90, 0.96, 0.90)).0,
            Reject,
            "from the current"
        );
    }

    /// `judge_batch(improved, regressed, heldout, current_wrong)` over a table of
    /// cases: whether each passes, and why.
    fn judged(cases: &[((u32, u32, u32, u32), bool, &str)]) {
        let p = ValidationPolicy::default();
        for &((improved, regressed, heldout, wrong), passes, why) in cases {
            let got = p.judge_batch(improved, regressed, heldout, wrong);
            assert_eq!(got.is_ok(), passes, "{why}: {got:?}");
        }
    }

    #[test]
    fn a_batch_must_prove_itself_once_it_can_be_judged() {
        let cases = [
            ((12, 0, 15, 15), true, "a clear gain"),
            ((2, 0, 8, 8), true, "too small to judge alone"),
            ((2, 0, 40, 40), false, "a large batch that taught nothing"),
            ((9, 8, 40, 33), false, "shuffled labels: a coin flip"),
            ((0, 1, 40, 39), false, "a loss"),
        ];
        judged(&cases);
    }

    #[test]
    fn a_batch_the_current_model_already_gets_right_rides_along_unless_it_is_hurt() {
        // Confirmed windows: the current model is wrong on 2 of 40; no gain is possible.
        judged(&[
            ((1, 0, 40, 2), true, "no gain possible"),
            ((0, 0, 40, 0), true, "nothing to gain"),
            ((1, 2, 40, 2), true, "a small loss is the run's to judge"),
            (
                (0, 7, 40, 1),
                false,
                "significantly worse where the current model was right",
            ),
            // Six wrong windows are still too few to show a gain (z² = 6.25); seven are not.
            (
                (0, 0, 40, 6),
                true,
                "six wrong windows: too few to show a gain",
            ),
            ((0, 0, 40, 7), false, "seven wrong windows and no gain"),
        ]);
    }

    fn evidence(head: &[(bool, bool, f64)]) -> crate::records::PairedEvidence {
        let mut e = crate::records::PairedEvidence::default();
        for &(h, p, gain) in head {
            e.add(h, p, gain);
        }
        e
    }

    #[test]
    fn probation_rolls_back_a_version_its_parent_beats_and_promotes_one_that_does_no_harm() {
        let p = ProbationPolicy::default();
        // The head wrong on a third of the windows the parent gets right.
        let bad: Vec<_> = (0..60)
            .map(|i| {
                if i % 3 == 0 {
                    (false, true, -2.0)
                } else {
                    (true, true, 0.01)
                }
            })
            .collect();
        assert!(
            matches!(p.judge(&evidence(&bad)), ProbationCall::RollBack(r) if r.contains("worse"))
        );
        // Too few windows: nothing decided.
        assert_eq!(p.judge(&evidence(&bad[..12])), ProbationCall::Continue);
        // Equal models, a little noise either way: not decided until promote_windows.
        let even: Vec<_> = (0..100)
            .map(|i| match i % 10 {
                0 => (true, false, 0.3),
                1 => (false, true, -0.3),
                _ => (true, true, 0.0),
            })
            .collect();
        assert_eq!(p.judge(&evidence(&even)), ProbationCall::Continue);
        let long: Vec<_> = even
            .iter()
            .cycle()
            .take(p.promote_windows as usize)
            .copied()
            .collect();
        assert!(
            matches!(p.judge(&evidence(&long)), ProbationCall::Promote(r) if r.contains("without significant harm"))
        );
        // Clearly better: promoted at once.
        let good: Vec<_> = bad.iter().map(|&(h, q, g)| (q, h, -g)).collect();
        assert!(
            matches!(p.judge(&evidence(&good)), ProbationCall::Promote(r) if r.contains("better"))
        );
        // Shuffled labels: both models at chance, the head far more confident in its
        // wrong answers (a large likelihood loss): not a rollback.
        let shuffled: Vec<_> = (0..200)
            .map(|i| match i % 12 {
                0 => (true, false, 1.0),
                1 => (false, true, -6.0),
                2 => (true, true, 0.1),
                _ => (false, false, -3.0),
            })
            .collect();
        assert_eq!(p.judge(&evidence(&shuffled)), ProbationCall::Continue);
        // Evidence adds up across uploads.
        let (mut a, b) = (evidence(&bad[..12]), evidence(&bad[12..]));
        a.merge(&b);
        assert_eq!((a.windows, a.parent_only), (60, 20));
        assert_eq!(p.judge(&a), p.judge(&evidence(&bad)));
    }

    #[test]
    fn convergence_is_a_threshold() {
        assert!(converged(0.97, 0.97) && !converged(0.96, 0.97));
    }
}
