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

use common::checks::{
    all_settled, check_exactly_once, current_model, upload_until_accepted, Events, Expect,
};
use common::nights::{MAX_CORRECTIONS, OBSERVED, OBSERVED_LATER, PARTITIONS, USERS};
use common::{agent, backlog, upload_body, Fleet, Kind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swimlane_model::synth::{corrections, corrections_from, poison, Swimmer};

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Nights of uploads: at least `NIGHTS`, more (up to `MAX_NIGHTS`) until every worker
/// kind has been killed at least `MIN_KILLS` times.
const NIGHTS: usize = 3;
const MAX_NIGHTS: usize = 6;
const MIN_KILLS: usize = 2;
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
    eprintln!("killed: {k}");
    kills.push(k);
}

impl std::fmt::Display for Kill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (at, night, kind) = (self.at, self.night, self.kind.name());
        let (pid, delay, what) = (self.pid, self.delay_ms, &self.what);
        write!(
            f,
            "{at:6.1}s night {night} {kind:<9} pid {pid:<7} after {delay:>4} ms: {what}"
        )
    }
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

#[test]
fn killing_workers_mid_work_applies_every_stage_exactly_once() {
    let t0 = Instant::now();
    let deadline = t0 + DEADLINE;
    let seed = common::seed_from("CRASH_TEST_SEED");
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
    let mut poisoned = BTreeSet::new();
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
            let id = format!("night-{night}");
            let c = if night > 0 && (i + night) % 3 == 0 {
                poisoned.insert((users[i].clone(), id.clone()));
                poison(&observed[..MAX_CORRECTIONS], &mut nights_rng[i])
            } else {
                corrections_from(&model, &observed, MAX_CORRECTIONS).unwrap()
            };
            if c.is_empty() {
                continue;
            }
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
                    let (user, token, ingest) = (&users[*i], &tokens[*i], &ingest);
                    scope.spawn(move || {
                        let n = upload_until_accepted(
                            http, ingest, user, token, body, in_flight, deadline,
                        );
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
            // The longest delay drawn; it halves whenever the worker finished its work
            // before the delay ran out (work got faster than the range), so that a kill
            // still lands mid-work instead of the night settling first.
            let mut max_delay = match kind {
                Kind::Trainer => 600u64,
                Kind::Validator => 120,
                _ => 20,
            };
            let mut delay = sched.random_range(0..max_delay);
            loop {
                fleet.assert_alive();
                if all_settled(&db, &users, &uploads.accepted) {
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
                    // Done already: wait for its next work, with a shorter delay.
                    max_delay = (max_delay / 2).max(2);
                    delay = sched.random_range(0..max_delay);
                    continue;
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
        while !all_settled(&db, &users, &uploads.accepted) {
            fleet.assert_alive();
            assert!(Instant::now() < deadline, "night {night} did not settle");
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("[{:6.1}s] night {night}: settled", now(t0));
    }

    eprintln!("kill schedule (seed {seed}):");
    for k in &kills {
        eprintln!("  {k}");
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

    let events = Events::from_log(&db, &common::repo(), PARTITIONS).unwrap();
    let expect = Expect {
        min_versions: (USERS / 2) as u64,
        poisoned: poisoned.clone(),
        max_dead_letters: 0,
        ..Expect::default()
    };
    check_exactly_once(
        &fleet,
        &db,
        &users,
        &tokens,
        &uploads.accepted,
        &events,
        &expect,
    );
    eprintln!("done in {:.1}s", now(t0));
}
