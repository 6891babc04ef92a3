//! The publisher: turns accepted candidates into numbered model versions (see
//! [`stage`]) and serves them to devices.
use std::sync::Arc;

use swimlane_bus::stage::{LoopOptions, Stop};

use swimlane_runtime::RuntimeError;
use tokio_util::sync::CancellationToken;

mod metrics;
mod stage;
pub use metrics::PublisherMetrics;

#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// The deployment's model spec: a model of another spec is never published.
    pub spec: Arc<swimlane_core::ModelSpec>,
    /// Held-out accuracy at which a user counts as converged.
    pub target_accuracy: f32,
    pub loop_options: LoopOptions,
}

/// What the publisher works with.
pub type PublisherDeps = swimlane_runtime::wiring::StageDeps<PublisherMetrics>;

/// Run the publishing stage on the calling thread until `stop()`.
pub fn run(
    config: PublisherConfig,
    deps: PublisherDeps,
    stop: Stop<'_>,
) -> Result<(), RuntimeError> {
    let (target_accuracy, spec) = (config.target_accuracy, config.spec);
    deps.run(config.loop_options, stop, |env| stage::Publisher {
        env,
        target_accuracy,
        spec,
        base: Default::default(),
        prefix: None,
    })?;
    Ok(())
}

pub mod http;
pub use http::{router, ApiState};

impl PublisherConfig {
    /// The publishing stage's settings from the process config.
    pub fn from_config(
        config: &swimlane_runtime::Config,
    ) -> Result<Self, swimlane_runtime::config::ConfigError> {
        Ok(PublisherConfig {
            target_accuracy: config.policy.target_accuracy,
            loop_options: swimlane_runtime::wiring::loop_options(&config.publisher.consumer),
            spec: Arc::new(config.model_spec()?),
        })
    }
}

/// A publisher process's API and stage, running.
pub struct Running {
    /// Where the model API listens.
    pub api_addr: std::net::SocketAddr,
    /// Where /metrics, /healthz and /readyz listen.
    pub ops_addr: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    /// Ends when both the API and the stage have stopped.
    pub handle: tokio::task::JoinHandle<Result<(), RuntimeError>>,
}

/// Start the model API on `publisher.listen` and the publishing stage, with ops on
/// `publisher.metrics_listen`; both stop when `shutdown` (wired to SIGTERM/SIGINT) is
/// cancelled.
pub async fn start(config: swimlane_runtime::Config) -> Result<Running, RuntimeError> {
    use swimlane_runtime::wiring::Process;
    use swimlane_runtime::Worker;
    let p = Process::start(&config, Worker::Publisher).await?;
    let metrics = PublisherMetrics::register(&p.registry)?;
    let runner_metrics =
        swimlane_runtime::wiring::StageMetrics::register(&p.registry, Worker::Publisher)?;
    let deps = PublisherDeps::for_worker(
        &config,
        &p.db,
        Worker::Publisher,
        (runner_metrics, metrics.clone()),
    )?;
    let repo = deps.env.repo.clone();
    let cfg = PublisherConfig::from_config(&config)?;
    let header_timeouts = metrics.requests.header_timeouts.clone();
    let api = router(ApiState {
        db: p.db.clone(),
        repo,
        admin_token_sha256: config.admin_token_sha256.clone().into(),
        metrics,
        reads: Arc::new(tokio::sync::Semaphore::new(
            config.publisher.max_concurrent_reads as usize,
        )),
        now: swimlane_core::clock::system_now_ms(),
    });
    let listener = swimlane_runtime::bind(config.publisher.listen, "publisher API").await?;
    let api_addr = listener
        .local_addr()
        .map_err(|source| RuntimeError::Serve {
            what: "publisher API",
            source,
        })?;
    tracing::info!(%api_addr, "publisher API listening");
    p.ready.set(true);
    let shutdown = p.shutdown.clone();
    let stage = tokio::spawn(swimlane_runtime::wiring::run_until(
        move |stop| run(cfg, deps, stop),
        shutdown.clone(),
    ));
    let serve = swimlane_runtime::serve_draining(
        listener,
        api,
        p.ready.clone(),
        shutdown.clone(),
        swimlane_runtime::ServeOptions {
            what: "publisher",
            drain: std::time::Duration::from_millis(config.publisher.drain_timeout_ms),
            header_timeout: std::time::Duration::from_millis(config.publisher.header_timeout_ms),
            header_timeouts,
        },
    );
    let ops = p.ops.handle;
    let handle = tokio::spawn(async move {
        let served = serve.await.map_err(|source| RuntimeError::Serve {
            what: "publisher API",
            source,
        });
        let staged = stage.await.map_err(|e| RuntimeError::Join(e.to_string()))?;
        let _ = ops.await;
        served.and(staged)
    });
    Ok(Running {
        api_addr,
        ops_addr: p.ops.local_addr,
        shutdown,
        handle,
    })
}

/// [`start`], then wait until everything stopped.
pub async fn run_process(config: swimlane_runtime::Config) -> Result<(), RuntimeError> {
    let r = start(config).await?;
    r.handle
        .await
        .map_err(|e| RuntimeError::Join(e.to_string()))?
}
