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
//!
//! One file per role: [`outbox`] (the entries and the emitter that writes them),
//! [`relay`] (outbox → Kafka), [`admin`] (topics), [`consumer`] (group members whose
//! positions and fences are the store's).
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

/// Base client settings for `bootstrap` (`host:port`).
fn base_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("socket.keepalive.enable", "true");
    c
}

pub mod admin;
pub mod consumer;
pub mod outbox;
pub mod relay;

pub use admin::{create_topics, kafka_name};
pub use consumer::{FencingContext, KafkaConsumer, KafkaConsumerOptions};
pub use outbox::{read_outbox, KafkaEmitter, OutboxEntry};
pub use relay::{relay_producer, run_relay, Relay, RelayContext, RelayOptions, RelayProducer};
