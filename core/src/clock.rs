//! The wall clock: milliseconds since the Unix epoch, injected wherever control flow
//! or a stored timestamp depends on the time (leases, the stage runner's effect
//! stamps, outbox sequence numbers, ingest's token checks), so tests can fix it.
//!
//! One wall clock for the whole system. The store's transaction-age limit uses a
//! monotonic clock of its own (`swimlane_store::Clock`): a duration measured on the
//! wall clock would be wrong whenever the wall clock is stepped.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. Any `Fn() -> u64` is one.
pub trait WallClock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

impl<F: Fn() -> u64 + Send + Sync + 'static> WallClock for F {
    fn now_ms(&self) -> u64 {
        self()
    }
}

/// A wall clock, shared.
pub type NowMs = Arc<dyn WallClock>;

/// The system's wall clock, shared.
pub fn system_now_ms() -> NowMs {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// A clock that reads what it was last set to (tests).
#[derive(Debug, Default)]
pub struct ManualWallClock(AtomicU64);

impl ManualWallClock {
    pub fn new(ms: u64) -> Self {
        ManualWallClock(AtomicU64::new(ms))
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst)
    }
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl WallClock for ManualWallClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closures_manual_and_system_clocks_tell_the_time() {
        let fixed: NowMs = Arc::new(|| 42);
        assert_eq!(fixed.now_ms(), 42);
        let manual = Arc::new(ManualWallClock::new(10));
        manual.advance(5);
        let shared: NowMs = manual.clone();
        assert_eq!(shared.now_ms(), 15);
        manual.set(3);
        assert_eq!(shared.now_ms(), 3);
        assert!(system_now_ms().now_ms() > 1_600_000_000_000);
    }
}
