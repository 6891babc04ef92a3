//! The bus conformance suite: every property a bus (its emitter and the members of its
//! consumer groups) must have for the stages' exactly-once guarantee, as functions that
//! return `Err(description)` instead of panicking, so a test can also assert that a
//! deliberately broken consumer *fails* them (`tests/conformance_meta.rs`).
//!
//! The same suite runs against the embedded log (`tests/conformance_embedded.rs`) and
//! against Kafka through a real broker (`tests/conformance_kafka.rs`, tansu in CI), as
//! the store's suite runs against every store backend. A bus's test file is one line:
//! ```ignore
//! swimlane_bus::bus_conformance_tests!(my_bus_under_test());
//! ```
//! The expression must give `Result<impl BusUnderTest, String>`; an `Err(reason)` makes
//! every test print `skipped: <reason>` and pass (for a bus that needs a server).
//!
//! The properties act as a stage does: a record counts as handled only when its
//! delivery's position commits through [`positions::commit`] (in a real stage, in the
//! transaction of its effect). Every property works on topics and groups of its own,
//! so they may share one broker and one store. Nothing sleeps to order events: a
//! property polls until what it waits for is there, bounded by
//! [`BusUnderTest::patience`] (a safety net against a broken bus, never a
//! synchronisation mechanism).
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use swimlane_core::keys::Keys;
use swimlane_store::Db;

use crate::{partition_for, positions, Consumer, Delivery, Raw};

/// One bus to check: the store its positions live in, and its two sides.
pub trait BusUnderTest {
    /// The store holding the group's positions and leases (and the embedded log).
    fn db(&self) -> &Db;
    fn keys(&self) -> &Keys;
    /// Partitions of every topic [`BusUnderTest::topic`] makes.
    fn partitions(&self) -> u32;
    /// A new topic no other property uses, with [`BusUnderTest::partitions`] partitions.
    fn topic(&self, name: &str) -> Result<String, String>;
    /// Emit `(key, payload)` events on `topic`, one store transaction each, and make
    /// them deliverable (the Kafka bus relays its outbox into the broker).
    fn publish(&self, topic: &str, events: &[(String, String)]) -> Result<(), String>;
    /// A new member of `group` on `topic`.
    fn member(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, String>;
    /// How long a property waits for what the bus does by itself (records published
    /// reaching a member, a group settling after a member joins or leaves).
    fn patience(&self) -> Duration;
}

/// One property: `Ok` if the bus has it.
pub type Property = fn(&dyn BusUnderTest) -> Result<(), String>;

/// Every property, by name (the names of the tests [`crate::bus_conformance_tests!`]
/// makes).
pub const PROPERTIES: &[(&str, Property)] = &[
    (
        "every_record_once_in_key_order",
        every_record_once_in_key_order,
    ),
    (
        "resumes_at_the_stored_position",
        resumes_at_the_stored_position,
    ),
    (
        "redelivers_what_was_not_committed",
        redelivers_what_was_not_committed,
    ),
    (
        "a_member_that_lost_its_partition_cannot_commit",
        a_member_that_lost_its_partition_cannot_commit,
    ),
    (
        "members_share_partitions_and_commit_each_record_once",
        members_share_partitions_and_commit_each_record_once,
    ),
    (
        "lag_counts_what_is_not_committed",
        lag_counts_what_is_not_committed,
    ),
];

/// One `#[test]` per bus conformance property against the expression, which must
/// evaluate to `Result<impl BusUnderTest, String>` (`Err(reason)`: skip).
#[macro_export]
macro_rules! bus_conformance_tests {
    ($bus:expr) => {
        $crate::bus_conformance_tests!(@each ($bus)
            every_record_once_in_key_order, resumes_at_the_stored_position,
            redelivers_what_was_not_committed, a_member_that_lost_its_partition_cannot_commit,
            members_share_partitions_and_commit_each_record_once,
            lag_counts_what_is_not_committed);
    };
    (@each ($bus:expr) $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let bus: ::std::result::Result<_, ::std::string::String> = $bus;
                match bus {
                    ::std::result::Result::Err(reason) => eprintln!("skipped: {reason}"),
                    ::std::result::Result::Ok(b) => {
                        if let ::std::result::Result::Err(e) = $crate::conformance::$name(&b) {
                            panic!("bus conformance property `{}` failed: {}", stringify!($name), e);
                        }
                    }
                }
            }
        )*
    };
}

type Res = Result<(), String>;

/// A group name no other property or run uses.
fn group(name: &str) -> String {
    crate::member_id(&format!("conformance-{name}"))
}

/// Events `(user-{i % users}, "{i}")` for `i` in `0..n`.
fn events(n: usize, users: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("user-{}", i % users), format!("{i}")))
        .collect()
}

/// Commit `d` as a stage would (its effect is the position), and tell the member.
fn commit(bus: &dyn BusUnderTest, c: &mut dyn Consumer, d: &Delivery) -> Result<(), String> {
    bus.db()
        .transact(|tx| positions::commit(tx, bus.keys(), &d.fence, d.next_offset()))
        .map_err(|e| format!("committing {:?} up to {}: {e}", d.fence, d.next_offset()))?;
    c.committed(&d.fence, d.next_offset());
    Ok(())
}

/// Poll until a delivery comes (not committed), within the bus's patience.
fn next_delivery(
    bus: &dyn BusUnderTest,
    c: &mut dyn Consumer,
    max: usize,
) -> Result<Delivery, String> {
    let deadline = Instant::now() + bus.patience();
    loop {
        if let Some(d) = c
            .poll(max, Duration::from_millis(100))
            .map_err(|e| format!("poll: {e}"))?
        {
            return Ok(d);
        }
        if Instant::now() >= deadline {
            return Err(format!("no delivery within {:?}", bus.patience()));
        }
    }
}

/// A record as handled: (partition, offset, key, payload).
type Handled = (u32, u64, String, String);

fn handled(d: &Delivery) -> Vec<Handled> {
    d.records
        .iter()
        .map(|r| {
            (
                d.fence.partition,
                r.offset,
                r.key.clone(),
                String::from_utf8_lossy(&r.payload).into_owned(),
            )
        })
        .collect()
}

/// Poll and commit until `want` records are handled or the patience runs out.
fn drain(
    bus: &dyn BusUnderTest,
    c: &mut dyn Consumer,
    want: usize,
    max: usize,
) -> Result<Vec<Handled>, String> {
    let deadline = Instant::now() + bus.patience();
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        let room = (want - out.len()).min(max);
        if let Some(d) = c
            .poll(room, Duration::from_millis(100))
            .map_err(|e| format!("poll: {e}"))?
        {
            commit(bus, c, &d)?;
            out.extend(handled(&d));
        }
    }
    Ok(out)
}

/// Every published record reaches the group once, each key's records in the order they
/// were emitted and on the partition `partition_for` names; the stored positions end
/// at each partition's last record plus one, and nothing is left as lag.
pub fn every_record_once_in_key_order(bus: &dyn BusUnderTest) -> Res {
    let topic = bus.topic("order")?;
    let group = group("order");
    let sent = events(40, 8);
    bus.publish(&topic, &sent)?;
    let mut c = bus.member(&group, &topic)?;
    let got = drain(bus, c.as_mut(), sent.len(), 5)?;
    if got.len() != sent.len() {
        return Err(format!(
            "{} of {} records delivered: {got:?}",
            got.len(),
            sent.len()
        ));
    }
    let mut seen = BTreeSet::new();
    let mut per_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut ends: BTreeMap<u32, u64> = BTreeMap::new();
    for (p, o, k, v) in &got {
        if !seen.insert((*p, *o)) {
            return Err(format!("{p}@{o} delivered twice"));
        }
        if *p != partition_for(k, bus.partitions()) {
            return Err(format!(
                "{k} on partition {p}, not {}",
                partition_for(k, bus.partitions())
            ));
        }
        let n: u64 = v
            .parse()
            .map_err(|_| format!("payload {v:?} is not what was sent"))?;
        per_key.entry(k).or_default().push(n);
        let end = ends.entry(*p).or_default();
        *end = (*end).max(o + 1);
    }
    for (k, ns) in &per_key {
        let want: Vec<u64> = sent
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.parse().expect("sent numbers"))
            .collect();
        if *ns != want {
            return Err(format!("{k}: delivered {ns:?}, emitted {want:?}"));
        }
    }
    for (p, end) in ends {
        let stored = bus
            .db()
            .transact(|tx| positions::position(tx, bus.keys(), &group, &topic, p))
            .map_err(|e| e.to_string())?;
        if stored != end {
            return Err(format!(
                "partition {p}: stored position {stored}, last record + 1 = {end}"
            ));
        }
    }
    let lag = c.lag().map_err(|e| e.to_string())?;
    if lag != 0 {
        return Err(format!("lag {lag} after everything was committed"));
    }
    c.close().map_err(|e| e.to_string())
}

/// A member that joins after another committed part of a partition and left starts
/// right after the committed records: nothing handled twice, nothing skipped.
pub fn resumes_at_the_stored_position(bus: &dyn BusUnderTest) -> Res {
    let topic = bus.topic("resume")?;
    let group = group("resume");
    let sent: Vec<(String, String)> = (0..10).map(|i| ("u".to_string(), format!("{i}"))).collect();
    bus.publish(&topic, &sent)?;
    let mut first = bus.member(&group, &topic)?;
    let head = drain(bus, first.as_mut(), 6, 6)?;
    let head: Vec<&str> = head.iter().map(|h| h.3.as_str()).collect();
    if head != ["0", "1", "2", "3", "4", "5"] {
        return Err(format!("the first member handled {head:?}, not 0..6"));
    }
    first.close().map_err(|e| e.to_string())?;
    drop(first);
    let mut second = bus.member(&group, &topic)?;
    let rest = drain(bus, second.as_mut(), 4, 4)?;
    let rest: Vec<&str> = rest.iter().map(|h| h.3.as_str()).collect();
    second.close().map_err(|e| e.to_string())?;
    if rest != ["6", "7", "8", "9"] {
        return Err(format!("the next member handled {rest:?}, not 6..10"));
    }
    Ok(())
}

/// A delivery whose position was never committed (its stage died before its effect
/// committed) is delivered again, from the same record, to the next owner of its
/// partition: committing a position is the stage's act, never the consumer's.
pub fn redelivers_what_was_not_committed(bus: &dyn BusUnderTest) -> Res {
    let topic = bus.topic("redeliver")?;
    let group = group("redeliver");
    let sent: Vec<(String, String)> = (0..5).map(|i| ("u".to_string(), format!("{i}"))).collect();
    bus.publish(&topic, &sent)?;
    let mut first = bus.member(&group, &topic)?;
    let lost = next_delivery(bus, first.as_mut(), 2)?;
    first.close().map_err(|e| e.to_string())?;
    drop(first);
    let mut second = bus.member(&group, &topic)?;
    let again = next_delivery(bus, second.as_mut(), 5)?;
    second.close().map_err(|e| e.to_string())?;
    let (a, b) = (handled(&lost), handled(&again));
    if b.first() != a.first() {
        return Err(format!(
            "the uncommitted delivery started at {:?}; the next owner's starts at {:?}",
            a.first(),
            b.first()
        ));
    }
    Ok(())
}

/// Once another member owns a partition, a delivery its former owner still holds can
/// never commit (the new owner's epoch fences it), while the new owner's can.
pub fn a_member_that_lost_its_partition_cannot_commit(bus: &dyn BusUnderTest) -> Res {
    let topic = bus.topic("fence")?;
    let group = group("fence");
    let sent: Vec<(String, String)> = (0..5).map(|i| ("u".to_string(), format!("{i}"))).collect();
    bus.publish(&topic, &sent)?;
    let mut zombie = bus.member(&group, &topic)?;
    let held = next_delivery(bus, zombie.as_mut(), 5)?;
    zombie.close().map_err(|e| e.to_string())?;
    let mut heir = bus.member(&group, &topic)?;
    let taken = next_delivery(bus, heir.as_mut(), 5)?;
    if taken.fence.partition != held.fence.partition {
        return Err("the heir got another partition".into());
    }
    let stale = bus
        .db()
        .transact(|tx| positions::commit(tx, bus.keys(), &held.fence, held.next_offset()));
    match stale {
        Err(e) if positions::is_fenced(&e) => {}
        Err(e) => return Err(format!("the stale commit failed, but not as fenced: {e}")),
        Ok(()) => {
            return Err(format!(
                "a delivery of the former owner (epoch {}) committed after the heir took \
                 the partition (epoch {})",
                held.fence.epoch, taken.fence.epoch
            ))
        }
    }
    commit(bus, heir.as_mut(), &taken)?;
    heir.close().map_err(|e| e.to_string())
}

/// Two members of one group split the partitions between them (each owns some, none
/// owns a partition the other does) and, handling fenced commits as a stage does,
/// commit every record exactly once between them.
pub fn members_share_partitions_and_commit_each_record_once(bus: &dyn BusUnderTest) -> Res {
    let topic = bus.topic("share")?;
    let group = group("share");
    let sent = events(40, 8);
    bus.publish(&topic, &sent)?;
    let mut members = [bus.member(&group, &topic)?, bus.member(&group, &topic)?];
    let mut seen: BTreeSet<(u32, u64)> = BTreeSet::new();
    let deadline = Instant::now() + bus.patience();
    let mut shared = false;
    while (seen.len() < sent.len() || !shared) && Instant::now() < deadline {
        for c in members.iter_mut() {
            let Some(d) = c
                .poll(3, Duration::from_millis(50))
                .map_err(|e| e.to_string())?
            else {
                continue;
            };
            match bus
                .db()
                .transact(|tx| positions::commit(tx, bus.keys(), &d.fence, d.next_offset()))
            {
                Ok(()) => {
                    c.committed(&d.fence, d.next_offset());
                    for r in &d.records {
                        if !seen.insert((d.fence.partition, r.offset)) {
                            return Err(format!(
                                "{}@{} committed twice",
                                d.fence.partition, r.offset
                            ));
                        }
                    }
                }
                Err(e) if positions::is_fenced(&e) => c.fenced(&d.fence),
                Err(e) => return Err(e.to_string()),
            }
        }
        let (a, b) = (members[0].owned_partitions(), members[1].owned_partitions());
        shared = !a.is_empty()
            && !b.is_empty()
            && a.iter().all(|p| !b.contains(p))
            && a.len() + b.len() == bus.partitions() as usize;
    }
    if seen.len() != sent.len() {
        return Err(format!(
            "{} of {} records committed",
            seen.len(),
            sent.len()
        ));
    }
    if !shared {
        return Err(format!(
            "the members never split the partitions: {:?} and {:?}",
            members[0].owned_partitions(),
            members[1].owned_partitions()
        ));
    }
    for c in members.iter_mut() {
        c.close().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Lag counts the records on the member's partitions not yet committed: all of them
/// while a delivery is in hand, none once everything is committed.
pub fn lag_counts_what_is_not_committed(bus: &dyn BusUnderTest) -> Res {
    let topic = bus.topic("lag")?;
    let group = group("lag");
    let sent: Vec<(String, String)> = (0..5).map(|i| ("u".to_string(), format!("{i}"))).collect();
    bus.publish(&topic, &sent)?;
    let mut c = bus.member(&group, &topic)?;
    let d = next_delivery(bus, c.as_mut(), 2)?;
    let lag = c.lag().map_err(|e| e.to_string())?;
    if lag != 5 {
        return Err(format!("lag {lag} with 5 records uncommitted"));
    }
    commit(bus, c.as_mut(), &d)?;
    let left = 5 - d.records.len();
    let rest = drain(bus, c.as_mut(), left, 5)?;
    if rest.len() != left {
        return Err(format!(
            "{} of the last {left} records delivered",
            rest.len()
        ));
    }
    let lag = c.lag().map_err(|e| e.to_string())?;
    if lag != 0 {
        return Err(format!("lag {lag} after everything was committed"));
    }
    c.close().map_err(|e| e.to_string())
}

/// The embedded log in a store in a temporary directory (deleted on drop), as the
/// workers use it: members keep their leases from a thread of their own.
pub struct TempEmbeddedBus {
    _store: swimlane_store::conformance::TempEmbedded,
    db: Db,
    keys: Keys,
    bus: crate::embedded::EmbeddedBus,
}

impl TempEmbeddedBus {
    pub fn new() -> Result<Self, String> {
        use swimlane_store::conformance::{StoreFactory, TempEmbedded};
        let store = TempEmbedded::new()?;
        let db = store.open()?;
        let keys = Keys::new("bus-conformance");
        let bus = crate::embedded::EmbeddedBus::new(keys.clone(), 4);
        Ok(TempEmbeddedBus {
            _store: store,
            db,
            keys,
            bus,
        })
    }
}

impl BusUnderTest for TempEmbeddedBus {
    fn db(&self) -> &Db {
        &self.db
    }
    fn keys(&self) -> &Keys {
        &self.keys
    }
    fn partitions(&self) -> u32 {
        self.bus.partitions()
    }
    fn topic(&self, name: &str) -> Result<String, String> {
        Ok(name.to_string())
    }
    fn publish(&self, topic: &str, events: &[(String, String)]) -> Result<(), String> {
        use crate::Emitter;
        for (k, v) in events {
            self.db
                .transact(|tx| self.bus.emit_raw(tx, Raw::new(topic, k, v.as_bytes())))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    fn member(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, String> {
        let opts = crate::embedded::ConsumerOptions {
            group: group.into(),
            topic: topic.into(),
            member: crate::member_id(group),
            lease_ttl: Duration::from_secs(1),
            poll_interval: Duration::from_millis(2),
            now_ms: crate::embedded::system_now_ms(),
            keep_leases: true,
            retention: None,
            trimmed: None,
        };
        crate::embedded::EmbeddedConsumer::new(
            self.db.clone(),
            self.keys.clone(),
            self.bus.clone(),
            opts,
        )
        .map(|c| Box::new(c) as Box<dyn Consumer>)
        .map_err(|e| e.to_string())
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// The Kafka bus against the broker named by `SWIMLANE_TEST_KAFKA=host:port` (an
/// embedded store beside it for positions and the outbox); `SWIMLANE_TEST_KAFKA=mock`
/// uses librdkafka's in-process mock cluster instead (a quick check, not a substitute
/// for a real broker). Every topic gets a name of its own, so runs may share a broker.
#[cfg(feature = "kafka")]
pub struct KafkaBusUnderTest {
    store: TempEmbeddedBus,
    bootstrap: String,
    mock: Option<rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
}

#[cfg(feature = "kafka")]
impl KafkaBusUnderTest {
    /// `Err` (the suite's tests skip) when `SWIMLANE_TEST_KAFKA` is not set.
    pub fn from_env() -> Result<Self, String> {
        let store = TempEmbeddedBus::new()?;
        match std::env::var("SWIMLANE_TEST_KAFKA") {
            Ok(b) if b == "mock" => {
                let mock = rdkafka::mocking::MockCluster::new(1).map_err(|e| e.to_string())?;
                Ok(KafkaBusUnderTest {
                    store,
                    bootstrap: mock.bootstrap_servers(),
                    mock: Some(mock),
                })
            }
            Ok(b) if !b.is_empty() => Ok(KafkaBusUnderTest {
                store,
                bootstrap: b,
                mock: None,
            }),
            _ => Err("SWIMLANE_TEST_KAFKA not set (bash .ci/run starts tansu and sets it)".into()),
        }
    }

    /// The broker's `host:port`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// A new member of `group` on `topic`, as its own type (for Kafka-only checks).
    pub fn kafka_member(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<crate::kafka::KafkaConsumer, String> {
        let mut o = crate::kafka::KafkaConsumerOptions::new(&self.bootstrap, group, topic);
        o.session_timeout = Duration::from_secs(6);
        crate::kafka::KafkaConsumer::new(self.db().clone(), self.keys().clone(), o)
            .map_err(|e| e.to_string())
    }
}

#[cfg(feature = "kafka")]
impl BusUnderTest for KafkaBusUnderTest {
    fn db(&self) -> &Db {
        &self.store.db
    }
    fn keys(&self) -> &Keys {
        &self.store.keys
    }
    fn partitions(&self) -> u32 {
        4
    }
    fn topic(&self, name: &str) -> Result<String, String> {
        let topic = crate::member_id(&format!("conformance-{name}"));
        match &self.mock {
            Some(m) => m
                .create_topic(&topic, self.partitions() as i32, 1)
                .map_err(|e| e.to_string())?,
            None => crate::kafka::create_topics(&self.bootstrap, &[&topic], self.partitions(), 1)
                .map_err(|e| e.to_string())?,
        }
        Ok(topic)
    }
    fn publish(&self, topic: &str, events: &[(String, String)]) -> Result<(), String> {
        use crate::Emitter;
        let emitter = crate::kafka::KafkaEmitter::new(self.store.keys.clone());
        for (k, v) in events {
            self.db()
                .transact(|tx| emitter.emit_raw(tx, Raw::new(topic, k, v.as_bytes())))
                .map_err(|e| e.to_string())?;
        }
        let producer = crate::kafka::relay_producer(&self.bootstrap).map_err(|e| e.to_string())?;
        let mut relay = crate::kafka::Relay::new(
            self.db().clone(),
            self.keys().clone(),
            producer,
            crate::kafka::RelayOptions::default(),
        );
        let deadline = Instant::now() + self.patience();
        loop {
            relay.round().map_err(|e| format!("relay: {e}"))?;
            let left = self
                .db()
                .transact(|tx| crate::kafka::read_outbox(tx, self.keys(), 1))
                .map_err(|e| e.to_string())?;
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("the relay did not empty the outbox".into());
            }
        }
    }
    fn member(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, String> {
        self.kafka_member(group, topic)
            .map(|c| Box::new(c) as Box<dyn Consumer>)
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(60)
    }
}
