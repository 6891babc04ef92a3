//! The validator worker: parse flags, load config, run until signalled.
use clap::Parser;
use swimlane_runtime::{Args, Config, Worker};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Scores candidates on held-out data and the guard set (consumer group `validators`).
#[derive(Parser)]
#[command(name = "swimlane-validator", version)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli.args, Some(Worker::Validator))?;
    swimlane_runtime::init_tracing(config.log_json);
    swimlane_validator::run_process(config).await?;
    Ok(())
}
