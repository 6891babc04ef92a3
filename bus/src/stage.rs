//! The consume → handle → commit loop every consuming stage runs, and [`Runner`], the
//! handler every worker's stage runs in: a stage says how to decode a record, what to
//! prepare outside any transaction and what to apply inside one ([`Stage`]); the runner
//! owns the transaction, the position, the dead letters and their count.
//!
//! Contract with a [`StageHandler`]: `handle` either commits, in ONE store
//! transaction, the effects of every record of the delivery together with
//! [`crate::positions::commit`] of `delivery.next_offset()` (dead-lettering any record
//! it can never process), or commits nothing and returns an error. The loop then
//! either advances (Ok), drops the partition (fenced), or backs off and re-reads the
//! same records (any other error), so no record is skipped and none is applied twice.
//!
//! A record that can never be handled must not stall its partition: when handling fails
//! with an error retrying cannot fix ([`is_permanent`]: stored data that does not
//! decode or is missing, a value or transaction over the store's limits), the loop
//! re-reads the delivery one record at a time, so the records before the bad one are
//! handled and committed, and after [`LoopOptions::max_attempts`] failures of the same
//! record it calls [`StageHandler::give_up`]: the record goes to the dead letters with
//! the error as its reason, in one transaction with the position past it, and the
//! partition moves on. Other errors (conflicts, a store that is down) are retried for
//! as long as they last.
use std::time::Duration;

use std::sync::Arc;

use swimlane_core::keys::Keys;
use swimlane_store::{Db, KvError, Transaction};

use crate::embedded::NowMs;
use crate::positions::is_fenced;
use crate::{BusError, Consumer, Delivery, Emitter, Record};

/// A stage's processing of one delivery. See the module doc for the contract.
pub trait StageHandler {
    fn handle(&mut self, delivery: &Delivery) -> Result<(), KvError>;
    /// Give up on `delivery` (one record that failed `max_attempts` times): in ONE
    /// transaction, its records to the dead letters with `reason` and the position past
    /// it ([`dead_letter_delivery`]), and count them in the stage's dead-letter metric.
    fn give_up(&mut self, delivery: &Delivery, reason: &str) -> Result<(), KvError>;
}

/// What a record asks a stage to do.
#[derive(Debug)]
pub enum Decoded<W> {
    /// Work to prepare and apply.
    Work(W),
    /// Nothing to do (an event the stage reads past, such as a rejection at the
    /// publisher).
    Ignore,
    /// The record can never be processed: it goes to the dead letters with this reason.
    Dead(String),
}

impl<W> Decoded<W> {
    /// `record` decoded as an event on `topic`: `pick` says what the stage makes of
    /// the event, `None` for one that has no business on `topic` (a dead letter saying
    /// so); bytes that are no event are a dead letter with the decoding error.
    pub fn event(
        record: &Record,
        topic: &str,
        pick: impl FnOnce(swimlane_core::Event) -> Option<Decoded<W>>,
    ) -> Decoded<W> {
        match swimlane_core::Event::decode(&record.payload) {
            Err(e) => Decoded::Dead(e.to_string()),
            Ok(event) => {
                let kind = event.topic();
                pick(event).unwrap_or_else(|| {
                    Decoded::Dead(format!("unexpected event on {topic}: {kind}"))
                })
            }
        }
    }
}

/// What applying one piece of prepared work did, inside the delivery's transaction.
#[derive(Debug)]
pub enum Applied<O> {
    /// The effect is written; `O` is what the stage counts once the transaction commits.
    Done(O),
    /// Someone else moved on since the work was prepared (a duplicate record, a stale
    /// trigger): nothing to write.
    Stale,
    /// The record turned out to be one that can never be processed: it goes to the dead
    /// letters with this reason.
    Dead(String),
}

/// A consuming stage, as [`Runner`] runs it: decode each record, prepare each piece of
/// work outside any transaction (reads in short transactions of their own, training,
/// scoring, export), then apply it inside the one transaction that also commits the
/// delivery's position and its dead letters, re-checking there that the work is not
/// stale (FoundationDB's rule: never hold a transaction across slow work).
pub trait Stage {
    /// What one record asks for. Records asking for equal work in one delivery are
    /// prepared and applied once.
    type Work: PartialEq;
    /// What preparing one piece of work made.
    type Prepared;
    /// What applying it did, for the stage's metrics.
    type Outcome;
    /// What `record` asks for (decoding only: no store access).
    fn decode(&self, record: &Record) -> Decoded<Self::Work>;
    /// Prepare `work` outside any transaction; `None` when there is nothing to do. An
    /// error commits nothing: the runner's loop retries the delivery (or, for an error
    /// retrying cannot fix, gives up on the record after a bound).
    fn prepare(&mut self, work: &Self::Work) -> Result<Option<Self::Prepared>, KvError>;
    /// Write the effect of `prepared` in `tx`, the delivery's transaction, at `now_ms`
    /// (the runner's clock). May run again on a conflict: no side effects outside `tx`.
    fn apply(
        &self,
        tx: &mut Transaction<'_>,
        prepared: &Self::Prepared,
        now_ms: u64,
    ) -> Effect<Self::Outcome>;
    /// The delivery committed with these outcomes (metrics).
    fn committed(&mut self, outcomes: Vec<Self::Outcome>);
    /// The runner gives up on a record asking for `work`: end in `tx` (the transaction
    /// that dead-letters it) whatever the work left open. Nothing, by default.
    fn abandon(&self, tx: &mut Transaction<'_>, work: &Self::Work) -> Result<(), KvError> {
        let _ = (tx, work);
        Ok(())
    }
}

/// What [`Stage::apply`] returns: what it did, or the store's error.
pub type Effect<O> = Result<Applied<O>, KvError>;

/// Receives a count (records dead-lettered) for a metric.
pub type CountSink = Arc<dyn Fn(u64) + Send + Sync>;

/// The stop flag a blocking loop checks between deliveries: true once it should end.
pub type Stop<'a> = &'a dyn Fn() -> bool;

/// Runs a [`Stage`] as the loop's [`StageHandler`]: decodes, prepares and applies a
/// delivery's records, and commits their effects, their dead letters and the position
/// past them in one transaction; gives up on a record by dead-lettering it with the
/// position past it and the stage's [`Stage::abandon`].
pub struct Runner<S> {
    pub stage: S,
    db: Db,
    keys: Keys,
    emitter: Arc<dyn Emitter>,
    now_ms: NowMs,
    dead_letters: Option<CountSink>,
}

impl<S: Stage> Runner<S> {
    /// `stage` over `db`, emitting dead letters through `emitter`, on the wall clock.
    pub fn new(stage: S, db: Db, keys: Keys, emitter: Arc<dyn Emitter>) -> Self {
        Runner {
            stage,
            db,
            keys,
            emitter,
            now_ms: crate::embedded::system_now_ms(),
            dead_letters: None,
        }
    }
    /// Count the records dead-lettered in `sink` (the stage's metric).
    pub fn counting_dead_letters(mut self, sink: CountSink) -> Self {
        self.dead_letters = Some(sink);
        self
    }
    /// Apply at the times `now_ms` gives (tests).
    pub fn with_clock(mut self, now_ms: NowMs) -> Self {
        self.now_ms = now_ms;
        self
    }
    fn count_dead(&self, n: u64) {
        if let (Some(sink), true) = (&self.dead_letters, n > 0) {
            sink(n);
        }
    }
}

/// One record of a delivery, as the runner goes through it.
enum Step {
    Dead(String),
    Skip,
    /// The index of its (first) piece of work.
    Work(usize),
}

impl<S: Stage> StageHandler for Runner<S> {
    fn handle(&mut self, d: &Delivery) -> Result<(), KvError> {
        let mut works: Vec<S::Work> = Vec::new();
        let mut prepared: Vec<Option<S::Prepared>> = Vec::new();
        let mut steps = Vec::with_capacity(d.records.len());
        for r in &d.records {
            let step = match self.stage.decode(r) {
                Decoded::Dead(reason) => Step::Dead(reason),
                Decoded::Ignore => Step::Skip,
                Decoded::Work(w) => match works.iter().position(|x| *x == w) {
                    Some(_) => Step::Skip, // the same work twice in one delivery
                    None => {
                        prepared.push(self.stage.prepare(&w)?);
                        works.push(w);
                        Step::Work(works.len() - 1)
                    }
                },
            };
            steps.push(step);
        }
        let (stage, emitter, keys) = (&self.stage, self.emitter.as_ref(), &self.keys);
        let now = self.now_ms.now_ms();
        let (outcomes, dead) = self.db.transact(|tx| {
            crate::positions::commit(tx, keys, &d.fence, d.next_offset())?;
            let (mut outcomes, mut dead) = (Vec::new(), 0u64);
            for (r, step) in d.records.iter().zip(&steps) {
                let reason: std::borrow::Cow<'_, str> = match step {
                    Step::Skip => continue,
                    Step::Dead(reason) => reason.into(),
                    Step::Work(i) => {
                        let Some(p) = &prepared[*i] else { continue };
                        match stage.apply(tx, p, now)? {
                            Applied::Done(o) => {
                                outcomes.push(o);
                                continue;
                            }
                            Applied::Stale => continue,
                            Applied::Dead(reason) => reason.into(),
                        }
                    }
                };
                crate::dead_letter(emitter, tx, &d.fence.topic, &r.key, &r.payload, &reason)?;
                dead += 1;
            }
            Ok((outcomes, dead))
        })?;
        self.count_dead(dead);
        self.stage.committed(outcomes);
        Ok(())
    }

    fn give_up(&mut self, d: &Delivery, reason: &str) -> Result<(), KvError> {
        let works: Vec<S::Work> = d
            .records
            .iter()
            .filter_map(|r| match self.stage.decode(r) {
                Decoded::Work(w) => Some(w),
                _ => None,
            })
            .collect();
        let stage = &self.stage;
        let mut abandon = |tx: &mut Transaction<'_>| {
            for w in &works {
                stage.abandon(tx, w)?;
            }
            Ok(())
        };
        let emitter = self.emitter.as_ref();
        let n = dead_letter_delivery_and(&self.db, &self.keys, emitter, d, reason, &mut abandon)?;
        self.count_dead(n);
        Ok(())
    }
}

/// Whether retrying the same records can never make `e` go away: the loop gives up on
/// a record after [`LoopOptions::max_attempts`] such failures.
pub fn is_permanent(e: &KvError) -> bool {
    matches!(
        e,
        KvError::Corrupt { .. }
            | KvError::ValueTooLarge { .. }
            | KvError::KeyTooLarge { .. }
            | KvError::TransactionTooLarge { .. }
            | KvError::InvalidArgument(_)
    )
}

/// Every record of `d` to the dead letters with `reason`, and the position past them,
/// in one transaction: what [`StageHandler::give_up`] commits. Returns how many records
/// went (for the stage's dead-letter metric).
pub fn dead_letter_delivery(
    db: &Db,
    keys: &Keys,
    emitter: &dyn Emitter,
    d: &Delivery,
    reason: &str,
) -> Result<u64, KvError> {
    dead_letter_delivery_and(db, keys, emitter, d, reason, &mut |_| Ok(()))
}

/// [`dead_letter_delivery`], with `also` (what the stage undoes or ends because of the
/// records it gives up on) in the same transaction.
pub fn dead_letter_delivery_and(
    db: &Db,
    keys: &Keys,
    emitter: &dyn Emitter,
    d: &Delivery,
    reason: &str,
    also: &mut dyn FnMut(&mut swimlane_store::Transaction<'_>) -> Result<(), KvError>,
) -> Result<u64, KvError> {
    db.transact(|tx| {
        crate::positions::commit(tx, keys, &d.fence, d.next_offset())?;
        for r in &d.records {
            crate::dead_letter(emitter, tx, &d.fence.topic, &r.key, &r.payload, reason)?;
        }
        also(tx)
    })?;
    Ok(d.records.len() as u64)
}

/// Receives the consumer's lag (records waiting on its partitions), at most once a
/// second.
pub type LagSink = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// How the loop polls and backs off.
#[derive(Clone)]
pub struct LoopOptions {
    pub max_records: usize,
    pub poll_timeout: Duration,
    pub max_backoff: Duration,
    /// Failures of one record with a permanent error before it is given up.
    pub max_attempts: u32,
    /// Where to report lag (a metrics gauge), if anywhere.
    pub lag: Option<LagSink>,
}

impl std::fmt::Debug for LoopOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopOptions")
            .field("max_records", &self.max_records)
            .field("poll_timeout", &self.poll_timeout)
            .field("max_backoff", &self.max_backoff)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            max_records: 8,
            poll_timeout: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_attempts: 5,
            lag: None,
        }
    }
}

/// Run until `stop()` is true, then leave the group. Returns an error only when the
/// consumer itself fails to close.
pub fn run_stage(
    consumer: &mut dyn Consumer,
    handler: &mut dyn StageHandler,
    opts: &LoopOptions,
    stop: Stop<'_>,
) -> Result<(), BusError> {
    let mut backoff = Duration::from_millis(50);
    let mut lag_reported: Option<std::time::Instant> = None;
    // After a permanent error: read one record at a time up to where the failing
    // delivery ended, counting the failures of the record at the front.
    let mut narrowing: Option<Narrowing> = None;
    while !stop() {
        if let Some(sink) = &opts.lag {
            if lag_reported.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                if let Ok(l) = consumer.lag() {
                    sink(l);
                }
                lag_reported = Some(std::time::Instant::now());
            }
        }
        let max_records = if narrowing.is_some() {
            1
        } else {
            opts.max_records
        };
        let delivery = match consumer.poll(max_records, opts.poll_timeout) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "poll failed; backing off");
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(opts.max_backoff);
                continue;
            }
        };
        let span = tracing::info_span!("delivery", topic = %delivery.fence.topic, partition = delivery.fence.partition, offset = delivery.fence.offset, records = delivery.records.len());
        let _g = span.enter();
        match handler.handle(&delivery) {
            Ok(()) => {
                consumer.committed(&delivery.fence, delivery.next_offset());
                backoff = Duration::from_millis(50);
                if narrowing.as_ref().is_some_and(|n| n.passed_by(&delivery)) {
                    narrowing = None;
                }
            }
            Err(e) if is_fenced(&e) => {
                tracing::warn!(error = %e, "delivery fenced; partition dropped");
                consumer.fenced(&delivery.fence);
            }
            Err(e) if is_permanent(&e) => {
                let n = Narrowing::after_failure(narrowing.take(), &delivery);
                if delivery.records.len() == 1 && n.attempts >= opts.max_attempts {
                    let reason = format!("gave up after {} attempts: {e}", n.attempts);
                    tracing::error!(error = %e, attempts = n.attempts, "a record that cannot be handled goes to the dead letters");
                    match handler.give_up(&delivery, &reason) {
                        Ok(()) => {
                            consumer.committed(&delivery.fence, delivery.next_offset());
                            backoff = Duration::from_millis(50);
                            narrowing = (!n.passed_by(&delivery)).then_some(n);
                            continue;
                        }
                        Err(e2) if is_fenced(&e2) => {
                            tracing::warn!(error = %e2, "delivery fenced; partition dropped");
                            consumer.fenced(&delivery.fence);
                            continue;
                        }
                        Err(e2) => {
                            tracing::error!(error = %e2, "giving up failed; will retry");
                        }
                    }
                } else {
                    tracing::error!(error = %e, attempts = n.attempts, "handling failed with an error retrying cannot fix; nothing committed, will retry record by record");
                }
                narrowing = Some(n);
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(opts.max_backoff);
            }
            Err(e) => {
                tracing::error!(error = %e, "handling failed; nothing committed, will retry");
                // The cursor did not move: the next poll returns the same records.
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
    }
    consumer.close()
}

/// Where the loop reads one record at a time after a permanent error.
#[derive(Clone, Debug)]
struct Narrowing {
    topic: String,
    partition: u32,
    /// Read singly until here (the failing delivery's end).
    until: u64,
    /// The record at the front and its failures so far.
    front: u64,
    attempts: u32,
}

impl Narrowing {
    fn after_failure(prev: Option<Narrowing>, d: &Delivery) -> Narrowing {
        let front = d
            .records
            .first()
            .map(|r| r.offset)
            .unwrap_or(d.fence.offset);
        match prev {
            Some(p) if p.topic == d.fence.topic && p.partition == d.fence.partition => Narrowing {
                attempts: if p.front == front { p.attempts + 1 } else { 1 },
                until: p.until.max(d.next_offset()),
                front,
                ..p
            },
            _ => Narrowing {
                topic: d.fence.topic.clone(),
                partition: d.fence.partition,
                until: d.next_offset(),
                front,
                attempts: 1,
            },
        }
    }

    /// Whether `d` (committed) reached the end of the narrowed range.
    fn passed_by(&self, d: &Delivery) -> bool {
        d.fence.topic == self.topic
            && d.fence.partition == self.partition
            && d.next_offset() >= self.until
    }
}

fn sleep_unless_stopped(d: Duration, stop: Stop<'_>) {
    let step = Duration::from_millis(20);
    let mut left = d;
    while !left.is_zero() && !stop() {
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
}
