//! The validator's metrics, defined in one place.
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use swimlane_runtime::wiring::{HasStageMetrics, StageMetrics};
use swimlane_runtime::Worker;

/// Metrics the validator exports as `swimlane_validator_*`.
#[derive(Clone)]
pub struct ValidatorMetrics {
    /// The lag and dead letters every stage has.
    pub stage: StageMetrics,
    pub validate_seconds: Histogram,
    /// Label `verdict`: `accepted` | `rejected` | `deferred`.
    pub verdicts: IntCounterVec,
}

impl HasStageMetrics for ValidatorMetrics {
    fn stage(&self) -> &StageMetrics {
        &self.stage
    }
}

impl ValidatorMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = ValidatorMetrics {
            stage: StageMetrics::register(registry, Worker::Validator)?,
            validate_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "swimlane_validator_validate_seconds",
                    "Time spent scoring a candidate and the current model",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )?,
            verdicts: IntCounterVec::new(
                Opts::new("swimlane_validator_verdicts_total", "Verdicts recorded"),
                &["verdict"],
            )?,
        };
        registry.register(Box::new(m.validate_seconds.clone()))?;
        registry.register(Box::new(m.verdicts.clone()))?;
        for v in ["accepted", "rejected", "deferred"] {
            m.verdicts.with_label_values(&[v]);
        }
        Ok(m)
    }
}
