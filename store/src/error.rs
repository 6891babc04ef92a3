use std::time::Duration;

/// Every way a store operation can fail. Carries enough context to act on, never a
/// value's contents.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Another transaction committed a write to something this one read. Retryable:
    /// [`crate::Db::transact`] retries it; it only surfaces wrapped in
    /// [`KvError::RetriesExhausted`].
    #[error("transaction conflict")]
    Conflict,
    /// A transient backend condition (lock busy, FDB retryable error). Retryable.
    #[error("transient store error: {0}")]
    Transient(String),
    /// The transaction ran out of attempts; `last` is the error of the final attempt.
    #[error("transaction gave up after {attempts} attempts: {last}")]
    RetriesExhausted { attempts: u32, last: Box<KvError> },
    #[error("key too large: {len} bytes (limit {limit})")]
    KeyTooLarge { len: usize, limit: usize },
    #[error("value too large: {len} bytes (limit {limit})")]
    ValueTooLarge { len: usize, limit: usize },
    #[error("transaction too large: {len} bytes written (limit {limit})")]
    TransactionTooLarge { len: usize, limit: usize },
    #[error("transaction too old: {age:?} at commit (limit {limit:?})")]
    TransactionTooOld { age: Duration, limit: Duration },
    /// An argument that can never be valid (for example a range whose end sorts
    /// before its begin, or an atomic operand of the wrong width).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Stored bytes failed an integrity check (blob length or hash mismatch, a chunk
    /// missing, a value that does not decode).
    #[error("corrupt data at {what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// The backend failed in a way retrying will not fix (I/O error, disk full,
    /// misconfiguration).
    #[error("store backend error: {0}")]
    Backend(String),
    /// An error raised by the transaction closure itself; aborts without retry.
    #[error("{0}")]
    Aborted(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl KvError {
    /// Whether [`crate::Db::transact`] retries the transaction after this error.
    pub fn is_retryable(&self) -> bool {
        matches!(self, KvError::Conflict | KvError::Transient(_))
    }

    /// Abort a transaction closure with the caller's own error; `transact` returns it
    /// as [`KvError::Aborted`] without retrying.
    pub fn abort<E: std::error::Error + Send + Sync + 'static>(e: E) -> KvError {
        KvError::Aborted(Box::new(e))
    }

    /// If this is an aborted closure's error of type `E`, borrow it.
    pub fn aborted_as<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            KvError::Aborted(e) => e.downcast_ref::<E>(),
            _ => None,
        }
    }
}
