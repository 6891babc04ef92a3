//! A store backend that fails on purpose (tests; feature `test-util`): it wraps a real
//! backend and, while its [`FaultSwitch`] says so, makes transactions fail the ways a
//! real store does under trouble. Everything else is the wrapped backend's: reads,
//! writes and commits go through unchanged while the switch is off.
//!
//! The faults:
//! - [`Fault::Unavailable`]: every commit fails with a retryable error (a store that is
//!   down or unreachable), reads included.
//! - [`Fault::Conflicts`]: every commit of a transaction that wrote conflicts (a store
//!   too contended to make progress: `transact` runs out of attempts), while read-only
//!   transactions go through.
//! - [`Fault::TooSlow`]: a writing transaction outlives FoundationDB's 5-second limit
//!   (the [`ManualClock`] given to [`FaultyBackend::new`] moves 6 s at its first write).
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::kv::{Backend, BackendTx, KeyValue, ManualClock, Mutation, RangeOption};
use crate::KvError;

/// What a [`FaultyBackend`] does to the transactions that begin while it is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    Unavailable = 1,
    Conflicts = 2,
    TooSlow = 3,
}

/// Turns a [`FaultyBackend`]'s fault on and off; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct FaultSwitch(Arc<AtomicU8>);

impl FaultSwitch {
    pub fn set(&self, fault: Fault) {
        self.0.store(fault as u8, Ordering::SeqCst);
    }
    fn get(&self) -> Fault {
        match self.0.load(Ordering::SeqCst) {
            1 => Fault::Unavailable,
            2 => Fault::Conflicts,
            3 => Fault::TooSlow,
            _ => Fault::None,
        }
    }
}

/// `inner`, failing as its switch says.
pub struct FaultyBackend<B> {
    inner: B,
    switch: FaultSwitch,
    clock: Arc<ManualClock>,
}

impl<B: Backend> FaultyBackend<B> {
    /// `inner` with its fault off; `clock` is the one [`Fault::TooSlow`] moves (give
    /// the same clock to the `Db`: `Db::with_clock`).
    pub fn new(inner: B, clock: Arc<ManualClock>) -> (Self, FaultSwitch) {
        let switch = FaultSwitch::default();
        let b = FaultyBackend {
            inner,
            switch: switch.clone(),
            clock,
        };
        (b, switch)
    }
}

struct FaultyTx<'a> {
    inner: Box<dyn BackendTx + 'a>,
    fault: Fault,
    clock: Arc<ManualClock>,
    wrote: bool,
}

impl FaultyTx<'_> {
    fn writes(&mut self) {
        if self.fault == Fault::TooSlow && !self.wrote {
            self.clock.advance(Duration::from_secs(6));
        }
        self.wrote = true;
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    fn begin(&self) -> Result<Box<dyn BackendTx + '_>, KvError> {
        Ok(Box::new(FaultyTx {
            inner: self.inner.begin()?,
            fault: self.switch.get(),
            clock: self.clock.clone(),
            wrote: false,
        }))
    }
    fn name(&self) -> &'static str {
        "faulty"
    }
    fn purge_deleted(&self) -> Result<crate::Purged, KvError> {
        self.inner.purge_deleted()
    }
}

impl BackendTx for FaultyTx<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get(key)
    }
    fn get_range(&mut self, range: &RangeOption) -> Result<Vec<KeyValue>, KvError> {
        self.inner.get_range(range)
    }
    fn mutate(&mut self, m: Mutation<'_>) -> Result<(), KvError> {
        self.writes();
        self.inner.mutate(m)
    }
    fn commit(self: Box<Self>) -> Result<(), KvError> {
        match self.fault {
            Fault::Unavailable => Err(KvError::Transient("injected: store unavailable".into())),
            Fault::Conflicts if self.wrote => Err(KvError::Conflict),
            _ => self.inner.commit(),
        }
    }
}
