//! The `Kv` port: [`Db`] and [`Transaction`] (backend independent), and the
//! [`Backend`] / [`BackendTx`] traits each backend implements.
//!
//! Invariants kept here, once, for every backend:
//! - limits (key, value, transaction bytes, transaction age) are checked before a
//!   write reaches a backend or before a commit is attempted;
//! - the retry loop: retryable errors re-run the closure on a fresh transaction, with
//!   bounded attempts and exponential backoff with jitter.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::KvError;
use crate::limits;

/// One key and its value, as returned by range reads.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A range read: keys `k` with `begin <= k < end`, in ascending order (or descending
/// when `reverse`), at most `limit` of them (`None`: no limit).
#[derive(Clone, Debug)]
pub struct RangeOption {
    pub begin: Vec<u8>,
    pub end: Vec<u8>,
    pub limit: Option<usize>,
    pub reverse: bool,
}

impl RangeOption {
    /// All keys in `[begin, end)`, ascending, no limit.
    pub fn new(begin: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        RangeOption {
            begin: begin.into(),
            end: end.into(),
            limit: None,
            reverse: false,
        }
    }
    /// All keys that start with `prefix`, ascending.
    pub fn prefix(prefix: &[u8]) -> Self {
        let (b, e) = prefix_range(prefix);
        RangeOption::new(b, e)
    }
    /// At most `n` keys.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }
    /// Descending order (the last keys of the range first).
    pub fn reverse(mut self) -> Self {
        self.reverse = true;
        self
    }
}

/// `[prefix, strinc(prefix))`: the range of every key starting with `prefix`.
/// An empty prefix, or one of only 0xff bytes, ends at `[0xff]`... extended so that it
/// covers every key starting with the prefix.
pub fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last == 0xff {
            end.pop();
        } else {
            *end.last_mut().unwrap() += 1;
            return (prefix.to_vec(), end);
        }
    }
    // Prefix empty or all 0xff: every key >= prefix.
    let mut e = prefix.to_vec();
    e.extend_from_slice(&[0xff; 16]);
    (prefix.to_vec(), e)
}

/// A backend: hands out transactions. Implemented by [`crate::embedded::EmbeddedBackend`]
/// and (feature `fdb`) `crate::fdb::FdbBackend`.
pub trait Backend: Send + Sync + 'static {
    /// Start a transaction at a read version no older than the last commit that
    /// returned `Ok` to anyone (strict serializability).
    fn begin(&self) -> Result<Box<dyn BackendTx + '_>, KvError>;
    /// A short name for logs and metrics ("embedded", "fdb").
    fn name(&self) -> &'static str;
    /// Make what committed transactions cleared unrecoverable from this backend's own
    /// files, as far as the backend can: erasing a user relies on it
    /// ([`Db::purge_deleted`]). The default: nothing the backend can do (FoundationDB:
    /// its storage servers reuse freed pages on their own; docs/operations.md says what
    /// a deployment must do).
    fn purge_deleted(&self) -> Result<Purged, KvError> {
        Ok(Purged::default())
    }
    /// A new [`crate::watch::ChangeWatch`] on this store, if the backend has one (see
    /// that module for the guarantees). The default: none, callers poll.
    fn change_watch(&self) -> Option<Box<dyn crate::watch::ChangeWatch>> {
        None
    }
}

/// What [`Backend::purge_deleted`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Whether the backend purges at all (`false`: the default, nothing done).
    pub supported: bool,
    /// Deleted keys' markers removed (the embedded backend keeps a cleared key's name
    /// as a tombstone for conflict checks until it collects it).
    pub tombstones_removed: u64,
    /// The write-ahead log was checkpointed and truncated: no frame of an earlier
    /// page is left in it.
    pub log_truncated: bool,
}

/// One backend transaction. Limits are already checked by [`Transaction`]; a backend
/// must provide serializable isolation, read-your-writes, and report a conflict at
/// commit as [`KvError::Conflict`].
pub trait BackendTx {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    fn get_range(&mut self, range: &RangeOption) -> Result<Vec<KeyValue>, KvError>;
    /// Buffer a write; it takes effect (for this transaction's own reads at once) when
    /// the transaction commits.
    fn mutate(&mut self, m: Mutation<'_>) -> Result<(), KvError>;
    fn commit(self: Box<Self>) -> Result<(), KvError>;
}

/// A write, as [`Transaction`] hands it to a backend once it is within the limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation<'a> {
    /// Set the key to the value.
    Set(&'a [u8], &'a [u8]),
    /// Remove the key (no error when absent).
    Clear(&'a [u8]),
    /// Remove every key in `[begin, end)`; never empty (`begin < end`).
    ClearRange(&'a [u8], &'a [u8]),
    /// Add the delta to the 8-byte little-endian signed integer at the key (absent =
    /// 0), without adding a read conflict on the key (FDB's `ADD` mutation).
    Add(&'a [u8], i64),
}

/// Time source for the transaction-age limit, injected so tests are deterministic.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;
impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to; for tests of the age limit.
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    offset: Mutex<Duration>,
}
impl ManualClock {
    pub fn new() -> Self {
        ManualClock {
            base: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }
    pub fn advance(&self, d: Duration) {
        *self.offset.lock().unwrap() += d;
    }
}
impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap()
    }
}

/// How [`Db::transact`] retries.
#[derive(Clone, Debug)]
pub struct RetryOptions {
    /// Attempts in all, the first included. At least 1.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}
impl Default for RetryOptions {
    fn default() -> Self {
        RetryOptions {
            max_attempts: 50,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(200),
        }
    }
}

/// Counters a process exports as metrics.
#[derive(Debug, Default)]
pub struct DbStats {
    pub commits: AtomicU64,
    pub retries: AtomicU64,
    pub conflicts: AtomicU64,
    pub failures: AtomicU64,
    /// The most bytes (keys and values) one committed transaction read.
    pub largest_read_bytes: AtomicU64,
    /// The most bytes one committed transaction wrote (as counted against
    /// [`limits::MAX_TXN_BYTES`]).
    pub largest_written_bytes: AtomicU64,
    /// The longest a committed transaction took, begin to commit, in microseconds
    /// (the age checked against [`limits::MAX_TXN_AGE`]).
    pub longest_micros: AtomicU64,
}

/// A handle to a store. Cheap to clone; share it between threads.
#[derive(Clone)]
pub struct Db {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    retry: RetryOptions,
    stats: Arc<DbStats>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl Db {
    /// A store over `backend`, with the system clock and default retries.
    pub fn new(backend: impl Backend) -> Self {
        Db {
            backend: Arc::new(backend),
            clock: Arc::new(SystemClock),
            retry: RetryOptions::default(),
            stats: Arc::new(DbStats::default()),
        }
    }
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
    pub fn with_retry(mut self, retry: RetryOptions) -> Self {
        self.retry = retry;
        self
    }
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }
    /// The backend itself, for code that drives [`BackendTx`]s by hand (tests that need
    /// two interleaved transactions in one thread). Bypasses the limit checks and the
    /// retry loop of [`Db::transact`].
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }
    /// [`Backend::purge_deleted`]: make what was cleared unrecoverable from the
    /// backend's files. Not a transaction; safe while others run (a transaction that
    /// needed a purged tombstone conflicts and is retried).
    pub fn purge_deleted(&self) -> Result<Purged, KvError> {
        self.backend.purge_deleted()
    }
    /// [`Backend::change_watch`]: something to wait on for the store to change, if the
    /// backend has it (`None`: poll).
    pub fn change_watch(&self) -> Option<Box<dyn crate::watch::ChangeWatch>> {
        self.backend.change_watch()
    }
    /// Commit, retry, conflict and failure counts since this handle was built.
    pub fn stats(&self) -> &DbStats {
        &self.stats
    }

    /// Run `f` in a serializable transaction and commit it.
    ///
    /// On a retryable error (conflict, transient) from a read, a write or the commit,
    /// `f` runs again on a fresh transaction after a backoff, up to
    /// [`RetryOptions::max_attempts`] attempts, then fails with
    /// [`KvError::RetriesExhausted`]. Any other error, including the closure's own
    /// ([`KvError::Aborted`]), returns at once with nothing committed.
    ///
    /// Because `f` may run more than once, and (on FoundationDB, after
    /// `commit_unknown_result`) even after an attempt that did commit, `f` must only
    /// touch the world through `tx` and must be safe to re-run.
    pub fn transact<T>(
        &self,
        mut f: impl FnMut(&mut Transaction<'_>) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        let mut backoff = self.retry.initial_backoff;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = self.attempt(&mut f);
            match result {
                Ok(v) => {
                    self.stats.commits.fetch_add(1, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if e.is_retryable() => {
                    if matches!(e, KvError::Conflict) {
                        self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    }
                    if attempt >= self.retry.max_attempts.max(1) {
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        return Err(KvError::RetriesExhausted {
                            attempts: attempt,
                            last: Box::new(e),
                        });
                    }
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(attempt, error = %e, "retrying transaction");
                    let jitter = rand::random_range(0.5..1.5);
                    std::thread::sleep(backoff.mul_f64(jitter));
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    fn attempt<T>(
        &self,
        f: &mut impl FnMut(&mut Transaction<'_>) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        let inner = self.backend.begin()?;
        let started = self.clock.now();
        let mut tx = Transaction {
            inner,
            started,
            clock: &*self.clock,
            written: 0,
            read: 0,
        };
        let v = f(&mut tx)?;
        let (read, written) = (tx.read as u64, tx.written as u64);
        tx.commit()?;
        let took = self.clock.now().saturating_duration_since(started);
        let s = &self.stats;
        s.largest_read_bytes.fetch_max(read, Ordering::Relaxed);
        s.largest_written_bytes
            .fetch_max(written, Ordering::Relaxed);
        s.longest_micros
            .fetch_max(took.as_micros() as u64, Ordering::Relaxed);
        Ok(v)
    }

    /// Read one key in its own transaction.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.transact(|tx| tx.get(key))
    }
}

/// The transaction a [`Db::transact`] closure works with.
pub struct Transaction<'a> {
    inner: Box<dyn BackendTx + 'a>,
    started: Instant,
    clock: &'a dyn Clock,
    written: usize,
    /// Bytes of keys and values read so far (accounting only: FoundationDB limits
    /// what a transaction writes and how long it lives, not what it reads).
    read: usize,
}

impl Transaction<'_> {
    fn check_key(key: &[u8]) -> Result<(), KvError> {
        if key.len() > limits::MAX_KEY_BYTES {
            return Err(KvError::KeyTooLarge {
                len: key.len(),
                limit: limits::MAX_KEY_BYTES,
            });
        }
        Ok(())
    }
    fn account(&mut self, n: usize) -> Result<(), KvError> {
        let total = self.written + n;
        if total > limits::MAX_TXN_BYTES {
            return Err(KvError::TransactionTooLarge {
                len: total,
                limit: limits::MAX_TXN_BYTES,
            });
        }
        self.written = total;
        Ok(())
    }

    /// The value at `key`, or `None`.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Self::check_key(key)?;
        let v = self.inner.get(key)?;
        self.read += key.len() + v.as_ref().map_or(0, Vec::len);
        Ok(v)
    }

    /// The keys and values in `range` (see [`RangeOption`]).
    pub fn get_range(&mut self, range: &RangeOption) -> Result<Vec<KeyValue>, KvError> {
        Self::check_key(&range.begin)?;
        Self::check_key(&range.end)?;
        if range.begin > range.end {
            return Err(KvError::InvalidArgument(
                "range end sorts before its begin".into(),
            ));
        }
        if range.limit == Some(0) || range.begin == range.end {
            return Ok(Vec::new());
        }
        let rows = self.inner.get_range(range)?;
        self.read += rows.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        Ok(rows)
    }

    /// Set `key` to `value`.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        Self::check_key(key)?;
        if value.len() > limits::MAX_VALUE_BYTES {
            return Err(KvError::ValueTooLarge {
                len: value.len(),
                limit: limits::MAX_VALUE_BYTES,
            });
        }
        self.account(key.len() + value.len())?;
        self.inner.mutate(Mutation::Set(key, value))
    }

    /// Remove `key` (no error when absent).
    pub fn clear(&mut self, key: &[u8]) -> Result<(), KvError> {
        Self::check_key(key)?;
        self.account(key.len())?;
        self.inner.mutate(Mutation::Clear(key))
    }

    /// Remove every key in `[begin, end)`.
    pub fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        Self::check_key(begin)?;
        Self::check_key(end)?;
        if begin > end {
            return Err(KvError::InvalidArgument(
                "clear_range end sorts before its begin".into(),
            ));
        }
        self.account(begin.len() + end.len())?;
        if begin == end {
            return Ok(());
        }
        self.inner.mutate(Mutation::ClearRange(begin, end))
    }

    /// Remove every key starting with `prefix`.
    pub fn clear_prefix(&mut self, prefix: &[u8]) -> Result<(), KvError> {
        let (b, e) = prefix_range(prefix);
        self.clear_range(&b, &e)
    }

    /// Add `delta` to the little-endian i64 counter at `key` without a read conflict.
    pub fn atomic_add(&mut self, key: &[u8], delta: i64) -> Result<(), KvError> {
        Self::check_key(key)?;
        self.account(key.len() + 8)?;
        self.inner.mutate(Mutation::Add(key, delta))
    }

    /// Read a counter written by [`Transaction::atomic_add`] (absent = 0).
    pub fn get_counter(&mut self, key: &[u8]) -> Result<i64, KvError> {
        match self.get(key)? {
            None => Ok(0),
            Some(v) if v.len() == 8 => Ok(i64::from_le_bytes(v.try_into().unwrap())),
            Some(v) => Err(KvError::Corrupt {
                what: "counter".into(),
                reason: format!("expected 8 bytes, found {}", v.len()),
            }),
        }
    }

    /// Bytes written so far (counted against [`limits::MAX_TXN_BYTES`]).
    pub fn bytes_written(&self) -> usize {
        self.written
    }

    /// Bytes of keys and values read so far.
    pub fn bytes_read(&self) -> usize {
        self.read
    }

    fn commit(self) -> Result<(), KvError> {
        let age = self.clock.now().saturating_duration_since(self.started);
        if age > limits::MAX_TXN_AGE {
            return Err(KvError::TransactionTooOld {
                age,
                limit: limits::MAX_TXN_AGE,
            });
        }
        self.inner.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn prefix_range_increments_last_non_ff_byte() {
        assert_eq!(prefix_range(b"ab"), (b"ab".to_vec(), b"ac".to_vec()));
        assert_eq!(prefix_range(&[1, 0xff]), (vec![1, 0xff], vec![2]));
        let (b, e) = prefix_range(&[]);
        assert!(b.is_empty() && e > vec![0xff; 8]);
    }

    #[test]
    fn the_largest_transaction_is_accounted_for() {
        let db = Db::new(crate::embedded::EmbeddedBackend::open_temp().unwrap());
        db.transact(|tx| {
            tx.set(b"a", &[1; 100])?;
            tx.set(b"b", &[2; 50])
        })
        .unwrap();
        db.transact(|tx| {
            tx.get(b"a")?;
            tx.get_range(&RangeOption::prefix(b"b"))?;
            tx.get(b"zz")?;
            Ok(())
        })
        .unwrap();
        let s = db.stats();
        // 1 + 100, 1 + 50, and 2 for the missing key.
        assert_eq!(s.largest_read_bytes.load(Ordering::Relaxed), 154);
        assert_eq!(s.largest_written_bytes.load(Ordering::Relaxed), 152);
        // A failed transaction is not counted.
        let _ = db.transact(|tx| {
            tx.get_range(&RangeOption::prefix(b""))?;
            Err::<(), _>(KvError::InvalidArgument("no".into()))
        });
        assert_eq!(s.largest_read_bytes.load(Ordering::Relaxed), 154);
    }
}
