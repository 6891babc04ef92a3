//! swimlane-ingest: the device-facing upload API, step 1 of a batch's flow.
//!
//! Routes (errors are `{"error": {"code": "...", "message": "..."}}`):
//! - `POST /v1/users/{user}/batches` with `Authorization: Bearer <token>` and a JSON
//!   or binary body (optionally `Content-Encoding: gzip`), see `swimlane_core::batch`:
//!   - 202 `{"batch_id", "status": "staged", "samples", "heldout"}`: staged now, or
//!     already staged with the same content (a retry: nothing is stored twice);
//!   - 400 with a validation code (`malformed_json`, `bad_frame_count`,
//!     `non_finite_value`, ...; see `BatchError::CODES`), `bad_user_id`, `bad_gzip`,
//!     `bad_body`; 401 `unauthenticated`; 403 `forbidden` (another user's token);
//!     409 `conflict` (the batch id was staged with other content); 413
//!     `payload_too_large` (raw or decompressed body over `ingest.max_body_bytes`); 415
//!     `unsupported_encoding`; 408 `request_timeout` (body slower than
//!     `ingest.body_timeout_ms`) or `body_too_slow` (below
//!     `ingest.min_body_bytes_per_sec` after `ingest.body_grace_ms`); 429
//!     `too_many_uploads` with `Retry-After` (the user already has
//!     `ingest.max_inflight_per_user` uploads in flight: nothing stored); 429
//!     `daily_cap` with `Retry-After` (the user has staged
//!     `ingest.max_uploads_per_day` uploads today, UTC: nothing stored); 503 `store_unavailable` with `Retry-After` (the
//!     staging transaction ran out of retries on conflicts or a busy store, or took too
//!     long: nothing was stored); 503 `overloaded` with `Retry-After` (already
//!     `ingest.max_inflight` uploads in flight: refused before anything was read or
//!     stored); 500 `internal`.
//! - `GET /v1/users/{user}/batches/{batch_id}` (same auth): 200 with `status` one of
//!   `staged`, `deferred` (+`reason`), `validating` (+`run_id`), `published` (+`run_id`,
//!   `version`), `rejected` (+`run_id`, `reason`), `retired` (+`reason`: out of the
//!   user's retained history, `swimlane_core::policy::RetentionPolicy`); 404
//!   `not_found`.
//!
//! A request's head must arrive within `ingest.header_timeout_ms`, or the connection
//! is closed (`swimlane_runtime::serve_draining`).
//!
//! Invariants: everything is validated before anything is written; a batch is staged
//! in one transaction with its `BatchStaged` event (see [`stage`]); tokens are only
//! ever handled as SHA-256 hashes, by [`swimlane_state::tokens`] (issued with
//! `swimlane admin token create`).
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::Registry;
use swimlane_bus::Emitter;
use swimlane_runtime::ops::Readiness;
use swimlane_runtime::CancellationToken;
use swimlane_runtime::{Config, NowMs};
use swimlane_store::Db;
use tokio::task::JoinHandle;

pub mod api;
pub mod error;
pub mod metrics;
pub mod stage;

pub use api::{router, IngestState};
pub use error::{ApiError, IngestError};

/// What ingest runs on, built by the caller (the binary, `swimlane dev`, tests).
#[derive(Clone)]
pub struct IngestDeps {
    pub db: Db,
    /// Where `BatchStaged` is emitted, inside the staging transaction.
    pub emitter: Arc<dyn Emitter>,
    /// Ingest's metrics are registered here (and served on `ingest.metrics_listen`).
    pub registry: Registry,
    /// `staged_at_ms` comes from here.
    pub clock: NowMs,
}

/// A started ingest worker.
pub struct Running {
    /// Where the API listens.
    pub api_addr: SocketAddr,
    /// Where /metrics, /healthz and /readyz listen.
    pub ops_addr: SocketAddr,
    /// Ends once the shutdown token is cancelled and in-flight requests finished.
    pub handle: JoinHandle<Result<(), IngestError>>,
}

/// Bind the API (`ingest.listen`) and ops server (`ingest.metrics_listen`), and serve
/// until `shutdown` is cancelled; then stop accepting, finish in-flight requests (each
/// staging transaction commits whole or not at all) and return.
pub async fn start(
    config: Config,
    deps: IngestDeps,
    shutdown: CancellationToken,
) -> Result<Running, IngestError> {
    let registry = deps.registry.clone();
    swimlane_runtime::register_store_metrics(&registry, "ingest", &deps.db)?;
    let state = IngestState::new(&config, deps)?;
    resume_erasures(&state);
    let ready = Readiness::new();
    let ops = swimlane_runtime::serve_ops(
        config.ingest.metrics_listen,
        registry,
        ready.clone(),
        shutdown.clone(),
    )
    .await?;
    let listener = swimlane_runtime::bind(config.ingest.listen, "ingest API").await?;
    let api_addr = listener.local_addr().map_err(IngestError::Serve)?;
    tracing::info!(%api_addr, deployment = %config.deployment, "ingest API listening");
    ready.set(true);
    let options = swimlane_runtime::ServeOptions {
        what: "ingest",
        drain: std::time::Duration::from_millis(config.ingest.drain_timeout_ms),
        header_timeout: std::time::Duration::from_millis(config.ingest.header_timeout_ms),
        header_timeouts: state.metrics.requests.header_timeouts.clone(),
    };
    let app = router(state);
    let handle = tokio::spawn(async move {
        let served = swimlane_runtime::serve_draining(listener, app, ready, shutdown, options)
            .await
            .map_err(IngestError::Serve);
        let ops_done = ops
            .handle
            .await
            .map_err(|e| IngestError::Task(e.to_string()))?
            .map_err(IngestError::Serve);
        served.and(ops_done)
    });
    Ok(Running {
        api_addr,
        ops_addr: ops.local_addr,
        handle,
    })
}

/// [`start`], then wait until it has drained.
pub async fn run(
    config: Config,
    deps: IngestDeps,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let running = start(config, deps, shutdown).await?;
    running
        .handle
        .await
        .map_err(|e| IngestError::Task(e.to_string()))?
}

/// Run a whole ingest process from its config: store, bus, signal handling, the API
/// and the ops server, until SIGTERM/SIGINT. What `swimlane-ingest` and
/// `swimlane worker ingest` run.
pub async fn run_process(config: Config) -> Result<(), IngestError> {
    let db = swimlane_runtime::open_store(&config)?;
    let emitter = swimlane_runtime::wiring::emitter(&config)?;
    let shutdown = CancellationToken::new();
    swimlane_runtime::shutdown_signal(shutdown.clone());
    let deps = IngestDeps {
        db,
        emitter,
        registry: swimlane_runtime::new_registry(),
        clock: swimlane_runtime::system_now_ms(),
    };
    run(config, deps, shutdown).await
}

/// Finish, in the background, the erasures a crash interrupted
/// (`swimlane_state::forget::unfinished`): their users' uploads are refused meanwhile.
fn resume_erasures(state: &IngestState) {
    let (db, repo, clock) = (
        state.db.clone(),
        swimlane_state::Repo::new(state.keys().clone()),
        state.clock.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let users = match swimlane_state::forget::unfinished(&repo, &db) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "cannot list unfinished erasures; they finish at the next start or with `swimlane admin forget`");
                return;
            }
        };
        for user in users {
            let done = swimlane_state::forget::erase(
                &repo,
                &db,
                &user,
                &|| clock.now_ms(),
                swimlane_state::forget::CHUNK,
                &mut |_| {},
            );
            match done {
                Ok(r) => {
                    tracing::warn!(user_id = %user, erased = ?r.erased, "interrupted erasure finished")
                }
                Err(e) => {
                    tracing::error!(user_id = %user, error = %e, "interrupted erasure failed; it is retried at the next start")
                }
            }
        }
    });
}
