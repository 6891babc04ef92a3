//! `swimlane`: one command for the demo, development and operations.
//!
//! Each subcommand group lives in its own module; this file only parses arguments.
use clap::{Parser, Subcommand};

mod bench_cmd;
mod model_cmd;

// Training allocates a fresh tensor per op; glibc's allocator turns that into page
// faults (shared/facts.md). mimalloc made training about 5x faster here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "swimlane", version, about = "Per-user micro-model retraining")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train, evaluate and inspect micro models.
    Model {
        #[command(subcommand)]
        command: model_cmd::ModelCommand,
    },
    /// Benchmarks whose numbers the README and the issues quote.
    Bench {
        #[command(subcommand)]
        command: bench_cmd::BenchCommand,
    },
    /// Run the whole pipeline on simulated swimmers (not built yet: see README).
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Model { command } => model_cmd::run(command),
        Command::Bench { command } => bench_cmd::run(command),
        Command::Demo => {
            println!(
                "swimlane demo: the pipeline (ingest -> trainer -> validator -> publisher) is \
                 not built yet; it arrives with issue 4. Today you can run:\n  \
                 swimlane model evaluate --swimmers 20 --seed 7\n  swimlane bench store"
            );
            Ok(())
        }
    }
}
