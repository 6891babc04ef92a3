//! Queue positions and partition ownership, kept in the store.
//!
//! Layout (see `swimlane_core::keys`): `("lease", group, topic, partition)` holds the
//! partition's owner, its epoch and the lease expiry; `("pos", group, topic,
//! partition)` holds the next offset to process.
//!
//! Invariants:
//! - The epoch of a partition only grows; every change of owner bumps it.
//! - [`commit`] succeeds only if the lease still carries the committer's epoch; since
//!   it reads the lease inside the stage's transaction, a concurrent take-over makes
//!   that transaction conflict and, on retry, fail with [`Fenced`]. A zombie's effect
//!   therefore never commits.
//! - Positions never move backwards.
use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use swimlane_core::keys::Keys;
use swimlane_store::{Db, KvError, Transaction};

use crate::embedded::NowMs;

/// The right to commit positions of one partition, as granted at acquisition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub group: String,
    pub topic: String,
    pub partition: u32,
    pub epoch: u64,
    /// The committed position when the fence was granted.
    pub offset: u64,
}

/// The commit was refused: the partition has a newer owner.
#[derive(Debug, thiserror::Error)]
#[error("fenced: {group}/{topic}/{partition} epoch {mine} superseded by {current}")]
pub struct Fenced {
    pub group: String,
    pub topic: String,
    pub partition: u32,
    pub mine: u64,
    pub current: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Lease {
    v: u32,
    member: String,
    epoch: u64,
    expires_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Position {
    v: u32,
    offset: u64,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> KvError {
    KvError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

fn read_lease(tx: &mut Transaction<'_>, key: &[u8]) -> Result<Option<Lease>, KvError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| corrupt("lease", e)),
    }
}

/// The committed position of a partition (0 when none).
pub fn position(
    tx: &mut Transaction<'_>,
    keys: &Keys,
    group: &str,
    topic: &str,
    partition: u32,
) -> Result<u64, KvError> {
    match tx.get(&keys.position(group, topic, partition))? {
        None => Ok(0),
        Some(b) => decode_position(&b),
    }
}

/// The offset a stored position value holds.
pub fn decode_position(bytes: &[u8]) -> Result<u64, KvError> {
    serde_json::from_slice::<Position>(bytes)
        .map(|p| p.offset)
        .map_err(|e| corrupt("position", e))
}

/// Who holds a partition's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub member: String,
    pub epoch: u64,
    /// The lease runs out at this time (ms since the Unix epoch) unless renewed; 0
    /// once released.
    pub expires_ms: u64,
}

/// The holder of a partition's lease, if anyone ever took it (the lease may have
/// expired: see [`Owner::expires_ms`]).
pub fn owner(
    tx: &mut Transaction<'_>,
    keys: &Keys,
    group: &str,
    topic: &str,
    partition: u32,
) -> Result<Option<Owner>, KvError> {
    Ok(
        read_lease(tx, &keys.lease(group, topic, partition))?.map(|l| Owner {
            member: l.member,
            epoch: l.epoch,
            expires_ms: l.expires_ms,
        }),
    )
}

/// Take the partition for `member` if it is free, expired, or already `member`'s;
/// with `force`, take it whoever holds it (Kafka: the group coordinator already
/// decided). A change of owner bumps the epoch. Returns the fence, or `None` when
/// another live member holds the lease.
#[allow(clippy::too_many_arguments)]
pub fn acquire(
    tx: &mut Transaction<'_>,
    keys: &Keys,
    group: &str,
    topic: &str,
    partition: u32,
    member: &str,
    now_ms: u64,
    ttl_ms: u64,
    force: bool,
) -> Result<Option<Fence>, KvError> {
    let key = keys.lease(group, topic, partition);
    let current = read_lease(tx, &key)?;
    let epoch = match &current {
        Some(l) if l.member == member && l.expires_ms > now_ms && !force => l.epoch,
        Some(l) if l.expires_ms > now_ms && !force => return Ok(None),
        Some(l) => l.epoch + 1,
        None => 1,
    };
    let lease = Lease {
        v: 1,
        member: member.to_string(),
        epoch,
        expires_ms: now_ms + ttl_ms,
    };
    tx.set(&key, &serde_json::to_vec(&lease).expect("serializes"))?;
    let offset = position(tx, keys, group, topic, partition)?;
    Ok(Some(Fence {
        group: group.into(),
        topic: topic.into(),
        partition,
        epoch,
        offset,
    }))
}

/// Extend `fence`'s lease. Returns false (and changes nothing) when the partition has
/// a newer owner.
pub fn renew(
    tx: &mut Transaction<'_>,
    keys: &Keys,
    fence: &Fence,
    member: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<bool, KvError> {
    let key = keys.lease(&fence.group, &fence.topic, fence.partition);
    match read_lease(tx, &key)? {
        Some(l) if l.epoch == fence.epoch && l.member == member => {
            let l = Lease {
                expires_ms: now_ms + ttl_ms,
                ..l
            };
            tx.set(&key, &serde_json::to_vec(&l).expect("serializes"))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Give the partition up so another member may take it at once (epoch kept: the
/// next owner bumps it).
pub fn release(
    tx: &mut Transaction<'_>,
    keys: &Keys,
    fence: &Fence,
    member: &str,
) -> Result<(), KvError> {
    let key = keys.lease(&fence.group, &fence.topic, fence.partition);
    if let Some(l) = read_lease(tx, &key)? {
        if l.epoch == fence.epoch && l.member == member {
            let l = Lease { expires_ms: 0, ..l };
            tx.set(&key, &serde_json::to_vec(&l).expect("serializes"))?;
        }
    }
    Ok(())
}

/// Record that everything before `next_offset` is processed, in the caller's
/// transaction, if and only if `fence` is still the partition's current epoch.
/// Otherwise aborts the transaction with [`Fenced`] (see `KvError::aborted_as`).
pub fn commit(
    tx: &mut Transaction<'_>,
    keys: &Keys,
    fence: &Fence,
    next_offset: u64,
) -> Result<(), KvError> {
    let key = keys.lease(&fence.group, &fence.topic, fence.partition);
    let current = read_lease(tx, &key)?.map(|l| l.epoch).unwrap_or(0);
    if current != fence.epoch {
        return Err(KvError::abort(Fenced {
            group: fence.group.clone(),
            topic: fence.topic.clone(),
            partition: fence.partition,
            mine: fence.epoch,
            current,
        }));
    }
    let pos = position(tx, keys, &fence.group, &fence.topic, fence.partition)?;
    if next_offset < pos {
        return Err(KvError::InvalidArgument(format!(
            "position of {}/{}/{} would move back from {pos} to {next_offset}",
            fence.group, fence.topic, fence.partition
        )));
    }
    tx.set(
        &keys.position(&fence.group, &fence.topic, fence.partition),
        &serde_json::to_vec(&Position {
            v: 1,
            offset: next_offset,
        })
        .expect("serializes"),
    )
}

/// Whether an error from a stage transaction is a [`Fenced`] refusal.
pub fn is_fenced(e: &KvError) -> bool {
    e.aborted_as::<Fenced>().is_some()
}

/// Renew the leases of `fences` for `member` in one transaction; the fences whose
/// lease another owner holds now (their partitions are lost: the caller drops them).
pub fn renew_all(
    tx: &mut Transaction<'_>,
    keys: &Keys,
    fences: &[Fence],
    member: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Vec<Fence>, KvError> {
    let mut lost = Vec::new();
    for f in fences {
        if !renew(tx, keys, f, member, now_ms, ttl_ms)? {
            lost.push(f.clone());
        }
    }
    Ok(lost)
}

/// Runs `tick` every `every` on a thread of its own, from [`LeaseKeeper::start`] until
/// the keeper is dropped (drop stops the thread and waits for it).
///
/// Consumers renew their partition leases with it, whatever their stage is busy with
/// (Kafka's own heartbeat runs on librdkafka's thread the same way), so a lease runs out
/// only when its owner process is gone, frozen, or cannot reach the store: a delivery
/// that takes longer than the lease's time to live (a slow training run) keeps its
/// partition, instead of losing it mid-work to another member that then loses it the
/// same way.
pub struct LeaseKeeper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Start the thread (named `name`); the first tick comes after `every`.
    pub fn start(
        name: &str,
        every: std::time::Duration,
        mut tick: impl FnMut() + Send + 'static,
    ) -> Result<LeaseKeeper, crate::BusError> {
        use std::sync::atomic::Ordering;
        use std::time::{Duration, Instant};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let every = every.max(Duration::from_millis(10));
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut last = Instant::now();
                while !flag.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10).min(every));
                    if last.elapsed() < every {
                        continue;
                    }
                    last = Instant::now();
                    tick();
                }
            })
            .map_err(|e| crate::BusError::Config(format!("cannot start the {name} thread: {e}")))?;
        Ok(LeaseKeeper {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A partition a member owns: the fence it was granted, its cursor (the next offset to
/// deliver: the stored position, moved on by the member's commits) and what the bus
/// keeps beside them (`B`: the records a Kafka member fetched and has not yet handed
/// out; nothing for the embedded log, which reads from the store).
pub struct Held<B = ()> {
    pub fence: Fence,
    pub cursor: u64,
    pub buffered: B,
}

/// The partitions a member owns, by partition.
pub type Holdings<B = ()> = BTreeMap<u32, Held<B>>;

/// Forget the partition of `fence` if it is still held under that fence's epoch: a
/// newer owner has it (found by the lease keeper's renewal, or by a fenced commit).
/// A fence of an older epoch changes nothing.
pub fn drop_lost<B>(held: &mut Holdings<B>, fence: &Fence) {
    if held
        .get(&fence.partition)
        .is_some_and(|h| h.fence.epoch == fence.epoch)
    {
        tracing::warn!(
            partition = fence.partition,
            epoch = fence.epoch,
            "partition lost to a newer owner"
        );
        held.remove(&fence.partition);
    }
}

/// Move the cursor of `fence`'s partition to `next_offset` after a commit, if the
/// partition is still held under that fence (never backwards). Returns the partition
/// when it moved.
pub fn advance<'a, B>(
    held: &'a mut Holdings<B>,
    fence: &Fence,
    next_offset: u64,
) -> Option<&'a mut Held<B>> {
    let h = held.get_mut(&fence.partition)?;
    if h.fence.epoch != fence.epoch {
        return None;
    }
    h.cursor = h.cursor.max(next_offset);
    Some(h)
}

/// What a member's lease keeper renews.
pub struct KeeperOptions {
    pub member: String,
    pub lease_ttl: Duration,
    pub now_ms: NowMs,
    /// The member's own liveness record, renewed with the leases (the embedded log's
    /// group membership); `None` where the broker keeps membership (Kafka).
    pub member_key: Option<Vec<u8>>,
}

/// Start the lease keeper every consumer runs for as long as it lives: every third of
/// the lease's time to live, one transaction renews the member's record (when it has
/// one) and the leases of the fences `held` returns; the fences another owner has
/// taken since go to `lost` (the member drops those partitions). With nothing held it
/// does nothing: the member's next poll heartbeats.
pub fn keep_leases(
    db: Db,
    keys: Keys,
    opts: KeeperOptions,
    held: impl Fn() -> Vec<Fence> + Send + 'static,
    lost: impl Fn(Vec<Fence>) + Send + 'static,
) -> Result<LeaseKeeper, crate::BusError> {
    LeaseKeeper::start("lease-keeper", opts.lease_ttl / 3, move || {
        let fences = held();
        if fences.is_empty() {
            return;
        }
        let now = opts.now_ms.now_ms();
        let ttl = opts.lease_ttl.as_millis() as u64;
        let renewed = db.transact(|tx| {
            if let Some(k) = &opts.member_key {
                tx.set(k, &(now + ttl).to_le_bytes())?;
            }
            renew_all(tx, &keys, &fences, &opts.member, now, ttl)
        });
        match renewed {
            Ok(gone) if !gone.is_empty() => lost(gone),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "renewing partition leases failed"),
        }
    })
}
