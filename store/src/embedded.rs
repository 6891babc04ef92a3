//! The embedded backend: FoundationDB's semantics on one SQLite file.
//!
//! # Storage
//! - `kv(id INTEGER PRIMARY KEY, k BLOB NOT NULL UNIQUE, ver INTEGER NOT NULL, v BLOB)`:
//!   keys are BLOBs, which SQLite compares with `memcmp` (shorter first on a common
//!   prefix), i.e. FDB's key order; reads and ranges go through the unique index on `k`.
//!   `v IS NULL` is a *tombstone*: the key is absent, and `ver` remembers the commit
//!   version that deleted it. A partial index on `ver WHERE v IS NULL` finds tombstones
//!   for garbage collection.
//! - Values live in the rowid table, apart from the key index (file format 2). Format 1
//!   kept them inside the key b-tree (`WITHOUT ROWID`); there a value larger than a
//!   page's local payload (about 1 kB) spills to overflow pages, and SQLite reads such a
//!   cell's *whole* payload whenever a seek compares a key with it, so every insert and
//!   lookup next to 100 kB sample chunks and blob chunks copied them (a fifth of the
//!   ingest worker's CPU, bench/README.md). The index now holds only keys and row ids,
//!   and `ver` comes before `v` in a row, so a conflict check reads no value. The price:
//!   a range read looks every row up in the table by its id, tombstones too (the index
//!   cannot tell them apart), so a range with many fresh tombstones (an outbox just
//!   relayed, a log just trimmed) costs a lookup per tombstone until they are collected.
//!   A format 1 file is converted in one transaction when it is opened.
//! - `meta(name, val)`: `schema` (file format), `version` (the version of the last commit),
//!   `gc_version` (tombstones with `ver <= gc_version` may have been deleted).
//! - `commits(ver, at_ms)`: the wall-clock time of some commits, for tombstone GC.
//! - The file is in WAL mode with `synchronous=FULL`: a `COMMIT` that returned is in the
//!   fsynced WAL, so it survives a crash or power loss. Several threads and several
//!   processes may open the same file; SQLite's file locks serialise writers (a
//!   writer waits for the lock, trying again after 0.1 ms, then at most every 1 ms:
//!   [`busy_wait`]; a lock still busy after 5 s of that is [`KvError::Transient`],
//!   which [`crate::Db::transact`] retries).
//! - Writes to the WAL go through [`crate::wal_vfs`], SQLite's unix VFS with a WAL's
//!   writes gathered into `pwrite`s of 64 KiB until the sync that ends the commit
//!   (SQLite writes a frame as two calls, so 512 kB was 256 of them). The bytes on disk,
//!   the locks and the moment a commit is durable are the unix VFS's.
//! - Reads go through `pread` into SQLite's page cache, never through a memory map
//!   (`mmap_size` stays 0). A map was tried (2026-12-02: 1 GiB, about 5% less of the fleet's CPU, 11% of the
//!   publisher) and removed the same day: when `purge_deleted`'s `VACUUM` shrinks the
//!   file, a process still holding a map of the old size dies of SIGBUS on its next read
//!   past the new end. A read error through `pread` is an error SQLite returns; a
//!   fault in a map kills the process. (The SIGBUS seen in `cli/tests/forget.rs` came
//!   back without a map: that test read the store's files itself, and closing them
//!   dropped its process's POSIX locks, so another process truncated the shared-memory
//!   file the test still mapped. A process that has the store open must never open
//!   and close the store's files itself.)
//!
//! # Transactions: optimistic concurrency, as on FoundationDB
//! - *Begin*: take a pooled connection, `BEGIN` a read transaction and read `version`:
//!   that is the *read version*, and the WAL snapshot it pins is what every read sees.
//!   A fresh snapshot includes every commit that has returned, so transactions are
//!   strictly serializable.
//! - *Reads* see the snapshot overlaid with the transaction's own buffered writes
//!   (read-your-writes). Every read that consults the snapshot records a *read conflict
//!   range*: the key of a point read; for a range read, the part of the range the result
//!   depends on (all of it, or up to the last key returned when the limit cut it short).
//!   Reads answered from the buffer alone (a key set or cleared in this transaction) need
//!   none. [`BackendTx::atomic_add`] records none either; reading that key later does.
//! - *Writes* are only buffered until commit.
//! - *Commit* of a transaction with writes: end the read transaction, `BEGIN IMMEDIATE`
//!   (the write lock, across processes), and check that no row in any read conflict range
//!   has `ver > read_version` (tombstones included, so deletes conflict too). If one has,
//!   another transaction changed something this one read: roll back,
//!   [`KvError::Conflict`], and `transact` re-runs the closure. Otherwise apply the
//!   writes at `version + 1` (clears become tombstones; atomic adds are computed against
//!   the latest committed value, so they never conflict), bump `version`, `COMMIT`.
//! - *Group commit*: a process's committers queue; one at a time leads and commits
//!   every transaction queued so far in one SQLite transaction, so one fsync makes the
//!   whole group durable. Each member is checked and applied in order, at its own
//!   version, exactly as if it had committed alone after the members before it: its
//!   read conflict ranges are checked before it writes anything, so a member that
//!   conflicts (with them or with anything else) writes nothing and gets
//!   [`KvError::Conflict`]; any other failure fails the whole group. No member's commit
//!   returns before the group's `COMMIT` has: a crash loses a whole group, none of which
//!   had returned `Ok`.
//!   A transaction without writes commits without taking the write lock: its reads were
//!   one consistent snapshot, so it serialises at its read version.
//! - *After* a group's `COMMIT` returns, the committer rings the store's bell (a
//!   one-byte file beside it) so that [`crate::watch`]ers in any process wake up.
//!
//! # Tombstone garbage collection (invariants)
//! - A tombstone at version `t` matters only to a transaction whose read version is
//!   older than `t`. Every `GC_EVERY` commits, the committing transaction records the
//!   commit's wall-clock time in `commits`, finds the newest recorded version `g`
//!   committed more than `retention` (10 s, twice [`crate::limits::MAX_TXN_AGE`]) ago,
//!   deletes tombstones with `ver <= g`, and sets `gc_version = g`.
//! - Correctness does not depend on clocks: a transaction whose read version is older
//!   than `gc_version` cannot know whether a tombstone it needed was deleted, so its
//!   commit reports [`KvError::Conflict`] (and is retried on a fresh snapshot). Clocks
//!   (the injected one that enforces the 5 s age limit, the wall clock here, clock jumps,
//!   other processes' clocks) only decide how often that happens, never whether a
//!   conflict is missed.
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use crate::error::KvError;
use crate::kv::{Backend, BackendTx, KeyValue, Mutation, RangeOption};

/// File format version stored in `meta`; a file with another version is refused.
/// The file format this build writes (`meta.schema`): 2, `kv` a rowid table with a
/// unique index on `k` (see "Storage"). A format 1 file (`kv` WITHOUT ROWID) is
/// converted when opened.
const SCHEMA_VERSION: i64 = 2;
/// The `kv` table's columns in [`SCHEMA_VERSION`]: `ver` before `v`, so that reading a row's
/// version never walks its value's overflow pages.
const KV_COLUMNS: &str =
    "(id INTEGER PRIMARY KEY, k BLOB NOT NULL UNIQUE, ver INTEGER NOT NULL, v BLOB)";
const KV_TOMBSTONES: &str = "CREATE INDEX IF NOT EXISTS kv_tombstones ON kv(ver) WHERE v IS NULL";
/// How long a connection waits for SQLite's write lock before the attempt is retried.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection sleeps between two tries for a busy lock ([`busy_wait`]).
const BUSY_MAX_SLEEP: Duration = Duration::from_millis(1);
/// Idle connections kept for reuse.
const MAX_IDLE_CONNECTIONS: usize = 8;
/// Tombstone GC runs on every `GC_EVERY`-th commit.
const GC_EVERY: i64 = 128;
/// Tombstones are kept at least this long after the commit that wrote them.
const TOMBSTONE_RETENTION: Duration = Duration::from_secs(10);
/// The file name [`EmbeddedBackend::open_in_dir`] uses.
pub const DEFAULT_FILE_NAME: &str = "swimlane-store.sqlite";

/// An ordered, transactional key-value store in one SQLite file (see the module doc for
/// how FoundationDB's semantics are kept). `Send + Sync`: share one per process; other
/// processes may open the same file at the same time.
pub struct EmbeddedBackend {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
    /// This process's committers queue here; one of them at a time leads, committing
    /// everything queued as one group (see the module doc), so in-process contention
    /// waits on a condition variable rather than SQLite's sleep-based busy handler.
    /// Cross-process exclusion is SQLite's.
    commits: Mutex<CommitQueue>,
    committed: Condvar,
    gc_every: i64,
    retention: Duration,
    /// Rung after every commit, for [`crate::watch`]ers.
    bell: crate::watch::Bell,
    // Declared last: dropped after the connections.
    _temp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for EmbeddedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBackend")
            .field("path", &self.path)
            .finish()
    }
}

impl EmbeddedBackend {
    /// Open (creating if needed) the store file at `path`. Its parent directory is created
    /// if missing. Safe to call from several processes at once.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, KvError> {
        Self::open_inner(path.as_ref().to_path_buf(), None)
    }

    /// Open (creating if needed) [`DEFAULT_FILE_NAME`] inside `dir`.
    pub fn open_in_dir(dir: impl AsRef<Path>) -> Result<Self, KvError> {
        Self::open(dir.as_ref().join(DEFAULT_FILE_NAME))
    }

    /// A store in a fresh temporary directory, deleted when the backend is dropped
    /// (tests, benchmarks).
    pub fn open_temp() -> Result<Self, KvError> {
        let dir = tempfile::Builder::new()
            .prefix("swimlane-store-")
            .tempdir()
            .map_err(|e| KvError::Backend(format!("creating a temporary directory: {e}")))?;
        let path = dir.path().join(DEFAULT_FILE_NAME);
        Self::open_inner(path, Some(dir))
    }

    fn open_inner(path: PathBuf, temp: Option<tempfile::TempDir>) -> Result<Self, KvError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    KvError::Backend(format!("creating directory {}: {e}", parent.display()))
                })?;
            }
        }
        let conn = open_connection(&path)?;
        init_schema(&conn, &path)?;
        Ok(EmbeddedBackend {
            bell: crate::watch::Bell::open(&path),
            path,
            pool: Mutex::new(vec![conn]),
            commits: Mutex::new(CommitQueue::default()),
            committed: Condvar::new(),
            gc_every: GC_EVERY,
            retention: TOMBSTONE_RETENTION,
            _temp: temp,
        })
    }

    /// Tune tombstone GC: run it every `every` commits, keeping tombstones for
    /// `retention`. Only for tests of the GC invariant; the defaults are right otherwise.
    #[doc(hidden)]
    pub fn with_gc(mut self, every: i64, retention: Duration) -> Self {
        self.gc_every = every.max(1);
        self.retention = retention;
        self
    }

    /// The SQLite file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn take_connection(&self) -> Result<Connection, KvError> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(c) => Ok(c),
            None => open_connection(&self.path),
        }
    }

    fn return_connection(&self, conn: Connection) {
        if !conn.is_autocommit() && run(&conn, "ROLLBACK").is_err() {
            return; // state unknown: drop (close) it
        }
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_IDLE_CONNECTIONS {
            pool.push(conn);
        }
    }
}

/// Run `sql` (one statement without parameters or rows: `BEGIN`, `COMMIT`, ...) through
/// the connection's statement cache. Every transaction begins and ends with such
/// statements, and `execute_batch` parses them anew each time: the parser was 2-4% of
/// the ingest, validator and publisher workers' samples (bench/README.md).
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// `meta`'s value `name` (`version`, `gc_version`), through the statement cache: every
/// transaction reads the version when it begins and again when it commits.
fn meta_val(conn: &Connection, name: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT val FROM meta WHERE name = ?1")?
        .query_row(params![name], |r| r.get(0))
}

/// Statements a connection keeps prepared: every statement the hot paths run through
/// `prepare_cached` (about fifteen) fits, so none is parsed again after its first use.
const STATEMENT_CACHE: usize = 32;

fn open_connection(path: &Path) -> Result<Connection, KvError> {
    let ctx = |what: &str| format!("{what} {}", path.display());
    // SQLite's unix VFS with the WAL's writes gathered until its sync (`wal_vfs`).
    crate::wal_vfs::register().map_err(|e| KvError::Backend(format!("{}: {e}", ctx("opening"))))?;
    let conn = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        crate::wal_vfs::NAME,
    )
    .map_err(|e| map_sqlite(&ctx("opening"), e))?;
    conn.busy_handler(Some(busy_wait))
        .map_err(|e| map_sqlite(&ctx("configuring"), e))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Switching a new file to WAL needs a brief exclusive lock; processes opening the
    // same new file at once may see it busy for a moment.
    let mut attempts = 0;
    loop {
        let r: Result<String, _> =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0));
        match r {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => break,
            Ok(mode) => {
                return Err(KvError::Backend(format!(
                    "{}: journal_mode is {mode}, WAL is required",
                    ctx("opening")
                )))
            }
            Err(e) if is_busy(&e) && attempts < 100 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(map_sqlite(&ctx("enabling WAL on"), e)),
        }
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| map_sqlite(&ctx("configuring"), e))?;
    // Deleted content is overwritten with zeros (cells and freed pages), so a cleared
    // value is not left readable in the file (`purge_deleted` does the rest).
    conn.pragma_update(None, "secure_delete", "ON")
        .map_err(|e| map_sqlite(&ctx("configuring"), e))?;
    // No memory map (see "Storage": a file shrunk under a map is a SIGBUS).
    conn.pragma_update(None, "mmap_size", 0)
        .map_err(|e| map_sqlite(&ctx("configuring"), e))?;
    Ok(conn)
}

/// The pause before try `count + 1` for a lock another process holds, and the time slept
/// in the `count` tries before it: 100 µs, doubling to at most [`BUSY_MAX_SLEEP`].
fn busy_backoff(count: u32) -> (Duration, Duration) {
    let first = Duration::from_micros(100);
    let doublings = count.min(4);
    let sleep = (first * (1 << doublings)).min(BUSY_MAX_SLEEP);
    // 100 + 200 + 400 + 800 µs, then BUSY_MAX_SLEEP each.
    let slept = first * ((1 << doublings) - 1) + BUSY_MAX_SLEEP * count.saturating_sub(4);
    (sleep, slept)
}

/// SQLite's busy handler for every connection: sleep [`busy_backoff`] and try again, until
/// [`BUSY_TIMEOUT`] has been slept (then SQLite returns `SQLITE_BUSY`, a
/// [`KvError::Transient`]). SQLite's own handler (`busy_timeout`) sleeps 1, 2, 5, 10, 15,
/// 20, 25, 25, 25, 50, 50 and then 100 ms between tries: while ingest's large commits
/// keep the write lock busy, a waiter that sleeps that long keeps missing the moments it
/// is free (a validator was seen sleeping 330 ms in one wait during a burst,
/// bench/README.md "Waiting for the write lock"). A try is one `fcntl` lock attempt.
fn busy_wait(count: i32) -> bool {
    let (sleep, slept) = busy_backoff(u32::try_from(count).unwrap_or(0));
    if slept >= BUSY_TIMEOUT {
        return false;
    }
    std::thread::sleep(sleep);
    true
}

fn init_schema(conn: &Connection, path: &Path) -> Result<(), KvError> {
    let ctx = format!("creating the schema of {}", path.display());
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| map_sqlite(&ctx, e))?;
    let r = (|| -> rusqlite::Result<Option<i64>> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, val INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS commits (ver INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL);",
        )?;
        let found: Option<i64> = conn
            .query_row("SELECT val FROM meta WHERE name = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match found {
            None => {
                conn.execute_batch(&format!("CREATE TABLE kv {KV_COLUMNS}; {KV_TOMBSTONES};"))?;
                conn.execute(
                    "INSERT INTO meta(name, val) VALUES ('schema', ?1), ('version', 0), ('gc_version', 0)",
                    params![SCHEMA_VERSION],
                )?;
                Ok(Some(SCHEMA_VERSION))
            }
            // Format 1 kept values inside the key b-tree (a WITHOUT ROWID table): copied
            // into format 2 once, in this transaction, versions and tombstones and all.
            Some(1) => {
                conn.execute_batch(&format!(
                    "CREATE TABLE kv_v2 {KV_COLUMNS};
                     INSERT INTO kv_v2(k, ver, v) SELECT k, ver, v FROM kv ORDER BY k;
                     DROP TABLE kv;
                     ALTER TABLE kv_v2 RENAME TO kv;
                     {KV_TOMBSTONES};
                     UPDATE meta SET val = {SCHEMA_VERSION} WHERE name = 'schema';"
                ))?;
                Ok(Some(SCHEMA_VERSION))
            }
            other => Ok(other),
        }
    })();
    match r {
        Ok(Some(SCHEMA_VERSION)) => conn
            .execute_batch("COMMIT")
            .map_err(|e| map_sqlite(&ctx, e)),
        Ok(other) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(KvError::Backend(format!(
                "{}: file format {other:?}, this build reads {SCHEMA_VERSION} (and converts 1)",
                path.display()
            )))
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(map_sqlite(&ctx, e))
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// SQLite errors as [`KvError`]s: lock contention is transient (retried); everything
/// else (I/O error, disk full, corruption) is a backend error with a clear message.
fn map_sqlite(context: &str, e: rusqlite::Error) -> KvError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        let what = match f.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                return KvError::Transient(format!("{context}: database busy ({e})"))
            }
            ErrorCode::DiskFull => "disk full",
            ErrorCode::SystemIoFailure => "I/O error",
            ErrorCode::DatabaseCorrupt => "database file is corrupt",
            ErrorCode::NotADatabase => "not a database file",
            ErrorCode::CannotOpen => "cannot open the database file",
            ErrorCode::ReadOnly => "database is read-only",
            ErrorCode::PermissionDenied => "permission denied",
            _ => "sqlite error",
        };
        return KvError::Backend(format!("{context}: {what} ({e})"));
    }
    KvError::Backend(format!("{context}: {e}"))
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Backend for EmbeddedBackend {
    fn begin(&self) -> Result<Box<dyn BackendTx + '_>, KvError> {
        let conn = self.take_connection()?;
        let mut tx = EmbeddedTx {
            backend: self,
            conn: Some(conn),
            read_version: 0,
            buf: WriteBuffer::default(),
            conflicts: Vec::new(),
        };
        let conn = tx.conn();
        run(conn, "BEGIN").map_err(|e| map_sqlite("beginning a transaction", e))?;
        tx.read_version =
            meta_val(conn, "version").map_err(|e| map_sqlite("reading the store version", e))?;
        Ok(Box::new(tx))
    }
    fn name(&self) -> &'static str {
        "embedded"
    }

    /// An inotify watch on the store's bell, rung after every commit by any process
    /// that has the file open ([`crate::watch`]).
    fn change_watch(&self) -> Option<Box<dyn crate::watch::ChangeWatch>> {
        self.bell.watch()
    }

    /// Collect every tombstone now (not only those older than the retention: a
    /// transaction whose read version is older than the new `gc_version` conflicts and
    /// is retried, as after any collection), rebuild the file (`VACUUM`: the `kv`
    /// table's key index is a b-tree whose interior pages keep copies of keys as
    /// dividers, even of keys since deleted, and `secure_delete` does not reach those),
    /// then checkpoint the WAL and truncate it. The cleared values and keys are then
    /// gone from both files. `VACUUM` costs time and disk in proportion to the store
    /// (it writes it whole once). The truncation needs a moment with no reader in the
    /// WAL; under constant load it may not get one (`log_truncated: false`): the WAL's
    /// old frames are then overwritten as it is reused, and a later purge truncates it.
    fn purge_deleted(&self) -> Result<crate::Purged, KvError> {
        let conn = self.take_connection()?;
        let m = |e| map_sqlite("purging deleted data", e);
        let collected = (|| -> Result<u64, KvError> {
            conn.execute_batch("BEGIN IMMEDIATE").map_err(m)?;
            let r = (|| -> rusqlite::Result<u64> {
                let version = meta_val(&conn, "version")?;
                let n = conn.execute(
                    "DELETE FROM kv WHERE v IS NULL AND ver <= ?1",
                    params![version],
                )?;
                conn.execute("DELETE FROM commits WHERE ver < ?1", params![version])?;
                conn.execute(
                    "UPDATE meta SET val = MAX(val, ?1) WHERE name = 'gc_version'",
                    params![version],
                )?;
                Ok(n as u64)
            })();
            match r {
                Ok(n) => {
                    conn.execute_batch("COMMIT").map_err(m)?;
                    Ok(n)
                }
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    Err(m(e))
                }
            }
        })();
        let result = collected.and_then(|n| {
            conn.execute_batch("VACUUM").map_err(m)?;
            let mut truncated = false;
            for _ in 0..50 {
                let (busy, _, _): (i64, i64, i64) = conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .map_err(m)?;
                if busy == 0 {
                    truncated = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(crate::Purged {
                supported: true,
                tombstones_removed: n,
                log_truncated: truncated,
            })
        });
        self.return_connection(conn);
        result
    }
}

/// A read conflict: a key, or a range `[begin, end)`.
#[derive(Debug, Clone)]
enum Conflict {
    Key(Vec<u8>),
    Range(Vec<u8>, Vec<u8>),
}

struct EmbeddedTx<'a> {
    backend: &'a EmbeddedBackend,
    conn: Option<Connection>,
    read_version: i64,
    buf: WriteBuffer,
    conflicts: Vec<Conflict>,
}

impl Drop for EmbeddedTx<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.backend.return_connection(conn);
        }
    }
}

impl EmbeddedTx<'_> {
    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("connection present until drop")
    }

    fn snapshot_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT v FROM kv WHERE k = ?1")
            .map_err(|e| map_sqlite("reading a key", e))?;
        let v: Option<Option<Vec<u8>>> = stmt
            .query_row(params![key], |r| r.get(0))
            .optional()
            .map_err(|e| map_sqlite("reading a key", e))?;
        Ok(v.flatten())
    }

    fn commit_writes(&mut self) -> Result<(), KvError> {
        let backend = self.backend;
        let conn = self.conn.as_ref().expect("connection present until drop");
        // The read snapshot cannot be upgraded to a writer once others committed; end it
        // and validate reads against the latest data under the write lock instead.
        run(conn, "ROLLBACK").map_err(|e| map_sqlite("ending the read snapshot", e))?;
        let job = Job {
            read_version: self.read_version,
            conflicts: std::mem::take(&mut self.conflicts),
            buf: std::mem::take(&mut self.buf),
        };
        let mut q = backend.commits.lock().unwrap_or_else(|e| e.into_inner());
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.waiting.push((ticket, job));
        loop {
            if let Some(r) = q.done.remove(&ticket) {
                return r;
            }
            if !q.leading {
                // Lead: commit everything queued (this job included) as one group.
                q.leading = true;
                let group = std::mem::take(&mut q.waiting);
                drop(q);
                let mut lead = Leading {
                    backend,
                    tickets: group.iter().map(|(t, _)| *t).collect(),
                    results: None,
                };
                lead.results = Some(commit_group(conn, &group, backend));
                drop(lead);
                q = backend.commits.lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            q = backend.committed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A transaction's writes waiting to commit: what [`apply`] needs.
struct Job {
    read_version: i64,
    conflicts: Vec<Conflict>,
    buf: WriteBuffer,
}

/// The commit queue of one backend (one process).
#[derive(Default)]
struct CommitQueue {
    /// Jobs no leader has taken yet, in arrival order.
    waiting: Vec<(u64, Job)>,
    /// Results of committed groups, by ticket, for their committers to take.
    done: HashMap<u64, Result<(), KvError>>,
    /// Whether a committer is committing a group now.
    leading: bool,
    next_ticket: u64,
}

/// The leader's results, handed over when it is dropped: after its group, or when it
/// unwinds (its jobs then fail rather than wait for ever).
struct Leading<'a> {
    backend: &'a EmbeddedBackend,
    tickets: Vec<u64>,
    results: Option<Vec<(u64, Result<(), KvError>)>>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let results = self.results.take().unwrap_or_else(|| {
            let lost = || Err(KvError::Backend("the committing thread panicked".into()));
            self.tickets.iter().map(|t| (*t, lost())).collect()
        });
        let mut q = self
            .backend
            .commits
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        q.leading = false;
        q.done.extend(results);
        self.backend.committed.notify_all();
    }
}

/// Commit `group` in one SQLite transaction and one fsync: each job is validated and
/// applied in order ([`apply`] checks every read conflict range before it writes
/// anything, so a job that conflicts is skipped having written nothing and gets
/// [`KvError::Conflict`]); any other error leaves the transaction in an unknown state,
/// so the whole group is rolled back and fails, as does a failed `COMMIT`.
fn commit_group(
    conn: &Connection,
    group: &[(u64, Job)],
    backend: &EmbeddedBackend,
) -> Vec<(u64, Result<(), KvError>)> {
    let every = |e: KvError| -> Vec<(u64, Result<(), KvError>)> {
        group
            .iter()
            .map(|(t, _)| (*t, Err(same_error(&e))))
            .collect()
    };
    if let Err(e) = run(conn, "BEGIN IMMEDIATE") {
        return every(map_sqlite("taking the write lock", e));
    }
    let mut results = Vec::with_capacity(group.len());
    for (ticket, job) in group {
        match apply(conn, job.read_version, &job.conflicts, &job.buf, backend) {
            Ok(()) => results.push((*ticket, Ok(()))),
            Err(KvError::Conflict) => results.push((*ticket, Err(KvError::Conflict))),
            Err(e) => {
                let _ = run(conn, "ROLLBACK");
                return every(e);
            }
        }
    }
    match run(conn, "COMMIT") {
        Ok(()) => {
            backend.bell.ring();
            results
        }
        Err(e) => {
            let _ = run(conn, "ROLLBACK");
            every(map_sqlite("committing", e))
        }
    }
}

/// The same error again, for every job of a group that failed as a whole.
fn same_error(e: &KvError) -> KvError {
    match e {
        KvError::Transient(s) => KvError::Transient(s.clone()),
        KvError::Conflict => KvError::Conflict,
        other => KvError::Backend(other.to_string()),
    }
}

/// Validate and apply one transaction's writes; runs inside `BEGIN IMMEDIATE`.
fn apply(
    conn: &Connection,
    read_version: i64,
    conflicts: &[Conflict],
    buf: &WriteBuffer,
    backend: &EmbeddedBackend,
) -> Result<(), KvError> {
    let m = |e| map_sqlite("committing", e);
    let meta = |name: &str| meta_val(conn, name).map_err(m);
    let current = meta("version")?;
    if !conflicts.is_empty() && current != read_version {
        if read_version < meta("gc_version")? {
            // Tombstones this transaction may need were garbage collected.
            return Err(KvError::Conflict);
        }
        let mut key_stmt = conn
            .prepare_cached("SELECT 1 FROM kv WHERE k = ?1 AND ver > ?2")
            .map_err(m)?;
        let mut range_stmt = conn
            .prepare_cached("SELECT 1 FROM kv WHERE k >= ?1 AND k < ?2 AND ver > ?3 LIMIT 1")
            .map_err(m)?;
        for c in conflicts {
            let changed = match c {
                Conflict::Key(k) => key_stmt.exists(params![k, read_version]),
                Conflict::Range(b, e) => range_stmt.exists(params![b, e, read_version]),
            }
            .map_err(m)?;
            if changed {
                return Err(KvError::Conflict);
            }
        }
    }
    let ver = current + 1;
    let mut clear_range = conn
        .prepare_cached(
            "UPDATE kv SET v = NULL, ver = ?3 WHERE k >= ?1 AND k < ?2 AND v IS NOT NULL",
        )
        .map_err(m)?;
    for (b, e) in &buf.cleared {
        clear_range.execute(params![b, e, ver]).map_err(m)?;
    }
    let mut upsert = conn
        .prepare_cached(
            "INSERT INTO kv(k, v, ver) VALUES (?1, ?2, ?3)
             ON CONFLICT(k) DO UPDATE SET v = excluded.v, ver = excluded.ver",
        )
        .map_err(m)?;
    let mut clear = conn
        .prepare_cached("UPDATE kv SET v = NULL, ver = ?2 WHERE k = ?1 AND v IS NOT NULL")
        .map_err(m)?;
    let mut get = conn
        .prepare_cached("SELECT v FROM kv WHERE k = ?1")
        .map_err(m)?;
    for (k, op) in &buf.ops {
        match op {
            Op::Set(v) => {
                upsert.execute(params![k, v, ver]).map_err(m)?;
            }
            Op::Clear => {
                clear.execute(params![k, ver]).map_err(m)?;
            }
            Op::Add(d) => {
                let base: Option<Vec<u8>> = get
                    .query_row(params![k], |r| r.get::<_, Option<Vec<u8>>>(0))
                    .optional()
                    .map_err(m)?
                    .flatten();
                let v = add_le(base.as_deref(), *d);
                upsert.execute(params![k, v, ver]).map_err(m)?;
            }
        }
    }
    conn.prepare_cached("UPDATE meta SET val = ?1 WHERE name = 'version'")
        .and_then(|mut s| s.execute(params![ver]))
        .map_err(m)?;
    if ver % backend.gc_every == 0 {
        collect_tombstones(conn, ver, backend.retention)?;
    }
    Ok(())
}

/// Record this commit's time and delete tombstones old enough that no transaction that
/// could still commit needs them (see the module doc).
fn collect_tombstones(conn: &Connection, ver: i64, retention: Duration) -> Result<(), KvError> {
    let m = |e| map_sqlite("collecting tombstones", e);
    let now = now_unix_ms();
    conn.execute(
        "INSERT OR REPLACE INTO commits(ver, at_ms) VALUES (?1, ?2)",
        params![ver, now],
    )
    .map_err(m)?;
    let cutoff = now - retention.as_millis() as i64;
    let horizon: Option<i64> = conn
        .query_row(
            "SELECT MAX(ver) FROM commits WHERE at_ms <= ?1",
            params![cutoff],
            |r| r.get(0),
        )
        .map_err(m)?;
    let gc_version = meta_val(conn, "gc_version").map_err(m)?;
    if let Some(g) = horizon.filter(|&g| g > gc_version) {
        let n = conn
            .execute("DELETE FROM kv WHERE v IS NULL AND ver <= ?1", params![g])
            .map_err(m)?;
        conn.execute("DELETE FROM commits WHERE ver < ?1", params![g])
            .map_err(m)?;
        conn.execute(
            "UPDATE meta SET val = ?1 WHERE name = 'gc_version'",
            params![g],
        )
        .map_err(m)?;
        tracing::debug!(tombstones = n, gc_version = g, "collected tombstones");
    }
    Ok(())
}

impl BackendTx for EmbeddedTx<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        match self.buf.lookup(key) {
            Lookup::Known(v) => Ok(v),
            Lookup::Add(d) => {
                let base = self.snapshot_get(key)?;
                self.conflicts.push(Conflict::Key(key.to_vec()));
                Ok(Some(add_le(base.as_deref(), d)))
            }
            Lookup::Unknown => {
                let v = self.snapshot_get(key)?;
                self.conflicts.push(Conflict::Key(key.to_vec()));
                Ok(v)
            }
        }
    }

    fn get_range(&mut self, range: &RangeOption) -> Result<Vec<KeyValue>, KvError> {
        let sql = if range.reverse {
            "SELECT k, v FROM kv WHERE k >= ?1 AND k < ?2 AND v IS NOT NULL ORDER BY k DESC"
        } else {
            "SELECT k, v FROM kv WHERE k >= ?1 AND k < ?2 AND v IS NOT NULL ORDER BY k ASC"
        };
        let (out, cut) = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare_cached(sql)
                .map_err(|e| map_sqlite("reading a range", e))?;
            let rows = stmt
                .query_map(params![range.begin, range.end], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .map_err(|e| map_sqlite("reading a range", e))?
                .map(|r| r.map_err(|e| map_sqlite("reading a range", e)));
            merge_range(rows, &self.buf, range)?
        };
        let conflict = match (cut, out.last()) {
            (true, Some((last, _))) if !range.reverse => {
                Conflict::Range(range.begin.clone(), key_after(last))
            }
            (true, Some((last, _))) => Conflict::Range(last.clone(), range.end.clone()),
            _ => Conflict::Range(range.begin.clone(), range.end.clone()),
        };
        self.conflicts.push(conflict);
        Ok(out)
    }

    fn mutate(&mut self, m: Mutation<'_>) -> Result<(), KvError> {
        self.buf.apply(m);
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<(), KvError> {
        if self.buf.is_empty() {
            // Read-only: the snapshot was consistent; nothing to validate or write.
            return run(self.conn(), "COMMIT")
                .map_err(|e| map_sqlite("ending a read-only transaction", e));
        }
        self.commit_writes()
    }
}

/// The smallest key after `k` (`k` followed by a zero byte).
fn key_after(k: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(k.len() + 1);
    v.extend_from_slice(k);
    v.push(0);
    v
}

/// FDB's `ADD` on an 8-byte little-endian operand: the existing value (absent = 0) is
/// read as little-endian, zero-extended or truncated to 8 bytes; addition wraps.
pub(crate) fn add_le(base: Option<&[u8]>, delta: i64) -> Vec<u8> {
    let mut b = [0u8; 8];
    if let Some(v) = base {
        let n = v.len().min(8);
        b[..n].copy_from_slice(&v[..n]);
    }
    i64::from_le_bytes(b)
        .wrapping_add(delta)
        .to_le_bytes()
        .to_vec()
}

/// One buffered write to a key.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Set(Vec<u8>),
    Clear,
    /// Add to whatever the snapshot holds (the key is not under a buffered clear).
    Add(i64),
}

/// What the buffer knows about a key.
#[derive(Debug, PartialEq)]
enum Lookup {
    Known(Option<Vec<u8>>),
    Add(i64),
    Unknown,
}

/// A transaction's buffered writes: per-key ops over a set of cleared ranges. A cleared
/// range hides the snapshot; an op on a key overrides both (ops made before a clear
/// range are dropped by it).
#[derive(Debug, Default)]
struct WriteBuffer {
    ops: BTreeMap<Vec<u8>, Op>,
    /// Disjoint, non-adjacent ranges `begin -> end`.
    cleared: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl WriteBuffer {
    fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.cleared.is_empty()
    }
    fn is_cleared(&self, key: &[u8]) -> bool {
        self.cleared
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .is_some_and(|(_, end)| key < end.as_slice())
    }
    fn lookup(&self, key: &[u8]) -> Lookup {
        match self.ops.get(key) {
            Some(Op::Set(v)) => Lookup::Known(Some(v.clone())),
            Some(Op::Clear) => Lookup::Known(None),
            Some(Op::Add(d)) => Lookup::Add(*d),
            None if self.is_cleared(key) => Lookup::Known(None),
            None => Lookup::Unknown,
        }
    }
    fn apply(&mut self, m: Mutation<'_>) {
        match m {
            Mutation::Set(key, value) => self.set(key, value),
            Mutation::Clear(key) => self.clear(key),
            Mutation::ClearRange(begin, end) => self.clear_range(begin, end),
            Mutation::Add(key, delta) => self.atomic_add(key, delta),
        }
    }
    fn set(&mut self, key: &[u8], value: &[u8]) {
        self.ops.insert(key.to_vec(), Op::Set(value.to_vec()));
    }
    fn clear(&mut self, key: &[u8]) {
        self.ops.insert(key.to_vec(), Op::Clear);
    }
    fn atomic_add(&mut self, key: &[u8], delta: i64) {
        let cleared = self.is_cleared(key);
        let op = match self.ops.get(key) {
            Some(Op::Set(v)) => Op::Set(add_le(Some(v), delta)),
            Some(Op::Clear) => Op::Set(add_le(None, delta)),
            Some(Op::Add(d)) => Op::Add(d.wrapping_add(delta)),
            None if cleared => Op::Set(add_le(None, delta)),
            None => Op::Add(delta),
        };
        self.ops.insert(key.to_vec(), op);
    }
    fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin >= end {
            return;
        }
        // Drop ops inside the range.
        let mut tail = self.ops.split_off(begin);
        let mut rest = tail.split_off(end);
        self.ops.append(&mut rest);
        // Merge with overlapping or adjacent cleared ranges.
        let (mut b, mut e) = (begin.to_vec(), end.to_vec());
        let touching: Vec<Vec<u8>> = self
            .cleared
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(end)))
            .rev()
            .take_while(|(_, en)| en.as_slice() >= begin)
            .map(|(s, _)| s.clone())
            .collect();
        for s in touching {
            let en = self.cleared.remove(&s).expect("present");
            if s < b {
                b = s;
            }
            if en > e {
                e = en;
            }
        }
        self.cleared.insert(b, e);
    }
}

/// Merge snapshot rows (already in the requested order, tombstones excluded) with the
/// buffer. Returns the result and whether the limit cut it short.
fn merge_range(
    snapshot: impl Iterator<Item = Result<KeyValue, KvError>>,
    buf: &WriteBuffer,
    range: &RangeOption,
) -> Result<(Vec<KeyValue>, bool), KvError> {
    let limit = range.limit.unwrap_or(usize::MAX);
    let bounds = (
        Bound::Included(range.begin.as_slice()),
        Bound::Excluded(range.end.as_slice()),
    );
    let ops = buf.ops.range::<[u8], _>(bounds);
    let mut ops: Box<dyn Iterator<Item = (&Vec<u8>, &Op)>> = if range.reverse {
        Box::new(ops.rev())
    } else {
        Box::new(ops)
    };
    let mut snap = snapshot;
    let mut s_head: Option<KeyValue> = snap.next().transpose()?;
    let mut b_head = ops.next();
    let mut out = Vec::new();
    loop {
        if out.len() >= limit {
            return Ok((out, true));
        }
        let order = match (&s_head, &b_head) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((sk, _)), Some((bk, _))) => {
                let o = sk.as_slice().cmp(bk.as_slice());
                if range.reverse {
                    o.reverse()
                } else {
                    o
                }
            }
        };
        match order {
            std::cmp::Ordering::Less => {
                let (k, v) = s_head.take().expect("snapshot head");
                if !buf.is_cleared(&k) {
                    out.push((k, v));
                }
                s_head = snap.next().transpose()?;
            }
            std::cmp::Ordering::Greater => {
                let (k, op) = b_head.take().expect("buffer head");
                match op {
                    Op::Set(v) => out.push((k.clone(), v.clone())),
                    Op::Clear => {}
                    Op::Add(d) => out.push((k.clone(), add_le(None, *d))),
                }
                b_head = ops.next();
            }
            std::cmp::Ordering::Equal => {
                let (k, sv) = s_head.take().expect("snapshot head");
                let (_, op) = b_head.take().expect("buffer head");
                match op {
                    Op::Set(v) => out.push((k, v.clone())),
                    Op::Clear => {}
                    Op::Add(d) => out.push((k, add_le(Some(&sv), *d))),
                }
                s_head = snap.next().transpose()?;
                b_head = ops.next();
            }
        }
    }
    Ok((out, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Db;

    fn rows(keys: &[(&[u8], &[u8])]) -> Vec<Result<KeyValue, KvError>> {
        keys.iter()
            .map(|(k, v)| Ok((k.to_vec(), v.to_vec())))
            .collect()
    }

    /// The busy handler's pauses: short first, never over `BUSY_MAX_SLEEP`, each try's
    /// `slept` the sum of the pauses before it, and it gives up once `BUSY_TIMEOUT` is
    /// slept (after about 5,000 tries, not never).
    #[test]
    fn the_busy_handler_backs_off_to_a_millisecond_and_gives_up_at_the_timeout() {
        let mut total = Duration::ZERO;
        let mut count = 0u32;
        loop {
            let (sleep, slept) = busy_backoff(count);
            assert_eq!(slept, total, "try {count}");
            assert!(sleep <= BUSY_MAX_SLEEP && sleep >= Duration::from_micros(100));
            if slept >= BUSY_TIMEOUT {
                break;
            }
            total += sleep;
            count += 1;
            assert!(count < 10_000, "never gives up");
        }
        assert_eq!(busy_backoff(0).0, Duration::from_micros(100));
        assert!(count > 4_000, "gave up after {count} tries, {total:?}");
        assert!(!busy_wait(i32::try_from(count).unwrap()));
    }

    /// After `purge_deleted`, no byte of a cleared key or value is left in the store's
    /// files and the keys kept are all there. Enough keys, cleared and kept interleaved,
    /// that the key index has interior pages whose dividers `secure_delete` does not
    /// reach (without the `VACUUM` this test fails on them, and on bytes left in the
    /// free space of the table's own pages).
    #[test]
    fn a_purge_leaves_no_cleared_byte_in_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let marker = b"forget-me-7f3a";
        let key = |i: u32, gone: bool| {
            let who: &[u8] = if gone { marker } else { b"keep-this-user" };
            // Cleared and kept keys interleave, so pages of the index keep live keys
            // and a cleared key can stay behind as a divider.
            [format!("s/{i:06}/").as_bytes(), who].concat()
        };
        {
            let db = Db::new(EmbeddedBackend::open(&path).unwrap());
            for chunk in 0..20u32 {
                db.transact(|tx| {
                    for i in chunk * 100..(chunk + 1) * 100 {
                        let mut v = marker.repeat(20);
                        v.extend_from_slice(&i.to_le_bytes());
                        tx.set(&key(i, true), &v)?;
                        tx.set(&key(i, false), &i.to_le_bytes())?;
                    }
                    Ok(())
                })
                .unwrap();
            }
            db.transact(|tx| {
                for i in 0..2_000 {
                    tx.clear(&key(i, true))?;
                }
                Ok(())
            })
            .unwrap();
            let purged = db.purge_deleted().unwrap();
            assert!(purged.supported && purged.log_truncated, "{purged:?}");
            assert!(purged.tombstones_removed >= 2_000, "{purged:?}");
            db.transact(|tx| {
                for i in 0..2_000 {
                    assert_eq!(tx.get(&key(i, false))?, Some(i.to_le_bytes().to_vec()));
                    assert_eq!(tx.get(&key(i, true))?, None);
                }
                Ok(())
            })
            .unwrap();
        }
        // Every connection closed: read the files whole.
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "{} still holds the cleared bytes",
                p.display()
            );
        }
    }

    /// A file written in format 1 (`kv` WITHOUT ROWID) opens as format 2 with every
    /// value, version and tombstone, and keeps working; a newer format is refused.
    #[test]
    fn a_format_1_file_is_converted_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "PRAGMA journal_mode=WAL;
                 CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB, ver INTEGER NOT NULL) WITHOUT ROWID;
                 CREATE INDEX kv_tombstones ON kv(ver) WHERE v IS NULL;
                 CREATE TABLE meta (name TEXT PRIMARY KEY, val INTEGER NOT NULL);
                 CREATE TABLE commits (ver INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL);
                 INSERT INTO meta(name, val) VALUES ('schema', 1), ('version', 3), ('gc_version', 0);",
            )
            .unwrap();
            let big = vec![7u8; 90_000];
            c.execute("INSERT INTO kv(k, v, ver) VALUES (x'61', x'41', 1)", [])
                .unwrap();
            c.execute(
                "INSERT INTO kv(k, v, ver) VALUES (x'62', ?1, 2)",
                params![big],
            )
            .unwrap();
            c.execute("INSERT INTO kv(k, v, ver) VALUES (x'63', NULL, 3)", [])
                .unwrap();
        }
        let db = Db::new(EmbeddedBackend::open(&path).unwrap());
        let all = db
            .transact(|tx| tx.get_range(&RangeOption::new(b"".to_vec(), b"z".to_vec())))
            .unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], (b"a".to_vec(), b"A".to_vec()));
        assert_eq!(all[1].1, vec![7u8; 90_000]);
        db.transact(|tx| tx.set(b"c", b"C")).unwrap();
        assert_eq!(db.transact(|tx| tx.get(b"c")).unwrap(), Some(b"C".to_vec()));
        let c = Connection::open(&path).unwrap();
        let meta = |name: &str| -> i64 {
            c.query_row("SELECT val FROM meta WHERE name = ?1", params![name], |r| {
                r.get(0)
            })
            .unwrap()
        };
        assert_eq!(meta("schema"), SCHEMA_VERSION);
        assert_eq!(meta("version"), 4, "versions carry on from the old file's");
        let tombstones: i64 = c
            .query_row("SELECT COUNT(*) FROM kv WHERE v IS NULL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tombstones, 0, "c's tombstone was replaced by its new value");
        drop(db);
        c.execute("UPDATE meta SET val = 99 WHERE name = 'schema'", [])
            .unwrap();
        let err = EmbeddedBackend::open(&path)
            .err()
            .expect("a newer format is refused");
        assert!(err.to_string().contains("file format Some(99)"), "{err}");
    }

    #[test]
    fn clear_ranges_merge_and_drop_ops() {
        let mut b = WriteBuffer::default();
        b.set(b"b", b"1");
        b.set(b"d", b"2");
        b.clear_range(b"a", b"c");
        b.clear_range(b"c", b"e"); // adjacent: merged
        b.clear_range(b"x", b"z");
        assert!(b.ops.is_empty());
        assert_eq!(b.cleared.len(), 2);
        assert_eq!(b.cleared.get(b"a".as_slice()), Some(&b"e".to_vec()));
        assert!(b.is_cleared(b"a") && b.is_cleared(b"d") && !b.is_cleared(b"e"));
        b.clear_range(b"0", b"y"); // swallows both
        assert_eq!(b.cleared.len(), 1);
        assert_eq!(b.cleared.get(b"0".as_slice()), Some(&b"z".to_vec()));
        b.atomic_add(b"m", 5);
        assert_eq!(
            b.lookup(b"m"),
            Lookup::Known(Some(5i64.to_le_bytes().to_vec()))
        );
    }

    #[test]
    fn merge_overlays_buffer_forward_reverse_and_limit() {
        let mut b = WriteBuffer::default();
        b.clear_range(b"b", b"d"); // hides b, c
        b.set(b"c", b"new"); // but c is set again
        b.set(b"e", b"E");
        b.clear(b"f");
        b.atomic_add(b"g", 2);
        let snap: &[(&[u8], &[u8])] = &[
            (b"a", b"A"),
            (b"b", b"B"),
            (b"c", b"C"),
            (b"f", b"F"),
            (b"g", &[1, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let r = RangeOption::new(b"a".to_vec(), b"z".to_vec());
        let (out, cut) = merge_range(rows(snap).into_iter(), &b, &r).unwrap();
        let keys: Vec<&[u8]> = out.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, vec![&b"a"[..], b"c", b"e", b"g"]);
        assert_eq!(out[1].1, b"new");
        assert_eq!(out[3].1, 3i64.to_le_bytes());
        assert!(!cut);
        let mut rev_snap = rows(snap);
        rev_snap.reverse();
        let (out, cut) =
            merge_range(rev_snap.into_iter(), &b, &r.clone().reverse().limit(3)).unwrap();
        let keys: Vec<&[u8]> = out.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, vec![&b"g"[..], b"e", b"c"]);
        assert!(cut);
    }

    #[test]
    fn add_le_wraps_and_resizes() {
        assert_eq!(add_le(None, -1), (-1i64).to_le_bytes());
        assert_eq!(add_le(Some(&[1]), 1), 2i64.to_le_bytes());
        assert_eq!(add_le(Some(&[0xff; 9]), 1), 0i64.to_le_bytes());
    }

    /// The GC invariant: once a tombstone a transaction needed may be gone, that
    /// transaction's commit reports a conflict instead of silently succeeding.
    #[test]
    fn transaction_older_than_gc_horizon_conflicts() {
        let backend = EmbeddedBackend::open_temp()
            .unwrap()
            .with_gc(1, Duration::ZERO);
        let db = Db::new(backend);
        db.transact(|tx| tx.set(b"k", b"v")).unwrap();
        let be = db.backend();
        // T1 reads k.
        let mut t1 = be.begin().unwrap();
        assert_eq!(t1.get(b"k").unwrap(), Some(b"v".to_vec()));
        // T2 deletes k (a tombstone), T3 commits and, with retention zero, GCs it.
        db.transact(|tx| tx.clear(b"k")).unwrap();
        db.transact(|tx| tx.set(b"other", b"x")).unwrap();
        t1.mutate(Mutation::Set(b"k2", b"from t1")).unwrap();
        assert!(matches!(t1.commit(), Err(KvError::Conflict)));
    }

    /// Two transactions that read the same key at the same version and both write it,
    /// committed in one group: the first commits, the second conflicts and writes
    /// nothing (its other write is not applied either), exactly as if each had committed
    /// alone in turn; a blind write in the same group commits too.
    #[test]
    fn a_group_commits_its_members_in_order_and_undoes_a_conflicting_one_alone() {
        let be = EmbeddedBackend::open_temp().unwrap();
        // Another backend on the same file, as another process would open it.
        let db = Db::new(EmbeddedBackend::open(be.path()).unwrap());
        db.transact(|tx| tx.set(b"k", b"0")).unwrap();
        let conn = open_connection(be.path()).unwrap();
        let version: i64 = conn
            .query_row("SELECT val FROM meta WHERE name = 'version'", [], |r| {
                r.get(0)
            })
            .unwrap();
        let job = |v: &[u8], other: &[u8], reads_k: bool| {
            let mut buf = WriteBuffer::default();
            buf.set(b"k", v);
            buf.set(other, b"x");
            let conflicts = if reads_k {
                vec![Conflict::Key(b"k".to_vec())]
            } else {
                Vec::new()
            };
            Job {
                read_version: version,
                conflicts,
                buf,
            }
        };
        let group = vec![
            (1, job(b"first", b"a", true)),
            (2, job(b"second", b"b", true)),
            (3, job(b"blind", b"c", false)),
        ];
        let results = commit_group(&conn, &group, &be);
        assert!(results[0].1.is_ok());
        assert!(
            matches!(results[1].1, Err(KvError::Conflict)),
            "{:?}",
            results[1].1
        );
        assert!(results[2].1.is_ok());
        assert_eq!(db.get(b"k").unwrap(), Some(b"blind".to_vec()));
        assert_eq!(db.get(b"a").unwrap(), Some(b"x".to_vec()));
        assert_eq!(
            db.get(b"b").unwrap(),
            None,
            "the conflicting member left nothing"
        );
        assert_eq!(db.get(b"c").unwrap(), Some(b"x".to_vec()));
        let after: i64 = conn
            .query_row("SELECT val FROM meta WHERE name = 'version'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(after, version + 2, "one version per member that committed");
    }

    #[test]
    fn tombstones_are_collected() {
        let backend = EmbeddedBackend::open_temp()
            .unwrap()
            .with_gc(1, Duration::ZERO);
        let path = backend.path().to_path_buf();
        let db = Db::new(backend);
        db.transact(|tx| {
            for i in 0..10u8 {
                tx.set(&[i], b"v")?;
            }
            Ok(())
        })
        .unwrap();
        db.transact(|tx| tx.clear_range(&[0], &[10])).unwrap();
        db.transact(|tx| tx.set(b"z", b"z")).unwrap();
        db.transact(|tx| tx.set(b"z", b"z2")).unwrap();
        let conn = Connection::open(path).unwrap();
        let tombstones: i64 = conn
            .query_row("SELECT COUNT(*) FROM kv WHERE v IS NULL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tombstones, 0);
    }
}
