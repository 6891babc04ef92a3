//! The operations server every process runs: `/metrics` (Prometheus text exposition),
//! `/healthz` (200 while the process serves), `/readyz` (200 once the worker says it
//! is ready, 503 before that and while draining; while it waits for something it needs,
//! the 503's body says what).
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::encode_metrics;
use crate::RuntimeError;

/// Whether the worker is ready for traffic, and if not, what it waits for. Cheap to
/// clone; starts not ready.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<ReadyState>);

#[derive(Debug, Default)]
struct ReadyState {
    ready: AtomicBool,
    waiting_for: Mutex<Option<String>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set(&self, ready: bool) {
        if ready {
            *self.0.waiting_for.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        self.0.ready.store(ready, Ordering::SeqCst)
    }
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::SeqCst)
    }
    /// Not ready until `what` (said in `/readyz`'s body) is there.
    pub fn wait_for(&self, what: impl Into<String>) {
        self.0.ready.store(false, Ordering::SeqCst);
        *self.0.waiting_for.lock().unwrap_or_else(|p| p.into_inner()) = Some(what.into());
    }
    /// What the worker waits for, if it said.
    pub fn waiting_for(&self) -> Option<String> {
        self.0
            .waiting_for
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    ready: Readiness,
}

/// The ops routes, to mount or serve.
pub fn ops_router(registry: Registry, ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { registry, ready })
}

async fn metrics(State(s): State<OpsState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        encode_metrics(&s.registry),
    )
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    if s.ready.is_ready() {
        return (StatusCode::OK, "ready\n".to_string());
    }
    match s.ready.waiting_for() {
        Some(what) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {what}\n"),
        ),
        None => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string()),
    }
}

/// A running ops server.
#[derive(Debug)]
pub struct OpsServer {
    /// The bound address (useful when listening on port 0).
    pub local_addr: SocketAddr,
    /// Ends once `shutdown` is cancelled and open connections close.
    pub handle: JoinHandle<std::io::Result<()>>,
}

/// Bind `listen` (the error names the address) and serve the ops routes until
/// `shutdown` is cancelled.
pub async fn serve_ops(
    listen: SocketAddr,
    registry: Registry,
    ready: Readiness,
    shutdown: CancellationToken,
) -> Result<OpsServer, RuntimeError> {
    let listener = crate::bind(listen, "metrics and health server").await?;
    let local_addr = listener.local_addr().map_err(|source| RuntimeError::Bind {
        what: "metrics and health server",
        addr: listen,
        source,
    })?;
    let app = ops_router(registry, ready);
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    });
    tracing::info!(%local_addr, "serving /metrics, /healthz, /readyz");
    Ok(OpsServer { local_addr, handle })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn endpoints_answer_and_the_server_stops_on_shutdown() {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("swimlane_test_things_total", "things").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc_by(3);
        let ready = Readiness::new();
        let token = CancellationToken::new();
        let srv = serve_ops(
            "127.0.0.1:0".parse().unwrap(),
            registry,
            ready.clone(),
            token.clone(),
        )
        .await
        .unwrap();
        let addr = srv.local_addr;
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await, (503, "not ready\n".into()));
        ready.wait_for("the base model");
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: waiting for the base model\n".into())
        );
        ready.set(true);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
        assert_eq!(ready.waiting_for(), None);
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("swimlane_test_things_total 3"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);

        // The port is taken now: a second bind fails with a clear error.
        let e = serve_ops(addr, Registry::new(), Readiness::new(), token.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&addr.to_string()) && e.contains("metrics"),
            "{e}"
        );

        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), srv.handle)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
