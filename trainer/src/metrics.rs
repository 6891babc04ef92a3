//! The trainer's metrics, defined in one place.
use prometheus::{Counter, Histogram, IntCounter, Registry};

/// Counters and histograms the trainer exports as `swimlane_trainer_*`.
#[derive(Clone)]
pub struct TrainerMetrics {
    pub train_seconds: Histogram,
    /// The process CPU spent fine-tuning candidates (each run's
    /// `RunRecord::train_cpu_seconds`, and runs whose commit found the user moved on as
    /// well): with the validator's scoring CPU and every worker's
    /// `process_cpu_seconds_total`, the share of the fleet's CPU outside training and
    /// scoring (`swimlane:cpu_outside_model:ratio_rate5m`).
    pub train_cpu_seconds: Counter,
    pub runs_committed: IntCounter,
    pub runs_failed: IntCounter,
}

impl TrainerMetrics {
    /// Create and register on `registry` (errors if registered twice).
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = swimlane_runtime::Registrar(registry);
        Ok(TrainerMetrics {
            train_seconds: r.histogram(
                "swimlane_trainer_train_seconds",
                "Time spent fine-tuning one user's candidate",
                &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            )?,
            train_cpu_seconds: r.seconds_counter(
                "swimlane_trainer_train_cpu_seconds_total",
                "Process CPU seconds spent fine-tuning candidates",
            )?,
            runs_committed: r.counter(
                "swimlane_trainer_runs_total",
                "Training runs committed (candidates handed to the validator)",
            )?,
            runs_failed: r.counter(
                "swimlane_trainer_runs_failed_total",
                "Training runs that failed deterministically; their batches were rejected",
            )?,
        })
    }
}
