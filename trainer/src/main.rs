//! The trainer worker: parse flags, load config, run until signalled.
use clap::Parser;
use swimlane_runtime::{Args, Config, Worker};

// Training allocates a tensor per op; mimalloc avoids glibc's page-fault storm (5x).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fine-tunes candidates from staged corrections (consumer group `trainers`).
#[derive(Parser)]
#[command(name = "swimlane-trainer", version)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli.args, Some(Worker::Trainer))?;
    // Before the runtime starts its threads.
    swimlane_runtime::apply_training_threads(&config);
    swimlane_runtime::init_tracing(config.log_json);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(swimlane_trainer::run_process(config))?;
    Ok(())
}
