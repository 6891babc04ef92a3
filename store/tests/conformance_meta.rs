//! The suite can fail: deliberately broken backends (wrappers around the embedded one)
//! must fail the properties that describe what they break, while the same wrapper with
//! nothing broken passes them.
use swimlane_store::conformance::{self, StoreFactory, TempEmbedded};
use swimlane_store::embedded::EmbeddedBackend;
use swimlane_store::watch::ChangeWatch;
use swimlane_store::{Backend, BackendTx, Db, KeyValue, KvError, Mutation, RangeOption};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Breakage {
    Nothing,
    /// Commits with a conflict are replayed blindly (last writer wins).
    IgnoresConflicts,
    /// Writes are held back until commit, so reads never see them.
    NoReadYourWrites,
    /// atomic_add reads the value outside the transaction and sets the sum blindly.
    NonAtomicAdd,
    /// Range reads always come back in ascending order.
    IgnoresReverse,
    /// clear_range does nothing.
    DropsClearRange,
    /// The change watch never wakes before its timeout.
    SilentWatch,
}

#[derive(Clone, Debug)]
enum W {
    Set(Vec<u8>, Vec<u8>),
    Clear(Vec<u8>),
    ClearRange(Vec<u8>, Vec<u8>),
    Add(Vec<u8>, i64),
}

fn apply(tx: &mut dyn BackendTx, w: &W) -> Result<(), KvError> {
    tx.mutate(match w {
        W::Set(k, v) => Mutation::Set(k, v),
        W::Clear(k) => Mutation::Clear(k),
        W::ClearRange(b, e) => Mutation::ClearRange(b, e),
        W::Add(k, d) => Mutation::Add(k, *d),
    })
}

struct Broken {
    inner: EmbeddedBackend,
    kind: Breakage,
}

struct BrokenTx<'a> {
    backend: &'a Broken,
    inner: Box<dyn BackendTx + 'a>,
    log: Vec<W>,
    pending: Vec<W>,
}

impl Backend for Broken {
    fn begin(&self) -> Result<Box<dyn BackendTx + '_>, KvError> {
        Ok(Box::new(BrokenTx {
            backend: self,
            inner: self.inner.begin()?,
            log: Vec::new(),
            pending: Vec::new(),
        }))
    }
    fn name(&self) -> &'static str {
        "broken"
    }
    fn change_watch(&self) -> Option<Box<dyn ChangeWatch>> {
        match self.kind {
            Breakage::SilentWatch => Some(Box::new(Silent)),
            _ => self.inner.change_watch(),
        }
    }
}

/// A watch that sleeps out every timeout.
struct Silent;

impl ChangeWatch for Silent {
    fn wait(&mut self, timeout: std::time::Duration) {
        std::thread::sleep(timeout);
    }
}

impl BrokenTx<'_> {
    fn write(&mut self, w: W) -> Result<(), KvError> {
        self.log.push(w.clone());
        match (self.backend.kind, &w) {
            (Breakage::NoReadYourWrites, _) => {
                self.pending.push(w);
                Ok(())
            }
            (Breakage::DropsClearRange, W::ClearRange(..)) => Ok(()),
            (Breakage::NonAtomicAdd, W::Add(k, d)) => {
                let base = self.backend.inner.begin()?.get(k)?;
                let mut b = [0u8; 8];
                if let Some(v) = base {
                    let n = v.len().min(8);
                    b[..n].copy_from_slice(&v[..n]);
                }
                let sum = i64::from_le_bytes(b).wrapping_add(*d);
                self.inner.mutate(Mutation::Set(k, &sum.to_le_bytes()))
            }
            _ => apply(&mut *self.inner, &w),
        }
    }
}

impl BackendTx for BrokenTx<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get(key)
    }
    fn get_range(&mut self, range: &RangeOption) -> Result<Vec<KeyValue>, KvError> {
        if self.backend.kind == Breakage::IgnoresReverse {
            let mut r = range.clone();
            r.reverse = false;
            return self.inner.get_range(&r);
        }
        self.inner.get_range(range)
    }
    fn mutate(&mut self, m: Mutation<'_>) -> Result<(), KvError> {
        self.write(match m {
            Mutation::Set(k, v) => W::Set(k.to_vec(), v.to_vec()),
            Mutation::Clear(k) => W::Clear(k.to_vec()),
            Mutation::ClearRange(b, e) => W::ClearRange(b.to_vec(), e.to_vec()),
            Mutation::Add(k, d) => W::Add(k.to_vec(), d),
        })
    }
    fn commit(self: Box<Self>) -> Result<(), KvError> {
        let BrokenTx {
            backend,
            mut inner,
            log,
            pending,
        } = *self;
        for w in &pending {
            apply(&mut *inner, w)?;
        }
        match inner.commit() {
            Err(KvError::Conflict) if backend.kind == Breakage::IgnoresConflicts => {
                let mut fresh = backend.inner.begin()?;
                for w in &log {
                    apply(&mut *fresh, w)?;
                }
                fresh.commit()
            }
            r => r,
        }
    }
}

struct BrokenStore {
    temp: TempEmbedded,
    kind: Breakage,
}

impl StoreFactory for BrokenStore {
    fn open(&self) -> Result<Db, String> {
        let inner = EmbeddedBackend::open_in_dir(self.temp.dir()).map_err(|e| e.to_string())?;
        Ok(Db::new(Broken {
            inner,
            kind: self.kind,
        }))
    }
}

fn store(kind: Breakage) -> BrokenStore {
    BrokenStore {
        temp: TempEmbedded::new().unwrap(),
        kind,
    }
}

/// Assert that `kind` fails every property in `fails` (and report why), and that the
/// unbroken wrapper passes them.
fn assert_caught(kind: Breakage, fails: &[(&str, conformance::Property)]) {
    for (name, property) in fails {
        if let Err(e) = property(&store(Breakage::Nothing)) {
            panic!("the unbroken wrapper fails `{name}`: {e}");
        }
        match property(&store(kind)) {
            Ok(()) => panic!("`{name}` did not catch a backend that {kind:?}"),
            Err(e) => eprintln!("{kind:?} caught by {name}: {e}"),
        }
    }
}

#[test]
fn ignoring_conflicts_is_caught() {
    assert_caught(
        Breakage::IgnoresConflicts,
        &[
            (
                "conflict_reruns_closure",
                conformance::conflict_reruns_closure,
            ),
            (
                "range_read_conflict_phantom",
                conformance::range_read_conflict_phantom,
            ),
            ("retries_exhausted", conformance::retries_exhausted),
            (
                "atomic_add_has_no_read_conflict",
                conformance::atomic_add_has_no_read_conflict,
            ),
        ],
    );
}

#[test]
fn missing_read_your_writes_is_caught() {
    assert_caught(
        Breakage::NoReadYourWrites,
        &[
            ("read_your_writes", conformance::read_your_writes),
            (
                "read_your_writes_model",
                conformance::read_your_writes_model,
            ),
            ("atomic_add_counts", conformance::atomic_add_counts),
        ],
    );
}

#[test]
fn non_atomic_add_is_caught() {
    assert_caught(
        Breakage::NonAtomicAdd,
        &[(
            "atomic_add_has_no_read_conflict",
            conformance::atomic_add_has_no_read_conflict,
        )],
    );
}

#[test]
fn ignoring_reverse_is_caught() {
    assert_caught(
        Breakage::IgnoresReverse,
        &[
            (
                "range_reads_order_reverse_limit",
                conformance::range_reads_order_reverse_limit,
            ),
            ("read_your_writes", conformance::read_your_writes),
        ],
    );
}

#[test]
fn dropped_clear_range_is_caught() {
    assert_caught(
        Breakage::DropsClearRange,
        &[
            (
                "clear_range_and_prefix",
                conformance::clear_range_and_prefix,
            ),
            ("blob_round_trips", conformance::blob_round_trips),
            (
                "read_your_writes_model",
                conformance::read_your_writes_model,
            ),
        ],
    );
}

#[test]
fn a_silent_change_watch_is_caught() {
    assert_caught(
        Breakage::SilentWatch,
        &[(
            "change_watch_wakes_after_a_commit",
            conformance::change_watch_wakes_after_a_commit,
        )],
    );
}

/// A "store" that forgets everything when reopened fails the durability property.
#[test]
fn lost_data_on_reopen_is_caught() {
    let forgetful = || -> Result<Db, String> {
        EmbeddedBackend::open_temp()
            .map(Db::new)
            .map_err(|e| e.to_string())
    };
    let e = conformance::durability_after_reopen(&forgetful).unwrap_err();
    eprintln!("forgetful store caught: {e}");
    assert!(conformance::durability_after_reopen(&TempEmbedded::new().unwrap()).is_ok());
}
