//! The validator's metrics, defined in one place.
use prometheus::{Histogram, IntCounterVec, Registry};

/// Metrics the validator exports as `swimlane_validator_*`.
#[derive(Clone)]
pub struct ValidatorMetrics {
    pub validate_seconds: Histogram,
    /// Label `verdict`: `accepted` | `rejected` | `deferred`.
    pub verdicts: IntCounterVec,
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
            verdicts: r.counters(
                "swimlane_validator_verdicts_total",
                "Verdicts recorded",
                &["verdict"],
            )?,
        };
        for v in ["accepted", "rejected", "deferred"] {
            m.verdicts.with_label_values(&[v]);
        }
        Ok(m)
    }
}
