//! Turning a request body into a staged batch: decoding (gzip, bounded), validation,
//! and the one transaction that stages it.
//!
//! Invariant: a batch is staged by exactly one transaction that writes its sample
//! chunks, its record, its pending-index entry and its `BatchStaged` event together, so the store holds either
//! all of a batch or none of it, and the event exists iff the batch does. A batch id
//! that already has a record is never written again: the same content is answered
//! from the record, a different content is a conflict.
use std::io::Read;
use std::sync::Arc;

use axum::http::StatusCode;
use swimlane_bus::Emitter;
use swimlane_core::batch::{validate_upload, BatchLimits, ValidatedBatch};
use swimlane_core::keys::Keys;
use swimlane_core::records::{encode_chunk, samples_per_chunk, BatchRecord, BatchStatus};
use swimlane_core::{Event, UserId};
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

/// What staging a validated batch came to.
#[derive(Clone, Debug, PartialEq)]
pub enum StageOutcome {
    /// Newly staged by this request.
    Staged(BatchRecord),
    /// Already staged with the same content: nothing was written.
    Duplicate(BatchRecord),
    /// The batch id is taken by a different content: nothing was written.
    Conflict(BatchRecord),
}

/// Stage `batch` for `user` in one transaction (see the module invariant). Blocking.
pub fn stage_batch(
    db: &Db,
    keys: &Keys,
    emitter: &Arc<dyn Emitter>,
    user: &UserId,
    batch: &ValidatedBatch,
    now_ms: u64,
) -> Result<StageOutcome, KvError> {
    let (u, b) = (user.as_str(), batch.batch_id.as_str());
    let record_key = keys.batch(u, b);
    let repo = swimlane_state::Repo::new(keys.clone());
    // Encode outside the closure: it may run more than once.
    let chunks: Vec<(Vec<u8>, Vec<u8>)> = batch
        .samples
        .chunks(samples_per_chunk(batch.window_values()))
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
    };
    let event = Event::BatchStaged {
        user: user.clone(),
        batch_id: batch.batch_id.clone(),
        samples: record.samples,
    };
    db.transact(|tx| {
        if let Some(bytes) = tx.get(&record_key)? {
            let existing = BatchRecord::decode(&bytes).map_err(|e| KvError::Corrupt {
                what: format!("batch record {u}/{b}"),
                reason: e.to_string(),
            })?;
            return Ok(if existing.digest == record.digest {
                StageOutcome::Duplicate(existing)
            } else {
                StageOutcome::Conflict(existing)
            });
        }
        for (k, v) in &chunks {
            tx.set(k, v)?;
        }
        swimlane_state::lifecycle::stage_batch(&repo, tx, u, b, &record)?;
        emitter.emit(tx, &event)?;
        Ok(StageOutcome::Staged(record.clone()))
    })
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
