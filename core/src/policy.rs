//! The validation policy and the convergence rule: pure functions of measured
//! accuracies.
use serde::{Deserialize, Serialize};

/// When a candidate may replace a user's current model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationPolicy {
    /// The candidate's held-out accuracy must exceed the current model's by at least
    /// this much (absolute).
    pub margin: f32,
    /// Fewer held-out windows than this and no candidate is accepted (too little
    /// evidence).
    pub min_heldout: u32,
    /// The candidate may lose at most this much accuracy on the population guard set
    /// compared with the current model; more means it collapsed (e.g. poisoned labels).
    pub guard_max_drop: f32,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        ValidationPolicy {
            margin: 0.02,
            min_heldout: 10,
            guard_max_drop: 0.15,
        }
    }
}

/// What the validator does with a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Accept,
    Reject,
    /// Not enough held-out evidence yet: neither publish nor discard the batches; train
    /// them again with the user's next batch.
    Defer,
}

/// The measurements a verdict is made from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    pub candidate_heldout: f32,
    pub current_heldout: f32,
    pub heldout_samples: u32,
    pub candidate_guard: f32,
    pub current_guard: f32,
}

impl ValidationPolicy {
    /// Accept, reject, or defer (too little held-out evidence to judge), with the
    /// reason. Accepts only with enough held-out evidence, a gain of at least `margin`,
    /// and no guard-set collapse.
    pub fn decide(&self, s: &Scores) -> (Decision, String) {
        if s.heldout_samples < self.min_heldout {
            return (
                Decision::Defer,
                format!(
                    "only {} held-out windows (need {})",
                    s.heldout_samples, self.min_heldout
                ),
            );
        }
        let gain = s.candidate_heldout - s.current_heldout;
        if gain < self.margin {
            return (
                Decision::Reject,
                format!(
                    "held-out accuracy {:.3} vs current {:.3}: gain {:.3} below margin {:.3}",
                    s.candidate_heldout, s.current_heldout, gain, self.margin
                ),
            );
        }
        let drop = s.current_guard - s.candidate_guard;
        if drop > self.guard_max_drop {
            return (
                Decision::Reject,
                format!(
                    "guard-set accuracy fell {:.3} (from {:.3} to {:.3}), more than {:.3}: collapsed",
                    drop, s.current_guard, s.candidate_guard, self.guard_max_drop
                ),
            );
        }
        (
            Decision::Accept,
            format!(
                "held-out accuracy {:.3} vs current {:.3} (+{:.3})",
                s.candidate_heldout, s.current_heldout, gain
            ),
        )
    }
}

/// Whether a model with this held-out accuracy is good enough that the user stops
/// being retrained until new corrections arrive.
pub fn converged(heldout_accuracy: f32, target: f32) -> bool {
    heldout_accuracy >= target
}

#[cfg(test)]
mod tests {
    use super::*;
    fn s(c: f32, cur: f32, n: u32, cg: f32, curg: f32) -> Scores {
        Scores {
            candidate_heldout: c,
            current_heldout: cur,
            heldout_samples: n,
            candidate_guard: cg,
            current_guard: curg,
        }
    }
    #[test]
    fn accepts_only_a_real_gain_without_collapse() {
        let p = ValidationPolicy::default();
        use Decision::*;
        assert_eq!(p.decide(&s(0.9, 0.8, 50, 0.9, 0.9)).0, Accept);
        assert_eq!(
            p.decide(&s(0.81, 0.8, 50, 0.9, 0.9)).0,
            Reject,
            "gain under margin"
        );
        assert_eq!(p.decide(&s(0.7, 0.8, 50, 0.9, 0.9)).0, Reject, "worse");
        assert_eq!(
            p.decide(&s(0.9, 0.8, 5, 0.9, 0.9)).0,
            Defer,
            "too little evidence"
        );
        assert_eq!(
            p.decide(&s(0.9, 0.8, 50, 0.5, 0.9)).0,
            Reject,
            "guard collapse"
        );
        assert!(converged(0.97, 0.97) && !converged(0.96, 0.97));
    }
}
