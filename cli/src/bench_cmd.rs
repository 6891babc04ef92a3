//! `swimlane bench ...`: benchmarks whose numbers the README and the issues quote.
use std::path::PathBuf;

use clap::{Args, Subcommand};
use swimlane_store::bench::{self, StoreBenchOptions};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Durable commits per second and range-read throughput of the embedded store.
    Store(StoreArgs),
    /// Pipeline throughput (batches published per minute) and the pipeline's own
    /// overhead per batch (upload to publish, minus training and validation time), with
    /// the workers as separate processes, once per trainer count.
    Pipeline(PipelineArgs),
    /// Many devices downloading their models at once (full downloads and 304s):
    /// latency p50/p99, errors and requests per second, against the publisher of a
    /// fleet that has just published the users' models.
    Downloads(DownloadsArgs),
}

#[derive(Args, Debug)]
pub struct DownloadsArgs {
    /// Swimmers whose models are published first (devices share them).
    #[arg(long, default_value_t = 20)]
    users: usize,
    /// Concurrent devices, each on its own connection.
    #[arg(long, default_value_t = 2000)]
    devices: usize,
    /// How long the devices download.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// `onnx` or `safetensors`.
    #[arg(long, default_value = "onnx")]
    format: String,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// `embedded` or `kafka://host:port` (Kafka needs a build with `--features kafka`).
    #[arg(long, default_value = "embedded")]
    bus: String,
    /// Trainer processes per run, comma-separated: one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    trainers: Vec<usize>,
    /// Simulated swimmers, one batch of corrections each, uploaded at once.
    #[arg(long, default_value_t = 48)]
    users: usize,
    /// More swimmers, one batch each, uploaded one at a time (the overhead without
    /// queueing).
    #[arg(long, default_value_t = 10)]
    paced: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Partitions per topic.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Most corrections per batch (90-1000; the default upload limit, 8 MB of JSON,
    /// holds about 700): more makes each training longer.
    #[arg(long, default_value_t = 500)]
    corrections: usize,
    /// Threads per trainer process (`trainer.threads`; 0: one per core).
    #[arg(long, default_value_t = 1)]
    trainer_threads: usize,
    /// Directory for the scratch stores (default: the system temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Measure the training stage alone instead: every batch staged while the trainers
    /// are paused, then the time until every candidate is trained, for each entry of
    /// --trainers (no validator, no publisher).
    #[arg(long)]
    training_alone: bool,
    /// A Python with ray, torch and safetensors (bench/vs_ray.sh makes one): after the
    /// runs, the Ray + PyTorch peer does the same job on the same users, and the report
    /// gives both users retrained per core-minute and the ratio.
    #[arg(long)]
    peer: Option<PathBuf>,
    /// How the uploads carry their windows: `binary` (raw little-endian f32s after the
    /// document), `f32le` (base64 of them) or `numbers` (JSON arrays);
    /// docs/batch-format.md.
    #[arg(long, value_enum, default_value = "binary")]
    frames: swimlane_cli::upload::Frames,
    /// Earlier batches every swimmer uploads (each round settled) before the measured
    /// one, so the measured uploads land on a store that has run for a while: the
    /// user's retained windows are trained again and retention retires old batches.
    #[arg(long, default_value_t = 0)]
    history: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct StoreArgs {
    /// Directory for the scratch store (a temporary subdirectory is created and removed);
    /// default: the system temporary directory. Put it on the disk you care about.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds per timed phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Megabytes (10^6 bytes) of 1-10 kB values to fill before the range scans.
    #[arg(long, default_value_t = 64)]
    fill_mb: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Store(args) => store(args),
        BenchCommand::Pipeline(args) => pipeline(args),
        BenchCommand::Downloads(args) => downloads(args),
    }
}

fn downloads(args: DownloadsArgs) -> anyhow::Result<()> {
    let opts = swimlane_cli::bench_pipeline::PipelineBenchOptions {
        bus: "embedded".into(),
        trainers: vec![1],
        users: args.users,
        paced: 0,
        seed: args.seed,
        dir: None,
        exe: std::env::current_exe()?,
        partitions: 8,
        trainer_threads: 1,
        corrections: 250,
        peer: None,
        frames: swimlane_cli::upload::Frames::Binary,
        history: 0,
    };
    let r =
        swimlane_cli::bench_pipeline::downloads(&opts, args.devices, args.seconds, &args.format)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

fn pipeline(args: PipelineArgs) -> anyhow::Result<()> {
    let opts = swimlane_cli::bench_pipeline::PipelineBenchOptions {
        bus: args.bus,
        trainers: args.trainers,
        users: args.users,
        paced: args.paced,
        seed: args.seed,
        dir: args.dir,
        exe: std::env::current_exe()?,
        partitions: args.partitions,
        trainer_threads: args.trainer_threads,
        corrections: args.corrections,
        peer: args.peer,
        frames: args.frames,
        history: args.history,
    };
    if args.training_alone {
        let r = swimlane_cli::bench_pipeline::training_alone(&opts)?;
        if args.json {
            println!("{r}");
        } else {
            println!(
                "training stage alone: {} users, {} cores",
                r["users"], r["cores"]
            );
            for run in r["runs"].as_array().into_iter().flatten() {
                println!(
                    "  {} trainer process(es): {} runs/min ({} s; {} s training each)",
                    run["trainers"], run["runs_per_min"], run["seconds"], run["train_seconds_mean"]
                );
            }
            println!("  two trainers over one: {}x", r["two_over_one"]);
        }
        return Ok(());
    }
    let r = swimlane_cli::bench_pipeline::run(&opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        swimlane_cli::bench_pipeline::print_table(&r);
    }
    Ok(())
}

fn store(args: StoreArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be positive");
    let opts = StoreBenchOptions {
        dir: args.dir,
        seconds: args.seconds,
        fill_bytes: args.fill_mb * 1_000_000,
    };
    let r = bench::run_embedded(&opts)?;
    if args.json {
        let j = serde_json::json!({
            "backend": r.backend,
            "dir": r.dir,
            "seconds_per_phase": args.seconds,
            "disk_fsyncs_per_sec": r.disk_fsyncs_per_sec.round(),
            "commits_per_sec_1_thread": r.commits_per_sec_1_thread.round(),
            "commit_p50_us": r.commit_p50_us.round(),
            "commit_p99_us": r.commit_p99_us.round(),
            "commits_per_sec_2_threads": r.commits_per_sec_2_threads.round(),
            "concurrent_writers": bench::CONCURRENT_WRITERS,
            "commits_per_sec_concurrent": r.commits_per_sec_concurrent.round(),
            "concurrent_commits_per_fsync_rate": (r.commits_per_sec_concurrent / r.disk_fsyncs_per_sec * 100.0).round() / 100.0,
            "fill_bytes": r.fill_bytes,
            "fill_keys": r.fill_keys,
            "fill_mb_per_sec": (r.fill_mb_per_sec * 10.0).round() / 10.0,
            "range_read_mb_per_sec": (r.range_read_mb_per_sec * 10.0).round() / 10.0,
            "range_scans": r.range_scans,
        });
        println!("{j}");
        return Ok(());
    }
    println!("swimlane bench store: backend {}, in {}", r.backend, r.dir);
    println!("{:<46} {:>12}", "measure", "value");
    let rows = [
        (
            "disk: 4 KiB append + fdatasync /s",
            format!("{:.0}", r.disk_fsyncs_per_sec),
        ),
        (
            "durable commits /s, 1 thread",
            format!("{:.0}", r.commits_per_sec_1_thread),
        ),
        (
            "  commit latency p50 / p99 (us)",
            format!("{:.0} / {:.0}", r.commit_p50_us, r.commit_p99_us),
        ),
        (
            "durable commits /s, 2 threads",
            format!("{:.0}", r.commits_per_sec_2_threads),
        ),
        (
            "durable commits /s, 16 threads (group commit)",
            format!(
                "{:.0} ({:.1}x fsync)",
                r.commits_per_sec_concurrent,
                r.commits_per_sec_concurrent / r.disk_fsyncs_per_sec
            ),
        ),
        (
            "fill (4 MB transactions) MB/s",
            format!("{:.1}", r.fill_mb_per_sec),
        ),
        (
            "range read MB/s (1,000 keys per transaction)",
            format!("{:.1}", r.range_read_mb_per_sec),
        ),
    ];
    for (k, v) in rows {
        println!("{k:<46} {v:>12}");
    }
    println!(
        "filled {} keys, {:.1} MB of 1-10 kB values; {} full scans; {} s per phase",
        r.fill_keys,
        r.fill_bytes as f64 / 1e6,
        r.range_scans,
        args.seconds
    );
    Ok(())
}
