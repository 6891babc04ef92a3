//! The trainer's metrics, defined in one place.
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

/// Counters and histograms the trainer exports as `swimlane_trainer_*`.
#[derive(Clone)]
pub struct TrainerMetrics {
    /// Records waiting on this member's partitions.
    pub bus_lag: IntGauge,
    pub train_seconds: Histogram,
    pub runs_committed: IntCounter,
    pub runs_failed: IntCounter,
    pub dead_letters: IntCounter,
}

impl TrainerMetrics {
    /// Create and register on `registry` (errors if registered twice).
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = TrainerMetrics {
            bus_lag: IntGauge::new(
                "swimlane_trainer_bus_lag_records",
                "Records waiting on the partitions this member owns",
            )?,
            train_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "swimlane_trainer_train_seconds",
                    "Time spent fine-tuning one user's candidate",
                )
                .buckets(vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
            )?,
            runs_committed: IntCounter::new(
                "swimlane_trainer_runs_total",
                "Training runs committed (candidates handed to the validator)",
            )?,
            runs_failed: IntCounter::new(
                "swimlane_trainer_runs_failed_total",
                "Training runs that failed deterministically; their batches were rejected",
            )?,
            dead_letters: IntCounter::new(
                "swimlane_trainer_dead_letters_total",
                "Records the trainer could not process, sent to the dead-letter topic",
            )?,
        };
        registry.register(Box::new(m.bus_lag.clone()))?;
        registry.register(Box::new(m.train_seconds.clone()))?;
        registry.register(Box::new(m.runs_committed.clone()))?;
        registry.register(Box::new(m.runs_failed.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        Ok(m)
    }
}
