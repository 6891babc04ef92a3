//! Tracing set-up and metrics helpers.
//!
//! Log filter: `SWIMLANE_LOG`, else `RUST_LOG`, else `info` (tracing-subscriber's
//! `EnvFilter` syntax, e.g. `swimlane_ingest=debug,info`).
use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntCounter, IntGauge, Opts, Registry};
use swimlane_store::Db;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global tracing subscriber ([`subscriber`]) on stderr, with colour codes
/// only when stderr is a terminal, filtered by `SWIMLANE_LOG` (or `RUST_LOG`; default
/// `info`). A second call does nothing (the first subscriber stays).
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = std::env::var("SWIMLANE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let _ =
        tracing::subscriber::set_global_default(subscriber(format, filter, ansi, std::io::stderr));
}

/// The subscriber every process logs through: lines in `format` that pass `filter`,
/// written to `writer`. Text has colour codes only when `ansi`; JSON is one object a
/// line with the event's fields (`fields`), its span's (`span`) and every enclosing
/// span's (`spans`), so `user_id` and `batch_id` are on every line logged inside a
/// stage's span.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync + 'static>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .with_ansi(false)
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
    }
}

/// A fresh registry for one process (or one worker of `swimlane dev`), with the
/// process's own CPU, memory, file-descriptor and thread metrics (`process_*`, on
/// Linux), so every worker's `/metrics` shows what it costs.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    {
        let pc = ProcessMetrics(prometheus::process_collector::ProcessCollector::for_self());
        if let Err(e) = registry.register(Box::new(pc)) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
    }
    registry
}

/// The prometheus crate's process collector, with `process_cpu_seconds_total` to the
/// nanosecond ([`crate::process_cpu_seconds`]) instead of in whole seconds, as its own
/// is (an integer counter of `/proc`'s ticks divided by the tick rate): a worker that
/// has used 0.9 s of CPU exported 0, and a 5-minute rate was off by up to a second.
/// The trainers' and validators' CPU counters are divided by it
/// (`swimlane:cpu_outside_model:ratio_rate5m`), so both count the same clock.
#[cfg(target_os = "linux")]
struct ProcessMetrics(prometheus::process_collector::ProcessCollector);

#[cfg(target_os = "linux")]
impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.0.collect();
        let seconds = crate::process_cpu_seconds();
        for f in &mut families {
            if f.name() == "process_cpu_seconds_total" {
                for m in f.mut_metric() {
                    let mut c = prometheus::proto::Counter::default();
                    c.set_value(seconds);
                    m.set_counter(c);
                }
            }
        }
        families
    }
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
    /// A counter of a quantity that is not a whole number (seconds).
    pub fn seconds_counter(
        &self,
        name: &str,
        help: &str,
    ) -> prometheus::Result<prometheus::Counter> {
        self.add(prometheus::Counter::new(name, help)?)
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
    // the largest transaction read and written, in bytes
    largest: [IntGauge; 2],
    longest: Gauge,
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
        let g = |what: &str, help: &str| {
            IntGauge::with_opts(Opts::new(
                format!("swimlane_{worker}_store_largest_txn_{what}_bytes"),
                help.to_string(),
            ))
        };
        let largest = [
            g("read", "The most bytes one committed store transaction of this process read")?,
            g(
                "written",
                "The most bytes one committed store transaction of this process wrote (FoundationDB's limit: 10 MB)",
            )?,
        ];
        let longest = Gauge::with_opts(Opts::new(
            format!("swimlane_{worker}_store_longest_txn_seconds"),
            "The longest a committed store transaction of this process took, begin to commit (FoundationDB's limit: 5 s)",
        ))?;
        let descs = counters
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .chain(largest.iter().flat_map(|g| g.desc().into_iter().cloned()))
            .chain(longest.desc().into_iter().cloned())
            .collect();
        Ok(StoreCollector {
            db,
            counters: Mutex::new(counters),
            largest,
            longest,
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
        self.largest[0].set(s.largest_read_bytes.load(Relaxed) as i64);
        self.largest[1].set(s.largest_written_bytes.load(Relaxed) as i64);
        self.longest
            .set(s.longest_micros.load(Relaxed) as f64 / 1e6);
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters
            .iter()
            .zip(values)
            .flat_map(|(c, v)| {
                c.reset();
                c.inc_by(v);
                c.collect()
            })
            .chain(self.largest.iter().flat_map(|g| g.collect()))
            .chain(self.longest.collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {

    /// JSON logs: one object a line, each parsing on its own, with the event's fields
    /// and the fields of the spans it was logged in.
    #[test]
    fn json_logs_are_one_object_a_line_with_the_span_fields() {
        let logs = CapturedLogs::default();
        tracing::subscriber::with_default(logs.subscriber_as(LogFormat::Json, true), || {
            let span = tracing::info_span!("train", user_id = "ann", batch_id = "b-1");
            let _g = span.enter();
            tracing::info!(run_id = "r-1", "trained");
            let inner = tracing::info_span!("commit", attempt = 2);
            let _i = inner.enter();
            tracing::warn!("a \"quoted\" reason\nover two lines");
        });
        let text = logs.text();
        assert!(!text.contains('\u{1b}'), "no colour codes in JSON: {text}");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["fields"]["message"], "trained");
        assert_eq!(lines[0]["fields"]["run_id"], "r-1");
        assert_eq!(lines[0]["level"], "INFO");
        for l in &lines {
            assert_eq!(l["spans"][0]["user_id"], "ann", "{l}");
            assert_eq!(l["spans"][0]["batch_id"], "b-1", "{l}");
        }
        assert_eq!(lines[1]["span"]["attempt"], 2);
        assert_eq!(
            lines[1]["fields"]["message"],
            "a \"quoted\" reason\nover two lines"
        );
    }

    /// Text logs carry colour codes only when asked (a terminal), never otherwise.
    #[test]
    fn text_logs_have_colour_codes_only_for_a_terminal() {
        for ansi in [false, true] {
            let logs = CapturedLogs::default();
            tracing::subscriber::with_default(logs.subscriber_as(LogFormat::Text, ansi), || {
                let span = tracing::info_span!("ingest", user_id = "ann");
                let _g = span.enter();
                tracing::warn!("slow upload");
            });
            let text = logs.text();
            assert!(
                text.contains("user_id") && text.contains("slow upload"),
                "{text}"
            );
            assert_eq!(text.contains('\u{1b}'), ansi, "{text:?}");
        }
    }

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

    /// `process_cpu_seconds_total` is the process's CPU to the nanosecond, not in
    /// whole seconds (the prometheus crate's own counts whole seconds only).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_cpu_is_exported_to_a_fraction_of_a_second() {
        let registry = new_registry();
        let exported = || -> f64 {
            let text = encode_metrics(&registry);
            let line = text
                .lines()
                .find(|l| l.starts_with("process_cpu_seconds_total "))
                .unwrap_or_else(|| panic!("no process_cpu_seconds_total in {text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let before = exported();
        // Work until the process clock has moved by 50 ms (bounded by the clock, not
        // by a sleep).
        let start = crate::process_cpu_seconds();
        let mut x = 0u64;
        while crate::process_cpu_seconds() - start < 0.05 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let after = exported();
        assert!(after - before >= 0.05, "{before} -> {after}");
        assert!(
            after.fract() != 0.0 || before.fract() != 0.0,
            "{before} -> {after}"
        );
        assert!(after <= crate::process_cpu_seconds());
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
    /// A subscriber of DEBUG and above, as text without colours, writing into these
    /// logs.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        self.subscriber_as(LogFormat::Text, false)
    }

    /// [`subscriber`] of DEBUG and above in `format` (with colour codes if `ansi`),
    /// writing into these logs.
    pub fn subscriber_as(
        &self,
        format: LogFormat,
        ansi: bool,
    ) -> impl tracing::Subscriber + Send + Sync + 'static {
        let w = self.clone();
        subscriber(format, EnvFilter::new("debug"), ansi, move || w.clone())
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
