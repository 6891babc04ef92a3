//! Errors: [`IngestError`] for the library's callers, [`ApiError`] for HTTP answers.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use swimlane_core::batch::BatchError;
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

/// An HTTP error answer: `{"error": {"code": "...", "message": "..."}}`. Messages never
/// contain a token or a stored value.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// A closed-set machine code (see [`crate::metrics::reject_reasons`]).
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (retryable failures).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn unauthenticated(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }
    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token does not belong to the user in the path",
        )
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; it has been logged",
        )
    }
    /// 503 `overloaded` with `Retry-After`: `max` uploads are already in flight, so this
    /// one was refused before anything was read or stored.
    pub fn overloaded(max: u32) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "overloaded",
            message: format!(
                "ingest is handling its limit of {max} uploads; nothing was stored, retry later"
            ),
            retry_after: Some(1),
        }
    }
    /// Map a store error: retryable conditions are 503 with `Retry-After`, the rest 500.
    /// The details go to the log, not to the client.
    pub fn store(e: &KvError) -> Self {
        let retryable = matches!(
            e,
            KvError::RetriesExhausted { .. }
                | KvError::Conflict
                | KvError::Transient(_)
                | KvError::TransactionTooOld { .. }
        );
        if retryable {
            tracing::warn!(error = %e, "store unavailable");
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "store_unavailable",
                message: "the store is busy or unavailable; nothing was stored, retry later".into(),
                retry_after: Some(1),
            }
        } else {
            tracing::error!(error = %e, "store error");
            Self::internal()
        }
    }
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}
