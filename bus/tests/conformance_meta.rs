//! The bus suite can fail: deliberately broken consumers (wrappers around the embedded
//! bus's members) fail the property that describes what they break, while the same
//! wrapper with nothing broken passes every property.
use std::collections::BTreeMap;
use std::time::Duration;

use swimlane_bus::conformance::{self, BusUnderTest, TempEmbeddedBus};
use swimlane_bus::{positions, BusError, Consumer, Delivery, Fence};
use swimlane_core::keys::Keys;
use swimlane_store::Db;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Breakage {
    Nothing,
    /// Commits the position as soon as it hands records out (Kafka's auto-commit), before
    /// the stage's effect: a stage that dies then has lost those records.
    CommitsBeforeEffect,
    /// Takes a partition over under its previous owner's epoch instead of a new one, so
    /// the former owner's fence is never superseded: it ignores the fence.
    KeepsThePreviousEpoch,
}

struct BrokenBus {
    inner: TempEmbeddedBus,
    kind: Breakage,
}

struct BrokenMember {
    inner: Box<dyn Consumer>,
    kind: Breakage,
    db: Db,
    keys: Keys,
    /// Per partition: the epoch the inner member holds and the one handed out instead.
    epochs: BTreeMap<u32, (u64, u64)>,
}

impl BrokenMember {
    /// The inner member's fence for one this wrapper handed out.
    fn inner_fence(&self, fence: &Fence) -> Fence {
        let mut f = fence.clone();
        if let Some((inner, handed)) = self.epochs.get(&fence.partition) {
            if *handed == fence.epoch {
                f.epoch = *inner;
            }
        }
        f
    }

    /// Write the partition's lease back to `epoch` (its JSON's `epoch` field).
    fn rewind_lease(&self, fence: &Fence, epoch: u64) -> Result<(), BusError> {
        let key = self.keys.lease(&fence.group, &fence.topic, fence.partition);
        self.db.transact(|tx| {
            let Some(raw) = tx.get(&key)? else {
                return Ok(());
            };
            let mut lease: serde_json::Value = serde_json::from_slice(&raw).expect("a lease");
            lease["epoch"] = epoch.into();
            tx.set(&key, &serde_json::to_vec(&lease).expect("serialises"))
        })?;
        Ok(())
    }
}

impl Consumer for BrokenMember {
    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Option<Delivery>, BusError> {
        let Some(mut d) = self.inner.poll(max, timeout)? else {
            return Ok(None);
        };
        match self.kind {
            Breakage::Nothing => {}
            Breakage::CommitsBeforeEffect => {
                let (fence, next) = (d.fence.clone(), d.next_offset());
                self.db
                    .transact(|tx| positions::commit(tx, &self.keys, &fence, next))?;
                self.inner.committed(&fence, next);
            }
            Breakage::KeepsThePreviousEpoch => {
                let p = d.fence.partition;
                let inner = d.fence.epoch;
                let handed = match self.epochs.get(&p) {
                    Some((i, h)) if *i == inner => *h,
                    _ => {
                        let previous = inner.saturating_sub(1).max(1);
                        self.rewind_lease(&d.fence, previous)?;
                        self.epochs.insert(p, (inner, previous));
                        previous
                    }
                };
                d.fence.epoch = handed;
            }
        }
        Ok(Some(d))
    }
    fn committed(&mut self, fence: &Fence, next_offset: u64) {
        let f = self.inner_fence(fence);
        self.inner.committed(&f, next_offset)
    }
    fn fenced(&mut self, fence: &Fence) {
        let f = self.inner_fence(fence);
        self.inner.fenced(&f)
    }
    fn close(&mut self) -> Result<(), BusError> {
        self.inner.close()
    }
    fn lag(&mut self) -> Result<u64, BusError> {
        self.inner.lag()
    }
    fn owned_partitions(&self) -> Vec<u32> {
        self.inner.owned_partitions()
    }
}

impl BusUnderTest for BrokenBus {
    fn db(&self) -> &Db {
        self.inner.db()
    }
    fn keys(&self) -> &Keys {
        self.inner.keys()
    }
    fn partitions(&self) -> u32 {
        self.inner.partitions()
    }
    fn topic(&self, name: &str) -> Result<String, String> {
        self.inner.topic(name)
    }
    fn publish(&self, topic: &str, events: &[(String, String)]) -> Result<(), String> {
        self.inner.publish(topic, events)
    }
    fn member(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, String> {
        Ok(Box::new(BrokenMember {
            inner: self.inner.member(group, topic)?,
            kind: self.kind,
            db: self.inner.db().clone(),
            keys: self.inner.keys().clone(),
            epochs: BTreeMap::new(),
        }))
    }
    fn patience(&self) -> Duration {
        // Long enough for a group to settle; a broken bus fails before it runs out.
        Duration::from_secs(5)
    }
}

fn bus(kind: Breakage) -> BrokenBus {
    BrokenBus {
        inner: TempEmbeddedBus::new().unwrap(),
        kind,
    }
}

fn property(name: &str) -> conformance::Property {
    conformance::PROPERTIES
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no property {name}"))
        .1
}

#[test]
fn the_wrapper_with_nothing_broken_passes_every_property() {
    for (name, p) in conformance::PROPERTIES {
        p(&bus(Breakage::Nothing)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn a_consumer_that_commits_before_the_effect_fails() {
    let err = property("redelivers_what_was_not_committed")(&bus(Breakage::CommitsBeforeEffect))
        .expect_err("records handed out and never handled were skipped");
    assert!(err.contains("next owner's starts at"), "{err}");
}

#[test]
fn a_consumer_that_ignores_the_former_owners_fence_fails() {
    let err = property("a_member_that_lost_its_partition_cannot_commit")(&bus(
        Breakage::KeepsThePreviousEpoch,
    ))
    .expect_err("the former owner's delivery committed");
    assert!(err.contains("committed after the heir took"), "{err}");
}

#[test]
fn every_property_has_a_test() {
    // bus_conformance_tests! names every property; the suite's list and the macro's
    // must not drift apart (a property missing from the macro would never run).
    let source = include_str!("../src/conformance.rs");
    let macro_body = &source[source.find("macro_rules! bus_conformance_tests").unwrap()..];
    let macro_body = &macro_body[..macro_body.find("(@each ($bus:expr)").unwrap()];
    for (name, _) in conformance::PROPERTIES {
        assert!(
            macro_body.contains(name),
            "{name} is not in bus_conformance_tests!"
        );
    }
}
