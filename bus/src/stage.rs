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

/// How the loop polls and backs off.
#[derive(Clone, Debug)]
pub struct LoopOptions {
    pub max_records: usize,
    pub poll_timeout: Duration,
    pub max_backoff: Duration,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            max_records: 8,
            poll_timeout: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
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
    while !stop() {
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
