//! Building a worker process's bus ends and its process scaffolding from the config,
//! so each worker's `main.rs` stays a few lines.
use std::sync::Arc;

use prometheus::Registry;
use swimlane_bus::embedded::{system_now_ms, ConsumerOptions, EmbeddedBus, EmbeddedConsumer};
use swimlane_bus::stage::LoopOptions;
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
        BusLocation::Kafka(addr) => Err(RuntimeError::BusNotBuilt {
            location: format!("kafka://{addr}"),
        }),
    }
}

/// A consumer in `group` on `topic` for the configured bus.
pub fn consumer(
    config: &Config,
    db: &Db,
    group: &str,
    topic: &str,
    c: &ConsumerConfig,
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
                },
            )))
        }
        BusLocation::Kafka(addr) => Err(RuntimeError::BusNotBuilt {
            location: format!("kafka://{addr}"),
        }),
    }
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
}

impl Process {
    /// Open the store, register store metrics, install signal handling and start the
    /// ops server on the worker's `metrics_listen`.
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
        Ok(Process {
            db,
            registry,
            shutdown,
            ready,
            ops,
        })
    }
}
