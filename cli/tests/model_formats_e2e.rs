//! Issue 9, end to end: users upload corrections through the ingest API, the workers
//! train, validate and publish, and each user's published model is downloaded through
//! the publisher's HTTP API in both formats (safetensors and ONNX). On that user's
//! held-out windows, swimlane's own ONNX evaluator on the ONNX file (the device's model:
//! the personal model for windows familiar to it, the base model for the others)
//! predicts what candle predicts with the same choice (probabilities within 1e-5, the
//! same class for every window), and the safetensors file scores exactly the held-out
//! accuracy the validator accepted.
use std::io::Read;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use swimlane_cli::fleet::Stages;
use swimlane_core::keys::Keys;
use swimlane_core::records::BatchStatus;
use swimlane_core::UserId;
use swimlane_model::onnx::{self, OnnxModel};
use swimlane_model::synth::{corrections, Swimmer};
use swimlane_model::{MicroModel, Sample, MAX_MODEL_BYTES};
use swimlane_runtime::Config;
use swimlane_state::tokens::new_token;
use swimlane_state::{sha256_hex, Repo, BASE_MODEL_BLOB};
use swimlane_store::Db;

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: [&str; 2] = ["ana", "ben"];

/// One HTTP answer.
struct Got {
    status: u16,
    header: std::collections::HashMap<String, String>,
    body: Vec<u8>,
}

impl Got {
    fn h(&self, name: &str) -> &str {
        self.header
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {name} header"))
    }
}

fn get(agent: &ureq::Agent, url: &str, token: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = agent
        .get(url)
        .set("Authorization", &format!("Bearer {token}"));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let r = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let header = r
        .headers_names()
        .into_iter()
        .filter_map(|n| {
            r.header(&n)
                .map(|v| (n.to_ascii_lowercase(), v.to_string()))
        })
        .collect();
    let status = r.status();
    let mut body = Vec::new();
    r.into_reader().read_to_end(&mut body).unwrap();
    Got {
        status,
        header,
        body,
    }
}

fn upload(agent: &ureq::Agent, ingest: &str, user: &str, token: &str, batch: &str, s: &[Sample]) {
    let url = format!("{ingest}/v1/users/{user}/batches");
    let r = agent
        .post(&url)
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(swimlane_cli::upload::upload_json(batch, s))
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    assert_eq!(r.status(), 202);
}

/// Wait until the batch has left the pipeline (published, rejected or deferred).
fn settle(db: &Db, repo: &Repo, user: &str, batch: &str) -> BatchStatus {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let st = db
            .transact(|tx| repo.batch(tx, user, batch))
            .unwrap()
            .expect("staged")
            .status;
        if st.is_terminal() || matches!(st, BatchStatus::Deferred { .. }) {
            return st;
        }
        assert!(Instant::now() < deadline, "{user}/{batch} stuck in {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The held-out windows the validator judged version `version` of `user` on: the
/// held-out samples of every batch published with a version up to `version`.
fn heldout_windows(db: &Db, repo: &Repo, user: &str, version: u64) -> Vec<Sample> {
    db.transact(|tx| {
        let mut out = Vec::new();
        for (id, b) in repo.batches(tx, user)? {
            if matches!(b.status, BatchStatus::Published { version: v, .. } if v <= version) {
                out.extend(
                    repo.samples(tx, user, &id)?
                        .into_iter()
                        .filter(|s| s.heldout)
                        .map(|s| Sample {
                            frames: s.frames,
                            label: s.label,
                        }),
                );
            }
        }
        Ok(out)
    })
    .unwrap()
}

#[test]
fn both_download_formats_predict_the_same_on_each_users_heldout_windows() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.deployment = "e2e".into();
    config.partitions = 4;
    config.store = dir.path().join("store").display().to_string();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    config.ingest.listen = any;
    config.ingest.metrics_listen = any;
    config.publisher.listen = any;
    config.publisher.metrics_listen = any;
    config.validate().unwrap();
    let db = swimlane_runtime::open_store(&config).unwrap();
    swimlane_cli::init::install(&db, &config.deployment, 7, None).unwrap();
    let repo = Repo::new(Keys::new(&config.deployment));
    let base = MicroModel::from_bytes(
        &db.transact(|tx| repo.blob(tx, BASE_MODEL_BLOB))
            .unwrap()
            .unwrap(),
    )
    .unwrap();

    // The fleet: the ingest and publisher APIs on a runtime of their own, a trainer and
    // a validator on threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shutdown = swimlane_runtime::CancellationToken::new();
    // A failed assertion must fail the test, not hang it: dropping the runtime waits for
    // its blocking tasks, which run until their shutdown token is cancelled.
    let _cancel_on_unwind = shutdown.clone().drop_guard();
    let (ingest, publisher) = rt.block_on(async {
        let ingest = swimlane_ingest::start(
            config.clone(),
            swimlane_ingest::IngestDeps {
                db: db.clone(),
                emitter: swimlane_runtime::wiring::emitter(&config).unwrap(),
                registry: swimlane_runtime::new_registry(),
                clock: swimlane_runtime::system_now_ms(),
            },
            shutdown.clone(),
        )
        .await
        .unwrap();
        let publisher = swimlane_publisher::start(config.clone()).await.unwrap();
        (ingest, publisher)
    });
    let _cancel_publisher_on_unwind = publisher.shutdown.clone().drop_guard();
    let stages = Stages::start(&config, &db, &prometheus::Registry::new(), 1, false).unwrap();
    let ingest_url = format!("http://{}", ingest.api_addr);
    let publisher_url = format!("http://{}", publisher.api_addr);
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();

    let tokens: Vec<String> = USERS
        .iter()
        .map(|u| {
            let t = new_token();
            db.transact(|tx| repo.put_token(tx, &UserId::new(*u).unwrap(), &t, 0))
                .unwrap();
            t
        })
        .collect();
    // Swimmers the base model gets wrong often enough that one night's corrections
    // carry enough held-out evidence to judge (the policy defers otherwise).
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut swimmers = Vec::new();
    let mut seed = 2000;
    while swimmers.len() < USERS.len() {
        let swimmer = Swimmer::new(seed);
        let c = corrections(&base, &swimmer, 400, 200, &mut rng).unwrap();
        if c.len() >= 80 {
            swimmers.push((swimmer, c));
        }
        seed += 1;
    }
    for ((u, t), (_, c)) in USERS.iter().zip(&tokens).zip(&swimmers) {
        upload(&agent, &ingest_url, u, t, "night-1", c);
    }
    for u in USERS {
        let st = settle(&db, &repo, u, "night-1");
        assert!(
            matches!(st, BatchStatus::Published { version: 1, .. }),
            "{u}: {st:?}"
        );
    }
    // More nights for ana, each the corrections of what her phone runs then, until a
    // version fine-tuned from v1 is out (a deferred night is retrained with the next).
    let mut ana_version = 1;
    for night in 2..=5 {
        let current = get(
            &agent,
            &format!("{publisher_url}/v1/users/ana/model"),
            &tokens[0],
            &[],
        );
        let model = MicroModel::from_bytes(&current.body).unwrap();
        let c = corrections(&model, &swimmers[0].0, 2000, 200, &mut rng).unwrap();
        let batch = format!("night-{night}");
        upload(&agent, &ingest_url, "ana", &tokens[0], &batch, &c);
        let st = settle(&db, &repo, "ana", &batch);
        eprintln!("ana {batch}: {} corrections, {st:?}", c.len());
        if let BatchStatus::Published { version, .. } = st {
            ana_version = version;
            break;
        }
    }
    assert_eq!(ana_version, 2, "ana has a second version");

    for (u, token) in USERS.iter().zip(&tokens) {
        let url = format!("{publisher_url}/v1/users/{u}/model");
        let st = get(&agent, &url, token, &[]);
        let ox = get(&agent, &format!("{url}?format=onnx"), token, &[]);
        let ox_accept = get(&agent, &url, token, &[("Accept", "application/onnx")]);
        assert_eq!((st.status, ox.status, ox_accept.status), (200, 200, 200));
        // The same version in both formats; each body matches its hash header and ETag.
        let version: u64 = st.h("x-model-version").parse().unwrap();
        assert_eq!(ox.h("x-model-version"), st.h("x-model-version"));
        assert_eq!(ox.h("content-type"), "application/onnx");
        assert_eq!(ox_accept.body, ox.body);
        for got in [&st, &ox] {
            assert_eq!(got.h("x-model-sha256"), sha256_hex(&got.body));
            assert_eq!(got.h("etag"), format!("\"{}\"", sha256_hex(&got.body)));
        }
        assert!(ox.body.len() <= MAX_MODEL_BYTES, "{} bytes", ox.body.len());
        let not_modified = get(
            &agent,
            &format!("{url}?format=onnx"),
            token,
            &[("If-None-Match", ox.h("etag"))],
        );
        assert_eq!(not_modified.status, 304);
        assert_eq!(not_modified.h("x-model-version"), version.to_string());

        // The ONNX file names its version and lineage, and the weights it came from.
        let candle = MicroModel::from_bytes(&st.body).unwrap();
        let onnx_model = OnnxModel::from_bytes(&ox.body).unwrap();
        let versions: serde_json::Value =
            serde_json::from_slice(&get(&agent, &format!("{url}/versions"), token, &[]).body)
                .unwrap();
        let rec = versions["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == version)
            .unwrap()
            .clone();
        let md = onnx_model.metadata();
        assert_eq!(md["model_version"], version.to_string());
        assert_eq!(md["training_run"], rec["run_id"].as_str().unwrap());
        let parent = rec["parent_version"]
            .as_u64()
            .map_or("base".to_string(), |p| p.to_string());
        assert_eq!(md["parent_version"], parent);
        assert_eq!(md["weights_sha256"], sha256_hex(&st.body));
        assert_eq!(rec["onnx"]["sha256"], sha256_hex(&ox.body));

        // The ONNX file is the device's model: the personal model (the safetensors
        // file) for windows familiar to it, the installed base model for the others.
        let run_id = rec["run_id"].as_str().unwrap();
        let run = db.transact(|tx| repo.run(tx, u, run_id)).unwrap().unwrap();
        let familiarity = run.familiarity.expect("the run recorded its familiarity");
        // The user's history says so too.
        let history: serde_json::Value = serde_json::from_slice(
            &get(
                &agent,
                &format!("{publisher_url}/v1/users/{u}/history"),
                token,
                &[],
            )
            .body,
        )
        .unwrap();
        let in_history = history["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == version)
            .unwrap()["base_fallback"]
            .clone();
        assert_eq!(in_history, serde_json::json!(familiarity.falls_back()));
        assert_eq!(md["fallback"], "base");
        assert_eq!(
            md["personal_weight"],
            familiarity.personal_weight.to_string()
        );
        assert_eq!(md["base_weights_sha256"], sha256_hex(&base.to_bytes()));
        let base_sha = sha256_hex(&base.to_bytes());
        let fb = onnx::Fallback {
            base: &base,
            base_weights_sha256: &base_sha,
            familiarity: &familiarity,
        };

        // The user's held-out windows: the device's file computes what candle computes
        // with the same choice; the safetensors file scores the accuracy the validator
        // accepted (the gate judges the personal model).
        let held = heldout_windows(&db, &repo, u, version);
        assert!(held.len() >= 16, "{u}: {} held-out windows", held.len());
        let refs: Vec<&[f32]> = held.iter().map(|s| s.frames.as_slice()).collect();
        let pc = onnx::predict_proba_with_fallback(&candle, Some(&fb), &refs).unwrap();
        let po = onnx_model.predict_proba(&refs).unwrap();
        let parity = onnx::compare(&pc, &po);
        let (mean, std) = candle.normalisation();
        let familiar = refs
            .iter()
            .filter(|w| familiarity.knows(w, mean, std))
            .count();
        eprintln!(
            "{u} v{version}: {parity}; {familiar} of {} held-out windows familiar",
            refs.len()
        );
        assert!(parity.holds(), "{u}: {parity}");
        let accuracy = |probabilities: &[Vec<f32>]| {
            let correct = probabilities
                .iter()
                .zip(&held)
                .filter(|(p, s)| swimlane_model::net::argmax_class(p) == s.label)
                .count();
            correct as f32 / held.len() as f32
        };
        let personal = accuracy(&candle.predict_proba(&refs).unwrap());
        let accepted = rec["heldout_accuracy"].as_f64().unwrap() as f32;
        assert!(
            (personal - accepted).abs() < 1e-6,
            "{u} v{version}: the safetensors file scores {personal} on the held-out windows, the validator accepted {accepted}"
        );
        eprintln!(
            "{u} v{version}: held-out accuracy {personal} (personal model), {} (the device's file)",
            accuracy(&po)
        );
    }

    shutdown.cancel();
    publisher.shutdown.cancel();
    stages.stop().unwrap();
    rt.block_on(async {
        let _ = ingest.handle.await;
        let _ = publisher.handle.await;
    });
}
