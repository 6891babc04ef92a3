//! The device-facing model API.
//!
//! - `GET /v1/users/{user}/model`: the user's current model (safetensors), with
//!   `X-Model-Version`, `X-Model-Sha256` and a strong `ETag`; `If-None-Match` with the
//!   current ETag answers 304; 404 `no_model` while the user has none (the device keeps
//!   the base model).
//! - `GET /v1/users/{user}/model/versions`: every version with held-out metrics and
//!   lineage, and the current head.
//! - `POST /v1/admin/users/{user}/rollback` `{"version": N}` (admin token): point the
//!   head at an earlier published version.
//!
//! Every route authenticates the bearer token and checks that the caller may access
//! the user in the path before reading anything of that user. Errors are JSON
//! `{"error": {"code": "...", "message": "..."}}`.
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use swimlane_core::UserId;
use swimlane_state::tokens::{AuthError, Caller};
use swimlane_state::Repo;
use swimlane_store::{Db, KvError};

use crate::metrics::PublisherMetrics;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub db: Db,
    pub repo: Repo,
    /// SHA-256 (hex) of the admin token; empty: no admin.
    pub admin_token_sha256: Arc<str>,
    pub metrics: PublisherMetrics,
}

/// The publisher's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/users/{user}/model", get(get_model))
        .route("/v1/users/{user}/model/versions", get(list_versions))
        .route("/v1/admin/users/{user}/rollback", post(rollback))
        .with_state(state)
}

/// An API error: status, machine code, message.
#[derive(Debug)]
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.1, "message": self.2}});
        (self.0, Json(body)).into_response()
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated => {
                ApiError(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string())
            }
            AuthError::Forbidden => ApiError(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
        }
    }
}

fn store_error(e: KvError) -> ApiError {
    tracing::error!(error = %e, "store error");
    if e.is_retryable() || matches!(e, KvError::RetriesExhausted { .. }) {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the store is busy; retry later".into(),
        )
    } else {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error".into(),
        )
    }
}

fn parse_user(raw: &str) -> Result<UserId, ApiError> {
    UserId::new(raw).map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_user_id", e.to_string()))
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Run a store closure off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error".into(),
        )
    })?
}

/// Authenticate and authorise inside one read transaction, then run `read`.
fn authorised<T>(
    st: &ApiState,
    auth: Option<&str>,
    user: &UserId,
    admin_only: bool,
    mut read: impl FnMut(&mut swimlane_store::Transaction<'_>) -> Result<T, KvError>,
) -> Result<T, ApiError> {
    let r = st
        .db
        .transact(|tx| {
            let caller: Result<Caller, AuthError> =
                st.repo.authenticate(tx, auth, &st.admin_token_sha256)?;
            let allowed = caller.and_then(|c| {
                if admin_only {
                    c.require_admin()
                } else {
                    c.may_access(user)
                }
            });
            match allowed {
                Err(e) => Ok(Err(e)),
                Ok(()) => read(tx).map(Ok),
            }
        })
        .map_err(store_error)?;
    r.map_err(ApiError::from)
}

async fn get_model(
    State(st): State<ApiState>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = parse_user(&user)?;
    let auth = bearer(&headers);
    let inm = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let st2 = st.clone();
    let found = blocking(move || {
        let repo = st2.repo.clone();
        authorised(&st2, auth.as_deref(), &user, false, |tx| {
            let state = repo.user_state(tx, user.as_str())?;
            let Some(v) = state.head else { return Ok(None) };
            let Some(rec) = repo.model_version(tx, user.as_str(), v)? else {
                return Ok(None);
            };
            let etag = format!("\"{}\"", rec.sha256);
            if inm.as_deref() == Some(etag.as_str()) {
                return Ok(Some((rec, etag, None)));
            }
            let bytes = repo.blob(tx, &rec.model_blob)?;
            Ok(Some((rec, etag, bytes)))
        })
    })
    .await?;
    let Some((rec, etag, bytes)) = found else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "no_model",
            "no personal model published yet; use the base model".into(),
        ));
    };
    let mut h = HeaderMap::new();
    h.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex"));
    h.insert("x-model-version", HeaderValue::from(rec.version));
    h.insert(
        "x-model-sha256",
        HeaderValue::from_str(&rec.sha256).expect("hex"),
    );
    match bytes {
        None => Ok((StatusCode::NOT_MODIFIED, h).into_response()),
        Some(b) => {
            st.metrics.model_downloads.inc();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/vnd.swimlane.safetensors"),
            );
            Ok((StatusCode::OK, h, b).into_response())
        }
    }
}

async fn list_versions(
    State(st): State<ApiState>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = parse_user(&user)?;
    let auth = bearer(&headers);
    let (head, versions) = blocking(move || {
        let repo = st.repo.clone();
        authorised(&st, auth.as_deref(), &user, false, |tx| {
            Ok((
                repo.user_state(tx, user.as_str())?.head,
                repo.model_versions(tx, user.as_str())?,
            ))
        })
    })
    .await?;
    Ok(Json(serde_json::json!({ "head": head, "versions": versions })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: u64,
}

async fn rollback(
    State(st): State<ApiState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let user = parse_user(&user)?;
    let auth = bearer(&headers);
    let req: RollbackBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("expected {{\"version\": N}}: {e}"),
        )
    })?;
    let outcome = blocking(move || {
        let repo = st.repo.clone();
        authorised(&st, auth.as_deref(), &user, true, |tx| {
            let Some(rec) = repo.model_version(tx, user.as_str(), req.version)? else {
                return Ok(None);
            };
            let mut state = repo.user_state(tx, user.as_str())?;
            state.head = Some(rec.version);
            state.head_heldout_accuracy = Some(rec.heldout_accuracy);
            state.converged = false;
            repo.put_user_state(tx, user.as_str(), &state)?;
            Ok(Some(rec.version))
        })
    })
    .await?;
    match outcome {
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            "no_such_version",
            format!("version {} was never published", req.version),
        )),
        Some(v) => {
            tracing::warn!(version = v, "head rolled back by an operator");
            Ok(Json(serde_json::json!({ "head": v })).into_response())
        }
    }
}
