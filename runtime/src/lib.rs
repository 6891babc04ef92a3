//! swimlane-runtime: what every worker process needs, so that worker binaries stay a
//! few lines long (parse [`config::Args`], [`Config::load`], [`telemetry::init_tracing`],
//! [`store::open_store`], then the worker's `run(config, deps, shutdown)` under
//! [`shutdown::shutdown_signal`]).
//!
//! - [`config`]: the one typed [`Config`], loaded defaults → TOML file → `SWIMLANE_*`
//!   environment → flags, then validated; errors name the key.
//! - [`store`]: open the configured store (embedded, or FoundationDB with the `fdb`
//!   feature).
//! - [`telemetry`]: tracing set-up, the metrics registry, store metrics.
//! - [`ops`]: the `/metrics`, `/healthz`, `/readyz` server.
//! - [`shutdown`]: one root cancellation token; the first SIGTERM/SIGINT drains, the
//!   second exits at once.
//! - the injected wall clock, re-exported from `swimlane_core::clock`.

pub mod config;
pub mod http;
pub mod ops;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod wiring;

pub use config::{Args, Config, ConfigError, LogFormat, Worker};
pub use ops::{serve_ops, OpsServer, Readiness};
pub use shutdown::shutdown_signal;
pub use store::open_store;
pub use swimlane_core::clock::{system_now_ms, ManualWallClock, NowMs, WallClock};
pub use telemetry::{init_tracing, new_registry, register_store_metrics, Registrar};
pub use tokio_util::sync::CancellationToken;

use std::net::SocketAddr;

/// CPU seconds this process has used so far, every thread counted (user and system,
/// `CLOCK_PROCESS_CPUTIME_ID`, nanosecond resolution); 0 where the clock is missing.
/// Stages take the difference around their model work (a trainer's run, a validator's
/// scoring) and record it beside the wall time, so that a benchmark can tell the CPU
/// spent training and scoring from the rest of a fleet's, whatever else competes for
/// the cores.
pub fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call writes only into it.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Transparent huge pages off for this process and the processes it starts
/// (`prctl(PR_SET_THP_DISABLE)`, which `fork` and `execve` keep), unless
/// `MIMALLOC_ALLOW_THP` is set (an operator's explicit choice wins; mimalloc reads it).
///
/// Why: mimalloc asks for huge pages, and its arenas are 2 MiB-aligned, so the first
/// touch of a fresh or purged range makes the kernel zero a whole 2 MiB page. Ingest
/// allocates about 2 MB of fresh buffers an upload (the body, the decoded windows, the
/// encoded chunks): its profile (`perf record -g`, a 300-user burst) had 18% of its
/// samples in `clear_page_erms` under `do_huge_pmd_anonymous_page`. Off, ingest's CPU
/// for that burst fell from 1.8-2.3 s to 1.34-1.36 s (3 alternating pairs,
/// bench/README.md) and training was no slower. Returns whether they are off now.
pub fn disable_transparent_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory
            // of ours.
            unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        }
        // SAFETY: as above; PR_GET_THP_DISABLE returns the flag.
        unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// glibc's `malloc` keeps freed memory at the top of its heaps instead of returning it
/// to the kernel at once (`M_TRIM_THRESHOLD` 64 MiB, `M_TOP_PAD` 16 MiB), unless
/// `MALLOC_TRIM_THRESHOLD_` is set (an operator's explicit choice wins).
///
/// Why: SQLite allocates its page cache with the C library's `malloc`, not with
/// mimalloc (Rust's allocator here). Its cache is emptied and refilled whenever another
/// process has committed, and with glibc's default threshold the heap top went back to
/// the kernel and was faulted in, zeroed, again: `clear_page_erms` under `sysmalloc`
/// was 3% of ingest's samples and 1.5-2% of the validator's and the publisher's
/// (bench/README.md). What is kept is bounded by the page caches' size (2 MB a
/// connection). Returns whether the settings were applied.
pub fn keep_malloc_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some() {
            return false;
        }
        // SAFETY: mallopt takes two integers and changes only malloc's own tunables.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20) == 1
                && libc::mallopt(libc::M_TOP_PAD, 16 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// This process's memory profile, set before anything allocates much: transparent huge
/// pages off ([`disable_transparent_huge_pages`]) and glibc's heap kept
/// ([`keep_malloc_heap`]). Every swimlane process calls it first.
pub fn set_memory_profile() {
    disable_transparent_huge_pages();
    keep_malloc_heap();
}

/// Give this process's model kernels (candle's CPU threads) `n` threads (0: candle's
/// default, one per core), unless `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS` is set
/// already (an operator's explicit choice wins). candle reads these variables when it
/// first computes, so call this first thing in `main`, before any other thread (a
/// tokio runtime) starts: changing the environment while other threads may read it is
/// unsound.
pub fn apply_model_threads(n: u32) {
    if n == 0
        || std::env::var_os("RAYON_NUM_THREADS").is_some()
        || std::env::var_os("CANDLE_NUM_THREADS").is_some()
    {
        return;
    }
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}

/// The model threads of a process running `worker` ([`apply_model_threads`]): the
/// trainer's from `trainer.threads`; the validator and the publisher score and check a
/// few hundred windows a run, where a second thread costs more than it saves (and
/// candle's idle threads spin while they wait: 43% of a validator's CPU with two), so
/// one; ingest runs no model.
pub fn model_threads(config: &Config, worker: Worker) -> u32 {
    match worker {
        Worker::Trainer => config.trainer.threads,
        Worker::Validator | Worker::Publisher => 1,
        Worker::Ingest => 0,
    }
}

#[doc(hidden)]
pub use mimalloc::MiMalloc;

/// A worker binary: its `main` is [`worker_main`] for `$worker` (a [`Worker`]), with
/// `$about` for `--help`, running `$process` (the worker's `run_process`), and its
/// global allocator mimalloc (training and scoring allocate a tensor per operation,
/// which glibc's allocator turns into page faults: 5x slower, shared/facts.md).
#[macro_export]
macro_rules! worker_binary {
    ($worker:ident, $about:expr, $process:path $(,)?) => {
        #[global_allocator]
        static GLOBAL: $crate::MiMalloc = $crate::MiMalloc;

        fn main() -> ::std::process::ExitCode {
            $crate::worker_main($crate::Worker::$worker, $about, $process)
        }
    };
}

/// Every worker binary's `main` ([`worker_binary!`]): its flags ([`Args`], each with
/// its environment twin; `--help` shows `about`), its config for `worker`, tracing,
/// then `process` on a multi-threaded tokio runtime until it returns. Each worker's
/// model threads are set first, before any other thread starts
/// ([`apply_model_threads`]). An error is printed with its causes, and the exit
/// status is 1.
pub fn worker_main<Fut, E>(
    worker: Worker,
    about: &'static str,
    process: impl FnOnce(Config) -> Fut,
) -> std::process::ExitCode
where
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    use clap::{Args as _, FromArgMatches as _};
    // The flags' own doc would be the about text: set the worker's after them.
    let command = Args::augment_args(clap::Command::new(worker.binary()))
        .version(env!("CARGO_PKG_VERSION"))
        .about(about);
    let args = Args::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    set_memory_profile();
    let run = || -> Result<(), WorkerError> {
        let config = Config::load(&args, Some(worker))?;
        apply_model_threads(model_threads(&config, worker));
        init_tracing(config.log_format);
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(WorkerError::Runtime)?
            .block_on(process(config))
            .map_err(|e| WorkerError::Process(Box::new(e)))
    };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut message = format!("Error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(&format!("\n  caused by: {s}"));
                source = s.source();
            }
            eprintln!("{message}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Why a worker process ([`worker_main`]) stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Process(Box<dyn std::error::Error + Send + Sync>),
}

/// Errors of the runtime layer.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} for the {what}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the store {location}: {source}")]
    Store {
        location: String,
        source: swimlane_store::KvError,
    },
    #[error("store {location:?} is FoundationDB, but this binary was built without FoundationDB support; rebuild with `--features fdb`")]
    FdbNotBuilt { location: String },
    #[error("bus {location:?} is Kafka, but this binary was built without Kafka support; rebuild with `--features swimlane-runtime/kafka` (or use `embedded`)")]
    BusNotBuilt { location: String },
    #[error("bus error: {0}")]
    Bus(#[from] swimlane_bus::BusError),
    #[error("metrics registration failed: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{worker} is not a consuming stage")]
    NotAStage { worker: &'static str },
    #[error("the stage thread failed: {0}")]
    Join(String),
    #[error("the {what} server failed: {source}")]
    Serve {
        what: &'static str,
        source: std::io::Error,
    },
}

/// How [`serve_draining`] serves one API.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Names the API in the log.
    pub what: &'static str,
    /// After shutdown, in-flight requests get this long to finish.
    pub drain: std::time::Duration,
    /// A request's head (request line and headers) must arrive within this long of
    /// the connection waiting for it, or the connection is closed: a client that
    /// opens connections and trickles headers cannot hold them for ever.
    pub header_timeout: std::time::Duration,
    /// Counts the connections closed at `header_timeout`.
    pub header_timeouts: prometheus::IntCounter,
}

/// Serve `app` on `listener` (HTTP/1.1) until `shutdown` is cancelled; then stop being
/// `ready`, stop accepting, let in-flight requests finish for at most `drain`, and
/// close whatever is left (a request's store transaction commits whole or not at all).
/// Both APIs (ingest's and the publisher's) are served this way.
///
/// Its own accept loop rather than `axum::serve`, for the header deadline: hyper
/// enforces `header_read_timeout` only with a timer, which `axum::serve` does not give
/// it, and only on a connection known to be HTTP/1 (a protocol-sniffing server waits
/// for the first bytes without a deadline), hence HTTP/1.1 only, and no upgrades
/// (hyper-util's upgradeable connection always sniffs).
pub async fn serve_draining(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    ready: Readiness,
    shutdown: CancellationToken,
    options: ServeOptions,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let what = options.what;
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::error!(api = what, error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let timeouts = options.header_timeouts.clone();
        tokio::spawn(async move {
            // A client that went away or broke the protocol is its own business; one cut
            // at the header deadline is counted.
            if let Err(e) = conn.await {
                if e.downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout)
                {
                    timeouts.inc();
                }
            }
        });
    }
    drop(listener);
    ready.set(false);
    tracing::info!(api = what, "draining: finishing in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(options.drain) => {
            tracing::warn!(api = what, drain = ?options.drain, "drain deadline passed; closing remaining requests");
        }
    }
    Ok(())
}

/// An accept error that is about the one connection (reset before it was taken), not
/// the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Bind a TCP listener, with an error that says what it was for.
pub async fn bind(
    addr: SocketAddr,
    what: &'static str,
) -> Result<tokio::net::TcpListener, RuntimeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RuntimeError::Bind { what, addr, source })
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_keeps_its_heap_unless_the_operator_set_a_threshold() {
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some() {
            eprintln!("skipped: MALLOC_TRIM_THRESHOLD_ is set, the operator's choice wins");
            return;
        }
        assert!(super::keep_malloc_heap(), "mallopt refused the thresholds");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn transparent_huge_pages_are_off_unless_the_operator_allows_them() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            eprintln!("skipped: MIMALLOC_ALLOW_THP is set, the operator's choice wins");
            return;
        }
        assert!(super::disable_transparent_huge_pages());
        // SAFETY: PR_GET_THP_DISABLE takes no pointers.
        assert_eq!(
            unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) },
            1
        );
    }

    #[test]
    fn process_cpu_seconds_counts_work_done() {
        let before = super::process_cpu_seconds();
        assert!(before > 0.0, "a running process has used some CPU");
        // Busy until the clock has moved 10 ms (it moves only while this process runs).
        let (mut x, t0) = (0u64, std::time::Instant::now());
        while super::process_cpu_seconds() - before < 0.010 {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "the process CPU clock did not move in 30 s of work"
            );
        }
    }
}
