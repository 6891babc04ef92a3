//! The embedded bus against the real embedded store.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use swimlane_bus::embedded::{ConsumerOptions, EmbeddedBus, EmbeddedConsumer, NowMs};
use swimlane_bus::{positions, Consumer, Emitter};
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

fn consumer(db: &Db, keys: &Keys, bus: &EmbeddedBus, member: &str, now: NowMs) -> EmbeddedConsumer {
    EmbeddedConsumer::new(
        db.clone(),
        keys.clone(),
        bus.clone(),
        ConsumerOptions {
            group: "g".into(),
            topic: TOPIC.into(),
            member: member.into(),
            lease_ttl: Duration::from_secs(3),
            poll_interval: Duration::from_millis(1),
            now_ms: now,
            keep_leases: false,
        },
    )
    .unwrap()
}

fn emit(db: &Db, bus: &EmbeddedBus, key: &str, payload: &str) {
    db.transact(|tx| bus.emit_raw(tx, TOPIC, key, payload.as_bytes()))
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
fn every_record_is_delivered_once_in_key_order_and_positions_survive_restart() {
    let (_d, db, keys, bus) = setup();
    for i in 0..20 {
        emit(&db, &bus, &format!("user{}", i % 5), &format!("{i}"));
    }
    let (_c, now) = clock(1_000);
    let mut c = consumer(&db, &keys, &bus, "m1", now.clone());
    let got = drain(&db, &keys, &mut c);
    assert_eq!(got.len(), 20);
    for u in 0..5 {
        let mine: Vec<u32> = got
            .iter()
            .filter(|(k, _)| *k == format!("user{u}"))
            .map(|(_, p)| p.parse().unwrap())
            .collect();
        let mut sorted = mine.clone();
        sorted.sort();
        assert_eq!(mine, sorted, "one key's records keep their order");
        assert_eq!(mine.len(), 4);
    }
    // A new member (after the old one left) resumes at the stored positions.
    c.close().unwrap();
    emit(&db, &bus, "user1", "late");
    let mut c2 = consumer(&db, &keys, &bus, "m2", now);
    assert_eq!(
        drain(&db, &keys, &mut c2),
        vec![("user1".to_string(), "late".to_string())]
    );
}

#[test]
fn an_uncommitted_delivery_is_delivered_again() {
    let (_d, db, keys, bus) = setup();
    emit(&db, &bus, "u", "a");
    let (_c, now) = clock(1_000);
    let mut c = consumer(&db, &keys, &bus, "m1", now.clone());
    let first = c.poll(10, Duration::ZERO).unwrap().unwrap();
    // The handler failed: nothing committed. A restarted member sees it again.
    drop(c);
    let (_c2, later) = clock(10_000); // past the dead member's lease
    let mut c2 = consumer(&db, &keys, &bus, "m2", later);
    let again = c2.poll(10, Duration::ZERO).unwrap().unwrap();
    assert_eq!(first.records, again.records);
    assert!(
        again.fence.epoch > first.fence.epoch,
        "the new owner bumped the epoch"
    );
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
fn lag_counts_records_not_yet_committed() {
    let (_d, db, keys, bus) = setup();
    for i in 0..5 {
        emit(&db, &bus, "same-user", &format!("{i}"));
    }
    let (_c, now) = clock(1_000);
    let mut c = consumer(&db, &keys, &bus, "m1", now);
    c.rebalance().unwrap();
    assert_eq!(c.lag().unwrap(), 5);
    let got = drain(&db, &keys, &mut c);
    assert_eq!(got.len(), 5);
    assert_eq!(c.lag().unwrap(), 0);
}

/// A member busy with one delivery for longer than the lease's time to live (a slow
/// training run) keeps its partitions while its lease keeper runs: another member
/// finds nothing to take, and the slow member's commit goes through. Without the
/// keeper (the zombie test above) the partition would move and the commit be fenced.
#[test]
fn a_delivery_longer_than_the_lease_keeps_its_partition_with_the_keeper() {
    let (_d, db, keys, bus) = setup();
    emit(&db, &bus, "u", "a");
    let opts = |member: &str| ConsumerOptions {
        group: "g".into(),
        topic: TOPIC.into(),
        member: member.into(),
        lease_ttl: Duration::from_millis(600),
        poll_interval: Duration::from_millis(1),
        now_ms: swimlane_bus::embedded::system_now_ms(),
        keep_leases: true,
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
