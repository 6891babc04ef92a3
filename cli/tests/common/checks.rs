//! The exactly-once check shared by the crash tests, and the device-side helpers they
//! drive uploads with.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use swimlane_core::records::BatchStatus;
use swimlane_core::{topics, Event};
use swimlane_model::MicroModel;
use swimlane_store::Db;

use super::{log_events, repo, request, Fleet};

/// Whether every accepted batch (`(user index, batch id)`, users named by `users`)
/// rests in a settled status and no run is in flight.
pub fn all_settled(db: &Db, users: &[String], accepted: &[(usize, String)]) -> bool {
    let repo = repo();
    db.transact(|tx| {
        let mine: BTreeSet<usize> = accepted.iter().map(|(u, _)| *u).collect();
        for u in mine {
            if repo.user_state(tx, &users[u])?.inflight_run.is_some() {
                return Ok(false);
            }
        }
        for (u, b) in accepted {
            match repo.batch(tx, &users[*u], b)? {
                Some(r)
                    if r.status.is_terminal()
                        || matches!(r.status, BatchStatus::Deferred { .. }) => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    })
    .unwrap()
}

/// The model a device runs now: its published one, else the base model.
pub fn current_model(
    http: &ureq::Agent,
    publisher: &str,
    user: &str,
    token: &str,
    base: &MicroModel,
    deadline: Instant,
) -> MicroModel {
    let url = format!("{publisher}/v1/users/{user}/model");
    loop {
        match request(http, "GET", &url, Some(token), &[], None) {
            Ok(r) if r.status == 200 => return MicroModel::from_bytes(&r.body).unwrap(),
            Ok(r) if r.status == 404 => return base.clone(),
            Ok(r) if r.status >= 500 => {}
            Ok(r) => panic!(
                "GET {url}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "GET {url}: no answer");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// POST the batch until it gets 202; a transport error or a 5xx is retried with the
/// same batch id and body. Returns how many attempts were interrupted.
pub fn upload_until_accepted(
    http: &ureq::Agent,
    url: &str,
    token: &str,
    body: &[u8],
    in_flight: &AtomicUsize,
    deadline: Instant,
) -> usize {
    let mut interrupted = 0;
    loop {
        in_flight.fetch_add(1, Ordering::SeqCst);
        let r = request(http, "POST", url, Some(token), &[], Some(body));
        in_flight.fetch_sub(1, Ordering::SeqCst);
        match r {
            Ok(a) if a.status == 202 => return interrupted,
            Ok(a) if a.status >= 500 => interrupted += 1,
            Ok(a) => panic!(
                "POST {url}: {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            ),
            Err(_) => interrupted += 1,
        }
        assert!(Instant::now() < deadline, "POST {url}: never accepted");
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// Every event of the pipeline's topics, each with its partition and offset: from the
/// embedded log ([`Events::from_log`]) or from Kafka (one record per outbox entry).
pub struct Events {
    pub batches: Vec<(u32, u64, Event)>,
    pub candidates: Vec<(u32, u64, Event)>,
    pub verdicts: Vec<(u32, u64, Event)>,
    pub published: Vec<(u32, u64, Event)>,
}

impl Events {
    /// The whole embedded log; there must be no dead letter in it.
    pub fn from_log(db: &Db, partitions: u32) -> Events {
        let dead = log_events(db, topics::DEAD_LETTER, partitions);
        assert!(dead.is_empty(), "dead letters: {dead:?}");
        Events {
            batches: log_events(db, topics::BATCHES, partitions),
            candidates: log_events(db, topics::CANDIDATES, partitions),
            verdicts: log_events(db, topics::VERDICTS, partitions),
            published: log_events(db, topics::PUBLISHED, partitions),
        }
    }
}

/// Every accepted batch was trained, validated and published (or rejected, or
/// deferred) exactly once: checked on the settled store, on `events` (no stage's
/// event twice) and through the HTTP APIs. At least `min_versions` versions must have
/// been published over all users, for the check to mean something.
#[allow(clippy::too_many_arguments)]
pub fn check_exactly_once(
    fleet: &Fleet,
    db: &Db,
    users: &[String],
    tokens: &[String],
    accepted: &[(usize, String)],
    http: &ureq::Agent,
    events: &Events,
    min_versions: u64,
) {
    let repo = repo();
    let (ingest, publisher) = (fleet.ingest_url(), fleet.publisher_url());

    // --- The events: no stage's effect applied twice. ---
    let (candidates, verdicts, published) =
        (&events.candidates, &events.verdicts, &events.published);
    // Every accepted upload's event is in the log (ingest commits it with the batch;
    // the stages re-emit triggers, so more than one per batch is fine).
    let staged: BTreeSet<(String, String)> = events
        .batches
        .iter()
        .map(|(p, off, ev)| match ev {
            Event::BatchStaged { user, batch_id, .. } => {
                (user.to_string(), batch_id.as_str().to_string())
            }
            other => panic!("{p}@{off}: {other:?} on the batches topic"),
        })
        .collect();
    for (u, b) in accepted {
        assert!(
            staged.contains(&(users[*u].clone(), b.clone())),
            "{}/{b}: no BatchStaged event",
            users[*u]
        );
    }
    // (user, run) → batches, from CandidateTrained.
    let mut trained: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (p, off, ev) in candidates {
        let Event::CandidateTrained {
            user,
            run_id,
            batches,
        } = ev
        else {
            panic!("{p}@{off}: {ev:?} on the candidates topic");
        };
        let prev = trained.insert(
            (user.to_string(), run_id.clone()),
            batches.iter().map(|b| b.as_str().to_string()).collect(),
        );
        assert!(prev.is_none(), "run {run_id} of {user} trained twice");
    }
    // (user, run) → accepted?
    let mut verdict_of: BTreeMap<(String, String), bool> = BTreeMap::new();
    for (p, off, ev) in verdicts {
        let (user, run_id, acc) = match ev {
            Event::CandidateAccepted { user, run_id } => (user, run_id, true),
            Event::CandidateRejected { user, run_id, .. } => (user, run_id, false),
            other => panic!("{p}@{off}: {other:?} on the verdicts topic"),
        };
        let k = (user.to_string(), run_id.clone());
        assert!(
            trained.contains_key(&k),
            "verdict for an untrained run {k:?}"
        );
        let prev = verdict_of.insert(k.clone(), acc);
        assert!(prev.is_none(), "run {k:?} got two verdicts");
    }
    // (user, version) → run, and run → version, from ModelPublished.
    let mut version_run: BTreeMap<(String, u64), String> = BTreeMap::new();
    let mut run_version: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (p, off, ev) in published {
        let Event::ModelPublished {
            user,
            run_id,
            version,
        } = ev
        else {
            panic!("{p}@{off}: {ev:?} on the published topic");
        };
        let u = user.to_string();
        let prev = version_run.insert((u.clone(), *version), run_id.clone());
        assert!(prev.is_none(), "{u} version {version} published twice");
        let prev = run_version.insert((u.clone(), run_id.clone()), *version);
        assert!(prev.is_none(), "run {run_id} of {u} published twice");
        assert_eq!(
            verdict_of.get(&(u.clone(), run_id.clone())),
            Some(&true),
            "{u} published run {run_id} without an accepting verdict"
        );
    }
    // Every run got exactly one verdict, every accepted run exactly one version.
    for (k, acc) in &verdict_of {
        assert_eq!(*acc, run_version.contains_key(k), "run {k:?}");
    }
    for k in trained.keys() {
        assert!(verdict_of.contains_key(k), "run {k:?} has no verdict");
    }

    // --- The store. ---
    let mut total_versions = 0;
    let mut per_user_versions = Vec::new();
    let mut statuses: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, u) in users.iter().enumerate() {
        let mine: BTreeSet<String> = accepted
            .iter()
            .filter(|(j, _)| *j == i)
            .map(|(_, b)| b.clone())
            .collect();
        let (batches, versions, state) = db
            .transact(|tx| {
                Ok((
                    repo.batches(tx, u)?,
                    repo.model_versions(tx, u)?,
                    repo.user_state(tx, u)?,
                ))
            })
            .unwrap();
        // No 202-acknowledged batch is missing, and nothing else was staged.
        let stored: BTreeSet<String> = batches.iter().map(|(b, _)| b.clone()).collect();
        assert_eq!(stored, mine, "{u}: stored batches vs accepted uploads");

        // Versions 1..N, no gap, no repeat; the head is the last one.
        let n = versions.len() as u64;
        total_versions += n;
        per_user_versions.push(n);
        let numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
        assert_eq!(numbers, (1..=n).collect::<Vec<_>>(), "{u}: versions");
        assert_eq!(state.last_version, n, "{u}: last_version");
        assert_eq!(state.head, (n > 0).then_some(n), "{u}: head");
        assert_eq!(state.inflight_run, None, "{u}: a run still in flight");
        let logged: Vec<u64> = version_run
            .keys()
            .filter(|(v_user, _)| v_user == u)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(logged, numbers, "{u}: ModelPublished events vs versions");

        // Each version's batches are disjoint from the others', and are published as
        // that version.
        let mut owner: BTreeMap<&str, u64> = BTreeMap::new();
        for v in &versions {
            assert_eq!(
                version_run.get(&(u.clone(), v.version)),
                Some(&v.run_id),
                "{u} v{}: run",
                v.version
            );
            assert_eq!(
                trained.get(&(u.clone(), v.run_id.clone())),
                Some(&v.batches),
                "{u} v{}: batches of its run",
                v.version
            );
            let run = db
                .transact(|tx| repo.run(tx, u, &v.run_id))
                .unwrap()
                .expect("run record");
            assert_eq!(run.published_version, Some(v.version), "{u} v{}", v.version);
            assert!(run.verdict.as_ref().is_some_and(|x| x.accepted));
            for b in &v.batches {
                if let Some(other) = owner.insert(b, v.version) {
                    panic!("{u}: batch {b} in versions {other} and {}", v.version);
                }
            }
        }
        for (b, r) in &batches {
            let word = match &r.status {
                BatchStatus::Published { run_id, version } => {
                    assert_eq!(owner.get(b.as_str()), Some(version), "{u}/{b}: {r:?}");
                    assert_eq!(&versions[*version as usize - 1].run_id, run_id, "{u}/{b}");
                    "published"
                }
                BatchStatus::Rejected { run_id, .. } => {
                    assert!(
                        !owner.contains_key(b.as_str()),
                        "{u}/{b}: rejected yet in a version"
                    );
                    let run_id = run_id.as_ref().expect("rejected by a verdict");
                    assert_eq!(
                        verdict_of.get(&(u.clone(), run_id.clone())),
                        Some(&false),
                        "{u}/{b}: rejected by {run_id}"
                    );
                    "rejected"
                }
                BatchStatus::Deferred { .. } => {
                    assert!(
                        !owner.contains_key(b.as_str()),
                        "{u}/{b}: deferred yet in a version"
                    );
                    "deferred"
                }
                other => panic!("{u}/{b}: not settled: {other:?}"),
            };
            *statuses.entry(word).or_default() += 1;
            // At most one accepted run ever trained on this batch; the batch is in
            // every run the log says it is in (and runs are never retrained).
            let runs: Vec<&(String, String)> = trained
                .iter()
                .filter(|((ru, _), bs)| ru == u && bs.contains(b))
                .map(|(k, _)| k)
                .collect();
            let accepted_runs = runs
                .iter()
                .filter(|k| verdict_of.get(**k) == Some(&true))
                .count();
            assert!(
                accepted_runs <= 1,
                "{u}/{b}: in {accepted_runs} accepted runs"
            );
            assert_eq!(
                accepted_runs == 1,
                word == "published",
                "{u}/{b}: {word} but in {accepted_runs} accepted runs"
            );
            // The device sees the same status through the API.
            let r = request(
                http,
                "GET",
                &format!("{ingest}/v1/users/{u}/batches/{b}"),
                Some(&tokens[i]),
                &[],
                None,
            )
            .unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.json()["status"], word, "{u}/{b} through the API");
        }

        // The device gets the last version.
        let r = request(
            http,
            "GET",
            &format!("{publisher}/v1/users/{u}/model"),
            Some(&tokens[i]),
            &[],
            None,
        )
        .unwrap();
        if n == 0 {
            assert_eq!(r.status, 404, "{u}");
        } else {
            assert_eq!(r.status, 200, "{u}");
            assert_eq!(r.header("x-model-version"), Some(n.to_string().as_str()));
            let sha = hex::encode(Sha256::digest(&r.body));
            assert_eq!(sha, versions[n as usize - 1].sha256, "{u}: model bytes");
            MicroModel::from_bytes(&r.body).unwrap();
        }
    }
    eprintln!(
        "settled batches: {statuses:?}; versions published: {total_versions} ({per_user_versions:?} per user); runs trained: {}; verdicts: {}",
        trained.len(),
        verdict_of.len()
    );
    assert!(
        total_versions >= min_versions,
        "too few versions published ({total_versions}) for the test to mean much"
    );
}
