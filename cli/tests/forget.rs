//! Issue 17, item 4: forgetting a user. A user is erased mid-pipeline (batches staged,
//! a run in flight, versions published) while another keeps uploading: afterwards no
//! key or value of the store names the user or holds their samples, nor do the store's
//! files on disk; the other users' models are untouched and the exactly-once audit
//! passes; uploads for the erased user are refused (410). A second erasure, run by
//! `swimlane admin forget` in its own process, is killed with SIGKILL part-way and
//! finished by running the command again.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use swimlane_cli::audit::{audit, AuditUser, Events, Expect};
use swimlane_cli::client::Device;
use swimlane_cli::fleet::LocalFleet;
use swimlane_cli::{init, upload};
use swimlane_core::keys::Keys;
use swimlane_core::UserId;
use swimlane_model::synth::Swimmer;
use swimlane_model::Sample;
use swimlane_runtime::Config;
use swimlane_state::tokens::{hash_token, new_token};
use swimlane_state::Repo;
use swimlane_store::{Db, RangeOption};

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

const GHOST: &str = "ghost-swimmer-7";
const GHOST2: &str = "ghost-swimmer-8";

/// The first 16 values of a window, as stored (f32 LE): found in a value only if
/// that value holds the window.
fn marker(s: &Sample) -> Vec<u8> {
    s.frames[..16]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every key and value of the store that names `user` or holds `sample`.
fn traces(db: &Db, keys: &Keys, user: &str, sample: &[u8]) -> Vec<String> {
    let all = db
        .transact(|tx| tx.get_range(&RangeOption::prefix(keys.root())))
        .unwrap();
    all.iter()
        .filter(|(k, v)| {
            contains(k, user.as_bytes()) || contains(v, user.as_bytes()) || contains(v, sample)
        })
        .map(|(k, v)| format!("{} = {} bytes", String::from_utf8_lossy(k), v.len()))
        .collect()
}

/// Files under `dir` whose bytes contain `needle`.
///
/// Each file is read by another process (`cat`): closing a descriptor of a file drops
/// every POSIX lock this process holds on it, SQLite's among them. This process has the
/// store open, and without its lock on the shared-memory file the next process to open
/// the store (`swimlane admin forget` below) takes it for the only one and truncates
/// that file, which this process maps: a SIGBUS here (seen twice in CI).
fn files_with(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_with(&p, needle));
        } else if let Some(bytes) = Command::new("cat")
            .arg(&p)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| o.stdout)
        {
            if contains(&bytes, needle) {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn a_user_forgotten_mid_pipeline_leaves_no_trace_and_nobody_else_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let mut config = LocalFleet::loopback(Config::default());
    config.store = store_dir.to_string_lossy().into_owned();
    config.deployment = "t".into();
    config.partitions = 2;
    let admin = new_token();
    config.admin_token_sha256 = hash_token(&admin);
    config.validate().unwrap();
    let db = swimlane_runtime::open_store(&config).unwrap();
    init::install(&db, "t", 7, None).unwrap();
    let keys = Keys::new("t");
    let repo = Repo::new(keys.clone());
    let users = [GHOST, "bob", "carol", GHOST2];
    let tokens: Vec<String> = users.iter().map(|_| new_token()).collect();
    for (u, t) in users.iter().zip(&tokens) {
        db.transact(|tx| repo.put_token(tx, &UserId::new(*u).unwrap(), t, 0))
            .unwrap();
    }
    LocalFleet::run_with(&config, &db, 1, |fleet| {
        check(
            fleet, &config, &db, &repo, &users, &tokens, &admin, &store_dir,
        )
    })
    .unwrap();
    // With every process gone, the files hold no trace either.
    for needle in [GHOST, GHOST2] {
        let left = files_with(&store_dir, needle.as_bytes());
        assert!(
            left.is_empty(),
            "{needle} in {left:?} after the fleet stopped"
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    fleet: &LocalFleet,
    config: &Config,
    db: &Db,
    repo: &Repo,
    users: &[&str],
    tokens: &[String],
    admin: &str,
    store_dir: &Path,
) {
    let keys = &repo.keys;
    let deadline = Instant::now() + Duration::from_secs(600);
    let (ingest, publisher) = (fleet.ingest_url.clone(), fleet.publisher_url.clone());
    let device = |i: usize| Device::new(&ingest, &publisher, users[i], &tokens[i]);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let swimmers: Vec<Swimmer> = (0..users.len())
        .map(|i| Swimmer::new(50 + i as u64))
        .collect();
    let mut windows = |i: usize| swimmers[i].windows(150, &mut rng);
    let send = |i: usize, id: &str, w: &[Sample]| {
        let body = upload::upload_body_as(id, w, upload::Frames::F32le);
        device(i)
            .upload_until_accepted(&body, deadline, None)
            .unwrap();
    };
    let mut accepted: Vec<(usize, String)> = Vec::new();
    let mut ghost_windows = Vec::new();
    // Everyone uploads and settles twice; the ghosts get versions.
    for night in 0..2 {
        for i in 0..users.len() {
            let w = windows(i);
            if i == 0 || i == 3 {
                ghost_windows.extend(w.iter().cloned());
            }
            let id = format!("night-{night}");
            send(i, &id, &w);
            device(i).wait_settled(&id, deadline).unwrap();
            accepted.push((i, id));
        }
    }
    let ghost_sample = marker(&ghost_windows[0]);
    let ghost2_sample = marker(&ghost_windows[150]);
    // The store holds the ghost's samples (so the scan below can find them), and no
    // event carries sample data: the log holds ids only.
    assert!(!traces(db, keys, GHOST, &ghost_sample).is_empty());
    let log = db
        .transact(|tx| tx.get_range(&RangeOption::prefix(&keys.log_all())))
        .unwrap();
    assert!(!log.is_empty());
    for w in &ghost_windows {
        let m = marker(w);
        assert!(
            !log.iter().any(|(_, v)| contains(v, &m)),
            "an event carries a window"
        );
    }
    let versions_of = |u: &str| {
        db.transact(|tx| Ok((repo.model_versions(tx, u)?, repo.user_state(tx, u)?)))
            .unwrap()
    };
    let carol_before = versions_of("carol");
    assert!(
        !versions_of(GHOST).0.is_empty(),
        "the ghost has a published version"
    );

    // Mid-pipeline: a new upload of the ghost's, staged and being trained, while bob
    // keeps uploading from another thread.
    send(0, "night-2", &windows(0));
    let bob_windows: Vec<Vec<Sample>> = (0..3).map(|_| windows(1)).collect();
    std::thread::scope(|s| {
        let bob = s.spawn(|| {
            for (k, w) in bob_windows.iter().enumerate() {
                let id = format!("day-{k}");
                send(1, &id, w);
                device(1).wait_settled(&id, deadline).unwrap();
            }
        });
        // Nobody else may: another user's token is 403, none is 401.
        let url = format!("{ingest}/v1/users/{GHOST}");
        match ureq::delete(&url)
            .set("Authorization", &format!("Bearer {}", tokens[1]))
            .call()
        {
            Err(ureq::Error::Status(403, _)) => {}
            other => panic!("bob erasing the ghost: {other:?}"),
        }
        match ureq::delete(&url).call() {
            Err(ureq::Error::Status(401, _)) => {}
            other => panic!("no token: {other:?}"),
        }
        // The ghost asks to be forgotten with their own token.
        let r = ureq::delete(&url)
            .set("Authorization", &format!("Bearer {}", tokens[0]))
            .call()
            .unwrap();
        let receipt: serde_json::Value = r.into_json().unwrap();
        println!("receipt: {receipt:#}");
        assert_eq!(receipt["state"], "forgotten");
        assert_eq!(receipt["requested_by"], "user");
        assert!(receipt.get("user").is_none(), "the receipt names no one");
        assert_eq!(receipt["files_purged"], true);
        let erased = &receipt["erased"];
        assert_eq!(erased["batches"], 3, "{erased}");
        assert_eq!(erased["tokens"], 1);
        for what in [
            "samples",
            "runs",
            "versions",
            "blobs",
            "events",
            "other_keys",
        ] {
            assert!(erased[what].as_u64().unwrap() > 0, "{what}: {erased}");
        }
        // Idempotent: the admin asking again gets the same receipt; the erased token is
        // refused; uploads are refused with 410.
        let again: serde_json::Value = ureq::delete(&url)
            .set("Authorization", &format!("Bearer {admin}"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(again, receipt);
        match ureq::delete(&url)
            .set("Authorization", &format!("Bearer {}", tokens[0]))
            .call()
        {
            Err(ureq::Error::Status(410, _)) => {}
            other => panic!("the erased user's token: {other:?}"),
        }
        let body = upload::upload_body_as("night-3", &windows(0)[..2], upload::Frames::F32le);
        match device(0).upload(&body) {
            Err(e) => assert!(e.to_string().contains("410"), "{e}"),
            Ok(u) => panic!("an upload for an erased user: {u:?}"),
        }
        bob.join().unwrap();
    });
    accepted.extend((0..3).map(|k| (1, format!("day-{k}"))));

    // No trace in the store, nor in its files while the fleet still runs.
    let left = traces(db, keys, GHOST, &ghost_sample);
    assert!(left.is_empty(), "traces of {GHOST}: {left:?}");
    for needle in [GHOST.as_bytes(), &ghost_sample[..]] {
        let files = files_with(store_dir, needle);
        assert!(
            files.is_empty(),
            "{} in {files:?}",
            String::from_utf8_lossy(needle)
        );
    }
    // The others: carol untouched, bob's and carol's uploads exactly once.
    assert_eq!(versions_of("carol"), carol_before);
    let others: Vec<String> = ["bob", "carol"].map(String::from).to_vec();
    let other_tokens = vec![tokens[1].clone(), tokens[2].clone()];
    let audit_users = AuditUser::each(&others, &other_tokens, |i| {
        accepted
            .iter()
            .filter(|(j, _)| *j == i + 1)
            .map(|(_, b)| b.clone())
            .collect()
    });
    let events = Events::from_log(db, repo, config.partitions).unwrap();
    let r = audit(
        db,
        repo,
        &audit_users,
        Some((&fleet.ingest_url, &fleet.publisher_url)),
        Some(&events),
        &Expect::default(),
    )
    .unwrap();
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    assert_eq!((r.lost, r.duplicated), (0, 0));

    // The second ghost: `swimlane admin forget` in its own process, SIGKILLed after
    // three committed steps, then run again.
    let cli = |pause: Option<u64>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_swimlane"));
        c.args(["admin", "forget", "--user", GHOST2, "--chunk", "1"])
            .args(["--store", &config.store])
            .env_clear()
            .env("SWIMLANE_DEPLOYMENT", "t")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(n) = pause {
            c.args(["--pause-after", &n.to_string()]);
        }
        c.spawn().unwrap()
    };
    let mut child = cli(Some(3));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("paused after 3 steps"), "{line}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let half = db
        .transact(|tx| swimlane_state::forget::record(repo, tx, GHOST2))
        .unwrap()
        .unwrap();
    assert_eq!(half.state, "erasing");
    assert!(half.erased.runs + half.erased.versions + half.erased.batches > 0);
    assert!(
        !traces(db, keys, GHOST2, &ghost2_sample).is_empty(),
        "half done"
    );
    // Meanwhile its uploads are refused.
    let body = upload::upload_body_as("night-3", &windows(3)[..2], upload::Frames::F32le);
    assert!(device(3)
        .upload(&body)
        .unwrap_err()
        .to_string()
        .contains("410"));
    let out = cli(None).wait_with_output().unwrap();
    assert!(out.status.success());
    let receipt: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(receipt["state"], "forgotten", "{receipt}");
    assert_eq!(receipt["erased"]["batches"], 2, "{receipt}");
    let left = traces(db, keys, GHOST2, &ghost2_sample);
    assert!(left.is_empty(), "traces of {GHOST2}: {left:?}");
    assert_eq!(versions_of("carol"), carol_before);
}
