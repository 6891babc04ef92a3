//! The embedded bus against the real embedded store: what only the embedded bus has
//! (leases that expire by its clock, its fair-share rebalancing, the lease keeper) and
//! the stage loop's dead letters. What every bus must do is the bus conformance suite
//! (`tests/conformance_embedded.rs`).
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use swimlane_bus::embedded::{ConsumerOptions, EmbeddedBus, EmbeddedConsumer, NowMs};
use swimlane_bus::{positions, Consumer, Emitter, Raw};
use swimlane_core::keys::Keys;
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::Db;

const TOPIC: &str = "t";

fn setup() -> (tempfile::TempDir, Db, Keys, EmbeddedBus) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::new(EmbeddedBackend::open(dir.path().join("store")).unwrap());
    let keys = Keys::new("bus-test");
    let bus = EmbeddedBus::new(keys.clone(), 4);
    (dir, db, keys, bus)
}

fn clock(ms: u64) -> (Arc<AtomicU64>, NowMs) {
    let c = Arc::new(AtomicU64::new(ms));
    let c2 = c.clone();
    (c, Arc::new(move || c2.load(Ordering::SeqCst)))
}

/// A member of `group` on `topic`, renewing its leases only when it polls.
fn options(group: &str, topic: &str, member: &str, now: NowMs) -> ConsumerOptions {
    ConsumerOptions {
        group: group.into(),
        topic: topic.into(),
        member: member.into(),
        lease_ttl: Duration::from_secs(3),
        poll_interval: Duration::from_millis(1),
        now_ms: now,
        keep_leases: false,
        retention: None,
        trimmed: None,
    }
}

fn consumer(db: &Db, keys: &Keys, bus: &EmbeddedBus, member: &str, now: NowMs) -> EmbeddedConsumer {
    let opts = options("g", TOPIC, member, now);
    EmbeddedConsumer::new(db.clone(), keys.clone(), bus.clone(), opts).unwrap()
}

/// A delivery's payloads, as text.
fn payloads(d: &swimlane_bus::Delivery) -> impl Iterator<Item = String> + '_ {
    d.records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
}

fn emit(db: &Db, bus: &EmbeddedBus, key: &str, payload: &str) {
    db.transact(|tx| bus.emit_raw(tx, Raw::new(TOPIC, key, payload.as_bytes())))
        .unwrap();
}

/// Drain everything, committing each delivery; returns (key, payload) in delivery order.
fn drain(db: &Db, keys: &Keys, c: &mut EmbeddedConsumer) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(d) = c.poll(3, Duration::ZERO).unwrap() {
        db.transact(|tx| positions::commit(tx, keys, &d.fence, d.next_offset()))
            .unwrap();
        c.committed(&d.fence, d.next_offset());
        out.extend(
            d.records
                .iter()
                .map(|r| (r.key.clone(), String::from_utf8(r.payload.clone()).unwrap())),
        );
    }
    out
}

#[test]
fn a_zombie_cannot_commit_after_its_partition_moved() {
    let (_d, db, keys, bus) = setup();
    emit(&db, &bus, "u", "a");
    let (clk, now) = clock(1_000);
    let mut zombie = consumer(&db, &keys, &bus, "zombie", now.clone());
    let d = zombie.poll(10, Duration::ZERO).unwrap().unwrap();
    // The zombie stalls past its lease; another member takes the partition.
    clk.store(5_000, Ordering::SeqCst);
    let mut heir = consumer(&db, &keys, &bus, "heir", now);
    let d2 = heir.poll(10, Duration::ZERO).unwrap().unwrap();
    assert_eq!(d2.fence.partition, d.fence.partition);
    let err = db
        .transact(|tx| positions::commit(tx, &keys, &d.fence, d.next_offset()))
        .unwrap_err();
    assert!(positions::is_fenced(&err), "{err}");
    db.transact(|tx| positions::commit(tx, &keys, &d2.fence, d2.next_offset()))
        .unwrap();
}

#[test]
fn two_members_split_the_partitions_and_one_takes_all_when_the_other_leaves() {
    let (_d, db, keys, bus) = setup();
    let (_clk, now) = clock(1_000);
    let mut a = consumer(&db, &keys, &bus, "a", now.clone());
    a.rebalance().unwrap();
    assert_eq!(a.owned_partitions().len(), 4);
    let mut b = consumer(&db, &keys, &bus, "b", now.clone());
    b.rebalance().unwrap(); // b sees 2 live members, but a still holds everything
    a.rebalance().unwrap(); // a releases down to its share
    b.rebalance().unwrap();
    assert_eq!(a.owned_partitions().len(), 2);
    assert_eq!(b.owned_partitions().len(), 2);
    a.close().unwrap();
    b.rebalance().unwrap();
    assert_eq!(b.owned_partitions().len(), 4);
}

#[test]
fn a_delivery_longer_than_the_lease_keeps_its_partition_with_the_keeper() {
    let (_d, db, keys, bus) = setup();
    emit(&db, &bus, "u", "a");
    let opts = |member: &str| ConsumerOptions {
        lease_ttl: Duration::from_millis(600),
        keep_leases: true,
        ..options("g", TOPIC, member, swimlane_bus::embedded::system_now_ms())
    };
    let mut slow =
        EmbeddedConsumer::new(db.clone(), keys.clone(), bus.clone(), opts("slow")).unwrap();
    let d = slow.poll(10, Duration::ZERO).unwrap().unwrap();
    // The handler works for four times the lease's time to live, polling nothing.
    std::thread::sleep(Duration::from_millis(2400));
    let mut other =
        EmbeddedConsumer::new(db.clone(), keys.clone(), bus.clone(), opts("other")).unwrap();
    other.rebalance().unwrap();
    assert!(
        !other.owned_partitions().contains(&d.fence.partition),
        "the busy member's partition moved although its keeper renews the lease"
    );
    assert!(other.poll(10, Duration::ZERO).unwrap().is_none());
    db.transact(|tx| positions::commit(tx, &keys, &d.fence, d.next_offset()))
        .unwrap();
    slow.committed(&d.fence, d.next_offset());
    assert!(slow.owned_partitions().contains(&d.fence.partition));
}

/// A stage that handles records by committing their position, fails with an error
/// retrying cannot fix on `bad` and with a transient one on the first 7 tries of
/// `flaky`.
struct Picky {
    db: Db,
    keys: Keys,
    bus: EmbeddedBus,
    flaky_failures: u32,
    handled: Arc<std::sync::Mutex<Vec<String>>>,
    given_up: Arc<std::sync::Mutex<Vec<String>>>,
}

impl swimlane_bus::stage::StageHandler for Picky {
    fn handle(&mut self, d: &swimlane_bus::Delivery) -> Result<(), swimlane_store::KvError> {
        for r in &d.records {
            if r.payload == b"bad" {
                return Err(swimlane_store::KvError::Corrupt {
                    what: format!("record {}", r.offset),
                    reason: "does not decode".into(),
                });
            }
            if r.payload == b"flaky" && self.flaky_failures < 7 {
                self.flaky_failures += 1;
                return Err(swimlane_store::KvError::Backend("disk busy".into()));
            }
        }
        self.db
            .transact(|tx| positions::commit(tx, &self.keys, &d.fence, d.next_offset()))?;
        self.handled.lock().unwrap().extend(payloads(d));
        Ok(())
    }

    fn give_up(
        &mut self,
        d: &swimlane_bus::Delivery,
        reason: &str,
    ) -> Result<(), swimlane_store::KvError> {
        let n =
            swimlane_bus::stage::dead_letter_delivery(&self.db, &self.keys, &self.bus, d, reason)?;
        assert_eq!(n, 1);
        self.given_up.lock().unwrap().extend(payloads(d));
        Ok(())
    }
}

#[test]
fn a_record_that_can_never_be_handled_goes_to_the_dead_letters_and_the_partition_moves_on() {
    let (_dir, db, keys, bus) = setup();
    // One key, so one partition, in this order; one delivery holds them all at first.
    for p in ["a", "b", "bad", "flaky", "c"] {
        emit(&db, &bus, "user-1", p);
    }
    let (_c, now) = clock(1_000);
    let mut c = consumer(&db, &keys, &bus, "m1", now.clone());
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let given_up = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut h = Picky {
        db: db.clone(),
        keys: keys.clone(),
        bus: bus.clone(),
        flaky_failures: 0,
        handled: handled.clone(),
        given_up: given_up.clone(),
    };
    let opts = swimlane_bus::stage::LoopOptions {
        max_records: 8,
        poll_timeout: Duration::from_millis(5),
        max_backoff: Duration::from_millis(5),
        max_attempts: 3,
        lag: None,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let stop = || {
        assert!(
            std::time::Instant::now() < deadline,
            "the partition stalled: {:?}",
            handled.lock().unwrap()
        );
        handled.lock().unwrap().len() == 4
    };
    swimlane_bus::stage::run_stage(&mut c, &mut h, &opts, &stop).unwrap();
    assert_eq!(
        *handled.lock().unwrap(),
        ["a", "b", "flaky", "c"],
        "each good record once, in order"
    );
    assert_eq!(*given_up.lock().unwrap(), ["bad"]);
    assert_eq!(
        h.flaky_failures, 7,
        "a transient error is retried past the bound"
    );

    // The dead letter says which topic, why, and carries the record.
    let opts = options("dl", swimlane_core::topics::DEAD_LETTER, "dl", now);
    let mut dl = EmbeddedConsumer::new(db.clone(), keys.clone(), bus.clone(), opts).unwrap();
    let letters = drain(&db, &keys, &mut dl);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let body: serde_json::Value = serde_json::from_str(&letters[0].1).unwrap();
    assert_eq!(body["source_topic"], TOPIC);
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("gave up after 3 attempts"), "{reason}");
    assert!(reason.contains("does not decode"), "{reason}");
    assert_eq!(body["payload_hex"], "626164");
}

/// The log is trimmed below every group's position, keeping `keep` entries, in
/// bounded transactions; a partition no group has a position on is never trimmed; the
/// entries kept still read in order, and a group resumes where it was.
#[test]
fn the_log_is_trimmed_below_every_groups_position_in_bounded_steps() {
    use swimlane_bus::embedded::Retention;
    let (_dir, db, keys, _) = setup();
    let bus = EmbeddedBus::new(keys.clone(), 1);
    for i in 0..100 {
        emit(&db, &bus, "u", &format!("r{i}"));
    }
    let retention = Retention {
        keep: 10,
        max_per_tx: 15,
    };
    let trim = || {
        db.transact(|tx| bus.trim(tx, TOPIC, 0, &retention))
            .unwrap()
    };
    assert_eq!(trim(), 0, "no group has a position: nothing is trimmed");
    let commit = |group: &str, offset: u64| {
        db.transact(|tx| {
            let fence = positions::acquire(tx, &keys, group, TOPIC, 0, "m", 0, 1_000, true)?
                .expect("a free partition");
            positions::commit(tx, &keys, &fence, offset)
        })
        .unwrap()
    };
    commit("g", 60);
    // Below 60, keeping 10: 50 entries, at most 15 a transaction.
    let steps: Vec<u64> = std::iter::from_fn(|| Some(trim()).filter(|n| *n > 0)).collect();
    assert_eq!(steps, vec![15, 15, 15, 5]);
    let first = db.transact(|tx| bus.first_offset(tx, TOPIC, 0)).unwrap();
    assert_eq!(first, Some(50));
    // A slower group holds trimming back.
    commit("h", 20);
    commit("g", 100);
    assert_eq!(trim(), 0);
    // What is kept reads in order from the oldest entry kept.
    let all = bus.read_all(&db, TOPIC).unwrap();
    assert_eq!(all.len(), 50);
    assert_eq!(all[0].1.offset, 50);
    assert_eq!(all[49].1.payload, b"r99".to_vec());
    // Another topic, no group: untouched.
    db.transact(|tx| bus.emit_raw(tx, Raw::new("dead", "u", b"x")))
        .unwrap();
    let dead = || {
        db.transact(|tx| bus.trim(tx, "dead", 0, &retention))
            .unwrap()
    };
    assert_eq!(dead(), 0);
}
