//! End to end with the four workers as four separate OS processes (`swimlane worker
//! ingest|trainer|validator|publisher`) on one embedded store: devices upload
//! corrections through the ingest API and get their new model from the publisher API.
mod common;

use swimlane_cli::client::Device;

use std::time::{Duration, Instant};

use common::{agent, request, upload_body, Fleet, Kind};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use swimlane_model::synth::{corrections, Swimmer};
use swimlane_model::MicroModel;

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: [&str; 4] = ["ana", "ben", "cleo", "dmitri"];

#[test]
fn a_trainer_and_a_validator_started_before_admin_init_are_not_ready_and_say_why() {
    let fleet = Fleet::uninitialised(&[]);
    fleet.spawn(Kind::Trainer);
    fleet.spawn(Kind::Validator);
    let http = agent();
    for (k, missing) in [
        (Kind::Trainer, "the base model (run `swimlane admin init`)"),
        (
            Kind::Validator,
            "the base model and the guard set (run `swimlane admin init`)",
        ),
    ] {
        let url = format!("http://{}/readyz", fleet.ops((k, 0)));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // 503 from the start; the reason once the worker has looked at the store.
            if let Ok(r) = request(&http, "GET", &url, None, &[], None) {
                let body = String::from_utf8_lossy(&r.body).to_string();
                assert_eq!(r.status, 503, "{k:?} ready before admin init: {body}");
                if body.contains("waiting for") {
                    assert_eq!(body, format!("not ready: waiting for {missing}\n"));
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{k:?} never said what it waits for; its log:\n{}",
                fleet.log_tail((k, 0), 1)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let out = fleet.admin(&["init"]);
    assert!(out.contains("installed"), "admin init: {out}");
    // Both see the base model (and the guard set) within their next check.
    fleet.wait_ready(Kind::Trainer, Duration::from_secs(30));
    fleet.wait_ready(Kind::Validator, Duration::from_secs(30));
}

#[test]
fn four_worker_processes_publish_every_users_model() {
    let t0 = Instant::now();
    let fleet = Fleet::new(&[]);
    let tokens: Vec<String> = USERS.iter().map(|u| fleet.token(u)).collect();
    fleet.start_all();
    eprintln!("fleet ready after {:.1}s", t0.elapsed().as_secs_f64());
    let (ingest, publisher) = (fleet.ingest_url(), fleet.publisher_url());
    let http = agent();

    // Before any upload: no model yet (the device keeps the base model).
    let r = request(
        &http,
        "GET",
        &format!("{publisher}/v1/users/{}/model", USERS[0]),
        Some(&tokens[0]),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 404, "{:?}", r.json());

    // Swimmers the base model gets wrong often enough that one night's corrections
    // carry enough held-out evidence to judge (the policy defers otherwise).
    let base = common::base_model(&fleet.db());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut batches = Vec::new();
    let mut seed = 1000;
    while batches.len() < USERS.len() {
        let c = corrections(&base, &Swimmer::new(seed), 400, 200, &mut rng).unwrap();
        if c.len() >= 80 {
            batches.push(c);
        }
        seed += 1;
    }

    for (i, u) in USERS.iter().enumerate() {
        let body = upload_body("night-1", &batches[i]);
        let url = format!("{ingest}/v1/users/{u}/batches");
        let r = request(&http, "POST", &url, Some(&tokens[i]), &[], Some(&body)).unwrap();
        assert_eq!(r.status, 202, "{u}: {:?}", r.json());
        assert_eq!(r.json()["status"], "staged");
        // A retry with the same id and content is the same upload.
        let r = request(&http, "POST", &url, Some(&tokens[i]), &[], Some(&body)).unwrap();
        assert_eq!(r.status, 202, "{u} retry: {:?}", r.json());
        // Another user's token may not upload for this user. (No body: ingest refuses
        // before reading it, and a client still sending one may meet a reset.)
        let other = &tokens[(i + 1) % USERS.len()];
        let r = request(&http, "POST", &url, Some(other), &[], Some(b"")).unwrap();
        assert_eq!(r.status, 403, "{u} with another user's token");
    }

    // Wait until every batch has settled (polling the ingest status API).
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut pending: Vec<usize> = (0..USERS.len()).collect();
    while !pending.is_empty() {
        fleet.assert_alive();
        let mut still = Vec::new();
        for i in pending {
            let u = USERS[i];
            let st = Device::new(&ingest, &publisher, u, &tokens[i])
                .status("night-1")
                .unwrap();
            if common::settled(st["status"].as_str().unwrap_or("")) {
                assert_eq!(st["status"], "published", "{u}: {st}");
                assert_eq!(st["version"], 1, "{u}: {st}");
            } else {
                still.push(i);
            }
        }
        pending = still;
        if !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "not settled within 180 s: {:?}",
                pending.iter().map(|i| USERS[*i]).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("all published after {:.1}s", t0.elapsed().as_secs_f64());

    for (i, u) in USERS.iter().enumerate() {
        let url = format!("{publisher}/v1/users/{u}/model");
        let r = request(&http, "GET", &url, Some(&tokens[i]), &[], None).unwrap();
        assert_eq!(r.status, 200, "{u}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-model-version"), Some("1"), "{u}");
        let sha = hex::encode(Sha256::digest(&r.body));
        assert_eq!(r.header("x-model-sha256"), Some(sha.as_str()), "{u}");
        let model = MicroModel::from_bytes(&r.body).unwrap_or_else(|e| panic!("{u}: {e}"));
        // The published model is the user's own, not the base model.
        assert_ne!(model.to_bytes(), base.to_bytes(), "{u}");
        // A device that has it already gets 304.
        let etag = r.header("etag").expect("ETag").to_string();
        let r = request(
            &http,
            "GET",
            &url,
            Some(&tokens[i]),
            &[("If-None-Match", &etag)],
            None,
        )
        .unwrap();
        assert_eq!(r.status, 304, "{u}");
        // Another user's token: 403; no token: 401.
        let other = &tokens[(i + 1) % USERS.len()];
        let r = request(&http, "GET", &url, Some(other), &[], None).unwrap();
        assert_eq!(r.status, 403, "{u} with another user's token");
        let r = request(&http, "GET", &url, None, &[], None).unwrap();
        assert_eq!(r.status, 401, "{u} without a token");
        let versions = Device::new(&ingest, &publisher, u, &tokens[i]).versions();
        assert_eq!(versions.unwrap(), 1, "{u}");
    }
    fleet.assert_alive();
    eprintln!("done in {:.1}s", t0.elapsed().as_secs_f64());
}
