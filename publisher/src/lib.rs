//! The publisher: turns accepted candidates into numbered model versions (see
//! [`stage`]) and serves them to devices.
use std::sync::Arc;

use swimlane_bus::stage::{run_stage, LoopOptions};
use swimlane_bus::{Consumer, Emitter};
use swimlane_state::Repo;
use swimlane_store::Db;
use tokio_util::sync::CancellationToken;

mod metrics;
mod stage;
pub use metrics::PublisherMetrics;

/// The consumer group every publisher joins.
pub const GROUP: &str = "publishers";

#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error("bus error: {0}")]
    Bus(#[from] swimlane_bus::BusError),
    #[error("publisher thread failed: {0}")]
    Join(String),
}

#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// Held-out accuracy at which a user counts as converged.
    pub target_accuracy: f32,
    pub loop_options: LoopOptions,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            target_accuracy: 0.97,
            loop_options: LoopOptions::default(),
        }
    }
}

pub struct PublisherDeps {
    pub db: Db,
    pub repo: Repo,
    pub emitter: Arc<dyn Emitter>,
    pub consumer: Box<dyn Consumer>,
    pub metrics: PublisherMetrics,
}

/// Run the publishing stage until `shutdown` is cancelled.
pub async fn run_stage_worker(
    config: PublisherConfig,
    deps: PublisherDeps,
    shutdown: CancellationToken,
) -> Result<(), PublisherError> {
    tokio::task::spawn_blocking(move || {
        run_stage_blocking(config, deps, &|| shutdown.is_cancelled())
    })
    .await
    .map_err(|e| PublisherError::Join(e.to_string()))?
}

/// The publishing stage on the calling thread.
pub fn run_stage_blocking(
    config: PublisherConfig,
    deps: PublisherDeps,
    stop: &dyn Fn() -> bool,
) -> Result<(), PublisherError> {
    let PublisherDeps {
        db,
        repo,
        emitter,
        mut consumer,
        metrics,
    } = deps;
    let mut h = stage::Publisher {
        db,
        repo,
        emitter,
        metrics,
        target_accuracy: config.target_accuracy,
    };
    run_stage(consumer.as_mut(), &mut h, &config.loop_options, stop)?;
    Ok(())
}

pub mod http;
pub use http::{router, ApiState};
