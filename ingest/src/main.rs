//! The ingest worker: parse flags, load config, open the store, serve until signalled.
use clap::Parser;
use swimlane_runtime::{Args, Config, Worker};

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
    swimlane_ingest::run_process(config).await?;
    Ok(())
}
