//! The publisher process stops on shutdown even with a model API request stuck in
//! flight: after `publisher.drain_timeout_ms` it closes what is left (as ingest does;
//! both serve through `swimlane_runtime::serve_draining`).
use std::time::Duration;

use swimlane_state::tokens::{hash_token, new_token};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn shutdown_stops_waiting_for_a_stuck_request_after_the_drain_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let admin = new_token();
    let mut c = swimlane_runtime::Config::default();
    c.store = dir.path().join("store").display().to_string();
    c.deployment = "drain".into();
    c.publisher.listen = "127.0.0.1:0".parse().unwrap();
    c.publisher.metrics_listen = "127.0.0.1:0".parse().unwrap();
    c.publisher.drain_timeout_ms = 200;
    c.admin_token_sha256 = hash_token(&admin);
    let running = swimlane_publisher::start(c).await.unwrap();
    // An admin request whose body never completes: the handler waits for it.
    let mut s = tokio::net::TcpStream::connect(running.api_addr)
        .await
        .unwrap();
    s.write_all(
        format!(
            "POST /v1/admin/users/alice/rollback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running.handle)
        .await
        .expect("the drain deadline ends the server")
        .unwrap()
        .unwrap();
}
