//! The outbox: entries written in the effect's own transaction, and the emitter that
//! writes them (sequence numbers: the module doc of `kafka`).
use super::*;

pub use crate::wire::OutboxEntry;
use crate::wire::{decode_outbox_entry as decode_entry, encode_outbox_entry as encode_entry};
use crate::Raw;

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
        write!(f, "KafkaEmitter {{ nonce: {} }}", self.nonce)
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
        let candidate = (self.now_ms.now_ms() << 22) | (self.nonce << 12);
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
    fn emit_raw(&self, tx: &mut Transaction<'_>, raw: Raw<'_>) -> Result<(), KvError> {
        let entry = encode_entry(raw.topic, raw.key, raw.payload);
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

#[cfg(test)]
mod tests {
    use super::*;
    use swimlane_store::embedded::EmbeddedBackend;

    /// A fresh store and its keys.
    fn store() -> (Db, Keys) {
        (
            Db::new(EmbeddedBackend::open_temp().unwrap()),
            Keys::new("t"),
        )
    }

    #[test]
    fn emits_land_in_the_outbox_in_emit_order_even_in_one_millisecond() {
        let (db, keys) = store();
        // A frozen clock: every seq comes from the same millisecond.
        let frozen: NowMs = Arc::new(|| 1_700_000_000_000);
        let a = KafkaEmitter::with_clock(keys.clone(), frozen.clone(), 5);
        // Another process in the same millisecond with the same nonce: collisions are
        // detected and skipped, nothing is overwritten.
        let b = KafkaEmitter::with_clock(keys.clone(), frozen, 5);
        db.transact(|tx| {
            a.emit_raw(tx, Raw::new("t", "u", b"1"))?;
            a.emit_raw(tx, Raw::new("t", "u", b"2"))
        })
        .unwrap();
        db.transact(|tx| b.emit_raw(tx, Raw::new("t", "v", b"x")))
            .unwrap();
        db.transact(|tx| a.emit_raw(tx, Raw::new("t", "u", b"3")))
            .unwrap();
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
        let (db, keys) = store();
        let e = KafkaEmitter::new(keys.clone());
        let r: Result<(), KvError> = db.transact(|tx| {
            e.emit_raw(tx, Raw::new("t", "u", b"1"))?;
            Err(KvError::InvalidArgument("stage failed".into()))
        });
        assert!(r.is_err());
        assert!(db
            .transact(|tx| read_outbox(tx, &keys, 10))
            .unwrap()
            .is_empty());
    }
}
