//! Statistics over all users that the pipeline keeps in the store for operators, as
//! counters updated inside the transactions that change what they count (so they are
//! exact, and the same whichever process exports them).
//!
//! - [`HEAD_ACCURACY`]: how many users' current model (their head) has a held-out
//!   accuracy in each bucket of [`ACCURACY_BUCKETS`] (a histogram, never a per-user
//!   label); index `i` counts accuracies `<= ACCURACY_BUCKETS[i]` and above the
//!   previous bound, index `ACCURACY_BUCKETS.len()` the rest. [`HEAD_ACCURACY_SUM`]
//!   (index 0) is the sum of those accuracies in millionths.
//! - [`LIVE_WINDOWS`] (index 0): windows the devices' models classified, as uploads in
//!   format 2 report them; [`LIVE_RIGHT`] (index 0): those the user confirmed (the
//!   model was right). Their ratio is the fleet's live accuracy.
//! - [`USERS_LIVE_ACCURACY`]: how many users' live accuracy (of the model their device
//!   runs: the head, or the base model without one; once it classified at least
//!   [`MIN_LIVE_WINDOWS`] windows) is in each bucket of [`ACCURACY_BUCKETS`], with
//!   [`USERS_LIVE_ACCURACY_SUM`]; [`USERS_LIVE_FELL`] (index 0): how many of those
//!   users' live accuracy is below that of the model they ran before their last
//!   publish (both measured on at least [`MIN_LIVE_WINDOWS`]).

/// Counter family of users per held-out accuracy bucket of their head model.
pub const HEAD_ACCURACY: &str = "head_accuracy";
/// Counter (index 0): the sum of the users' head accuracies, in millionths.
pub const HEAD_ACCURACY_SUM: &str = "head_accuracy_sum_micros";

/// Counter (index 0): windows the devices' models classified (uploads' feedback).
pub const LIVE_WINDOWS: &str = "live_windows";
/// Counter (index 0): of [`LIVE_WINDOWS`], those the device's model got right.
pub const LIVE_RIGHT: &str = "live_right";

/// Counter family of users per live accuracy bucket of the model they run.
pub const USERS_LIVE_ACCURACY: &str = "users_live_accuracy";
/// Counter (index 0): the sum of those live accuracies, in millionths.
pub const USERS_LIVE_ACCURACY_SUM: &str = "users_live_accuracy_sum_micros";
/// Counter (index 0): users whose live accuracy fell after their last publish.
pub const USERS_LIVE_FELL: &str = "users_live_fell";
/// Windows a model must have classified for its live accuracy to count.
pub const MIN_LIVE_WINDOWS: u64 = 20;

/// Upper bounds of the held-out accuracy buckets.
pub const ACCURACY_BUCKETS: [f64; 11] =
    [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0];

/// The bucket index of an accuracy: the first bound it does not exceed, else
/// `ACCURACY_BUCKETS.len()` (also for NaN). Compared in `f32`, the accuracies'
/// precision, so that 0.99 falls in the 0.99 bucket.
pub fn accuracy_bucket(accuracy: f32) -> u32 {
    ACCURACY_BUCKETS
        .iter()
        .position(|b| accuracy <= *b as f32)
        .unwrap_or(ACCURACY_BUCKETS.len()) as u32
}

/// An accuracy in millionths, for [`HEAD_ACCURACY_SUM`] (NaN counts as 0).
pub fn micros(accuracy: f32) -> i64 {
    if accuracy.is_finite() {
        (accuracy as f64 * 1e6).round() as i64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_prometheus_le_semantics() {
        assert_eq!(accuracy_bucket(0.0), 0);
        assert_eq!(accuracy_bucket(0.5), 0);
        assert_eq!(accuracy_bucket(0.51), 1);
        assert_eq!(accuracy_bucket(0.95), 7);
        assert_eq!(accuracy_bucket(0.99), 9);
        assert_eq!(accuracy_bucket(0.951), 8);
        assert_eq!(accuracy_bucket(1.0), 10);
        assert_eq!(accuracy_bucket(f32::NAN), 11);
        assert_eq!(micros(0.875), 875_000);
        assert_eq!(micros(f32::NAN), 0);
    }
}
