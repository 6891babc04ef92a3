//! The publisher's metrics, defined in one place.
use prometheus::{Histogram, IntCounter, Registry};
use swimlane_runtime::http::{RequestMetrics, Route};
use swimlane_runtime::Worker;

/// Metrics the publisher exports as `swimlane_publisher_*`.
#[derive(Clone)]
pub struct PublisherMetrics {
    pub publishes: IntCounter,
    /// Versions published whose ONNX file holds the base model: it answers windows unlike
    /// every style the version trained on with the base model, and the others with the
    /// weighted average of both (`swimlane_core::familiar`); the others were trained
    /// before familiarity was kept, with `trainer.familiar_scale` 0, or on every class
    /// with `trainer.personal_weight` 1.
    pub fallback_files: IntCounter,
    /// Time from a batch's upload being accepted to the model containing it published.
    pub upload_to_publish_seconds: Histogram,
    /// Held-out accuracy of each newly published model (a distribution, no per-user
    /// label).
    pub heldout_accuracy: Histogram,
    pub model_downloads: IntCounter,
    /// `swimlane_publisher_request_seconds` and `swimlane_publisher_responses_total`.
    pub requests: RequestMetrics,
}

/// The publisher's routes, as its request metrics name them.
pub const ROUTES: [Route; 5] = [
    Route {
        method: "GET",
        path: "/v1/users/{user}/model",
        name: "get_model",
    },
    Route {
        method: "GET",
        path: "/v1/users/{user}/model/versions",
        name: "list_versions",
    },
    Route {
        method: "POST",
        path: "/v1/admin/users/{user}/rollback",
        name: "rollback",
    },
    Route {
        method: "GET",
        path: "/v1/users/{user}/history",
        name: "history",
    },
    Route {
        method: "GET",
        path: "/admin/history",
        name: "history_page",
    },
];

impl PublisherMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = swimlane_runtime::Registrar(registry);
        Ok(PublisherMetrics {
            publishes: r.counter(
                "swimlane_publisher_publishes_total",
                "Model versions published",
            )?,
            fallback_files: r.counter(
                "swimlane_publisher_fallback_files_total",
                "Model versions published whose ONNX file holds the base model (for unfamiliar windows, and weighted with the personal model for the others)",
            )?,
            upload_to_publish_seconds: r.histogram(
                "swimlane_publisher_upload_to_publish_seconds",
                "From upload accepted to a model containing it published",
                &[
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
                ],
            )?,
            heldout_accuracy: r.histogram(
                "swimlane_publisher_heldout_accuracy",
                "Held-out accuracy of published models",
                &[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0],
            )?,
            model_downloads: r.counter(
                "swimlane_publisher_model_downloads_total",
                "Model downloads served (200 responses)",
            )?,
            requests: RequestMetrics::register(registry, Worker::Publisher, &ROUTES)?,
        })
    }
}
