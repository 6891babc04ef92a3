//! Turning a request body into a staged batch: decoding (gzip, bounded), validation,
//! and the one transaction that stages it.
//!
//! Invariant: a batch is staged by exactly one transaction that writes its sample
//! chunks, its record, its pending-index entry, the user's daily upload count, the
//! live counts its feedback carries, what retention retires and its `BatchStaged`
//! event together, so the store holds either
//! all of a batch or none of it, and the event exists iff the batch does. A batch id
//! that already has a record is never written again: the same content is answered
//! from the record, a different content is a conflict.
use std::io::Read;
use std::sync::Arc;

use axum::http::StatusCode;
use swimlane_bus::Emitter;
use swimlane_core::batch::{validate_upload, BatchLimits, ValidatedBatch};
use swimlane_core::keys::Keys;
use swimlane_core::policy::RetentionPolicy;
use swimlane_core::records::{
    encode_chunk, samples_per_chunk, BatchRecord, BatchStatus, StagedSample,
};
use swimlane_core::{Event, UserId};
use swimlane_state::lifecycle::Retention;
use swimlane_store::{Db, KvError};

use crate::error::ApiError;

/// How the body is encoded (`Content-Encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

/// 413 for a body over `max` bytes (raw or decompressed).
pub fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body is larger than {max} bytes (before or after decompression)"),
    )
}

/// Decompress (when gzip) without ever holding more than `max + 1` decompressed bytes,
/// then validate. CPU-bound: run it off the async workers.
pub fn decode_and_validate(
    user: &UserId,
    raw: &[u8],
    encoding: Encoding,
    max: u64,
    limits: BatchLimits,
    spec: &swimlane_core::ModelSpec,
) -> Result<ValidatedBatch, ApiError> {
    let plain;
    let body = match encoding {
        Encoding::Identity => raw,
        Encoding::Gzip => {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(raw)
                .take(max + 1)
                .read_to_end(&mut out)
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_gzip",
                        format!("body is not valid gzip: {e}"),
                    )
                })?;
            if out.len() as u64 > max {
                return Err(too_large(max));
            }
            plain = out;
            &plain
        }
    };
    Ok(validate_upload(user, body, limits, spec)?)
}

/// The per-user rules the staging transaction enforces.
#[derive(Clone, Debug, PartialEq)]
pub struct StagingRules {
    /// Applied to the user's batches with each new one (`RetentionPolicy`).
    pub retention: RetentionPolicy,
    /// Most uploads staged per user per UTC day (`ingest.max_uploads_per_day`); 0: no
    /// cap.
    pub max_uploads_per_day: u32,
    /// Accuracy at which a user counts as converged (`policy.target_accuracy`): a
    /// converged user's upload with no correction is staged deferred, not trained.
    pub target_accuracy: f32,
}

/// Milliseconds in a day: the daily cap counts UTC days.
pub const DAY_MS: u64 = 86_400_000;

/// What staging a validated batch came to.
#[derive(Clone, Debug, PartialEq)]
pub enum StageOutcome {
    /// Newly staged by this request; what retention did in the same transaction.
    Staged(BatchRecord, Retention),
    /// The user has staged `max_uploads_per_day` uploads today (UTC): nothing was
    /// written. `retry_after_s` is the time to midnight UTC.
    DailyCap { cap: u32, retry_after_s: u64 },
    /// Already staged with the same content: nothing was written.
    Duplicate(BatchRecord),
    /// The batch id is taken by a different content: nothing was written.
    Conflict(BatchRecord),
    /// The user is being erased or was (`swimlane_state::forget`): nothing was written.
    Forgotten,
}

/// Stage `batch` for `user` in one transaction (see the module invariant), counting
/// it against the user's daily cap and applying retention to the user's older batches
/// in the same transaction. Blocking.
pub fn stage_batch(
    db: &Db,
    keys: &Keys,
    emitter: &Arc<dyn Emitter>,
    user: &UserId,
    batch: &ValidatedBatch,
    now_ms: u64,
    rules: &StagingRules,
) -> Result<StageOutcome, KvError> {
    let (u, b) = (user.as_str(), batch.batch_id.as_str());
    let record_key = keys.batch(u, b);
    let repo = swimlane_state::Repo::new(keys.clone());
    // Encode outside the closure: it may run more than once. The training samples are
    // stored first and the held-out ones after them (`BatchRecord::chunk_samples`), so
    // that the trainer and the validator each read only their split's chunks.
    let per_chunk = samples_per_chunk(batch.window_values());
    let ordered: Vec<&StagedSample> = batch
        .samples
        .iter()
        .filter(|s| !s.heldout)
        .chain(batch.samples.iter().filter(|s| s.heldout))
        .collect();
    let chunks: Vec<(Vec<u8>, Vec<u8>)> = ordered
        .chunks(per_chunk)
        .enumerate()
        .map(|(i, c)| (keys.sample_chunk(u, b, i as u32), encode_chunk(c)))
        .collect();
    let record = BatchRecord {
        v: 1,
        digest: batch.digest.clone(),
        samples: batch.samples.len() as u32,
        heldout: batch.heldout() as u32,
        chunks: chunks.len() as u32,
        staged_at_ms: now_ms,
        status: BatchStatus::Staged,
        chunk_samples: per_chunk as u32,
    };
    let live = swimlane_core::records::live_counts(&batch.samples);
    // Every window reported and confirmed (format 2): no new correction in it.
    let no_correction = batch
        .samples
        .iter()
        .all(|s| s.feedback.is_some_and(|f| !f.corrected));
    let day = now_ms / DAY_MS;
    let uploads_key = keys.uploads_on(u, day);
    let event = Event::BatchStaged {
        user: user.clone(),
        batch_id: batch.batch_id.clone(),
        samples: record.samples,
    };
    db.transact(|tx| {
        if swimlane_state::forget::is_forgotten(&repo, tx, u)? {
            return Ok(StageOutcome::Forgotten);
        }
        if let Some(bytes) = tx.get(&record_key)? {
            let existing = BatchRecord::decode(&bytes).map_err(|e| KvError::Corrupt {
                what: format!("batch record {u}/{b}"),
                reason: e.to_string(),
            })?;
            return Ok(
                if swimlane_core::batch::same_content(&existing.digest, batch) {
                    StageOutcome::Duplicate(existing)
                } else {
                    StageOutcome::Conflict(existing)
                },
            );
        }
        if rules.max_uploads_per_day > 0 {
            let today = tx.get_counter(&uploads_key)?;
            if today >= rules.max_uploads_per_day as i64 {
                return Ok(StageOutcome::DailyCap {
                    cap: rules.max_uploads_per_day,
                    retry_after_s: ((day + 1) * DAY_MS - now_ms).div_ceil(1000),
                });
            }
            // Only today's count is kept: earlier days' are cleared as the day turns.
            tx.clear_range(&keys.uploads(u), &uploads_key)?;
            tx.atomic_add(&uploads_key, 1)?;
        }
        for (k, v) in &chunks {
            tx.set(k, v)?;
        }
        repo.add_live(tx, u, &live)?;
        let mut record = record.clone();
        if no_correction {
            if let Some(reason) = converged(&repo, tx, u, rules.target_accuracy)? {
                record.status = BatchStatus::Deferred { reason };
            }
        }
        swimlane_state::lifecycle::stage_batch(&repo, tx, u, b, &record)?;
        let retention = swimlane_state::lifecycle::apply_retention(&repo, tx, u, &rules.retention)?;
        emitter.emit(tx, &event)?;
        Ok(StageOutcome::Staged(record.clone(), retention))
    })
}

/// Convergence, measured the way the phone sees it too: `Some(reason)` when `user`'s
/// head reached `target` on held-out windows (the publisher's `converged`) and the
/// model the device runs is not below it live either (its live accuracy, once it
/// classified `stats::MIN_LIVE_WINDOWS` windows, this upload's included). Such a
/// user's upload with no correction waits, deferred, and is trained with their next
/// correction: no retraining until new corrections arrive.
fn converged(
    repo: &swimlane_state::Repo,
    tx: &mut swimlane_store::Transaction<'_>,
    user: &str,
    target: f32,
) -> Result<Option<String>, KvError> {
    let state = repo.user_state(tx, user)?;
    let (true, Some(heldout)) = (state.converged, state.head_heldout_accuracy) else {
        return Ok(None);
    };
    let live = repo.live(tx, user)?;
    let c = live
        .get(&state.head.unwrap_or(0))
        .copied()
        .unwrap_or_default();
    let live_text = match c.accuracy() {
        Some(a) if c.windows >= swimlane_core::stats::MIN_LIVE_WINDOWS => {
            if a < f64::from(target) {
                return Ok(None);
            }
            format!("live {a:.3} on {} windows", c.windows)
        }
        _ => format!("live: {} windows so far", c.windows),
    };
    Ok(Some(format!(
        "converged (held-out {heldout:.3}, {live_text}; target {target:.3}) and every window of this upload was confirmed: not retrained until a correction arrives, then trained with it"
    )))
}

/// The batch's record, if staged. Blocking.
pub fn batch_record(
    db: &Db,
    keys: &Keys,
    user: &UserId,
    batch_id: &str,
) -> Result<Option<BatchRecord>, KvError> {
    let key = keys.batch(user.as_str(), batch_id);
    let bytes = db.transact(|tx| tx.get(&key))?;
    bytes
        .map(|b| {
            BatchRecord::decode(&b).map_err(|e| KvError::Corrupt {
                what: format!("batch record {user}/{batch_id}"),
                reason: e.to_string(),
            })
        })
        .transpose()
}
