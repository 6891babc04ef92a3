//! Exactly once under crashes: the four workers run as separate processes on one
//! embedded store; while devices upload and the pipeline works, each worker kind in
//! turn is killed with SIGKILL in the middle of its work and restarted at once. At the
//! end every accepted upload must have been trained, validated and published (or
//! rejected, or deferred) exactly once, in the store and in the embedded log.
//!
//! The kill schedule is drawn from a seed, printed at the start; set
//! `CRASH_TEST_SEED=<n>` to draw the same one again (the timing of the processes still
//! varies from run to run).
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{agent, backlog, log_events, repo, request, upload_body, Fleet, Kind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use swimlane_core::records::BatchStatus;
use swimlane_core::{topics, Event};
use swimlane_model::synth::{corrections, corrections_from, poison, Swimmer};
use swimlane_model::MicroModel;
use swimlane_store::Db;

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: usize = 6;
/// Nights of uploads: at least `NIGHTS`, more (up to `MAX_NIGHTS`) until every worker
/// kind has been killed at least `MIN_KILLS` times.
const NIGHTS: usize = 3;
const MAX_NIGHTS: usize = 6;
const MIN_KILLS: usize = 2;
/// Windows the phone classifies per night, and the most corrections it uploads.
const OBSERVED: usize = 300;
/// After the first night the models make fewer mistakes: the phone observes more
/// windows, so that later nights still bring enough corrections to publish.
const OBSERVED_LATER: usize = 1500;
const MAX_CORRECTIONS: usize = 200;
/// Config default: every process agrees on it.
const PARTITIONS: u32 = 8;
const LEASE_TTL_MS: &str = "1500";
/// Trainer, validator and publisher kills per night, at most.
const STAGE_KILLS_PER_NIGHT: usize = 3;
/// Ingest kills per night's uploads, at most.
const INGEST_KILLS_PER_NIGHT: usize = 2;
const DEADLINE: Duration = Duration::from_secs(300);

struct Kill {
    at: f64,
    night: usize,
    kind: Kind,
    pid: u32,
    delay_ms: u64,
    what: String,
}

/// Print the kill as it happens (so a failing run shows its schedule so far) and keep
/// it for the summary.
fn log_kill(kills: &mut Vec<Kill>, k: Kill) {
    eprintln!(
        "[{:6.1}s] night {}: killed {} (pid {}) after {} ms: {}",
        k.at,
        k.night,
        k.kind.name(),
        k.pid,
        k.delay_ms,
        k.what
    );
    kills.push(k);
}

/// Uploads that are accepted (202), and how the devices fared.
#[derive(Default)]
struct Uploads {
    accepted: Vec<(usize, String)>,
    /// Attempts that met a transport error (the server died under them) or a 5xx.
    interrupted: usize,
}

fn user_name(i: usize) -> String {
    format!("swimmer-{i:02}")
}

/// The model a device runs now: its published one, else the base model.
fn current_model(
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
fn upload_until_accepted(
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

/// Whether every accepted batch rests in a settled status and no run is in flight.
fn all_settled(db: &Db, accepted: &[(usize, String)]) -> bool {
    let repo = repo();
    db.transact(|tx| {
        let users: BTreeSet<usize> = accepted.iter().map(|(u, _)| *u).collect();
        for u in users {
            let name = user_name(u);
            if repo.user_state(tx, &name)?.inflight_run.is_some() {
                return Ok(false);
            }
        }
        for (u, b) in accepted {
            match repo.batch(tx, &user_name(*u), b)? {
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

fn seed() -> u64 {
    match std::env::var("CRASH_TEST_SEED") {
        Ok(s) => s.parse().expect("CRASH_TEST_SEED is a number"),
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000
        }
    }
}

#[test]
fn killing_workers_mid_work_applies_every_stage_exactly_once() {
    let t0 = Instant::now();
    let deadline = t0 + DEADLINE;
    let seed = seed();
    eprintln!("kill schedule seed {seed} (CRASH_TEST_SEED={seed} draws it again)");
    let mut sched = ChaCha8Rng::seed_from_u64(seed);

    let fleet = Fleet::new(&[
        ("SWIMLANE_TRAINER_CONSUMER_LEASE_TTL_MS", LEASE_TTL_MS),
        ("SWIMLANE_VALIDATOR_CONSUMER_LEASE_TTL_MS", LEASE_TTL_MS),
        ("SWIMLANE_PUBLISHER_CONSUMER_LEASE_TTL_MS", LEASE_TTL_MS),
    ]);
    let users: Vec<String> = (0..USERS).map(user_name).collect();
    let tokens: Vec<String> = users.iter().map(|u| fleet.token(u)).collect();
    fleet.start_all();
    let db = fleet.db();
    let base = common::base_model(&db);
    let (ingest, publisher) = (fleet.ingest_url(), fleet.publisher_url());
    let http = agent();

    // Swimmers the base model gets wrong often enough that a night's corrections carry
    // enough held-out evidence to judge, so that models get published. The data do not
    // depend on the kill seed.
    let mut pick = ChaCha8Rng::seed_from_u64(1);
    let mut swimmers = Vec::new();
    let mut s = 2000;
    while swimmers.len() < USERS {
        let sw = Swimmer::new(s);
        if corrections(&base, &sw, OBSERVED, MAX_CORRECTIONS, &mut pick)
            .unwrap()
            .len()
            >= 90
        {
            swimmers.push(sw);
        }
        s += 1;
    }
    let mut nights_rng: Vec<ChaCha8Rng> = (0..USERS)
        .map(|i| ChaCha8Rng::seed_from_u64(100 + i as u64))
        .collect();
    eprintln!("fleet ready after {:.1}s", t0.elapsed().as_secs_f64());

    let mut uploads = Uploads::default();
    let mut kills: Vec<Kill> = Vec::new();
    let restart = |k: Kind| {
        fleet.spawn(k);
        fleet.wait_ready(k, Duration::from_secs(60));
    };
    let now = |t0: Instant| t0.elapsed().as_secs_f64();

    let stage_kinds = [Kind::Trainer, Kind::Validator, Kind::Publisher];
    // The stage kind to kill next (in turn, across nights).
    let mut next_stage = 0;
    for night in 0..MAX_NIGHTS {
        let enough = Kind::ALL
            .iter()
            .all(|k| kills.iter().filter(|x| x.kind == *k).count() >= MIN_KILLS);
        if night >= NIGHTS && enough {
            break;
        }
        // Each device: the night's corrections of the model it runs now. From the
        // second night on, a third of the devices upload a poisoned batch (the night's
        // windows with their labels shuffled), whose candidate is rejected.
        let mut batches = Vec::new();
        for i in 0..USERS {
            let model = current_model(&http, &publisher, &users[i], &tokens[i], &base, deadline);
            let n = if night == 0 { OBSERVED } else { OBSERVED_LATER };
            let observed = swimmers[i].windows(n, &mut nights_rng[i]);
            let c = if night > 0 && (i + night) % 3 == 0 {
                poison(&observed[..MAX_CORRECTIONS], &mut nights_rng[i])
            } else {
                corrections_from(&model, &observed, MAX_CORRECTIONS).unwrap()
            };
            if c.is_empty() {
                continue;
            }
            let id = format!("night-{night}");
            batches.push((i, id.clone(), upload_body(&id, &c), c.len()));
        }
        eprintln!(
            "[{:6.1}s] night {night}: uploading {:?}",
            now(t0),
            batches
                .iter()
                .map(|(i, _, _, n)| (users[*i].as_str(), *n))
                .collect::<Vec<_>>()
        );

        // All devices upload at once; ingest is killed while uploads are in flight.
        let in_flight = AtomicUsize::new(0);
        let finished = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let handles: Vec<_> = batches
                .iter()
                .map(|(i, _, body, _)| {
                    let (http, in_flight, finished) = (&http, &in_flight, &finished);
                    let url = format!("{ingest}/v1/users/{}/batches", users[*i]);
                    let token = &tokens[*i];
                    scope.spawn(move || {
                        let n = upload_until_accepted(http, &url, token, body, in_flight, deadline);
                        finished.fetch_add(1, Ordering::SeqCst);
                        n
                    })
                })
                .collect();
            let mut ingest_kills = 0;
            while ingest_kills < INGEST_KILLS_PER_NIGHT {
                let delay = sched.random_range(0..80u64);
                // Wait for an upload in flight; stop when all are done.
                let mut killed = false;
                while finished.load(Ordering::SeqCst) < batches.len() {
                    if in_flight.load(Ordering::SeqCst) > 0 {
                        std::thread::sleep(Duration::from_millis(delay));
                        let n = in_flight.load(Ordering::SeqCst);
                        if n > 0 {
                            let pid = fleet.kill(Kind::Ingest);
                            log_kill(
                                &mut kills,
                                Kill {
                                    at: now(t0),
                                    night,
                                    kind: Kind::Ingest,
                                    pid,
                                    delay_ms: delay,
                                    what: format!("{n} uploads in flight"),
                                },
                            );
                            restart(Kind::Ingest);
                            killed = true;
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                if !killed {
                    break;
                }
                ingest_kills += 1;
            }
            for (h, (i, id, _, _)) in handles.into_iter().zip(&batches) {
                uploads.interrupted += h.join().expect("upload thread");
                uploads.accepted.push((*i, id.clone()));
            }
        });
        eprintln!("[{:6.1}s] night {night}: uploads accepted", now(t0));

        // The stages work through the night's uploads; trainer, validator and publisher
        // are killed in turn, each while it has records it has not committed yet.
        let mut tonight = 0;
        'night: while tonight < STAGE_KILLS_PER_NIGHT {
            let kind = stage_kinds[next_stage % stage_kinds.len()];
            let delay = match kind {
                Kind::Trainer => sched.random_range(100..1500u64),
                Kind::Validator => sched.random_range(0..120u64),
                _ => sched.random_range(0..20u64),
            };
            loop {
                fleet.assert_alive();
                if all_settled(&db, &uploads.accepted) {
                    break 'night;
                }
                assert!(Instant::now() < deadline, "night {night} did not settle");
                if backlog(&db, kind, PARTITIONS) == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                std::thread::sleep(Duration::from_millis(delay));
                let n = backlog(&db, kind, PARTITIONS);
                if n == 0 {
                    continue; // done already: wait for its next work
                }
                let pid = fleet.kill(kind);
                log_kill(
                    &mut kills,
                    Kill {
                        at: now(t0),
                        night,
                        kind,
                        pid,
                        delay_ms: delay,
                        what: format!("{n} records not yet committed"),
                    },
                );
                restart(kind);
                break;
            }
            next_stage += 1;
            tonight += 1;
        }
        while !all_settled(&db, &uploads.accepted) {
            fleet.assert_alive();
            assert!(Instant::now() < deadline, "night {night} did not settle");
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("[{:6.1}s] night {night}: settled", now(t0));
    }

    eprintln!("kill schedule (seed {seed}):");
    for k in &kills {
        eprintln!(
            "  {:6.1}s night {} {:<9} pid {:<7} after {:>4} ms: {}",
            k.at,
            k.night,
            k.kind.name(),
            k.pid,
            k.delay_ms,
            k.what
        );
    }
    let per_kind: BTreeMap<&str, usize> = Kind::ALL
        .iter()
        .map(|k| (k.name(), kills.iter().filter(|x| x.kind == *k).count()))
        .collect();
    eprintln!(
        "kills per worker: {per_kind:?}; uploads accepted: {}, interrupted attempts: {}",
        uploads.accepted.len(),
        uploads.interrupted
    );
    for k in Kind::ALL {
        assert!(
            per_kind[k.name()] >= MIN_KILLS,
            "{} was killed fewer than {MIN_KILLS} times",
            k.name()
        );
    }
    assert!(
        uploads.interrupted >= 1,
        "no upload was interrupted by an ingest kill"
    );
    fleet.assert_alive();

    let w = fleet.warnings();
    eprintln!(
        "worker logs: {} warning/error lines ({} about fencing)",
        w.len(),
        w.iter().filter(|l| l.contains("fenced")).count()
    );
    for l in w.iter().filter(|l| l.contains(" ERROR ")).take(5) {
        eprintln!("  {l}");
    }

    check_exactly_once(&fleet, &db, &users, &tokens, &uploads.accepted, &http);
    eprintln!("done in {:.1}s", now(t0));
}

/// Every check of the test's name, on the settled store and the whole embedded log.
fn check_exactly_once(
    fleet: &Fleet,
    db: &Db,
    users: &[String],
    tokens: &[String],
    accepted: &[(usize, String)],
    http: &ureq::Agent,
) {
    let repo = repo();
    let (ingest, publisher) = (fleet.ingest_url(), fleet.publisher_url());

    // --- The embedded log: no stage's effect applied twice. ---
    let candidates = log_events(db, topics::CANDIDATES, PARTITIONS);
    let verdicts = log_events(db, topics::VERDICTS, PARTITIONS);
    let published = log_events(db, topics::PUBLISHED, PARTITIONS);
    let dead = log_events(db, topics::DEAD_LETTER, PARTITIONS);
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    // Every accepted upload's event is in the log (ingest commits it with the batch;
    // the stages re-emit triggers, so more than one per batch is fine).
    let staged: BTreeSet<(String, String)> = log_events(db, topics::BATCHES, PARTITIONS)
        .into_iter()
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
    for (p, off, ev) in &candidates {
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
    for (p, off, ev) in &verdicts {
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
    for (p, off, ev) in &published {
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
        total_versions as usize >= USERS / 2,
        "too few versions published ({total_versions}) for the test to mean much"
    );
}
