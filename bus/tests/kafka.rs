//! The Kafka bus against a real broker (feature `kafka`), named by
//! `SWIMLANE_TEST_KAFKA=host:port`; skipped when it is unset. `SWIMLANE_TEST_KAFKA=mock`
//! runs them against librdkafka's in-process mock cluster instead (a quick check, not
//! a substitute for a real broker). Every test uses its own topics and groups, so the
//! tests may share one broker.
#![cfg(feature = "kafka")]
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use swimlane_bus::kafka::{
    create_topics, read_outbox, relay_producer, KafkaConsumer, KafkaConsumerOptions, KafkaEmitter,
    Relay, RelayOptions,
};
use swimlane_bus::{partition_for, positions, Consumer, Delivery, Emitter};
use swimlane_core::keys::Keys;
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::Db;

/// The broker to test against, and the mock cluster to keep alive if it is one.
struct Broker {
    bootstrap: String,
    _mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

fn broker() -> Option<Broker> {
    match std::env::var("SWIMLANE_TEST_KAFKA") {
        Ok(b) if b == "mock" => {
            let mock = MockCluster::new(1).unwrap();
            Some(Broker {
                bootstrap: mock.bootstrap_servers(),
                _mock: Some(mock),
            })
        }
        Ok(b) if !b.is_empty() => Some(Broker {
            bootstrap: b,
            _mock: None,
        }),
        _ => {
            println!("skipped: SWIMLANE_TEST_KAFKA not set");
            None
        }
    }
}

impl Broker {
    /// Create `topic` with the admin API (the mock cluster has no CreateTopics: its own
    /// call instead). Twice, to show it is idempotent.
    fn make_topic(&self, topic: &str, partitions: u32) {
        match &self._mock {
            Some(m) => m.create_topic(topic, partitions as i32, 1).unwrap(),
            None => {
                create_topics(&self.bootstrap, &[topic], partitions, 1).unwrap();
                create_topics(&self.bootstrap, &[topic], partitions, 1).unwrap();
            }
        }
    }
}

fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n:x}", std::process::id())
}

fn store() -> (tempfile::TempDir, Db, Keys) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(EmbeddedBackend::open(dir.path().join("store")).unwrap());
    (dir, db, Keys::new("kafka-test"))
}

/// Emit `(key, payload)` pairs, one store transaction each.
fn emit_all(db: &Db, emitter: &KafkaEmitter, topic: &str, events: &[(String, String)]) {
    for (k, v) in events {
        db.transact(|tx| emitter.emit_raw(tx, topic, k, v.as_bytes()))
            .unwrap();
    }
}

/// Run relay rounds until the outbox is empty.
fn relay_all(db: &Db, keys: &Keys, bootstrap: &str) {
    let mut relay = Relay::new(
        db.clone(),
        keys.clone(),
        relay_producer(bootstrap).unwrap(),
        RelayOptions::default(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        relay.round().unwrap();
        let left = db.transact(|tx| read_outbox(tx, keys, 1)).unwrap();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "outbox not drained");
    }
}

fn consumer(db: &Db, keys: &Keys, bootstrap: &str, group: &str, topic: &str) -> KafkaConsumer {
    let mut o = KafkaConsumerOptions::new(bootstrap, group, topic);
    o.session_timeout = Duration::from_secs(6);
    KafkaConsumer::new(db.clone(), keys.clone(), o).unwrap()
}

fn commit(db: &Db, keys: &Keys, c: &mut KafkaConsumer, d: &Delivery) {
    db.transact(|tx| positions::commit(tx, keys, &d.fence, d.next_offset()))
        .unwrap();
    c.committed(&d.fence, d.next_offset());
}

/// Consume and commit until `want` records arrived or the deadline passes.
fn drain(
    db: &Db,
    keys: &Keys,
    c: &mut KafkaConsumer,
    want: usize,
    within: Duration,
) -> Vec<(u32, u64, String, String)> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(d) = c.poll(5, Duration::from_millis(200)).unwrap() {
            commit(db, keys, c, &d);
            for r in &d.records {
                out.push((
                    d.fence.partition,
                    r.offset,
                    r.key.clone(),
                    String::from_utf8(r.payload.clone()).unwrap(),
                ));
            }
        }
    }
    out
}

#[test]
fn emit_relay_consume_keeps_each_users_order_and_positions_in_the_store() {
    let Some(broker) = broker() else { return };
    let bootstrap = broker.bootstrap.clone();
    let (_dir, db, keys) = store();
    let topic = unique("swimlane-test-order");
    broker.make_topic(&topic, 3);
    let emitter = KafkaEmitter::new(keys.clone());
    let mut events = Vec::new();
    for i in 0..10 {
        for u in 0..5 {
            events.push((format!("user-{u}"), format!("{u}:{i}")));
        }
    }
    emit_all(&db, &emitter, &topic, &events);
    assert_eq!(
        db.transact(|tx| read_outbox(tx, &keys, 100)).unwrap().len(),
        50,
        "every emitted event waits in the outbox"
    );
    relay_all(&db, &keys, &bootstrap);

    let group = unique("g");
    let mut c = consumer(&db, &keys, &bootstrap, &group, &topic);
    let got = drain(&db, &keys, &mut c, 50, Duration::from_secs(60));
    assert_eq!(got.len(), 50, "all 50 records consumed: {got:?}");
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (p, _, k, v) in &got {
        assert_eq!(
            *p,
            partition_for(k, 3),
            "{k} on the partitioner's partition"
        );
        per_key.entry(k.clone()).or_default().push(v.clone());
    }
    for u in 0..5 {
        let want: Vec<String> = (0..10).map(|i| format!("{u}:{i}")).collect();
        assert_eq!(per_key[&format!("user-{u}")], want, "user-{u} in order");
    }
    // Positions are in the store, at each partition's end.
    let mut ends: BTreeMap<u32, u64> = BTreeMap::new();
    for (p, o, _, _) in &got {
        let e = ends.entry(*p).or_default();
        *e = (*e).max(o + 1);
    }
    for (p, end) in ends {
        let pos = db
            .transact(|tx| positions::position(tx, &keys, &group, &topic, p))
            .unwrap();
        assert_eq!(pos, end, "stored position of partition {p}");
    }
    assert_eq!(c.lag().unwrap(), 0);
    c.close().unwrap();
}

#[test]
fn a_restarted_consumer_reads_from_the_store_position_not_kafkas_offset() {
    let Some(broker) = broker() else { return };
    let bootstrap = broker.bootstrap.clone();
    let (_dir, db, keys) = store();
    let topic = unique("swimlane-test-restart");
    broker.make_topic(&topic, 1);
    let emitter = KafkaEmitter::new(keys.clone());
    let events: Vec<(String, String)> = (0..10).map(|i| ("u".into(), format!("{i}"))).collect();
    emit_all(&db, &emitter, &topic, &events);
    relay_all(&db, &keys, &bootstrap);

    let group = unique("g");
    let mut c = consumer(&db, &keys, &bootstrap, &group, &topic);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 6 && Instant::now() < deadline {
        if let Some(d) = c.poll(6 - seen.len(), Duration::from_millis(200)).unwrap() {
            commit(&db, &keys, &mut c, &d);
            seen.extend(d.records.iter().map(|r| r.offset));
        }
    }
    assert_eq!(seen, (0..6).collect::<Vec<u64>>());
    // Move the group's Kafka offset behind the store's position.
    c.commit_kafka_offset(0, 2).unwrap();
    c.close().unwrap();
    drop(c);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&topic, 0);
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let committed = reader
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        committed.find_partition(&topic, 0).unwrap().offset(),
        Offset::Offset(2),
        "the Kafka offset is behind the store's"
    );
    drop(reader);
    assert_eq!(
        db.transact(|tx| positions::position(tx, &keys, &group, &topic, 0))
            .unwrap(),
        6
    );

    let mut c = consumer(&db, &keys, &bootstrap, &group, &topic);
    let rest = drain(&db, &keys, &mut c, 4, Duration::from_secs(60));
    let offsets: Vec<u64> = rest.iter().map(|r| r.1).collect();
    assert_eq!(offsets, vec![6, 7, 8, 9], "resumed at the store's position");
    let payloads: Vec<&str> = rest.iter().map(|r| r.3.as_str()).collect();
    assert_eq!(payloads, vec!["6", "7", "8", "9"]);
    c.close().unwrap();
}

#[test]
fn two_members_share_partitions_and_a_zombie_commit_is_fenced() {
    let Some(broker) = broker() else { return };
    let bootstrap = broker.bootstrap.clone();
    let (_dir, db, keys) = store();
    let topic = unique("swimlane-test-group");
    broker.make_topic(&topic, 4);
    let emitter = KafkaEmitter::new(keys.clone());
    let events: Vec<(String, String)> = (0..40)
        .map(|i| (format!("user-{}", i % 8), format!("{i}")))
        .collect();
    emit_all(&db, &emitter, &topic, &events);
    relay_all(&db, &keys, &bootstrap);

    let group = unique("g");
    let mut c1 = consumer(&db, &keys, &bootstrap, &group, &topic);
    // c1 alone owns everything; take one delivery and hold it uncommitted.
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        if let Some(d) = c1.poll(2, Duration::from_millis(200)).unwrap() {
            break d;
        }
        assert!(Instant::now() < deadline, "c1 got nothing");
    };
    assert_eq!(c1.owned_partitions(), vec![0, 1, 2, 3]);

    // c2 joins; both keep polling (without committing) until the group settles.
    let mut c2 = consumer(&db, &keys, &bootstrap, &group, &topic);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let _ = c1.poll(1, Duration::from_millis(50)).unwrap();
        let _ = c2.poll(1, Duration::from_millis(50)).unwrap();
        let (a, b) = (c1.owned_partitions(), c2.owned_partitions());
        if !a.is_empty() && !b.is_empty() && a.len() + b.len() == 4 {
            let all: BTreeSet<u32> = a.iter().chain(b.iter()).copied().collect();
            assert_eq!(all.len(), 4, "disjoint: {a:?} {b:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "group did not settle: {a:?} {b:?}"
        );
    }

    // The held delivery's fence is from before the rebalance: its commit is refused.
    let err = db
        .transact(|tx| positions::commit(tx, &keys, &held.fence, held.next_offset()))
        .unwrap_err();
    assert!(positions::is_fenced(&err), "zombie commit fenced: {err}");
    c1.fenced(&held.fence);

    // Both drain the rest; together they see every record exactly once per offset.
    let mut seen: BTreeSet<(u32, u64)> = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 40 && Instant::now() < deadline {
        for c in [&mut c1, &mut c2] {
            match c.poll(5, Duration::from_millis(50)).unwrap() {
                Some(d) => {
                    match db.transact(|tx| positions::commit(tx, &keys, &d.fence, d.next_offset()))
                    {
                        Ok(()) => {
                            c.committed(&d.fence, d.next_offset());
                            for r in &d.records {
                                assert!(
                                    seen.insert((d.fence.partition, r.offset)),
                                    "offset {}/{} committed twice",
                                    d.fence.partition,
                                    r.offset
                                );
                            }
                        }
                        Err(e) if positions::is_fenced(&e) => c.fenced(&d.fence),
                        Err(e) => panic!("{e}"),
                    }
                }
                None => {}
            }
        }
    }
    assert_eq!(seen.len(), 40, "every record committed once");
    c1.close().unwrap();
    c2.close().unwrap();
}
