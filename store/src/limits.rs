//! FoundationDB's limits, enforced by every backend so that code written against the
//! embedded store also runs on FoundationDB.
use std::time::Duration;

/// Largest key, in bytes (FDB: 10,000).
pub const MAX_KEY_BYTES: usize = 10_000;
/// Largest value, in bytes (FDB: 100,000).
pub const MAX_VALUE_BYTES: usize = 100_000;
/// Largest total of key and value bytes written (set, clear, clear-range, atomic add)
/// by one transaction (FDB: 10,000,000).
pub const MAX_TXN_BYTES: usize = 10_000_000;
/// Oldest a transaction may be when it commits (FDB: 5 seconds).
pub const MAX_TXN_AGE: Duration = Duration::from_secs(5);
