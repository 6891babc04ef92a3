//! swimlane-store: the ordered, transactional key-value layer everything durable in
//! swimlane sits on.
//!
//! Guarantees, on every backend (embedded SQLite and FoundationDB):
//! - Keys are byte strings ordered lexicographically (memcmp order).
//! - [`Db::transact`] runs a closure in a strictly serializable transaction. If the
//!   transaction conflicts with another committed one, the closure is run again on a
//!   fresh transaction (bounded attempts, exponential backoff with jitter), so closures
//!   must be idempotent with respect to anything outside the transaction.
//! - Inside a transaction, reads see the transaction's own writes (read-your-writes).
//! - FoundationDB's limits are enforced with typed errors, never a panic: key at most
//!   [`limits::MAX_KEY_BYTES`], value at most [`limits::MAX_VALUE_BYTES`], writes of one
//!   transaction at most [`limits::MAX_TXN_BYTES`], and a transaction at most
//!   [`limits::MAX_TXN_AGE`] old when it commits.
//! - A commit that returned `Ok` is durable (fsynced) before `transact` returns.
//!
//! Modules: [`embedded`] (SQLite, the default backend), `fdb` (feature `fdb`), [`blob`]
//! (chunked blobs of any size), [`watch`] (waiting for the store to change); behind feature `test-util`, `conformance` (the suite
//! every backend must pass, and the `conformance_tests!` macro) and `faults` (a backend
//! that fails on purpose); behind feature `bench`, `bench` (`swimlane bench store`).

#[cfg(feature = "bench")]
pub mod bench;
pub mod blob;
#[cfg(feature = "test-util")]
pub mod conformance;
pub mod embedded;
mod error;
#[cfg(feature = "test-util")]
pub mod faults;
#[cfg(feature = "fdb")]
pub mod fdb;
mod kv;
pub mod limits;
mod wal_vfs;
pub mod watch;

pub use error::KvError;
pub use kv::{
    prefix_range, Backend, BackendTx, Clock, Db, KeyValue, ManualClock, Mutation, Purged,
    RangeOption, RetryOptions, SystemClock, Transaction,
};
