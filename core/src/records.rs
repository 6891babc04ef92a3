//! Stored records shared by the stages: a batch's record and status, staged samples
//! and their chunk encoding, the held-out assignment.
//!
//! Every stored value begins with a schema version; decoding checks it and never
//! panics on any bytes.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::stroke::{StrokeClass, WINDOW_FEATURES, WINDOW_FRAMES};

/// Values in one window (frames × features).
pub const WINDOW_VALUES: usize = WINDOW_FRAMES * WINDOW_FEATURES;
/// Samples per stored chunk: 40 × (512 × 4 bytes + id) stays well under the store's
/// 100 kB value limit (ids are at most 128 bytes).
pub const SAMPLES_PER_CHUNK: usize = 40;
/// Share of samples assigned to a user's held-out split, in percent.
pub const HELDOUT_PERCENT: u64 = 20;

/// Where a batch is in the pipeline. Terminal states: `Published`, `Rejected`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BatchStatus {
    /// Validated and durably staged; waiting for a trainer.
    Staged,
    /// Its last run had too little held-out evidence to judge (`reason`); it waits, and
    /// is trained again together with the user's next batch.
    Deferred { reason: String },
    /// Included in training run `run_id`; its candidate waits for the validator.
    Validating { run_id: String },
    /// The run's candidate was accepted and published as `version`.
    Published { run_id: String, version: u64 },
    /// The run's candidate was rejected (or the batch can never be trained).
    Rejected {
        run_id: Option<String>,
        reason: String,
    },
}

impl BatchStatus {
    /// Whether the batch will never change state again.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            BatchStatus::Published { .. } | BatchStatus::Rejected { .. }
        )
    }

    /// Waiting to be trained (staged, or deferred for more evidence).
    pub fn is_pending(&self) -> bool {
        matches!(self, BatchStatus::Staged | BatchStatus::Deferred { .. })
    }
}

/// The stored record of one accepted upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// Schema version of this record (currently 1).
    pub v: u32,
    /// SHA-256 (hex) of the upload's canonical content: a retry with the same id and
    /// the same content is answered from this record; a different content is a
    /// conflict.
    pub digest: String,
    pub samples: u32,
    pub heldout: u32,
    pub chunks: u32,
    /// Milliseconds since the Unix epoch when ingest staged it.
    pub staged_at_ms: u64,
    pub status: BatchStatus,
}

/// Why stored bytes did not decode.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecordError {
    #[error("unsupported schema version {0}")]
    Version(u32),
    #[error("malformed record: {0}")]
    Malformed(String),
}

/// Encode a JSON record (all JSON records carry a `v` field).
pub fn encode_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialize")
}

/// Decode a JSON record; never panics.
pub fn decode_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, RecordError> {
    serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))
}

impl BatchRecord {
    pub fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let r: BatchRecord = decode_json(bytes)?;
        if r.v != 1 {
            return Err(RecordError::Version(r.v));
        }
        Ok(r)
    }
}

/// One validated sample as staged: the window, the corrected label, and its split.
#[derive(Clone, Debug, PartialEq)]
pub struct StagedSample {
    pub id: String,
    /// `WINDOW_VALUES` finite values, frame by frame.
    pub frames: Vec<f32>,
    pub label: StrokeClass,
    /// In the user's held-out split: used for validation, never for training.
    pub heldout: bool,
}

/// Whether a sample belongs to the held-out split. Deterministic in (user, batch,
/// sample id), so a retried upload or a re-run stage assigns the same split.
pub fn is_heldout(user: &str, batch: &str, sample_id: &str) -> bool {
    let mut h = Sha256::new();
    for part in [user, batch, sample_id] {
        h.update((part.len() as u32).to_le_bytes());
        h.update(part.as_bytes());
    }
    let d = h.finalize();
    let n = u64::from_le_bytes(d[..8].try_into().unwrap());
    n % 100 < HELDOUT_PERCENT
}

const CHUNK_VERSION: u8 = 1;

/// Encode up to [`SAMPLES_PER_CHUNK`] samples as one stored value:
/// `[version u8][count u16 LE]` then per sample
/// `[id_len u16 LE][id][label u8][heldout u8][WINDOW_VALUES × f32 LE]`.
pub fn encode_chunk(samples: &[StagedSample]) -> Vec<u8> {
    assert!(
        samples.len() <= SAMPLES_PER_CHUNK,
        "chunk holds at most {SAMPLES_PER_CHUNK}"
    );
    let mut out = Vec::with_capacity(3 + samples.len() * (4 + WINDOW_VALUES * 4 + 32));
    out.push(CHUNK_VERSION);
    out.extend_from_slice(&(samples.len() as u16).to_le_bytes());
    for s in samples {
        assert_eq!(
            s.frames.len(),
            WINDOW_VALUES,
            "staged samples are validated"
        );
        out.extend_from_slice(&(s.id.len() as u16).to_le_bytes());
        out.extend_from_slice(s.id.as_bytes());
        out.push(s.label.index() as u8);
        out.push(s.heldout as u8);
        for v in &s.frames {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Decode a chunk made by [`encode_chunk`]; any other bytes give an error.
pub fn decode_chunk(bytes: &[u8]) -> Result<Vec<StagedSample>, RecordError> {
    let bad = |m: &str| RecordError::Malformed(m.to_string());
    let mut r = bytes;
    let mut take = |n: usize| -> Result<&[u8], RecordError> {
        if r.len() < n {
            return Err(bad("chunk truncated"));
        }
        let (a, b) = r.split_at(n);
        r = b;
        Ok(a)
    };
    let v = take(1)?[0];
    if v != CHUNK_VERSION {
        return Err(RecordError::Version(v as u32));
    }
    let count = u16::from_le_bytes(take(2)?.try_into().unwrap()) as usize;
    if count > SAMPLES_PER_CHUNK {
        return Err(bad("chunk sample count over the limit"));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let id_len = u16::from_le_bytes(take(2)?.try_into().unwrap()) as usize;
        let id = std::str::from_utf8(take(id_len)?)
            .map_err(|_| bad("sample id not UTF-8"))?
            .to_string();
        let label =
            StrokeClass::from_index(take(1)?[0] as usize).ok_or_else(|| bad("label index"))?;
        let heldout = match take(1)?[0] {
            0 => false,
            1 => true,
            _ => return Err(bad("heldout flag")),
        };
        let raw = take(WINDOW_VALUES * 4)?;
        let frames: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if frames.iter().any(|f| !f.is_finite()) {
            return Err(bad("non-finite value"));
        }
        out.push(StagedSample {
            id,
            frames,
            label,
            heldout,
        });
    }
    if !r.is_empty() {
        return Err(bad("trailing bytes after chunk"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: usize) -> StagedSample {
        StagedSample {
            id: format!("s{i}"),
            frames: (0..WINDOW_VALUES).map(|j| (i * j) as f32 * 0.01).collect(),
            label: StrokeClass::from_index(i % 6).unwrap(),
            heldout: i % 3 == 0,
        }
    }

    #[test]
    fn chunk_round_trips_and_fits_the_value_limit() {
        let samples: Vec<_> = (0..SAMPLES_PER_CHUNK).map(sample).collect();
        let mut big = samples.clone();
        for s in &mut big {
            s.id = "x".repeat(128);
        }
        assert!(encode_chunk(&big).len() < 100_000);
        let bytes = encode_chunk(&samples);
        assert_eq!(decode_chunk(&bytes).unwrap(), samples);
        // Every truncation and a trailing byte are errors, not panics.
        for n in 0..bytes.len().min(3000) {
            assert!(decode_chunk(&bytes[..n]).is_err());
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode_chunk(&extra).is_err());
    }

    #[test]
    fn heldout_split_is_deterministic_and_near_twenty_percent() {
        let n = (0..10_000)
            .filter(|i| is_heldout("u", "b", &i.to_string()))
            .count();
        assert!((1_700..2_300).contains(&n), "{n}");
        assert_eq!(is_heldout("u", "b", "7"), is_heldout("u", "b", "7"));
    }

    #[test]
    fn batch_record_checks_version() {
        let r = BatchRecord {
            v: 1,
            digest: "d".into(),
            samples: 3,
            heldout: 1,
            chunks: 1,
            staged_at_ms: 5,
            status: BatchStatus::Staged,
        };
        assert_eq!(BatchRecord::decode(&r.encode()).unwrap(), r);
        let mut r2 = r.clone();
        r2.v = 9;
        assert_eq!(
            BatchRecord::decode(&r2.encode()),
            Err(RecordError::Version(9))
        );
        assert!(BatchRecord::decode(b"nope").is_err());
    }
}

/// The validator's decision on a run's candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub accepted: bool,
    /// Why it was accepted or rejected, for people.
    pub reason: String,
    /// Held-out accuracy of the candidate and of the model it would replace, on the
    /// same held-out windows.
    pub candidate_heldout_accuracy: f32,
    pub current_heldout_accuracy: f32,
    pub heldout_samples: u32,
    /// Accuracy on the population guard set, candidate and current.
    pub candidate_guard_accuracy: f32,
    pub current_guard_accuracy: f32,
    /// Seconds the validator spent loading and scoring the models (0 in records
    /// written before this field existed).
    #[serde(default)]
    pub validate_seconds: f32,
}

/// One training run: the batches it trained on, the candidate it made, its verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub v: u32,
    pub run_id: String,
    /// The published version it was fine-tuned from (`None`: the base model).
    pub parent_version: Option<u64>,
    /// The batches whose training samples it learned from for the first time.
    pub batches: Vec<String>,
    pub train_samples: u32,
    /// Blob id of the candidate's weights, their SHA-256 (hex) and size.
    pub model_blob: String,
    pub model_sha256: String,
    pub model_bytes: u64,
    pub created_at_ms: u64,
    pub train_seconds: f32,
    pub verdict: Option<Verdict>,
    pub published_version: Option<u64>,
}

/// One published model version of a user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelVersionRecord {
    pub v: u32,
    pub version: u64,
    pub run_id: String,
    pub parent_version: Option<u64>,
    pub batches: Vec<String>,
    pub model_blob: String,
    /// SHA-256 (hex) of the weights file, for the device to verify its download.
    pub sha256: String,
    pub size_bytes: u64,
    pub heldout_accuracy: f32,
    pub parent_heldout_accuracy: f32,
    pub guard_accuracy: f32,
    pub published_at_ms: u64,
    /// The same model as ONNX, made by the publisher when it published this version
    /// (`None` only for versions published before ONNX export existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnx: Option<StoredFile>,
}

/// A file stored as a blob: its blob id, SHA-256 (hex) and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub blob: String,
    pub sha256: String,
    pub size_bytes: u64,
}

/// A user's pipeline state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    pub v: u32,
    /// The run between training and verdict/publication, if any. At most one run of a
    /// user is in flight: the trainer leaves newer batches staged until it ends.
    pub inflight_run: Option<String>,
    /// The version devices get (`None`: the base model).
    pub head: Option<u64>,
    /// Highest version ever published (versions are never reused, even after a
    /// rollback).
    pub last_version: u64,
    /// Held-out accuracy of the head model when it was published.
    pub head_heldout_accuracy: Option<f32>,
    /// The head model reached the target accuracy: no retraining until new
    /// corrections arrive.
    pub converged: bool,
    /// The `stats::HEAD_ACCURACY` bucket this user is counted in (kept by
    /// `swimlane_state::Repo::put_user_state`; `None`: not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_accuracy_bucket: Option<u32>,
    /// Training runs of this user committed so far. Part of every run id, so that
    /// training the same batches again (after a deferral, or with a rejected run-mate
    /// taken out) is a new run, never the old one's id and records.
    #[serde(default)]
    pub runs_started: u64,
}
