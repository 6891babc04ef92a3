//! Stored records shared by the stages: a batch's record and status, staged samples
//! and their chunk encoding, the held-out assignment.
//!
//! Every stored value begins with a schema version; decoding checks it and never
//! panics on any bytes.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::spec::ClassId;
use crate::stroke::{WINDOW_FEATURES, WINDOW_FRAMES};

/// Values in one window of the synthetic pose spec (frames × features); other specs
/// have their own (`ModelSpec::window_values`).
pub const WINDOW_VALUES: usize = WINDOW_FRAMES * WINDOW_FEATURES;
/// Most samples in one stored chunk (see [`samples_per_chunk`]).
pub const SAMPLES_PER_CHUNK: usize = 40;
/// Bytes of sample data a chunk is sized for: with the header and ids it stays under
/// the store's 100 kB value limit.
const CHUNK_BUDGET: usize = 88_000;

/// Samples per stored chunk for windows of `window_values` values: as many as fit
/// [`CHUNK_BUDGET`] with the longest ids, at most [`SAMPLES_PER_CHUNK`] (40 for the
/// pose spec's 512 values, as before specs existed).
pub fn samples_per_chunk(window_values: usize) -> usize {
    let per_sample = window_values * 4 + crate::batch::MAX_SAMPLE_ID_LEN + 2 + 1 + 1 + 1 + 8;
    (CHUNK_BUDGET / per_sample).clamp(1, SAMPLES_PER_CHUNK)
}
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
    /// Out of the user's retained history (`policy::RetentionPolicy`): its samples are
    /// erased and nothing reads it again. `reason` says why and what it was before.
    Retired { reason: String },
}

impl BatchStatus {
    /// Whether the pipeline is done with the batch: no run will take it again (a
    /// published or rejected batch may still be retired later, by retention, and a
    /// published one rejected when its version is rolled back).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            BatchStatus::Published { .. }
                | BatchStatus::Rejected { .. }
                | BatchStatus::Retired { .. }
        )
    }

    /// The status's name as the API shows it (`staged`, `deferred`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            BatchStatus::Staged => "staged",
            BatchStatus::Deferred { .. } => "deferred",
            BatchStatus::Validating { .. } => "validating",
            BatchStatus::Published { .. } => "published",
            BatchStatus::Rejected { .. } => "rejected",
            BatchStatus::Retired { .. } => "retired",
        }
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
    /// Samples per chunk, the training samples stored first and the held-out ones
    /// after them, so that a reader of one split reads only its own chunks
    /// (`swimlane_state::Repo::samples_of`). 0: a record written before that layout,
    /// whose chunks mix the splits in upload order.
    #[serde(default)]
    pub chunk_samples: u32,
}

impl BatchRecord {
    /// Samples not held out.
    pub fn training(&self) -> u32 {
        self.samples.saturating_sub(self.heldout)
    }
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
    /// `ModelSpec::window_values` finite values, frame by frame.
    pub frames: Vec<f32>,
    /// The true class (as the user gave or confirmed it).
    pub label: ClassId,
    /// In the user's held-out split: used for validation, never for training.
    pub heldout: bool,
    /// What the device showed for this window (upload format 2), if it said.
    pub feedback: Option<Feedback>,
}

/// Live evidence about one model version: windows the device classified with it (in
/// uploads of format 2) and those the user confirmed, i.e. it got right.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveCount {
    pub windows: u64,
    pub right: u64,
}

impl LiveCount {
    /// `right / windows`, or `None` with no window.
    pub fn accuracy(&self) -> Option<f64> {
        (self.windows > 0).then(|| self.right as f64 / self.windows as f64)
    }
}

/// The live counts an upload's samples carry, per model version (0: the base model):
/// a window the user confirmed is one its version got right, a corrected one it got
/// wrong. Samples without feedback (format 1) count nowhere.
pub fn live_counts(samples: &[StagedSample]) -> std::collections::BTreeMap<u64, LiveCount> {
    let mut out = std::collections::BTreeMap::<u64, LiveCount>::new();
    for f in samples.iter().filter_map(|s| s.feedback) {
        let c = out.entry(f.model_version.unwrap_or(0)).or_default();
        c.windows += 1;
        c.right += u64::from(!f.corrected);
    }
    out
}

/// What the device's model predicted for a window, and whether the user corrected it
/// (upload format 2, docs/batch-format.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    /// `true`: the user changed the prediction to `label`; `false`: the user saw the
    /// prediction and left it (so `predicted == label`).
    pub corrected: bool,
    /// The class the device predicted.
    pub predicted: ClassId,
    /// The published version that predicted it (`None`: the base model).
    pub model_version: Option<u64>,
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

const CHUNK_VERSION_1: u8 = 1;
const CHUNK_VERSION: u8 = 2;
const FLAG_HELDOUT: u8 = 1;
const FLAG_FEEDBACK: u8 = 2;
const FLAG_CORRECTED: u8 = 4;
const FLAG_BASE_MODEL: u8 = 8;

/// Encode up to [`samples_per_chunk`] samples, all with windows of one length, as one
/// stored value (version 2):
/// `[version u8 = 2][count u16 LE][window values u16 LE]` then per sample
/// `[id_len u16 LE][id][label u8][flags u8]` (bit 0 held out, bit 1 feedback present,
/// bit 2 corrected, bit 3 predicted by the base model), with feedback
/// `[predicted u8][model_version u64 LE]`, then `[values × f32 LE]`.
/// Version 1 chunks (512 values, `[label][heldout]`, no feedback) still decode.
pub fn encode_chunk<S: std::borrow::Borrow<StagedSample>>(samples: &[S]) -> Vec<u8> {
    let values = samples
        .first()
        .map(|s| s.borrow().frames.len())
        .unwrap_or(0);
    assert!(
        samples.len() <= samples_per_chunk(values.max(1)),
        "chunk holds at most {} samples",
        samples_per_chunk(values.max(1))
    );
    let mut out = Vec::with_capacity(5 + samples.len() * (14 + values * 4 + 32));
    out.push(CHUNK_VERSION);
    out.extend_from_slice(&(samples.len() as u16).to_le_bytes());
    out.extend_from_slice(&(values as u16).to_le_bytes());
    for s in samples {
        let s = s.borrow();
        assert_eq!(s.frames.len(), values, "staged samples are validated");
        out.extend_from_slice(&(s.id.len() as u16).to_le_bytes());
        out.extend_from_slice(s.id.as_bytes());
        out.push(s.label.0);
        let mut flags = if s.heldout { FLAG_HELDOUT } else { 0 };
        if let Some(f) = &s.feedback {
            flags |= FLAG_FEEDBACK;
            if f.corrected {
                flags |= FLAG_CORRECTED;
            }
            if f.model_version.is_none() {
                flags |= FLAG_BASE_MODEL;
            }
        }
        out.push(flags);
        if let Some(f) = &s.feedback {
            out.push(f.predicted.0);
            out.extend_from_slice(&f.model_version.unwrap_or(0).to_le_bytes());
        }
        out.extend_from_slice(&crate::batch::le_bytes(&s.frames));
    }
    out
}

/// Decode a chunk made by [`encode_chunk`] (or a version 1 chunk); any other bytes give
/// an error, never a panic.
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
    if v != CHUNK_VERSION && v != CHUNK_VERSION_1 {
        return Err(RecordError::Version(v as u32));
    }
    let count = u16::from_le_bytes(take(2)?.try_into().unwrap()) as usize;
    let values = if v == CHUNK_VERSION_1 {
        WINDOW_VALUES
    } else {
        u16::from_le_bytes(take(2)?.try_into().unwrap()) as usize
    };
    if values > crate::spec::MAX_WINDOW_VALUES || (values == 0 && count > 0) {
        return Err(bad("window length out of range"));
    }
    if count > samples_per_chunk(values.max(1)) {
        return Err(bad("chunk sample count over the limit"));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let id_len = u16::from_le_bytes(take(2)?.try_into().unwrap()) as usize;
        let id = std::str::from_utf8(take(id_len)?)
            .map_err(|_| bad("sample id not UTF-8"))?
            .to_string();
        let label = ClassId(take(1)?[0]);
        if label.index() >= crate::spec::MAX_CLASSES {
            return Err(bad("label index"));
        }
        let flags = take(1)?[0];
        let (heldout, feedback) = if v == CHUNK_VERSION_1 {
            match flags {
                0 => (false, None),
                1 => (true, None),
                _ => return Err(bad("heldout flag")),
            }
        } else {
            if flags & !(FLAG_HELDOUT | FLAG_FEEDBACK | FLAG_CORRECTED | FLAG_BASE_MODEL) != 0
                || (flags & FLAG_FEEDBACK == 0 && flags & (FLAG_CORRECTED | FLAG_BASE_MODEL) != 0)
            {
                return Err(bad("sample flags"));
            }
            let feedback = if flags & FLAG_FEEDBACK != 0 {
                let predicted = ClassId(take(1)?[0]);
                let version = u64::from_le_bytes(take(8)?.try_into().unwrap());
                let base = flags & FLAG_BASE_MODEL != 0;
                if predicted.index() >= crate::spec::MAX_CLASSES || (base && version != 0) {
                    return Err(bad("feedback"));
                }
                Some(Feedback {
                    corrected: flags & FLAG_CORRECTED != 0,
                    predicted,
                    model_version: (!base).then_some(version),
                })
            } else {
                None
            };
            (flags & FLAG_HELDOUT != 0, feedback)
        };
        let raw = take(values * 4)?;
        let frames = crate::batch::f32s_from_le(raw);
        if frames.iter().any(|f| !f.is_finite()) {
            return Err(bad("non-finite value"));
        }
        out.push(StagedSample {
            id,
            frames,
            label,
            heldout,
            feedback,
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
    #[test]
    fn live_counts_are_per_version_and_only_from_feedback() {
        let s = |corrected: bool, model_version: Option<u64>, with: bool| StagedSample {
            id: "x".into(),
            frames: vec![0.0],
            label: ClassId(0),
            heldout: false,
            feedback: with.then_some(Feedback {
                corrected,
                predicted: ClassId(if corrected { 1 } else { 0 }),
                model_version,
            }),
        };
        let counts = live_counts(&[
            s(false, None, true),
            s(true, None, true),
            s(false, Some(2), true),
            s(true, Some(2), false),
        ]);
        let got: Vec<_> = counts
            .iter()
            .map(|(v, c)| (*v, c.windows, c.right))
            .collect();
        assert_eq!(got, vec![(0, 2, 1), (2, 1, 1)]);
        assert_eq!(counts[&0].accuracy(), Some(0.5));
        assert_eq!(LiveCount::default().accuracy(), None);
    }

    fn sample(i: usize) -> StagedSample {
        StagedSample {
            id: format!("s{i}"),
            frames: (0..WINDOW_VALUES).map(|j| (i * j) as f32 * 0.01).collect(),
            label: ClassId((i % 6) as u8),
            heldout: i % 3 == 0,
            feedback: (i % 4 != 0).then_some(Feedback {
                corrected: i % 2 == 0,
                predicted: ClassId((i % 5) as u8),
                model_version: (i % 3 != 0).then_some(i as u64),
            }),
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
    fn chunks_of_other_window_lengths_fit_and_version_1_still_decodes() {
        for values in [288, 512, 1024, 4096] {
            let n = samples_per_chunk(values);
            let big: Vec<_> = (0..n)
                .map(|i| StagedSample {
                    id: "x".repeat(128),
                    frames: vec![i as f32; values],
                    ..sample(i)
                })
                .collect();
            let bytes = encode_chunk(&big);
            assert!(bytes.len() < 100_000, "{values}: {}", bytes.len());
            assert_eq!(decode_chunk(&bytes).unwrap(), big);
        }
        assert_eq!(samples_per_chunk(WINDOW_VALUES), SAMPLES_PER_CHUNK);
        // A version 1 chunk as written before specs existed.
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&2u16.to_le_bytes());
        v1.extend_from_slice(b"s0");
        v1.extend_from_slice(&[3, 1]);
        for _ in 0..WINDOW_VALUES {
            v1.extend_from_slice(&0.5f32.to_le_bytes());
        }
        let got = decode_chunk(&v1).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].label, got[0].heldout, got[0].feedback),
            (ClassId(3), true, None)
        );
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
            chunk_samples: 0,
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

/// The validator's decision on a run's candidate. (`Default`: a rejection with no
/// reason and no scores, a base for tests to fill in.)
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
    /// The validator process's CPU seconds over the same scoring (every thread;
    /// `swimlane_runtime::process_cpu_seconds`); 0 in records made before it was kept.
    #[serde(default)]
    pub validate_cpu_seconds: f32,
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
    /// The trainer process's CPU seconds over the same training (every thread;
    /// `swimlane_runtime::process_cpu_seconds`); 0 in records made before it was kept.
    #[serde(default)]
    pub train_cpu_seconds: f32,
    pub verdict: Option<Verdict>,
    pub published_version: Option<u64>,
    /// Which windows the candidate knows (`crate::familiar`), from the windows it
    /// trained on: the device's ONNX file answers the others with the base model.
    /// `None` in records made before it was kept (their files have no fallback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub familiarity: Option<crate::familiar::Familiarity>,
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
    /// Where the version stands since it was published: on probation, promoted,
    /// rolled back or superseded (a record written before probation existed reads as
    /// on probation).
    #[serde(default)]
    pub standing: Standing,
    /// The paired comparison with its parent on windows neither trained on, gathered
    /// while on probation.
    #[serde(default)]
    pub probation: PairedEvidence,
}

/// Where a published version stands (`ModelVersionRecord::standing`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Standing {
    /// Published and being compared with its parent on the user's next uploads.
    #[default]
    Probation,
    /// Probation ended well: significantly better than its parent, or enough fresh
    /// windows without significant harm.
    Promoted { reason: String, at_ms: u64 },
    /// The head went back from it (`to`: the version it went back to, `None` the
    /// base model). `by`: `"validator"` (probation) or `"operator"`.
    RolledBack {
        reason: String,
        at_ms: u64,
        by: String,
        to: Option<u64>,
    },
    /// A newer version replaced it while it was still on probation.
    Superseded { by_version: u64, at_ms: u64 },
}

impl Standing {
    /// The standing's name as the API shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Standing::Probation => "probation",
            Standing::Promoted { .. } => "promoted",
            Standing::RolledBack { .. } => "rolled_back",
            Standing::Superseded { .. } => "superseded",
        }
    }
}

/// A paired comparison of a version (`head`) with its parent on the same windows,
/// which neither trained on: the sufficient statistics of the gate's tests
/// (`policy::ValidationPolicy::decide`), so that evidence from several uploads adds up.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairedEvidence {
    pub windows: u32,
    pub head_right: u32,
    pub parent_right: u32,
    /// Windows the head gets right and the parent wrong.
    pub head_only: u32,
    /// Windows the parent gets right and the head wrong.
    pub parent_only: u32,
    /// Sum and sum of squares over the windows of `ln p_head(true) − ln p_parent(true)`.
    pub gain_sum: f64,
    pub gain_sumsq: f64,
    /// The batches whose windows are counted (each batch counts once).
    pub batches: Vec<String>,
}

impl PairedEvidence {
    /// Count one window: whether the head and the parent got it right, and
    /// `ln p_head(true) − ln p_parent(true)`.
    pub fn add(&mut self, head_right: bool, parent_right: bool, gain: f64) {
        self.windows += 1;
        self.head_right += u32::from(head_right);
        self.parent_right += u32::from(parent_right);
        self.head_only += u32::from(head_right && !parent_right);
        self.parent_only += u32::from(parent_right && !head_right);
        self.gain_sum += gain;
        self.gain_sumsq += gain * gain;
    }

    /// Add `other` (windows of other batches).
    pub fn merge(&mut self, other: &PairedEvidence) {
        self.windows += other.windows;
        self.head_right += other.head_right;
        self.parent_right += other.parent_right;
        self.head_only += other.head_only;
        self.parent_only += other.parent_only;
        self.gain_sum += other.gain_sum;
        self.gain_sumsq += other.gain_sumsq;
        self.batches.extend(other.batches.iter().cloned());
    }

    /// The gate's measurements with `candidate` = the head (`head_first`) or the
    /// parent, `current` = the other, on these windows only (no history, no guard set:
    /// both models passed the gate's guard when they were published).
    pub fn scores(&self, head_first: bool) -> crate::policy::Scores {
        let n = self.windows as f64;
        let mean = if n > 0.0 { self.gain_sum / n } else { 0.0 };
        let sd = if n > 1.0 {
            ((self.gain_sumsq - n * mean * mean).max(0.0) / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        let frac = |k: u32| if n > 0.0 { (k as f64 / n) as f32 } else { 0.0 };
        let (c, u, imp, reg, sign) = if head_first {
            (
                self.head_right,
                self.parent_right,
                self.head_only,
                self.parent_only,
                1.0,
            )
        } else {
            (
                self.parent_right,
                self.head_right,
                self.parent_only,
                self.head_only,
                -1.0,
            )
        };
        crate::policy::Scores {
            candidate_heldout: frac(c),
            current_heldout: frac(u),
            heldout_samples: self.windows,
            improved: imp,
            regressed: reg,
            loglik_gain_mean: (sign * mean) as f32,
            loglik_gain_sd: sd as f32,
            ..Default::default()
        }
    }
}

/// A file stored as a blob: its blob id, SHA-256 (hex) and size. With `prefix_blob`
/// the file is that blob's bytes followed by its own part (a prefix shared by many
/// files that holds no user's data: the base model's part of a device's ONNX file,
/// `swimlane_model::onnx::DeviceFile`). Its own part is `blob`'s bytes with each of
/// `splices` inserted: bytes another blob already holds (a device file's weights are
/// the version's safetensors file's, byte for byte), kept once. `sha256` and
/// `size_bytes` are the whole file's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub blob: String,
    pub sha256: String,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_blob: Option<String>,
    /// In increasing `at`, none overlapping (`swimlane_state::Repo::stored_file` checks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub splices: Vec<Splice>,
}

/// Bytes `offset .. offset + len` of blob `blob`, which are the bytes at `at .. at + len`
/// of a [`StoredFile`]'s own part (counted in the whole part, after the prefix; the
/// stored `blob` holds the part without them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Splice {
    pub at: u64,
    pub blob: String,
    pub offset: u64,
    pub len: u64,
}

/// `("forgotten", pseudonym)`: a user's erasure (`swimlane_state::forget`). While it
/// runs, `user` names the user (so a restart can resume it) and uploads are refused;
/// once done, `user` is `None`, the record names no one, and it is the receipt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErasureRecord {
    pub v: u32,
    /// `erasing` or `forgotten`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Who asked: `user` (their own token), `admin` (the API) or `operator` (the CLI).
    pub requested_by: String,
    pub started_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    pub erased: ErasureCounts,
    /// Whether the store's files were purged of the deleted data afterwards
    /// (`swimlane_store::Purged`).
    #[serde(default)]
    pub files_purged: bool,
}

/// What an erasure removed, counted in the transactions that removed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureCounts {
    pub batches: u64,
    pub samples: u64,
    pub runs: u64,
    pub versions: u64,
    /// Blobs (candidate weights, ONNX files), each with all its chunks.
    pub blobs: u64,
    pub tokens: u64,
    /// Events naming the user in the embedded log (dead letters included) and the
    /// outbox.
    pub events: u64,
    /// Pending-index entries.
    pub index_entries: u64,
    /// The user's remaining keys (state, head, live and upload counters).
    pub other_keys: u64,
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
