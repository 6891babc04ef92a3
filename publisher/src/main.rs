//! The publisher worker: parse flags, load config, serve and publish until signalled.
use clap::Parser;
use swimlane_runtime::{Args, Config, Worker};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Versions accepted candidates and serves models to devices (consumer group
/// `publishers`).
#[derive(Parser)]
#[command(name = "swimlane-publisher", version)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli.args, Some(Worker::Publisher))?;
    swimlane_runtime::init_tracing(config.log_json);
    swimlane_publisher::run(config).await?;
    Ok(())
}
