//! `swimlane`: one command for the demo, development and operations.
//!
//! Each subcommand group lives in its own module; this file only parses arguments.
use clap::{Parser, Subcommand};

mod admin_cmd;
mod bench_cmd;
mod model_cmd;

use swimlane_runtime::{Args, Config, Worker};

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
    /// A seeded chaos soak: worker processes on a fresh store, devices uploading
    /// through the API, workers SIGKILLed (and, with --tansu, the Kafka broker
    /// restarted) at random moments; then an audit of the store and the APIs. Prints
    /// one JSON report; exits non-zero on any violation.
    Chaos(ChaosArgs),
    /// Run the whole fleet in this process on a fresh embedded store and drive it with
    /// simulated swimmers through the HTTP APIs; print a table per swimmer.
    Demo {
        #[command(flatten)]
        options: swimlane_cli::demo::DemoOptions,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Real swimmers' recordings through the real pipeline (ingest's HTTP API, the
    /// trainers, the validator's gate, the publisher), fold by fold, against a no-gate
    /// baseline; prints a table per swimmer (src/replay.rs says how).
    Replay {
        #[command(flatten)]
        options: swimlane_cli::replay::ReplayOptions,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Recorded sensor data.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// All four workers in this process, on the configured store and bus (default: an
    /// embedded store in ./swimlane-data); installs the base model first if needed.
    Dev {
        #[command(flatten)]
        args: Args,
    },
    /// Run one worker (the same code as its own binary, `swimlane-<worker>`).
    Worker {
        #[arg(value_enum)]
        worker: WorkerName,
        #[command(flatten)]
        args: Args,
    },
    /// Set up a deployment; manage tokens.
    Admin {
        #[command(subcommand)]
        command: admin_cmd::AdminCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Cut recordings (CSV or CSV.gz, docs/recordings.md) into labelled windows of a
    /// spec and write one upload body (docs/batch-format.md) per recording into --out.
    Import {
        /// A built-in spec name or a JSON spec file.
        #[arg(long, default_value = "smartwatch")]
        spec: String,
        /// Channel-to-header overrides, `CHANNEL=HEADER,...` (default: the channel's
        /// own name; for the smartwatch spec the swim-imu headers ACC_0.., GYRO_0..,
        /// MAG_0..).
        #[arg(long)]
        columns: Option<String>,
        #[arg(long, default_value = "label")]
        label_column: String,
        /// Frames between window starts (default: half a window).
        #[arg(long)]
        stride: Option<usize>,
        #[arg(long)]
        out: std::path::PathBuf,
        /// Recording files, or folders of them.
        #[arg(required = true)]
        inputs: Vec<std::path::PathBuf>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum WorkerName {
    Ingest,
    Trainer,
    Validator,
    Publisher,
}

#[derive(clap::Args, Debug)]
struct ChaosArgs {
    /// `embedded`, or `kafka://host:port` (a broker the soak does not restart).
    #[arg(long, default_value = "embedded")]
    bus: String,
    /// Run over Kafka on a tansu broker started (and restarted) by the soak, from
    /// this binary (e.g. ~/.cache/swimlane-tools/bin/tansu).
    #[arg(long, value_name = "TANSU_BINARY")]
    tansu: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 50)]
    users: usize,
    /// Batches uploaded in all (users take turns, night by night).
    #[arg(long, default_value_t = 1000)]
    batches: usize,
    /// SIGKILLs, spread evenly over the worker kinds in a shuffled order.
    #[arg(long, default_value_t = 50)]
    kills: usize,
    /// Broker restarts (needs --tansu).
    #[arg(long, default_value_t = 0)]
    broker_restarts: usize,
    #[arg(long, default_value_t = 0.15)]
    poison_rate: f64,
    /// Seed of the data and of the fault schedule (default: drawn from the clock and
    /// printed).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 2)]
    trainers: usize,
    /// Directory for the scratch store (default: the system temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Keep the scratch directory (store and worker logs); kept anyway on violations.
    #[arg(long)]
    keep: bool,
}

fn chaos(a: ChaosArgs) -> anyhow::Result<()> {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000)
            .unwrap_or(1)
    });
    let opts = swimlane_cli::chaos::ChaosOptions {
        exe: std::env::current_exe()?,
        bus: a.bus,
        tansu: a.tansu,
        users: a.users,
        batches: a.batches,
        kills: a.kills,
        broker_restarts: a.broker_restarts,
        poison_rate: a.poison_rate,
        seed,
        trainers: a.trainers,
        dir: a.dir,
        keep: a.keep,
    };
    let r = swimlane_cli::chaos::run(&opts)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    anyhow::ensure!(
        r.violations == 0 && r.lost == 0 && r.duplicated == 0,
        "chaos seed {seed}: {} violations ({} lost, {} duplicated); store and logs kept in {}",
        r.violations,
        r.lost,
        r.duplicated,
        r.kept_dir.as_deref().unwrap_or("?")
    );
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn run_worker(w: WorkerName, config: Config) -> anyhow::Result<()> {
    match w {
        WorkerName::Ingest => swimlane_ingest::run_process(config).await?,
        WorkerName::Trainer => swimlane_trainer::run_process(config).await?,
        WorkerName::Validator => swimlane_validator::run_process(config).await?,
        WorkerName::Publisher => swimlane_publisher::run_process(config).await?,
    }
    Ok(())
}

/// For the commands that drive an in-process fleet and print their own progress (demo,
/// replay): the workers log warnings only, unless SWIMLANE_LOG or RUST_LOG asks for more.
fn quiet_workers() {
    if std::env::var_os("SWIMLANE_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("SWIMLANE_LOG", "warn");
    }
    swimlane_runtime::init_tracing(swimlane_runtime::LogFormat::Text);
}

/// A report as one pretty JSON object (`--json`) or as its table.
fn print_report<R: serde::Serialize>(report: &R, json: bool, table: fn(&R)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        table(report);
    }
    Ok(())
}

fn data_cmd(command: DataCommand) -> anyhow::Result<()> {
    use swimlane_cli::recording::{read_recording, recording_files, ImportOptions};
    let DataCommand::Import {
        spec,
        columns,
        label_column,
        stride,
        out,
        inputs,
    } = command;
    let spec = swimlane_runtime::config::resolve_spec(&spec)?;
    let mut opts = ImportOptions::for_spec(&spec);
    if let Some(c) = columns {
        opts.columns = ImportOptions::parse_columns(&c)?;
    }
    opts.label_column = label_column;
    if let Some(s) = stride {
        opts.stride = s;
    }
    let mut files = Vec::new();
    for i in inputs {
        if i.is_dir() {
            files.extend(recording_files(&i)?);
        } else {
            files.push(i);
        }
    }
    std::fs::create_dir_all(&out)?;
    let (mut windows, mut straddling) = (0, 0);
    for f in &files {
        let r = read_recording(f, &spec, &opts)?;
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("recording")
            .split('.')
            .next()
            .unwrap_or("recording")
            .to_string();
        let samples: Vec<_> = r.windows.iter().map(|w| w.sample.clone()).collect();
        windows += samples.len();
        straddling += r.straddling;
        if samples.is_empty() {
            continue;
        }
        let body = swimlane_cli::upload::upload_json_with(&spec, &name, &samples, None);
        std::fs::write(out.join(format!("{name}.json")), serde_json::to_vec(&body)?)?;
    }
    println!(
        "{}",
        serde_json::json!({"recordings": files.len(), "windows": windows, "straddling_dropped": straddling, "spec": spec.name, "out": out})
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Before anything allocates much; the workers it starts keep it (their memory
    // profile, runtime::set_memory_profile).
    swimlane_runtime::set_memory_profile();
    let cli = Cli::parse();
    match cli.command {
        Command::Model { command } => model_cmd::run(command),
        Command::Bench { command } => bench_cmd::run(command),
        Command::Chaos(a) => chaos(a),
        Command::Demo { options, json } => {
            quiet_workers();
            let report = runtime()?.block_on(swimlane_cli::demo::run(options))?;
            print_report(&report, json, swimlane_cli::demo::print_table)
        }
        Command::Replay { options, json } => {
            quiet_workers();
            anyhow::ensure!(
                swimlane_cli::replay::data_present(&options.data),
                "{}: no swim-imu data folder (a README.md and one folder per swimmer); the recordings are not shipped with swimlane",
                options.data.display()
            );
            let report = runtime()?.block_on(swimlane_cli::replay::run(options))?;
            print_report(&report, json, swimlane_cli::replay::print_table)
        }
        Command::Data { command } => data_cmd(command),
        Command::Dev { args } => {
            let config = Config::load(&args, None)?;
            // One process runs every stage: the trainer's setting.
            swimlane_runtime::apply_model_threads(config.trainer.threads);
            swimlane_runtime::init_tracing(config.log_format);
            let db = swimlane_runtime::open_store(&config)?;
            let installed = swimlane_cli::init::install_for_spec(
                &db,
                &config.deployment,
                &config.model_spec()?,
                7,
                None,
            )?;
            if !installed.already_present {
                tracing::info!("installed the base model and guard set");
            }
            drop(db);
            // Through the log, so that with `log_format = "json"` every line is JSON.
            tracing::info!(
                "swimlane dev: ingest on http://{}, models on http://{}; create a device token with `swimlane admin token create --user NAME`",
                config.ingest.listen, config.publisher.listen
            );
            runtime()?.block_on(async move {
                let r = tokio::try_join!(
                    run_worker(WorkerName::Ingest, config.clone()),
                    run_worker(WorkerName::Trainer, config.clone()),
                    run_worker(WorkerName::Validator, config.clone()),
                    run_worker(WorkerName::Publisher, config.clone()),
                );
                r.map(|_| ())
            })
        }
        Command::Worker { worker, args } => {
            let w = match worker {
                WorkerName::Ingest => Worker::Ingest,
                WorkerName::Trainer => Worker::Trainer,
                WorkerName::Validator => Worker::Validator,
                WorkerName::Publisher => Worker::Publisher,
            };
            let config = Config::load(&args, Some(w))?;
            // Before the runtime starts its threads.
            swimlane_runtime::apply_model_threads(swimlane_runtime::model_threads(&config, w));
            swimlane_runtime::init_tracing(config.log_format);
            runtime()?.block_on(run_worker(worker, config))
        }
        Command::Admin { command } => admin_cmd::run(command),
    }
}
