//! The pipeline over a real Kafka-protocol broker (feature `kafka`), named by
//! `SWIMLANE_TEST_KAFKA=host:port`; skipped when it is unset (`.ci/run` starts tansu
//! and sets it). The workers run as separate `swimlane worker` processes on one
//! embedded store, with `--bus kafka://…` and a topic prefix of their own (so tests
//! share the broker); every check reads the store, the Kafka topics and the HTTP APIs.
//!
//! - [`whole_pipeline_over_kafka_with_two_trainers_sharing_partitions`]: two trainer
//!   processes in one consumer group split the partitions and both train; a record no
//!   stage can decode lands on the dead-letter topic with its reason, and in the
//!   metric; every upload is published (or rejected, or deferred) exactly once.
//! - [`a_trainer_killed_mid_training_hands_its_partitions_to_the_survivor`]: a trainer
//!   is killed with SIGKILL while it trains (its run not yet committed); its
//!   partitions move to the other trainer, which trains what was left; every batch is
//!   still published exactly once. The kill delays are drawn from a printed seed
//!   (`KAFKA_CRASH_SEED=<n>` draws the same again).
//!
//! That a restarted consumer starts at the store's position even when its Kafka
//! committed offset is behind is shown at the bus level, against the same broker:
//! `bus/tests/kafka.rs`, `a_restarted_consumer_reads_from_the_store_position_not_kafkas_offset`.
#![cfg(feature = "kafka")]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use common::checks::{
    all_settled, check_exactly_once, current_model, upload_until_accepted, Events, Expect,
};
use common::nights::{MAX_CORRECTIONS, OBSERVED, OBSERVED_LATER, PARTITIONS, USERS};
use common::{agent, keys, repo, request, strip_ansi, upload_body, Fleet, Kind, Member};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use swimlane_bus::kafka::{kafka_name, OUTBOX_ENTRY_HEADER};
use swimlane_bus::{partition_for, positions};
use swimlane_core::{topics, Event};
use swimlane_model::synth::{corrections, corrections_from, poison, Swimmer};
use swimlane_model::MicroModel;
use swimlane_store::Db;

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEADLINE: Duration = Duration::from_secs(420);
const TRAINER_0: Member = (Kind::Trainer, 0);
const TRAINER_1: Member = (Kind::Trainer, 1);
const VALIDATOR: Member = (Kind::Validator, 0);

fn broker() -> Option<String> {
    match std::env::var("SWIMLANE_TEST_KAFKA") {
        Ok(b) if !b.is_empty() && b != "mock" => Some(b),
        _ => {
            println!("skipped: SWIMLANE_TEST_KAFKA (a Kafka broker's host:port) not set");
            None
        }
    }
}

/// Users whose partitions fall half in 0..4 and half in 4..8, so that with two
/// trainers splitting the partitions (range assignment) both get work; each with a
/// swimmer the base model gets wrong often enough that a night's corrections can
/// publish a model.
fn pick_users(base: &MicroModel) -> (Vec<String>, Vec<Swimmer>) {
    let mut names = Vec::new();
    let (mut low, mut high) = (0, 0);
    let mut n = 0;
    while names.len() < USERS {
        let name = format!("kswimmer-{n:02}");
        n += 1;
        if partition_for(&name, PARTITIONS) < PARTITIONS / 2 {
            if low < USERS / 2 {
                low += 1;
                names.push(name);
            }
        } else if high < USERS / 2 {
            high += 1;
            names.push(name);
        }
    }
    let mut pick = ChaCha8Rng::seed_from_u64(1);
    let mut swimmers = Vec::new();
    let mut s = 2000;
    while swimmers.len() < USERS {
        let sw = Swimmer::new(s);
        if corrections(base, &sw, OBSERVED, MAX_CORRECTIONS, &mut pick)
            .unwrap()
            .len()
            >= 90
        {
            swimmers.push(sw);
        }
        s += 1;
    }
    (names, swimmers)
}

/// One night's uploads: each device's corrections of the model it runs now; from the
/// second night on a third of them poisoned (labels shuffled).
#[allow(clippy::too_many_arguments)]
fn night_batches(
    night: usize,
    http: &ureq::Agent,
    fleet: &Fleet,
    users: &[String],
    tokens: &[String],
    swimmers: &[Swimmer],
    rngs: &mut [ChaCha8Rng],
    base: &MicroModel,
    deadline: Instant,
) -> Vec<(usize, String, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..users.len() {
        let model = current_model(
            http,
            &fleet.publisher_url(),
            &users[i],
            &tokens[i],
            base,
            deadline,
        );
        let n = if night == 0 { OBSERVED } else { OBSERVED_LATER };
        let observed = swimmers[i].windows(n, &mut rngs[i]);
        let c = if is_poisoned(i, night) {
            poison(&observed[..MAX_CORRECTIONS], &mut rngs[i])
        } else {
            corrections_from(&model, &observed, MAX_CORRECTIONS).unwrap()
        };
        if c.is_empty() {
            continue;
        }
        let id = format!("night-{night}");
        out.push((i, id.clone(), upload_body(&id, &c)));
    }
    out
}

/// Upload every batch (all devices at once) until each is accepted.
fn upload_all(
    http: &ureq::Agent,
    fleet: &Fleet,
    users: &[String],
    tokens: &[String],
    batches: &[(usize, String, Vec<u8>)],
    deadline: Instant,
) -> Vec<(usize, String)> {
    let in_flight = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for (i, _, body) in batches {
            let (user, token, in_flight) = (&users[*i], &tokens[*i], &in_flight);
            let ingest = fleet.ingest_url();
            scope.spawn(move || {
                upload_until_accepted(http, &ingest, user, token, body, in_flight, deadline);
            });
        }
    });
    batches.iter().map(|(i, id, _)| (*i, id.clone())).collect()
}

/// `member`'s pid, from a member id `<group>-<pid>-<nanos>-<n>`.
fn member_pid(member: &str) -> Option<u32> {
    member.split('-').nth(1)?.parse().ok()
}

/// The pid of each trainer partition's lease holder (`None`: never taken).
fn trainer_owners(db: &Db) -> Vec<Option<u32>> {
    let keys = keys();
    db.transact(|tx| {
        let mut out = Vec::new();
        for p in 0..PARTITIONS {
            let o = positions::owner(
                tx,
                &keys,
                swimlane_core::groups::TRAINERS,
                topics::BATCHES,
                p,
            )?;
            out.push(o.and_then(|o| member_pid(&o.member)));
        }
        Ok(out)
    })
    .unwrap()
}

/// Wait until `cond` holds on the trainers' partition owners.
fn wait_owners(db: &Db, what: &str, within: Duration, cond: impl Fn(&[Option<u32>]) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let o = trainer_owners(db);
        if cond(&o) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: owners {o:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sum of every sample of `metric` on a worker's `/metrics`.
fn metric(http: &ureq::Agent, fleet: &Fleet, m: Member, metric: &str) -> f64 {
    let r = request(
        http,
        "GET",
        &format!("http://{}/metrics", fleet.ops(m)),
        None,
        &[],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    String::from_utf8(r.body)
        .unwrap()
        .lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A record read back from Kafka.
struct KafkaRecord {
    partition: u32,
    offset: u64,
    entry: Option<String>,
    payload: Vec<u8>,
}

/// Every record of the Kafka topic `topic`, from the start of each partition to its
/// high watermark.
fn read_topic(bootstrap: &str, topic: &str) -> Vec<KafkaRecord> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{}", common::unique_prefix()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut high = BTreeMap::new();
    for p in 0..PARTITIONS {
        let (_, h) = c
            .fetch_watermarks(topic, p as i32, Duration::from_secs(10))
            .unwrap();
        if h > 0 {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
                .unwrap();
            high.insert(p, h as u64);
        }
    }
    let mut out = Vec::new();
    if high.is_empty() {
        return out;
    }
    c.assign(&tpl).unwrap();
    let mut next: BTreeMap<u32, u64> = high.keys().map(|p| (*p, 0)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while next.iter().any(|(p, n)| *n < high[p]) {
        assert!(
            Instant::now() < deadline,
            "reading {topic}: {next:?} of {high:?}"
        );
        let Some(m) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.unwrap();
        let p = m.partition() as u32;
        let entry = m.headers().and_then(|h| {
            h.iter()
                .find(|x| x.key == OUTBOX_ENTRY_HEADER)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        next.insert(p, m.offset() as u64 + 1);
        out.push(KafkaRecord {
            partition: p,
            offset: m.offset() as u64,
            entry,
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    out
}

/// Whether device `i` uploads a poisoned batch on `night` (a third of them from the
/// second night on).
fn is_poisoned(i: usize, night: usize) -> bool {
    night > 0 && (i + night) % 3 == 0
}

/// What the exactly-once check expects of these uploads: no poisoned one published,
/// at least a version for every other user, `dead_letters` fed in.
fn expect(users: &[String], accepted: &[(usize, String)], dead_letters: usize) -> Expect {
    let poisoned = accepted
        .iter()
        .filter(|(i, id)| {
            id.strip_prefix("night-")
                .and_then(|n| n.parse().ok())
                .is_some_and(|night| is_poisoned(*i, night))
        })
        .map(|(i, id)| (users[*i].clone(), id.clone()))
        .collect();
    Expect {
        min_versions: (USERS / 2) as u64,
        poisoned,
        max_dead_letters: dead_letters,
        ..Expect::default()
    }
}

/// What the pipeline's Kafka topics hold.
struct KafkaTopics {
    /// The stages' events, one per outbox entry (a relay may produce an entry twice;
    /// both copies carry the same entry header and the same bytes).
    events: Events,
    /// Dead-letter bodies.
    dead: Vec<serde_json::Value>,
    /// Records on the batches topic that no relay produced (no entry header).
    foreign_batches: Vec<Vec<u8>>,
}

fn kafka_topics(bootstrap: &str, fleet: &Fleet, db: &Db) -> KafkaTopics {
    // Every committed event relayed first (a killed relay's lease must run out).
    swimlane_cli::audit::wait_outbox_drained(db, &common::repo(), Duration::from_secs(120))
        .unwrap();
    let prefix = fleet.setting("SWIMLANE_TOPIC_PREFIX").unwrap().to_string();
    let mut foreign: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut read = |topic: &str| -> Vec<(u32, u64, Vec<u8>)> {
        let mut seen: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut out = Vec::new();
        for r in read_topic(bootstrap, &kafka_name(&prefix, topic)) {
            let Some(entry) = r.entry else {
                foreign
                    .entry(topic.to_string())
                    .or_default()
                    .push(r.payload);
                continue;
            };
            if let Some(first) = seen.get(&entry) {
                assert_eq!(
                    first, &r.payload,
                    "{topic}: entry {entry} relayed with other bytes"
                );
                continue;
            }
            seen.insert(entry, r.payload.clone());
            out.push((r.partition, r.offset, r.payload));
        }
        out
    };
    let mut decode = |topic: &str| -> Vec<(u32, u64, Event)> {
        read(topic)
            .into_iter()
            .map(|(p, o, b)| {
                let ev = Event::decode(&b).unwrap_or_else(|e| panic!("{topic}/{p}@{o}: {e}"));
                (p, o, ev)
            })
            .collect()
    };
    let (batches, candidates) = (decode(topics::BATCHES), decode(topics::CANDIDATES));
    let (verdicts, published) = (decode(topics::VERDICTS), decode(topics::PUBLISHED));
    let dead: Vec<serde_json::Value> = read(topics::DEAD_LETTER)
        .into_iter()
        .map(|(_, _, b)| serde_json::from_slice(&b).expect("dead letters are JSON"))
        .collect();
    let events = Events {
        batches,
        candidates,
        verdicts,
        published,
        dead_letters: dead.clone(),
    };
    let foreign_batches = foreign.remove(topics::BATCHES).unwrap_or_default();
    assert!(
        foreign.is_empty(),
        "records without an entry header: {foreign:?}"
    );
    KafkaTopics {
        events,
        dead,
        foreign_batches,
    }
}

/// Produce raw bytes straight into a Kafka topic (as a broken or hostile producer
/// would).
fn produce_raw(bootstrap: &str, topic: &str, partition: i32, key: &str, payload: &[u8]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    p.send(
        BaseRecord::to(topic)
            .key(key)
            .payload(payload)
            .partition(partition),
    )
    .map_err(|(e, _)| e)
    .unwrap();
    p.flush(Duration::from_secs(30)).unwrap();
}

fn wait_settled(
    fleet: &Fleet,
    db: &Db,
    users: &[String],
    accepted: &[(usize, String)],
    deadline: Instant,
) {
    while !all_settled(db, users, accepted) {
        fleet.assert_alive();
        assert!(Instant::now() < deadline, "uploads did not settle");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Kafka fleet with the five workers (two trainers) running, once both trainers own
/// a share of the partitions (fenced in the store); its store, base model, users,
/// swimmers and tokens.
struct Started {
    fleet: Fleet,
    db: Db,
    base: MicroModel,
    users: Vec<String>,
    swimmers: Vec<Swimmer>,
    tokens: Vec<String>,
}

/// Both trainers (pids) own partitions, and nobody else does.
fn both_own(o: &[Option<u32>], pids: [u32; 2]) -> bool {
    o.iter().all(|p| p.is_some_and(|p| pids.contains(&p)))
        && pids.iter().all(|pid| o.contains(&Some(*pid)))
}

/// Wait (60 s at most) until the two trainers own every partition between them.
fn wait_both_trainers_own(fleet: &Fleet, db: &Db, what: &str) {
    let pids = trainer_pids(fleet);
    wait_owners(db, what, Duration::from_secs(60), |o| both_own(o, pids));
}

fn trainer_pids(fleet: &Fleet) -> [u32; 2] {
    [fleet.pid(TRAINER_0).unwrap(), fleet.pid(TRAINER_1).unwrap()]
}

fn start(bootstrap: &str, env: &[(&str, &str)]) -> Started {
    let fleet = Fleet::kafka(bootstrap, env);
    let db = fleet.db();
    let base = common::base_model(&db);
    let (users, swimmers) = pick_users(&base);
    let tokens: Vec<String> = users.iter().map(|u| fleet.token(u)).collect();
    let members = [
        (Kind::Ingest, 0),
        TRAINER_0,
        TRAINER_1,
        (Kind::Validator, 0),
        (Kind::Publisher, 0),
    ];
    for m in members {
        fleet.spawn_member(m);
    }
    for m in members {
        fleet.wait_member_ready(m, Duration::from_secs(60));
    }
    // The group coordinator splits the partitions between the two trainers, and each
    // fences its share in the store.
    wait_both_trainers_own(&fleet, &db, "both trainers own partitions");
    Started {
        fleet,
        db,
        base,
        users,
        swimmers,
        tokens,
    }
}

#[test]
fn whole_pipeline_over_kafka_with_two_trainers_sharing_partitions() {
    let Some(bootstrap) = broker() else { return };
    let t0 = Instant::now();
    let deadline = t0 + DEADLINE;
    let Started {
        fleet,
        db,
        base,
        users,
        swimmers,
        tokens,
    } = start(&bootstrap, &[]);
    let pids = trainer_pids(&fleet);
    eprintln!(
        "[{:5.1}s] trainer partitions: {:?} (pids {pids:?})",
        t0.elapsed().as_secs_f64(),
        trainer_owners(&db)
    );

    // A record no stage can decode, straight into the batches topic.
    let prefix = fleet.setting("SWIMLANE_TOPIC_PREFIX").unwrap().to_string();
    produce_raw(
        &bootstrap,
        &kafka_name(&prefix, topics::BATCHES),
        0,
        "nobody",
        b"not an event",
    );

    let http = agent();
    let mut rngs: Vec<ChaCha8Rng> = (0..USERS)
        .map(|i| ChaCha8Rng::seed_from_u64(100 + i as u64))
        .collect();
    let mut accepted = Vec::new();
    for night in 0..2 {
        let batches = night_batches(
            night, &http, &fleet, &users, &tokens, &swimmers, &mut rngs, &base, deadline,
        );
        accepted.extend(upload_all(
            &http, &fleet, &users, &tokens, &batches, deadline,
        ));
        wait_settled(&fleet, &db, &users, &accepted, deadline);
        eprintln!(
            "[{:5.1}s] night {night} settled",
            t0.elapsed().as_secs_f64()
        );
    }

    // Both trainers trained.
    let runs: Vec<f64> = [TRAINER_0, TRAINER_1]
        .iter()
        .map(|m| metric(&http, &fleet, *m, "swimlane_trainer_runs_total"))
        .collect();
    eprintln!("runs per trainer: {runs:?}");
    assert!(runs.iter().all(|r| *r >= 1.0), "runs per trainer: {runs:?}");
    // Training and scoring CPU are exported (the recording rule
    // `swimlane:cpu_outside_model:ratio_rate5m` divides them by every worker's process
    // CPU): each a part of its own process's CPU.
    for (m, name) in [
        (TRAINER_0, "swimlane_trainer_train_cpu_seconds_total"),
        (TRAINER_1, "swimlane_trainer_train_cpu_seconds_total"),
        (VALIDATOR, "swimlane_validator_score_cpu_seconds_total"),
    ] {
        let (part, process) = (
            metric(&http, &fleet, m, name),
            metric(&http, &fleet, m, "process_cpu_seconds_total"),
        );
        eprintln!("{m:?}: {name} {part:.3} of {process:.3} CPU seconds");
        assert!(
            part > 0.0 && part < process,
            "{m:?}: {name} {part} of {process}"
        );
    }

    // The undecodable record is dead-lettered, once, with its reason, and counted.
    let (events, dead) = loop {
        let k = kafka_topics(&bootstrap, &fleet, &db);
        assert_eq!(k.foreign_batches, vec![b"not an event".to_vec()]);
        if !k.dead.is_empty() {
            break (k.events, k.dead);
        }
        assert!(Instant::now() < deadline, "no dead letter");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["source_topic"], topics::BATCHES);
    assert_eq!(
        dead[0]["payload_hex"],
        hex::encode(b"not an event"),
        "{dead:?}"
    );
    assert!(
        dead[0]["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{dead:?}"
    );
    let counted: f64 = [TRAINER_0, TRAINER_1]
        .iter()
        .map(|m| metric(&http, &fleet, *m, "swimlane_trainer_dead_letters_total"))
        .sum();
    assert_eq!(counted, 1.0, "swimlane_trainer_dead_letters_total");

    fleet.assert_alive();
    check_exactly_once(
        &fleet,
        &db,
        &users,
        &tokens,
        &accepted,
        &events,
        &expect(&users, &accepted, 1),
    );
    eprintln!("done in {:.1}s", t0.elapsed().as_secs_f64());
}

/// The runs a trainer's logs say it started, in order: (user, run id).
fn runs_started(fleet: &Fleet, m: Member) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for n in 1..=fleet.started_member(m) {
        for l in fleet.log(m, n).lines().map(strip_ansi) {
            if !l.contains(" training ") && !l.ends_with(" training") {
                continue;
            }
            let field = |name: &str| {
                l.split(&format!("{name}=")).nth(1).map(|r| {
                    r.split(|c: char| c == ' ' || c == '}' || c == ':')
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
            };
            if let (Some(u), Some(r)) = (field("user_id"), field("run_id")) {
                out.push((u, r));
            }
        }
    }
    out
}

#[test]
fn a_trainer_killed_mid_training_hands_its_partitions_to_the_survivor() {
    let Some(bootstrap) = broker() else { return };
    let t0 = Instant::now();
    let deadline = t0 + DEADLINE;
    let seed = common::seed_from("KAFKA_CRASH_SEED");
    eprintln!("kill delay seed {seed} (KAFKA_CRASH_SEED={seed} draws it again)");
    let mut sched = ChaCha8Rng::seed_from_u64(seed);
    // A dead trainer's partitions move after the group's session timeout.
    let Started {
        fleet,
        db,
        base,
        users,
        swimmers,
        tokens,
    } = start(
        &bootstrap,
        &[
            ("SWIMLANE_TRAINER_CONSUMER_LEASE_TTL_MS", "3000"),
            // One thread per core: a run takes a few hundred ms instead of tens, so
            // there is a run in progress to kill.
            ("SWIMLANE_TRAINER_THREADS", "0"),
        ],
    );

    let http = agent();
    let repo = repo();
    let mut rngs: Vec<ChaCha8Rng> = (0..USERS)
        .map(|i| ChaCha8Rng::seed_from_u64(100 + i as u64))
        .collect();
    let mut accepted = Vec::new();
    let mut kills: Vec<String> = Vec::new();
    const MIN_KILLS: usize = 2;
    const MAX_NIGHTS: usize = 7;
    for night in 0..MAX_NIGHTS {
        if night >= 2 && kills.len() >= MIN_KILLS {
            break;
        }
        let seen: BTreeSet<(String, String)> = [TRAINER_0, TRAINER_1]
            .iter()
            .flat_map(|m| runs_started(&fleet, *m))
            .collect();
        let batches = night_batches(
            night, &http, &fleet, &users, &tokens, &swimmers, &mut rngs, &base, deadline,
        );
        let tonight = upload_all(&http, &fleet, &users, &tokens, &batches, deadline);
        accepted.extend(tonight.iter().cloned());
        eprintln!(
            "[{:5.1}s] night {night}: {} uploads accepted",
            t0.elapsed().as_secs_f64(),
            tonight.len()
        );
        // Kill the first trainer seen starting a run whose result is not committed
        // yet, after a seeded delay (once a night).
        let mut killed = false;
        while !killed && !all_settled(&db, &users, &accepted) {
            fleet.assert_alive();
            assert!(Instant::now() < deadline, "night {night} did not settle");
            let started: Option<(Member, String, String)> = [TRAINER_0, TRAINER_1]
                .iter()
                .flat_map(|m| {
                    runs_started(&fleet, *m)
                        .into_iter()
                        .map(move |(u, r)| (*m, u, r))
                })
                .find(|(_, u, r)| !seen.contains(&(u.clone(), r.clone())));
            let Some((victim, user, run_id)) = started else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            let delay = sched.random_range(0..60u64);
            std::thread::sleep(Duration::from_millis(delay));
            let committed = |db: &Db| {
                db.transact(|tx| repo.run(tx, &user, &run_id))
                    .unwrap()
                    .is_some()
            };
            if committed(&db) {
                // Too late: it finished. Wait for the next night's runs.
                eprintln!(
                    "[{:5.1}s] run {run_id} of {user} committed before the kill ({delay} ms)",
                    t0.elapsed().as_secs_f64()
                );
                break;
            }
            let pid = fleet.kill_member(victim);
            killed = true;
            let survivor = if victim == TRAINER_0 {
                TRAINER_1
            } else {
                TRAINER_0
            };
            let survivor_pid = fleet.pid(survivor).unwrap();
            assert!(
                !committed(&db),
                "the run committed before the kill took effect"
            );
            let what = format!(
                "night {night}: killed trainer {} (pid {pid}) {delay} ms after it started run {run_id} of {user} (uncommitted)",
                victim.1
            );
            eprintln!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
            kills.push(what);
            // Its partitions move to the survivor, which trains the unfinished work.
            wait_owners(
                &db,
                "the survivor owns every partition",
                Duration::from_secs(60),
                |o| o.iter().all(|p| *p == Some(survivor_pid)),
            );
            eprintln!(
                "[{:5.1}s] every partition moved to trainer {} (pid {survivor_pid})",
                t0.elapsed().as_secs_f64(),
                survivor.1
            );
            let b = batches
                .iter()
                .find(|(i, _, _)| users[*i] == user)
                .map(|(i, id, _)| vec![(*i, id.clone())])
                .unwrap_or_default();
            wait_settled(&fleet, &db, &users, &b, deadline);
            // Restart the killed trainer; the group splits the partitions again.
            fleet.spawn_member(victim);
            fleet.wait_member_ready(victim, Duration::from_secs(60));
            wait_both_trainers_own(&fleet, &db, "both trainers own partitions again");
        }
        wait_settled(&fleet, &db, &users, &accepted, deadline);
        eprintln!(
            "[{:5.1}s] night {night} settled",
            t0.elapsed().as_secs_f64()
        );
    }
    eprintln!("kills (seed {seed}):");
    for k in &kills {
        eprintln!("  {k}");
    }
    assert!(
        kills.len() >= MIN_KILLS,
        "only {} trainer kills mid-training (seed {seed})",
        kills.len()
    );
    fleet.assert_alive();
    let k = kafka_topics(&bootstrap, &fleet, &db);
    assert!(k.dead.is_empty(), "dead letters: {:?}", k.dead);
    assert!(k.foreign_batches.is_empty());
    let events = k.events;
    check_exactly_once(
        &fleet,
        &db,
        &users,
        &tokens,
        &accepted,
        &events,
        &expect(&users, &accepted, 0),
    );
    eprintln!("done in {:.1}s", t0.elapsed().as_secs_f64());
}
