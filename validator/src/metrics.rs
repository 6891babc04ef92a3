//! The validator's metrics, defined in one place.
use prometheus::{Counter, Histogram, IntCounterVec, Registry};

/// Metrics the validator exports as `swimlane_validator_*`.
#[derive(Clone)]
pub struct ValidatorMetrics {
    pub validate_seconds: Histogram,
    /// The process CPU spent scoring (each verdict's `validate_cpu_seconds`, and
    /// scorings whose verdict was not committed as well; see
    /// `swimlane_trainer_train_cpu_seconds_total`).
    pub score_cpu_seconds: Counter,
    /// Label `verdict`: `accepted` | `rejected` | `deferred`.
    pub verdicts: IntCounterVec,
    /// Label `outcome`: `rolled_back` | `promoted`: probations ended
    /// (`swimlane_state::lifecycle::probation`).
    pub probations: IntCounterVec,
}

impl ValidatorMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = swimlane_runtime::Registrar(registry);
        let m = ValidatorMetrics {
            validate_seconds: r.histogram(
                "swimlane_validator_validate_seconds",
                "Time spent scoring a candidate and the current model",
                &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
            )?,
            score_cpu_seconds: r.seconds_counter(
                "swimlane_validator_score_cpu_seconds_total",
                "Process CPU seconds spent loading and scoring candidates and current models",
            )?,
            verdicts: r.counters(
                "swimlane_validator_verdicts_total",
                "Verdicts recorded",
                &["verdict"],
            )?,
            probations: r.counters(
                "swimlane_validator_probations_ended_total",
                "Published versions whose probation ended: rolled back to their parent, or promoted",
                &["outcome"],
            )?,
        };
        for v in ["accepted", "rejected", "deferred"] {
            m.verdicts.with_label_values(&[v]);
        }
        for o in ["rolled_back", "promoted"] {
            m.probations.with_label_values(&[o]);
        }
        Ok(m)
    }
}
