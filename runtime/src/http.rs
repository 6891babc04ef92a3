//! The one HTTP error answer of both APIs (ingest's and the publisher's): a status, a
//! machine code from a closed set (docs/api.md), a message for people, and
//! `Retry-After` on the answers worth retrying. Messages never carry a token or a
//! stored value; store errors' details go to the log, not to the client.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use swimlane_core::batch::BatchError;
use swimlane_state::tokens::AuthError;
use swimlane_store::KvError;

/// Run blocking work (a store transaction) off the async workers; a task that panics
/// is a 500.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "blocking task failed");
        ApiError::internal()
    })
}

/// An HTTP error answer: `{"error": {"code": "...", "message": "..."}}`. Messages never
/// contain a token or a stored value.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// A closed-set machine code (docs/api.md lists them).
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
    /// 400 `bad_user_id`: the user id in the path is not one.
    pub fn bad_user_id(reason: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_user_id", reason.to_string())
    }
    /// 404 `not_found`: no such route (every API's fallback).
    pub async fn no_route() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
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

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated => Self::unauthenticated(&e.to_string()),
            AuthError::Forbidden => Self::forbidden(),
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
