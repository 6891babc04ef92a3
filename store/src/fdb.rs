//! The FoundationDB backend (feature `fdb`): a thin adapter from [`Backend`] /
//! [`BackendTx`] to the `foundationdb` crate. FoundationDB itself provides ordering,
//! strict serializability, read-your-writes, conflict detection and durability; this
//! module only blocks on its futures and translates errors.
//!
//! # The network thread
//! The FDB client runs one network thread per process, which can be started once and,
//! once stopped, never restarted (`fdb_setup_network` / `fdb_stop_network`). The first
//! [`FdbBackend::open`] starts it (selecting the API version this crate was built for)
//! and keeps its guard in a process-wide static, so every later backend in the process
//! shares it. A static is never dropped: a binary that wants a clean shutdown calls
//! [`stop_network`] once at the end of `main`, after its last FDB transaction; after
//! that, [`FdbBackend::open`] fails.
//!
//! # Errors
//! `not_committed` (1020) is [`KvError::Conflict`]; other errors FDB marks retryable
//! (`transaction_too_old`, `future_version`, `commit_unknown_result`, ...) are
//! [`KvError::Transient`]; both are retried by [`crate::Db::transact`], whose closures
//! must therefore be idempotent (an attempt that got `commit_unknown_result` may have
//! committed). Everything else is [`KvError::Backend`].
use std::path::Path;
use std::sync::Mutex;

use foundationdb::api::{FdbApiBuilder, NetworkAutoStop};
use foundationdb::options::{MutationType, StreamingMode};
use foundationdb::{Database, FdbError, KeySelector};
use futures::executor::block_on;

use crate::error::KvError;
use crate::kv::{Backend, BackendTx, KeyValue, Mutation, RangeOption};

enum Network {
    NotStarted,
    /// Held for its `Drop`, which stops and joins the network thread.
    Running {
        _guard: NetworkAutoStop,
    },
    Stopped,
}

/// The process's FDB network (see the module doc).
static NETWORK: Mutex<Network> = Mutex::new(Network::NotStarted);

fn ensure_network() -> Result<(), KvError> {
    let mut net = NETWORK.lock().unwrap_or_else(|e| e.into_inner());
    match &*net {
        Network::Running { .. } => Ok(()),
        Network::Stopped => Err(KvError::Backend(
            "the FoundationDB network was stopped and cannot be restarted in this process".into(),
        )),
        Network::NotStarted => {
            let builder = FdbApiBuilder::default()
                .build()
                .map_err(|e| fdb_backend_error("selecting the FDB API version", e))?;
            // SAFETY: `boot` requires the returned guard to stop the network before the
            // process exits; the guard lives in `NETWORK` until `stop_network` drops it
            // (a process that never calls it exits with the network thread running,
            // which the OS tears down).
            let guard = unsafe { builder.boot() }
                .map_err(|e| fdb_backend_error("starting the FDB network", e))?;
            *net = Network::Running { _guard: guard };
            Ok(())
        }
    }
}

/// Stop this process's FDB network thread (joins it). Call once, after the last FDB
/// transaction; afterwards no FDB backend can be opened in this process.
pub fn stop_network() {
    let mut net = NETWORK.lock().unwrap_or_else(|e| e.into_inner());
    // Dropping the guard stops and joins the network thread.
    *net = Network::Stopped;
}

fn fdb_backend_error(context: &str, e: FdbError) -> KvError {
    KvError::Backend(format!(
        "{context}: fdb error {}: {}",
        e.code(),
        e.message()
    ))
}

/// FDB errors as [`KvError`]s (see the module doc).
fn map_fdb(context: &str, e: FdbError) -> KvError {
    const NOT_COMMITTED: i32 = 1020;
    if e.code() == NOT_COMMITTED {
        KvError::Conflict
    } else if e.is_retryable() {
        KvError::Transient(format!(
            "{context}: fdb error {}: {}",
            e.code(),
            e.message()
        ))
    } else {
        fdb_backend_error(context, e)
    }
}

/// A FoundationDB cluster as a [`Backend`].
pub struct FdbBackend {
    db: Database,
}

impl std::fmt::Debug for FdbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbBackend").finish_non_exhaustive()
    }
}

impl FdbBackend {
    /// Connect to the cluster named by `cluster_file` (`None`: FDB's default cluster
    /// file). Starts the process's network thread on first use.
    pub fn open(cluster_file: Option<&Path>) -> Result<Self, KvError> {
        ensure_network()?;
        let path = match cluster_file {
            None => None,
            Some(p) => Some(p.to_str().ok_or_else(|| {
                KvError::InvalidArgument(format!("cluster file path is not UTF-8: {}", p.display()))
            })?),
        };
        let db = Database::new(path).map_err(|e| fdb_backend_error("opening the cluster", e))?;
        Ok(FdbBackend { db })
    }
}

impl Backend for FdbBackend {
    fn begin(&self) -> Result<Box<dyn BackendTx + '_>, KvError> {
        let tx = self
            .db
            .create_trx()
            .map_err(|e| map_fdb("creating a transaction", e))?;
        Ok(Box::new(FdbTx { tx }))
    }
    fn name(&self) -> &'static str {
        "fdb"
    }
}

struct FdbTx {
    tx: foundationdb::Transaction,
}

impl BackendTx for FdbTx {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let v = block_on(self.tx.get(key, false)).map_err(|e| map_fdb("get", e))?;
        Ok(v.map(|s| s.to_vec()))
    }

    fn get_range(&mut self, range: &RangeOption) -> Result<Vec<KeyValue>, KvError> {
        let mut opt = foundationdb::RangeOption {
            begin: KeySelector::first_greater_or_equal(range.begin.clone()),
            end: KeySelector::first_greater_or_equal(range.end.clone()),
            limit: range.limit,
            reverse: range.reverse,
            mode: StreamingMode::WantAll,
            ..Default::default()
        };
        let mut out = Vec::new();
        let mut iteration = 1;
        loop {
            let kvs = block_on(self.tx.get_range(&opt, iteration, false))
                .map_err(|e| map_fdb("get_range", e))?;
            out.extend(
                kvs.iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec())),
            );
            match opt.next_range(&kvs) {
                Some(next) => opt = next,
                None => break,
            }
            iteration += 1;
        }
        Ok(out)
    }

    fn mutate(&mut self, m: Mutation<'_>) -> Result<(), KvError> {
        match m {
            Mutation::Set(key, value) => self.tx.set(key, value),
            Mutation::Clear(key) => self.tx.clear(key),
            Mutation::ClearRange(begin, end) => self.tx.clear_range(begin, end),
            Mutation::Add(key, delta) => {
                self.tx
                    .atomic_op(key, &delta.to_le_bytes(), MutationType::Add)
            }
        }
        Ok(())
    }
    fn commit(self: Box<Self>) -> Result<(), KvError> {
        block_on(self.tx.commit())
            .map(|_| ())
            .map_err(|e| map_fdb("commit", *e))
    }
}
