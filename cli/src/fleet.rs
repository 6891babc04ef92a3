//! Wiring the stages in one process: what `swimlane dev`, `swimlane demo` and the
//! integration tests run. Each stage runs on its own thread with its own consumer, as
//! it would in its own process.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus::Registry;
use swimlane_core::keys::Keys;
use swimlane_core::topics;
use swimlane_runtime::{wiring, Config};
use swimlane_state::Repo;
use swimlane_store::Db;

/// The consuming stages running in this process.
pub struct Stages {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<Result<(), String>>)>,
}

impl Stages {
    /// Start `trainers` trainer threads, one validator and one publisher stage.
    pub fn start(
        config: &Config,
        db: &Db,
        registry: &Registry,
        trainers: usize,
    ) -> anyhow::Result<Stages> {
        Self::start_stages(config, db, registry, trainers, true)
    }

    /// Start `trainers` trainer threads and one validator (the publisher runs
    /// elsewhere, e.g. with its API).
    pub fn start_without_publisher(
        config: &Config,
        db: &Db,
        registry: &Registry,
        trainers: usize,
    ) -> anyhow::Result<Stages> {
        Self::start_stages(config, db, registry, trainers, false)
    }

    fn start_stages(
        config: &Config,
        db: &Db,
        registry: &Registry,
        trainers: usize,
        publisher: bool,
    ) -> anyhow::Result<Stages> {
        let keys = Keys::new(&config.deployment);
        let repo = Repo::new(keys.clone());
        let emitter = wiring::emitter(config)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();

        let tm = swimlane_trainer::TrainerMetrics::register(registry)?;
        for i in 0..trainers {
            let deps = swimlane_trainer::TrainerDeps {
                db: db.clone(),
                repo: repo.clone(),
                emitter: emitter.clone(),
                consumer: wiring::consumer(
                    config,
                    db,
                    swimlane_trainer::GROUP,
                    topics::BATCHES,
                    &config.trainer.consumer,
                )?,
                metrics: tm.clone(),
            };
            let cfg = swimlane_trainer::TrainerConfig {
                loop_options: wiring::loop_options(&config.trainer.consumer),
                ..Default::default()
            };
            let s = stop.clone();
            threads.push((
                format!("trainer-{i}"),
                std::thread::Builder::new()
                    .name(format!("trainer-{i}"))
                    .spawn(move || {
                        swimlane_trainer::run_blocking(cfg, deps, &|| s.load(Ordering::Relaxed))
                            .map_err(|e| e.to_string())
                    })?,
            ));
        }

        let vm = swimlane_validator::ValidatorMetrics::register(registry)?;
        let vdeps = swimlane_validator::ValidatorDeps {
            db: db.clone(),
            repo: repo.clone(),
            emitter: emitter.clone(),
            consumer: wiring::consumer(
                config,
                db,
                swimlane_validator::GROUP,
                topics::CANDIDATES,
                &config.validator.consumer,
            )?,
            metrics: vm,
        };
        let vcfg = swimlane_validator::ValidatorConfig {
            policy: config.validator.policy(),
            loop_options: wiring::loop_options(&config.validator.consumer),
        };
        let s = stop.clone();
        threads.push((
            "validator".into(),
            std::thread::Builder::new()
                .name("validator".into())
                .spawn(move || {
                    swimlane_validator::run_blocking(vcfg, vdeps, &|| s.load(Ordering::Relaxed))
                        .map_err(|e| e.to_string())
                })?,
        ));

        if publisher {
            let pm = swimlane_publisher::PublisherMetrics::register(registry)?;
            let pdeps = swimlane_publisher::PublisherDeps {
                db: db.clone(),
                repo,
                emitter,
                consumer: wiring::consumer(
                    config,
                    db,
                    swimlane_publisher::GROUP,
                    topics::VERDICTS,
                    &config.publisher.consumer,
                )?,
                metrics: pm,
            };
            let pcfg = swimlane_publisher::PublisherConfig {
                target_accuracy: config.policy.target_accuracy,
                loop_options: wiring::loop_options(&config.publisher.consumer),
            };
            let s = stop.clone();
            threads.push((
                "publisher".into(),
                std::thread::Builder::new()
                    .name("publisher".into())
                    .spawn(move || {
                        swimlane_publisher::run_stage_blocking(pcfg, pdeps, &|| {
                            s.load(Ordering::Relaxed)
                        })
                        .map_err(|e| e.to_string())
                    })?,
            ));
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
