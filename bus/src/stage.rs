//! The consume → handle → commit loop every consuming stage runs.
//!
//! Contract with a [`StageHandler`]: `handle` either commits, in ONE store
//! transaction, the effects of every record of the delivery together with
//! [`crate::positions::commit`] of `delivery.next_offset()` (dead-lettering any record
//! it can never process), or commits nothing and returns an error. The loop then
//! either advances (Ok), drops the partition (fenced), or backs off and re-reads the
//! same records (any other error), so no record is skipped and none is applied twice.
use std::time::Duration;

use swimlane_store::KvError;

use crate::positions::is_fenced;
use crate::{BusError, Consumer, Delivery};

/// A stage's processing of one delivery. See the module doc for the contract.
pub trait StageHandler {
    fn handle(&mut self, delivery: &Delivery) -> Result<(), KvError>;
}

/// Receives the consumer's lag (records waiting on its partitions), at most once a
/// second.
pub type LagSink = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// How the loop polls and backs off.
#[derive(Clone)]
pub struct LoopOptions {
    pub max_records: usize,
    pub poll_timeout: Duration,
    pub max_backoff: Duration,
    /// Where to report lag (a metrics gauge), if anywhere.
    pub lag: Option<LagSink>,
}

impl std::fmt::Debug for LoopOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopOptions")
            .field("max_records", &self.max_records)
            .field("poll_timeout", &self.poll_timeout)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            max_records: 8,
            poll_timeout: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            lag: None,
        }
    }
}

/// Run until `stop()` is true, then leave the group. Returns an error only when the
/// consumer itself fails to close.
pub fn run_stage(
    consumer: &mut dyn Consumer,
    handler: &mut dyn StageHandler,
    opts: &LoopOptions,
    stop: &dyn Fn() -> bool,
) -> Result<(), BusError> {
    let mut backoff = Duration::from_millis(50);
    let mut lag_reported: Option<std::time::Instant> = None;
    while !stop() {
        if let Some(sink) = &opts.lag {
            if lag_reported.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                if let Ok(l) = consumer.lag() {
                    sink(l);
                }
                lag_reported = Some(std::time::Instant::now());
            }
        }
        let delivery = match consumer.poll(opts.max_records, opts.poll_timeout) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "poll failed; backing off");
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(opts.max_backoff);
                continue;
            }
        };
        let span = tracing::info_span!("delivery", topic = %delivery.fence.topic, partition = delivery.fence.partition, offset = delivery.fence.offset, records = delivery.records.len());
        let _g = span.enter();
        match handler.handle(&delivery) {
            Ok(()) => {
                consumer.committed(&delivery.fence, delivery.next_offset());
                backoff = Duration::from_millis(50);
            }
            Err(e) if is_fenced(&e) => {
                tracing::warn!(error = %e, "delivery fenced; partition dropped");
                consumer.fenced(&delivery.fence);
            }
            Err(e) => {
                tracing::error!(error = %e, "handling failed; nothing committed, will retry");
                // The cursor did not move: the next poll returns the same records.
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
    }
    consumer.close()
}

fn sleep_unless_stopped(d: Duration, stop: &dyn Fn() -> bool) {
    let step = Duration::from_millis(20);
    let mut left = d;
    while !left.is_zero() && !stop() {
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
}
