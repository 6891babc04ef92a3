//! Errors: [`IngestError`] for the library's callers, [`ApiError`] (both APIs' one
//! error answer, `swimlane_runtime::http`) for HTTP answers.
use swimlane_runtime::RuntimeError;
use swimlane_store::KvError;

/// Why ingest could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("store error: {0}")]
    Store(#[from] KvError),
    #[error("metrics registration failed: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("ingest API server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("ops server task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Config(#[from] swimlane_runtime::config::ConfigError),
}

pub use swimlane_runtime::http::ApiError;
