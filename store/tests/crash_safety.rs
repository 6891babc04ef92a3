//! Crash safety of the embedded store, with real processes and a real file system.
//!
//! - `acknowledged_commits_survive_sigkill_and_none_is_partial`: a child process (this
//!   test binary, re-executed on `crash_child_entry`) commits in a loop, each commit
//!   rewriting a set of keys whose values all carry the commit number, and reports each
//!   commit on stdout once `Db::transact` returned. The parent SIGKILLs it at seeded
//!   random moments, 30 times; after each kill an independent reader opens the store
//!   and must find every acknowledged commit, at most the one commit in flight beyond
//!   it, and never a mix of two commits.
//! - A full disk: writes fail with an error that says so, store nothing, and reads go
//!   on (also from a handle opened while the disk is full); once space is back, writes
//!   succeed. On a 16 MiB tmpfs when this process may mount one (root), and always
//!   with `RLIMIT_FSIZE` in a child process (SIGXFSZ ignored), which fails writes that
//!   grow a file past the limit the way a full disk fails them.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::{Db, KvError, RangeOption};

const CRASH_CHILD: &str = "SWIMLANE_STORE_CRASH_CHILD";
const FSIZE_CHILD: &str = "SWIMLANE_STORE_FSIZE_CHILD";
/// Keys rewritten by every commit.
const KEYS: u32 = 12;
const KILLS: u32 = 30;
const COUNTER: &[u8] = b"crash/n";

fn key(i: u32) -> Vec<u8> {
    format!("crash/k/{i:02}").into_bytes()
}

/// The marker of commit `n`: each commit clears its predecessor's and writes its own.
fn marker(n: u64) -> Vec<u8> {
    let mut k = b"crash/marker/".to_vec();
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// What key `i` holds after commit `n`: `n` and `i`, then filler whose length and bytes
/// are fixed by `(n, i)`: a value of another commit, or a torn one, never passes for it.
/// Up to 6,000 bytes, so commits span many pages; the last two keys 40,000 to 99,000
/// (as an upload's sample chunks are), so a commit's WAL frames fill several of the
/// 64 KiB writes `wal_vfs` gathers them into, and a kill can land between two.
fn value(n: u64, i: u32) -> Vec<u8> {
    let spread = (n * 7919 + i as u64 * 104_729) as usize;
    let len = if i >= KEYS - 2 {
        40_000 + spread % 59_000
    } else {
        spread % 6000
    };
    let mut v = Vec::with_capacity(12 + len);
    v.extend_from_slice(&n.to_le_bytes());
    v.extend_from_slice(&i.to_le_bytes());
    v.extend((0..len).map(|j| (n as usize * 31 + i as usize * 7 + j) as u8));
    v
}

fn counter(db: &Db) -> u64 {
    db.transact(|tx| tx.get(COUNTER))
        .unwrap()
        .map(|b| u64::from_le_bytes(b.try_into().expect("an 8-byte counter")))
        .unwrap_or(0)
}

/// Child mode of the SIGKILL test: does nothing unless `SWIMLANE_STORE_CRASH_CHILD`
/// names a store file. Commits forever (until killed), printing `start N` once open
/// and `ack N` after each commit returns.
#[test]
fn crash_child_entry() {
    let Ok(path) = std::env::var(CRASH_CHILD) else {
        return;
    };
    let db = Db::new(EmbeddedBackend::open(&path).expect("the child opens the store"));
    let mut n = counter(&db);
    let mut out = std::io::stdout().lock();
    writeln!(out, "start {n}").unwrap();
    out.flush().unwrap();
    loop {
        n += 1;
        db.transact(|tx| {
            for i in 0..KEYS {
                tx.set(&key(i), &value(n, i))?;
            }
            tx.clear(&marker(n - 1))?;
            tx.set(&marker(n), b"")?;
            tx.set(COUNTER, &n.to_le_bytes())
        })
        .expect("commit");
        writeln!(out, "ack {n}").unwrap();
        out.flush().unwrap();
    }
}

/// The number after `tag` in a line of the child's stdout (libtest's own
/// `test crash_child_entry ... ` may stand before it on the same line).
fn tagged(line: &str, tag: &str) -> Option<u64> {
    let at = line.find(tag)?;
    line[at + tag.len()..].trim().parse().ok()
}

/// Kills (SIGKILL) and reaps the child when dropped, so a failing test leaves none.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawn this test binary on one test, in child mode.
fn spawn_child(test: &str, env: &str, value: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env, value)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child")
}

/// Open the store as a fresh reader and check it holds one whole commit: every key
/// carries the same commit number `n` with exactly commit `n`'s value, and the only
/// marker is `n`'s. Returns `n`.
fn whole_commit(path: &Path) -> Result<u64, String> {
    let db = Db::new(EmbeddedBackend::open(path).map_err(|e| e.to_string())?);
    let n = counter(&db);
    db.transact(|tx| {
        let mut problems = Vec::new();
        for i in 0..KEYS {
            let v = tx.get(&key(i))?;
            let expected = (n > 0).then(|| value(n, i));
            if v != expected {
                let found = v
                    .as_ref()
                    .and_then(|v| v.get(..8))
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
                problems.push(format!("key {i} holds commit {found:?}"));
            }
        }
        let markers: Vec<Vec<u8>> = tx
            .get_range(&RangeOption::prefix(b"crash/marker/"))?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let expected: Vec<Vec<u8>> = if n > 0 { vec![marker(n)] } else { vec![] };
        if markers != expected {
            problems.push(format!(
                "{} markers, expected only commit {n}'s",
                markers.len()
            ));
        }
        Ok(problems)
    })
    .map_err(|e| e.to_string())
    .and_then(|problems| {
        if problems.is_empty() {
            Ok(n)
        } else {
            Err(format!("commit {n} is partial: {}", problems.join("; ")))
        }
    })
}

/// SQLite's own check of the file.
fn integrity(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let r: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(r, "ok", "{}", path.display());
}

#[test]
fn acknowledged_commits_survive_sigkill_and_none_is_partial() {
    if std::env::var(CRASH_CHILD).is_ok() || std::env::var(FSIZE_CHILD).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.sqlite");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5715_1a4e);
    let mut durable = 0u64;
    let mut in_flight_durable = 0;
    for round in 0..KILLS {
        // Kill after this many acknowledged commits, then this many microseconds more:
        // anywhere in the next commit, or between two.
        let after_acks = rng.random_range(0..=25u64);
        let extra = Duration::from_micros(rng.random_range(0..3000));
        let mut child = Killed(spawn_child("crash_child_entry", CRASH_CHILD, &path));
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let next = |what: &str| -> String {
            let left = deadline.saturating_duration_since(Instant::now());
            rx.recv_timeout(left)
                .unwrap_or_else(|e| panic!("round {round}: waiting for {what}: {e}"))
        };
        let start = loop {
            if let Some(n) = tagged(&next("start"), "start ") {
                break n;
            }
        };
        assert_eq!(start, durable, "round {round}: the child resumed elsewhere");
        let mut acked = start;
        while acked < start + after_acks {
            if let Some(n) = tagged(&next("an ack"), "ack ") {
                acked = n;
            }
        }
        std::thread::sleep(extra);
        child.0.kill().unwrap(); // SIGKILL
        let status = child.0.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "round {round}: {status}"
        );
        reader.join().unwrap();
        // Acknowledgements written before the kill are still in the pipe.
        for line in rx.try_iter() {
            if let Some(n) = tagged(&line, "ack ") {
                acked = n;
            }
        }
        let found = whole_commit(&path).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            found >= acked,
            "round {round}: commit {acked} was acknowledged, the store has only {found}"
        );
        assert!(
            found <= acked + 1,
            "round {round}: the store has commit {found}, only {acked} were acknowledged"
        );
        if found == acked + 1 {
            in_flight_durable += 1;
        }
        integrity(&path);
        durable = found;
    }
    eprintln!(
        "{KILLS} SIGKILLs, {durable} commits; {in_flight_durable} times the commit in flight had reached the disk before its acknowledgement"
    );
    assert!(
        durable > u64::from(KILLS),
        "too few commits to mean anything"
    );
}

// ---------------------------------------------------------------- full disk

/// What makes the disk full, and frees it again.
trait FullDisk {
    fn fill(&mut self, dir: &Path);
    fn free(&mut self);
}

/// A file that takes every free byte of a (small) file system.
struct Filler(Option<PathBuf>);

impl FullDisk for Filler {
    fn fill(&mut self, dir: &Path) {
        let path = dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0xa5u8; 64 * 1024];
        let mut small = vec![0x5au8; 512];
        loop {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        // Take the last bytes too.
        while !small.is_empty() {
            if f.write_all(&small).is_err() {
                small.truncate(small.len() / 2);
            }
        }
        let _ = f.sync_all();
        self.0 = Some(path);
    }
    fn free(&mut self) {
        if let Some(p) = self.0.take() {
            std::fs::remove_file(p).unwrap();
        }
    }
}

/// `RLIMIT_FSIZE` of this process: no file may grow past its current size.
struct FileSizeLimit;

fn set_fsize(soft: libc::rlim_t) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
        lim.rlim_cur = soft.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
}

impl FullDisk for FileSizeLimit {
    fn fill(&mut self, dir: &Path) {
        // A write past the limit fails (EFBIG) instead of killing the process.
        // SAFETY: setting a signal's disposition to "ignore".
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
        let largest = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .max()
            .unwrap();
        set_fsize(largest as libc::rlim_t);
    }
    fn free(&mut self) {
        set_fsize(libc::RLIM_INFINITY);
    }
}

fn data_key(n: u64, i: u32) -> Vec<u8> {
    format!("full/{n:04}/{i:02}").into_bytes()
}

fn write_commit(db: &Db, n: u64) -> Result<(), KvError> {
    db.transact(|tx| {
        for i in 0..KEYS {
            tx.set(&data_key(n, i), &value(n, i))?;
        }
        Ok(())
    })
}

fn assert_commits(db: &Db, commits: &[u64], what: &str) {
    let rows = db
        .transact(|tx| tx.get_range(&RangeOption::prefix(b"full/")))
        .unwrap_or_else(|e| panic!("{what}: reading failed: {e}"));
    let expected: Vec<(Vec<u8>, Vec<u8>)> = commits
        .iter()
        .flat_map(|&n| (0..KEYS).map(move |i| (data_key(n, i), value(n, i))))
        .collect();
    assert_eq!(rows.len(), expected.len(), "{what}");
    assert!(
        rows == expected,
        "{what}: the store does not hold exactly the commits"
    );
}

/// Commit some data, fill the disk, and check: writes fail with an error naming the
/// cause (one of `phrases`) and store nothing; reads go on, also from a handle opened
/// on the full disk; once freed, the failed write succeeds and everything reads back.
fn full_disk_scenario(dir: &Path, disk: &mut dyn FullDisk, phrases: &[&str]) {
    let path = dir.join("full.sqlite");
    let db = Db::new(EmbeddedBackend::open(&path).unwrap());
    let mut committed: Vec<u64> = (0..6).collect();
    for &n in &committed {
        write_commit(&db, n).unwrap();
    }
    disk.fill(dir);
    // The WAL may still have room for a few commits; then writes fail.
    let mut failed = None;
    for n in 100..400 {
        match write_commit(&db, n) {
            Ok(()) => committed.push(n),
            Err(e) => {
                failed = Some((n, e));
                break;
            }
        }
    }
    let (n, e) = failed.expect("writes never failed on a full disk");
    let message = e.to_string();
    eprintln!("a write on the full disk failed with: {message}");
    assert!(
        matches!(e, KvError::Backend(_)) && phrases.iter().any(|p| message.contains(p)),
        "unclear error on a full disk: {e:?}"
    );
    // The error repeats, nothing of the failed commit is there, and reads go on.
    assert!(write_commit(&db, n).is_err());
    assert_commits(&db, &committed, "reading on a full disk");
    let reader = Db::new(EmbeddedBackend::open(&path).expect("opening on a full disk"));
    assert_commits(&reader, &committed, "a reader opened on a full disk");
    disk.free();
    write_commit(&db, n).expect("writing once there is space again");
    committed.push(n);
    assert_commits(&reader, &committed, "after space is freed");
    drop((db, reader));
    integrity(&path);
}

/// Unmounts (lazily) when dropped, so a failing test leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_tmpfs_fails_writes_with_a_clear_error_and_reads_go_on() {
    if std::env::var(CRASH_CHILD).is_ok() || std::env::var(FSIZE_CHILD).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "swimlane-full-disk-test"])
        .arg(dir.path())
        .output();
    match mount {
        Ok(o) if o.status.success() => {}
        other => {
            // Not root, or no mount here: the RLIMIT_FSIZE test below stands in.
            eprintln!("cannot mount a tmpfs ({other:?}); skipping the tmpfs variant");
            return;
        }
    }
    let _mounted = Mounted(dir.path().to_path_buf());
    full_disk_scenario(dir.path(), &mut Filler(None), &["disk full"]);
}

/// Child mode of the file size limit test.
#[test]
fn fsize_child_entry() {
    let Ok(dir) = std::env::var(FSIZE_CHILD) else {
        return;
    };
    full_disk_scenario(
        Path::new(&dir),
        &mut FileSizeLimit,
        &["disk full", "I/O error"],
    );
    println!("full-disk scenario passed");
}

#[test]
fn a_file_size_limit_fails_writes_with_a_clear_error_and_reads_go_on() {
    if std::env::var(CRASH_CHILD).is_ok() || std::env::var(FSIZE_CHILD).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = spawn_child("fsize_child_entry", FSIZE_CHILD, dir.path())
        .wait_with_output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", out.status);
    assert!(stdout.contains("full-disk scenario passed"), "{stdout}");
}
