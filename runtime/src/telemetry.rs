//! Tracing set-up and metrics helpers.
//!
//! Log filter: `SWIMLANE_LOG`, else `RUST_LOG`, else `info` (tracing-subscriber's
//! `EnvFilter` syntax, e.g. `swimlane_ingest=debug,info`).
use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, Opts, Registry};
use swimlane_store::Db;
use tracing_subscriber::EnvFilter;

/// Install the global tracing subscriber: text, or JSON lines when `json`. A second
/// call does nothing (the first subscriber stays).
pub fn init_tracing(json: bool) {
    let filter = std::env::var("SWIMLANE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
}

/// A fresh registry for one process (or one worker of `swimlane dev`), with the
/// process's own CPU, memory, file-descriptor and thread metrics (`process_*`, on
/// Linux), so every worker's `/metrics` shows what it costs.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(e) = registry.register(Box::new(pc)) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
    }
    registry
}

/// Makes metrics and registers each on the registry as it is made, so a metrics struct
/// is one list of definitions (errors if a name is registered twice).
pub struct Registrar<'r>(pub &'r Registry);

impl Registrar<'_> {
    fn add<C: Collector + Clone + 'static>(&self, c: C) -> prometheus::Result<C> {
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }
    pub fn counter(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.add(IntCounter::new(name, help)?)
    }
    pub fn gauge(&self, name: &str, help: &str) -> prometheus::Result<prometheus::IntGauge> {
        self.add(prometheus::IntGauge::new(name, help)?)
    }
    /// A counter with `labels`.
    pub fn counters(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<prometheus::IntCounterVec> {
        self.add(prometheus::IntCounterVec::new(
            Opts::new(name, help),
            labels,
        )?)
    }
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
    ) -> prometheus::Result<prometheus::Histogram> {
        let opts = prometheus::HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(prometheus::Histogram::with_opts(opts)?)
    }
}

/// The text exposition of everything in `registry`.
pub fn encode_metrics(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

/// Export `db`'s transaction counters as `swimlane_<worker>_store_commits_total`,
/// `..._store_retries_total`, `..._store_conflicts_total` and
/// `..._store_failures_total`, read at every scrape.
pub fn register_store_metrics(
    registry: &Registry,
    worker: &str,
    db: &Db,
) -> Result<(), prometheus::Error> {
    registry.register(Box::new(StoreCollector::new(worker, db.clone())?))
}

struct StoreCollector {
    db: Db,
    // commits, retries, conflicts, failures
    counters: Mutex<[IntCounter; 4]>,
    descs: Vec<Desc>,
}

impl StoreCollector {
    fn new(worker: &str, db: Db) -> Result<Self, prometheus::Error> {
        let c = |what: &str, help: &str| {
            IntCounter::with_opts(Opts::new(
                format!("swimlane_{worker}_store_{what}_total"),
                help.to_string(),
            ))
        };
        let counters = [
            c("commits", "Store transactions committed")?,
            c("retries", "Store transaction attempts retried")?,
            c("conflicts", "Store transaction attempts that conflicted")?,
            c("failures", "Store transactions that failed for good")?,
        ];
        let descs = counters
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Ok(StoreCollector {
            db,
            counters: Mutex::new(counters),
            descs,
        })
    }
}

impl Collector for StoreCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.db.stats();
        let values = [
            s.commits.load(Relaxed),
            s.retries.load(Relaxed),
            s.conflicts.load(Relaxed),
            s.failures.load(Relaxed),
        ];
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters
            .iter()
            .zip(values)
            .flat_map(|(c, v)| {
                c.reset();
                c.inc_by(v);
                c.collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn registries_export_the_process_cpu_and_memory() {
        let text = encode_metrics(&new_registry());
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(&format!("\n{name} ")), "{name} in {text}");
        }
    }

    #[test]
    fn store_metrics_follow_the_db_stats() {
        let db = Db::new(swimlane_store::embedded::EmbeddedBackend::open_temp().unwrap());
        let r = new_registry();
        register_store_metrics(&r, "ingest", &db).unwrap();
        db.transact(|tx| tx.set(b"a", b"1")).unwrap();
        db.transact(|tx| tx.set(b"b", b"2")).unwrap();
        let text = encode_metrics(&r);
        assert!(
            text.contains("swimlane_ingest_store_commits_total 2"),
            "{text}"
        );
        assert!(
            text.contains("swimlane_ingest_store_conflicts_total 0"),
            "{text}"
        );
        db.transact(|tx| tx.set(b"c", b"3")).unwrap();
        assert!(encode_metrics(&r).contains("swimlane_ingest_store_commits_total 3"));
        // A second registration of the same names is refused, not duplicated.
        assert!(register_store_metrics(&r, "ingest", &db).is_err());
    }
}

/// Log lines kept in memory, for tests that check what was logged (the ids on every
/// line, never a secret): [`CapturedLogs::subscriber`] writes here.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// A subscriber of DEBUG and above, without colours, writing into these logs.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        let w = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish()
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
