//! `swimlane-wal`: SQLite's own unix VFS, with the writes to a WAL file gathered into
//! `pwrite`s of up to 64 KiB of consecutive bytes.
//!
//! # Why
//! SQLite appends a WAL frame as two writes, a 24-byte header and then the page, so a
//! commit of 512 kB of windows was 256 `pwrite`s of at most 4 KiB, and the kernel's
//! cost of a write is mostly per call (`bench/README.md`, "Gathered WAL writes",
//! measured by `bench/write_sizes.c`: on this machine 512 kB written as 4 KiB `pwrite`s
//! took 3-4 times the CPU of 64 KiB ones). The
//! WAL is written strictly in order between two syncs, so the bytes can wait in memory
//! until the sync that makes them durable.
//!
//! # Guarantees
//! - **Durability is SQLite's.** Buffered bytes are written before the file's `xSync`
//!   is passed on, so when SQLite's commit syncs the WAL every byte it wrote is in the
//!   file first, exactly as without this VFS. A failed write is reported by that sync,
//!   and the commit fails.
//! - **Every read sees every write.** Before any other call on the same WAL file
//!   (`xRead`, `xTruncate`, `xFileSize`, `xFileControl`, `xFetch`, `xClose`) and before
//!   a write that does not continue the buffered run, the buffer is written out.
//! - **No buffered byte outlives the write lock it was written under.** SQLite writes
//!   the WAL only while it holds the WAL write lock, a lock in the shared-memory file,
//!   and it releases that lock through `xShmLock` on the database file, in the thread
//!   that wrote (a transaction runs on one thread: the store never moves a connection
//!   between threads inside one). Before any `xShmLock` this thread's buffered WAL
//!   bytes are written out,
//!   so a transaction that spilled frames and then rolled back leaves nothing behind to
//!   be written later over frames that another connection committed since. (Writing
//!   such bytes early is what SQLite itself does: it writes each frame at once.)
//! - **A failed write is never lost.** If writing the buffer fails, the error is kept
//!   and returned by the file's next call (the commit's sync at the latest), so a
//!   commit whose frames did not reach the file fails.
//! - **Bounded memory.** A WAL file holds at most [`BUFFER`] (1 MiB) of waiting bytes,
//!   in one buffer allocated once and kept until the file closes; a longer run is
//!   written out as it fills.
//! - Only writes to files SQLite opens as WAL files are gathered; every other call on
//!   any file goes straight to the unix VFS. The file format and the locking are the
//!   unix VFS's, so processes with and without this VFS share a store safely.
use std::cell::RefCell;
use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The VFS's registered name.
pub(crate) const NAME: &CStr = c"swimlane-wal";
/// A WAL file's buffer: allocated at its first gathered write with room for this much,
/// never grown and kept until the file closes. A run that would outgrow it is written out
/// first (a commit of an upload's windows fits in one), and a larger write goes straight
/// through. Why never grown or freed: memory this process has not touched yet costs a
/// page fault and a zeroed page a 4 KiB (`clear_page_erms`), and a buffer that grew by
/// `realloc` or was freed after a large group commit made the next commits fault their
/// buffer in again: 6.6% of ingest's samples (bench/README.md, "The WAL buffer kept").
const BUFFER: usize = 1 << 20;
/// The most one `pwrite` carries: the unix VFS writes `len & 0x1ffff` bytes a call
/// (`seekAndWriteFd`), so a write of 128 KiB or more would come out short.
const WRITE_PIECE: usize = 64 << 10;

/// Every file this VFS opens: the unix VFS's file right after this header, in the same
/// allocation.
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    /// The unix VFS's file (inside this allocation, after the header).
    inner: *mut ffi::sqlite3_file,
    /// A WAL file: its writes are gathered.
    gather: bool,
    /// Bytes written but not yet passed on, for the file at `start`.
    buf: Vec<u8>,
    start: i64,
    /// The error of a failed write of `buf`, returned by the next call.
    failed: c_int,
}

/// Offset of the inner file in the allocation: after the header, 16-byte aligned.
const INNER_AT: usize = std::mem::size_of::<File>().next_multiple_of(16);

thread_local! {
    /// This thread's WAL files with buffered bytes (see "Guarantees").
    static PENDING: RefCell<Vec<*mut File>> = const { RefCell::new(Vec::new()) };
}

struct Registered {
    unix: *mut ffi::sqlite3_vfs,
}
// SAFETY: the unix VFS is a process-wide object SQLite never frees; it is only read.
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

static REGISTERED: OnceLock<Result<Registered, String>> = OnceLock::new();

/// Register the VFS (once per process). Errors name what failed.
pub(crate) fn register() -> Result<(), String> {
    REGISTERED
        .get_or_init(|| unsafe {
            // SAFETY: sqlite3_vfs_find and sqlite3_vfs_register are thread-safe (SQLite is
            // built threadsafe); the VFS struct is leaked, so it lives as long as SQLite
            // may use it. Every other method of the copy is the unix VFS's own, with the
            // same app data, so it behaves as the unix VFS does.
            let unix = ffi::sqlite3_vfs_find(c"unix".as_ptr());
            if unix.is_null() {
                return Err("SQLite has no unix VFS".into());
            }
            let mut vfs: ffi::sqlite3_vfs = *unix;
            vfs.zName = NAME.as_ptr();
            vfs.pNext = std::ptr::null_mut();
            vfs.szOsFile = (INNER_AT + (*unix).szOsFile as usize) as c_int;
            vfs.xOpen = Some(x_open);
            let rc = ffi::sqlite3_vfs_register(Box::into_raw(Box::new(vfs)), 0);
            if rc != ffi::SQLITE_OK {
                return Err(format!("registering the {NAME:?} VFS: SQLite error {rc}"));
            }
            Ok(Registered { unix })
        })
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // x_open is reachable only through the registered VFS.
    let Some(Ok(Registered { unix })) = REGISTERED.get() else {
        return ffi::SQLITE_ERROR;
    };
    let unix = *unix;
    let Some(open) = (*unix).xOpen else {
        return ffi::SQLITE_ERROR;
    };
    let f = file as *mut File;
    let inner = (file as *mut u8).add(INNER_AT) as *mut ffi::sqlite3_file;
    (*f).base.pMethods = std::ptr::null();
    (*inner).pMethods = std::ptr::null();
    let rc = open(unix, name, inner, flags, out_flags);
    if rc != ffi::SQLITE_OK {
        // SQLite calls xClose only when pMethods is set: close the inner file here.
        if !(*inner).pMethods.is_null() {
            if let Some(close) = (*(*inner).pMethods).xClose {
                close(inner);
            }
        }
        return rc;
    }
    std::ptr::addr_of_mut!((*f).inner).write(inner);
    std::ptr::addr_of_mut!((*f).gather).write(flags & ffi::SQLITE_OPEN_WAL != 0);
    std::ptr::addr_of_mut!((*f).buf).write(Vec::new());
    std::ptr::addr_of_mut!((*f).start).write(0);
    std::ptr::addr_of_mut!((*f).failed).write(ffi::SQLITE_OK);
    (*f).base.pMethods = &METHODS;
    ffi::SQLITE_OK
}

/// The inner file and its methods.
unsafe fn im(
    f: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    let inner = (*(f as *mut File)).inner;
    (inner, &*(*inner).pMethods)
}

/// Pass the buffered bytes on to the unix VFS; a failure is kept in `failed`.
unsafe fn write_out(f: *mut File) {
    let file = &mut *f;
    if file.buf.is_empty() {
        return;
    }
    PENDING.with(|p| p.borrow_mut().retain(|&x| x != f));
    let (inner, m) = im(f as *mut ffi::sqlite3_file);
    let mut rc = ffi::SQLITE_OK;
    // In pieces the unix VFS writes whole: it masks a write's length to 17 bits.
    for (i, piece) in file.buf.chunks(WRITE_PIECE).enumerate() {
        rc = match m.xWrite {
            Some(w) => w(
                inner,
                piece.as_ptr() as *const c_void,
                piece.len() as c_int,
                file.start + (i * WRITE_PIECE) as i64,
            ),
            None => ffi::SQLITE_IOERR_WRITE,
        };
        if rc != ffi::SQLITE_OK {
            break;
        }
    }
    if rc != ffi::SQLITE_OK && file.failed == ffi::SQLITE_OK {
        file.failed = rc;
    }
    file.buf.clear();
}

/// Write the buffer out, then report (and forget) any failed write.
unsafe fn flush(f: *mut ffi::sqlite3_file) -> c_int {
    let f = f as *mut File;
    write_out(f);
    std::mem::replace(&mut (*f).failed, ffi::SQLITE_OK)
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    let rc = flush(f);
    let (inner, m) = im(f);
    let rc2 = m.xClose.map_or(ffi::SQLITE_OK, |c| c(inner));
    std::ptr::drop_in_place(std::ptr::addr_of_mut!((*(f as *mut File)).buf));
    (*f).pMethods = std::ptr::null();
    if rc != ffi::SQLITE_OK {
        rc
    } else {
        rc2
    }
}

/// Call the inner file's method `$m` with the arguments (`$none` if it has none).
macro_rules! pass {
    ($f:ident, $m:ident, $none:expr, $($arg:expr),*) => {{
        let (inner, m) = im($f);
        match m.$m {
            Some(x) => x(inner, $($arg),*),
            None => $none,
        }
    }};
}

/// Write out, then [`pass!`] the call on.
macro_rules! after_flush {
    ($f:ident, $m:ident, $($arg:expr),*) => {{
        let rc = flush($f);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        pass!($f, $m, ffi::SQLITE_IOERR, $($arg),*)
    }};
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    p: *mut c_void,
    n: c_int,
    off: i64,
) -> c_int {
    after_flush!(f, xRead, p, n, off)
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    p: *const c_void,
    n: c_int,
    off: i64,
) -> c_int {
    let file = f as *mut File;
    let len = n.max(0) as usize;
    if !(*file).gather || len > BUFFER {
        return after_flush!(f, xWrite, p, n, off);
    }
    let continues = (*file).start + (*file).buf.len() as i64 == off;
    if !(*file).buf.is_empty() && (!continues || (*file).buf.len() + len > BUFFER) {
        write_out(file);
    }
    if (*file).failed != ffi::SQLITE_OK {
        return std::mem::replace(&mut (*file).failed, ffi::SQLITE_OK);
    }
    if (*file).buf.is_empty() {
        (*file).start = off;
        if (*file).buf.capacity() < BUFFER {
            (*file).buf.reserve_exact(BUFFER);
        }
        PENDING.with(|p| p.borrow_mut().push(file));
    }
    (*file)
        .buf
        .extend_from_slice(std::slice::from_raw_parts(p as *const u8, len));
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    after_flush!(f, xTruncate, size)
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    after_flush!(f, xSync, flags)
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    after_flush!(f, xFileSize, size)
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    pass!(f, xLock, ffi::SQLITE_IOERR, l)
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    pass!(f, xUnlock, ffi::SQLITE_IOERR, l)
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    pass!(f, xCheckReservedLock, ffi::SQLITE_IOERR, out)
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    after_flush!(f, xFileControl, op, arg)
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    pass!(f, xSectorSize, 4096,)
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    pass!(f, xDeviceCharacteristics, 0,)
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    pg: c_int,
    sz: c_int,
    extend: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    pass!(f, xShmMap, ffi::SQLITE_IOERR, pg, sz, extend, pp)
}

/// Before any lock of the shared memory changes (the WAL write lock's release among
/// them), this thread's buffered WAL bytes are written out (module doc).
unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    off: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for wal in pending {
        // A failure stays in the WAL file's `failed`, for its next call.
        write_out(wal);
    }
    pass!(f, xShmLock, ffi::SQLITE_IOERR, off, n, flags)
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    let (inner, m) = im(f);
    if let Some(x) = m.xShmBarrier {
        x(inner)
    }
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    pass!(f, xShmUnmap, ffi::SQLITE_OK, delete)
}

unsafe extern "C" fn x_fetch(
    f: *mut ffi::sqlite3_file,
    off: i64,
    n: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    let rc = flush(f);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let (inner, m) = im(f);
    match m.xFetch {
        Some(x) => x(inner, off, n, pp),
        None => {
            *pp = std::ptr::null_mut();
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn x_unfetch(f: *mut ffi::sqlite3_file, off: i64, p: *mut c_void) -> c_int {
    pass!(f, xUnfetch, ffi::SQLITE_OK, off, p)
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

#[cfg(test)]
mod tests {
    use rusqlite::{params, Connection, OpenFlags};

    fn open(path: &std::path::Path, gathered: bool) -> Connection {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let c = if gathered {
            super::register().unwrap();
            Connection::open_with_flags_and_vfs(path, flags, super::NAME).unwrap()
        } else {
            Connection::open_with_flags(path, flags).unwrap()
        };
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "synchronous", "FULL").unwrap();
        c
    }

    fn value(i: u32, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
    }

    /// Row `k`'s value, read through `c`.
    fn row(c: &Connection, k: u32) -> Vec<u8> {
        c.query_row("SELECT v FROM t WHERE k = ?1", params![k], |x| x.get(0))
            .unwrap()
    }

    /// Rows `keys` of `len` bytes each ([`value`]), inserted through `c` in one commit.
    fn commit_rows(c: &Connection, keys: std::ops::Range<u32>, len: usize) {
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        for k in keys {
            c.execute("INSERT INTO t VALUES (?1, ?2)", params![k, value(k, len)])
                .unwrap();
        }
        c.execute_batch("COMMIT").unwrap();
    }

    fn assert_intact(c: &Connection) {
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |x| x.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }

    /// A commit through the gathering VFS is whole in the files when it returns: a
    /// connection of the plain unix VFS reads every byte of it.
    #[test]
    fn a_committed_transaction_is_in_the_files_when_commit_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let w = open(&path, true);
        w.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        let r = open(&path, false);
        for round in 0..20u32 {
            commit_rows(&w, round * 6..(round + 1) * 6, 90_000);
            let n: u32 = r
                .query_row("SELECT count(*) FROM t", [], |x| x.get(0))
                .unwrap();
            assert_eq!(n, (round + 1) * 6);
            for k in round * 6..(round + 1) * 6 {
                assert_eq!(row(&r, k), value(k, 90_000), "row {k}");
            }
        }
        assert_intact(&r);
    }

    /// A commit several times the buffer's size: the run is written out as the buffer
    /// fills, and every byte is in the files when the commit returns.
    #[test]
    fn a_commit_larger_than_the_buffer_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let w = open(&path, true);
        w.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        let n = (3 * super::BUFFER / 90_000) as u32 + 1;
        commit_rows(&w, 0..n, 90_000);
        let r = open(&path, false);
        for k in 0..n {
            assert_eq!(row(&r, k), value(k, 90_000), "row {k}");
        }
        assert_intact(&r);
    }

    /// A transaction that spilled frames to the WAL and rolled back: frames another
    /// thread's connection then commits at the same place in the WAL are intact after
    /// the first connection uses the WAL again (module doc, "Guarantees"). SQLite's
    /// rollback usually reads the WAL itself, which writes the buffer out too, so this
    /// checks the outcome rather than isolating the write-out at the lock's release.
    #[test]
    fn frames_spilled_by_a_rolled_back_transaction_never_overwrite_later_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let a = open(&path, true);
        a.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        // A tiny cache: a large transaction spills its pages to the WAL before commit.
        a.pragma_update(None, "cache_size", 10).unwrap();
        a.execute_batch("BEGIN IMMEDIATE").unwrap();
        for k in 0..40u32 {
            a.execute(
                "INSERT INTO t VALUES (?1, ?2)",
                params![k, vec![0xAAu8; 50_000]],
            )
            .unwrap();
        }
        a.execute_batch("ROLLBACK").unwrap();
        // Another thread (buffers are per thread) commits over the same WAL frames.
        let p = path.clone();
        std::thread::spawn(move || {
            commit_rows(&open(&p, true), 100..140, 50_000);
        })
        .join()
        .unwrap();
        // Anything `a` still held would be written by its next call on the WAL.
        let n: u32 = a
            .query_row("SELECT count(*) FROM t", [], |x| x.get(0))
            .unwrap();
        assert_eq!(n, 40);
        a.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        drop(a);
        let r = open(&path, false);
        for k in 100..140u32 {
            assert_eq!(row(&r, k), value(k, 50_000), "row {k}");
        }
        assert_intact(&r);
    }
}
