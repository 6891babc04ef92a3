//! Wiring the stages in one process: what `swimlane dev`, `swimlane demo` and the
//! integration tests run. Each stage runs on its own thread with its own consumer, as
//! it would in its own process.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus::Registry;
use swimlane_bus::stage::Stop;
use swimlane_publisher::{PublisherConfig, PublisherMetrics};
use swimlane_runtime::wiring::{StageDeps, StageMetrics};
use swimlane_runtime::{Config, Worker};
use swimlane_store::Db;
use swimlane_trainer::{TrainerConfig, TrainerMetrics};
use swimlane_validator::{ValidatorConfig, ValidatorMetrics};

/// One stage's work on its thread, until the stop flag is set.
type StageWork = dyn FnOnce(Stop<'_>) -> Result<(), swimlane_runtime::RuntimeError> + Send;

/// The consuming stages running in this process.
pub struct Stages {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<Result<(), String>>)>,
}

impl Stages {
    /// Start `trainers` trainer threads, one validator and, if `publisher`, one
    /// publisher stage (without it, the publisher runs elsewhere, e.g. with its API).
    pub fn start(
        config: &Config,
        db: &Db,
        registry: &Registry,
        trainers: usize,
        publisher: bool,
    ) -> anyhow::Result<Stages> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut spawn = |name: String, work: Box<StageWork>| {
            let s = stop.clone();
            let t = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || work(&|| s.load(Ordering::Relaxed)).map_err(|e| e.to_string()))?;
            threads.push((name, t));
            anyhow::Ok(())
        };
        let runner = |worker| StageMetrics::register(registry, worker);
        let trainer = (
            runner(Worker::Trainer)?,
            TrainerMetrics::register(registry)?,
        );
        for i in 0..trainers {
            let cfg = TrainerConfig::from_config(config)?;
            let deps = StageDeps::for_worker(config, db, Worker::Trainer, trainer.clone())?;
            spawn(
                format!("trainer-{i}"),
                Box::new(move |stop| swimlane_trainer::run(cfg, deps, stop)),
            )?;
        }
        let validator = (
            runner(Worker::Validator)?,
            ValidatorMetrics::register(registry)?,
        );
        let cfg = ValidatorConfig::from_config(config)?;
        let deps = StageDeps::for_worker(config, db, Worker::Validator, validator)?;
        spawn(
            "validator".into(),
            Box::new(move |stop| swimlane_validator::run(cfg, deps, stop)),
        )?;
        if publisher {
            let metrics = (
                runner(Worker::Publisher)?,
                PublisherMetrics::register(registry)?,
            );
            let deps = StageDeps::for_worker(config, db, Worker::Publisher, metrics)?;
            let cfg = PublisherConfig::from_config(config)?;
            spawn(
                "publisher".into(),
                Box::new(move |stop| swimlane_publisher::run(cfg, deps, stop)),
            )?;
        }
        Ok(Stages { stop, threads })
    }

    /// Ask every stage to stop after its current delivery, and wait for them. Errors
    /// name the stage that failed.
    pub fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for (name, t) in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("{name}: {e}")),
                Err(_) => errors.push(format!("{name}: panicked")),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("stages failed: {}", errors.join("; "))
        }
    }
}

/// The whole fleet in this process on loopback: ingest's and the publisher's HTTP APIs
/// on ports the OS picks, `trainers` trainer threads and a validator. What `swimlane
/// demo` and `swimlane replay` drive through HTTP, as phones would.
pub struct LocalFleet {
    pub ingest_url: String,
    pub publisher_url: String,
    /// The consuming stages' metrics (trainers, validator).
    pub registry: Registry,
    shutdown: swimlane_runtime::CancellationToken,
    ingest: swimlane_ingest::Running,
    publisher: swimlane_publisher::Running,
    stages: Stages,
}

impl LocalFleet {
    /// `config` with every listen address set to an OS-picked loopback port.
    pub fn loopback(mut config: Config) -> Config {
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("an address");
        config.ingest.listen = any;
        config.ingest.metrics_listen = any;
        config.trainer.metrics_listen = any;
        config.validator.metrics_listen = any;
        config.publisher.listen = any;
        config.publisher.metrics_listen = any;
        config
    }

    /// Start the APIs and the stages on `db` (the store `config` names, already open).
    pub async fn start(config: &Config, db: &Db, trainers: usize) -> anyhow::Result<LocalFleet> {
        let shutdown = swimlane_runtime::CancellationToken::new();
        let ingest = swimlane_ingest::start(
            config.clone(),
            swimlane_ingest::IngestDeps {
                db: db.clone(),
                emitter: swimlane_runtime::wiring::emitter(config)?,
                registry: swimlane_runtime::new_registry(),
                clock: swimlane_runtime::system_now_ms(),
            },
            shutdown.clone(),
        )
        .await?;
        let publisher = swimlane_publisher::start(config.clone()).await?;
        let registry = Registry::new();
        let stages = Stages::start(config, db, &registry, trainers, false)?;
        Ok(LocalFleet {
            registry,
            ingest_url: format!("http://{}", ingest.api_addr),
            publisher_url: format!("http://{}", publisher.api_addr),
            shutdown,
            ingest,
            publisher,
            stages,
        })
    }

    /// Start a fleet on a runtime of its own (2 worker threads), run `f` with it on
    /// this thread, and stop the fleet whatever `f` does: a panic in `f` (a failed
    /// assertion) is raised again once the fleet's threads are gone, so a test fails
    /// instead of hanging.
    pub fn run_with<T>(
        config: &Config,
        db: &Db,
        trainers: usize,
        f: impl FnOnce(&LocalFleet) -> T,
    ) -> anyhow::Result<T> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let fleet = rt.block_on(LocalFleet::start(config, db, trainers))?;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&fleet)));
        let stopped = rt.block_on(fleet.stop());
        match outcome {
            Ok(t) => stopped.map(|()| t),
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Stop everything; the stages' first error, if any.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.publisher.shutdown.cancel();
        let stopped = self.stages.stop();
        let _ = self.ingest.handle.await;
        let _ = self.publisher.handle.await;
        stopped
    }
}
