//! The device-facing model API.
//!
//! - `GET /v1/users/{user}/model`: the user's current model, as safetensors
//!   (`Content-Type: application/vnd.swimlane.safetensors`) or, with `?format=onnx` or
//!   `Accept: application/onnx`, as ONNX (`Content-Type: application/onnx`; the file the
//!   publisher made when it published the version, see `swimlane_model::onnx`). Both
//!   carry `X-Model-Version` (the same version in both formats), `X-Model-Sha256` (hex
//!   SHA-256 of the body, for the device to verify its download) and a strong `ETag`
//!   (the quoted SHA-256 of that format's file), `Content-Disposition` with a file name
//!   and `Vary: Accept`; `If-None-Match` matching the current ETag of the requested
//!   format (a list, `W/` and `*` are understood) answers 304 with no body; 404
//!   `no_model` while the user has none (the device keeps the base model); 400
//!   `bad_format` for a `format` other than `safetensors` or `onnx`; 404
//!   `onnx_unavailable` for a version published before ONNX export existed. `format`
//!   wins over `Accept`; `Accept` picks ONNX when it ranks `application/onnx` above
//!   `application/vnd.swimlane.safetensors` (q-values; unlisted counts as 0).
//! - `GET /v1/users/{user}/model/versions`: every version with its live accuracy
//!   (from the uploads' feedback), held-out metrics and
//!   lineage, and the current head.
//! - `GET /v1/users/{user}/history`: the user's history
//!   (`swimlane_state::history::History`): every version with its parent, batches,
//!   verdict, held-out and live accuracy, standing (probation, promoted, rolled back and
//!   by whom) and the periods it was live; the rollbacks; the newest runs and how each
//!   ended.
//! - `GET /admin/history`: a page (HTML and script, no user data in it) that shows one
//!   user's history: the versions on a timeline and held-out and live accuracy over
//!   time. It reads `GET /v1/users/{user}/history` in the browser with the token the
//!   operator gives it (typed in, or in the URL's fragment `#user=U&token=T`, which
//!   browsers never send to the server), so the page route itself needs no token.
//! - `POST /v1/admin/users/{user}/rollback` `{"version": N}` (admin token): point the
//!   head at an earlier published version; the version it leaves is marked rolled back
//!   by an operator and its batches are deferred until new evidence arrives
//!   (`swimlane_state::lifecycle::roll_back`); 200 `{"head": N}`, 404 `no_such_version`,
//!   400 `bad_json`.
//!
//! Every route authenticates the bearer token and checks that the caller may access
//! the user in the path before reading anything of that user (or the request body):
//! 401 `unauthenticated` (with `WWW-Authenticate: Bearer`) for a missing, malformed,
//! unknown or revoked token; 403 `forbidden` for another user's token, or a user token
//! on the admin route; 400 `bad_user_id`. Errors, including unknown routes (404
//! `not_found`) and methods (405 `method_not_allowed`), are JSON
//! `{"error": {"code": "...", "message": "..."}}` and never contain the token; 503
//! `store_unavailable` carries `Retry-After`.
use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use swimlane_core::records::{ModelVersionRecord, StoredFile};
use swimlane_core::UserId;
use swimlane_state::tokens::{AuthError, Caller};
use swimlane_state::{lifecycle, Repo};
use swimlane_store::{Db, KvError};

use swimlane_runtime::http::{blocking, ApiError};

use crate::metrics::PublisherMetrics;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub db: Db,
    pub repo: Repo,
    /// SHA-256 (hex) of the admin token; empty: no admin.
    pub admin_token_sha256: Arc<str>,
    pub metrics: PublisherMetrics,
    /// One permit per request reading the store (`publisher.max_concurrent_reads`).
    pub reads: Arc<tokio::sync::Semaphore>,
    /// The wall clock (when a rollback happened).
    pub now: swimlane_core::clock::NowMs,
}

impl ApiState {
    /// Run `f` (a store read) on a blocking thread once one of the `reads` permits is
    /// free: requests beyond the limit wait as futures, not as threads holding a model.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let _permit = self
            .reads
            .acquire()
            .await
            .map_err(|_| ApiError::internal())?;
        blocking(f).await
    }
}

/// The publisher's routes.
pub fn router(state: ApiState) -> Router {
    use crate::metrics::ROUTES;
    let routes = Router::new()
        .route(ROUTES[0].path, get(get_model))
        .route(ROUTES[1].path, get(list_versions))
        .route(ROUTES[2].path, post(rollback))
        .route(ROUTES[3].path, get(history))
        .route(ROUTES[4].path, get(history_page));
    let metrics = state.metrics.requests.clone();
    swimlane_runtime::http::api(routes, metrics).with_state(state)
}

fn parse_user(raw: Result<Path<String>, PathRejection>) -> Result<UserId, ApiError> {
    let Path(raw) =
        raw.map_err(|_| ApiError::bad_user_id("the user id in the path does not decode"))?;
    UserId::new(raw).map_err(ApiError::bad_user_id)
}

/// Does an `If-None-Match` value match `etag`? Weak comparison (RFC 9110 13.1.2): a
/// list of entity tags, each possibly `W/`, or `*` (we have a current representation).
fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match.split(',').map(str::trim).any(|t| {
        let t = t.strip_prefix("W/").unwrap_or(t);
        t == "*" || t == etag
    })
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
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
        .map_err(|e| ApiError::store(&e))?;
    r.map_err(ApiError::from)
}

/// A read of the user in the path, by a caller who may read that user (their own
/// token or the admin's), in one store transaction under a read permit.
async fn read_user<T: Send + 'static>(
    st: &ApiState,
    user: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    read: impl Fn(&Repo, &mut swimlane_store::Transaction<'_>, &str) -> Result<T, KvError>
        + Send
        + 'static,
) -> Result<T, ApiError> {
    let user = parse_user(user)?;
    let auth = bearer(headers);
    let st2 = st.clone();
    st.read(move || {
        let repo = st2.repo.clone();
        authorised(&st2, auth.as_deref(), &user, false, |tx| {
            read(&repo, tx, user.as_str())
        })
    })
    .await?
}

/// The formats `GET /model` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    Safetensors,
    Onnx,
}

impl ModelFormat {
    pub const SAFETENSORS_TYPE: &'static str = "application/vnd.swimlane.safetensors";
    pub const ONNX_TYPE: &'static str = "application/onnx";

    fn content_type(self) -> &'static str {
        match self {
            ModelFormat::Safetensors => Self::SAFETENSORS_TYPE,
            ModelFormat::Onnx => Self::ONNX_TYPE,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            ModelFormat::Safetensors => "safetensors",
            ModelFormat::Onnx => "onnx",
        }
    }

    /// The format asked for: `format` from the query, else the `Accept` header's
    /// ranking of the two media types, else safetensors.
    fn requested(format: Option<&str>, accept: Option<&str>) -> Result<ModelFormat, ApiError> {
        match format {
            Some("safetensors") => return Ok(ModelFormat::Safetensors),
            Some("onnx") => return Ok(ModelFormat::Onnx),
            Some(other) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_format",
                    format!("format {other:?} is not one of safetensors, onnx"),
                ))
            }
            None => {}
        }
        let q = |media: &str| accept.map_or(0.0, |a| accept_q(a, media));
        if q(Self::ONNX_TYPE) > q(Self::SAFETENSORS_TYPE) {
            Ok(ModelFormat::Onnx)
        } else {
            Ok(ModelFormat::Safetensors)
        }
    }
}

/// The q-value an `Accept` header gives exactly `media` (0 when it is not listed;
/// a malformed q counts as 0).
fn accept_q(accept: &str, media: &str) -> f32 {
    accept
        .split(',')
        .filter_map(|range| {
            let mut parts = range.split(';').map(str::trim);
            let ty = parts.next()?;
            if !ty.eq_ignore_ascii_case(media) {
                return None;
            }
            let mut q = 1.0;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = v.trim().parse::<f32>().unwrap_or(0.0).clamp(0.0, 1.0);
                    }
                }
            }
            Some(q)
        })
        .fold(0.0, f32::max)
}

#[derive(Deserialize)]
struct ModelQuery {
    format: Option<String>,
}

/// What `GET /model` found.
enum Head {
    /// The caller may read the user's model but the query was bad.
    BadRequest,
    None,
    /// The version exists but has no file in the requested format.
    Unavailable(ModelVersionRecord),
    NotModified(ModelVersionRecord, String),
    Model(ModelVersionRecord, String, Vec<u8>),
}

async fn get_model(
    State(st): State<ApiState>,
    user: Result<Path<String>, PathRejection>,
    query: Result<Query<ModelQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = parse_user(user)?;
    let auth = bearer(&headers);
    // A bad query is answered only once the caller is known to be allowed (401/403
    // first, as everywhere).
    let requested = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))
        .and_then(|Query(q)| {
            ModelFormat::requested(
                q.format.as_deref(),
                headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
            )
        });
    let asked = requested.as_ref().ok().copied();
    let inm = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let st2 = st.clone();
    let u = user.clone();
    let found = st
        .read(move || {
            let repo = st2.repo.clone();
            authorised(&st2, auth.as_deref(), &u, false, |tx| {
                let Some(format) = asked else {
                    return Ok(Head::BadRequest);
                };
                let state = repo.user_state(tx, u.as_str())?;
                let Some(v) = state.head else {
                    return Ok(Head::None);
                };
                let Some(rec) = repo.model_version(tx, u.as_str(), v)? else {
                    return Ok(Head::None);
                };
                let file = match format {
                    ModelFormat::Safetensors => StoredFile {
                        blob: rec.model_blob.clone(),
                        sha256: rec.sha256.clone(),
                        size_bytes: rec.size_bytes,
                        prefix_blob: None,
                        splices: Vec::new(),
                    },
                    ModelFormat::Onnx => match &rec.onnx {
                        Some(f) => f.clone(),
                        None => return Ok(Head::Unavailable(rec)),
                    },
                };
                let (blob, sha) = (file.blob.clone(), file.sha256.clone());
                let etag = format!("\"{sha}\"");
                if inm.as_deref().is_some_and(|h| etag_matches(h, &etag)) {
                    return Ok(Head::NotModified(rec, sha));
                }
                // A head whose file is gone is a broken store, not "not modified".
                let bytes = repo
                    .stored_file(tx, &file)?
                    .ok_or_else(|| KvError::Corrupt {
                        what: format!("model blob {blob}"),
                        reason: format!("missing for published version {}", rec.version),
                    })?;
                Ok(Head::Model(rec, sha, bytes))
            })
        })
        .await??;
    let format = match requested {
        Ok(format) => format,
        Err(e) => return Err(e), // the caller is allowed: now say what was wrong
    };
    let (rec, sha, bytes) = match found {
        Head::BadRequest => return Err(ApiError::internal()), // only when `requested` is an error
        Head::None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_model",
                "no personal model published yet; use the base model",
            ))
        }
        Head::Unavailable(rec) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "onnx_unavailable",
                format!(
                    "version {} was published before ONNX export existed; use the safetensors file",
                    rec.version
                ),
            ))
        }
        Head::NotModified(rec, sha) => (rec, sha, None),
        Head::Model(rec, sha, b) => (rec, sha, Some(b)),
    };
    let disposition = format!(
        "attachment; filename=\"model-v{}.{}\"",
        rec.version,
        format.extension()
    );
    let (Ok(etag), Ok(sha), Ok(disposition)) = (
        HeaderValue::from_str(&format!("\"{sha}\"")),
        HeaderValue::from_str(&sha),
        HeaderValue::from_str(&disposition),
    ) else {
        tracing::error!(user_id = %user, version = rec.version, "model version record has an unusable sha256");
        return Err(ApiError::internal());
    };
    let mut h = HeaderMap::new();
    h.insert(header::ETAG, etag);
    h.insert("x-model-version", HeaderValue::from(rec.version));
    h.insert("x-model-sha256", sha);
    h.insert(header::VARY, HeaderValue::from_static("Accept"));
    match bytes {
        None => Ok((StatusCode::NOT_MODIFIED, h).into_response()),
        Some(b) => {
            st.metrics.model_downloads.inc();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            h.insert(header::CONTENT_DISPOSITION, disposition);
            Ok((StatusCode::OK, h, b).into_response())
        }
    }
}

async fn list_versions(
    State(st): State<ApiState>,
    user: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (head, versions, live) = read_user(&st, user, &headers, |repo, tx, u| {
        Ok((
            repo.user_state(tx, u)?.head,
            repo.model_versions(tx, u)?,
            repo.live(tx, u)?,
        ))
    })
    .await?;
    // Each version with what the device's uploads said of it since (`live`: windows it
    // classified, those the user confirmed, their ratio); `base_live` for the base model.
    let live_json = |v: u64| {
        let c = live.get(&v).copied().unwrap_or_default();
        serde_json::json!({"windows": c.windows, "right": c.right, "accuracy": c.accuracy()})
    };
    let versions: Vec<serde_json::Value> = versions
        .iter()
        .map(|rec| {
            let mut j = serde_json::to_value(rec).unwrap_or_default();
            j["live"] = live_json(rec.version);
            j
        })
        .collect();
    Ok(Json(serde_json::json!({
        "head": head,
        "versions": versions,
        "base_live": live_json(0),
    }))
    .into_response())
}

async fn history(
    State(st): State<ApiState>,
    user: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let h = read_user(&st, user, &headers, swimlane_state::history::user_history).await?;
    Ok(Json(h).into_response())
}

/// The history page: static, the same for everyone (see the module doc).
async fn history_page() -> Response {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The page runs only its own inline script and talks only to this origin.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    (StatusCode::OK, h, HISTORY_PAGE).into_response()
}

const HISTORY_PAGE: &str = include_str!("history.html");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: u64,
}

async fn rollback(
    State(st): State<ApiState>,
    user: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let user = parse_user(user)?;
    let auth = bearer(&headers);
    // Authenticate before looking at the body: a caller who may not roll back learns
    // nothing from it (401/403, never 400).
    let st2 = st.clone();
    let u = user.clone();
    blocking(move || authorised(&st2, auth.as_deref(), &u, true, |_| Ok(()))).await??;
    let req: RollbackBody = body
        .map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    format!("expected {{\"version\": N}}: {e}"),
                )
            })
        })?;
    let auth = bearer(&headers);
    let u = user.clone();
    let outcome = blocking(move || {
        let repo = st.repo.clone();
        // Authorised again in the writing transaction: a token revoked meanwhile fails.
        authorised(&st, auth.as_deref(), &u, true, |tx| {
            if repo.model_version(tx, u.as_str(), req.version)?.is_none() {
                return Ok(None);
            }
            let reason = format!("an operator pointed the head at version {}", req.version);
            let now_ms = st.now.now_ms();
            lifecycle::roll_back(
                &repo,
                tx,
                u.as_str(),
                Some(req.version),
                &reason,
                "operator",
                now_ms,
            )?;
            Ok(Some(req.version))
        })
    })
    .await??;
    match outcome {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_version",
            format!("version {} was never published", req.version),
        )),
        Some(v) => {
            tracing::warn!(user_id = %user, version = v, "head rolled back by an operator");
            Ok(Json(serde_json::json!({ "head": v })).into_response())
        }
    }
}
