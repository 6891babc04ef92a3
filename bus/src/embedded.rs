//! The embedded bus: a partitioned, durable log inside the store, and consumer groups
//! with leases, so separate worker processes on one machine share it with no broker.
//!
//! Layout: `("log", topic, partition, offset)` → record, `("loghead", topic,
//! partition)` → next offset (u64 LE). Appending reads the head inside the emitting
//! transaction, so offsets are dense and never reused; concurrent appends to one
//! partition conflict and are retried by the store.
//!
//! Group membership: each member heartbeats `("member", group, topic, member)` with an
//! expiry; at every heartbeat a member counts the live members, takes free or expired
//! partitions up to its fair share `ceil(partitions / live)` and releases any above
//! it. A member that dies stops renewing; its partitions are taken once their leases
//! expire (after `lease_ttl`), and the new owner's bumped epoch fences it out.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use swimlane_core::keys::Keys;
use swimlane_store::{Db, KvError, RangeOption, Transaction};

use crate::positions::{self, Fence};
use crate::{partition_for, BusError, Consumer, Delivery, Emitter, Raw, Record};

use crate::wire::{decode_log_record as decode_record, encode_log_record as encode_record};

/// The wall clock the bus's leases and stamps are read from.
pub use swimlane_core::clock::{system_now_ms, NowMs, WallClock};

/// The embedded log's producer side.
#[derive(Clone, Debug)]
pub struct EmbeddedBus {
    keys: Keys,
    partitions: u32,
}

impl EmbeddedBus {
    /// A bus with `partitions` partitions per topic (at least 1). Every process that
    /// shares a store must use the same partition count.
    pub fn new(keys: Keys, partitions: u32) -> Self {
        EmbeddedBus {
            keys,
            partitions: partitions.max(1),
        }
    }
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The next offset of a partition (its high watermark).
    pub fn high_watermark(
        &self,
        tx: &mut Transaction<'_>,
        topic: &str,
        partition: u32,
    ) -> Result<u64, KvError> {
        tx.get_counter(&self.keys.log_head(topic, partition))
            .map(|v| v as u64)
    }

    /// Every record of `topic` still in the log, partition by partition, each with its
    /// partition (tools, audits and tests). Reads 500 records a transaction; records at
    /// or past the partition's high watermark are [`BusError::Corrupt`]. Offsets may
    /// have gaps: an erasure (`swimlane_state::forget`) removes a forgotten user's
    /// events wherever they are, and consumers read by range, past any gap.
    pub fn read_all(&self, db: &Db, topic: &str) -> Result<Vec<(u32, Record)>, BusError> {
        let mut out = Vec::new();
        for p in 0..self.partitions {
            // Entries every group had passed may have been trimmed ([`Self::trim`]): the
            // partition starts at its oldest entry kept, or at its high watermark when
            // none is.
            let mut from = db.transact(|tx| {
                Ok(match self.first_offset(tx, topic, p)? {
                    Some(first) => first,
                    None => self.high_watermark(tx, topic, p)?,
                })
            })?;
            loop {
                let recs = db.transact(|tx| match self.read(tx, topic, p, from, 500) {
                    Ok(r) => Ok(Ok(r)),
                    Err(BusError::Store(e)) => Err(e),
                    Err(e) => Ok(Err(e)),
                })??;
                if recs.is_empty() {
                    break;
                }
                for r in recs {
                    let corrupt = |reason: &str| BusError::Corrupt {
                        topic: topic.into(),
                        partition: p,
                        offset: r.offset,
                        reason: reason.into(),
                    };
                    if r.offset < from {
                        return Err(corrupt("offsets out of order"));
                    }
                    from = r.offset + 1;
                    out.push((p, r));
                }
            }
            let high = db.transact(|tx| self.high_watermark(tx, topic, p))?;
            if from > high {
                return Err(BusError::Corrupt {
                    topic: topic.into(),
                    partition: p,
                    offset: from,
                    reason: format!("high watermark {high}, records up to {from}"),
                });
            }
        }
        Ok(out)
    }

    /// Every partition's [`Self::high_watermark`] of `topic`, in one range read (a
    /// partition never written to, or whose head does not decode, is absent).
    pub fn high_watermarks(
        &self,
        tx: &mut Transaction<'_>,
        topic: &str,
    ) -> Result<BTreeMap<u32, u64>, KvError> {
        let rows = tx.get_range(&RangeOption::prefix(&self.keys.log_heads(topic)))?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, v)| {
                let p = self.keys.log_head_partition(topic, &k)?;
                let head = i64::from_le_bytes(v.get(..8)?.try_into().ok()?);
                Some((p, head as u64))
            })
            .collect())
    }

    /// Clear the entries of `partition` of `topic` that every consumer group with a
    /// position there has passed, except the last `retention.keep` of them, and at most
    /// `retention.max_per_tx` of them in this transaction. A partition no group has a
    /// position on (the dead letters, a topic whose readers never started) is never
    /// trimmed; a group that starts later begins at the oldest entry kept. Returns how
    /// many entries were cleared.
    pub fn trim(
        &self,
        tx: &mut Transaction<'_>,
        topic: &str,
        partition: u32,
        retention: &Retention,
    ) -> Result<u64, KvError> {
        let mut low: Option<u64> = None;
        for (k, v) in tx.get_range(&RangeOption::prefix(&self.keys.positions()))? {
            if let Some((_, t, p)) = self.keys.position_of(&k) {
                if t == topic && p == partition {
                    let at = positions::decode_position(&v)?;
                    low = Some(low.map_or(at, |l| l.min(at)));
                }
            }
        }
        let Some(low) = low else {
            return Ok(0);
        };
        let upto = low.saturating_sub(retention.keep);
        let Some(first) = self.first_offset(tx, topic, partition)? else {
            return Ok(0);
        };
        if first >= upto {
            return Ok(0);
        }
        let end = upto.min(first + retention.max_per_tx.max(1));
        tx.clear_range(
            &self.keys.log_entry(topic, partition, first),
            &self.keys.log_entry(topic, partition, end),
        )?;
        Ok(end - first)
    }

    /// The offset of the oldest entry of a partition still in the log.
    pub fn first_offset(
        &self,
        tx: &mut Transaction<'_>,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, KvError> {
        let prefix = self.keys.log_partition(topic, partition);
        let first = tx.get_range(&RangeOption::prefix(&prefix).limit(1))?;
        Ok(first
            .first()
            .and_then(|(k, _)| self.keys.log_offset(topic, partition, k)))
    }

    /// Read up to `limit` records of a partition from `from` on.
    pub fn read(
        &self,
        tx: &mut Transaction<'_>,
        topic: &str,
        partition: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, BusError> {
        let begin = self.keys.log_entry(topic, partition, from);
        let (_, end) = swimlane_store::prefix_range(&self.keys.log_partition(topic, partition));
        let rows = tx.get_range(&RangeOption::new(begin, end).limit(limit))?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, v) in rows {
            let offset =
                self.keys
                    .log_offset(topic, partition, &k)
                    .ok_or_else(|| BusError::Corrupt {
                        topic: topic.into(),
                        partition,
                        offset: from,
                        reason: "log key does not decode".into(),
                    })?;
            let (key, payload) = decode_record(&v).map_err(|reason| BusError::Corrupt {
                topic: topic.into(),
                partition,
                offset,
                reason,
            })?;
            out.push(Record {
                offset,
                key,
                payload,
            });
        }
        Ok(out)
    }
}

impl Emitter for EmbeddedBus {
    fn emit_raw(&self, tx: &mut Transaction<'_>, raw: Raw<'_>) -> Result<(), KvError> {
        let p = partition_for(raw.key, self.partitions);
        let head_key = self.keys.log_head(raw.topic, p);
        let head = tx.get_counter(&head_key)? as u64;
        tx.set(
            &self.keys.log_entry(raw.topic, p, head),
            &encode_record(raw.key, raw.payload),
        )?;
        tx.set(&head_key, &((head + 1) as i64).to_le_bytes())
    }
}

/// How much of the embedded log [`EmbeddedBus::trim`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Entries kept per partition below the lowest consumer group's position (for
    /// audits, and for readers that replay a little history).
    pub keep: u64,
    /// Most entries cleared in one transaction.
    pub max_per_tx: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep: 10_000,
            max_per_tx: 5_000,
        }
    }
}

/// How an [`EmbeddedConsumer`] behaves.
#[derive(Clone)]
pub struct ConsumerOptions {
    pub group: String,
    pub topic: String,
    /// Unique per live process (e.g. `trainer-<pid>-<random>`).
    pub member: String,
    /// A dead member's partitions move after this long.
    pub lease_ttl: Duration,
    /// Longest wait between empty polls: the consumer waits for the store to change
    /// (`Db::change_watch`, rung after every commit) and polls again at the latest
    /// after this long (the only wait, on a store without a watch).
    pub poll_interval: Duration,
    pub now_ms: NowMs,
    /// Renew the member's record and its partitions' leases from a thread of its own
    /// (a [`positions::LeaseKeeper`], every third of `lease_ttl`), so a delivery that
    /// takes longer than `lease_ttl` keeps its partitions: what every worker uses.
    /// `false`: renewed only when the member polls, so a member whose handler stalls
    /// past `lease_ttl` loses its partitions (how the unit tests make a zombie).
    pub keep_leases: bool,
    /// Trim the partitions the member owns at each heartbeat ([`EmbeddedBus::trim`]),
    /// counting the entries cleared in `trimmed`; `None`: never.
    pub retention: Option<Retention>,
    pub trimmed: Option<crate::stage::CountSink>,
}

/// A member of a consumer group on the embedded log.
pub struct EmbeddedConsumer {
    db: Db,
    keys: Keys,
    bus: EmbeddedBus,
    opts: ConsumerOptions,
    /// Shared with the lease keeper, which drops a partition whose lease it finds taken.
    owned: Arc<Mutex<positions::Holdings>>,
    last_heartbeat: Option<Instant>,
    next_partition: u32,
    /// Made before the first read, so no commit after it goes unnoticed.
    watch: Option<Box<dyn swimlane_store::watch::ChangeWatch>>,
    _keeper: Option<positions::LeaseKeeper>,
}

impl EmbeddedConsumer {
    pub fn new(
        db: Db,
        keys: Keys,
        bus: EmbeddedBus,
        opts: ConsumerOptions,
    ) -> Result<Self, BusError> {
        let owned = Arc::new(Mutex::new(BTreeMap::new()));
        let keeper = if opts.keep_leases {
            Some(start_lease_keeper(
                db.clone(),
                keys.clone(),
                &opts,
                owned.clone(),
            )?)
        } else {
            None
        };
        Ok(EmbeddedConsumer {
            watch: db.change_watch(),
            db,
            keys,
            bus,
            opts,
            owned,
            last_heartbeat: None,
            next_partition: 0,
            _keeper: keeper,
        })
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, positions::Holdings> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Heartbeat, renew owned leases, and move towards the fair share.
    pub fn rebalance(&mut self) -> Result<(), BusError> {
        let now = self.opts.now_ms.now_ms();
        let ttl = self.opts.lease_ttl.as_millis() as u64;
        let partitions = self.bus.partitions;
        let (keys, opts) = (&self.keys, &self.opts);
        let owned: Vec<(u32, Fence)> = self
            .owned()
            .iter()
            .map(|(p, o)| (*p, o.fence.clone()))
            .collect();
        let (kept, released, acquired) = self.db.transact(|tx| {
            tx.set(
                &keys.member(&opts.group, &opts.topic, &opts.member),
                &(now + ttl).to_le_bytes(),
            )?;
            let mut live = 0u32;
            for (_, v) in tx.get_range(&RangeOption::prefix(
                &keys.members(&opts.group, &opts.topic),
            ))? {
                let exp = v
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                    .unwrap_or(0);
                if exp > now {
                    live += 1;
                }
            }
            let share = partitions.div_ceil(live.max(1)) as usize;
            let mut kept = Vec::new();
            for (p, f) in &owned {
                if positions::renew(tx, keys, f, &opts.member, now, ttl)? {
                    kept.push(*p);
                }
            }
            let mut released = Vec::new();
            while kept.len() > share {
                let p = kept.pop().unwrap();
                let f = &owned.iter().find(|(q, _)| *q == p).unwrap().1;
                positions::release(tx, keys, f, &opts.member)?;
                released.push(p);
            }
            let mut acquired = Vec::new();
            for p in 0..partitions {
                if kept.len() + acquired.len() >= share {
                    break;
                }
                if kept.contains(&p) || released.contains(&p) {
                    continue;
                }
                if let Some(f) = positions::acquire(
                    tx,
                    keys,
                    &opts.group,
                    &opts.topic,
                    p,
                    &opts.member,
                    now,
                    ttl,
                    false,
                )? {
                    acquired.push(f);
                }
            }
            Ok((kept, released, acquired))
        })?;
        let mut mine = self.owned();
        mine.retain(|p, _| kept.contains(p));
        for p in &released {
            mine.remove(p);
        }
        for f in acquired {
            tracing::info!(group = %f.group, topic = %f.topic, partition = f.partition, epoch = f.epoch, offset = f.offset, "partition assigned");
            mine.insert(
                f.partition,
                positions::Held {
                    cursor: f.offset,
                    fence: f,
                    buffered: (),
                },
            );
        }
        drop(mine);
        self.last_heartbeat = Some(Instant::now());
        Ok(())
    }

    /// Trim the partitions this member owns, one bounded transaction each; a failure
    /// is logged and left for the next heartbeat.
    fn trim_owned(&self) {
        let Some(retention) = self.opts.retention else {
            return;
        };
        let parts: Vec<u32> = self.owned().keys().copied().collect();
        let (bus, topic) = (&self.bus, &self.opts.topic);
        for p in parts {
            match self.db.transact(|tx| bus.trim(tx, topic, p, &retention)) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(topic = %topic, partition = p, entries = n, "log trimmed");
                    if let Some(count) = &self.opts.trimmed {
                        count(n);
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %topic, partition = p, error = %e, "trimming the log failed")
                }
            }
        }
    }

    fn heartbeat_due(&self) -> bool {
        match self.last_heartbeat {
            None => true,
            Some(t) => t.elapsed() >= self.opts.lease_ttl / 3,
        }
    }

    fn try_read(&mut self, max_records: usize) -> Result<Option<Delivery>, BusError> {
        let owned: Vec<(u32, Fence, u64)> = self
            .owned()
            .iter()
            .map(|(p, o)| (*p, o.fence.clone(), o.cursor))
            .collect();
        let parts: Vec<u32> = owned.iter().map(|(p, _, _)| *p).collect();
        if parts.is_empty() {
            return Ok(None);
        }
        let start = parts
            .iter()
            .position(|p| *p >= self.next_partition)
            .unwrap_or(0);
        // One read transaction for every owned partition: the partitions' high
        // watermarks in one range read, then the records of the first partition (in
        // turn from where the last delivery left off) that has any past its cursor. An
        // idle member's poll is one transaction and one range read.
        let (bus, topic) = (&self.bus, &self.opts.topic);
        let found = self.db.transact(|tx| {
            let heads = bus.high_watermarks(tx, topic)?;
            for i in 0..owned.len() {
                let (p, _, cursor) = &owned[(start + i) % owned.len()];
                // (A head that is absent or does not decode: read the partition.)
                if heads.get(p).is_some_and(|head| *head <= *cursor) {
                    continue;
                }
                match bus.read(tx, topic, *p, *cursor, max_records) {
                    Ok(r) if r.is_empty() => {}
                    Ok(r) => return Ok(Ok(Some(((start + i) % owned.len(), r)))),
                    Err(BusError::Store(e)) => return Err(e),
                    Err(e) => return Ok(Err(e)),
                }
            }
            Ok(Ok(None))
        })??;
        if let Some((i, records)) = found {
            let (p, o_fence, cursor) = &owned[i];
            self.next_partition = p + 1;
            let mut fence = o_fence.clone();
            fence.offset = *cursor;
            return Ok(Some(Delivery { fence, records }));
        }
        Ok(None)
    }
}

/// The embedded member's lease keeper: besides the leases, it renews the member's
/// record, so the others count it live while its stage is busy.
fn start_lease_keeper(
    db: Db,
    keys: Keys,
    opts: &ConsumerOptions,
    owned: Arc<Mutex<positions::Holdings>>,
) -> Result<positions::LeaseKeeper, BusError> {
    let mine = owned.clone();
    let held = move || {
        let mine = mine.lock().unwrap_or_else(|e| e.into_inner());
        mine.values().map(|h| h.fence.clone()).collect()
    };
    let keeper = positions::KeeperOptions {
        member: opts.member.clone(),
        lease_ttl: opts.lease_ttl,
        now_ms: opts.now_ms.clone(),
        member_key: Some(keys.member(&opts.group, &opts.topic, &opts.member)),
    };
    positions::keep_leases(db, keys, keeper, held, move |lost| {
        let mut owned = owned.lock().unwrap_or_else(|e| e.into_inner());
        for f in lost {
            positions::drop_lost(&mut owned, &f);
        }
    })
}

impl Consumer for EmbeddedConsumer {
    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Option<Delivery>, BusError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.heartbeat_due() {
                self.rebalance()?;
                self.trim_owned();
            }
            if let Some(d) = self.try_read(max.max(1))? {
                return Ok(Some(d));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            swimlane_store::watch::wait_or_sleep(
                &mut self.watch,
                self.opts.poll_interval.min(deadline - now),
            );
        }
    }

    fn committed(&mut self, fence: &Fence, next_offset: u64) {
        positions::advance(&mut self.owned(), fence, next_offset);
    }

    fn fenced(&mut self, fence: &Fence) {
        positions::drop_lost(&mut self.owned(), fence);
    }

    fn lag(&mut self) -> Result<u64, BusError> {
        let owned: Vec<(u32, u64)> = self.owned().iter().map(|(p, o)| (*p, o.cursor)).collect();
        let (bus, topic) = (&self.bus, &self.opts.topic);
        Ok(self.db.transact(|tx| {
            let mut lag = 0;
            for (p, cursor) in &owned {
                lag += bus.high_watermark(tx, topic, *p)?.saturating_sub(*cursor);
            }
            Ok(lag)
        })?)
    }

    fn owned_partitions(&self) -> Vec<u32> {
        self.owned().keys().copied().collect()
    }

    fn close(&mut self) -> Result<(), BusError> {
        let owned: Vec<Fence> = self.owned().values().map(|o| o.fence.clone()).collect();
        let (keys, opts) = (&self.keys, &self.opts);
        self.db.transact(|tx| {
            for f in &owned {
                positions::release(tx, keys, f, &opts.member)?;
            }
            tx.clear(&keys.member(&opts.group, &opts.topic, &opts.member))
        })?;
        self.owned().clear();
        Ok(())
    }
}
