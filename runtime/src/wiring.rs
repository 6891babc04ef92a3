//! Building a worker process's bus ends and its process scaffolding from the config,
//! so each worker's `main.rs` stays a few lines.
//!
//! Kafka (`kafka://host:port`, feature `kafka`): the emitter writes to the store's
//! outbox, and an outbox relay moves committed entries into Kafka. The relay runs in
//! every process that calls [`spawn_relay`], which [`Process::start`] does (trainer,
//! validator, publisher); only one relay at a time holds the store's relay lease and
//! relays every process's entries (the outbox is one per store), the others stand by.
//! So an ingest process needs no relay of its own while any other worker runs; it may
//! run one too with [`spawn_relay`]. Topics must exist first:
//! `swimlane admin create-topics`.
use std::sync::Arc;

use prometheus::Registry;
use swimlane_bus::embedded::{
    system_now_ms, ConsumerOptions, EmbeddedBus, EmbeddedConsumer, Retention,
};
use swimlane_bus::stage::{run_stage, LoopOptions, Runner, Stage, Stop};
use swimlane_bus::{member_id, Consumer, Emitter};
use swimlane_core::keys::Keys;
use swimlane_store::Db;
use tokio_util::sync::CancellationToken;

use crate::config::{BusLocation, ConsumerConfig};
use crate::{Config, OpsServer, Readiness, RuntimeError, Worker};

/// The emitter for the configured bus.
pub fn emitter(config: &Config) -> Result<Arc<dyn Emitter>, RuntimeError> {
    match config.bus_location()? {
        BusLocation::Embedded => Ok(Arc::new(EmbeddedBus::new(
            Keys::new(&config.deployment),
            config.partitions,
        ))),
        #[cfg(feature = "kafka")]
        BusLocation::Kafka(_) => Ok(Arc::new(swimlane_bus::kafka::KafkaEmitter::new(Keys::new(
            &config.deployment,
        )))),
        #[cfg(not(feature = "kafka"))]
        BusLocation::Kafka(addr) => Err(RuntimeError::BusNotBuilt {
            location: format!("kafka://{addr}"),
        }),
    }
}

/// A running outbox relay; it stops when the token it was spawned with is cancelled
/// (after one last round).
pub struct RelayHandle {
    thread: std::thread::JoinHandle<()>,
}

impl RelayHandle {
    /// Wait for the relay thread to finish (cancel its token first).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Start the outbox relay for the configured bus on its own thread, until `shutdown`
/// is cancelled. `None` on the embedded bus, which needs none (its log is in the
/// store).
pub fn spawn_relay(
    config: &Config,
    db: &Db,
    shutdown: CancellationToken,
) -> Result<Option<RelayHandle>, RuntimeError> {
    match config.bus_location()? {
        BusLocation::Embedded => Ok(None),
        #[cfg(feature = "kafka")]
        BusLocation::Kafka(addr) => {
            use swimlane_bus::kafka::{relay_producer, Relay, RelayOptions};
            let producer = relay_producer(&addr)?;
            let mut relay = Relay::new(
                db.clone(),
                Keys::new(&config.deployment),
                producer,
                RelayOptions {
                    topic_prefix: config.topic_prefix.clone(),
                    ..RelayOptions::default()
                },
            );
            let thread = std::thread::Builder::new()
                .name("outbox-relay".into())
                .spawn(move || relay.run(&|| shutdown.is_cancelled()))
                .map_err(|e| {
                    RuntimeError::Bus(swimlane_bus::BusError::Config(format!(
                        "cannot start the outbox relay thread: {e}"
                    )))
                })?;
            Ok(Some(RelayHandle { thread }))
        }
        #[cfg(not(feature = "kafka"))]
        BusLocation::Kafka(addr) => {
            let _ = (db, shutdown);
            Err(RuntimeError::BusNotBuilt {
                location: format!("kafka://{addr}"),
            })
        }
    }
}

/// Create the bus's topics (`swimlane_core::topics::ALL`, each name prefixed with
/// `config.topic_prefix`) with `config.partitions` partitions each, unless they exist.
/// Returns their Kafka names. Nothing to do on the embedded bus.
pub fn create_topics(config: &Config, replication: i32) -> Result<Vec<String>, RuntimeError> {
    match config.bus_location()? {
        BusLocation::Embedded => Ok(Vec::new()),
        #[cfg(feature = "kafka")]
        BusLocation::Kafka(addr) => {
            let topics: Vec<String> = swimlane_core::topics::ALL
                .iter()
                .map(|t| swimlane_bus::kafka::kafka_name(&config.topic_prefix, t))
                .collect();
            let names: Vec<&str> = topics.iter().map(|t| t.as_str()).collect();
            swimlane_bus::kafka::create_topics(&addr, &names, config.partitions, replication)?;
            Ok(topics)
        }
        #[cfg(not(feature = "kafka"))]
        BusLocation::Kafka(addr) => {
            let _ = replication;
            Err(RuntimeError::BusNotBuilt {
                location: format!("kafka://{addr}"),
            })
        }
    }
}

/// A consumer in `group` on `topic` for the configured bus.
pub fn consumer(
    config: &Config,
    db: &Db,
    group: &str,
    topic: &str,
    c: &ConsumerConfig,
    trimmed: Option<swimlane_bus::stage::CountSink>,
) -> Result<Box<dyn Consumer>, RuntimeError> {
    match config.bus_location()? {
        BusLocation::Embedded => {
            let keys = Keys::new(&config.deployment);
            Ok(Box::new(EmbeddedConsumer::new(
                db.clone(),
                keys.clone(),
                EmbeddedBus::new(keys, config.partitions),
                ConsumerOptions {
                    group: group.into(),
                    topic: topic.into(),
                    member: member_id(group),
                    lease_ttl: c.lease_ttl(),
                    poll_interval: c.poll_interval(),
                    now_ms: system_now_ms(),
                    keep_leases: true,
                    retention: Some(Retention {
                        keep: config.embedded_log_keep,
                        ..Retention::default()
                    }),
                    trimmed,
                },
            )?))
        }
        #[cfg(feature = "kafka")]
        BusLocation::Kafka(addr) => {
            use swimlane_bus::kafka::{KafkaConsumer, KafkaConsumerOptions};
            let mut o = KafkaConsumerOptions::new(&addr, group, topic);
            o.lease_ttl = c.lease_ttl();
            o.session_timeout = c.lease_ttl();
            o.topic_prefix = config.topic_prefix.clone();
            Ok(Box::new(KafkaConsumer::new(
                db.clone(),
                Keys::new(&config.deployment),
                o,
            )?))
        }
        #[cfg(not(feature = "kafka"))]
        BusLocation::Kafka(addr) => {
            let _ = (db, group, topic, c, trimmed);
            Err(RuntimeError::BusNotBuilt {
                location: format!("kafka://{addr}"),
            })
        }
    }
}

/// What a stage's own code works with: the store and its records, the configured
/// bus's emitter, and the stage's metrics.
pub struct StageEnv<M> {
    pub db: Db,
    pub repo: swimlane_state::Repo,
    pub emitter: Arc<dyn Emitter>,
    pub metrics: M,
}

/// What a consuming stage (trainer, validator, publisher) runs with: its
/// [`StageEnv`], a consumer of the stage's topic in its group, and the metrics its
/// runner keeps.
pub struct StageDeps<M> {
    pub env: StageEnv<M>,
    pub consumer: Box<dyn Consumer>,
    pub runner_metrics: StageMetrics,
}

impl<M> StageDeps<M> {
    /// The dependencies of `worker`'s stage for `config` over an open store: the
    /// configured bus's emitter, and a consumer in the worker's group on its topic
    /// ([`Worker::input`]) with the worker's `[<worker>.consumer]` settings.
    pub fn for_worker(
        config: &Config,
        db: &Db,
        worker: Worker,
        (runner_metrics, metrics): (StageMetrics, M),
    ) -> Result<Self, RuntimeError> {
        let not_a_stage = RuntimeError::NotAStage {
            worker: worker.name(),
        };
        let settings = match worker {
            Worker::Trainer => &config.trainer.consumer,
            Worker::Validator => &config.validator.consumer,
            Worker::Publisher => &config.publisher.consumer,
            Worker::Ingest => return Err(not_a_stage),
        };
        let (group, topic) = worker.input().ok_or(not_a_stage)?;
        let counter = runner_metrics.log_trimmed.clone();
        let trimmed: swimlane_bus::stage::CountSink = Arc::new(move |n| counter.inc_by(n));
        Ok(StageDeps {
            env: StageEnv {
                db: db.clone(),
                repo: swimlane_state::Repo::new(Keys::new(&config.deployment)),
                emitter: emitter(config)?,
                metrics,
            },
            consumer: consumer(config, db, group, topic, settings, Some(trimmed))?,
            runner_metrics,
        })
    }
}

/// Run a stage's blocking loop (`work`, given the stop flag) on tokio's blocking pool
/// until `shutdown` is cancelled: every stage worker's `run`.
pub async fn run_until<E: From<RuntimeError> + Send + 'static>(
    work: impl FnOnce(Stop<'_>) -> Result<(), E> + Send + 'static,
    shutdown: CancellationToken,
) -> Result<(), E> {
    tokio::task::spawn_blocking(move || work(&|| shutdown.is_cancelled()))
        .await
        .map_err(|e| E::from(RuntimeError::Join(e.to_string())))?
}

/// What every consuming stage exports, kept by its [`Runner`]:
/// `swimlane_<worker>_bus_lag_records` and `swimlane_<worker>_dead_letters_total`.
#[derive(Clone)]
pub struct StageMetrics {
    /// Records waiting on the partitions this member owns.
    pub bus_lag: prometheus::IntGauge,
    /// Records the stage could not process, sent to the dead-letter topic.
    pub dead_letters: prometheus::IntCounter,
    /// Entries of the stage's input cleared from the embedded log once every group
    /// had passed them (`embedded_log_keep`).
    pub log_trimmed: prometheus::IntCounter,
}

impl StageMetrics {
    /// Create `worker`'s and register them on `registry` (errors if registered twice).
    pub fn register(registry: &Registry, worker: Worker) -> prometheus::Result<Self> {
        let (r, w) = (crate::Registrar(registry), worker.name());
        Ok(StageMetrics {
            bus_lag: r.gauge(
                &format!("swimlane_{w}_bus_lag_records"),
                "Records waiting on the partitions this member owns",
            )?,
            dead_letters: r.counter(
                &format!("swimlane_{w}_dead_letters_total"),
                &format!("Records the {w} could not process, sent to the dead-letter topic"),
            )?,
            log_trimmed: r.counter(
                &format!("swimlane_{w}_log_trimmed_total"),
                &format!("Entries of the {w}'s input cleared from the embedded log"),
            )?,
        })
    }
}

impl<M> StageDeps<M> {
    /// Run the stage `build` makes from these dependencies in a [`Runner`] over the
    /// consumer until `stop()`; then leave the group. The runner reports the lag and
    /// counts the dead letters in the stage's [`StageMetrics`].
    pub fn run<S: Stage>(
        self,
        opts: LoopOptions,
        stop: Stop<'_>,
        build: impl FnOnce(StageEnv<M>) -> S,
    ) -> Result<(), swimlane_bus::BusError> {
        let StageDeps {
            env,
            mut consumer,
            runner_metrics: m,
        } = self;
        let opts = with_lag_gauge(opts, &m.bus_lag);
        let (db, keys, emitter) = (env.db.clone(), env.repo.keys.clone(), env.emitter.clone());
        let mut runner = Runner::new(build(env), db, keys, emitter)
            .counting_dead_letters(Arc::new(move |n| m.dead_letters.inc_by(n)));
        run_stage(consumer.as_mut(), &mut runner, &opts, stop)
    }
}

/// A consuming worker's whole process (the trainer's, the validator's): store, metrics
/// and ops server, signal handling; not ready until the blobs `needs` are installed
/// (`swimlane admin init`), and only then a consumer in the worker's group
/// ([`StageDeps::for_worker`]; a member that joined and waited without polling would
/// be dropped from a Kafka group); then `run` on a blocking thread until
/// SIGTERM/SIGINT.
pub async fn run_stage_process<M: Send + 'static>(
    config: &Config,
    worker: Worker,
    needs: &[&str],
    metrics: impl FnOnce(&Registry) -> prometheus::Result<M>,
    run: impl FnOnce(StageDeps<M>, Stop<'_>) -> Result<(), RuntimeError> + Send + 'static,
) -> Result<(), RuntimeError> {
    let p = Process::start(config, worker).await?;
    let repo = swimlane_state::Repo::new(Keys::new(&config.deployment));
    if !p
        .wait_for_prerequisites(|| repo.not_installed(&p.db, needs))
        .await
    {
        return Ok(());
    }
    let metrics = (
        StageMetrics::register(&p.registry, worker)?,
        metrics(&p.registry)?,
    );
    let deps = StageDeps::for_worker(config, &p.db, worker, metrics)?;
    run_until(move |stop| run(deps, stop), p.shutdown.clone()).await
}

/// `opts` reporting the consumer's lag to `gauge`, unless they report it elsewhere.
pub fn with_lag_gauge(mut opts: LoopOptions, gauge: &prometheus::IntGauge) -> LoopOptions {
    if opts.lag.is_none() {
        let gauge = gauge.clone();
        opts.lag = Some(Arc::new(move |l| gauge.set(l as i64)));
    }
    opts
}

/// The stage loop's options from a consumer config.
pub fn loop_options(c: &ConsumerConfig) -> LoopOptions {
    LoopOptions {
        max_records: c.max_batch as usize,
        ..Default::default()
    }
}

/// What every worker process sets up before its work: the store, the metrics registry
/// (with store metrics), the root shutdown token (wired to SIGTERM/SIGINT) and the ops
/// server, not yet ready.
pub struct Process {
    pub db: Db,
    pub registry: Registry,
    pub shutdown: CancellationToken,
    pub ready: Readiness,
    pub ops: OpsServer,
    /// The outbox relay (Kafka bus only); stops with `shutdown`.
    pub relay: Option<RelayHandle>,
}

impl Process {
    /// Stay not ready until `missing()` says nothing is missing, saying in `/readyz`
    /// (and once in the log) what is: the worker starts, but takes no work until, say,
    /// `swimlane admin init` has installed the base model. Checks once a second; false
    /// if shutdown comes first.
    pub async fn wait_for_prerequisites<E: std::fmt::Display>(
        &self,
        missing: impl Fn() -> Result<Option<String>, E>,
    ) -> bool {
        let mut said: Option<String> = None;
        loop {
            let what = match missing() {
                Ok(None) => {
                    if said.is_some() {
                        tracing::info!("everything needed is there; ready");
                    }
                    self.ready.set(true);
                    return true;
                }
                Ok(Some(what)) => what,
                Err(e) => format!("the store ({e})"),
            };
            if said.as_deref() != Some(what.as_str()) {
                tracing::warn!(waiting_for = %what, "not ready");
                said = Some(what.clone());
            }
            self.ready.wait_for(what);
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    /// Open the store, register store metrics, install signal handling and start the
    /// ops server on the worker's `metrics_listen`; on the Kafka bus, start the outbox
    /// relay ([`spawn_relay`]).
    pub async fn start(config: &Config, worker: Worker) -> Result<Process, RuntimeError> {
        let db = crate::open_store(config)?;
        let registry = crate::new_registry();
        crate::register_store_metrics(&registry, worker.name(), &db)?;
        let shutdown = CancellationToken::new();
        crate::shutdown_signal(shutdown.clone());
        let ready = Readiness::new();
        let ops = crate::serve_ops(
            config.metrics_listen(worker),
            registry.clone(),
            ready.clone(),
            shutdown.clone(),
        )
        .await?;
        let relay = spawn_relay(config, &db, shutdown.clone())?;
        Ok(Process {
            db,
            registry,
            shutdown,
            ready,
            ops,
            relay,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka_config() -> Config {
        Config {
            bus: "kafka://127.0.0.1:1".into(),
            ..Config::default()
        }
    }

    #[cfg(not(feature = "kafka"))]
    #[test]
    fn kafka_without_the_feature_says_how_to_build_it() {
        let db = Db::new(swimlane_store::embedded::EmbeddedBackend::open_temp().unwrap());
        let e = emitter(&kafka_config()).err().unwrap().to_string();
        assert!(e.contains("--features swimlane-runtime/kafka"), "{e}");
        let r = spawn_relay(&kafka_config(), &db, CancellationToken::new());
        assert!(matches!(r, Err(RuntimeError::BusNotBuilt { .. })));
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn kafka_builds_an_outbox_emitter_and_a_relay_that_stops_with_shutdown() {
        let db = Db::new(swimlane_store::embedded::EmbeddedBackend::open_temp().unwrap());
        let config = kafka_config();
        let e = emitter(&config).unwrap();
        let keys = Keys::new(&config.deployment);
        db.transact(|tx| e.emit_raw(tx, swimlane_bus::Raw::new("t", "u", b"x")))
            .unwrap();
        let waiting = db
            .transact(|tx| swimlane_bus::kafka::read_outbox(tx, &keys, 10))
            .unwrap();
        assert_eq!(waiting.len(), 1, "the event waits in the outbox");
        let token = CancellationToken::new();
        let relay = spawn_relay(&config, &db, token.clone()).unwrap().unwrap();
        token.cancel();
        relay.join();
    }

    #[test]
    fn the_embedded_bus_needs_no_relay() {
        let db = Db::new(swimlane_store::embedded::EmbeddedBackend::open_temp().unwrap());
        assert!(
            spawn_relay(&Config::default(), &db, CancellationToken::new())
                .unwrap()
                .is_none()
        );
    }
}
