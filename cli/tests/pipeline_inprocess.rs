//! The three consuming stages, in one process on the real embedded store: staged
//! batches become published versions; a poisoned batch is rejected.
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use swimlane_bus::embedded::EmbeddedBus;
use swimlane_bus::Emitter;
use swimlane_cli::fleet::Stages;
use swimlane_cli::init;
use swimlane_core::keys::Keys;
use swimlane_core::records::{
    encode_chunk, is_heldout, BatchRecord, BatchStatus, RunRecord, StagedSample, Verdict,
    SAMPLES_PER_CHUNK,
};
use swimlane_core::{BatchId, Event, UserId};
use swimlane_model::synth::{corrections, poison, Swimmer};
use swimlane_model::{MicroModel, Sample};
use swimlane_runtime::Config;
use swimlane_state::{Repo, BASE_MODEL_BLOB};
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::Db;

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stage a batch the way ingest does (record, chunks and event in one transaction).
fn stage(db: &Db, keys: &Keys, bus: &EmbeddedBus, user: &str, batch: &str, samples: &[Sample]) {
    let repo = Repo::new(keys.clone());
    let staged: Vec<StagedSample> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| StagedSample {
            id: format!("s{i}"),
            frames: s.frames.clone(),
            label: s.label,
            heldout: is_heldout(user, batch, &format!("s{i}")),
            feedback: None,
        })
        .collect();
    db.transact(|tx| {
        for (c, chunk) in staged.chunks(SAMPLES_PER_CHUNK).enumerate() {
            tx.set(
                &keys.sample_chunk(user, batch, c as u32),
                &encode_chunk(chunk),
            )?;
        }
        swimlane_state::lifecycle::stage_batch(
            &repo,
            tx,
            user,
            batch,
            &BatchRecord {
                v: 1,
                digest: "test".into(),
                samples: staged.len() as u32,
                heldout: staged.iter().filter(|s| s.heldout).count() as u32,
                chunks: staged.len().div_ceil(SAMPLES_PER_CHUNK) as u32,
                staged_at_ms: 0,
                status: BatchStatus::Staged,
                chunk_samples: 0,
            },
        )?;
        bus.emit(
            tx,
            &Event::BatchStaged {
                user: UserId::new(user).unwrap(),
                batch_id: BatchId::new(batch).unwrap(),
                samples: staged.len() as u32,
            },
        )
    })
    .unwrap();
}

fn wait_terminal(db: &Db, repo: &Repo, user: &str, batch: &str) -> BatchStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = db
            .transact(|tx| repo.batch(tx, user, batch))
            .unwrap()
            .unwrap()
            .status;
        if st.is_terminal() || matches!(st, BatchStatus::Deferred { .. }) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "batch {user}/{batch} stuck in {st:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh embedded store with a base model and guard set installed (deployment `t`,
/// 4 partitions), and what the tests reach it with.
struct Setup {
    _dir: tempfile::TempDir,
    db: Db,
    config: Config,
    keys: Keys,
    repo: Repo,
    bus: EmbeddedBus,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(EmbeddedBackend::open(dir.path().join("store")).unwrap());
    let mut config = Config::default();
    config.deployment = "t".into();
    config.partitions = 4;
    let keys = Keys::new("t");
    init::install(&db, "t", 7, None).unwrap();
    Setup {
        _dir: dir,
        db,
        config,
        repo: Repo::new(keys.clone()),
        bus: EmbeddedBus::new(keys.clone(), 4),
        keys,
    }
}

#[test]
fn staged_batches_are_published_and_a_poisoned_one_is_rejected() {
    let Setup {
        _dir,
        db,
        config,
        keys,
        repo,
        bus,
    } = setup();
    let base = MicroModel::from_bytes(
        &db.transact(|tx| repo.blob(tx, BASE_MODEL_BLOB))
            .unwrap()
            .unwrap(),
    )
    .unwrap();

    let registry = prometheus::Registry::new();
    let stages = Stages::start(&config, &db, &registry, 2, true).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let users = ["alice", "bob", "carol"];
    // Swimmers the base model gets wrong often enough that one night's corrections
    // carry enough held-out evidence to judge (the policy defers otherwise).
    let mut swimmers = Vec::new();
    let mut seed = 1000;
    while swimmers.len() < users.len() {
        let swimmer = Swimmer::new(seed);
        let c = corrections(&base, &swimmer, 400, 200, &mut rng).unwrap();
        if c.len() >= 80 {
            swimmers.push((swimmer, c));
        }
        seed += 1;
    }
    for (u, (_, c)) in users.iter().zip(&swimmers) {
        stage(&db, &keys, &bus, u, "night-1", c);
    }
    for u in users {
        let st = wait_terminal(&db, &repo, u, "night-1");
        assert!(
            matches!(st, BatchStatus::Published { version: 1, .. }),
            "{u}: {st:?}"
        );
    }
    // Night 2: alice uploads honest corrections, bob a poisoned batch.
    let alice_model = MicroModel::from_bytes(
        &db.transact(|tx| {
            let v = repo.model_version(tx, "alice", 1)?.unwrap();
            repo.blob(tx, &v.model_blob)
        })
        .unwrap()
        .unwrap(),
    )
    .unwrap();
    let c = corrections(&alice_model, &swimmers[0].0, 400, 200, &mut rng).unwrap();
    stage(&db, &keys, &bus, "alice", "night-2", &c);
    let bob_obs = swimmers[1].0.windows(200, &mut rng);
    stage(
        &db,
        &keys,
        &bus,
        "bob",
        "night-2",
        &poison(&bob_obs, &mut rng),
    );
    let a = wait_terminal(&db, &repo, "alice", "night-2");
    let b = wait_terminal(&db, &repo, "bob", "night-2");
    stages.stop().unwrap();
    assert!(
        matches!(a, BatchStatus::Published { version: 2, .. }),
        "alice: {a:?}"
    );
    assert!(matches!(b, BatchStatus::Rejected { .. }), "bob: {b:?}");
    let bob = db.transact(|tx| repo.user_state(tx, "bob")).unwrap();
    assert_eq!(bob.head, Some(1));
    assert_eq!(bob.inflight_run, None);
}

/// A run one stage can never handle, and how to tell that it was handled.
struct Unhandleable {
    /// The event that asks the stage for the run.
    event: fn(UserId, String) -> Event,
    /// The verdict already on the run record.
    verdict: Option<Verdict>,
    /// Whether the stage handled the run.
    done: fn(&RunRecord) -> bool,
    metric: &'static str,
    topic: &'static str,
}

/// A run whose candidate weights are missing can never be validated: after the stage
/// loop's bounded retry it goes to the dead letters with its reason, the validator's
/// dead-letter metric counts it, and the next record of the same partition is handled.
#[test]
fn a_candidate_whose_weights_are_missing_is_dead_lettered_and_the_partition_moves_on() {
    unhandleable_runs_are_dead_lettered_and_the_partition_moves_on(Unhandleable {
        event: |user, run_id| Event::CandidateTrained {
            user,
            run_id,
            batches: vec![],
        },
        verdict: None,
        done: |r| r.verdict.is_some(),
        metric: "swimlane_validator_dead_letters_total",
        topic: swimlane_core::topics::CANDIDATES,
    });
}

/// The same for the publisher: an accepted run whose weights are missing (or whose
/// ONNX export fails, the same path) goes to the dead letters, and the run ends so
/// that the user trains again.
#[test]
fn an_accepted_run_that_cannot_be_published_is_dead_lettered_and_the_run_ends() {
    unhandleable_runs_are_dead_lettered_and_the_partition_moves_on(Unhandleable {
        event: |user, run_id| Event::CandidateAccepted { user, run_id },
        verdict: Some(Verdict {
            accepted: true,
            ..Verdict::default()
        }),
        done: |r| r.published_version.is_some(),
        metric: "swimlane_publisher_dead_letters_total",
        topic: swimlane_core::topics::VERDICTS,
    });
}

fn unhandleable_runs_are_dead_lettered_and_the_partition_moves_on(case: Unhandleable) {
    let Setup {
        _dir,
        db,
        config,
        repo,
        bus,
        ..
    } = setup();
    // Two users on one partition of the stage's topic: dora's run first.
    let (dora, erin) = ("dora", "erin");
    let erin = (0..)
        .map(|i| format!("{erin}{i}"))
        .find(|u| swimlane_bus::partition_for(u, 4) == swimlane_bus::partition_for(dora, 4))
        .unwrap();
    for (user, blob) in [(dora, "no-such-blob"), (erin.as_str(), BASE_MODEL_BLOB)] {
        let run = swimlane_core::records::RunRecord {
            v: 1,
            run_id: format!("run-{user}"),
            parent_version: None,
            batches: vec![],
            train_samples: 0,
            model_blob: blob.into(),
            model_sha256: String::new(),
            model_bytes: 0,
            created_at_ms: 0,
            train_seconds: 0.0,
            train_cpu_seconds: 0.0,
            familiarity: None,
            verdict: case.verdict.clone(),
            published_version: None,
        };
        db.transact(|tx| {
            repo.put_run(tx, user, &run)?;
            let mut state = repo.user_state(tx, user)?;
            state.inflight_run = Some(run.run_id.clone());
            repo.put_user_state(tx, user, &state)?;
            bus.emit(
                tx,
                &(case.event)(UserId::new(user).unwrap(), run.run_id.clone()),
            )
        })
        .unwrap();
    }
    let registry = prometheus::Registry::new();
    let stages = Stages::start(&config, &db, &registry, 1, true).unwrap();
    // erin's run, behind dora's on the partition, is handled.
    let deadline = Instant::now() + Duration::from_secs(60);
    let erin_run = || {
        let run = db.transact(|tx| repo.run(tx, &erin, &format!("run-{erin}")));
        run.unwrap().unwrap()
    };
    while !(case.done)(&erin_run()) {
        assert!(
            Instant::now() < deadline,
            "the partition stalled behind dora's run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stages.stop().unwrap();
    let dead: f64 = registry
        .gather()
        .iter()
        .filter(|f| f.name() == case.metric)
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum();
    assert_eq!(dead, 1.0);
    let dora_run = db
        .transact(|tx| repo.run(tx, dora, "run-dora"))
        .unwrap()
        .unwrap();
    assert!(
        !(case.done)(&dora_run),
        "nothing done with weights nobody read"
    );
    let dora_state = db.transact(|tx| repo.user_state(tx, dora)).unwrap();
    assert_eq!(
        dora_state.inflight_run, None,
        "the run ended: dora trains again"
    );
    // The dead letter names the topic and the reason.
    let mut dl = swimlane_runtime::wiring::consumer(
        &config,
        &db,
        "dead-letter-reader",
        swimlane_core::topics::DEAD_LETTER,
        &config.validator.consumer,
        None,
    )
    .unwrap();
    let d = dl
        .poll(10, Duration::from_secs(5))
        .unwrap()
        .expect("a dead letter");
    let body: serde_json::Value = serde_json::from_slice(&d.records[0].payload).unwrap();
    assert_eq!(body["source_topic"], case.topic);
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains("gave up after 5 attempts") && reason.contains("weights"),
        "{reason}"
    );
}

/// With `embedded_log_keep = 0`, every entry the groups have passed is cleared while the
/// fleet runs: after three nights of uploads the log holds nothing already consumed,
/// though every event was written, and the stages count what they trimmed.
#[test]
fn the_embedded_log_is_trimmed_while_the_fleet_runs() {
    let Setup {
        _dir,
        db,
        mut config,
        keys,
        repo,
        bus,
    } = setup();
    config.embedded_log_keep = 0;
    let registry = prometheus::Registry::new();
    let stages = Stages::start(&config, &db, &registry, 1, true).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let users = ["ann", "ben", "cat", "dan"];
    for night in 0..3 {
        for (i, u) in users.iter().enumerate() {
            let windows = Swimmer::new(500 + i as u64).windows(60, &mut rng);
            stage(&db, &keys, &bus, u, &format!("n{night}"), &windows);
        }
        for u in users {
            wait_terminal(&db, &repo, u, &format!("n{night}"));
        }
    }
    // The stages trim at their heartbeats (a third of the lease time to live).
    let topics = [
        swimlane_core::topics::BATCHES,
        swimlane_core::topics::CANDIDATES,
        swimlane_core::topics::VERDICTS,
    ];
    let kept = || -> usize {
        topics
            .iter()
            .map(|t| bus.read_all(&db, t).unwrap().len())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while kept() > 0 {
        assert!(Instant::now() < deadline, "{} entries still kept", kept());
        std::thread::sleep(Duration::from_millis(50));
    }
    stages.stop().unwrap();
    let written: u64 = db
        .transact(|tx| {
            let mut n = 0;
            for t in topics {
                for p in 0..4 {
                    n += bus.high_watermark(tx, t, p)?;
                }
            }
            Ok(n)
        })
        .unwrap();
    assert!(
        written >= 12,
        "{written} events written (one BatchStaged a batch at least)"
    );
    let trimmed: f64 = registry
        .gather()
        .iter()
        .filter(|f| f.name().ends_with("_log_trimmed_total"))
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum();
    assert_eq!(
        trimmed as u64, written,
        "every entry written was trimmed and counted"
    );
}
