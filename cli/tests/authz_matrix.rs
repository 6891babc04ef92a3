//! The authorization matrix: every endpoint of ingest and the publisher (their API
//! routers, admin route included, and each worker's ops server), called by every kind
//! of caller, over real TCP against `swimlane_ingest::start` and
//! `swimlane_publisher::start` on one embedded store. Each answer is checked against
//! the contract in the crates' docs (ingest `lib.rs`, publisher `http.rs`):
//!
//! | endpoint                              | none | malformed | unknown | other user | revoked | own | admin |
//! |---------------------------------------|------|-----------|---------|------------|---------|-----|-------|
//! | POST /v1/users/{u}/batches            | 401  | 401       | 401     | 403        | 401     | 202 | 202   |
//! | GET /v1/users/{u}/batches/{id}        | 401  | 401       | 401     | 403        | 401     | 200 | 200   |
//! | GET /v1/users/{u}/model               | 401  | 401       | 401     | 403        | 401     | 200 | 200   |
//! | GET /v1/users/{u}/model/versions      | 401  | 401       | 401     | 403        | 401     | 200 | 200   |
//! | POST /v1/admin/users/{u}/rollback     | 401  | 401       | 401     | 403        | 401     | 403 | 200   |
//! | GET /v1/users/{u}/history             | 401  | 401       | 401     | 403        | 401     | 200 | 200   |
//! | GET /admin/history (the page)         | 200 for everyone (no user data: it reads the API with the operator's token) |
//! | DELETE /v1/users/{u}                  | 401  | 401       | 401     | 403        | 401     | 200 | 200   | (in `forget.rs`: it erases the user) |
//! | ops /metrics, /healthz, /readyz       | 200 for everyone (no user data; served on the metrics port)     |
//! | an unknown route (either API)         | 404 for everyone                                                 |
//!
//! A 401 carries `WWW-Authenticate: Bearer`; every error is a JSON
//! `{"error": {"code", "message"}}`. A refused call changes nothing. And no token (nor
//! its SHA-256) ever shows in an answer (body or headers), in the metrics of either
//! worker, or in the log (a global subscriber at DEBUG captures everything both
//! workers log; its own test binary, as tracing's per-callsite interest is
//! process-wide).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{json, Value};
use swimlane_core::keys::Keys;
use swimlane_core::records::{ModelVersionRecord, UserState};
use swimlane_core::{StrokeClass, UserId, WINDOW_FEATURES, WINDOW_FRAMES};
use swimlane_ingest::IngestDeps;
use swimlane_runtime::telemetry::CapturedLogs;
use swimlane_runtime::{Config, ManualWallClock};
use swimlane_state::tokens::{hash_token, new_token};
use swimlane_state::{sha256_hex, Repo};
use swimlane_store::Db;

const USER: &str = "alice";
const NOW_MS: u64 = 1_790_000_000_000;

/// Who calls: the `Authorization` header sent (`None`: no header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Caller {
    NoToken,
    Malformed,
    Unknown,
    OtherUser,
    Revoked,
    Own,
    Admin,
}

const CALLERS: [Caller; 7] = [
    Caller::NoToken,
    Caller::Malformed,
    Caller::Unknown,
    Caller::OtherUser,
    Caller::Revoked,
    Caller::Own,
    Caller::Admin,
];

struct Tokens {
    own: String,
    other: String,
    revoked: String,
    unknown: String,
    admin: String,
}

impl Tokens {
    fn header(&self, c: Caller) -> Option<String> {
        let bearer = |t: &str| Some(format!("Bearer {t}"));
        match c {
            Caller::NoToken => None,
            // A real token under another scheme, with inner whitespace: never a token.
            Caller::Malformed => Some(format!("Basic {} {}", self.own, self.own)),
            Caller::Unknown => bearer(&self.unknown),
            Caller::OtherUser => bearer(&self.other),
            Caller::Revoked => bearer(&self.revoked),
            Caller::Own => bearer(&self.own),
            Caller::Admin => bearer(&self.admin),
        }
    }

    /// Every secret that must never be shown: the tokens and their hashes.
    fn secrets(&self) -> Vec<String> {
        [
            &self.own,
            &self.other,
            &self.revoked,
            &self.unknown,
            &self.admin,
        ]
        .into_iter()
        .flat_map(|t| [t.clone(), hash_token(t)])
        .collect()
    }
}

/// An answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        let mut s = format!("{}\n", self.status);
        for (n, v) in &self.headers {
            s.push_str(&format!("{n}: {v}\n"));
        }
        s + &self.body
    }
}

fn call(method: &str, url: &str, auth: Option<&str>, body: Option<&str>) -> Answer {
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let mut req = agent.request(method, url);
    if let Some(a) = auth {
        req = req.set("Authorization", a);
    }
    let r = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = resp.header(&n).unwrap_or_default().to_string();
            (n.to_ascii_lowercase(), v)
        })
        .collect();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut bytes).unwrap();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn upload(batch_id: &str) -> String {
    let frames = vec![vec![0.5; WINDOW_FEATURES]; WINDOW_FRAMES];
    let samples: Vec<Value> = (0..3)
        .map(|i| json!({"id": format!("s{i}"), "frames": frames, "label": StrokeClass::ALL[i].name()}))
        .collect();
    json!({"batch_id": batch_id, "samples": samples}).to_string()
}

/// Publish `version` of `user` the way the publishing stage leaves it: the weights
/// blob, the version record, the head.
fn publish(db: &Db, repo: &Repo, user: &str, version: u64) {
    let weights = format!("weights of {user} v{version}").into_bytes();
    let blob = format!("model-{user}-{version}");
    let record: ModelVersionRecord = serde_json::from_value(json!({
        "v": 1, "version": version, "run_id": format!("run-{version}"),
        "parent_version": null, "batches": [format!("b-{version}")], "model_blob": blob,
        "sha256": sha256_hex(&weights), "size_bytes": weights.len(),
        "heldout_accuracy": 0.9, "parent_heldout_accuracy": 0.8, "guard_accuracy": 0.85,
        "published_at_ms": NOW_MS,
    }))
    .unwrap();
    db.transact(|tx| {
        repo.put_blob(tx, &blob, &weights)?;
        repo.put_model_version(tx, user, &record)?;
        let mut s: UserState = repo.user_state(tx, user)?;
        s.head = Some(version);
        s.last_version = version;
        s.head_heldout_accuracy = Some(0.9);
        repo.put_user_state(tx, user, &s)
    })
    .unwrap();
}

fn head(db: &Db, repo: &Repo) -> Option<u64> {
    db.transact(|tx| repo.user_state(tx, USER)).unwrap().head
}

#[test]
fn every_endpoint_answers_every_caller_as_its_contract_says_and_never_shows_a_token() {
    let logs = CapturedLogs::default();
    tracing::subscriber::set_global_default(logs.subscriber())
        .expect("the only subscriber of this test binary");

    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens {
        own: new_token(),
        other: new_token(),
        revoked: new_token(),
        unknown: new_token(),
        admin: new_token(),
    };
    let mut config = Config {
        deployment: "authz".into(),
        store: dir.path().display().to_string(),
        admin_token_sha256: hash_token(&tokens.admin),
        ..Config::default()
    };
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    config.ingest.listen = any;
    config.ingest.metrics_listen = any;
    config.publisher.listen = any;
    config.publisher.metrics_listen = any;
    config.validate().unwrap();

    let db = swimlane_runtime::open_store(&config).unwrap();
    let repo = Repo::new(Keys::new(&config.deployment));
    db.transact(|tx| {
        let (alice, bob) = (UserId::new(USER).unwrap(), UserId::new("bob").unwrap());
        repo.put_token(tx, &alice, &tokens.own, NOW_MS)?;
        repo.put_token(tx, &bob, &tokens.other, NOW_MS)?;
        repo.put_token(tx, &alice, &tokens.revoked, NOW_MS)?;
        repo.revoke_token(tx, &tokens.revoked).map(|_| ())
    })
    .unwrap();
    publish(&db, &repo, USER, 1);
    publish(&db, &repo, USER, 2);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shutdown = swimlane_runtime::CancellationToken::new();
    let (ingest, publisher) = rt.block_on(async {
        let deps = IngestDeps {
            db: db.clone(),
            emitter: swimlane_runtime::wiring::emitter(&config).unwrap(),
            registry: swimlane_runtime::new_registry(),
            clock: Arc::new(ManualWallClock::new(NOW_MS)),
        };
        let ingest = swimlane_ingest::start(config.clone(), deps, shutdown.clone())
            .await
            .unwrap();
        let publisher = swimlane_publisher::start(config.clone()).await.unwrap();
        (ingest, publisher)
    });
    // A failed assertion must fail the test, not hang it: dropping the runtime waits for
    // the publisher's blocking stage, which runs until its token is cancelled.
    let _cancel_on_unwind = (
        shutdown.clone().drop_guard(),
        publisher.shutdown.clone().drop_guard(),
    );
    let ingest_api = format!("http://{}", ingest.api_addr);
    let publisher_api = format!("http://{}", publisher.api_addr);

    // A batch to read back.
    let seeded = call(
        "POST",
        &format!("{ingest_api}/v1/users/{USER}/batches"),
        tokens.header(Caller::Own).as_deref(),
        Some(&upload("b-seed")),
    );
    assert_eq!(seeded.status, 202, "{}", seeded.text());

    let mut answers: Vec<Answer> = Vec::new();
    let mut table: BTreeMap<&str, Vec<(Caller, u16)>> = BTreeMap::new();
    for caller in CALLERS {
        let auth = tokens.header(caller);
        let auth = auth.as_deref();
        let refused_api = match caller {
            Caller::NoToken | Caller::Malformed | Caller::Unknown | Caller::Revoked => Some(401),
            Caller::OtherUser => Some(403),
            Caller::Own | Caller::Admin => None,
        };
        let batch_id = format!("b-{caller:?}").to_ascii_lowercase();
        let head_before = head(&db, &repo);
        let cases: Vec<(&str, Answer, u16)> = vec![
            (
                "POST /v1/users/{u}/batches",
                call(
                    "POST",
                    &format!("{ingest_api}/v1/users/{USER}/batches"),
                    auth,
                    Some(&upload(&batch_id)),
                ),
                refused_api.unwrap_or(202),
            ),
            (
                "GET /v1/users/{u}/batches/{id}",
                call(
                    "GET",
                    &format!("{ingest_api}/v1/users/{USER}/batches/b-seed"),
                    auth,
                    None,
                ),
                refused_api.unwrap_or(200),
            ),
            (
                "GET /v1/users/{u}/model",
                call(
                    "GET",
                    &format!("{publisher_api}/v1/users/{USER}/model"),
                    auth,
                    None,
                ),
                refused_api.unwrap_or(200),
            ),
            (
                "GET /v1/users/{u}/model/versions",
                call(
                    "GET",
                    &format!("{publisher_api}/v1/users/{USER}/model/versions"),
                    auth,
                    None,
                ),
                refused_api.unwrap_or(200),
            ),
            (
                "POST /v1/admin/users/{u}/rollback",
                call(
                    "POST",
                    &format!("{publisher_api}/v1/admin/users/{USER}/rollback"),
                    auth,
                    Some(r#"{"version": 1}"#),
                ),
                match caller {
                    Caller::Admin => 200,
                    Caller::Own => 403,
                    _ => refused_api.unwrap(),
                },
            ),
            (
                "GET /v1/users/{u}/history",
                call(
                    "GET",
                    &format!("{publisher_api}/v1/users/{USER}/history"),
                    auth,
                    None,
                ),
                refused_api.unwrap_or(200),
            ),
            (
                "GET /admin/history",
                call("GET", &format!("{publisher_api}/admin/history"), auth, None),
                200,
            ),
            (
                "ingest unknown route",
                call("GET", &format!("{ingest_api}/v1/nothing-here"), auth, None),
                404,
            ),
            (
                "publisher unknown route",
                call(
                    "GET",
                    &format!("{publisher_api}/v1/nothing-here"),
                    auth,
                    None,
                ),
                404,
            ),
        ]
        .into_iter()
        .chain(
            [
                ("ingest", ingest.ops_addr),
                ("publisher", publisher.ops_addr),
            ]
            .into_iter()
            .flat_map(|(worker, addr)| {
                ["/metrics", "/healthz", "/readyz"].map(|path| {
                    let name: &'static str = match (worker, path) {
                        ("ingest", "/metrics") => "ingest ops /metrics",
                        ("ingest", "/healthz") => "ingest ops /healthz",
                        ("ingest", _) => "ingest ops /readyz",
                        (_, "/metrics") => "publisher ops /metrics",
                        (_, "/healthz") => "publisher ops /healthz",
                        _ => "publisher ops /readyz",
                    };
                    (
                        name,
                        call("GET", &format!("http://{addr}{path}"), auth, None),
                        200,
                    )
                })
            }),
        )
        .collect();

        for (endpoint, answer, expected) in cases {
            assert_eq!(
                answer.status,
                expected,
                "{endpoint} as {caller:?}: {}",
                answer.text()
            );
            if answer.status >= 400 {
                let v: Value = serde_json::from_str(&answer.body)
                    .unwrap_or_else(|e| panic!("{endpoint} as {caller:?}: not JSON ({e})"));
                assert!(
                    v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                    "{endpoint} as {caller:?}: {v}"
                );
            }
            if answer.status == 401 {
                assert_eq!(
                    answer.header("www-authenticate"),
                    Some("Bearer"),
                    "{endpoint} as {caller:?}"
                );
            }
            table
                .entry(endpoint)
                .or_default()
                .push((caller, answer.status));
            answers.push(answer);
        }

        // A refused call changed nothing; an accepted one did what it says.
        let staged = db.get(&repo.keys.batch(USER, &batch_id)).unwrap().is_some();
        assert_eq!(staged, refused_api.is_none(), "batch of {caller:?}");
        let head_after = head(&db, &repo);
        if caller == Caller::Admin {
            assert_eq!(head_after, Some(1));
        } else {
            assert_eq!(head_after, head_before, "rollback by {caller:?}");
        }
    }
    for (endpoint, row) in &table {
        eprintln!("{endpoint:36} {row:?}");
    }

    // Metrics of both workers, once everything above was counted.
    let metrics: Vec<Answer> = [ingest.ops_addr, publisher.ops_addr]
        .iter()
        .map(|a| call("GET", &format!("http://{a}/metrics"), None, None))
        .collect();
    assert!(
        metrics[0]
            .body
            .contains("swimlane_ingest_batches_rejected_total{reason=\"forbidden\"} 1"),
        "{}",
        metrics[0].body
    );

    shutdown.cancel();
    publisher.shutdown.cancel();
    rt.block_on(async {
        ingest.handle.await.unwrap().unwrap();
        publisher.handle.await.unwrap().unwrap();
    });

    let logs = logs.text();
    assert!(
        logs.contains("batch refused") && logs.contains("batch staged"),
        "the log capture saw nothing of ingest: {logs}"
    );
    for secret in tokens.secrets() {
        for a in answers.iter().chain(&metrics) {
            assert!(
                !a.text().contains(&secret),
                "a token (or its hash) in an answer: {}",
                a.text()
            );
        }
        assert!(!logs.contains(&secret), "a token (or its hash) in the log");
    }
}
