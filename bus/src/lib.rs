//! swimlane-bus: moving events between stages, exactly once.
//!
//! Guarantees:
//! - An event is emitted *inside* the store transaction that makes the effect it
//!   announces ([`Emitter::emit`]): the event exists if and only if the effect
//!   committed. (Embedded bus: the event is appended to the log in the same store
//!   transaction. Kafka bus: it is written to the outbox and relayed.)
//! - Events with the same key (a user id) land on the same partition, in order.
//! - A consumer's queue position lives in the store, and a stage commits its effect
//!   and its new position in one transaction ([`positions::commit`]); a consumer that
//!   lost its partition (a zombie) cannot commit, because the position write checks
//!   the partition's owner epoch, which every new owner bumps.
//! - So a record is processed to a committed effect exactly once per consumer group,
//!   whatever process dies when.
use std::time::Duration;

use swimlane_core::Event;
use swimlane_store::{KvError, Transaction};

#[cfg(feature = "test-util")]
pub mod conformance;
pub mod embedded;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod positions;
pub mod stage;
pub mod wire;

pub use positions::Fence;

/// Errors of the bus layer.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("store error on bus operation: {0}")]
    Store(#[from] KvError),
    #[error("corrupt bus record at {topic}/{partition}@{offset}: {reason}")]
    Corrupt {
        topic: String,
        partition: u32,
        offset: u64,
        reason: String,
    },
    #[error("bus configuration error: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(String),
}

/// Writes events as part of a store transaction.
pub trait Emitter: Send + Sync {
    /// Record `event` in `tx` for delivery on its topic, keyed by its user. Nothing is
    /// delivered unless `tx` commits.
    fn emit(&self, tx: &mut Transaction<'_>, event: &Event) -> Result<(), KvError> {
        let payload = event.encode();
        self.emit_raw(tx, Raw::new(event.topic(), event.user().as_str(), &payload))
    }
    /// Record raw bytes for a topic under a key (dead letters use this).
    fn emit_raw(&self, tx: &mut Transaction<'_>, raw: Raw<'_>) -> Result<(), KvError>;
}

/// Bytes for a topic under a key: what an [`Emitter`] records.
#[derive(Clone, Copy, Debug)]
pub struct Raw<'a> {
    pub topic: &'a str,
    /// The partitioning key (a user id).
    pub key: &'a str,
    pub payload: &'a [u8],
}

impl<'a> Raw<'a> {
    pub fn new(topic: &'a str, key: &'a str, payload: &'a [u8]) -> Self {
        Raw {
            topic,
            key,
            payload,
        }
    }
}

/// One record as delivered to a consumer.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub offset: u64,
    pub key: String,
    pub payload: Vec<u8>,
}

/// Records of one partition, in order, with the fence to commit them under.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub fence: Fence,
    pub records: Vec<Record>,
}

impl Delivery {
    /// The position to commit once every record of this delivery is handled.
    pub fn next_offset(&self) -> u64 {
        self.records
            .last()
            .map(|r| r.offset + 1)
            .unwrap_or(self.fence.offset)
    }
}

/// A member of a consumer group on one topic. Blocking; run it on its own thread.
pub trait Consumer: Send {
    /// Wait up to `timeout` for records on a partition this member owns. Returns at
    /// most `max` consecutive records of one partition, starting at the
    /// position last committed in the store (or after the previous delivery when it was
    /// committed through [`Consumer::committed`]).
    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Option<Delivery>, BusError>;
    /// Tell the consumer that `delivery` was committed up to `next_offset`.
    fn committed(&mut self, fence: &Fence, next_offset: u64);
    /// Tell the consumer its fence was rejected: drop the partition and re-read its
    /// position if it is assigned again.
    fn fenced(&mut self, fence: &Fence);
    /// Leave the group, releasing owned partitions so others take them at once.
    fn close(&mut self) -> Result<(), BusError>;
    /// Records waiting on the partitions this member owns (high watermark minus the
    /// committed cursor, summed). Over Kafka the high watermark is the one the member's
    /// last fetch response carried (at most one fetch wait old while it keeps up), so
    /// asking costs no request to the broker.
    fn lag(&mut self) -> Result<u64, BusError>;
    /// The partitions this member owns now.
    fn owned_partitions(&self) -> Vec<u32>;
}

/// Stable partition of `key` among `partitions` (FNV-1a).
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % partitions.max(1) as u64) as u32
}

/// Publish a record no stage can process to the dead-letter topic, with the reason,
/// inside `tx` (so it commits with the position that skips it). The body is JSON:
/// `{"v":1,"source_topic":..,"reason":..,"payload_hex":..}`.
pub fn dead_letter(
    emitter: &dyn Emitter,
    tx: &mut Transaction<'_>,
    source_topic: &str,
    key: &str,
    payload: &[u8],
    reason: &str,
) -> Result<(), KvError> {
    tracing::warn!(source_topic, reason, "dead-lettering a record");
    let body = serde_json::json!({
        "v": 1,
        "source_topic": source_topic,
        "reason": reason,
        "payload_hex": payload.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    });
    let body = body.to_string();
    let raw = Raw::new(swimlane_core::topics::DEAD_LETTER, key, body.as_bytes());
    emitter.emit_raw(tx, raw)
}

/// A member id unique to this process and call: `<group>-<pid>-<n>`.
pub fn member_id(group: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{group}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
