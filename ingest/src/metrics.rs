//! Every metric ingest exports, defined in one place. Label values come from closed
//! sets ([`reject_reasons`], [`ROUTES`]).
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use swimlane_core::batch::BatchError;

pub const BATCHES_ACCEPTED_TOTAL: &str = "swimlane_ingest_batches_accepted_total";
pub const BATCHES_DUPLICATE_TOTAL: &str = "swimlane_ingest_batches_duplicate_total";
pub const BATCHES_REJECTED_TOTAL: &str = "swimlane_ingest_batches_rejected_total";
pub const SAMPLES_STAGED_TOTAL: &str = "swimlane_ingest_samples_staged_total";
pub const REQUEST_SECONDS: &str = "swimlane_ingest_request_seconds";

/// Values of the `route` label of [`REQUEST_SECONDS`].
pub const ROUTES: [&str; 2] = ["post_batch", "get_batch"];

/// Error codes of the HTTP edge, beside [`BatchError::CODES`].
pub const EDGE_CODES: [&str; 11] = [
    "unauthorized",
    "forbidden",
    "bad_user_id",
    "payload_too_large",
    "bad_body",
    "request_timeout",
    "bad_gzip",
    "unsupported_encoding",
    "conflict",
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
    request_seconds: HistogramVec,
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
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(REQUEST_SECONDS, "Time to answer an ingest API request").buckets(
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            &["route"],
        )?;
        registry.register(Box::new(accepted.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(samples_staged.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        // Export every reason at 0 so dashboards and alerts see the whole set.
        for r in reject_reasons() {
            rejected.with_label_values(&[r]);
        }
        for r in ROUTES {
            request_seconds.with_label_values(&[r]);
        }
        Ok(IngestMetrics {
            accepted,
            duplicates,
            rejected,
            samples_staged,
            request_seconds,
        })
    }

    /// Count a refused upload. `reason` must come from [`reject_reasons`].
    pub fn rejected(&self, reason: &'static str) {
        debug_assert!(reject_reasons().any(|r| r == reason), "{reason}");
        self.rejected.with_label_values(&[reason]).inc();
    }

    pub fn request_seconds(&self, route: &'static str) -> Histogram {
        self.request_seconds.with_label_values(&[route])
    }
}
