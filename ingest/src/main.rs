//! The ingest worker: parse flags, load config, open the store, serve until signalled.
use std::sync::Arc;

use clap::Parser;
use swimlane_bus::embedded::EmbeddedBus;
use swimlane_core::keys::Keys;
use swimlane_runtime::config::BusLocation;
use swimlane_runtime::{Args, CancellationToken, Config, SystemWallClock, Worker};

/// swimlane's device-facing upload API.
#[derive(Parser)]
#[command(name = "swimlane-ingest", version)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli.args, Some(Worker::Ingest))?;
    swimlane_runtime::init_tracing(config.log_json);
    let db = swimlane_runtime::open_store(&config)?;
    let emitter = match config.bus_location()? {
        BusLocation::Embedded => Arc::new(EmbeddedBus::new(
            Keys::new(&config.deployment),
            config.partitions,
        )),
        BusLocation::Kafka(_) => {
            anyhow::bail!("bus: the Kafka bus is not built yet; use `embedded`")
        }
    };
    let shutdown = CancellationToken::new();
    swimlane_runtime::shutdown_signal(shutdown.clone());
    let deps = swimlane_ingest::IngestDeps {
        db,
        emitter,
        registry: swimlane_runtime::new_registry(),
        clock: Arc::new(SystemWallClock),
    };
    swimlane_ingest::run(config, deps, shutdown).await?;
    Ok(())
}
