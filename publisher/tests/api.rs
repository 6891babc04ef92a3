//! The publisher's model API against the real embedded store and the real router
//! (in-process via `tower::ServiceExt::oneshot`). Models are put in place the way the
//! publishing stage leaves them: a version record, its weights blob and the user's
//! state head, written through `swimlane_state::Repo`.
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use swimlane_core::keys::Keys;
use swimlane_core::records::{LiveCount, ModelVersionRecord, StoredFile, UserState};
use swimlane_core::UserId;
use swimlane_publisher::{router, ApiState, PublisherMetrics};
use swimlane_state::tokens::{hash_token, new_token};
use swimlane_state::{sha256_hex, Repo};
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::Db;
use tower::ServiceExt;

struct Harness {
    db: Db,
    repo: Repo,
    registry: prometheus::Registry,
    app: Router,
    alice: String,
    bob: String,
    /// Carol's token, revoked.
    revoked: String,
    admin: String,
}

fn uid(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

/// What a response came back as.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    /// The error code of a `{"error": {"code", "message"}}` body (checked to be one).
    fn code(&self) -> String {
        let v = self.json();
        let err = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
        assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
        assert_eq!(err.len(), 2, "{v}");
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        err["code"].as_str().unwrap().to_string()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

impl Harness {
    fn new() -> Self {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let repo = Repo::new(Keys::new("test"));
        let (alice, bob, revoked, admin) = (new_token(), new_token(), new_token(), new_token());
        db.transact(|tx| {
            repo.put_token(tx, &uid("alice"), &alice, 1)?;
            repo.put_token(tx, &uid("bob"), &bob, 1)?;
            repo.put_token(tx, &uid("carol"), &revoked, 1)?;
            repo.revoke_token(tx, &revoked).map(|_| ())
        })
        .unwrap();
        let registry = prometheus::Registry::new();
        let app = router(ApiState {
            db: db.clone(),
            repo: repo.clone(),
            admin_token_sha256: hash_token(&admin).into(),
            metrics: PublisherMetrics::register(&registry).unwrap(),
            reads: std::sync::Arc::new(tokio::sync::Semaphore::new(4)),
            now: swimlane_core::clock::system_now_ms(),
        });
        Harness {
            db,
            repo,
            registry,
            app,
            alice,
            bob,
            revoked,
            admin,
        }
    }

    fn tokens(&self) -> [&str; 4] {
        [&self.alice, &self.bob, &self.revoked, &self.admin]
    }

    /// Weights for `user`'s version `version` (distinct per version).
    fn weights(user: &str, version: u64) -> Vec<u8> {
        let mut w = format!("safetensors weights of {user} v{version} ").into_bytes();
        w.extend((0..4096u32).map(|i| (i * 31 + version as u32) as u8));
        w
    }

    /// The ONNX file of `user`'s version `version` (distinct from the weights).
    fn onnx(user: &str, version: u64) -> Vec<u8> {
        let mut w = format!("onnx file of {user} v{version} ").into_bytes();
        w.extend((0..3000u32).map(|i| (i * 17 + version as u32) as u8));
        w
    }

    /// Publish `version` of `user` as the stage does: record, blobs, head.
    fn publish(&self, user: &str, version: u64) -> ModelVersionRecord {
        let rec = self.put_version(user, version, true);
        self.db
            .transact(|tx| {
                let mut s = self.repo.user_state(tx, user)?;
                s.head = Some(version);
                s.last_version = s.last_version.max(version);
                s.head_heldout_accuracy = Some(rec.heldout_accuracy);
                s.converged = true;
                self.repo.put_user_state(tx, user, &s)
            })
            .unwrap();
        rec
    }

    /// A version record of `user` (and its blobs when `with_blob`), not moving the head.
    fn put_version(&self, user: &str, version: u64, with_blob: bool) -> ModelVersionRecord {
        self.put_version_with(user, version, with_blob, true)
    }

    /// Move `user`'s head to `version` (as the stage or a rollback does).
    fn set_head(&self, user: &str, version: u64) {
        self.db
            .transact(|tx| {
                let mut s = self.repo.user_state(tx, user)?;
                s.head = Some(version);
                s.last_version = s.last_version.max(version);
                self.repo.put_user_state(tx, user, &s)
            })
            .unwrap();
    }

    /// [`Harness::put_version`]; without `onnx`, as a version published before ONNX
    /// export existed.
    fn put_version_with(
        &self,
        user: &str,
        version: u64,
        with_blob: bool,
        onnx: bool,
    ) -> ModelVersionRecord {
        let w = Self::weights(user, version);
        let o = Self::onnx(user, version);
        let rec = ModelVersionRecord {
            v: 1,
            version,
            run_id: format!("run-{version}"),
            parent_version: version.checked_sub(1).filter(|v| *v > 0),
            batches: vec![format!("b-{version}")],
            model_blob: format!("model-{user}-{version}"),
            sha256: sha256_hex(&w),
            size_bytes: w.len() as u64,
            heldout_accuracy: 0.8 + version as f32 / 100.0,
            parent_heldout_accuracy: 0.8,
            guard_accuracy: 0.9,
            published_at_ms: 1_000 + version,
            onnx: onnx.then(|| StoredFile {
                blob: format!("onnx-{user}-{version}"),
                sha256: sha256_hex(&o),
                size_bytes: o.len() as u64,
                prefix_blob: None,
                splices: Vec::new(),
            }),
            standing: Default::default(),
            probation: Default::default(),
        };
        self.db
            .transact(|tx| {
                self.repo.put_model_version(tx, user, &rec)?;
                if with_blob {
                    self.repo.put_blob(tx, &rec.model_blob, &w)?;
                    if let Some(f) = &rec.onnx {
                        self.repo.put_blob(tx, &f.blob, &o)?;
                    }
                }
                Ok(())
            })
            .unwrap();
        rec
    }

    fn state(&self, user: &str) -> UserState {
        self.db
            .transact(|tx| self.repo.user_state(tx, user))
            .unwrap()
    }

    async fn send(&self, req: Request<Body>) -> Answer {
        let r = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = r.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: axum::body::to_bytes(body, 1 << 24).await.unwrap(),
        }
    }

    /// A request with `Authorization: <authorization>` when given.
    async fn call(
        &self,
        method: Method,
        uri: &str,
        authorization: Option<&str>,
        body: &str,
    ) -> Answer {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(a) = authorization {
            b = b.header(header::AUTHORIZATION, a);
        }
        self.send(b.body(Body::from(body.to_string())).unwrap())
            .await
    }

    /// GET with extra headers.
    async fn get_with(
        &self,
        uri: &str,
        token: &str,
        headers: &[(header::HeaderName, &str)],
    ) -> Answer {
        let mut b = Request::get(uri).header(header::AUTHORIZATION, format!("Bearer {token}"));
        for (k, v) in headers {
            b = b.header(k, *v);
        }
        self.send(b.body(Body::empty()).unwrap()).await
    }

    async fn get(&self, uri: &str, token: &str) -> Answer {
        self.call(Method::GET, uri, Some(&format!("Bearer {token}")), "")
            .await
    }

    async fn rollback(&self, user: &str, token: Option<&str>, body: &str) -> Answer {
        let auth = token.map(|t| format!("Bearer {t}"));
        self.call(
            Method::POST,
            &format!("/v1/admin/users/{user}/rollback"),
            auth.as_deref(),
            body,
        )
        .await
    }

    /// The exposition line of the series `series` (name and labels, as exported).
    fn metric(&self, series: &str) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .unwrap();
        let line = out.lines().find(|l| l.starts_with(&format!("{series} ")));
        line.unwrap_or_else(|| panic!("no {series}")).to_string()
    }

    fn downloads(&self) -> String {
        self.metric("swimlane_publisher_model_downloads_total")
    }

    /// An error answer: the status, a JSON error body with `code`, and no token in it.
    fn assert_error(&self, a: &Answer, status: StatusCode, code: &str, case: &str) {
        assert_eq!(a.status, status, "{case}: {:?}", a.body);
        assert_eq!(a.code(), code, "{case}");
        assert_eq!(a.header("content-type"), Some("application/json"), "{case}");
        let text = String::from_utf8_lossy(&a.body);
        for t in self.tokens() {
            assert!(!text.contains(t), "{case}: a token in the error body");
            assert!(!text.contains(&hash_token(t)), "{case}: a token hash");
        }
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(a.header("www-authenticate"), Some("Bearer"), "{case}");
        }
    }
}

const MODEL: &str = "/v1/users/alice/model";
const VERSIONS: &str = "/v1/users/alice/model/versions";

#[tokio::test]
async fn no_model_is_404_no_model_before_any_publish() {
    let h = Harness::new();
    let a = h.get(MODEL, &h.alice).await;
    h.assert_error(&a, StatusCode::NOT_FOUND, "no_model", "before publish");
    assert!(a.header("etag").is_none() && a.header("x-model-version").is_none());
    let a = h.get(VERSIONS, &h.alice).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.json(),
        json!({"head": null, "versions": [], "base_live": {"windows": 0, "right": 0, "accuracy": null}})
    );
    // Another user's publication changes nothing for Alice.
    h.publish("bob", 1);
    let a = h.get(MODEL, &h.alice).await;
    h.assert_error(&a, StatusCode::NOT_FOUND, "no_model", "bob published");
    assert!(h.downloads().ends_with(" 0"), "{}", h.downloads());
    // The request metrics both APIs have: each answer timed and counted by route and
    // status class, every route exported from the start.
    let answers = |route: &str, class: &str| {
        let series =
            format!("swimlane_publisher_responses_total{{class=\"{class}\",route=\"{route}\"}}");
        h.metric(&series)
    };
    assert!(answers("get_model", "4xx").ends_with(" 2"));
    assert!(answers("list_versions", "2xx").ends_with(" 1"));
    assert!(answers("rollback", "2xx").ends_with(" 0"));
    let timed = h.metric("swimlane_publisher_request_seconds_count{route=\"get_model\"}");
    assert!(timed.ends_with(" 2"), "{timed}");
}

#[tokio::test]
async fn a_published_model_is_served_with_version_sha_and_etag() {
    let h = Harness::new();
    let rec = h.publish("alice", 1);
    let a = h.get(MODEL, &h.alice).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body.as_ref(), Harness::weights("alice", 1).as_slice());
    assert_eq!(a.header("x-model-version"), Some("1"));
    assert_eq!(a.header("x-model-sha256"), Some(rec.sha256.as_str()));
    assert_eq!(sha256_hex(&a.body), rec.sha256);
    let etag = format!("\"{}\"", rec.sha256);
    assert_eq!(a.header("etag"), Some(etag.as_str()));
    assert_eq!(
        a.header("content-type"),
        Some("application/vnd.swimlane.safetensors")
    );
    assert!(h.downloads().ends_with(" 1"), "{}", h.downloads());
}

#[tokio::test]
async fn if_none_match_with_the_current_etag_is_304_without_a_body() {
    let h = Harness::new();
    let rec = h.publish("alice", 1);
    let etag = format!("\"{}\"", rec.sha256);
    let cond = |inm: String| {
        Request::get(MODEL)
            .header(header::AUTHORIZATION, format!("Bearer {}", h.alice))
            .header(header::IF_NONE_MATCH, inm)
            .body(Body::empty())
            .unwrap()
    };
    for inm in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"{}\", {etag}", "0".repeat(64)),
        "*".to_string(),
    ] {
        let a = h.send(cond(inm.clone())).await;
        assert_eq!(a.status, StatusCode::NOT_MODIFIED, "{inm}");
        assert!(a.body.is_empty(), "{inm}: 304 with a body");
        assert_eq!(a.header("etag"), Some(etag.as_str()), "{inm}");
        assert_eq!(a.header("x-model-version"), Some("1"), "{inm}");
    }
    assert!(h.downloads().ends_with(" 0"), "{}", h.downloads());
    // A stale ETag (the device holds v1, v2 is out) downloads v2.
    let rec2 = h.publish("alice", 2);
    let a = h.send(cond(etag.clone())).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-model-version"), Some("2"));
    assert_eq!(
        a.header("etag"),
        Some(format!("\"{}\"", rec2.sha256).as_str())
    );
    assert_eq!(a.body.as_ref(), Harness::weights("alice", 2).as_slice());
    // The unquoted hash is not the ETag.
    let a = h.send(cond(rec2.sha256.clone())).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(h.downloads().ends_with(" 2"), "{}", h.downloads());
}

#[tokio::test]
async fn versions_list_every_version_with_lineage_and_the_head() {
    let h = Harness::new();
    let r1 = h.publish("alice", 1);
    let r2 = h.publish("alice", 2);
    h.publish("bob", 1);
    let a = h.get(VERSIONS, &h.alice).await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    assert_eq!(v["head"], 2);
    let versions: Vec<ModelVersionRecord> = serde_json::from_value(v["versions"].clone()).unwrap();
    assert_eq!(versions, vec![r1, r2]);
    assert_eq!(v["versions"][1]["parent_version"], 1);
    assert_eq!(v["versions"][1]["batches"], json!(["b-2"]));
    // No upload has said anything of them yet.
    assert_eq!(
        v["versions"][0]["live"],
        json!({"windows": 0, "right": 0, "accuracy": null})
    );
    // What the uploads' feedback said of each version, and of the base model.
    let counts = |pairs: &[(u64, u64, u64)]| {
        pairs
            .iter()
            .map(|&(v, windows, right)| (v, LiveCount { windows, right }))
            .collect()
    };
    h.db.transact(|tx| {
        h.repo
            .add_live(tx, "alice", &counts(&[(0, 10, 7), (2, 4, 3)]))?;
        h.repo.add_live(tx, "alice", &counts(&[(2, 4, 4)]))?;
        h.repo.add_live(tx, "bob", &counts(&[(1, 5, 0)]))
    })
    .unwrap();
    let v = h.get(VERSIONS, &h.alice).await.json();
    assert_eq!(
        v["base_live"],
        json!({"windows": 10, "right": 7, "accuracy": 0.7})
    );
    assert_eq!(v["versions"][0]["live"]["windows"], 0);
    assert_eq!(
        v["versions"][1]["live"],
        json!({"windows": 8, "right": 7, "accuracy": 0.875})
    );
}

#[tokio::test]
async fn rollback_is_admin_only_and_moves_the_head() {
    let h = Harness::new();
    h.publish("alice", 1);
    h.publish("alice", 2);
    let body = r#"{"version": 1}"#;
    let a = h.rollback("alice", Some(&h.alice), body).await;
    h.assert_error(&a, StatusCode::FORBIDDEN, "forbidden", "user token");
    let a = h.rollback("alice", Some(&h.bob), body).await;
    h.assert_error(&a, StatusCode::FORBIDDEN, "forbidden", "other user's token");
    let a = h.rollback("alice", None, body).await;
    h.assert_error(&a, StatusCode::UNAUTHORIZED, "unauthenticated", "no token");
    // Who may not roll back learns nothing from a bad body: auth comes first.
    let a = h.rollback("alice", None, "{not json").await;
    h.assert_error(
        &a,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "no token, bad body",
    );
    let a = h.rollback("alice", Some(&h.alice), "{not json").await;
    h.assert_error(
        &a,
        StatusCode::FORBIDDEN,
        "forbidden",
        "user token, bad body",
    );
    assert_eq!(
        h.state("alice").head,
        Some(2),
        "refused rollbacks moved the head"
    );
    // The admin: bad bodies, unknown versions.
    for bad in [
        "{not json",
        r#"{"version": "1"}"#,
        r#"{"version": 1, "x": 2}"#,
        "",
    ] {
        let a = h.rollback("alice", Some(&h.admin), bad).await;
        h.assert_error(&a, StatusCode::BAD_REQUEST, "bad_json", bad);
    }
    for unknown in [0, 3, 7] {
        let a = h
            .rollback(
                "alice",
                Some(&h.admin),
                &format!(r#"{{"version": {unknown}}}"#),
            )
            .await;
        h.assert_error(
            &a,
            StatusCode::NOT_FOUND,
            "no_such_version",
            "unknown version",
        );
    }
    // Bob's version 1 is not Alice's.
    h.put_version("bob", 5, true);
    let a = h
        .rollback("alice", Some(&h.admin), r#"{"version": 5}"#)
        .await;
    h.assert_error(
        &a,
        StatusCode::NOT_FOUND,
        "no_such_version",
        "bob's version",
    );
    assert_eq!(h.state("alice").head, Some(2));
    // A known version: the head moves and GET serves it.
    let a = h.rollback("alice", Some(&h.admin), body).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.json(), json!({"head": 1}));
    let s = h.state("alice");
    assert_eq!(s.head, Some(1));
    assert_eq!(
        s.last_version, 2,
        "versions are never reused after a rollback"
    );
    assert!(!s.converged);
    assert_eq!(s.head_heldout_accuracy, Some(0.81));
    let a = h.get(MODEL, &h.alice).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-model-version"), Some("1"));
    assert_eq!(a.body.as_ref(), Harness::weights("alice", 1).as_slice());
    let v = h.get(VERSIONS, &h.alice).await.json();
    assert_eq!(v["head"], 1);
    assert_eq!(v["versions"].as_array().unwrap().len(), 2);
    // The version left says who moved the head, and where to.
    let left = &v["versions"][1]["standing"];
    assert_eq!(left["state"], "rolled_back", "{left}");
    assert_eq!((&left["by"], &left["to"]), (&json!("operator"), &json!(1)));
    // And forward again.
    let a = h
        .rollback("alice", Some(&h.admin), r#"{"version": 2}"#)
        .await;
    assert_eq!(a.json(), json!({"head": 2}));
    let a = h.get(MODEL, &h.alice).await;
    assert_eq!(a.header("x-model-version"), Some("2"));
}

/// Every route × every kind of caller.
#[tokio::test]
async fn authorization_matrix_for_every_route() {
    let h = Harness::new();
    h.publish("alice", 1);
    h.publish("alice", 2);
    let routes: [(Method, &str, &str); 3] = [
        (Method::GET, MODEL, ""),
        (Method::GET, VERSIONS, ""),
        (
            Method::POST,
            "/v1/admin/users/alice/rollback",
            r#"{"version": 2}"#,
        ),
    ];
    let a = &h.alice;
    let malformed = [
        String::new(),
        "Bearer".to_string(),
        "Bearer ".to_string(),
        a.to_string(),
        format!("Basic {a}"),
        format!("Bearer{a}"),
        format!("Bearer {a} {a}"),
        format!("Bearer {a}{}", "0".repeat(300)),
        format!("Bearer {}", new_token()),
        format!("Bearer {}", hash_token(a)),
    ];
    for (method, uri, body) in &routes {
        let admin_route = *method == Method::POST;
        let case = |who: &str| format!("{method} {uri} as {who}");
        let r = h.call(method.clone(), uri, None, body).await;
        h.assert_error(
            &r,
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            &case("nobody"),
        );
        for m in &malformed {
            let r = h.call(method.clone(), uri, Some(m), body).await;
            h.assert_error(
                &r,
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                &case("a malformed or unknown token"),
            );
        }
        let bearer = |t: &str| format!("Bearer {t}");
        let r = h
            .call(method.clone(), uri, Some(&bearer(&h.revoked)), body)
            .await;
        h.assert_error(
            &r,
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            &case("revoked"),
        );
        let r = h
            .call(method.clone(), uri, Some(&bearer(&h.bob)), body)
            .await;
        h.assert_error(&r, StatusCode::FORBIDDEN, "forbidden", &case("bob"));
        let r = h
            .call(method.clone(), uri, Some(&bearer(&h.alice)), body)
            .await;
        if admin_route {
            h.assert_error(&r, StatusCode::FORBIDDEN, "forbidden", &case("alice"));
        } else {
            assert_eq!(r.status, StatusCode::OK, "{}", case("alice"));
        }
        // The scheme is case-insensitive.
        let r = h
            .call(
                method.clone(),
                uri,
                Some(&format!("bearer {}", h.alice)),
                body,
            )
            .await;
        assert_eq!(
            r.status == StatusCode::OK,
            !admin_route,
            "{}",
            case("alice, lowercase scheme")
        );
        let r = h
            .call(method.clone(), uri, Some(&bearer(&h.admin)), body)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}: {:?}", case("admin"), r.body);
    }
    // The admin reads anyone's: 404 for a user with nothing published.
    let r = h.get("/v1/users/dave/model", &h.admin).await;
    h.assert_error(&r, StatusCode::NOT_FOUND, "no_model", "admin, no model");
    let r = h.get("/v1/users/dave/model/versions", &h.admin).await;
    assert_eq!(
        r.json(),
        json!({"head": null, "versions": [], "base_live": {"windows": 0, "right": 0, "accuracy": null}})
    );
    // Nothing refused moved anything.
    assert_eq!(h.state("alice").head, Some(2));
}

#[tokio::test]
async fn bad_user_ids_unknown_routes_and_methods_answer_json_errors() {
    let h = Harness::new();
    let r = h.get("/v1/users/al%20ice/model", &h.alice).await;
    h.assert_error(&r, StatusCode::BAD_REQUEST, "bad_user_id", "bad user id");
    let r = h.get("/v1/users/%FF/model", &h.alice).await;
    h.assert_error(
        &r,
        StatusCode::BAD_REQUEST,
        "bad_user_id",
        "undecodable user id",
    );
    let r = h.get("/v1/nope", &h.alice).await;
    h.assert_error(&r, StatusCode::NOT_FOUND, "not_found", "unknown route");
    let r = h
        .call(
            Method::DELETE,
            MODEL,
            Some(&format!("Bearer {}", h.alice)),
            "",
        )
        .await;
    h.assert_error(
        &r,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "wrong method",
    );
}

#[tokio::test]
async fn a_head_whose_weights_are_missing_is_500_not_304() {
    let h = Harness::new();
    h.put_version("alice", 1, false);
    h.db.transact(|tx| {
        let mut s = h.repo.user_state(tx, "alice")?;
        s.head = Some(1);
        s.last_version = 1;
        h.repo.put_user_state(tx, "alice", &s)
    })
    .unwrap();
    let a = h.get(MODEL, &h.alice).await;
    h.assert_error(
        &a,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "missing blob",
    );
    assert!(h.downloads().ends_with(" 0"));
}

/// Checks that `a` is `user`'s version `version` as ONNX: body, type, hash, ETag.
/// A model answer: 200, exactly `bytes`, of `content_type`, with the version and the
/// bytes' hash in its headers, varying by `Accept`.
fn assert_model(a: &Answer, bytes: &[u8], content_type: &str, version: u64, case: &str) {
    assert_eq!(a.status, StatusCode::OK, "{case}: {:?}", a.body);
    assert_eq!(a.body.as_ref(), bytes, "{case}");
    assert_eq!(a.header("content-type"), Some(content_type), "{case}");
    let version = version.to_string();
    assert_eq!(
        a.header("x-model-version"),
        Some(version.as_str()),
        "{case}"
    );
    let sha = sha256_hex(bytes);
    assert_eq!(a.header("x-model-sha256"), Some(sha.as_str()), "{case}");
    assert_eq!(a.header("vary"), Some("Accept"), "{case}");
}

fn assert_onnx(a: &Answer, user: &str, version: u64, case: &str) {
    let o = Harness::onnx(user, version);
    assert_model(a, &o, "application/onnx", version, case);
    assert_eq!(
        a.header("etag"),
        Some(format!("\"{}\"", sha256_hex(&o)).as_str()),
        "{case}"
    );
    assert_eq!(
        a.header("content-disposition"),
        Some(format!("attachment; filename=\"model-v{version}.onnx\"").as_str()),
        "{case}"
    );
}

fn assert_safetensors(a: &Answer, user: &str, version: u64, case: &str) {
    let w = Harness::weights(user, version);
    assert_model(a, &w, "application/vnd.swimlane.safetensors", version, case);
}

#[tokio::test]
async fn onnx_is_served_by_format_or_accept_with_the_same_version_and_its_own_hash() {
    let h = Harness::new();
    h.publish("alice", 1);
    let onnx = &format!("{MODEL}?format=onnx");
    assert_onnx(&h.get(onnx, &h.alice).await, "alice", 1, "?format=onnx");
    let accept = |v: &'static str| [(header::ACCEPT, v)];
    for v in [
        "application/onnx",
        "application/vnd.swimlane.safetensors;q=0.5, application/onnx",
        "text/html, application/onnx; q=0.9",
    ] {
        assert_onnx(
            &h.get_with(MODEL, &h.alice, &accept(v)).await,
            "alice",
            1,
            v,
        );
    }
    for v in [
        "*/*",
        "application/octet-stream",
        "application/onnx;q=0",
        "application/onnx;q=0.5, application/vnd.swimlane.safetensors",
        "application/onnx, application/vnd.swimlane.safetensors",
    ] {
        assert_safetensors(
            &h.get_with(MODEL, &h.alice, &accept(v)).await,
            "alice",
            1,
            v,
        );
    }
    // `format` wins over Accept.
    let a = h
        .get_with(
            &format!("{MODEL}?format=safetensors"),
            &h.alice,
            &accept("application/onnx"),
        )
        .await;
    assert_safetensors(&a, "alice", 1, "format=safetensors, Accept onnx");
    let a = h.get(&format!("{MODEL}?format=onnx&x=1"), &h.alice).await;
    assert_onnx(&a, "alice", 1, "other query parameters are ignored");
    // A new version: both formats move together.
    h.publish("alice", 2);
    assert_onnx(&h.get(onnx, &h.alice).await, "alice", 2, "v2 onnx");
    assert_safetensors(&h.get(MODEL, &h.alice).await, "alice", 2, "v2 safetensors");
    assert!(h.downloads().ends_with(" 13"), "{}", h.downloads());
}

#[tokio::test]
async fn each_format_has_its_own_etag_and_304() {
    let h = Harness::new();
    h.publish("alice", 1);
    let onnx_uri = format!("{MODEL}?format=onnx");
    let onnx_etag = format!("\"{}\"", sha256_hex(&Harness::onnx("alice", 1)));
    let st_etag = format!("\"{}\"", sha256_hex(&Harness::weights("alice", 1)));
    let get = |uri: &str, etag: &str| {
        let (uri, etag) = (uri.to_string(), etag.to_string());
        let h = &h;
        async move {
            h.get_with(&uri, &h.alice, &[(header::IF_NONE_MATCH, etag.as_str())])
                .await
        }
    };
    for inm in [onnx_etag.clone(), format!("W/{onnx_etag}"), "*".into()] {
        let a = get(&onnx_uri, &inm).await;
        assert_eq!(a.status, StatusCode::NOT_MODIFIED, "{inm}");
        assert!(a.body.is_empty(), "{inm}");
        assert_eq!(a.header("etag"), Some(onnx_etag.as_str()), "{inm}");
        assert_eq!(a.header("x-model-version"), Some("1"), "{inm}");
    }
    // One format's ETag does not match the other's file.
    let a = get(&onnx_uri, &st_etag).await;
    assert_onnx(&a, "alice", 1, "safetensors etag, onnx asked");
    let a = get(MODEL, &onnx_etag).await;
    assert_safetensors(&a, "alice", 1, "onnx etag, safetensors asked");
    let a = get(MODEL, &st_etag).await;
    assert_eq!(a.status, StatusCode::NOT_MODIFIED);
    assert_eq!(a.header("etag"), Some(st_etag.as_str()));
    // The device holds v1's ONNX; v2 is out.
    h.publish("alice", 2);
    assert_onnx(
        &get(&onnx_uri, &onnx_etag).await,
        "alice",
        2,
        "stale onnx etag",
    );
    assert!(h.downloads().ends_with(" 3"), "{}", h.downloads());
}

#[tokio::test]
async fn bad_formats_and_versions_without_onnx() {
    let h = Harness::new();
    h.publish("alice", 1);
    for q in ["format=tflite", "format=", "format=ONNX"] {
        let uri = format!("{MODEL}?{q}");
        let a = h.get(&uri, &h.alice).await;
        h.assert_error(&a, StatusCode::BAD_REQUEST, "bad_format", q);
        // Who may not read Alice's model learns nothing from a bad query: auth first.
        let a = h.call(Method::GET, &uri, None, "").await;
        h.assert_error(&a, StatusCode::UNAUTHORIZED, "unauthenticated", q);
        let a = h.get(&uri, &h.bob).await;
        h.assert_error(&a, StatusCode::FORBIDDEN, "forbidden", q);
    }
    // A version published before ONNX export: safetensors only.
    h.put_version_with("alice", 2, true, false);
    h.set_head("alice", 2);
    let a = h.get(&format!("{MODEL}?format=onnx"), &h.alice).await;
    h.assert_error(
        &a,
        StatusCode::NOT_FOUND,
        "onnx_unavailable",
        "legacy version",
    );
    assert_safetensors(
        &h.get(MODEL, &h.alice).await,
        "alice",
        2,
        "legacy safetensors",
    );
    // Its record reads back without an `onnx` field.
    let v = h.get(VERSIONS, &h.alice).await.json();
    assert!(v["versions"][1].get("onnx").is_none(), "{v}");
    assert_eq!(v["versions"][0]["onnx"]["blob"], "onnx-alice-1");
    // No user's ONNX is another's.
    let a = h.get("/v1/users/bob/model?format=onnx", &h.alice).await;
    h.assert_error(&a, StatusCode::FORBIDDEN, "forbidden", "bob's onnx");
}

/// A 304 is answered from the version record alone: with the model file gone from the
/// store, a device that already has it still gets 304 (and one that has not, a 500).
#[tokio::test]
async fn a_304_reads_no_model_file() {
    let h = Harness::new();
    let rec = h.put_version("alice", 1, false);
    h.set_head("alice", 1);
    let etag = format!("\"{}\"", rec.sha256);
    let a = h
        .send(
            Request::get(MODEL)
                .header(header::AUTHORIZATION, format!("Bearer {}", h.alice))
                .header(header::IF_NONE_MATCH, etag.as_str())
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_MODIFIED);
    assert_eq!(a.header("etag"), Some(etag.as_str()));
    let a = h.get(MODEL, &h.alice).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
}
