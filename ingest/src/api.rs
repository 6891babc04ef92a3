//! The HTTP API (see the crate doc for the routes). Handlers do I/O only through
//! `spawn_blocking` (the store is blocking) and answer errors as JSON
//! `{"error": {"code", "message"}}`. The `Authorization` header is never logged.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use prometheus::IntGauge;
use serde_json::json;
use swimlane_bus::Emitter;
use swimlane_core::batch::BatchLimits;
use swimlane_core::keys::Keys;
use swimlane_core::records::{BatchRecord, BatchStatus};
use swimlane_core::{BatchId, UserId};
use swimlane_runtime::http::blocking;
use swimlane_runtime::{Config, NowMs};
use swimlane_state::tokens::{AuthError, Caller};
use swimlane_state::Repo;
use swimlane_store::Db;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::error::ApiError;
use crate::metrics::{IngestMetrics, ROUTES};
use crate::stage::{self, Encoding, StageOutcome};

/// What a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct IngestState {
    pub(crate) db: Db,
    pub(crate) keys: Keys,
    pub(crate) emitter: Arc<dyn Emitter>,
    pub(crate) metrics: IngestMetrics,
    pub(crate) clock: NowMs,
    pub(crate) max_body_bytes: u64,
    pub(crate) body_timeout: std::time::Duration,
    pub(crate) limits: BatchLimits,
    /// The deployment's model spec: every upload is validated against it.
    pub(crate) spec: Arc<swimlane_core::ModelSpec>,
    /// SHA-256 hex of the admin token, or empty.
    pub(crate) admin_token_sha256: Arc<str>,
    /// One permit per upload in flight (`ingest.max_inflight`), see [`InflightSlot`].
    pub(crate) inflight: Arc<Semaphore>,
    pub(crate) max_inflight: u32,
    /// Uploads in flight per user (`ingest.max_inflight_per_user`), see [`UserPlace`].
    pub(crate) per_user: Arc<Mutex<HashMap<UserId, u32>>>,
    pub(crate) max_per_user: u32,
    /// The body rate rule (`ingest.min_body_bytes_per_sec` after `body_grace_ms`).
    pub(crate) min_body_rate: u64,
    pub(crate) body_grace: std::time::Duration,
    /// The daily cap and the retention policy, enforced when a batch is staged.
    pub(crate) rules: Arc<stage::StagingRules>,
}

/// One upload's place among the `ingest.max_inflight` allowed at once. The handler and
/// every blocking task it starts hold a clone, so the place is given back only when
/// all of them are done: a client that disconnects while its batch is being staged
/// does not free its place while the staging transaction still runs.
#[derive(Clone)]
struct InflightSlot(#[allow(dead_code)] Arc<SlotInner>);

struct SlotInner {
    _permit: OwnedSemaphorePermit,
    gauge: IntGauge,
    /// The user's place, once the caller is authenticated: given back with the slot.
    user: OnceLock<UserPlace>,
}

/// One of a user's `ingest.max_inflight_per_user` places; given back on drop.
struct UserPlace {
    counts: Arc<Mutex<HashMap<UserId, u32>>>,
    user: UserId,
}

impl Drop for UserPlace {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

/// Take one of `user`'s places for the upload holding `slot`, or refuse it (429
/// `too_many_uploads`, `Retry-After`) when the user has every place already. Never
/// waits.
fn admit_user(state: &IngestState, slot: &InflightSlot, user: &UserId) -> Result<(), ApiError> {
    let mut counts = state.per_user.lock().unwrap_or_else(|e| e.into_inner());
    let n = counts.entry(user.clone()).or_insert(0);
    if *n >= state.max_per_user {
        return Err(ApiError::too_many_uploads(state.max_per_user));
    }
    *n += 1;
    drop(counts);
    let place = UserPlace {
        counts: state.per_user.clone(),
        user: user.clone(),
    };
    // A slot is admitted for one user once; a second set would be a bug, and dropping
    // the place it returns gives the count back.
    let _ = slot.0.user.set(place);
    Ok(())
}

impl Drop for SlotInner {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Take a place for an upload, or refuse it (503 `overloaded`, `Retry-After`) when
/// every place is taken. Never waits: a queue would only hide the overload.
fn admit(state: &IngestState) -> Result<InflightSlot, ApiError> {
    let permit = state
        .inflight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::overloaded(state.max_inflight))?;
    state.metrics.inflight.inc();
    Ok(InflightSlot(Arc::new(SlotInner {
        _permit: permit,
        gauge: state.metrics.inflight.clone(),
        user: OnceLock::new(),
    })))
}

impl IngestState {
    /// Build from the config (deployment, limits, admin token hash) and the deps;
    /// registers ingest's metrics (and the store-wide pipeline statistics,
    /// [`crate::metrics::PipelineCollector`]) in `deps.registry`.
    pub fn new(config: &Config, deps: crate::IngestDeps) -> Result<Self, crate::IngestError> {
        crate::metrics::PipelineCollector::register(
            &deps.registry,
            deps.db.clone(),
            Repo::new(Keys::new(&config.deployment)),
            deps.clock.clone(),
        )?;
        Ok(IngestState {
            metrics: IngestMetrics::register(&deps.registry)?,
            db: deps.db,
            keys: Keys::new(&config.deployment),
            emitter: deps.emitter,
            clock: deps.clock,
            max_body_bytes: config.ingest.max_body_bytes,
            body_timeout: std::time::Duration::from_millis(config.ingest.body_timeout_ms),
            limits: BatchLimits {
                max_samples: config.ingest.max_samples_per_batch as usize,
            },
            spec: Arc::new(config.model_spec()?),
            admin_token_sha256: config.admin_token_sha256.as_str().into(),
            inflight: Arc::new(Semaphore::new(config.ingest.max_inflight as usize)),
            max_inflight: config.ingest.max_inflight,
            per_user: Default::default(),
            max_per_user: config.ingest.max_inflight_per_user,
            min_body_rate: config.ingest.min_body_bytes_per_sec,
            body_grace: std::time::Duration::from_millis(config.ingest.body_grace_ms),
            rules: Arc::new(stage::StagingRules {
                retention: config.retention.clone(),
                max_uploads_per_day: config.ingest.max_uploads_per_day,
                target_accuracy: config.policy.target_accuracy,
            }),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }
}

/// The ingest routes:
/// - `POST /v1/users/{user}/batches`
/// - `GET /v1/users/{user}/batches/{batch_id}`
pub fn router(state: IngestState) -> Router {
    let routes = Router::new()
        .route(ROUTES[0].path, post(post_batch))
        .route(ROUTES[1].path, get(get_batch))
        .route(ROUTES[2].path, delete(forget_user));
    let metrics = state.metrics.requests.clone();
    swimlane_runtime::http::api(routes, metrics).with_state(state)
}

fn parse_user(user: String) -> Result<UserId, ApiError> {
    UserId::new(user).map_err(ApiError::bad_user_id)
}

/// Check the request may act for `user`: the admin token, or a live token of `user`
/// (see [`swimlane_state::tokens`]; the admin token and a malformed header need no
/// store read). The `Authorization` header is never logged nor echoed.
async fn authorize(
    state: &IngestState,
    headers: &HeaderMap,
    user: &UserId,
    slot: Option<&InflightSlot>,
) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthenticated(
            "missing bearer token (Authorization: Bearer <token>)",
        ));
    };
    // A value that is not visible ASCII cannot be a token: refused like any malformed one.
    let value = value.to_str().unwrap_or_default().to_string();
    let (db, repo, admin) = (
        state.db.clone(),
        Repo::new(state.keys.clone()),
        state.admin_token_sha256.clone(),
    );
    let slot = slot.cloned();
    let caller = blocking(move || {
        let _slot = slot;
        repo.authenticate_db(&db, Some(&value), &admin)
    })
    .await?
    .map_err(|e| ApiError::store(&e))?;
    caller
        .and_then(|c| c.may_access(user).map(|()| c))
        .map_err(|e| match e {
            AuthError::Unauthenticated => ApiError::unauthenticated(
                "invalid or revoked bearer token (Authorization: Bearer <token>)",
            ),
            AuthError::Forbidden => ApiError::forbidden(),
        })
}

fn encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str()) {
        None => Ok(Encoding::Identity),
        Some(Ok(v)) if v.trim().eq_ignore_ascii_case("identity") => Ok(Encoding::Identity),
        Some(Ok(v)) if v.trim().eq_ignore_ascii_case("gzip") => Ok(Encoding::Gzip),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            "Content-Encoding must be gzip or absent",
        )),
    }
}

/// How fast a body must come: all of it within `total`, and by `grace + bytes so far
/// / min_rate` (when `min_rate > 0`).
#[derive(Clone, Copy)]
struct Pace {
    total: std::time::Duration,
    grace: std::time::Duration,
    min_rate: u64,
}

/// Read at most `max` bytes of body; more is 413 (checked on Content-Length first). A
/// body slower than `pace` is 408: `request_timeout` past the total time,
/// `body_too_slow` below the rate.
async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    max: u64,
    pace: Pace,
) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(stage::too_large(max));
    }
    let start = tokio::time::Instant::now();
    let end = start + pace.total;
    // Sized once from Content-Length (at most `max`, checked above): growing by doubling
    // copied an upload's body about twice over.
    let mut out: Vec<u8> = Vec::with_capacity(declared.unwrap_or(0) as usize);
    loop {
        let by_rate = (pace.min_rate > 0).then(|| {
            start
                + pace.grace
                + std::time::Duration::from_secs_f64(out.len() as f64 / pace.min_rate as f64)
        });
        let deadline = by_rate.map_or(end, |d| d.min(end));
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if deadline < end => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_too_slow",
                    format!(
                        "the request body came slower than {} bytes a second (ingest.min_body_bytes_per_sec); nothing was stored",
                        pace.min_rate
                    ),
                ))
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request body did not arrive in time",
                ))
            }
            Ok(None) => return Ok(out),
            Ok(Some(Err(e))) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("could not read the request body: {e}"),
                ))
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if (out.len() + data.len()) as u64 > max {
                        return Err(stage::too_large(max));
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

fn staged_answer(batch_id: &str, r: &BatchRecord) -> serde_json::Value {
    json!({"batch_id": batch_id, "status": "staged", "samples": r.samples, "heldout": r.heldout})
}

async fn post_batch(
    State(state): State<IngestState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = tracing::info_span!(
        "post_batch",
        user_id = %user,
        batch_id = tracing::field::Empty
    );
    let result = post_batch_inner(&state, user, &headers, body)
        .instrument(span.clone())
        .await;
    let _enter = span.enter();
    match result {
        Ok(r) => r,
        Err(e) => {
            state.metrics.rejected(e.code);
            if e.status.is_server_error() {
                tracing::warn!(
                    code = e.code,
                    status = e.status.as_u16(),
                    "batch not staged"
                );
            } else {
                tracing::info!(code = e.code, status = e.status.as_u16(), "batch refused");
            }
            e.into_response()
        }
    }
}

async fn post_batch_inner(
    state: &IngestState,
    user: String,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let slot = admit(state)?;
    let user = parse_user(user)?;
    // An erased user's uploads are refused before anything else: the device's token
    // was erased with the user, and 410 tells it to stop retrying.
    refuse_forgotten(state, &user).await?;
    authorize(state, headers, &user, Some(&slot)).await?;
    admit_user(state, &slot, &user)?;
    let enc = encoding(headers)?;
    let pace = Pace {
        total: state.body_timeout,
        grace: state.body_grace,
        min_rate: state.min_body_rate,
    };
    let raw = read_body(headers, body, state.max_body_bytes, pace).await?;
    let (max, limits, u, held, spec) = (
        state.max_body_bytes,
        state.limits,
        user.clone(),
        slot.clone(),
        state.spec.clone(),
    );
    let batch = blocking(move || {
        let _slot = held;
        stage::decode_and_validate(&u, &raw, enc, max, limits, &spec)
    })
    .await??;
    tracing::Span::current().record("batch_id", tracing::field::display(&batch.batch_id));

    let (db, keys, emitter, u, rules) = (
        state.db.clone(),
        state.keys.clone(),
        state.emitter.clone(),
        user.clone(),
        state.rules.clone(),
    );
    let now = state.clock.now_ms();
    let batch = Arc::new(batch);
    let b = batch.clone();
    let outcome = blocking(move || {
        let _slot = slot;
        stage::stage_batch(&db, &keys, &emitter, &u, &b, now, &rules)
    })
    .await?
    .map_err(|e| ApiError::store(&e))?;
    let id = batch.batch_id.as_str();
    match outcome {
        StageOutcome::Staged(r, retention) => {
            state.metrics.accepted.inc();
            state.metrics.samples_staged.inc_by(r.samples as u64);
            state.metrics.retired.inc_by(retention.retired as u64);
            state.metrics.forgotten.inc_by(retention.forgotten as u64);
            tracing::info!(
                samples = r.samples,
                heldout = r.heldout,
                retired = retention.retired,
                "batch staged"
            );
            Ok((StatusCode::ACCEPTED, Json(staged_answer(id, &r))).into_response())
        }
        StageOutcome::DailyCap { cap, retry_after_s } => {
            Err(ApiError::daily_cap(cap, retry_after_s))
        }
        StageOutcome::Forgotten => Err(forgotten()),
        StageOutcome::Duplicate(r) => {
            state.metrics.duplicates.inc();
            tracing::info!("batch already staged with the same content; nothing stored");
            Ok((StatusCode::ACCEPTED, Json(staged_answer(id, &r))).into_response())
        }
        StageOutcome::Conflict(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("batch {id} was already staged with a different content; use a new batch id"),
        )),
    }
}

/// 410 `user_forgotten`.
fn forgotten() -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "user_forgotten",
        "this user's data was erased on request; nothing is accepted for this user until an operator re-creates it",
    )
}

/// 410 when `user` is being erased or was.
async fn refuse_forgotten(state: &IngestState, user: &UserId) -> Result<(), ApiError> {
    let (db, repo, u) = (
        state.db.clone(),
        Repo::new(state.keys.clone()),
        user.clone(),
    );
    let gone = blocking(move || {
        db.transact(|tx| swimlane_state::forget::is_forgotten(&repo, tx, u.as_str()))
    })
    .await?
    .map_err(|e| ApiError::store(&e))?;
    if gone {
        return Err(forgotten());
    }
    Ok(())
}

/// `DELETE /v1/users/{user}` (the user's own token or the admin's): erase everything
/// of the user (`swimlane_state::forget`), then answer the receipt. Idempotent: the
/// admin asking again gets the same receipt; the user's token is erased with the
/// user, so asking again with it is 410.
async fn forget_user(
    State(state): State<IngestState>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = parse_user(user)?;
    let span = tracing::info_span!("forget_user", user_id = %user);
    async move {
        let caller = match authorize(&state, &headers, &user, None).await {
            Ok(c) => c,
            Err(e) if e.status == StatusCode::UNAUTHORIZED => {
                refuse_forgotten(&state, &user).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let by = match caller {
            Caller::Admin => "admin",
            Caller::User(_) => "user",
        };
        let (db, repo, clock) = (
            state.db.clone(),
            Repo::new(state.keys.clone()),
            state.clock.clone(),
        );
        let u = user.clone();
        let receipt = blocking(move || {
            swimlane_state::forget::begin(&repo, &db, &u, by, clock.now_ms())?;
            swimlane_state::forget::erase(
                &repo,
                &db,
                &u,
                &|| clock.now_ms(),
                swimlane_state::forget::CHUNK,
                &mut |_| {},
            )
        })
        .await?
        .map_err(|e| ApiError::store(&e))?;
        tracing::warn!(requested_by = by, erased = ?receipt.erased, "user erased on request");
        Ok((StatusCode::OK, Json(receipt)).into_response())
    }
    .instrument(span)
    .await
}

async fn get_batch(
    State(state): State<IngestState>,
    Path((user, batch_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let span = tracing::info_span!("get_batch", user_id = %user, batch_id = %batch_id);
    let result = get_batch_inner(&state, user, batch_id, &headers)
        .instrument(span)
        .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn get_batch_inner(
    state: &IngestState,
    user: String,
    batch_id: String,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let user = parse_user(user)?;
    authorize(state, headers, &user, None).await?;
    let batch_id = BatchId::new(batch_id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_batch_id", e.to_string()))?;
    let (db, keys, u, b) = (
        state.db.clone(),
        state.keys.clone(),
        user.clone(),
        batch_id.clone(),
    );
    let record = blocking(move || stage::batch_record(&db, &keys, &u, b.as_str()))
        .await?
        .map_err(|e| ApiError::store(&e))?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no batch {batch_id} for user {user}"),
            )
        })?;
    let mut answer = json!({
        "batch_id": batch_id.as_str(),
        "samples": record.samples,
        "heldout": record.heldout,
        "staged_at_ms": record.staged_at_ms,
    });
    let fields = match &record.status {
        BatchStatus::Staged => json!({"status": "staged"}),
        BatchStatus::Deferred { reason } => json!({"status": "deferred", "reason": reason}),
        BatchStatus::Validating { run_id } => json!({"status": "validating", "run_id": run_id}),
        BatchStatus::Published { run_id, version } => {
            json!({"status": "published", "run_id": run_id, "version": version})
        }
        BatchStatus::Rejected { run_id, reason } => {
            json!({"status": "rejected", "run_id": run_id, "reason": reason})
        }
        BatchStatus::Retired { reason } => json!({"status": "retired", "reason": reason}),
    };
    for (k, v) in fields.as_object().expect("an object") {
        answer[k] = v.clone();
    }
    Ok((StatusCode::OK, Json(answer)).into_response())
}
