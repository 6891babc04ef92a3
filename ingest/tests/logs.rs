//! What ingest logs. Its own test binary: tracing caches per-callsite interest
//! process-wide, so a thread-local subscriber only sees everything when no other test
//! runs in the same process.
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::json;
use swimlane_bus::embedded::EmbeddedBus;
use swimlane_core::keys::Keys;
use swimlane_core::{StrokeClass, UserId, WINDOW_FEATURES, WINDOW_FRAMES};
use swimlane_ingest::{router, IngestDeps, IngestState};
use swimlane_runtime::telemetry::CapturedLogs;
use swimlane_runtime::{Config, ManualWallClock};
use swimlane_state::tokens::{hash_token, new_token};
use swimlane_state::Repo;
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::Db;
use tower::ServiceExt;

#[tokio::test(flavor = "current_thread")]
async fn logs_carry_user_and_batch_ids_and_never_a_token() {
    let buf = CapturedLogs::default();
    let _guard = tracing::subscriber::set_default(buf.subscriber());
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(EmbeddedBackend::open_in_dir(dir.path()).unwrap());
    let admin = new_token();
    let config = Config {
        deployment: "test".into(),
        admin_token_sha256: hash_token(&admin),
        ..Config::default()
    };
    let keys = Keys::new(&config.deployment);
    let repo = Repo::new(keys.clone());
    let (alice, bob) = (new_token(), new_token());
    db.transact(|tx| {
        repo.put_token(tx, &UserId::new("alice").unwrap(), &alice, 1)?;
        repo.put_token(tx, &UserId::new("bob").unwrap(), &bob, 1)
    })
    .unwrap();
    let deps = IngestDeps {
        db: db.clone(),
        emitter: Arc::new(EmbeddedBus::new(keys.clone(), 2)),
        registry: prometheus::Registry::new(),
        clock: Arc::new(ManualWallClock::new(1)),
    };
    let app = router(IngestState::new(&config, deps).unwrap());
    let post = |token: &str, batch_id: &str| {
        let samples: Vec<_> = (0..2)
            .map(|i| json!({"id": format!("s{i}"), "frames": vec![vec![0.5; WINDOW_FEATURES]; WINDOW_FRAMES], "label": StrokeClass::Glide.name()}))
            .collect();
        Request::post("/v1/users/alice/batches")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(
                json!({"batch_id": batch_id, "samples": samples}).to_string(),
            ))
            .unwrap()
    };
    let r = app.clone().oneshot(post(&alice, "b-log")).await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = app.clone().oneshot(post(&bob, "b-x")).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = app.clone().oneshot(post(&admin, "b-y")).await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let logs = buf.text();
    assert!(
        logs.contains("batch staged")
            && logs.contains("user_id=alice")
            && logs.contains("batch_id=b-log"),
        "{logs}"
    );
    for t in [&alice, &bob, &admin] {
        assert!(!logs.contains(t.as_str()), "a token leaked into the logs");
        assert!(
            !logs.contains(&hash_token(t)),
            "a token hash leaked into the logs"
        );
    }
}
