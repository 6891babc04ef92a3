//! The conformance suite: every property a backend must have, as functions that return
//! `Err(description)` instead of panicking, so a test can also assert that a broken
//! backend *fails* them.
//!
//! Each function takes a [`StoreFactory`] (something that opens a new [`Db`] handle to
//! one store) and works under its own random key prefix, so the suite can run in
//! parallel against one shared FoundationDB cluster. Concurrency is made deterministic
//! with channels: no sleeps are used to order events.
//!
//! A backend's test file is one line:
//! ```ignore
//! swimlane_store::conformance_tests!(swimlane_store::conformance::TempEmbedded::new());
//! ```
//! The expression must give `Result<impl StoreFactory, String>`; an `Err(reason)` makes
//! every test print `skipped: <reason>` and pass (for backends that need a server).
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::embedded::{add_le, EmbeddedBackend};
use crate::kv::{Db, KeyValue, ManualClock, RangeOption, RetryOptions, Transaction};
use crate::{blob, limits, KvError};

/// Opens handles to one store. Each call returns a new handle (for the durability
/// property: data written through one handle, handle dropped, read through another).
pub trait StoreFactory: Sync {
    fn open(&self) -> Result<Db, String>;
}

impl<F: Fn() -> Result<Db, String> + Sync> StoreFactory for F {
    fn open(&self) -> Result<Db, String> {
        self()
    }
}

/// An embedded store in a temporary directory, deleted on drop.
pub struct TempEmbedded {
    dir: tempfile::TempDir,
}

impl TempEmbedded {
    pub fn new() -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("swimlane-conformance-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory: {e}"))?;
        Ok(TempEmbedded { dir })
    }
    /// The directory holding the store file.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl StoreFactory for TempEmbedded {
    fn open(&self) -> Result<Db, String> {
        EmbeddedBackend::open_in_dir(self.dir.path())
            .map(Db::new)
            .map_err(|e| e.to_string())
    }
}

/// One property: `Ok` if the store has it.
pub type Property = fn(&dyn StoreFactory) -> Result<(), String>;

/// Every property, by name (the names of the tests [`crate::conformance_tests!`] makes).
pub const PROPERTIES: &[(&str, Property)] = &[
    ("get_set_clear", get_set_clear),
    (
        "range_reads_order_reverse_limit",
        range_reads_order_reverse_limit,
    ),
    ("clear_range_and_prefix", clear_range_and_prefix),
    ("atomic_add_counts", atomic_add_counts),
    (
        "atomic_add_concurrent_threads",
        atomic_add_concurrent_threads,
    ),
    (
        "atomic_add_has_no_read_conflict",
        atomic_add_has_no_read_conflict,
    ),
    ("read_your_writes", read_your_writes),
    ("read_your_writes_model", read_your_writes_model),
    ("closure_error_aborts", closure_error_aborts),
    ("conflict_reruns_closure", conflict_reruns_closure),
    ("range_read_conflict_phantom", range_read_conflict_phantom),
    (
        "range_read_conflict_stops_at_limit",
        range_read_conflict_stops_at_limit,
    ),
    ("no_lost_updates", no_lost_updates),
    ("limit_key_size", limit_key_size),
    ("limit_value_size", limit_value_size),
    ("limit_transaction_size", limit_transaction_size),
    ("limit_transaction_age", limit_transaction_age),
    ("retries_exhausted", retries_exhausted),
    ("blob_round_trips", blob_round_trips),
    ("blob_large_round_trip", blob_large_round_trip),
    ("blob_corruption_detected", blob_corruption_detected),
    ("blob_in_caller_transaction", blob_in_caller_transaction),
    ("durability_after_reopen", durability_after_reopen),
    (
        "change_watch_wakes_after_a_commit",
        change_watch_wakes_after_a_commit,
    ),
];

/// Run every property; the names of the failed ones with their errors.
pub fn run_all(factory: &dyn StoreFactory) -> Vec<(&'static str, String)> {
    PROPERTIES
        .iter()
        .filter_map(|(name, p)| p(factory).err().map(|e| (*name, e)))
        .collect()
}

/// One `#[test]` per conformance property against the factory expression, which must
/// evaluate to `Result<impl StoreFactory, String>` (`Err(reason)`: skip).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@each ($factory)
            get_set_clear, range_reads_order_reverse_limit, clear_range_and_prefix,
            atomic_add_counts, atomic_add_concurrent_threads, atomic_add_has_no_read_conflict,
            read_your_writes, read_your_writes_model, closure_error_aborts,
            conflict_reruns_closure, range_read_conflict_phantom,
            range_read_conflict_stops_at_limit, no_lost_updates, limit_key_size,
            limit_value_size, limit_transaction_size, limit_transaction_age,
            retries_exhausted, blob_round_trips, blob_large_round_trip,
            blob_corruption_detected, blob_in_caller_transaction, durability_after_reopen,
            change_watch_wakes_after_a_commit);
    };
    (@each ($factory:expr) $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let factory: ::std::result::Result<_, ::std::string::String> = $factory;
                match factory {
                    ::std::result::Result::Err(reason) => {
                        eprintln!("skipped: {reason}");
                    }
                    ::std::result::Result::Ok(f) => {
                        if let ::std::result::Result::Err(e) = $crate::conformance::$name(&f) {
                            panic!("conformance property `{}` failed: {}", stringify!($name), e);
                        }
                    }
                }
            }
        )*
    };
}

/// How long a thread waits for its partner before the property fails (a safety net
/// against hangs on a broken backend, never a synchronisation mechanism).
const WAIT: Duration = Duration::from_secs(60);

type Res = Result<(), String>;

fn scratch(name: &str) -> Vec<u8> {
    format!(
        "swimlane-conformance/{name}/{:016x}/",
        rand::random::<u64>()
    )
    .into_bytes()
}

fn key(prefix: &[u8], suffix: impl AsRef<[u8]>) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(suffix.as_ref());
    k
}

fn ctx<T>(what: &str, r: Result<T, KvError>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: unexpected error: {e}"))
}

fn check_eq<T: Debug + PartialEq>(what: &str, got: T, want: T) -> Res {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

/// Bytes as an escaped string (readable failure messages; injective, so comparing the
/// strings compares the bytes).
fn esc(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

/// Key-value rows in readable form.
fn kvs<'a>(rows: impl IntoIterator<Item = (&'a Vec<u8>, &'a Vec<u8>)>) -> Vec<(String, String)> {
    rows.into_iter().map(|(k, v)| (esc(k), esc(v))).collect()
}

fn rows(v: &[(Vec<u8>, Vec<u8>)]) -> Vec<(String, String)> {
    kvs(v.iter().map(|(k, v)| (k, v)))
}

fn check(what: &str, ok: bool) -> Res {
    if ok {
        Ok(())
    } else {
        Err(what.to_string())
    }
}

/// Best-effort removal of a property's keys (matters on shared FDB clusters).
fn cleanup(db: &Db, prefix: &[u8]) {
    let _ = db.transact(|tx| tx.clear_prefix(prefix));
}

fn patient(db: Db) -> Db {
    db.with_retry(RetryOptions {
        max_attempts: 10_000,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(20),
    })
}

fn read_all(db: &Db, prefix: &[u8]) -> Result<Vec<KeyValue>, String> {
    ctx(
        "range read",
        db.transact(|tx| tx.get_range(&RangeOption::prefix(prefix))),
    )
}

/// T1 runs `t1` in its own thread; on its first attempt, when it calls `pause`, T2 (`t2`)
/// runs to completion in this thread, then T1 continues. Returns T1's result and its
/// number of attempts.
fn interleave<T: Send>(
    db: &Db,
    mut t1: impl FnMut(&mut Transaction<'_>, &mut dyn FnMut() -> Result<(), KvError>) -> Result<T, KvError>
        + Send,
    t2: impl FnOnce() -> Result<(), KvError>,
) -> Result<(T, u32), String> {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let attempts = AtomicU32::new(0);
    std::thread::scope(|s| {
        let attempts = &attempts;
        let handle = s.spawn(move || {
            let mut paused = false;
            db.transact(|tx| {
                attempts.fetch_add(1, SeqCst);
                let mut pause = || -> Result<(), KvError> {
                    if !paused {
                        paused = true;
                        let _ = ready_tx.send(());
                        go_rx.recv_timeout(WAIT).map_err(|_| {
                            KvError::Backend("conformance: T2 never finished".into())
                        })?;
                    }
                    Ok(())
                };
                t1(tx, &mut pause)
            })
        });
        let r2 = match ready_rx.recv_timeout(WAIT) {
            Ok(()) => t2().map_err(|e| format!("T2 failed: {e}")),
            Err(_) => Err("T1 ended or hung before its pause point".to_string()),
        };
        let _ = go_tx.send(());
        let r1 = handle
            .join()
            .map_err(|_| "T1 panicked".to_string())?
            .map_err(|e| format!("T1 failed: {e}"));
        r2?;
        Ok((r1?, attempts.load(SeqCst)))
    })
}

/// Set, overwrite, empty values, clear, and reads of absent keys.
pub fn get_set_clear(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("get_set_clear");
    let (a, b) = (key(&p, "a"), key(&p, "b"));
    check_eq("absent key", ctx("get", db.get(&a))?, None)?;
    ctx("set", db.transact(|tx| tx.set(&a, b"1")))?;
    check_eq("after set", ctx("get", db.get(&a))?, Some(b"1".to_vec()))?;
    ctx("overwrite", db.transact(|tx| tx.set(&a, b"22")))?;
    check_eq(
        "after overwrite",
        ctx("get", db.get(&a))?,
        Some(b"22".to_vec()),
    )?;
    ctx("set empty", db.transact(|tx| tx.set(&b, b"")))?;
    check_eq("empty value", ctx("get", db.get(&b))?, Some(Vec::new()))?;
    ctx("clear", db.transact(|tx| tx.clear(&a)))?;
    check_eq("after clear", ctx("get", db.get(&a))?, None)?;
    ctx("clear absent", db.transact(|tx| tx.clear(&a)))?;
    check_eq("other key kept", ctx("get", db.get(&b))?, Some(Vec::new()))?;
    cleanup(&db, &p);
    Ok(())
}

/// Range reads: memcmp order of binary keys, begin inclusive, end exclusive, reverse,
/// limits from either end, and paging with limits.
pub fn range_reads_order_reverse_limit(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("range_reads");
    let suffixes: [&[u8]; 11] = [
        &[0xff, 0xff],
        &[0x00],
        &[0x80],
        &[0x00, 0x00],
        &[0x7f],
        &[0xff],
        &[0x00, 0x01],
        &[0x01],
        &[0xfe, 0xff],
        &[0xff, 0x00],
        b"abc",
    ];
    let mut model = BTreeMap::new();
    for (i, s) in suffixes.iter().enumerate() {
        model.insert(key(&p, s), vec![i as u8]);
    }
    ctx(
        "fill",
        db.transact(|tx| {
            for (k, v) in &model {
                tx.set(k, v)?;
            }
            Ok(())
        }),
    )?;
    let all: Vec<(Vec<u8>, Vec<u8>)> = model.clone().into_iter().collect();
    let raw_read = |r: RangeOption| ctx("range read", db.transact(|tx| tx.get_range(&r)));
    let read = |r: RangeOption| raw_read(r).map(|v| rows(&v));
    let all_raw = all.clone();
    let all = rows(&all);
    check_eq("forward", read(RangeOption::prefix(&p))?, all.clone())?;
    let rev: Vec<_> = all.iter().rev().cloned().collect();
    check_eq(
        "reverse",
        read(RangeOption::prefix(&p).reverse())?,
        rev.clone(),
    )?;
    check_eq(
        "forward limit 3",
        read(RangeOption::prefix(&p).limit(3))?,
        all[..3].to_vec(),
    )?;
    check_eq(
        "reverse limit 3",
        read(RangeOption::prefix(&p).reverse().limit(3))?,
        rev[..3].to_vec(),
    )?;
    check_eq(
        "limit above count",
        read(RangeOption::prefix(&p).limit(100))?,
        all.clone(),
    )?;
    let (b, e) = (key(&p, [0x00, 0x01]), key(&p, [0xff]));
    let sub: Vec<_> = all_raw
        .iter()
        .filter(|(k, _)| *k >= b && *k < e)
        .cloned()
        .collect();
    let sub = rows(&sub);
    check_eq(
        "sub-range [begin, end)",
        read(RangeOption::new(b.clone(), e.clone()))?,
        sub.clone(),
    )?;
    let sub_rev: Vec<_> = sub.iter().rev().cloned().collect();
    check_eq(
        "sub-range reverse",
        read(RangeOption::new(b, e).reverse())?,
        sub_rev,
    )?;
    check_eq(
        "empty range",
        read(RangeOption::new(key(&p, "zz"), key(&p, "zz")))?,
        vec![],
    )?;
    // Paging: limit 2 from just after the last key seen.
    let (_, end) = crate::kv::prefix_range(&p);
    let mut begin = p.clone();
    let mut paged = Vec::new();
    loop {
        let page = raw_read(RangeOption::new(begin.clone(), end.clone()).limit(2))?;
        if page.is_empty() {
            break;
        }
        begin = key(&page.last().unwrap().0, [0]);
        paged.extend(rows(&page));
    }
    check_eq("paged", paged, all)?;
    cleanup(&db, &p);
    Ok(())
}

/// `clear_range` removes `[begin, end)` (not `end`); `clear_prefix` removes a prefix.
pub fn clear_range_and_prefix(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("clear_range");
    let names = ["a", "b", "c", "d", "e", "f", "fa", "fb", "g"];
    ctx(
        "fill",
        db.transact(|tx| {
            for n in names {
                tx.set(&key(&p, n), n.as_bytes())?;
            }
            Ok(())
        }),
    )?;
    ctx(
        "clear",
        db.transact(|tx| {
            tx.clear_range(&key(&p, "b"), &key(&p, "e"))?;
            tx.clear_prefix(&key(&p, "f"))?;
            tx.clear_range(&key(&p, "x"), &key(&p, "y")) // nothing there
        }),
    )?;
    let left: Vec<String> = read_all(&db, &p)?.iter().map(|(k, _)| esc(k)).collect();
    check_eq(
        "keys left",
        left,
        ["a", "e", "g"].map(|n| esc(&key(&p, n))).to_vec(),
    )?;
    cleanup(&db, &p);
    check_eq("after clear_prefix", read_all(&db, &p)?.len(), 0)
}

/// `atomic_add`: absent is zero, negative deltas, several adds in one transaction, adds
/// over a value set or cleared earlier in the same transaction.
pub fn atomic_add_counts(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("atomic_add");
    let (c, d) = (key(&p, "c"), key(&p, "d"));
    let counter = |k: &[u8]| ctx("read counter", db.transact(|tx| tx.get_counter(k)));
    ctx("add to absent", db.transact(|tx| tx.atomic_add(&c, 5)))?;
    check_eq("absent + 5", counter(&c)?, 5)?;
    ctx("add negative", db.transact(|tx| tx.atomic_add(&c, -7)))?;
    check_eq("5 - 7", counter(&c)?, -2)?;
    let seen = ctx(
        "adds in one transaction",
        db.transact(|tx| {
            for _ in 0..3 {
                tx.atomic_add(&c, 1)?;
            }
            tx.get_counter(&c)
        }),
    )?;
    check_eq("read after adds, same transaction", seen, 1)?;
    check_eq("-2 + 3", counter(&c)?, 1)?;
    ctx(
        "set then add",
        db.transact(|tx| {
            tx.set(&d, &10i64.to_le_bytes())?;
            tx.atomic_add(&d, 1)
        }),
    )?;
    check_eq("set 10 then add 1", counter(&d)?, 11)?;
    ctx(
        "clear then add",
        db.transact(|tx| {
            tx.clear(&d)?;
            tx.atomic_add(&d, 4)
        }),
    )?;
    check_eq("clear then add 4", counter(&d)?, 4)?;
    cleanup(&db, &p);
    Ok(())
}

/// Concurrent `atomic_add`s from several threads are all counted.
pub fn atomic_add_concurrent_threads(f: &dyn StoreFactory) -> Res {
    let db = patient(f.open()?);
    let p = scratch("atomic_add_concurrent");
    let c = key(&p, "c");
    const THREADS: i64 = 4;
    const ADDS: i64 = 50;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..ADDS {
                        db.transact(|tx| tx.atomic_add(&c, 1))?;
                    }
                    Ok::<_, KvError>(())
                })
            })
            .collect();
        for h in handles {
            let r = h.join().map_err(|_| "adding thread panicked".to_string())?;
            ctx("adding thread", r)?;
        }
        Ok::<_, String>(())
    })?;
    let total = ctx("read", db.transact(|tx| tx.get_counter(&c)))?;
    check_eq("total of concurrent adds", total, THREADS * ADDS)?;
    cleanup(&db, &p);
    Ok(())
}

/// An `atomic_add` adds no read conflict: T1 adds, T2 overwrites the key and commits, T1
/// commits on its first attempt and its add applies on top of T2's value. Reading the
/// key after the add does conflict.
pub fn atomic_add_has_no_read_conflict(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("atomic_add_no_conflict");
    let c = key(&p, "c");
    ctx("init", db.transact(|tx| tx.set(&c, &10i64.to_le_bytes())))?;
    let ((), attempts) = interleave(
        &db,
        |tx, pause| {
            tx.atomic_add(&c, 1)?;
            pause()
        },
        || db.transact(|tx| tx.set(&c, &100i64.to_le_bytes())),
    )?;
    check_eq("attempts of a blind atomic add", attempts, 1)?;
    check_eq(
        "add applied over the concurrent write",
        ctx("read", db.transact(|tx| tx.get_counter(&c)))?,
        101,
    )?;
    let (seen, attempts) = interleave(
        &db,
        |tx, pause| {
            tx.atomic_add(&c, 1)?;
            let v = tx.get_counter(&c)?;
            pause()?;
            Ok(v)
        },
        || db.transact(|tx| tx.set(&c, &200i64.to_le_bytes())),
    )?;
    check_eq("attempts when the added key is read", attempts, 2)?;
    check_eq("value read on the retry", seen, 201)?;
    check_eq(
        "final value",
        ctx("read", db.transact(|tx| tx.get_counter(&c)))?,
        201,
    )?;
    cleanup(&db, &p);
    Ok(())
}

/// Reads inside a transaction see its own sets, clears, clear ranges and adds, for
/// point reads and range reads in both directions with limits.
pub fn read_your_writes(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("read_your_writes");
    let k = |s: &str| key(&p, s);
    ctx(
        "fill",
        db.transact(|tx| {
            for n in ["a", "b", "c", "d", "e"] {
                tx.set(&k(n), n.to_uppercase().as_bytes())?;
            }
            tx.set(&k("z-cnt"), &5i64.to_le_bytes())
        }),
    )?;
    let expected: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (k("a"), b"A2".to_vec()),
        (k("d"), b"D2".to_vec()),
        (k("e"), b"E".to_vec()),
        (k("x"), b"X".to_vec()),
        (k("z-cnt"), 8i64.to_le_bytes().to_vec()),
    ];
    let expected_rev: Vec<_> = expected.iter().rev().cloned().collect();
    let r = db.transact(|tx| {
        let mut problems = Vec::new();
        let mut expect = |what: &str, got: Option<Vec<u8>>, want: Option<&[u8]>| {
            if got.as_deref() != want {
                problems.push(format!("{what}: got {got:?}, want {want:?}"));
            }
        };
        tx.set(&k("a"), b"A2")?;
        expect("get after set", tx.get(&k("a"))?, Some(b"A2"));
        tx.clear(&k("b"))?;
        expect("get after clear", tx.get(&k("b"))?, None);
        tx.set(&k("x"), b"X")?;
        expect("get of a new key", tx.get(&k("x"))?, Some(b"X"));
        tx.clear_range(&k("c"), &k("e"))?;
        expect("get in a cleared range", tx.get(&k("c"))?, None);
        expect(
            "get at the cleared range's end",
            tx.get(&k("e"))?,
            Some(b"E"),
        );
        tx.set(&k("d"), b"D2")?;
        expect(
            "get of a key set after a clear range",
            tx.get(&k("d"))?,
            Some(b"D2"),
        );
        tx.atomic_add(&k("z-cnt"), 3)?;
        let cnt = tx.get_counter(&k("z-cnt"))?;
        if cnt != 8 {
            problems.push(format!("counter after add: got {cnt}, want 8"));
        }
        let fwd = tx.get_range(&RangeOption::prefix(&p))?;
        let rev = tx.get_range(&RangeOption::prefix(&p).reverse())?;
        let fwd2 = tx.get_range(&RangeOption::prefix(&p).limit(2))?;
        let rev2 = tx.get_range(&RangeOption::prefix(&p).reverse().limit(2))?;
        Ok((problems, fwd, rev, fwd2, rev2))
    });
    let (problems, fwd, rev, fwd2, rev2) = ctx("transaction", r)?;
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    check_eq("range read over own writes", rows(&fwd), rows(&expected))?;
    check_eq(
        "reverse range read over own writes",
        rows(&rev),
        rows(&expected_rev),
    )?;
    check_eq(
        "limited range read over own writes",
        rows(&fwd2),
        rows(&expected[..2]),
    )?;
    check_eq(
        "limited reverse range read over own writes",
        rows(&rev2),
        rows(&expected_rev[..2]),
    )?;
    check_eq(
        "committed state",
        rows(&read_all(&db, &p)?),
        rows(&expected),
    )?;
    cleanup(&db, &p);
    Ok(())
}

/// Read-your-writes against a model: seeded random sequences of sets, clears, clear
/// ranges, adds, point reads and range reads (random bounds, direction and limit) in one
/// transaction over committed data, every read compared with a `BTreeMap`, then the
/// committed result compared too.
pub fn read_your_writes_model(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("ryw_model");
    const ALPHABET: [u8; 5] = [0x00, 0x01, 0x7f, 0x80, 0xff];
    let random_key = |rng: &mut StdRng| -> Vec<u8> {
        let n = rng.random_range(1..=2);
        let s: Vec<u8> = (0..n)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
            .collect();
        key(&p, s)
    };
    let random_bound = |rng: &mut StdRng| -> Vec<u8> {
        match rng.random_range(0..8) {
            0 => p.clone(),
            1 => key(&p, [0xff, 0xff, 0xff]),
            _ => random_key(rng),
        }
    };
    let value = |rng: &mut StdRng| rng.random::<u64>().to_le_bytes().to_vec();
    for seed in 0..8u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut initial: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for _ in 0..rng.random_range(0..12) {
            let k = random_key(&mut rng);
            initial.insert(k, value(&mut rng));
        }
        ctx(
            "fill",
            db.transact(|tx| {
                tx.clear_prefix(&p)?;
                for (k, v) in &initial {
                    tx.set(k, v)?;
                }
                Ok(())
            }),
        )?;
        let result = db.transact(|tx| {
            // A retry re-runs the same script from the same state.
            let mut rng = rng.clone();
            let mut model = initial.clone();
            for step in 0..150 {
                let fail = |what: String| Ok(Err(format!("seed {seed} step {step}: {what}")));
                match rng.random_range(0..6) {
                    0 => {
                        let (k, v) = (random_key(&mut rng), value(&mut rng));
                        tx.set(&k, &v)?;
                        model.insert(k, v);
                    }
                    1 => {
                        let k = random_key(&mut rng);
                        tx.clear(&k)?;
                        model.remove(&k);
                    }
                    2 => {
                        let (a, b) = (random_bound(&mut rng), random_bound(&mut rng));
                        let (a, b) = if a <= b { (a, b) } else { (b, a) };
                        tx.clear_range(&a, &b)?;
                        let doomed: Vec<_> = model.range(a..b).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            model.remove(&k);
                        }
                    }
                    3 => {
                        let k = random_key(&mut rng);
                        let d = rng.random_range(-1000..1000);
                        tx.atomic_add(&k, d)?;
                        let v = add_le(model.get(&k).map(|v| v.as_slice()), d);
                        model.insert(k, v);
                    }
                    4 => {
                        let k = random_key(&mut rng);
                        let got = tx.get(&k)?;
                        if got.as_ref() != model.get(&k) {
                            return fail(format!(
                                "get {}: got {:?}, model {:?}",
                                esc(&k),
                                got.as_deref().map(esc),
                                model.get(&k).map(|v| esc(v))
                            ));
                        }
                    }
                    _ => {
                        let (a, b) = (random_bound(&mut rng), random_bound(&mut rng));
                        let (a, b) = if a <= b { (a, b) } else { (b, a) };
                        let reverse = rng.random_bool(0.5);
                        let limit = if rng.random_bool(0.5) {
                            Some(rng.random_range(1..5))
                        } else {
                            None
                        };
                        let mut r = RangeOption::new(a.clone(), b.clone());
                        r.reverse = reverse;
                        r.limit = limit;
                        let got = tx.get_range(&r)?;
                        let it = model.range(a..b).map(|(k, v)| (k.clone(), v.clone()));
                        let want: Vec<_> = if reverse {
                            it.rev().take(limit.unwrap_or(usize::MAX)).collect()
                        } else {
                            it.take(limit.unwrap_or(usize::MAX)).collect()
                        };
                        if got != want {
                            return fail(format!(
                                "range {} .. {} reverse {reverse} limit {limit:?}: got {:?}, model {:?}",
                                esc(&r.begin),
                                esc(&r.end),
                                rows(&got),
                                rows(&want)
                            ));
                        }
                    }
                }
            }
            Ok(Ok(model))
        });
        let model = ctx("model transaction", result)??;
        check_eq(
            &format!("seed {seed}: committed state"),
            rows(&read_all(&db, &p)?),
            kvs(&model),
        )?;
    }
    cleanup(&db, &p);
    Ok(())
}

#[derive(Debug)]
struct Refused;
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refused by the closure")
    }
}
impl std::error::Error for Refused {}

/// A closure's own error aborts the transaction: returned as is, not retried, nothing
/// written.
pub fn closure_error_aborts(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("closure_error");
    let k = key(&p, "k");
    let attempts = AtomicU32::new(0);
    let r: Result<(), KvError> = db.transact(|tx| {
        attempts.fetch_add(1, SeqCst);
        tx.set(&k, b"written")?;
        Err(KvError::abort(Refused))
    });
    match r {
        Err(e) if e.aborted_as::<Refused>().is_some() => {}
        other => return Err(format!("expected the closure's error, got {other:?}")),
    }
    check_eq("attempts", attempts.load(SeqCst), 1)?;
    check_eq("nothing written", ctx("get", db.get(&k))?, None)
}

/// The FDB contract: T1 reads k; T2 commits a write to k; T1 writes and commits, gets a
/// conflict, and its closure runs a second time, seeing T2's value.
pub fn conflict_reruns_closure(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("conflict");
    let k = key(&p, "k");
    ctx("init", db.transact(|tx| tx.set(&k, b"orig")))?;
    let (seen, attempts) = interleave(
        &db,
        |tx, pause| {
            let v = tx.get(&k)?.unwrap_or_default();
            pause()?;
            tx.set(&k, &key(&v, "+t1"))?;
            Ok(v)
        },
        || db.transact(|tx| tx.set(&k, b"t2")),
    )?;
    check_eq("attempts", attempts, 2)?;
    check_eq("value T1's second attempt read", seen, b"t2".to_vec())?;
    check_eq(
        "final value",
        ctx("get", db.get(&k))?,
        Some(b"t2+t1".to_vec()),
    )?;
    cleanup(&db, &p);
    Ok(())
}

/// A range read conflicts with a later insert into the range (a phantom), even when T1
/// writes elsewhere.
pub fn range_read_conflict_phantom(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("phantom");
    let (rb, re) = (key(&p, "r/"), key(&p, "r0"));
    ctx(
        "init",
        db.transact(|tx| {
            tx.set(&key(&p, "r/a"), b"1")?;
            tx.set(&key(&p, "r/c"), b"1")
        }),
    )?;
    let out = key(&p, "count");
    let (n, attempts) = interleave(
        &db,
        |tx, pause| {
            let n = tx
                .get_range(&RangeOption::new(rb.clone(), re.clone()))?
                .len();
            pause()?;
            tx.set(&out, n.to_string().as_bytes())?;
            Ok(n)
        },
        || db.transact(|tx| tx.set(&key(&p, "r/b"), b"1")),
    )?;
    check_eq("attempts", attempts, 2)?;
    check_eq("rows counted on the retry", n, 3)?;
    check_eq(
        "stored count",
        ctx("get", db.get(&out))?,
        Some(b"3".to_vec()),
    )?;
    cleanup(&db, &p);
    Ok(())
}

/// A range read cut short by its limit only conflicts up to the last key it returned
/// (forward) or from it (reverse): inserts beyond it do not cause a retry.
pub fn range_read_conflict_stops_at_limit(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("limit_conflict");
    let (rb, re) = (key(&p, "r/"), key(&p, "r0"));
    ctx(
        "init",
        db.transact(|tx| {
            tx.set(&key(&p, "r/b"), b"1")?;
            tx.set(&key(&p, "r/d"), b"1")
        }),
    )?;
    let out = key(&p, "out");
    for (reverse, insert) in [(false, "r/c"), (true, "r/a")] {
        let mut r = RangeOption::new(rb.clone(), re.clone()).limit(1);
        r.reverse = reverse;
        let (_, attempts) = interleave(
            &db,
            |tx, pause| {
                let rows = tx.get_range(&r)?;
                pause()?;
                tx.set(&out, &rows[0].0)
            },
            || db.transact(|tx| tx.set(&key(&p, insert), b"1")),
        )?;
        check_eq(
            &format!("attempts (reverse: {reverse}, insert beyond the last key read)"),
            attempts,
            1,
        )?;
    }
    cleanup(&db, &p);
    Ok(())
}

/// N threads doing read-modify-write increments of one key lose no update.
pub fn no_lost_updates(f: &dyn StoreFactory) -> Res {
    let db = patient(f.open()?);
    let p = scratch("lost_updates");
    let k = key(&p, "n");
    const THREADS: u64 = 4;
    const INCREMENTS: u64 = 25;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..INCREMENTS {
                        db.transact(|tx| {
                            let n = tx
                                .get(&k)?
                                .map(|v| u64::from_le_bytes(v.try_into().unwrap_or([0; 8])))
                                .unwrap_or(0);
                            tx.set(&k, &(n + 1).to_le_bytes())
                        })?;
                    }
                    Ok::<_, KvError>(())
                })
            })
            .collect();
        for h in handles {
            let r = h
                .join()
                .map_err(|_| "incrementing thread panicked".to_string())?;
            ctx("incrementing thread", r)?;
        }
        Ok::<_, String>(())
    })?;
    let v = ctx("read", db.get(&k))?.unwrap_or_default();
    check_eq(
        "final count",
        u64::from_le_bytes(v.try_into().unwrap_or([0; 8])),
        THREADS * INCREMENTS,
    )?;
    cleanup(&db, &p);
    Ok(())
}

fn key_of_len(p: &[u8], len: usize) -> Vec<u8> {
    let mut k = p.to_vec();
    k.resize(len, b'k');
    k
}

/// Keys of 10,000 bytes are accepted, 10,001 are `KeyTooLarge` (writes and reads).
pub fn limit_key_size(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("key_limit");
    let ok = key_of_len(&p, limits::MAX_KEY_BYTES);
    let big = key_of_len(&p, limits::MAX_KEY_BYTES + 1);
    ctx(
        "set a key at the limit",
        db.transact(|tx| tx.set(&ok, b"v")),
    )?;
    check_eq(
        "read it back",
        ctx("get", db.get(&ok))?,
        Some(b"v".to_vec()),
    )?;
    match db.transact(|tx| tx.set(&big, b"v")) {
        Err(KvError::KeyTooLarge { len, limit })
            if len == limits::MAX_KEY_BYTES + 1 && limit == limits::MAX_KEY_BYTES => {}
        other => return Err(format!("set of a 10,001-byte key: got {other:?}")),
    }
    match db.get(&big) {
        Err(KvError::KeyTooLarge { .. }) => {}
        other => return Err(format!("get of a 10,001-byte key: got {other:?}")),
    }
    cleanup(&db, &p);
    Ok(())
}

/// Values of 100,000 bytes are accepted, 100,001 are `ValueTooLarge`, nothing written.
pub fn limit_value_size(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("value_limit");
    let (a, b) = (key(&p, "a"), key(&p, "b"));
    let ok = vec![7u8; limits::MAX_VALUE_BYTES];
    ctx(
        "set a value at the limit",
        db.transact(|tx| tx.set(&a, &ok)),
    )?;
    check(
        "value at the limit reads back",
        ctx("get", db.get(&a))? == Some(ok),
    )?;
    let r = db.transact(|tx| {
        tx.set(&b, b"small")?;
        tx.set(&b, &vec![7u8; limits::MAX_VALUE_BYTES + 1])
    });
    match r {
        Err(KvError::ValueTooLarge { len, .. }) if len == limits::MAX_VALUE_BYTES + 1 => {}
        other => return Err(format!("set of a 100,001-byte value: got {other:?}")),
    }
    check_eq("nothing written", ctx("get", db.get(&b))?, None)?;
    cleanup(&db, &p);
    Ok(())
}

/// A transaction writing more than 10 MB fails with `TransactionTooLarge`, nothing
/// written; 9 MB commits.
pub fn limit_transaction_size(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("txn_limit");
    let v = vec![1u8; limits::MAX_VALUE_BYTES];
    ctx(
        "a 9 MB transaction",
        db.transact(|tx| {
            for i in 0..90u32 {
                tx.set(&key(&p, format!("ok/{i:04}")), &v)?;
            }
            Ok(())
        }),
    )?;
    ctx("clear", db.transact(|tx| tx.clear_prefix(&p)))?;
    let r = db.transact(|tx| {
        for i in 0..101u32 {
            tx.set(&key(&p, format!("big/{i:04}")), &v)?;
        }
        Ok(())
    });
    match r {
        Err(KvError::TransactionTooLarge { len, limit })
            if len > limits::MAX_TXN_BYTES && limit == limits::MAX_TXN_BYTES => {}
        other => return Err(format!("an 10.1 MB transaction: got {other:?}")),
    }
    check_eq("nothing written", read_all(&db, &p)?.len(), 0)
}

/// A transaction older than 5 s at commit fails with `TransactionTooOld`, nothing
/// written; at 4.9 s it commits. Uses a [`ManualClock`]: no real waiting.
pub fn limit_transaction_age(f: &dyn StoreFactory) -> Res {
    let clock = Arc::new(ManualClock::new());
    let db = f.open()?.with_clock(clock.clone());
    let p = scratch("age_limit");
    let (a, b) = (key(&p, "a"), key(&p, "b"));
    ctx(
        "a 4.9 s transaction",
        db.transact(|tx| {
            tx.set(&a, b"v")?;
            clock.advance(Duration::from_millis(4_900));
            Ok(())
        }),
    )?;
    let r = db.transact(|tx| {
        tx.set(&b, b"v")?;
        clock.advance(limits::MAX_TXN_AGE + Duration::from_millis(1));
        Ok(())
    });
    match r {
        Err(KvError::TransactionTooOld { age, limit })
            if age > limits::MAX_TXN_AGE && limit == limits::MAX_TXN_AGE => {}
        other => return Err(format!("a 5.001 s transaction: got {other:?}")),
    }
    check_eq(
        "young transaction committed",
        ctx("get", db.get(&a))?,
        Some(b"v".to_vec()),
    )?;
    check_eq(
        "old transaction wrote nothing",
        ctx("get", db.get(&b))?,
        None,
    )?;
    cleanup(&db, &p);
    Ok(())
}

/// A transaction that conflicts on every attempt ends in `RetriesExhausted` after
/// exactly `max_attempts` runs, with the conflict as its last error.
pub fn retries_exhausted(f: &dyn StoreFactory) -> Res {
    let db = f.open()?.with_retry(RetryOptions {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
    });
    let p = scratch("retries");
    let k = key(&p, "k");
    let attempts = AtomicU32::new(0);
    let r = db.transact(|tx| {
        let n = attempts.fetch_add(1, SeqCst);
        tx.get(&k)?;
        // Another transaction changes what this one read, every time.
        db.transact(|other| other.set(&k, n.to_string().as_bytes()))?;
        tx.set(&k, b"never")
    });
    match r {
        Err(KvError::RetriesExhausted { attempts: 3, last }) if last.is_retryable() => {}
        other => return Err(format!("expected RetriesExhausted after 3, got {other:?}")),
    }
    check_eq("closure runs", attempts.load(SeqCst), 3)?;
    check_eq("last write", ctx("get", db.get(&k))?, Some(b"2".to_vec()))?;
    cleanup(&db, &p);
    Ok(())
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Blobs of 0 bytes, 1 byte, exactly one chunk, one chunk + 1 and several chunks read
/// back identically, with [`blob::read`] and with [`blob::read_in`]; absent is `None`;
/// overwriting with a smaller blob leaves no stale chunks; delete removes everything.
pub fn blob_round_trips(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("blob");
    check_eq("absent blob", ctx("read", blob::read(&db, &p))?, None)?;
    for (i, n) in [
        0,
        1,
        blob::CHUNK_SIZE,
        blob::CHUNK_SIZE + 1,
        3 * blob::CHUNK_SIZE + 17,
    ]
    .into_iter()
    .enumerate()
    {
        let data = random_bytes(i as u64, n);
        let h = ctx("write", blob::write(&db, &p, &data))?;
        check_eq(&format!("{n} bytes: header length"), h.len, n as u64)?;
        check(
            &format!("{n} bytes: read back"),
            ctx("read", blob::read(&db, &p))?.as_deref() == Some(&data[..]),
        )?;
        check(
            &format!("{n} bytes: read back in a transaction"),
            ctx("read_in", db.transact(|tx| blob::read_in(tx, &p)))?.as_deref() == Some(&data[..]),
        )?;
        let keys = read_all(&db, &p)?.len();
        check_eq(
            &format!("{n} bytes: keys stored (header + chunks, none stale)"),
            keys,
            1 + n.div_ceil(blob::CHUNK_SIZE),
        )?;
    }
    ctx("delete", db.transact(|tx| blob::delete_in(tx, &p)))?;
    check_eq("deleted blob", ctx("read", blob::read(&db, &p))?, None)?;
    check_eq("keys after delete", read_all(&db, &p)?.len(), 0)
}

/// A 25 MB blob (written and read over several transactions) round-trips; a changed
/// byte in one of its chunks is reported as corrupt; replacing it with a small blob
/// removes its chunks.
pub fn blob_large_round_trip(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("blob_large");
    let data = random_bytes(25, 25_000_000);
    let h = ctx("write 25 MB", blob::write(&db, &p, &data))?;
    check_eq(
        "chunks",
        h.chunk_count as usize,
        data.len().div_ceil(blob::CHUNK_SIZE),
    )?;
    let back = ctx("read 25 MB", blob::read(&db, &p))?;
    check("25 MB read back", back.as_deref() == Some(&data[..]))?;
    // Corrupt chunk 200 (of 278).
    let ck = blob::chunk_key(&p, h.generation, 200);
    ctx(
        "corrupt a chunk",
        db.transact(|tx| {
            let mut v = tx.get(&ck)?.unwrap_or_default();
            if let Some(b) = v.get_mut(100) {
                *b ^= 0x01;
            }
            tx.set(&ck, &v)
        }),
    )?;
    match blob::read(&db, &p) {
        Err(KvError::Corrupt { .. }) => {}
        other => {
            return Err(format!(
                "corrupted 25 MB blob: got {:?}",
                other.map(|o| o.map(|v| v.len()))
            ))
        }
    }
    let small = random_bytes(1, 1000);
    ctx("replace with a small blob", blob::write(&db, &p, &small))?;
    check(
        "small blob read back",
        ctx("read", blob::read(&db, &p))?.as_deref() == Some(&small[..]),
    )?;
    check_eq("keys after replacing", read_all(&db, &p)?.len(), 2)?;
    cleanup(&db, &p);
    Ok(())
}

/// Changed bytes, a missing chunk and a truncated chunk are all `Corrupt` on read.
pub fn blob_corruption_detected(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("blob_corrupt");
    let data = random_bytes(3, 2 * blob::CHUNK_SIZE + 5);
    type Damage = fn(&mut Transaction<'_>, &[u8]) -> Result<(), KvError>;
    let damages: [(&str, Damage); 3] = [
        ("flipped byte", |tx, k| {
            let mut v = tx.get(k)?.unwrap_or_default();
            v[7] ^= 0x80;
            tx.set(k, &v)
        }),
        ("missing chunk", |tx, k| tx.clear(k)),
        ("truncated chunk", |tx, k| {
            let v = tx.get(k)?.unwrap_or_default();
            tx.set(k, &v[..v.len() - 1])
        }),
    ];
    for (what, damage) in damages {
        let h = ctx("write", blob::write(&db, &p, &data))?;
        let ck = blob::chunk_key(&p, h.generation, 1);
        ctx("damage", db.transact(|tx| damage(tx, &ck)))?;
        match blob::read(&db, &p) {
            Err(KvError::Corrupt { .. }) => {}
            other => {
                return Err(format!(
                    "{what}: read gave {:?}, want Corrupt",
                    other.map(|o| o.map(|v| v.len()))
                ))
            }
        }
        match db.transact(|tx| blob::read_in(tx, &p)) {
            Err(KvError::Corrupt { .. }) => {}
            other => {
                return Err(format!(
                    "{what}: read_in gave {:?}, want Corrupt",
                    other.map(|o| o.map(|v| v.len()))
                ))
            }
        }
    }
    cleanup(&db, &p);
    Ok(())
}

/// A blob written with [`blob::write_in`] commits atomically with the caller's other
/// writes, or not at all; `write_in` refuses blobs over the single-transaction size.
pub fn blob_in_caller_transaction(f: &dyn StoreFactory) -> Res {
    let db = f.open()?;
    let p = scratch("blob_in_tx");
    let (bp, pos) = (key(&p, "blob"), key(&p, "pos"));
    let weights = random_bytes(9, 300_000);
    let r: Result<(), KvError> = db.transact(|tx| {
        blob::write_in(tx, &bp, &weights)?;
        tx.set(&pos, b"7")?;
        Err(KvError::abort(Refused))
    });
    check("aborted transaction fails", r.is_err())?;
    check_eq("aborted: no blob", ctx("read", blob::read(&db, &bp))?, None)?;
    check_eq("aborted: no position", ctx("get", db.get(&pos))?, None)?;
    ctx(
        "commit blob with position",
        db.transact(|tx| {
            blob::write_in(tx, &bp, &weights)?;
            tx.set(&pos, b"7")
        }),
    )?;
    check(
        "committed blob",
        ctx("read", blob::read(&db, &bp))?.as_deref() == Some(&weights[..]),
    )?;
    check_eq(
        "committed position",
        ctx("get", db.get(&pos))?,
        Some(b"7".to_vec()),
    )?;
    let too_big = vec![0u8; blob::MAX_SINGLE_TXN_BYTES + 1];
    match db.transact(|tx| blob::write_in(tx, &bp, &too_big)) {
        Err(KvError::InvalidArgument(_)) => {}
        other => return Err(format!("write_in over 8 MB: got {:?}", other.map(|_| ()))),
    }
    cleanup(&db, &p);
    Ok(())
}

/// Data committed through one handle is there after the handle is dropped and the
/// store opened again.
pub fn durability_after_reopen(f: &dyn StoreFactory) -> Res {
    let p = scratch("durability");
    let data = random_bytes(4, 1_000_000);
    {
        let db = f.open()?;
        ctx(
            "write",
            db.transact(|tx| {
                tx.set(&key(&p, "k"), b"v")?;
                tx.atomic_add(&key(&p, "n"), 42)
            }),
        )?;
        ctx("blob", blob::write(&db, &key(&p, "blob"), &data))?;
    }
    let db = f.open()?;
    check_eq(
        "key after reopen",
        ctx("get", db.get(&key(&p, "k")))?,
        Some(b"v".to_vec()),
    )?;
    check_eq(
        "counter after reopen",
        ctx("get", db.transact(|tx| tx.get_counter(&key(&p, "n"))))?,
        42,
    )?;
    check(
        "blob after reopen",
        ctx("read", blob::read(&db, &key(&p, "blob")))?.as_deref() == Some(&data[..]),
    )?;
    cleanup(&db, &p);
    Ok(())
}

/// How long [`change_watch_wakes_after_a_commit`] lets a watch wait; it must wake well
/// before.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A backend's change watch ([`crate::watch`]), if it has one, wakes up after a commit
/// made through another handle of the same store (as another process would), whether
/// the commit lands before the wait starts or during it; a backend without one passes
/// (callers poll).
pub fn change_watch_wakes_after_a_commit(f: &dyn StoreFactory) -> Res {
    let p = scratch("watch");
    let db = f.open()?;
    let Some(mut watch) = db.change_watch() else {
        return Ok(());
    };
    let other = f.open()?;
    for round in 0..3u8 {
        let k = key(&p, [round]);
        let started = Instant::now();
        if round == 0 {
            // Committed before the wait starts: the watch must still report it.
            ctx("commit", other.transact(|tx| tx.set(&k, b"v")))?;
            watch.wait(WATCH_TIMEOUT);
        } else {
            std::thread::scope(|s| -> Res {
                let committer = s.spawn(|| other.transact(|tx| tx.set(&k, b"v")));
                watch.wait(WATCH_TIMEOUT);
                ctx(
                    "commit",
                    committer
                        .join()
                        .map_err(|_| "committer panicked".to_string())?,
                )
            })?;
        }
        check(
            &format!(
                "round {round}: the watch woke {:?} after a commit (it may wait {WATCH_TIMEOUT:?})",
                started.elapsed()
            ),
            started.elapsed() < WATCH_TIMEOUT * 3 / 4,
        )?;
        // What woke it is visible to a new transaction.
        check_eq(
            "the committed key after the wake",
            ctx("get", db.get(&k))?,
            Some(b"v".to_vec()),
        )?;
    }
    cleanup(&db, &p);
    Ok(())
}

/// Child side of the multi-process property: `increments` read-modify-write increments
/// of the shared counter at `prefix + "counter"`, each also setting the process's own key
/// `prefix + "child/<id>/<i>"`.
pub fn multi_process_child(db: &Db, prefix: &[u8], id: u32, increments: u32) -> Res {
    let db = patient(db.clone());
    let counter = key(prefix, "counter");
    for i in 0..increments {
        let own = key(prefix, format!("child/{id}/{i:06}"));
        ctx(
            "increment",
            db.transact(|tx| {
                let n = tx
                    .get(&counter)?
                    .map(|v| u64::from_le_bytes(v.try_into().unwrap_or([0; 8])))
                    .unwrap_or(0);
                tx.set(&counter, &(n + 1).to_le_bytes())?;
                tx.set(&own, b"1")
            }),
        )?;
    }
    Ok(())
}

/// Parent side: after every child ran [`multi_process_child`], the counter is exactly
/// the sum of increments and every child's keys are there.
pub fn multi_process_check(db: &Db, prefix: &[u8], children: u32, increments: u32) -> Res {
    let v = ctx("read counter", db.get(&key(prefix, "counter")))?.unwrap_or_default();
    check_eq(
        "shared counter",
        u64::from_le_bytes(v.try_into().unwrap_or([0; 8])),
        children as u64 * increments as u64,
    )?;
    for id in 0..children {
        let own = read_all(db, &key(prefix, format!("child/{id}/")))?;
        check_eq(
            &format!("keys of child {id}"),
            own.len(),
            increments as usize,
        )?;
    }
    Ok(())
}
