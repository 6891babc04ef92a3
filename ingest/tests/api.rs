//! The ingest API against the real embedded store, the real embedded bus and the real
//! router (in-process via `tower::ServiceExt::oneshot`, and over TCP for `start`).
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use swimlane_bus::embedded::EmbeddedBus;
use swimlane_bus::Emitter;
use swimlane_core::events::topics;
use swimlane_core::keys::Keys;
use swimlane_core::records::{decode_chunk, is_heldout, BatchRecord, BatchStatus};
use swimlane_core::{Event, StrokeClass, UserId, WINDOW_FEATURES, WINDOW_FRAMES};
use swimlane_ingest::{router, IngestDeps, IngestState};
use swimlane_runtime::{Config, ManualWallClock};
use swimlane_state::tokens::{hash_token, new_token};
use swimlane_state::Repo;
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::faults::{Fault, FaultyBackend};
use swimlane_store::{Db, KeyValue, KvError, ManualClock, RangeOption, RetryOptions};
use tower::ServiceExt;

const PARTITIONS: u32 = 4;
const NOW_MS: u64 = 1_790_000_000_000;
const MAX_BODY: u64 = 1 << 20;
const MAX_SAMPLES: u32 = 100;

/// Issue a token for `user` the way `swimlane admin token create` does.
fn create_token(db: &Db, keys: &Keys, user: &UserId, now_ms: u64) -> Result<String, KvError> {
    let token = new_token();
    let repo = Repo::new(keys.clone());
    db.transact(|tx| repo.put_token(tx, user, &token, now_ms))?;
    Ok(token)
}

struct Harness {
    _dir: tempfile::TempDir,
    db: Db,
    keys: Keys,
    bus: EmbeddedBus,
    registry: prometheus::Registry,
    app: Router,
    clock: Arc<ManualWallClock>,
    alice: String,
    bob: String,
    admin: String,
}

fn config() -> Config {
    let mut c = Config {
        deployment: "test".into(),
        partitions: PARTITIONS,
        ..Config::default()
    };
    c.ingest.max_body_bytes = MAX_BODY;
    c.ingest.max_samples_per_batch = MAX_SAMPLES;
    c.ingest.body_timeout_ms = 300;
    c
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(EmbeddedBackend::open_in_dir(dir.path()).unwrap());
        Self::with_db(dir, db)
    }

    fn with_db(dir: tempfile::TempDir, db: Db) -> Self {
        Self::with_config(dir, db, |_| {})
    }

    /// A harness whose config `edit` changes first (e.g. another model spec).
    fn with_config(dir: tempfile::TempDir, db: Db, edit: impl FnOnce(&mut Config)) -> Self {
        let mut c = config();
        edit(&mut c);
        let admin = new_token();
        c.admin_token_sha256 = hash_token(&admin);
        c.validate().unwrap();
        let keys = Keys::new(&c.deployment);
        let bus = EmbeddedBus::new(keys.clone(), c.partitions);
        let registry = prometheus::Registry::new();
        let clock = Arc::new(ManualWallClock::new(NOW_MS));
        let deps = IngestDeps {
            db: db.clone(),
            emitter: Arc::new(bus.clone()),
            registry: registry.clone(),
            clock: clock.clone(),
        };
        let state = IngestState::new(&c, deps).unwrap();
        let (alice, bob) = (String::new(), String::new());
        let mut h = Harness {
            _dir: dir,
            db,
            keys,
            bus,
            registry,
            app: router(state),
            clock,
            alice,
            bob,
            admin,
        };
        // Tokens are made only when the store works (the broken-store test has none).
        if let Ok(t) = create_token(&h.db, &h.keys, &uid("alice"), NOW_MS) {
            h.alice = t;
            h.bob = create_token(&h.db, &h.keys, &uid("bob"), NOW_MS).unwrap();
        }
        h
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .unwrap();
        out
    }

    /// Every event in the bus log, all partitions of the batches topic.
    fn events(&self) -> Vec<Event> {
        let all = self.bus.read_all(&self.db, topics::BATCHES).unwrap();
        all.iter()
            .map(|(_, r)| Event::decode(&r.payload).unwrap())
            .collect()
    }

    fn user_keys(&self, user: &str) -> Vec<KeyValue> {
        self.db
            .transact(|tx| tx.get_range(&RangeOption::prefix(&self.keys.user_prefix(user))))
            .unwrap()
    }

    /// Nothing of `user` in the store and no event on the bus.
    fn assert_nothing_staged(&self, user: &str, case: &str) {
        assert!(
            self.user_keys(user).is_empty(),
            "{case}: keys stored for {user}"
        );
        assert!(self.events().is_empty(), "{case}: events emitted");
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, v, headers)
    }

    async fn post(&self, user: &str, token: &str, body: impl Into<Vec<u8>>) -> (StatusCode, Value) {
        let body = body.into();
        let req = Request::post(format!("/v1/users/{user}/batches"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .unwrap();
        let (s, v, _) = self.send(req).await;
        (s, v)
    }

    async fn get(&self, user: &str, batch: &str, token: &str) -> (StatusCode, Value) {
        let req = Request::get(format!("/v1/users/{user}/batches/{batch}"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let (s, v, _) = self.send(req).await;
        (s, v)
    }
}

fn uid(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

fn frames(seed: usize) -> Value {
    let f: Vec<Vec<f64>> = (0..WINDOW_FRAMES)
        .map(|i| {
            (0..WINDOW_FEATURES)
                .map(|j| ((seed * 7 + i * 3 + j) % 100) as f64 / 100.0)
                .collect()
        })
        .collect();
    json!(f)
}

fn batch(id: &str, n: usize) -> Value {
    let samples: Vec<Value> = (0..n)
        .map(|i| {
            json!({"id": format!("s{i}"), "frames": frames(i), "label": StrokeClass::ALL[i % 6].name()})
        })
        .collect();
    json!({"batch_id": id, "samples": samples})
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

/// Ingest started over TCP on loopback ports, with the test config that `edit` changes
/// first, and a token for alice.
struct Served {
    _dir: tempfile::TempDir,
    db: Db,
    keys: Keys,
    token: String,
    shutdown: swimlane_runtime::CancellationToken,
    running: swimlane_ingest::Running,
}

async fn serve(edit: impl FnOnce(&mut Config)) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(EmbeddedBackend::open_in_dir(dir.path()).unwrap());
    let mut c = config();
    c.ingest.listen = "127.0.0.1:0".parse().unwrap();
    c.ingest.metrics_listen = "127.0.0.1:0".parse().unwrap();
    edit(&mut c);
    let keys = Keys::new(&c.deployment);
    let token = create_token(&db, &keys, &uid("alice"), NOW_MS).unwrap();
    let emitter: Arc<dyn Emitter> = Arc::new(EmbeddedBus::new(keys.clone(), c.partitions));
    let shutdown = swimlane_runtime::CancellationToken::new();
    let running = swimlane_ingest::start(
        c,
        IngestDeps {
            db: db.clone(),
            emitter,
            registry: prometheus::Registry::new(),
            clock: Arc::new(ManualWallClock::new(NOW_MS)),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    Served {
        _dir: dir,
        db,
        keys,
        token,
        shutdown,
        running,
    }
}

/// One HTTP/1.1 exchange on a new connection to `addr`: the whole answer.
async fn http(addr: std::net::SocketAddr, req: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn happy_path_stages_chunks_record_and_event() {
    let h = Harness::new();
    let body = batch("b-1", 90);
    let (status, v) = h.post("alice", &h.alice, body.to_string()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let heldout = (0..90)
        .filter(|i| is_heldout("alice", "b-1", &format!("s{i}")))
        .count() as u64;
    assert_eq!(
        v,
        json!({"batch_id": "b-1", "status": "staged", "samples": 90, "heldout": heldout})
    );

    // The record.
    let rec = h.db.get(&h.keys.batch("alice", "b-1")).unwrap().unwrap();
    let rec = BatchRecord::decode(&rec).unwrap();
    assert_eq!(rec.status, BatchStatus::Staged);
    assert_eq!(
        (rec.samples, rec.heldout as u64, rec.chunks),
        (90, heldout, 3)
    );
    assert_eq!(rec.staged_at_ms, NOW_MS);
    assert!(rec.digest.starts_with("blake3:"), "{}", rec.digest);

    // The chunks: 40 + 40 + 10 samples, the training ones first and the held-out ones
    // after them, each in upload order, with their split and values.
    assert_eq!(rec.chunk_samples, 40);
    let chunks =
        h.db.transact(|tx| {
            tx.get_range(&RangeOption::prefix(
                &h.keys.samples_of_batch("alice", "b-1"),
            ))
        })
        .unwrap();
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[0].0, h.keys.sample_chunk("alice", "b-1", 0));
    let samples: Vec<_> = chunks
        .iter()
        .flat_map(|(_, v)| decode_chunk(v).unwrap())
        .collect();
    assert_eq!(decode_chunk(&chunks[2].1).unwrap().len(), 10);
    assert_eq!(samples.len(), 90);
    let split =
        |held: bool| (0..90).filter(move |i| is_heldout("alice", "b-1", &format!("s{i}")) == held);
    let order: Vec<String> = split(false)
        .chain(split(true))
        .map(|i| format!("s{i}"))
        .collect();
    let ids: Vec<String> = samples.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, order);
    for s in &samples {
        let i: usize = s.id[1..].parse().unwrap();
        assert_eq!(s.label, StrokeClass::ALL[i % 6].into());
        assert_eq!(s.heldout, is_heldout("alice", "b-1", &s.id));
        assert_eq!(
            s.frames[17] as f64,
            body["samples"][i]["frames"][1][1].as_f64().unwrap() as f32 as f64
        );
    }

    // The event, on the user's partition.
    assert_eq!(
        h.events(),
        vec![Event::BatchStaged {
            user: uid("alice"),
            batch_id: "b-1".parse().unwrap(),
            samples: 90
        }]
    );

    let m = h.metrics();
    assert!(
        m.contains("swimlane_ingest_batches_accepted_total 1"),
        "{m}"
    );
    assert!(m.contains("swimlane_ingest_samples_staged_total 90"), "{m}");
    assert!(
        m.contains("swimlane_ingest_request_seconds_count{route=\"post_batch\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("swimlane_ingest_responses_total{class=\"2xx\",route=\"post_batch\"} 1"),
        "{m}"
    );
    // Staged now (the harness clock does not move), not yet settled.
    assert!(
        m.contains("swimlane_pipeline_oldest_pending_batch_age_seconds 0"),
        "{m}"
    );

    // Its status.
    let (s, v) = h.get("alice", "b-1", &h.alice).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "staged");
    assert_eq!(v["samples"], 90);
    assert_eq!(v["staged_at_ms"], NOW_MS);
}

#[tokio::test]
async fn gzip_body_is_accepted() {
    let h = Harness::new();
    let body = gzip(batch("gz", 5).to_string().as_bytes());
    let req = Request::post("/v1/users/alice/batches")
        .header(header::AUTHORIZATION, format!("Bearer {}", h.alice))
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(body))
        .unwrap();
    let (s, v, _) = h.send(req).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["samples"], 5);
    assert_eq!(h.events().len(), 1);
}

#[tokio::test]
async fn a_retry_answers_the_same_and_stores_nothing_twice() {
    let h = Harness::new();
    let body = batch("b-1", 45);
    let (s1, v1) = h.post("alice", &h.alice, body.to_string()).await;
    assert_eq!(s1, StatusCode::ACCEPTED);
    let before = h.user_keys("alice");
    // The same batch, formatted differently and gzipped: the same content.
    let pretty = serde_json::to_string_pretty(&body).unwrap();
    let req = Request::post("/v1/users/alice/batches")
        .header(header::AUTHORIZATION, format!("Bearer {}", h.alice))
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(gzip(pretty.as_bytes())))
        .unwrap();
    let (s2, v2, _) = h.send(req).await;
    assert_eq!(s2, StatusCode::ACCEPTED);
    assert_eq!(v1, v2);
    let (s3, v3) = h.post("alice", &h.alice, body.to_string()).await;
    assert_eq!((s3, &v3), (StatusCode::ACCEPTED, &v1));
    assert_eq!(h.user_keys("alice"), before, "nothing rewritten");
    assert_eq!(h.events().len(), 1, "one event");
    let m = h.metrics();
    assert!(
        m.contains("swimlane_ingest_batches_accepted_total 1"),
        "{m}"
    );
    assert!(
        m.contains("swimlane_ingest_batches_duplicate_total 2"),
        "{m}"
    );
    assert!(m.contains("swimlane_ingest_samples_staged_total 45"), "{m}");
}

/// A batch staged by an earlier release carries the SHA-256 of the canonical encoding
/// (the digest is BLAKE3 now): the same batch re-sent is still a duplicate, and other
/// content under its id still a conflict.
#[tokio::test]
async fn a_batch_staged_with_the_old_sha256_digest_is_still_recognised() {
    let h = Harness::new();
    let body = batch("b-1", 12);
    let (s1, v1) = h.post("alice", &h.alice, body.to_string()).await;
    assert_eq!(s1, StatusCode::ACCEPTED);
    // The record as an earlier release wrote it.
    let validated = swimlane_ingest::stage::decode_and_validate(
        &uid("alice"),
        body.to_string().as_bytes(),
        swimlane_ingest::stage::Encoding::Identity,
        1 << 24,
        swimlane_core::batch::BatchLimits::default(),
        &swimlane_core::ModelSpec::synthetic_pose(),
    )
    .unwrap();
    let key = h.keys.batch("alice", "b-1");
    let mut rec = BatchRecord::decode(&h.db.get(&key).unwrap().unwrap()).unwrap();
    assert_eq!(rec.digest, validated.digest);
    rec.digest = swimlane_core::batch::digest_sha256(&validated.batch_id, &validated.samples);
    assert_eq!(rec.digest.len(), 64);
    h.db.transact(|tx| tx.set(&key, &rec.encode())).unwrap();
    let before = h.user_keys("alice");

    let (s2, v2) = h.post("alice", &h.alice, body.to_string()).await;
    assert_eq!((s2, &v2), (StatusCode::ACCEPTED, &v1));
    let mut other = body.clone();
    other["samples"][3]["label"] = json!("glide");
    let (s3, v3) = h.post("alice", &h.alice, other.to_string()).await;
    assert_eq!(s3, StatusCode::CONFLICT, "{v3}");
    assert_eq!(h.user_keys("alice"), before, "nothing rewritten");
    assert_eq!(h.events().len(), 1, "one event");
}

/// `v` (a batch as [`batch`] makes it) as a binary upload: the document without the
/// windows, then their little-endian `f32`s (docs/batch-format.md).
fn binary(v: &Value) -> Vec<u8> {
    let mut doc = v.clone();
    let mut windows: Vec<Vec<f32>> = Vec::new();
    for s in doc["samples"].as_array_mut().unwrap() {
        let f = s.as_object_mut().unwrap().remove("frames").unwrap();
        windows.push(
            f.as_array()
                .unwrap()
                .iter()
                .flat_map(|row| row.as_array().unwrap().iter())
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
        );
    }
    let refs: Vec<&[f32]> = windows.iter().map(Vec::as_slice).collect();
    swimlane_core::batch::binary_upload(doc.to_string().as_bytes(), &refs)
}

#[tokio::test]
async fn a_binary_upload_is_the_same_batch_and_a_damaged_one_stages_nothing() {
    let h = Harness::new();
    let body = batch("bin-1", 12);
    let (s1, v1) = h.post("alice", &h.alice, binary(&body)).await;
    assert_eq!(s1, StatusCode::ACCEPTED, "{v1}");
    assert_eq!(
        (v1["samples"].as_u64(), v1["status"].as_str()),
        (Some(12), Some("staged"))
    );
    let before = h.user_keys("alice");
    // The same batch sent as JSON, or gzipped binary: a retry, not a conflict.
    let (s2, v2) = h.post("alice", &h.alice, body.to_string()).await;
    assert_eq!((s2, &v2), (StatusCode::ACCEPTED, &v1));
    let req = Request::post("/v1/users/alice/batches")
        .header(header::AUTHORIZATION, format!("Bearer {}", h.alice))
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(gzip(&binary(&body))))
        .unwrap();
    let (s3, v3, _) = h.send(req).await;
    assert_eq!((s3, &v3), (StatusCode::ACCEPTED, &v1));
    assert_eq!(h.user_keys("alice"), before, "nothing rewritten");
    assert_eq!(h.events().len(), 1, "one event");
    // Damaged: a window short. A 400 with its code and reason, nothing of bob stored.
    let mut short = binary(&batch("bin-2", 3));
    short.truncate(short.len() - 4);
    let (s, v) = h.post("bob", &h.bob, short).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "bad_binary"),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("of its 3 samples"),
        "{v}"
    );
    assert!(h.user_keys("bob").is_empty());
    assert_eq!(h.events().len(), 1);
}

#[tokio::test]
async fn same_batch_id_with_other_content_is_409() {
    let h = Harness::new();
    let body = batch("b-1", 3);
    assert_eq!(
        h.post("alice", &h.alice, body.to_string()).await.0,
        StatusCode::ACCEPTED
    );
    let before = h.user_keys("alice");
    let mut other = body.clone();
    other["samples"][1]["label"] = json!("glide");
    let (s, v) = h.post("alice", &h.alice, other.to_string()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(code(&v), "conflict");
    assert_eq!(h.user_keys("alice"), before);
    assert_eq!(h.events().len(), 1);
    // The same id for another user is another batch.
    assert_eq!(
        h.post("bob", &h.bob, other.to_string()).await.0,
        StatusCode::ACCEPTED
    );
    assert!(h
        .metrics()
        .contains("swimlane_ingest_batches_rejected_total{reason=\"conflict\"} 1"));
}

/// Every bad-input class: the documented status and code, and nothing staged.
#[tokio::test]
async fn bad_inputs_are_refused_with_their_code_and_stage_nothing() {
    let good = batch("b-1", 3);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = good.clone();
        f(&mut b);
        b.to_string()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed json", "{\"batch_id\": ".into(), "malformed_json"),
        ("not an object", "[1,2]".into(), "malformed_json"),
        (
            "NaN literal",
            good.to_string().replacen("0.0", "NaN", 1),
            "malformed_json",
        ),
        (
            "unknown field",
            with(&|b| b["extra"] = json!(1)),
            "malformed_json",
        ),
        (
            "bad batch id",
            with(&|b| b["batch_id"] = json!("../etc")),
            "bad_batch_id",
        ),
        ("zero samples", batch("b-1", 0).to_string(), "no_samples"),
        (
            "too many samples",
            batch("b-1", MAX_SAMPLES as usize + 1).to_string(),
            "too_many_samples",
        ),
        (
            "empty sample id",
            with(&|b| b["samples"][1]["id"] = json!("")),
            "empty_sample_id",
        ),
        (
            "long sample id",
            with(&|b| b["samples"][1]["id"] = json!("x".repeat(200))),
            "sample_id_too_long",
        ),
        (
            "duplicate sample id",
            with(&|b| b["samples"][2]["id"] = json!("s0")),
            "duplicate_sample_id",
        ),
        (
            "31 frames",
            with(&|b| {
                b["samples"][0]["frames"].as_array_mut().unwrap().pop();
            }),
            "bad_frame_count",
        ),
        (
            "33 frames",
            with(&|b| {
                b["samples"][0]["frames"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!(vec![0.0; 16]))
            }),
            "bad_frame_count",
        ),
        (
            "15 features",
            with(&|b| {
                b["samples"][2]["frames"][9].as_array_mut().unwrap().pop();
            }),
            "bad_feature_count",
        ),
        (
            "f32 overflow",
            with(&|b| b["samples"][1]["frames"][4][2] = json!(1e39)),
            "non_finite_value",
        ),
        (
            "negative f32 overflow",
            with(&|b| b["samples"][1]["frames"][4][2] = json!(-1e300)),
            "non_finite_value",
        ),
        (
            "f64 overflow",
            good.to_string().replacen("0.0", "1e999", 1),
            "malformed_json",
        ),
        (
            "string value",
            with(&|b| b["samples"][1]["frames"][0][0] = json!("0.5")),
            "malformed_json",
        ),
        (
            "unknown label",
            with(&|b| b["samples"][1]["label"] = json!("doggy_paddle")),
            "unknown_label",
        ),
        (
            "label case",
            with(&|b| b["samples"][1]["label"] = json!("Freestyle")),
            "unknown_label",
        ),
    ];
    for (name, body, want) in cases {
        let h = Harness::new();
        let (s, v) = h.post("alice", &h.alice, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{name}: {v}");
        assert_eq!(code(&v), want, "{name}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        h.assert_nothing_staged("alice", name);
        let m = h.metrics();
        assert!(
            m.contains(&format!(
                "swimlane_ingest_batches_rejected_total{{reason=\"{want}\"}} 1"
            )),
            "{name}: {m}"
        );
        assert!(
            m.contains("swimlane_ingest_responses_total{class=\"4xx\",route=\"post_batch\"} 1"),
            "{name}: {m}"
        );
    }
}

#[tokio::test]
async fn a_deployment_of_another_spec_refuses_other_shapes_and_classes_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(EmbeddedBackend::open_in_dir(dir.path()).unwrap());
    let h = Harness::with_config(dir, db, |c| c.spec = "smartwatch".into());
    // A pose window (32 frames of 16) on a smartwatch deployment (64 frames of 6).
    let (s, v) = h.post("alice", &h.alice, batch("b-1", 2).to_string()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(code(&v), "bad_frame_count");
    assert_eq!(
        v["error"]["message"],
        "sample 0 (\"s0\") has 32 frames, expected 64"
    );
    h.assert_nothing_staged("alice", "a pose window");
    // The spec's shape, a class of another spec.
    let window = json!(vec![vec![0.5; 6]; 64]);
    let body = |label: &str| {
        json!({"batch_id": "b-2", "samples": [
            {"id": "a", "frames": window, "label": "null"},
            {"id": "b", "frames": window, "label": label}]})
        .to_string()
    };
    let (s, v) = h.post("alice", &h.alice, body("glide")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(code(&v), "unknown_label");
    assert!(
        v["error"]["message"].as_str().unwrap().ends_with(
            "expected one of null, freestyle, breaststroke, backstroke, butterfly, turn"
        ),
        "{v}"
    );
    h.assert_nothing_staged("alice", "a pose class");
    // The spec's shape and classes: staged.
    let (s, v) = h.post("alice", &h.alice, body("turn")).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
}

#[tokio::test]
async fn the_error_message_names_the_sample_and_frame() {
    let h = Harness::new();
    let mut b = batch("b-1", 3);
    b["samples"][2]["frames"][9].as_array_mut().unwrap().pop();
    let (_, v) = h.post("alice", &h.alice, b.to_string()).await;
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("sample 2") && m.contains("frame 9") && m.contains("15 features"),
        "{m}"
    );
}

#[tokio::test]
async fn oversized_bodies_are_413_raw_and_decompressed() {
    // Raw, announced by Content-Length.
    let h = Harness::new();
    let big = format!("{}{}", " ".repeat(MAX_BODY as usize + 1), batch("b-1", 1));
    let (s, v) = h.post("alice", &h.alice, big.clone()).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    h.assert_nothing_staged("alice", "raw with length");

    // Raw, streamed without Content-Length.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .into_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let req = Request::post("/v1/users/alice/batches")
        .header(header::AUTHORIZATION, format!("Bearer {}", h.alice))
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    let (s, v, _) = h.send(req).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    h.assert_nothing_staged("alice", "raw streamed");

    // A gzip bomb: 64 MiB of whitespace compress to ~64 KiB; it must hit the limit,
    // not memory.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let spaces = vec![b' '; 1 << 20];
    for _ in 0..64 {
        e.write_all(&spaces).unwrap();
    }
    e.write_all(batch("b-1", 1).to_string().as_bytes()).unwrap();
    let bomb = e.finish().unwrap();
    assert!((bomb.len() as u64) < MAX_BODY);
    let req = Request::post("/v1/users/alice/batches")
        .header(header::AUTHORIZATION, format!("Bearer {}", h.alice))
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(bomb))
        .unwrap();
    let (s, v, _) = h.send(req).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    h.assert_nothing_staged("alice", "gzip bomb");
    assert!(h
        .metrics()
        .contains("swimlane_ingest_batches_rejected_total{reason=\"payload_too_large\"} 3"));
}

#[tokio::test]
async fn bad_encodings_are_refused_and_stage_nothing() {
    let h = Harness::new();
    let body = batch("b-1", 2).to_string();
    let send = |enc: &'static str, bytes: Vec<u8>| {
        Request::post("/v1/users/alice/batches")
            .header(header::AUTHORIZATION, format!("Bearer {}", h.alice))
            .header(header::CONTENT_ENCODING, enc)
            .body(Body::from(bytes))
            .unwrap()
    };
    let (s, v, _) = h.send(send("gzip", body.clone().into_bytes())).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_gzip"));
    let mut truncated = gzip(body.as_bytes());
    truncated.truncate(truncated.len() / 2);
    let (s, v, _) = h.send(send("gzip", truncated)).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_gzip"));
    let (s, v, _) = h.send(send("br", body.clone().into_bytes())).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding")
    );
    h.assert_nothing_staged("alice", "encodings");
}

#[tokio::test]
async fn missing_wrong_revoked_and_other_users_tokens_are_refused() {
    let h = Harness::new();
    let body = batch("b-1", 2).to_string();
    let no_token = Request::post("/v1/users/alice/batches")
        .body(Body::from(body.clone()))
        .unwrap();
    let (s, v, headers) = h.send(no_token).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthenticated"));
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    let basic = Request::post("/v1/users/alice/batches")
        .header(header::AUTHORIZATION, format!("Basic {}", h.alice))
        .body(Body::from(body.clone()))
        .unwrap();
    assert_eq!(h.send(basic).await.0, StatusCode::UNAUTHORIZED);
    let guessed = new_token();
    let (s, v) = h.post("alice", &guessed, body.clone()).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthenticated"));
    // Bob's valid token on Alice's path.
    let (s, v) = h.post("alice", &h.bob, body.clone()).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"));
    let (s, v) = h.get("alice", "b-1", &h.bob).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"));
    // A bad user id in the path.
    let (s, v) = h.post("al%20ice", &h.alice, body.clone()).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_user_id"));
    h.assert_nothing_staged("alice", "auth");
    h.assert_nothing_staged("bob", "auth");
    // A revoked token stops working.
    let repo = Repo::new(h.keys.clone());
    assert!(h.db.transact(|tx| repo.revoke_token(tx, &h.alice)).unwrap());
    let (s, v) = h.post("alice", &h.alice, body.clone()).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthenticated"));
    h.assert_nothing_staged("alice", "revoked");
    // Error messages never echo a token.
    for t in [&h.alice, &h.bob, &guessed] {
        assert!(!v.to_string().contains(t.as_str()));
        assert!(!h.metrics().contains(t.as_str()));
    }
    let m = h.metrics();
    assert!(
        m.contains("swimlane_ingest_batches_rejected_total{reason=\"unauthenticated\"} 4"),
        "{m}"
    );
    assert!(
        m.contains("swimlane_ingest_batches_rejected_total{reason=\"forbidden\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn the_admin_token_may_act_for_any_user() {
    let h = Harness::new();
    let (s, v) = h.post("carol", &h.admin, batch("b-9", 2).to_string()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let (s, v) = h.get("carol", "b-9", &h.admin).await;
    assert_eq!((s, &v["status"]), (StatusCode::OK, &json!("staged")));
}

#[tokio::test]
async fn status_follows_the_record_and_unknown_batches_are_404() {
    let h = Harness::new();
    assert_eq!(
        h.post("alice", &h.alice, batch("b-1", 2).to_string())
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let (s, v) = h.get("alice", "b-2", &h.alice).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, v) = h.get("alice", "b..1?", &h.alice).await;
    assert_ne!(s, StatusCode::OK, "{v}");
    let key = h.keys.batch("alice", "b-1");
    let set = |status: BatchStatus| {
        h.db.transact(|tx| {
            let mut r = BatchRecord::decode(&tx.get(&key)?.unwrap()).unwrap();
            r.status = status.clone();
            tx.set(&key, &r.encode())
        })
        .unwrap()
    };
    set(BatchStatus::Validating {
        run_id: "r1".into(),
    });
    let (_, v) = h.get("alice", "b-1", &h.alice).await;
    assert_eq!(
        (&v["status"], &v["run_id"]),
        (&json!("validating"), &json!("r1"))
    );
    set(BatchStatus::Published {
        run_id: "r1".into(),
        version: 3,
    });
    let (_, v) = h.get("alice", "b-1", &h.alice).await;
    assert_eq!(
        (&v["status"], &v["version"]),
        (&json!("published"), &json!(3))
    );
    set(BatchStatus::Rejected {
        run_id: Some("r1".into()),
        reason: "no gain".into(),
    });
    let (_, v) = h.get("alice", "b-1", &h.alice).await;
    assert_eq!(
        (&v["status"], &v["reason"]),
        (&json!("rejected"), &json!("no gain"))
    );
    // A retry after the batch moved on still answers as the upload did.
    let (s, v) = h.post("alice", &h.alice, batch("b-1", 2).to_string()).await;
    assert_eq!((s, &v["status"]), (StatusCode::ACCEPTED, &json!("staged")));
}

#[tokio::test]
async fn store_failures_are_503_with_retry_after_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, fault) = FaultyBackend::new(
        EmbeddedBackend::open_in_dir(dir.path()).unwrap(),
        Arc::new(ManualClock::new()),
    );
    let db = Db::new(backend).with_retry(RetryOptions {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
    });
    let h = Harness::with_db(dir, db);
    fault.set(Fault::Unavailable);
    let body = batch("b-1", 50).to_string();
    // The admin token needs no store read, so this reaches the staging transaction.
    let req = Request::post("/v1/users/alice/batches")
        .header(header::AUTHORIZATION, format!("Bearer {}", h.admin))
        .body(Body::from(body.clone()))
        .unwrap();
    let (s, v, headers) = h.send(req).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
    );
    assert_eq!(headers[header::RETRY_AFTER], "1");
    // A user token lookup fails the same way.
    let (s, v) = h.post("alice", &h.alice, body.clone()).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
    );
    // Both answers count as 5xx (what the ingest-5xx alert watches).
    let m = h.metrics();
    assert!(
        m.contains("swimlane_ingest_responses_total{class=\"5xx\",route=\"post_batch\"} 2"),
        "{m}"
    );
    fault.set(Fault::None);
    h.assert_nothing_staged("alice", "failed commits");
    // Once the store recovers, the retry stages the batch.
    let (s, _) = h.post("alice", &h.alice, body).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(h.events().len(), 1);
}

#[tokio::test]
async fn start_serves_api_and_ops_over_tcp_and_drains_on_shutdown() {
    let Served {
        _dir,
        db,
        keys,
        token,
        shutdown,
        running,
    } = serve(|_| {}).await;

    let body = batch("b-tcp", 3).to_string();
    let resp = http(
        running.api_addr,
        format!(
            "POST /v1/users/alice/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    let ready = http(
        running.ops_addr,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = http(
        running.ops_addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    assert!(
        metrics.contains("swimlane_ingest_batches_accepted_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("swimlane_ingest_store_commits_total"),
        "{metrics}"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.handle)
        .await
        .expect("drains")
        .unwrap()
        .unwrap();
    assert!(db.get(&keys.batch("alice", "b-tcp")).unwrap().is_some());
}

#[tokio::test]
async fn a_body_that_never_finishes_is_408_and_stages_nothing() {
    let h = Harness::new();
    let first: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(b"{\"batch_id\": ".to_vec())];
    let stream =
        futures::StreamExt::chain(futures::stream::iter(first), futures::stream::pending());
    let req = Request::post("/v1/users/alice/batches")
        .header(header::AUTHORIZATION, format!("Bearer {}", h.alice))
        .body(Body::from_stream(stream))
        .unwrap();
    let (s, v, _) = h.send(req).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::REQUEST_TIMEOUT, "request_timeout")
    );
    h.assert_nothing_staged("alice", "slow body");
}

#[tokio::test]
async fn shutdown_stops_waiting_for_a_stuck_request_after_the_drain_deadline() {
    use tokio::io::AsyncWriteExt;
    let Served {
        _dir,
        db,
        keys,
        token,
        shutdown,
        running,
    } = serve(|c| {
        c.ingest.body_timeout_ms = 60_000;
        c.ingest.drain_timeout_ms = 200;
    })
    .await;
    // A request whose body never completes.
    let mut s = tokio::net::TcpStream::connect(running.api_addr)
        .await
        .unwrap();
    s.write_all(
        format!("POST /v1/users/alice/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n{{").as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running.handle)
        .await
        .expect("the drain deadline ends the server")
        .unwrap()
        .unwrap();
    assert!(db
        .transact(|tx| tx.get_range(&RangeOption::prefix(&keys.user_prefix("alice"))))
        .unwrap()
        .is_empty());
    drop(s);
}

#[tokio::test]
async fn uploads_past_the_daily_cap_are_429_until_the_next_utc_day() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(EmbeddedBackend::open_in_dir(dir.path()).unwrap());
    let h = Harness::with_config(dir, db, |c| c.ingest.max_uploads_per_day = 2);
    for id in ["d-1", "d-2"] {
        let (s, v) = h.post("alice", &h.alice, batch(id, 5).to_string()).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    // A retry of a staged batch is not a new upload.
    let (s, _) = h.post("alice", &h.alice, batch("d-2", 5).to_string()).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    // The third upload of the day: 429 with the reason and the time to midnight UTC.
    let body = batch("d-3", 5).to_string();
    let req = Request::post("/v1/users/alice/batches")
        .header(header::AUTHORIZATION, format!("Bearer {}", h.alice))
        .body(Body::from(body.clone()))
        .unwrap();
    let (s, v, headers) = h.send(req).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::TOO_MANY_REQUESTS, "daily_cap"),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ingest.max_uploads_per_day"),
        "{v}"
    );
    let day = 86_400_000;
    let to_midnight = (NOW_MS / day + 1) * day - NOW_MS;
    assert_eq!(
        headers[header::RETRY_AFTER].to_str().unwrap(),
        to_midnight.div_ceil(1000).to_string()
    );
    assert!(h.db.get(&h.keys.batch("alice", "d-3")).unwrap().is_none());
    // Another user has a cap of their own.
    let (s, v) = h.post("bob", &h.bob, batch("d-1", 5).to_string()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert!(h
        .metrics()
        .contains("swimlane_ingest_batches_rejected_total{reason=\"daily_cap\"} 1"));
    // The next UTC day the count starts again, and only that day's count is kept.
    h.clock.set((NOW_MS / day + 1) * day);
    let (s, v) = h.post("alice", &h.alice, body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let counts: Vec<KeyValue> = h
        .user_keys("alice")
        .into_iter()
        .filter(|(k, _)| k.starts_with(&h.keys.uploads("alice")))
        .collect();
    assert_eq!(counts.len(), 1, "one day's count is kept");
}

#[tokio::test]
async fn staging_retires_what_falls_out_of_the_users_retained_windows() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(EmbeddedBackend::open_in_dir(dir.path()).unwrap());
    let h = Harness::with_config(dir, db, |c| {
        c.retention.max_training_windows = 100;
        c.retention.max_heldout_windows = 20;
        c.retention.max_batch_records = 3;
    });
    // Five uploads of 90 windows, one a second: each keeps the two newest batches
    // (about 144 training and 36 held-out windows; one alone is under the budget).
    for (i, id) in ["r-1", "r-2", "r-3", "r-4", "r-5"].iter().enumerate() {
        h.clock.set(NOW_MS + i as u64 * 1000);
        let (s, v) = h.post("alice", &h.alice, batch(id, 90).to_string()).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    let (s, v) = h.post("bob", &h.bob, batch("r-1", 90).to_string()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let h = &h;
    let status = |id: &'static str| async move { h.get("alice", id, &h.alice).await };
    for id in ["r-4", "r-5"] {
        let (s, v) = status(id).await;
        assert_eq!(
            (s, v["status"].as_str()),
            (StatusCode::OK, Some("staged")),
            "{id}"
        );
    }
    // r-3 is retired: its status says why, and its samples are gone.
    let (s, v) = status("r-3").await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("retired")),
        "{v}"
    );
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("retention.max_training_windows"),
        "{reason}"
    );
    assert!(reason.contains("never trained"), "{reason}");
    let chunks = |user: &str, id: &str| {
        h.db.transact(|tx| tx.get_range(&RangeOption::prefix(&h.keys.samples_of_batch(user, id))))
            .unwrap()
            .len()
    };
    assert_eq!(chunks("alice", "r-3"), 0);
    assert_eq!(chunks("alice", "r-5"), 3);
    // r-1 and r-2 were retired too, and their records forgotten (3 records are kept).
    for id in ["r-1", "r-2"] {
        let (s, _) = status(id).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{id}");
        assert_eq!(chunks("alice", id), 0);
    }
    // Another user's batch of the same id is untouched.
    assert_eq!(chunks("bob", "r-1"), 3);
    // The pending index holds only what is still staged.
    let pending =
        h.db.transact(|tx| tx.get_range(&RangeOption::prefix(&h.keys.pending_batches())))
            .unwrap();
    let mut pending: Vec<(String, String)> = pending
        .iter()
        .map(|(k, _)| {
            let (_, u, b) = h.keys.pending_batch_of(k).unwrap();
            (u, b)
        })
        .collect();
    pending.sort();
    let want = [("alice", "r-4"), ("alice", "r-5"), ("bob", "r-1")];
    assert_eq!(pending, want.map(|(u, b)| (u.to_string(), b.to_string())));
    let m = h.metrics();
    assert!(m.contains("swimlane_ingest_batches_retired_total 3"), "{m}");
    assert!(
        m.contains("swimlane_ingest_batch_records_forgotten_total 2"),
        "{m}"
    );
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_at_the_header_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Served {
        _dir,
        token,
        shutdown,
        running,
        ..
    } = serve(|c| {
        c.ingest.header_timeout_ms = 300;
    })
    .await;
    // One connection sends half a request head, another nothing at all: the server
    // closes both (what it answers first, if anything, is hyper's business).
    let mut half = tokio::net::TcpStream::connect(running.api_addr)
        .await
        .unwrap();
    half.write_all(b"POST /v1/users/alice/batches HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(running.api_addr)
        .await
        .unwrap();
    for (what, conn) in [("half a head", &mut half), ("nothing", &mut silent)] {
        let mut out = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut out)).await;
        assert!(
            closed.is_ok(),
            "a connection that sent {what} is still open"
        );
        let text = String::from_utf8_lossy(&out);
        assert!(!text.starts_with("HTTP/1.1 2"), "{what}: {text}");
    }
    // Both are counted: by the connection's task, which may finish just after the
    // client saw the close, so the scrape is repeated until it does (or 10 s pass).
    let ops = running.ops_addr;
    let scrape = || {
        http(
            ops,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(),
        )
    };
    let counted = tokio::time::timeout(Duration::from_secs(10), async {
        while !scrape()
            .await
            .contains("swimlane_ingest_header_timeouts_total 2")
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(counted.is_ok(), "{}", scrape().await);
    // A whole request on a new connection is served as before.
    let body = batch("b-head", 3).to_string();
    let out = http(
        running.api_addr,
        format!(
            "POST /v1/users/alice/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 202"), "{out}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.handle)
        .await
        .expect("drains")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn feedback_counts_live_accuracy_per_model_version() {
    let h = Harness::new();
    // Format 2: windows the base model and version 3 classified, corrected or confirmed.
    let sample = |i: usize, kind: &str, version: Option<u64>| {
        let label = StrokeClass::ALL[i % 6];
        let predicted = if kind == "confirmed" {
            label
        } else {
            StrokeClass::ALL[(i + 1) % 6]
        };
        json!({"id": format!("s{i}"), "frames": frames(i), "label": label.name(),
               "feedback": {"kind": kind, "predicted": predicted.name(), "model_version": version}})
    };
    let body = json!({"format": 2, "batch_id": "live-1", "samples": [
        sample(0, "confirmed", None), sample(1, "corrected", None),
        sample(2, "confirmed", Some(3)), sample(3, "confirmed", Some(3)),
        sample(4, "corrected", Some(3)),
        {"id": "s5", "frames": frames(5), "label": "turn"},
    ]});
    let (s, v) = h.post("alice", &h.alice, body.to_string()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // A retry counts nothing twice.
    let (s, _) = h.post("alice", &h.alice, body.to_string()).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let repo = Repo::new(h.keys.clone());
    let live = h.db.transact(|tx| repo.live(tx, "alice")).unwrap();
    let got: Vec<(u64, u64, u64)> = live.iter().map(|(v, c)| (*v, c.windows, c.right)).collect();
    assert_eq!(got, vec![(0, 2, 1), (3, 3, 2)]);
    assert!(h.db.transact(|tx| repo.live(tx, "bob")).unwrap().is_empty());
    let m = h.metrics();
    assert!(m.contains("swimlane_live_windows_total 5"), "{m}");
    assert!(m.contains("swimlane_live_windows_right_total 3"), "{m}");
}

#[tokio::test]
async fn a_converged_users_upload_with_no_correction_waits_deferred_until_a_correction_arrives() {
    let h = Harness::new();
    let repo = Repo::new(h.keys.clone());
    let target = config().policy.target_accuracy;
    // Alice's head reached the target on held-out windows.
    h.db.transact(|tx| {
        let mut s = repo.user_state(tx, "alice")?;
        s.converged = true;
        s.head_heldout_accuracy = Some(target + 0.01);
        repo.put_user_state(tx, "alice", &s)
    })
    .unwrap();
    let upload = |id: &str, corrected: &[usize], n: usize| {
        let samples: Vec<Value> = (0..n)
            .map(|i| {
                let label = StrokeClass::ALL[i % 6];
                let (kind, predicted) = if corrected.contains(&i) {
                    ("corrected", StrokeClass::ALL[(i + 1) % 6])
                } else {
                    ("confirmed", label)
                };
                json!({"id": format!("s{i}"), "frames": frames(i), "label": label.name(),
                       "feedback": {"kind": kind, "predicted": predicted.name(), "model_version": null}})
            })
            .collect();
        json!({"format": 2, "batch_id": id, "samples": samples}).to_string()
    };
    let status = |id: &str| {
        h.db.transact(|tx| repo.batch(tx, "alice", id))
            .unwrap()
            .unwrap()
            .status
    };
    // Every window confirmed: stored, deferred with the reason, not in the pending index.
    let (s, v) = h.post("alice", &h.alice, upload("all-right", &[], 8)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    match status("all-right") {
        BatchStatus::Deferred { reason } => assert!(reason.contains("converged"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(h
        .db
        .transact(|tx| repo.oldest_pending_batch(tx))
        .unwrap()
        .is_none());
    // One correction: staged, to be trained (the deferred one rides along).
    let (s, _) = h
        .post("alice", &h.alice, upload("one-wrong", &[3], 8))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(status("one-wrong"), BatchStatus::Staged);
    // Live accuracy below the target, over enough windows: not converged any more,
    // even for an upload the swimmer confirmed entirely.
    let (s, _) = h
        .post(
            "alice",
            &h.alice,
            upload("many-wrong", &(0..20).collect::<Vec<_>>(), 24),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _) = h
        .post("alice", &h.alice, upload("all-right-2", &[], 8))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(status("all-right-2"), BatchStatus::Staged);
    // A user who never converged: always staged.
    let (s, _) = h.post("bob", &h.bob, upload("bob-1", &[], 8)).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let st =
        h.db.transact(|tx| repo.batch(tx, "bob", "bob-1"))
            .unwrap()
            .unwrap()
            .status;
    assert_eq!(st, BatchStatus::Staged);
}
