//! Every metric ingest exports, defined in one place. Label values come from closed
//! sets ([`reject_reasons`], [`ROUTES`], `swimlane_runtime::http::STATUS_CLASSES`); the
//! request metrics are the ones every API has (`swimlane_runtime::http::RequestMetrics`).
//!
//! Ingest also exports the pipeline's state as read from the store at each scrape
//! ([`PipelineCollector`]): the age of the oldest batch staged and not yet settled, and
//! the distribution of users' current held-out accuracy. Every ingest replica exports
//! the same values (they are store-wide): aggregate them with `max`.

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use swimlane_core::batch::BatchError;
use swimlane_core::stats::ACCURACY_BUCKETS;
use swimlane_runtime::http::{RequestMetrics, Route};
use swimlane_runtime::NowMs;
use swimlane_runtime::Worker;
use swimlane_state::Repo;
use swimlane_store::Db;

pub const BATCHES_ACCEPTED_TOTAL: &str = "swimlane_ingest_batches_accepted_total";
pub const BATCHES_DUPLICATE_TOTAL: &str = "swimlane_ingest_batches_duplicate_total";
pub const BATCHES_REJECTED_TOTAL: &str = "swimlane_ingest_batches_rejected_total";
pub const SAMPLES_STAGED_TOTAL: &str = "swimlane_ingest_samples_staged_total";
pub const UPLOADS_INFLIGHT: &str = "swimlane_ingest_uploads_inflight";
pub const BATCHES_RETIRED_TOTAL: &str = "swimlane_ingest_batches_retired_total";
pub const BATCH_RECORDS_FORGOTTEN_TOTAL: &str = "swimlane_ingest_batch_records_forgotten_total";
pub const OLDEST_PENDING_AGE: &str = "swimlane_pipeline_oldest_pending_batch_age_seconds";
pub const USERS_HELDOUT_ACCURACY: &str = "swimlane_users_heldout_accuracy";
pub const LIVE_WINDOWS_TOTAL: &str = "swimlane_live_windows_total";
pub const LIVE_WINDOWS_RIGHT_TOTAL: &str = "swimlane_live_windows_right_total";
pub const USERS_LIVE_ACCURACY: &str = "swimlane_users_live_accuracy";
pub const USERS_LIVE_FELL: &str = "swimlane_users_live_fell";

/// Ingest's routes, as its request metrics name them.
pub const ROUTES: [Route; 3] = [
    Route {
        method: "POST",
        path: "/v1/users/{user}/batches",
        name: "post_batch",
    },
    Route {
        method: "GET",
        path: "/v1/users/{user}/batches/{batch_id}",
        name: "get_batch",
    },
    Route {
        method: "DELETE",
        path: "/v1/users/{user}",
        name: "forget_user",
    },
];

/// Error codes of the HTTP edge, beside [`BatchError::CODES`].
pub const EDGE_CODES: [&str; 16] = [
    "overloaded",
    "too_many_uploads",
    "daily_cap",
    "body_too_slow",
    "unauthenticated",
    "forbidden",
    "bad_user_id",
    "payload_too_large",
    "bad_body",
    "request_timeout",
    "bad_gzip",
    "unsupported_encoding",
    "conflict",
    "user_forgotten",
    "store_unavailable",
    "internal",
];

/// Every value of the `reason` label of [`BATCHES_REJECTED_TOTAL`].
pub fn reject_reasons() -> impl Iterator<Item = &'static str> {
    BatchError::CODES.into_iter().chain(EDGE_CODES)
}

/// Ingest's metrics. Cheap to clone.
#[derive(Clone)]
pub struct IngestMetrics {
    pub accepted: IntCounter,
    pub duplicates: IntCounter,
    rejected: IntCounterVec,
    pub samples_staged: IntCounter,
    /// `swimlane_ingest_request_seconds` and `swimlane_ingest_responses_total`.
    pub requests: RequestMetrics,
    /// Uploads being handled now (at most `ingest.max_inflight`).
    pub inflight: IntGauge,
    pub retired: IntCounter,
    pub forgotten: IntCounter,
}

impl IngestMetrics {
    /// Create and register in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let accepted =
            IntCounter::with_opts(Opts::new(BATCHES_ACCEPTED_TOTAL, "Batches newly staged"))?;
        let duplicates = IntCounter::with_opts(Opts::new(
            BATCHES_DUPLICATE_TOTAL,
            "Retries of an already staged batch (same id, same content), answered without storing",
        ))?;
        let rejected = IntCounterVec::new(
            Opts::new(BATCHES_REJECTED_TOTAL, "Batch uploads refused, by reason"),
            &["reason"],
        )?;
        let samples_staged =
            IntCounter::with_opts(Opts::new(SAMPLES_STAGED_TOTAL, "Samples newly staged"))?;
        registry.register(Box::new(accepted.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(samples_staged.clone()))?;
        let requests = RequestMetrics::register(registry, Worker::Ingest, &ROUTES)?;
        let inflight = IntGauge::with_opts(Opts::new(
            UPLOADS_INFLIGHT,
            "Uploads being handled now; at ingest.max_inflight further ones are refused with 503",
        ))?;
        registry.register(Box::new(inflight.clone()))?;
        let retired = IntCounter::with_opts(Opts::new(
            BATCHES_RETIRED_TOTAL,
            "Batches retired by the retention policy (samples erased) when a newer batch was staged",
        ))?;
        let forgotten = IntCounter::with_opts(Opts::new(
            BATCH_RECORDS_FORGOTTEN_TOTAL,
            "Records of retired batches deleted beyond retention.max_batch_records",
        ))?;
        registry.register(Box::new(retired.clone()))?;
        registry.register(Box::new(forgotten.clone()))?;
        // Export every reason at 0 so dashboards and alerts see the whole set.
        for r in reject_reasons() {
            rejected.with_label_values(&[r]);
        }
        Ok(IngestMetrics {
            accepted,
            duplicates,
            rejected,
            samples_staged,
            requests,
            inflight,
            retired,
            forgotten,
        })
    }

    /// Count a refused upload. `reason` must come from [`reject_reasons`].
    pub fn rejected(&self, reason: &'static str) {
        debug_assert!(reject_reasons().any(|r| r == reason), "{reason}");
        self.rejected.with_label_values(&[reason]).inc();
    }
}

/// Exports, at each scrape, what one short store transaction reads:
/// - `swimlane_pipeline_oldest_pending_batch_age_seconds`: how long ago the oldest batch
///   not yet published, rejected or deferred was staged (0 when there is none);
/// - `swimlane_users_heldout_accuracy`: a histogram of the held-out accuracy of every
///   user's current model (users without a published model are not counted);
/// - `swimlane_users_live_accuracy` and `swimlane_users_live_fell`: the distribution of
///   users' live accuracy, and how many fell after their last publish
///   (`swimlane_core::stats`).
///
/// A failed read logs a warning and exports neither (Prometheus then sees them absent,
/// which the alert rules treat as a problem of its own).
pub struct PipelineCollector {
    db: Db,
    repo: Repo,
    clock: NowMs,
    descs: Vec<Desc>,
}

impl PipelineCollector {
    pub fn new(db: Db, repo: Repo, clock: NowMs) -> prometheus::Result<Self> {
        let descs = vec![
            Desc::new(
                OLDEST_PENDING_AGE.into(),
                "Seconds since the oldest batch that is staged and not yet published, rejected or deferred was staged".into(),
                vec![],
                Default::default(),
            )?,
            Desc::new(
                USERS_HELDOUT_ACCURACY.into(),
                "Held-out accuracy of each user's current (head) model".into(),
                vec![],
                Default::default(),
            )?,
            Desc::new(
                LIVE_WINDOWS_TOTAL.into(),
                "Windows the devices' models classified, as uploads with feedback (format 2) report them".into(),
                vec![],
                Default::default(),
            )?,
            Desc::new(
                LIVE_WINDOWS_RIGHT_TOTAL.into(),
                "Of those windows, the ones the user confirmed: the device's model was right".into(),
                vec![],
                Default::default(),
            )?,
            Desc::new(
                USERS_LIVE_ACCURACY.into(),
                "Live accuracy of the model each user's device runs (users whose model classified at least 20 windows)".into(),
                vec![],
                Default::default(),
            )?,
            Desc::new(
                USERS_LIVE_FELL.into(),
                "Users whose live accuracy is below that of the model they ran before their last publish".into(),
                vec![],
                Default::default(),
            )?,
        ];
        Ok(PipelineCollector {
            db,
            repo,
            clock,
            descs,
        })
    }

    /// Register a collector over `db` in `registry`.
    pub fn register(
        registry: &Registry,
        db: Db,
        repo: Repo,
        clock: NowMs,
    ) -> prometheus::Result<()> {
        registry.register(Box::new(Self::new(db, repo, clock)?))
    }
}

impl Collector for PipelineCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let repo = &self.repo;
        let read = self.db.transact(|tx| {
            Ok((
                repo.oldest_pending_batch(tx)?,
                repo.head_accuracy_histogram(tx)?,
                repo.live_totals(tx)?,
                repo.live_accuracy_histogram(tx)?,
            ))
        });
        let (oldest, (counts, sum), live, (live_counts, live_sum, fell)) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading pipeline statistics for /metrics failed");
                return Vec::new();
            }
        };
        let now = self.clock.now_ms();
        let age = oldest.map_or(0.0, |(at, _, _)| now.saturating_sub(at) as f64 / 1000.0);

        let mut gauge = proto::Gauge::default();
        gauge.set_value(age);
        let age_family = family(&self.descs[0], MetricType::GAUGE, |m| m.set_gauge(gauge));

        let histogram = |desc: &Desc, counts: &[u64], sum: f64| {
            let mut h = proto::Histogram::default();
            let mut cumulative = 0;
            let mut buckets = Vec::with_capacity(ACCURACY_BUCKETS.len());
            for (bound, n) in ACCURACY_BUCKETS.iter().zip(counts) {
                cumulative += n;
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*bound);
                b.set_cumulative_count(cumulative);
                buckets.push(b);
            }
            h.set_bucket(buckets);
            h.set_sample_count(counts.iter().sum());
            h.set_sample_sum(sum);
            family(desc, MetricType::HISTOGRAM, |m| m.set_histogram(h))
        };
        let acc_family = histogram(&self.descs[1], &counts, sum);
        let mut fell_gauge = proto::Gauge::default();
        fell_gauge.set_value(fell as f64);
        let counter = |desc: &Desc, n: u64| {
            let mut c = proto::Counter::default();
            c.set_value(n as f64);
            family(desc, MetricType::COUNTER, |m| m.set_counter(c))
        };
        vec![
            age_family,
            acc_family,
            counter(&self.descs[2], live.windows),
            counter(&self.descs[3], live.right),
            histogram(&self.descs[4], &live_counts, live_sum),
            family(&self.descs[5], MetricType::GAUGE, |m| {
                m.set_gauge(fell_gauge)
            }),
        ]
    }
}

/// The family `desc` describes, of one metric that `set` fills in.
fn family(desc: &Desc, kind: MetricType, set: impl FnOnce(&mut proto::Metric)) -> MetricFamily {
    let mut metric = proto::Metric::default();
    set(&mut metric);
    let mut f = MetricFamily::default();
    f.set_name(desc.fq_name.clone());
    f.set_help(desc.help.clone());
    f.set_field_type(kind);
    f.set_metric(vec![metric]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use swimlane_core::keys::Keys;
    use swimlane_core::records::{BatchRecord, BatchStatus};
    use swimlane_runtime::ManualWallClock;
    use swimlane_store::embedded::EmbeddedBackend;

    fn metrics(r: &Registry) -> String {
        swimlane_runtime::telemetry::encode_metrics(r)
    }

    #[test]
    fn pipeline_collector_reads_the_oldest_pending_batch_and_the_accuracy_histogram() {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let repo = Repo::new(Keys::new("t"));
        let clock = std::sync::Arc::new(ManualWallClock::new(10_000));
        let r = Registry::new();
        PipelineCollector::register(&r, db.clone(), repo.clone(), clock.clone()).unwrap();
        let m = metrics(&r);
        assert!(
            m.contains("swimlane_pipeline_oldest_pending_batch_age_seconds 0\n"),
            "{m}"
        );
        assert!(m.contains("swimlane_users_heldout_accuracy_count 0"), "{m}");
        assert!(m.contains("swimlane_users_live_accuracy_count 0"), "{m}");
        assert!(m.contains("swimlane_users_live_fell 0"), "{m}");
        assert!(
            m.contains("swimlane_users_heldout_accuracy_bucket{le=\"+Inf\"} 0"),
            "{m}"
        );

        // A batch staged at 4 s, two users with published heads.
        db.transact(|tx| {
            tx.set(&repo.keys.pending_batch(4_000, "al", "b1"), b"")?;
            for (u, acc) in [("al", 0.82f32), ("bo", 0.97)] {
                let mut s = repo.user_state(tx, u)?;
                s.head_heldout_accuracy = Some(acc);
                repo.put_user_state(tx, u, &s)?;
            }
            Ok(())
        })
        .unwrap();
        let m = metrics(&r);
        assert!(
            m.contains("swimlane_pipeline_oldest_pending_batch_age_seconds 6\n"),
            "{m}"
        );
        for line in [
            "swimlane_users_heldout_accuracy_bucket{le=\"0.8\"} 0",
            "swimlane_users_heldout_accuracy_bucket{le=\"0.85\"} 1",
            "swimlane_users_heldout_accuracy_bucket{le=\"0.95\"} 1",
            "swimlane_users_heldout_accuracy_bucket{le=\"0.975\"} 2",
            "swimlane_users_heldout_accuracy_bucket{le=\"1\"} 2",
            "swimlane_users_heldout_accuracy_bucket{le=\"+Inf\"} 2",
            "swimlane_users_heldout_accuracy_count 2",
        ] {
            assert!(m.contains(line), "{line} in\n{m}");
        }
        assert!(
            m.contains("# TYPE swimlane_users_heldout_accuracy histogram"),
            "{m}"
        );

        // Published: nothing pending any more; the age reads 0 again.
        clock.set(60_000);
        db.transact(|tx| {
            let rec = BatchRecord {
                v: 1,
                digest: "d".into(),
                samples: 1,
                heldout: 0,
                chunks: 1,
                staged_at_ms: 4_000,
                status: BatchStatus::Published {
                    run_id: "r".into(),
                    version: 1,
                },
                chunk_samples: 0,
            };
            repo.put_batch(tx, "al", "b1", &rec)
        })
        .unwrap();
        let m = metrics(&r);
        assert!(
            m.contains("swimlane_pipeline_oldest_pending_batch_age_seconds 0\n"),
            "{m}"
        );
    }
}
