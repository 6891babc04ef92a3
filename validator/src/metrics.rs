//! The validator's metrics, defined in one place.
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Metrics the validator exports as `swimlane_validator_*`.
#[derive(Clone)]
pub struct ValidatorMetrics {
    /// Records waiting on this member's partitions.
    pub bus_lag: IntGauge,
    pub validate_seconds: Histogram,
    /// Label `verdict`: `accepted` | `rejected` | `deferred`.
    pub verdicts: IntCounterVec,
    pub dead_letters: IntCounter,
}

impl ValidatorMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = ValidatorMetrics {
            bus_lag: IntGauge::new(
                "swimlane_validator_bus_lag_records",
                "Records waiting on the partitions this member owns",
            )?,
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
            dead_letters: IntCounter::new(
                "swimlane_validator_dead_letters_total",
                "Records sent to the dead-letter topic",
            )?,
        };
        registry.register(Box::new(m.bus_lag.clone()))?;
        registry.register(Box::new(m.validate_seconds.clone()))?;
        registry.register(Box::new(m.verdicts.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        for v in ["accepted", "rejected", "deferred"] {
            m.verdicts.with_label_values(&[v]);
        }
        Ok(m)
    }
}
