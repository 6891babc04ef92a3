//! The Kafka bus (feature `kafka`): a transactional outbox in the store, a relay that
//! moves it into Kafka, and consumers whose positions stay in the store.
//!
//! ```text
//!  stage tx ──(effect + outbox entry, one commit)──▶ store
//!                                                     │ relay: read in seq order,
//!                                                     ▼ produce, await acks, delete
//!  Kafka topic/partition = partition_for(user, n) ◀───┘
//!        │ group member (KafkaConsumer): on assignment, acquire(force) + seek to the
//!        ▼ position kept in the store; commit = effect + positions::commit, one tx
//! ```
//!
//! Invariants:
//! - [`KafkaEmitter`] only writes `("outbox", seq)` in the caller's transaction, so an
//!   event exists if and only if the effect it announces committed.
//! - The relay deletes an outbox entry only after Kafka acknowledged it: delivery into
//!   Kafka is at least once (a relay that dies between the ack and the delete, or a
//!   relay lease that changes hands, produces again). Consumers are idempotent: every
//!   stage checks its records.
//! - One relay at a time: it holds the lease `("lease", "swimlane-relay", "outbox", 0)`
//!   (the same epoch-fenced leases as consumer groups), so entries go out in seq order
//!   and one user's events keep their order. Every emitting process runs a relay; the
//!   others stand by and take over when the holder's lease expires.
//! - Every relayed record carries the header [`OUTBOX_ENTRY_HEADER`], naming the outbox
//!   entry it came from, so a reader can tell a relay's re-send from a second effect.
//! - Records go to an explicit partition, `partition_for(user, partitions of the
//!   topic)`, the same function as the embedded bus, with an idempotent producer, so
//!   one user's events stay in order within their partition.
//! - A consumer's position is the store's, never Kafka's committed offset: every
//!   assignment bumps the partition's epoch (`positions::acquire(force)`) and starts
//!   fetching at the stored position; a revoked partition's fence is dropped, and a
//!   zombie's commit fails with `Fenced` once the new owner has acquired it. Kafka
//!   offsets are committed only for lag monitoring.
//!
//! Outbox sequence numbers: `seq = max(last + 1, now_ms << 22 | nonce << 12)` per
//! process, where `nonce` is 10 bits fixed per process. No shared counter is read, so
//! emitting transactions of different stages and users never conflict with each other
//! (a counter read in every emitting transaction would serialise the whole fleet). A
//! process's sequence strictly increases, so events emitted in order by one process
//! (including several in one transaction) are relayed in that order, and an event
//! caused by another (its transaction read the other's effect, so it began after that
//! commit) gets a later timestamp, up to clock skew between machines. The entry is read
//! before it is written: a collision with another process's seq in the same
//! millisecond moves on to the next seq, and a concurrent writer of the same seq makes
//! one transaction conflict and retry.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use swimlane_core::keys::Keys;
use swimlane_store::{Db, KvError, RangeOption, Transaction};

use crate::embedded::NowMs;
use crate::positions::{self, Fence};
use crate::{partition_for, BusError, Consumer, Delivery, Emitter, Record};

/// The Kafka header every relayed record carries: the hex of its outbox entry's key.
/// A record produced twice (delivery into Kafka is at least once) carries the same
/// value twice; two effects never share one.
pub const OUTBOX_ENTRY_HEADER: &str = "swimlane-outbox-entry";

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
/// The relay's lease: group, topic, partition.
pub const RELAY_GROUP: &str = "swimlane-relay";
const RELAY_TOPIC: &str = "outbox";

fn kafka_err(what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Kafka(format!("{what}: {e}"))
}

// ---------------------------------------------------------------- outbox entries

pub use crate::wire::OutboxEntry;
use crate::wire::{decode_outbox_entry as decode_entry, encode_outbox_entry as encode_entry};

/// Read up to `limit` outbox entries in seq order.
pub fn read_outbox(
    tx: &mut Transaction<'_>,
    keys: &Keys,
    limit: usize,
) -> Result<Vec<(Vec<u8>, Result<OutboxEntry, String>)>, KvError> {
    let rows = tx.get_range(&RangeOption::prefix(&keys.outbox_prefix()).limit(limit))?;
    Ok(rows
        .into_iter()
        .map(|(k, v)| (k, decode_entry(&v)))
        .collect())
}

// ---------------------------------------------------------------- emitter

/// The Kafka bus's emitter: writes events to the outbox in the caller's transaction.
/// Cheap to clone (clones share the sequence).
#[derive(Clone)]
pub struct KafkaEmitter {
    keys: Keys,
    now_ms: NowMs,
    last: Arc<AtomicU64>,
    nonce: u64,
}

impl std::fmt::Debug for KafkaEmitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaEmitter")
            .field("nonce", &self.nonce)
            .finish()
    }
}

impl KafkaEmitter {
    /// An emitter on the wall clock with a per-process nonce.
    pub fn new(keys: Keys) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
        Self::with_clock(
            keys,
            crate::embedded::system_now_ms(),
            (std::process::id() as u64).wrapping_mul(2654435761) ^ nanos,
        )
    }
    /// An emitter with an injected clock and nonce (tests).
    pub fn with_clock(keys: Keys, now_ms: NowMs, nonce: u64) -> Self {
        KafkaEmitter {
            keys,
            now_ms,
            last: Arc::new(AtomicU64::new(0)),
            nonce: nonce & 0x3ff,
        }
    }

    fn next_seq(&self) -> u64 {
        let candidate = ((self.now_ms)() << 22) | (self.nonce << 12);
        let prev = self
            .last
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                Some(candidate.max(l + 1))
            })
            .expect("closure always returns Some");
        candidate.max(prev + 1)
    }
}

impl Emitter for KafkaEmitter {
    fn emit_raw(
        &self,
        tx: &mut Transaction<'_>,
        topic: &str,
        key: &str,
        payload: &[u8],
    ) -> Result<(), KvError> {
        let entry = encode_entry(topic, key, payload);
        loop {
            let k = self.keys.outbox(self.next_seq());
            // The read puts the seq in the read set: a concurrent writer of the same
            // seq makes one of the two transactions conflict.
            if tx.get(&k)?.is_none() {
                return tx.set(&k, &entry);
            }
        }
    }
}

// ---------------------------------------------------------------- relay

#[derive(Default)]
struct DeliveryCounts {
    ok: AtomicUsize,
    failed: AtomicUsize,
    last_error: Mutex<Option<String>>,
}

/// The relay producer's context: counts acknowledgements.
#[derive(Default)]
pub struct RelayContext {
    counts: DeliveryCounts,
}

impl ClientContext for RelayContext {}

impl ProducerContext for RelayContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.counts.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err((e, _)) => {
                self.counts.failed.fetch_add(1, Ordering::SeqCst);
                *self.counts.last_error.lock().unwrap() = Some(e.to_string());
            }
        }
    }
}

/// The relay's idempotent producer.
pub type RelayProducer = BaseProducer<RelayContext>;

/// Base client settings for `bootstrap` (`host:port`).
fn base_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("socket.keepalive.enable", "true");
    c
}

/// An idempotent producer for the relay.
pub fn relay_producer(bootstrap: &str) -> Result<RelayProducer, BusError> {
    base_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "30000")
        .create_with_context(RelayContext::default())
        .map_err(|e| kafka_err("creating the relay producer", e))
}

/// How the relay behaves.
#[derive(Clone)]
pub struct RelayOptions {
    /// Unique per live process.
    pub member: String,
    /// Entries per round.
    pub batch: usize,
    /// Sleep when the outbox is empty.
    pub idle: Duration,
    /// A dead relay's lease is taken after this long.
    pub lease_ttl: Duration,
    /// Longest wait for Kafka's acknowledgements of one round.
    pub ack_timeout: Duration,
    /// Prefix of every Kafka topic name ([`kafka_name`]).
    pub topic_prefix: String,
    pub now_ms: NowMs,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            member: crate::member_id("relay"),
            batch: 256,
            idle: Duration::from_millis(10),
            lease_ttl: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            topic_prefix: String::new(),
            now_ms: crate::embedded::system_now_ms(),
        }
    }
}

/// Moves committed outbox entries into Kafka. See the module doc.
pub struct Relay {
    db: Db,
    keys: Keys,
    producer: RelayProducer,
    opts: RelayOptions,
    fence: Option<Fence>,
    renewed: Option<Instant>,
    partitions: HashMap<String, u32>,
}

impl Relay {
    pub fn new(db: Db, keys: Keys, producer: RelayProducer, opts: RelayOptions) -> Self {
        Relay {
            db,
            keys,
            producer,
            opts,
            fence: None,
            renewed: None,
            partitions: HashMap::new(),
        }
    }

    /// Whether this relay holds the relay lease (after its last round).
    pub fn is_leader(&self) -> bool {
        self.fence.is_some()
    }

    fn partitions_of(&mut self, topic: &str) -> Result<u32, BusError> {
        if let Some(n) = self.partitions.get(topic) {
            return Ok(*n);
        }
        let md = self
            .producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| kafka_err(&format!("metadata of {topic}"), e))?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().len() as u32)
            .unwrap_or(0);
        if n == 0 {
            return Err(BusError::Kafka(format!(
                "topic {topic} does not exist; create it first (`swimlane admin create-topics`)"
            )));
        }
        self.partitions.insert(topic.to_string(), n);
        Ok(n)
    }

    /// Hold (or take) the relay lease; renews at a third of its ttl.
    fn lead(&mut self) -> Result<bool, BusError> {
        let now = (self.opts.now_ms)();
        let ttl = self.opts.lease_ttl.as_millis() as u64;
        if self.fence.is_some()
            && self
                .renewed
                .is_some_and(|t| t.elapsed() < self.opts.lease_ttl / 3)
        {
            return Ok(true);
        }
        let (keys, member) = (&self.keys, &self.opts.member);
        let fence = self.fence.clone();
        let got = self.db.transact(|tx| match &fence {
            Some(f) if positions::renew(tx, keys, f, member, now, ttl)? => Ok(Some(f.clone())),
            _ => positions::acquire(
                tx,
                keys,
                RELAY_GROUP,
                RELAY_TOPIC,
                0,
                member,
                now,
                ttl,
                false,
            ),
        })?;
        if got.is_some() != self.fence.is_some() {
            tracing::info!(member = %self.opts.member, leader = got.is_some(), "outbox relay lease changed");
        }
        self.fence = got;
        self.renewed = Some(Instant::now());
        Ok(self.fence.is_some())
    }

    /// One round: if leading, relay up to `batch` entries. Returns how many were
    /// relayed (and deleted).
    pub fn round(&mut self) -> Result<usize, BusError> {
        if !self.lead()? {
            return Ok(0);
        }
        let (keys, batch) = (&self.keys, self.opts.batch);
        let entries = self.db.transact(|tx| read_outbox(tx, keys, batch))?;
        if entries.is_empty() {
            return Ok(0);
        }
        let ctx = self.producer.context().clone();
        let counts = &ctx.counts;
        counts.ok.store(0, Ordering::SeqCst);
        counts.failed.store(0, Ordering::SeqCst);
        let mut sent = 0usize;
        let mut done = Vec::with_capacity(entries.len());
        for (k, e) in &entries {
            let e = match e {
                Ok(e) => e,
                Err(reason) => {
                    // Nothing can ever relay it; keep the rest moving.
                    tracing::error!(reason, "dropping an undecodable outbox entry");
                    done.push(k.clone());
                    continue;
                }
            };
            let topic = kafka_name(&self.opts.topic_prefix, &e.topic);
            let p = partition_for(&e.key, self.partitions_of(&topic)?);
            let entry_id = hex_of(k);
            let mut record = BaseRecord::to(&topic)
                .key(&e.key)
                .payload(&e.payload)
                .partition(p as i32)
                .headers(OwnedHeaders::new().insert(Header {
                    key: OUTBOX_ENTRY_HEADER,
                    value: Some(entry_id.as_bytes()),
                }));
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((err, _)) => return Err(kafka_err("producing", err)),
                }
            }
            sent += 1;
            done.push(k.clone());
        }
        let deadline = Instant::now() + self.opts.ack_timeout;
        while counts.ok.load(Ordering::SeqCst) + counts.failed.load(Ordering::SeqCst) < sent {
            if Instant::now() >= deadline {
                return Err(BusError::Kafka(format!(
                    "{} of {sent} relayed records unacknowledged after {:?}",
                    sent - counts.ok.load(Ordering::SeqCst),
                    self.opts.ack_timeout
                )));
            }
            self.producer.poll(Duration::from_millis(5));
        }
        if counts.failed.load(Ordering::SeqCst) > 0 {
            return Err(BusError::Kafka(format!(
                "{} of {sent} relayed records failed: {}",
                counts.failed.load(Ordering::SeqCst),
                counts
                    .last_error
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_default()
            )));
        }
        self.db.transact(|tx| {
            for k in &done {
                tx.clear(k)?;
            }
            Ok(())
        })?;
        Ok(done.len())
    }

    /// Relay until `stop()`; then one last round, if the previous one succeeded, so a
    /// draining process leaves little behind (another process's relay, or the next
    /// start, relays the rest).
    pub fn run(&mut self, stop: &dyn Fn() -> bool) {
        let mut backoff = Duration::from_millis(50);
        let mut healthy = false;
        while !stop() {
            match self.round() {
                Ok(n) => {
                    healthy = true;
                    backoff = Duration::from_millis(50);
                    if n == 0 {
                        std::thread::sleep(self.opts.idle);
                    }
                }
                Err(e) => {
                    healthy = false;
                    tracing::warn!(error = %e, "outbox relay round failed; backing off");
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !stop() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if healthy {
            if let Err(e) = self.round() {
                tracing::warn!(error = %e, "last outbox relay round failed");
            }
        }
        if let Some(f) = self.fence.take() {
            let (keys, member) = (&self.keys, &self.opts.member);
            let _ = self
                .db
                .transact(|tx| positions::release(tx, keys, &f, member));
        }
    }
}

/// Relay `db`'s outbox into Kafka through `producer` until `stop()`, with default
/// options.
pub fn run_relay(db: Db, keys: Keys, producer: RelayProducer, stop: &dyn Fn() -> bool) {
    Relay::new(db, keys, producer, RelayOptions::default()).run(stop)
}

// ---------------------------------------------------------------- topics

/// The Kafka name of a topic or consumer group: `prefix` + `name`. A prefix lets
/// several deployments (or tests) share one Kafka cluster; the store always uses the
/// unprefixed names.
pub fn kafka_name(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

/// Create `topics` with `partitions` partitions each, unless they exist. A topic that
/// exists with another partition count is an error (the partitioner depends on it).
pub fn create_topics(
    bootstrap: &str,
    topics: &[&str],
    partitions: u32,
    replication: i32,
) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> = base_config(bootstrap)
        .create()
        .map_err(|e| kafka_err("creating the admin client", e))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions as i32, TopicReplication::Fixed(replication)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics(&new, &opts))
        .map_err(|e| kafka_err("creating topics", e))?;
    for r in results {
        match r {
            Ok(t) => tracing::info!(topic = %t, partitions, "topic created"),
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %t, "topic exists")
            }
            Err((t, code)) => {
                return Err(BusError::Kafka(format!("creating topic {t}: {code}")));
            }
        }
    }
    for t in topics {
        let n = topic_partitions(&admin, t)?;
        if n != partitions {
            return Err(BusError::Kafka(format!(
                "topic {t} has {n} partitions, expected {partitions}"
            )));
        }
    }
    Ok(())
}

fn topic_partitions<C: ClientContext>(
    admin: &AdminClient<C>,
    topic: &str,
) -> Result<u32, BusError> {
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| kafka_err(&format!("metadata of {topic}"), e))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len() as u32)
        .unwrap_or(0))
}

// ---------------------------------------------------------------- consumer

/// How a [`KafkaConsumer`] behaves.
#[derive(Clone)]
pub struct KafkaConsumerOptions {
    pub bootstrap: String,
    pub group: String,
    pub topic: String,
    /// Unique per live process; the store lease's owner.
    pub member: String,
    /// Stored with the lease (Kafka's coordinator decides ownership; the lease only
    /// carries the epoch).
    pub lease_ttl: Duration,
    /// Kafka's `session.timeout.ms`.
    pub session_timeout: Duration,
    pub now_ms: NowMs,
    /// Prefix of the Kafka topic and group names ([`kafka_name`]); the store keeps
    /// positions under the unprefixed names.
    pub topic_prefix: String,
    /// Extra librdkafka settings (tests).
    pub extra: Vec<(String, String)>,
}

impl KafkaConsumerOptions {
    pub fn new(bootstrap: &str, group: &str, topic: &str) -> Self {
        KafkaConsumerOptions {
            bootstrap: bootstrap.into(),
            group: group.into(),
            topic: topic.into(),
            member: crate::member_id(group),
            lease_ttl: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
            now_ms: crate::embedded::system_now_ms(),
            topic_prefix: String::new(),
            extra: Vec::new(),
        }
    }

    /// The topic's name in Kafka.
    pub fn kafka_topic(&self) -> String {
        kafka_name(&self.topic_prefix, &self.topic)
    }

    /// The group's id in Kafka.
    pub fn kafka_group(&self) -> String {
        kafka_name(&self.topic_prefix, &self.group)
    }
}

struct Owned {
    fence: Fence,
    /// Next offset to deliver: the stored position, moved by `committed`.
    cursor: u64,
    /// Fetched records from `cursor` on, not yet committed.
    buffered: VecDeque<Record>,
}

#[derive(Default)]
struct OwnedState {
    owned: BTreeMap<u32, Owned>,
    /// Set when a rebalance callback could not reach the store.
    error: Option<String>,
}

impl OwnedState {
    /// Forget the partition of `fence` if it is still held under that fence's epoch: a
    /// newer owner has it (found by the lease keeper, or by a fenced commit).
    fn drop_lost(&mut self, fence: &Fence) {
        if self
            .owned
            .get(&fence.partition)
            .is_some_and(|o| o.fence.epoch == fence.epoch)
        {
            tracing::warn!(
                partition = fence.partition,
                epoch = fence.epoch,
                "partition lost to a newer owner"
            );
            self.owned.remove(&fence.partition);
        }
    }
}

/// The consumer's context: takes fences on assignment, drops them on revocation.
pub struct FencingContext {
    db: Db,
    keys: Keys,
    opts: KafkaConsumerOptions,
    state: Arc<Mutex<OwnedState>>,
}

/// Renews the store leases of the partitions this consumer owns, every third of their
/// time to live, on a [`positions::LeaseKeeper`] thread for as long as the consumer
/// lives. So a lease runs out only when its owner process is gone (or cannot reach the
/// store), which is what the orphan watchdog ([`KafkaConsumer::poll`]) looks for.
fn start_lease_keeper(
    db: Db,
    keys: Keys,
    opts: KafkaConsumerOptions,
    state: Arc<Mutex<OwnedState>>,
) -> Result<positions::LeaseKeeper, BusError> {
    positions::LeaseKeeper::start("lease-keeper", opts.lease_ttl / 3, move || {
        let fences: Vec<Fence> = state
            .lock()
            .unwrap()
            .owned
            .values()
            .map(|o| o.fence.clone())
            .collect();
        if fences.is_empty() {
            return;
        }
        let now = (opts.now_ms)();
        let ttl = opts.lease_ttl.as_millis() as u64;
        match db.transact(|tx| positions::renew_all(tx, &keys, &fences, &opts.member, now, ttl)) {
            Ok(lost) => {
                let mut st = state.lock().unwrap();
                for f in lost {
                    st.drop_lost(&f);
                }
            }
            Err(e) => tracing::warn!(error = %e, "renewing partition leases failed"),
        }
    })
}

impl ClientContext for FencingContext {}

impl ConsumerContext for FencingContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let parts: Vec<u32> = tpl
                    .elements()
                    .iter()
                    .filter(|e| e.topic() == self.opts.kafka_topic())
                    .map(|e| e.partition() as u32)
                    .collect();
                let now = (self.opts.now_ms)();
                let ttl = self.opts.lease_ttl.as_millis() as u64;
                let (keys, o) = (&self.keys, &self.opts);
                let fences = self.db.transact(|tx| {
                    let mut out = Vec::new();
                    for p in &parts {
                        if let Some(f) = positions::acquire(
                            tx, keys, &o.group, &o.topic, *p, &o.member, now, ttl, true,
                        )? {
                            out.push(f);
                        }
                    }
                    Ok(out)
                });
                let mut st = self.state.lock().unwrap();
                let mut assign = TopicPartitionList::new();
                match fences {
                    Ok(fences) => {
                        for f in fences {
                            tracing::info!(group = %f.group, topic = %f.topic, partition = f.partition, epoch = f.epoch, offset = f.offset, "partition assigned; seeking to the stored position");
                            let _ = assign.add_partition_offset(
                                &self.opts.kafka_topic(),
                                f.partition as i32,
                                Offset::Offset(f.offset as i64),
                            );
                            st.owned.insert(
                                f.partition,
                                Owned {
                                    cursor: f.offset,
                                    fence: f,
                                    buffered: VecDeque::new(),
                                },
                            );
                        }
                    }
                    Err(e) => {
                        // Take nothing: no fence, no fetching. The error surfaces from
                        // poll, and the stage loop backs off; leaving the group makes
                        // the coordinator hand the partitions to someone else.
                        tracing::error!(error = %e, "could not fence assigned partitions");
                        st.error = Some(e.to_string());
                    }
                }
                drop(st);
                if let Err(e) = consumer.assign(&assign) {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut st = self.state.lock().unwrap();
                for e in tpl.elements() {
                    if let Some(o) = st.owned.remove(&(e.partition() as u32)) {
                        tracing::info!(topic = %o.fence.topic, partition = o.fence.partition, epoch = o.fence.epoch, "partition revoked; fence dropped");
                    }
                }
                drop(st);
                let _ = consumer.unassign();
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                self.state.lock().unwrap().owned.clear();
                let _ = consumer.unassign();
            }
        }
    }
}

/// A member of a Kafka consumer group on one topic, positions kept in the store.
///
/// Orphan watchdog: while it owns partitions, a member also checks, every third of
/// the lease time to live, the leases of the topic's other partitions. A partition
/// whose lease has run out (its owner process is gone: live owners' leases are
/// renewed by its lease keeper thread) and stays out for a whole time to live, although
/// the coordinator should long since have given it to a live member, makes the
/// member leave and rejoin the group, so that the coordinator assigns every partition
/// anew. (tansu 0.6.0 drops a member that stops heartbeating but keeps the group's
/// generation and old assignment, so without this its partitions would wait for the
/// next member to join; with a Kafka broker the watchdog does not fire.)
pub struct KafkaConsumer {
    consumer: BaseConsumer<FencingContext>,
    next_partition: u32,
    commit_kafka_offsets: bool,
    _keeper: positions::LeaseKeeper,
    watched: Option<Instant>,
    /// Partitions of the topic (from Kafka's metadata, once known).
    partitions: Option<u32>,
    /// Partitions seen with a run-out lease, since when.
    orphaned_since: BTreeMap<u32, Instant>,
}

impl KafkaConsumer {
    /// Join `opts.group` on `opts.topic`.
    pub fn new(db: Db, keys: Keys, opts: KafkaConsumerOptions) -> Result<Self, BusError> {
        let mut c = base_config(&opts.bootstrap);
        c.set("group.id", opts.kafka_group())
            // tansu answers a waiting fetch only when this runs out (shared/facts.md);
            // a real Kafka broker answers as soon as data arrives.
            .set("fetch.wait.max.ms", "10")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Only used when no position is given, which never happens: every
            // assignment carries the stored position.
            .set("auto.offset.reset", "earliest")
            .set(
                "session.timeout.ms",
                opts.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (opts.session_timeout.as_millis() / 5).max(100).to_string(),
            )
            .set("partition.assignment.strategy", "range");
        for (k, v) in &opts.extra {
            c.set(k, v);
        }
        let topic = opts.kafka_topic();
        let state = Arc::new(Mutex::new(OwnedState::default()));
        let keeper = start_lease_keeper(db.clone(), keys.clone(), opts.clone(), state.clone())?;
        let ctx = FencingContext {
            db,
            keys,
            opts,
            state,
        };
        let consumer: BaseConsumer<FencingContext> = c
            .create_with_context(ctx)
            .map_err(|e| kafka_err("creating the consumer", e))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| kafka_err(&format!("subscribing to {topic}"), e))?;
        Ok(KafkaConsumer {
            consumer,
            next_partition: 0,
            commit_kafka_offsets: true,
            _keeper: keeper,
            watched: None,
            partitions: None,
            orphaned_since: BTreeMap::new(),
        })
    }

    /// Leave the group: unsubscribe, serve the revocation (for up to half a second),
    /// and drop every fence.
    fn leave_group(&mut self) {
        self.consumer.unsubscribe();
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            let _ = self.consumer.poll(Duration::from_millis(50));
            if self
                .consumer
                .context()
                .state
                .lock()
                .unwrap()
                .owned
                .is_empty()
            {
                break;
            }
        }
        self.consumer.context().state.lock().unwrap().owned.clear();
    }

    /// The orphan watchdog (see the type's doc); returns whether it made the member
    /// rejoin the group.
    fn watch_orphans(&mut self) -> Result<bool, BusError> {
        let ctx = self.consumer.context();
        let ttl = ctx.opts.lease_ttl;
        if self.watched.is_some_and(|t| t.elapsed() < ttl / 3) {
            return Ok(false);
        }
        self.watched = Some(Instant::now());
        let mine: Vec<u32> = ctx.state.lock().unwrap().owned.keys().copied().collect();
        if mine.is_empty() {
            // Not (yet) a member with work: the group may be forming.
            self.orphaned_since.clear();
            return Ok(false);
        }
        let topic = ctx.opts.kafka_topic();
        let n = match self.partitions {
            Some(n) => n,
            None => {
                let md = self
                    .consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .map_err(|e| kafka_err(&format!("metadata of {topic}"), e))?;
                let n = md
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| t.partitions().len() as u32)
                    .unwrap_or(0);
                if n == 0 {
                    return Ok(false);
                }
                self.partitions = Some(n);
                n
            }
        };
        let now = (ctx.opts.now_ms)();
        let (keys, o) = (&ctx.keys, &ctx.opts);
        let expired: Vec<u32> = ctx.db.transact(|tx| {
            let mut out = Vec::new();
            for p in (0..n).filter(|p| !mine.contains(p)) {
                if positions::owner(tx, keys, &o.group, &o.topic, p)?
                    .is_some_and(|w| w.expires_ms <= now)
                {
                    out.push(p);
                }
            }
            Ok(out)
        })?;
        self.orphaned_since.retain(|p, _| expired.contains(p));
        for p in &expired {
            self.orphaned_since.entry(*p).or_insert_with(Instant::now);
        }
        let orphans: Vec<u32> = self
            .orphaned_since
            .iter()
            .filter(|(_, t)| t.elapsed() >= ttl)
            .map(|(p, _)| *p)
            .collect();
        if orphans.is_empty() {
            return Ok(false);
        }
        tracing::warn!(?orphans, "partitions without a live owner for a whole lease time to live; rejoining the group so the coordinator assigns them anew");
        self.orphaned_since.clear();
        self.leave_group();
        self.consumer
            .subscribe(&[&topic])
            .map_err(|e| kafka_err(&format!("subscribing to {topic}"), e))?;
        Ok(true)
    }

    /// Whether to also commit Kafka offsets after store commits (lag monitoring only).
    pub fn set_commit_kafka_offsets(&mut self, on: bool) {
        self.commit_kafka_offsets = on;
    }

    /// Commit `offset` as the group's Kafka offset of `partition`, synchronously. Kafka
    /// offsets only feed lag monitoring; this consumer never reads them (operators,
    /// tests).
    pub fn commit_kafka_offset(&self, partition: u32, offset: u64) -> Result<(), BusError> {
        let topic = &self.consumer.context().opts.kafka_topic();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64))
            .map_err(|e| kafka_err("offset list", e))?;
        self.consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
            kafka_err(
                &format!("committing the Kafka offset of {topic}/{partition}"),
                e,
            )
        })
    }

    /// Take one message from Kafka into its partition's buffer. Returns false on
    /// timeout.
    fn fetch_one(&mut self, timeout: Duration) -> Result<bool, BusError> {
        let topic = self.consumer.context().opts.kafka_topic();
        match self.consumer.poll(timeout) {
            None => Ok(false),
            Some(Err(KafkaError::PartitionEOF(_))) => Ok(true),
            Some(Err(e)) => Err(kafka_err(&format!("polling {topic}"), e)),
            Some(Ok(m)) => {
                let p = m.partition() as u32;
                let offset = m.offset() as u64;
                let mut st = self.consumer.context().state.lock().unwrap();
                if let Some(o) = st.owned.get_mut(&p) {
                    let next = o.buffered.back().map(|r| r.offset + 1).unwrap_or(o.cursor);
                    if offset >= next {
                        let key = m
                            .key()
                            .map(|k| String::from_utf8_lossy(k).into_owned())
                            .unwrap_or_default();
                        o.buffered.push_back(Record {
                            offset,
                            key,
                            payload: m.payload().unwrap_or_default().to_vec(),
                        });
                    }
                }
                Ok(true)
            }
        }
    }

    fn take_delivery(&mut self, max_records: usize) -> Option<Delivery> {
        let st = self.consumer.context().state.lock().unwrap();
        let parts: Vec<u32> = st
            .owned
            .iter()
            .filter(|(_, o)| !o.buffered.is_empty())
            .map(|(p, _)| *p)
            .collect();
        if parts.is_empty() {
            return None;
        }
        let p = parts
            .iter()
            .copied()
            .find(|p| *p >= self.next_partition)
            .unwrap_or(parts[0]);
        self.next_partition = p + 1;
        let o = &st.owned[&p];
        let mut fence = o.fence.clone();
        fence.offset = o.cursor;
        Some(Delivery {
            fence,
            records: o.buffered.iter().take(max_records).cloned().collect(),
        })
    }
}

const MAX_BUFFERED: usize = 10_000;

impl Consumer for KafkaConsumer {
    fn poll(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Option<Delivery>, BusError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.consumer.context().state.lock().unwrap().error.take() {
                return Err(BusError::Kafka(format!(
                    "fencing assigned partitions failed: {e}"
                )));
            }
            self.watch_orphans()?;
            // Serve rebalances and take what has arrived without waiting.
            let buffered: usize = {
                let st = self.consumer.context().state.lock().unwrap();
                st.owned.values().map(|o| o.buffered.len()).sum()
            };
            let mut n = 0;
            while buffered + n < MAX_BUFFERED && n < max_records.max(1) * 4 {
                if !self.fetch_one(Duration::ZERO)? {
                    break;
                }
                n += 1;
            }
            if let Some(d) = self.take_delivery(max_records.max(1)) {
                return Ok(Some(d));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.fetch_one((deadline - now).min(Duration::from_millis(100)))?;
        }
    }

    fn committed(&mut self, fence: &Fence, next_offset: u64) {
        let mut st = self.consumer.context().state.lock().unwrap();
        if let Some(o) = st.owned.get_mut(&fence.partition) {
            if o.fence.epoch == fence.epoch {
                o.cursor = o.cursor.max(next_offset);
                while o.buffered.front().is_some_and(|r| r.offset < next_offset) {
                    o.buffered.pop_front();
                }
            }
        }
        drop(st);
        if self.commit_kafka_offsets {
            let mut tpl = TopicPartitionList::new();
            if tpl
                .add_partition_offset(
                    &self.consumer.context().opts.kafka_topic(),
                    fence.partition as i32,
                    Offset::Offset(next_offset as i64),
                )
                .is_ok()
            {
                // For lag monitoring only; the store's position is authoritative.
                let _ = self.consumer.commit(&tpl, CommitMode::Async);
            }
        }
    }

    fn fenced(&mut self, fence: &Fence) {
        self.consumer
            .context()
            .state
            .lock()
            .unwrap()
            .drop_lost(fence);
    }

    fn close(&mut self) -> Result<(), BusError> {
        self.leave_group();
        Ok(())
    }

    fn owned_partitions(&self) -> Vec<u32> {
        let st = self.consumer.context().state.lock().unwrap();
        st.owned.keys().copied().collect()
    }

    fn lag(&mut self) -> Result<u64, BusError> {
        let topic = self.consumer.context().opts.kafka_topic();
        let owned: Vec<(String, u32, u64)> = {
            let st = self.consumer.context().state.lock().unwrap();
            st.owned
                .iter()
                .map(|(p, o)| (topic.clone(), *p, o.cursor))
                .collect()
        };
        let mut lag = 0;
        for (topic, p, cursor) in owned {
            let (_, high) = self
                .consumer
                .fetch_watermarks(&topic, p as i32, Duration::from_secs(2))
                .map_err(|e| kafka_err(&format!("watermarks of {topic}/{p}"), e))?;
            lag += (high.max(0) as u64).saturating_sub(cursor);
        }
        Ok(lag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swimlane_store::embedded::EmbeddedBackend;

    #[test]
    fn outbox_entries_round_trip() {
        let b = encode_entry("swimlane.batches", "user-1", b"{\"x\":1}");
        assert_eq!(
            decode_entry(&b).unwrap(),
            OutboxEntry {
                topic: "swimlane.batches".into(),
                key: "user-1".into(),
                payload: b"{\"x\":1}".to_vec(),
            }
        );
        assert!(decode_entry(&b[..5]).is_err());
        assert!(decode_entry(&[9, 0, 0]).is_err());
    }

    #[test]
    fn emits_land_in_the_outbox_in_emit_order_even_in_one_millisecond() {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let keys = Keys::new("t");
        // A frozen clock: every seq comes from the same millisecond.
        let frozen: NowMs = Arc::new(|| 1_700_000_000_000);
        let a = KafkaEmitter::with_clock(keys.clone(), frozen.clone(), 5);
        // Another process in the same millisecond with the same nonce: collisions are
        // detected and skipped, nothing is overwritten.
        let b = KafkaEmitter::with_clock(keys.clone(), frozen, 5);
        db.transact(|tx| {
            a.emit_raw(tx, "t", "u", b"1")?;
            a.emit_raw(tx, "t", "u", b"2")
        })
        .unwrap();
        db.transact(|tx| b.emit_raw(tx, "t", "v", b"x")).unwrap();
        db.transact(|tx| a.emit_raw(tx, "t", "u", b"3")).unwrap();
        let got: Vec<(String, Vec<u8>)> = db
            .transact(|tx| read_outbox(tx, &keys, 10))
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.unwrap())
            .map(|e| (e.key, e.payload))
            .collect();
        assert_eq!(got.len(), 4, "{got:?}");
        let u: Vec<&[u8]> = got
            .iter()
            .filter(|(k, _)| k == "u")
            .map(|(_, p)| p.as_slice())
            .collect();
        assert_eq!(u, vec![b"1" as &[u8], b"2", b"3"]);
    }

    #[test]
    fn nothing_reaches_the_outbox_unless_the_transaction_commits() {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let keys = Keys::new("t");
        let e = KafkaEmitter::new(keys.clone());
        let r: Result<(), KvError> = db.transact(|tx| {
            e.emit_raw(tx, "t", "u", b"1")?;
            Err(KvError::InvalidArgument("stage failed".into()))
        });
        assert!(r.is_err());
        assert!(db
            .transact(|tx| read_outbox(tx, &keys, 10))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn one_relay_leads_per_store_and_another_takes_over_when_it_stops() {
        let db = Db::new(EmbeddedBackend::open_temp().unwrap());
        let keys = Keys::new("t");
        let relay = |member: &str| {
            Relay::new(
                db.clone(),
                keys.clone(),
                // No broker needed: the outbox stays empty, so nothing is produced.
                relay_producer("127.0.0.1:1").unwrap(),
                RelayOptions {
                    member: member.into(),
                    ..RelayOptions::default()
                },
            )
        };
        let (mut a, mut b) = (relay("a"), relay("b"));
        assert_eq!(a.round().unwrap(), 0);
        assert_eq!(b.round().unwrap(), 0);
        assert!(a.is_leader());
        assert!(!b.is_leader(), "the lease is held by a");
        a.run(&|| true); // stops at once and releases the lease
        assert_eq!(b.round().unwrap(), 0);
        assert!(b.is_leader(), "b takes over once a released the lease");
    }
}
