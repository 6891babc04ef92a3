//! Overload: when ingest or the store cannot keep up, an upload is answered 503 with
//! `Retry-After` and leaves nothing behind, and every upload answered 202 is stored
//! whole (record, every sample chunk, one `BatchStaged` event). Against the real
//! embedded store and bus: in-process through the router, and over TCP through
//! `swimlane_ingest::start`.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, Request, StatusCode};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use swimlane_bus::embedded::EmbeddedBus;
use swimlane_core::events::topics;
use swimlane_core::keys::Keys;
use swimlane_core::records::{decode_chunk, BatchRecord, SAMPLES_PER_CHUNK};
use swimlane_core::{Event, StrokeClass, UserId, WINDOW_FEATURES, WINDOW_FRAMES};
use swimlane_ingest::metrics::UPLOADS_INFLIGHT;
use swimlane_ingest::{router, IngestDeps, IngestState};
use swimlane_runtime::{Config, ManualWallClock};
use swimlane_state::tokens::new_token;
use swimlane_state::Repo;
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::faults::{Fault, FaultyBackend};
use swimlane_store::{Db, KeyValue, ManualClock, RangeOption, RetryOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const PARTITIONS: u32 = 4;
const NOW_MS: u64 = 1_790_000_000_000;

fn config(max_inflight: u32) -> Config {
    let mut c = Config {
        deployment: "test".into(),
        partitions: PARTITIONS,
        ..Config::default()
    };
    c.ingest.max_inflight = max_inflight;
    // These tests are about the global limit: one user may use every place.
    c.ingest.max_inflight_per_user = max_inflight;
    c.ingest.listen = "127.0.0.1:0".parse().unwrap();
    c.ingest.metrics_listen = "127.0.0.1:0".parse().unwrap();
    c.validate().unwrap();
    c
}

fn batch(id: &str, n: usize) -> String {
    let samples: Vec<Value> = (0..n)
        .map(|i| {
            let frames: Vec<Vec<f64>> = (0..WINDOW_FRAMES)
                .map(|f| {
                    (0..WINDOW_FEATURES)
                        .map(|j| ((i * 7 + f * 3 + j) % 100) as f64 / 100.0)
                        .collect()
                })
                .collect();
            json!({"id": format!("s{i}"), "frames": frames, "label": StrokeClass::ALL[i % 6].name()})
        })
        .collect();
    json!({"batch_id": id, "samples": samples}).to_string()
}

/// A store, a bus, a token for alice.
struct Store {
    _dir: tempfile::TempDir,
    db: Db,
    keys: Keys,
    bus: EmbeddedBus,
    token: String,
}

impl Store {
    fn new() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(EmbeddedBackend::open_in_dir(dir.path()).unwrap());
        Store::over(dir, db)
    }

    fn over(dir: tempfile::TempDir, db: Db) -> Store {
        let keys = Keys::new("test");
        let token = new_token();
        let repo = Repo::new(keys.clone());
        db.transact(|tx| repo.put_token(tx, &UserId::new("alice").unwrap(), &token, NOW_MS))
            .unwrap();
        Store {
            bus: EmbeddedBus::new(keys.clone(), PARTITIONS),
            _dir: dir,
            db,
            keys,
            token,
        }
    }

    fn deps(&self, registry: &prometheus::Registry) -> IngestDeps {
        IngestDeps {
            db: self.db.clone(),
            emitter: Arc::new(self.bus.clone()),
            registry: registry.clone(),
            clock: Arc::new(ManualWallClock::new(NOW_MS)),
        }
    }

    /// A token for another user.
    fn token_for(&self, user: &str) -> String {
        let token = new_token();
        let repo = Repo::new(self.keys.clone());
        self.db
            .transact(|tx| repo.put_token(tx, &UserId::new(user).unwrap(), &token, NOW_MS))
            .unwrap();
        token
    }

    /// Batch id → how many `BatchStaged` events name it.
    fn staged_events(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, r) in self.bus.read_all(&self.db, topics::BATCHES).unwrap() {
            match Event::decode(&r.payload).unwrap() {
                Event::BatchStaged { batch_id, .. } => {
                    *out.entry(batch_id.as_str().to_string()).or_default() += 1
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
        out
    }

    /// The batch is stored whole: its record says `samples`, every chunk it names is
    /// there and decodes, together holding exactly the uploaded sample ids.
    fn assert_stored_whole(&self, batch: &str, samples: usize) {
        let record = self
            .db
            .get(&self.keys.batch("alice", batch))
            .unwrap()
            .unwrap_or_else(|| panic!("{batch} answered 202 but has no record"));
        let record = BatchRecord::decode(&record).unwrap();
        assert_eq!(record.samples as usize, samples, "{batch}");
        assert_eq!(
            record.chunks as usize,
            samples.div_ceil(SAMPLES_PER_CHUNK),
            "{batch}"
        );
        let chunks = self.sample_rows(batch);
        assert_eq!(chunks.len(), record.chunks as usize, "{batch}");
        let ids: Vec<String> = chunks
            .iter()
            .flat_map(|(_, v)| decode_chunk(v).unwrap())
            .map(|s| s.id)
            .collect();
        // The training samples first, then the held-out ones, each in upload order.
        let split = |held: bool| {
            (0..samples)
                .map(|i| format!("s{i}"))
                .filter(move |id| swimlane_core::records::is_heldout("alice", batch, id) == held)
        };
        let expected: Vec<String> = split(false).chain(split(true)).collect();
        assert_eq!(ids, expected, "{batch}");
    }

    fn sample_rows(&self, batch: &str) -> Vec<KeyValue> {
        self.db
            .transact(|tx| {
                tx.get_range(&RangeOption::prefix(
                    &self.keys.samples_of_batch("alice", batch),
                ))
            })
            .unwrap()
    }

    /// Nothing of the batch is stored: no record, no sample chunk, no pending entry, no
    /// event.
    fn assert_nothing_of(&self, batch: &str) {
        assert!(
            self.db
                .get(&self.keys.batch("alice", batch))
                .unwrap()
                .is_none(),
            "{batch} was refused but has a record"
        );
        assert!(
            self.sample_rows(batch).is_empty(),
            "{batch} was refused but has samples"
        );
        assert!(
            !self.staged_events().contains_key(batch),
            "{batch} was refused but has an event"
        );
        let pending = self
            .db
            .transact(|tx| tx.get_range(&RangeOption::prefix(&self.keys.pending_batches())))
            .unwrap();
        let repo = Repo::new(self.keys.clone());
        for (k, _) in pending {
            let (_, _, b) = repo.keys.pending_batch_of(&k).unwrap();
            assert_ne!(b, batch, "{batch} was refused but is pending");
        }
    }
}

fn gauge(registry: &prometheus::Registry, name: &str) -> f64 {
    let mut text = String::new();
    prometheus::TextEncoder::new()
        .encode_utf8(&registry.gather(), &mut text)
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Poll `f` until it holds, for at most 20 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn post(token: &str, body: Body) -> Request<Body> {
    Request::post("/v1/users/alice/batches")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap()
}

async fn answer(resp: axum::response::Response) -> (StatusCode, Option<String>, Value) {
    let status = resp.status();
    let retry = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        retry,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_beyond_max_inflight_are_503_with_retry_after_and_store_nothing() {
    let store = Store::new();
    let registry = prometheus::Registry::new();
    let app = router(IngestState::new(&config(2), store.deps(&registry)).unwrap());

    // Two uploads whose bodies are still arriving hold both places.
    let mut held = Vec::new();
    for i in 0..2 {
        let body = batch(&format!("held-{i}"), 45);
        let (first, rest) = body.as_bytes().split_at(body.len() / 2);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
        tx.send(Ok(Bytes::copy_from_slice(first))).await.unwrap();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let app = app.clone();
        let req = post(&store.token, Body::from_stream(stream));
        let task = tokio::spawn(async move { answer(app.oneshot(req).await.unwrap()).await });
        held.push((tx, Bytes::copy_from_slice(rest), task));
    }
    eventually("both places taken", || {
        gauge(&registry, UPLOADS_INFLIGHT) == 2.0
    })
    .await;

    // Every further upload is refused at once, before anything is read or stored.
    for i in 0..6 {
        let id = format!("refused-{i}");
        let resp = app
            .clone()
            .oneshot(post(&store.token, Body::from(batch(&id, 3))))
            .await
            .unwrap();
        let (status, retry, v) = answer(resp).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_eq!(v["error"]["code"], "overloaded", "{v}");
        assert_eq!(retry.as_deref(), Some("1"));
        store.assert_nothing_of(&id);
    }

    // The held uploads finish and are staged whole.
    for (tx, rest, task) in held {
        tx.send(Ok(rest)).await.unwrap();
        drop(tx);
        let (status, _, v) = task.await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    }
    store.assert_stored_whole("held-0", 45);
    store.assert_stored_whole("held-1", 45);
    assert_eq!(gauge(&registry, UPLOADS_INFLIGHT), 0.0);
    let mut text = String::new();
    prometheus::TextEncoder::new()
        .encode_utf8(&registry.gather(), &mut text)
        .unwrap();
    assert!(
        text.contains("swimlane_ingest_batches_rejected_total{reason=\"overloaded\"} 6"),
        "{text}"
    );
    // The places are free again: a refused upload's retry is staged.
    let resp = app
        .clone()
        .oneshot(post(&store.token, Body::from(batch("refused-0", 3))))
        .await
        .unwrap();
    assert_eq!(answer(resp).await.0, StatusCode::ACCEPTED);
    store.assert_stored_whole("refused-0", 3);
    let events = store.staged_events();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.values().all(|n| *n == 1), "{events:?}");
}

/// Status code and `Retry-After` of a raw HTTP/1.1 answer.
fn parse_answer(raw: &str) -> (u16, Option<String>) {
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    let retry = raw
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("retry-after: "))
        .map(str::to_string);
    (status, retry)
}

fn request_head(token: &str, len: usize) -> String {
    request_head_as("alice", token, len)
}

fn request_head_as(user: &str, token: &str, len: usize) -> String {
    format!(
        "POST /v1/users/{user}/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

async fn upload(addr: SocketAddr, token: &str, body: &str) -> (u16, Option<String>) {
    upload_as(addr, "alice", token, body).await
}

async fn upload_as(addr: SocketAddr, user: &str, token: &str, body: &str) -> (u16, Option<String>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request_head_as(user, token, body.len()).as_bytes())
        .await
        .unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    parse_answer(&out)
}

async fn scrape(ops: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(ops).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Over TCP: first every place is held by uploads whose bodies are still arriving, and a
/// burst of uploads is refused whole; then a seeded storm of concurrent uploads of
/// various sizes, four times the limit: whatever each gets, every 202 is stored whole
/// with one event and every 503 left nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_over_tcp_are_staged_whole_or_refused_with_nothing_stored() {
    const LIMIT: u32 = 3;
    let store = Store::new();
    let registry = prometheus::Registry::new();
    let shutdown = swimlane_runtime::CancellationToken::new();
    let running = swimlane_ingest::start(config(LIMIT), store.deps(&registry), shutdown.clone())
        .await
        .unwrap();
    let (api, ops) = (running.api_addr, running.ops_addr);

    // Hold every place.
    let mut held = Vec::new();
    for i in 0..LIMIT {
        let body = batch(&format!("held-{i}"), 41);
        let (first, rest) = body.split_at(body.len() / 3);
        let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
        s.write_all(request_head(&store.token, body.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(first.as_bytes()).await.unwrap();
        held.push((s, rest.to_string()));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !scrape(ops)
        .await
        .contains(&format!("{UPLOADS_INFLIGHT} {LIMIT}"))
    {
        assert!(
            Instant::now() < deadline,
            "the held uploads never took every place"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let burst: Vec<_> = (0..10)
        .map(|i| {
            let token = store.token.clone();
            tokio::spawn(async move {
                let id = format!("burst-{i}");
                (upload(api, &token, &batch(&id, 5)).await, id)
            })
        })
        .collect();
    for t in burst {
        let ((status, retry), id) = t.await.unwrap();
        assert_eq!((status, retry.as_deref()), (503, Some("1")), "{id}");
        store.assert_nothing_of(&id);
    }
    for (mut s, rest) in held {
        s.write_all(rest.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(parse_answer(&out).0, 202, "{out}");
    }
    for i in 0..LIMIT {
        store.assert_stored_whole(&format!("held-{i}"), 41);
    }

    // The storm.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    let sizes: Vec<usize> = (0..4 * LIMIT as usize)
        .map(|_| rng.random_range(1..=130))
        .collect();
    let storm: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let token = store.token.clone();
            tokio::spawn(async move {
                let id = format!("storm-{i}");
                (upload(api, &token, &batch(&id, n)).await, id, n)
            })
        })
        .collect();
    let mut accepted = BTreeSet::new();
    for t in storm {
        let ((status, retry), id, n) = t.await.unwrap();
        match status {
            202 => {
                store.assert_stored_whole(&id, n);
                accepted.insert(id);
            }
            503 => {
                assert_eq!(retry.as_deref(), Some("1"), "{id}");
                store.assert_nothing_of(&id);
            }
            other => panic!("{id}: unexpected status {other}"),
        }
    }
    // Exactly one event per staged batch, and none for anything else.
    let events = store.staged_events();
    let expected: BTreeSet<String> = (0..LIMIT)
        .map(|i| format!("held-{i}"))
        .chain(accepted.iter().cloned())
        .collect();
    assert_eq!(events.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(events.values().all(|n| *n == 1), "{events:?}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.handle)
        .await
        .expect("drains")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_store_that_cannot_keep_up_is_503_with_retry_after_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let (backend, fault) = FaultyBackend::new(
        EmbeddedBackend::open_in_dir(dir.path()).unwrap(),
        clock.clone(),
    );
    let db = Db::new(backend).with_clock(clock).with_retry(RetryOptions {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
    });
    let store = Store::over(dir, db);
    let registry = prometheus::Registry::new();
    let app = router(IngestState::new(&config(8), store.deps(&registry)).unwrap());
    for (f, id) in [
        (Fault::Conflicts, "conflicted"),
        (Fault::TooSlow, "too-slow"),
    ] {
        fault.set(f);
        let resp = app
            .clone()
            .oneshot(post(&store.token, Body::from(batch(id, 50))))
            .await
            .unwrap();
        let (status, retry, v) = answer(resp).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{id}: {v}");
        assert_eq!(v["error"]["code"], "store_unavailable", "{id}: {v}");
        assert_eq!(retry.as_deref(), Some("1"), "{id}");
        fault.set(Fault::None);
        store.assert_nothing_of(id);
    }
    // The store keeps up again: the retry is staged whole.
    let resp = app
        .clone()
        .oneshot(post(&store.token, Body::from(batch("conflicted", 50))))
        .await
        .unwrap();
    assert_eq!(answer(resp).await.0, StatusCode::ACCEPTED);
    store.assert_stored_whole("conflicted", 50);
}

/// One device cannot starve the fleet: 70 uploads with alice's token whose bodies
/// trickle in at 10 bytes a second. At most `max_inflight_per_user` of them hold a
/// place (the rest are 429 `too_many_uploads` at once), so bob's uploads meanwhile are
/// each accepted within a second though the global limit is 8; the body rate rule then
/// cuts alice's slow ones (408 `body_too_slow`), and nothing of any of them is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_slow_uploads_cannot_starve_the_others() {
    const SLOW: usize = 70;
    const PER_USER: u32 = 4;
    let store = Store::new();
    let bob = store.token_for("bob");
    let registry = prometheus::Registry::new();
    let shutdown = swimlane_runtime::CancellationToken::new();
    let mut c = config(8);
    c.ingest.max_inflight_per_user = PER_USER;
    c.ingest.min_body_bytes_per_sec = 1000;
    c.ingest.body_grace_ms = 3_000;
    let running = swimlane_ingest::start(c, store.deps(&registry), shutdown.clone())
        .await
        .unwrap();
    let api = running.api_addr;

    let mut slow = Vec::new();
    for i in 0..SLOW {
        let (token, body) = (store.token.clone(), batch(&format!("slow-{i}"), 3));
        slow.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(api).await.unwrap();
            let (mut r, mut w) = s.into_split();
            w.write_all(request_head_as("alice", &token, body.len()).as_bytes())
                .await
                .unwrap();
            let mut reader = tokio::spawn(async move {
                let mut out = String::new();
                let _ = r.read_to_string(&mut out).await;
                out
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            for b in body.bytes() {
                tokio::select! {
                    out = &mut reader => return out.unwrap(),
                    _ = async {
                        let _ = w.write_all(&[b]).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    } => {}
                }
                assert!(Instant::now() < deadline, "no answer to a slow upload");
            }
            reader.await.unwrap()
        }));
    }
    // Every one of alice's uploads but the admitted ones has been refused, and those
    // hold their places, reading their bodies.
    let refused = |reason: &str| {
        let n = gauge(
            &registry,
            &format!("swimlane_ingest_batches_rejected_total{{reason=\"{reason}\"}}"),
        );
        if n.is_nan() {
            0.0
        } else {
            n
        }
    };
    eventually("alice's extra uploads refused, hers in flight", || {
        refused("too_many_uploads") + refused("overloaded") == (SLOW - PER_USER as usize) as f64
            && gauge(&registry, UPLOADS_INFLIGHT) == PER_USER as f64
    })
    .await;
    for k in 0..3 {
        let body = batch(&format!("bob-{k}"), 5);
        let t0 = Instant::now();
        let (status, _) = upload_as(api, "bob", &bob, &body).await;
        assert_eq!(status, 202, "bob's upload {k}");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "bob waited {:?}",
            t0.elapsed()
        );
    }
    assert_eq!(
        gauge(&registry, UPLOADS_INFLIGHT),
        PER_USER as f64,
        "alice still holds hers"
    );

    let mut codes = BTreeMap::new();
    for h in slow {
        let raw = h.await.unwrap();
        let (status, retry) = parse_answer(&raw);
        let code = ["too_many_uploads", "overloaded", "body_too_slow"]
            .into_iter()
            .find(|c| raw.contains(c))
            .unwrap_or_else(|| panic!("unexpected answer {raw:?}"));
        match code {
            "too_many_uploads" => assert_eq!((status, retry.as_deref()), (429, Some("1"))),
            // While the burst arrives, the global limit may refuse some first.
            "overloaded" => assert_eq!((status, retry.as_deref()), (503, Some("1"))),
            _ => assert_eq!(status, 408),
        }
        *codes.entry(code).or_insert(0usize) += 1;
    }
    let count = |c: &str| codes.get(c).copied().unwrap_or(0);
    assert_eq!(count("body_too_slow"), PER_USER as usize, "{codes:?}");
    assert_eq!(
        count("too_many_uploads") + count("overloaded"),
        SLOW - PER_USER as usize,
        "{codes:?}"
    );
    assert!(count("too_many_uploads") > 0, "{codes:?}");
    for i in 0..SLOW {
        store.assert_nothing_of(&format!("slow-{i}"));
    }
    assert_eq!(
        gauge(&registry, UPLOADS_INFLIGHT),
        0.0,
        "every place given back"
    );
    let text = {
        let mut t = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut t)
            .unwrap();
        t
    };
    for (reason, n) in [
        ("too_many_uploads", count("too_many_uploads")),
        ("body_too_slow", PER_USER as usize),
    ] {
        let line = format!("swimlane_ingest_batches_rejected_total{{reason=\"{reason}\"}} {n}");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.handle)
        .await
        .expect("drains")
        .unwrap()
        .unwrap();
}
