//! The one HTTP error answer of both APIs (ingest's and the publisher's): a status, a
//! machine code from a closed set (docs/api.md), a message for people, and
//! `Retry-After` on the answers worth retrying. Messages never carry a token or a
//! stored value; store errors' details go to the log, not to the client.
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use swimlane_core::batch::BatchError;
use swimlane_state::tokens::AuthError;
use swimlane_store::KvError;

/// One route of an API, as its request metrics name it (the `route` label).
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// `GET`, `POST`, ...
    pub method: &'static str,
    /// The path as the router has it (`/v1/users/{user}/batches`).
    pub path: &'static str,
    pub name: &'static str,
}

/// Values of the `class` label of the responses counter: the HTTP status class.
pub const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

/// The [`STATUS_CLASSES`] value of an answer's status (1xx and 3xx count as 2xx: the
/// APIs answer neither but 304, a success).
pub fn status_class(status: StatusCode) -> &'static str {
    if status.is_server_error() {
        "5xx"
    } else if status.is_client_error() {
        "4xx"
    } else {
        "2xx"
    }
}

/// The request metrics of an API, the same for both: `swimlane_<worker>_request_seconds`
/// (label `route`) and `swimlane_<worker>_responses_total` (labels `route`, `class`),
/// every route and class exported from the start. [`api`] times and counts every
/// request of a known route.
#[derive(Clone)]
pub struct RequestMetrics {
    seconds: HistogramVec,
    responses: IntCounterVec,
    routes: &'static [Route],
    /// Connections closed because their request head did not arrive in time
    /// (`crate::ServeOptions::header_timeout`).
    pub header_timeouts: prometheus::IntCounter,
}

impl RequestMetrics {
    /// Create `worker`'s for `routes` and register them on `registry`.
    pub fn register(
        registry: &Registry,
        worker: crate::Worker,
        routes: &'static [Route],
    ) -> prometheus::Result<Self> {
        let w = worker.name();
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                format!("swimlane_{w}_request_seconds"),
                format!("Time to answer a {w} API request"),
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route"],
        )?;
        let responses = IntCounterVec::new(
            Opts::new(
                format!("swimlane_{w}_responses_total"),
                format!("{w} API answers, by route and HTTP status class"),
            ),
            &["route", "class"],
        )?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(responses.clone()))?;
        for r in routes {
            seconds.with_label_values(&[r.name]);
            for c in STATUS_CLASSES {
                responses.with_label_values(&[r.name, c]);
            }
        }
        let header_timeouts = prometheus::IntCounter::new(
            format!("swimlane_{w}_header_timeouts_total"),
            format!("{w} API connections closed because a request head did not arrive within the header timeout"),
        )?;
        registry.register(Box::new(header_timeouts.clone()))?;
        Ok(RequestMetrics {
            seconds,
            responses,
            routes,
            header_timeouts,
        })
    }

    /// Count an answer of the route `name`, begun at `started`.
    pub fn answered(&self, name: &str, started: Instant, status: StatusCode) {
        let seconds = started.elapsed().as_secs_f64();
        self.seconds.with_label_values(&[name]).observe(seconds);
        self.responses
            .with_label_values(&[name, status_class(status)])
            .inc();
    }

    fn route_of(&self, method: &str, path: &str) -> Option<&'static str> {
        let r = self
            .routes
            .iter()
            .find(|r| r.method == method && r.path == path);
        r.map(|r| r.name)
    }

    async fn track(State(m): State<RequestMetrics>, req: Request, next: Next) -> Response {
        let path = req.extensions().get::<MatchedPath>();
        let name = path.and_then(|p| m.route_of(req.method().as_str(), p.as_str()));
        let started = Instant::now();
        let response = next.run(req).await;
        if let Some(name) = name {
            m.answered(name, started, response.status());
        }
        response
    }
}

/// An API's router, finished the same way for both: every request of a known route
/// timed and counted ([`RequestMetrics`]), and a JSON 404 and 405 for the rest.
pub fn api<S: Clone + Send + Sync + 'static>(
    routes: Router<S>,
    metrics: RequestMetrics,
) -> Router<S> {
    routes
        .route_layer(axum::middleware::from_fn_with_state(
            metrics,
            RequestMetrics::track,
        ))
        .fallback(ApiError::no_route)
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
}

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
    /// 429 `too_many_uploads`: the caller already has `max` uploads in flight.
    pub fn too_many_uploads(max: u32) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "too_many_uploads",
            message: format!(
                "this user already has {max} uploads in flight (ingest.max_inflight_per_user); nothing was stored, retry when one has finished"
            ),
            retry_after: Some(1),
        }
    }
    /// 429 `daily_cap`: the user has staged `cap` uploads today (UTC).
    pub fn daily_cap(cap: u32, retry_after_s: u64) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "daily_cap",
            message: format!(
                "this user has staged {cap} uploads today, UTC (ingest.max_uploads_per_day); nothing was stored, retry after midnight UTC"
            ),
            retry_after: Some(retry_after_s.clamp(1, 86_400) as u32),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(status_class(StatusCode::ACCEPTED), "2xx");
        assert_eq!(status_class(StatusCode::NOT_MODIFIED), "2xx");
        assert_eq!(status_class(StatusCode::CONFLICT), "4xx");
        assert_eq!(status_class(StatusCode::SERVICE_UNAVAILABLE), "5xx");
    }
}
