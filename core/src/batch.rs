//! The upload schema of one correction batch and its validation. Pure: bytes in, a
//! [`ValidatedBatch`] or a [`BatchError`] out.
//!
//! The body a device sends (`POST /v1/users/{user}/batches`), documented in
//! `docs/batch-format.md`:
//!
//! ```json
//! {"batch_id": "b-2026-11-24-001",
//!  "samples": [{"id": "s1", "frames": [[16 numbers], ... 32 frames], "label": "freestyle"}]}
//! ```
//!
//! A sample's window may instead be sent as `"frames_f32le": "<base64>"`: its
//! `frames × channels` values as little-endian IEEE-754 `f32`, frame by frame, in
//! standard base64 with padding (RFC 4648 §4); about half the bytes of the numbers and
//! a small fraction of the parsing. A sample carries exactly one of the two.
//!
//! Or the windows may follow the document, raw (a *binary upload*): the body is
//! [`BINARY_MAGIC`] (8 bytes), the document's length in bytes (`u32`, little-endian),
//! the document (samples without `frames` or `frames_f32le`), then every sample's
//! window in sample order, `frames × channels` little-endian `f32`s each, and nothing
//! after them. No decimal or base64 to parse: the windows are copied as they are.
//!
//! Format 2 (`"format": 2`) adds, per sample, what the device showed:
//! `"feedback": {"kind": "corrected" | "confirmed", "predicted": "backstroke",
//! "model_version": 3 | null}` (null: the base model). A document without `format` is
//! format 1 and may carry no feedback. The window shape and the class names are the
//! deployment's [`ModelSpec`].
//!
//! Invariants of a [`ValidatedBatch`]:
//! - the batch id is a valid [`BatchId`];
//! - there are 1 to `limits.max_samples` samples, with distinct, non-empty sample ids
//!   of at most [`MAX_SAMPLE_ID_LEN`] bytes;
//! - every sample has exactly `spec.frames` frames of `spec.channels.len()` finite
//!   `f32` values (numbers that overflow `f32` are rejected, not saturated);
//! - every label (and predicted class) is one of the spec's class names;
//! - a confirmed window's prediction is its label, a corrected one's is not;
//! - each sample's `heldout` flag is [`is_heldout`]`(user, batch, sample id)`;
//! - `digest` is the BLAKE3 of a canonical encoding of (batch id, samples in order:
//!   id, label, values as `f32` bits), so the same batch re-sent with different JSON
//!   formatting (whitespace, `1` vs `1.0`, key order) or window encoding (numbers,
//!   base64, binary) has the same digest. Records staged before it carry the SHA-256
//!   of the same encoding, still recognised ([`same_content`]).
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::ids::{BatchId, UserId};
use crate::records::{is_heldout, Feedback, StagedSample};
use crate::spec::ModelSpec;

/// Longest sample id, in bytes (the chunk layout sizes chunks for it).
pub const MAX_SAMPLE_ID_LEN: usize = 128;

/// Limits applied by [`validate_upload`] (body size limits belong to the HTTP edge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most samples one batch may hold.
    pub max_samples: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits { max_samples: 1000 }
    }
}

/// A batch that passed every check, ready to stage.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedBatch {
    pub batch_id: BatchId,
    pub samples: Vec<StagedSample>,
    /// [`DIGEST_BLAKE3`] and the BLAKE3 (lowercase hex) of the canonical encoding of
    /// the content ([`digest`]).
    pub digest: String,
}

impl ValidatedBatch {
    /// Values per window (every sample of a validated batch has the same).
    pub fn window_values(&self) -> usize {
        self.samples.first().map_or(1, |s| s.frames.len())
    }

    /// Samples assigned to the held-out split.
    pub fn heldout(&self) -> usize {
        self.samples.iter().filter(|s| s.heldout).count()
    }
}

/// Why an upload was refused. Every variant is the client's fault (HTTP 400).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    #[error("body is not a valid batch JSON document: {0}")]
    MalformedJson(String),
    #[error("batch_id is invalid: {0}")]
    BadBatchId(String),
    #[error("batch has no samples")]
    NoSamples,
    #[error("batch has {count} samples, at most {max} are allowed")]
    TooManySamples { count: usize, max: usize },
    #[error("sample {index} has an empty id")]
    EmptySampleId { index: usize },
    #[error("sample {index} has an id of {len} bytes, at most {max} are allowed")]
    SampleIdTooLong {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("sample {index} ({id:?}) repeats the id of sample {first}")]
    DuplicateSampleId {
        index: usize,
        id: String,
        first: usize,
    },
    #[error("sample {index} ({id:?}) has {found} frames, expected {expected}")]
    BadFrameCount {
        index: usize,
        id: String,
        found: usize,
        expected: usize,
    },
    #[error("sample {index} ({id:?}) frame {frame} has {found} features, expected {expected}")]
    BadFeatureCount {
        index: usize,
        id: String,
        frame: usize,
        found: usize,
        expected: usize,
    },
    #[error(
        "sample {index} ({id:?}) frame {frame} feature {feature} is not a finite 32-bit float"
    )]
    NonFinite {
        index: usize,
        id: String,
        frame: usize,
        feature: usize,
    },
    #[error("sample {index} ({id:?}) has unknown label {label:?}; expected one of {expected}")]
    UnknownLabel {
        index: usize,
        id: String,
        label: String,
        expected: String,
    },
    #[error("upload format {0} is not supported (formats 1 and 2 are)")]
    UnsupportedFormat(u32),
    #[error("sample {index} ({id:?}) feedback: {why}")]
    BadFeedback {
        index: usize,
        id: String,
        why: String,
    },
    #[error("sample {index} ({id:?}) frames: {why}")]
    BadFrames {
        index: usize,
        id: String,
        why: String,
    },
    #[error("binary upload: {0}")]
    BadBinary(String),
}

impl BatchError {
    /// Every code [`BatchError::code`] can return (a closed set, used as metric labels).
    pub const CODES: [&'static str; 15] = [
        "malformed_json",
        "bad_batch_id",
        "no_samples",
        "too_many_samples",
        "empty_sample_id",
        "sample_id_too_long",
        "duplicate_sample_id",
        "bad_frame_count",
        "bad_feature_count",
        "non_finite_value",
        "unknown_label",
        "unsupported_format",
        "bad_feedback",
        "bad_frames",
        "bad_binary",
    ];

    /// A stable machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            BatchError::MalformedJson(_) => "malformed_json",
            BatchError::BadBatchId(_) => "bad_batch_id",
            BatchError::NoSamples => "no_samples",
            BatchError::TooManySamples { .. } => "too_many_samples",
            BatchError::EmptySampleId { .. } => "empty_sample_id",
            BatchError::SampleIdTooLong { .. } => "sample_id_too_long",
            BatchError::DuplicateSampleId { .. } => "duplicate_sample_id",
            BatchError::BadFrameCount { .. } => "bad_frame_count",
            BatchError::BadFeatureCount { .. } => "bad_feature_count",
            BatchError::NonFinite { .. } => "non_finite_value",
            BatchError::UnknownLabel { .. } => "unknown_label",
            BatchError::UnsupportedFormat(_) => "unsupported_format",
            BatchError::BadFeedback { .. } => "bad_feedback",
            BatchError::BadFrames { .. } => "bad_frames",
            BatchError::BadBinary(_) => "bad_binary",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    #[serde(default)]
    format: Option<u32>,
    batch_id: String,
    samples: Vec<RawSample>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSample {
    id: String,
    #[serde(default)]
    frames: Option<Vec<Vec<f64>>>,
    /// The window as base64 of little-endian `f32`s, frame by frame.
    #[serde(default)]
    frames_f32le: Option<String>,
    label: String,
    #[serde(default)]
    feedback: Option<RawFeedback>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeedback {
    kind: String,
    predicted: String,
    model_version: Option<u64>,
}

/// Shorten a client-supplied id for an error message.
fn shown(id: &str) -> String {
    if id.len() <= 40 {
        return id.to_string();
    }
    let mut end = 40;
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &id[..end])
}

/// A window sent as numbers (`frames`: one array of channel values per frame).
fn numbers(
    index: usize,
    id: &str,
    frames: &[Vec<f64>],
    spec: &ModelSpec,
) -> Result<Vec<f32>, BatchError> {
    let (frames_expected, features_expected) = (spec.frames, spec.channels.len());
    if frames.len() != frames_expected {
        return Err(BatchError::BadFrameCount {
            index,
            id: shown(id),
            found: frames.len(),
            expected: frames_expected,
        });
    }
    let mut values = Vec::with_capacity(spec.window_values());
    for (frame, f) in frames.iter().enumerate() {
        if f.len() != features_expected {
            return Err(BatchError::BadFeatureCount {
                index,
                id: shown(id),
                frame,
                found: f.len(),
                expected: features_expected,
            });
        }
        for (feature, &v) in f.iter().enumerate() {
            values.push(finite(index, id, v as f32, frame, feature)?);
        }
    }
    Ok(values)
}

/// A window sent encoded (`frames_f32le`: base64 of little-endian `f32`s, frame by
/// frame).
fn decoded(
    index: usize,
    id: &str,
    encoded: &str,
    spec: &ModelSpec,
) -> Result<Vec<f32>, BatchError> {
    use base64::Engine as _;
    let channels = spec.channels.len();
    let frame_bytes = channels * 4;
    let bad = |why: String| BatchError::BadFrames {
        index,
        id: shown(id),
        why,
    };
    // Refuse a string far too long before decoding it (4 characters per 3 bytes).
    let most = spec.window_values() * 4;
    if encoded.len() > most.div_ceil(3) * 4 {
        return Err(bad(format!(
            "frames_f32le holds more than the {most} bytes of one window"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| {
            bad(format!(
                "frames_f32le is not base64 (RFC 4648, padded): {e}"
            ))
        })?;
    if bytes.len() % frame_bytes != 0 {
        return Err(bad(format!(
            "frames_f32le holds {} bytes, not whole frames of {channels} channels x 4 bytes",
            bytes.len()
        )));
    }
    if bytes.len() != most {
        return Err(BatchError::BadFrameCount {
            index,
            id: shown(id),
            found: bytes.len() / frame_bytes,
            expected: spec.frames,
        });
    }
    window(index, id, &bytes, spec)
}

/// A whole window's little-endian `f32`s (`bytes` is `spec.window_values() * 4` long),
/// checked finite.
fn window(index: usize, id: &str, bytes: &[u8], spec: &ModelSpec) -> Result<Vec<f32>, BatchError> {
    let channels = spec.channels.len();
    let values = f32s_from_le(bytes);
    // Checked once converted, in a loop of its own (a value at a time through a
    // `Result` was 7% of ingest's CPU); the error names the first value not finite.
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        finite(index, id, values[i], i / channels, i % channels)?;
    }
    Ok(values)
}

/// The first 8 bytes of a binary upload (module doc): `SWLB`, the envelope's version
/// (1), three zero bytes. No JSON document starts with them.
pub const BINARY_MAGIC: [u8; 8] = *b"SWLB\x01\0\0\0";

/// A binary upload of `document` (a JSON batch whose samples carry no window) and
/// `windows` (every sample's, in order, each `frames × channels` values): the bytes
/// [`validate_upload`] reads (module doc).
pub fn binary_upload(document: &[u8], windows: &[&[f32]]) -> Vec<u8> {
    let values: usize = windows.iter().map(|w| w.len()).sum();
    let mut out = Vec::with_capacity(12 + document.len() + 4 * values);
    out.extend_from_slice(&BINARY_MAGIC);
    out.extend_from_slice(&(document.len() as u32).to_le_bytes());
    out.extend_from_slice(document);
    for w in windows {
        out.extend_from_slice(&le_bytes(w));
    }
    out
}

/// A binary upload's document and windows; `None` when `body` does not start with
/// [`BINARY_MAGIC`] (then it is a JSON document).
fn binary_parts(body: &[u8]) -> Option<Result<(&[u8], &[u8]), BatchError>> {
    let rest = body.strip_prefix(&BINARY_MAGIC[..4])?;
    let bad = |why: String| Some(Err(BatchError::BadBinary(why)));
    let Some(rest) = rest.strip_prefix(&BINARY_MAGIC[4..]) else {
        return bad(format!(
            "the 8-byte header is {:02x?}, not {:02x?} (SWLB, version 1)",
            &body[..body.len().min(8)],
            BINARY_MAGIC
        ));
    };
    let Some((len, rest)) = rest.split_first_chunk::<4>() else {
        return bad("the body ends before the document's length".into());
    };
    let len = u32::from_le_bytes(*len) as usize;
    if len > rest.len() {
        return bad(format!(
            "the document's length is {len} bytes, but only {} follow",
            rest.len()
        ));
    }
    Some(Ok(rest.split_at(len)))
}

/// `v`, unless it is not finite.
fn finite(index: usize, id: &str, v: f32, frame: usize, feature: usize) -> Result<f32, BatchError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(BatchError::NonFinite {
            index,
            id: shown(id),
            frame,
            feature,
        })
    }
}

/// Parse and check an upload for `user` against the deployment's `spec`. Checks run in
/// document order, so the error names the first offending sample (and frame, and
/// feature).
pub fn validate_upload(
    user: &UserId,
    body: &[u8],
    limits: BatchLimits,
    spec: &ModelSpec,
) -> Result<ValidatedBatch, BatchError> {
    let (document, windows) = match binary_parts(body) {
        None => (body, None),
        Some(parts) => parts.map(|(d, w)| (d, Some(w)))?,
    };
    let raw: RawBatch =
        serde_json::from_slice(document).map_err(|e| BatchError::MalformedJson(e.to_string()))?;
    let format = raw.format.unwrap_or(1);
    if format != 1 && format != 2 {
        return Err(BatchError::UnsupportedFormat(format));
    }
    let unknown_label = |index: usize, id: &str, label: &str| BatchError::UnknownLabel {
        index,
        id: shown(id),
        label: shown(label),
        expected: spec.classes.join(", "),
    };
    let batch_id = BatchId::new(raw.batch_id).map_err(|e| BatchError::BadBatchId(e.to_string()))?;
    if raw.samples.is_empty() {
        return Err(BatchError::NoSamples);
    }
    if raw.samples.len() > limits.max_samples {
        return Err(BatchError::TooManySamples {
            count: raw.samples.len(),
            max: limits.max_samples,
        });
    }
    let window_bytes = spec.window_values() * 4;
    if let Some(w) = windows {
        let n = raw.samples.len();
        if w.len() != n * window_bytes {
            return Err(BatchError::BadBinary(format!(
                "{} bytes of windows follow the document, not the {} of its {n} samples \
                 ({} frames x {} channels x 4 bytes each)",
                w.len(),
                n * window_bytes,
                spec.frames,
                spec.channels.len()
            )));
        }
    }
    let mut seen = std::collections::HashMap::with_capacity(raw.samples.len());
    let mut samples = Vec::with_capacity(raw.samples.len());
    for (index, s) in raw.samples.into_iter().enumerate() {
        if s.id.is_empty() {
            return Err(BatchError::EmptySampleId { index });
        }
        if s.id.len() > MAX_SAMPLE_ID_LEN {
            return Err(BatchError::SampleIdTooLong {
                index,
                len: s.id.len(),
                max: MAX_SAMPLE_ID_LEN,
            });
        }
        if let Some(&first) = seen.get(s.id.as_str()) {
            return Err(BatchError::DuplicateSampleId {
                index,
                id: shown(&s.id),
                first,
            });
        }
        let values = match (&s.frames, &s.frames_f32le, windows) {
            (None, None, Some(w)) => window(
                index,
                &s.id,
                &w[index * window_bytes..(index + 1) * window_bytes],
                spec,
            )?,
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err(BatchError::BadFrames {
                    index,
                    id: shown(&s.id),
                    why: "a binary upload's windows follow the document: give neither \"frames\" nor \"frames_f32le\"".into(),
                })
            }
            (Some(frames), None, None) => numbers(index, &s.id, frames, spec)?,
            (None, Some(encoded), None) => decoded(index, &s.id, encoded, spec)?,
            (frames, _, None) => {
                return Err(BatchError::BadFrames {
                    index,
                    id: shown(&s.id),
                    why: if frames.is_some() {
                        "give either \"frames\" or \"frames_f32le\", not both".into()
                    } else {
                        "missing: give \"frames\" or \"frames_f32le\"".into()
                    },
                })
            }
        };
        let label = spec
            .class_id(&s.label)
            .ok_or_else(|| unknown_label(index, &s.id, &s.label))?;
        let feedback = match s.feedback {
            None => None,
            Some(f) => {
                let fb = |why: String| BatchError::BadFeedback {
                    index,
                    id: shown(&s.id),
                    why,
                };
                if format < 2 {
                    return Err(fb("feedback needs \"format\": 2".into()));
                }
                let predicted = spec
                    .class_id(&f.predicted)
                    .ok_or_else(|| unknown_label(index, &s.id, &f.predicted))?;
                let corrected = match f.kind.as_str() {
                    "corrected" => true,
                    "confirmed" => false,
                    other => {
                        return Err(fb(format!(
                            "kind {:?} is neither \"corrected\" nor \"confirmed\"",
                            shown(other)
                        )))
                    }
                };
                if corrected == (predicted == label) {
                    return Err(fb(if corrected {
                        "a corrected window's label must differ from the prediction".into()
                    } else {
                        "a confirmed window's label must be the prediction".into()
                    }));
                }
                Some(Feedback {
                    corrected,
                    predicted,
                    model_version: f.model_version,
                })
            }
        };
        let heldout = is_heldout(user.as_str(), batch_id.as_str(), &s.id);
        // Keep the id only once the sample is known good.
        samples.push(StagedSample {
            id: s.id,
            frames: values,
            label,
            heldout,
            feedback,
        });
        seen.insert(samples[index].id.clone(), index);
    }
    let digest = digest(&batch_id, &samples);
    Ok(ValidatedBatch {
        batch_id,
        samples,
        digest,
    })
}

/// What starts a digest made by [`digest`]; a digest without it is the SHA-256 that
/// earlier releases stored ([`digest_sha256`]).
pub const DIGEST_BLAKE3: &str = "blake3:";

/// [`DIGEST_BLAKE3`] and the BLAKE3 hex of the canonical encoding
/// ([`canonical_encoding`]), built in one buffer and hashed whole: BLAKE3 hashes one long
/// input on every SIMD lane at once. For 250 windows (512 kB) here: 72 µs, the buffer's
/// building included, against 257 µs for SHA-256 with the CPU's SHA instructions and
/// 385 µs for BLAKE3 fed the encoding a piece at a time (`cargo run --release -p
/// swimlane-core --example digest`). The SHA-256 digest was an eighth of ingest's CPU.
pub fn digest(batch_id: &BatchId, samples: &[StagedSample]) -> String {
    // Sized by a first pass over the same pieces (lengths only, nothing copied).
    let mut len = 0;
    canonical_encoding(batch_id, samples, |b| len += b.len());
    let mut buf = Vec::with_capacity(len);
    canonical_encoding(batch_id, samples, |b| buf.extend_from_slice(b));
    format!("{DIGEST_BLAKE3}{}", blake3::hash(&buf).to_hex())
}

/// The SHA-256 hex of the canonical encoding ([`canonical_encoding`]): the digest batch
/// records staged before [`digest`] carry.
pub fn digest_sha256(batch_id: &BatchId, samples: &[StagedSample]) -> String {
    let mut h = Sha256::new();
    canonical_encoding(batch_id, samples, |b| h.update(b));
    hex::encode(h.finalize())
}

/// Whether `stored`, a batch record's digest of either kind, is `batch`'s: a re-sent
/// batch is the same batch (a duplicate) exactly when it is.
pub fn same_content(stored: &str, batch: &ValidatedBatch) -> bool {
    if stored.starts_with(DIGEST_BLAKE3) {
        stored == batch.digest
    } else {
        stored == digest_sha256(&batch.batch_id, &batch.samples)
    }
}

/// The canonical encoding, in pieces to `out`: a domain tag, then length-prefixed
/// batch id, sample count, and per sample length-prefixed id, label index, the
/// feedback (format 2) and the values' `f32` bits (little-endian). The held-out flag is
/// derived, so it is not included. It never changes: stored records carry digests of it.
pub fn canonical_encoding(
    batch_id: &BatchId,
    samples: &[StagedSample],
    mut out: impl FnMut(&[u8]),
) {
    out(b"swimlane-batch-v1\0");
    out(&(batch_id.as_str().len() as u32).to_le_bytes());
    out(batch_id.as_str().as_bytes());
    out(&(samples.len() as u32).to_le_bytes());
    for s in samples {
        out(&(s.id.len() as u32).to_le_bytes());
        out(s.id.as_bytes());
        out(&[s.label.0]);
        // Feedback (format 2) is part of the content; format 1 samples encode as before.
        if let Some(f) = &s.feedback {
            out(&[0xfb, f.corrected as u8, f.predicted.0]);
            out(&f.model_version.map_or(u64::MAX, |v| v).to_le_bytes());
        }
        // A window's values go in as one slice: an `update` per value was a quarter of
        // the SHA-256 digest's time in ingest's profile.
        out(&le_bytes(&s.frames));
    }
}

/// `bytes` read as little-endian `f32`s, four bytes a value (a shorter rest is
/// ignored, as `chunks_exact` does): the reverse of [`le_bytes`], for stored windows,
/// uploaded `frames_f32le`, model tensors and ONNX initializers. Collected in one pass
/// (on a little-endian machine a plain copy: 5.4 µs for 296 kB here, against 9.8 µs
/// for zeroing a vector and copying the bytes over it; `--example digest`).
pub fn f32s_from_le(bytes: &[u8]) -> Vec<f32> {
    let mut v = Vec::with_capacity(bytes.len() / 4);
    v.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    v
}

/// `values` as little-endian bytes, the encoding of stored windows and of the batch
/// digest: the values' own memory on a little-endian machine (no copy), a converted
/// copy elsewhere.
pub(crate) fn le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values read back from their little-endian bytes are the values (signs, zeros,
    /// subnormals and the largest ones included).
    #[test]
    fn little_endian_values_read_back_exactly() {
        let values = [
            0.0f32,
            -0.0,
            1.5,
            -2.25e-3,
            f32::MIN_POSITIVE / 4.0,
            f32::MAX,
            -f32::MAX,
        ];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let back = f32s_from_le(&bytes);
        assert_eq!(back.len(), values.len());
        for (a, b) in back.iter().zip(&values) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    use crate::records::WINDOW_VALUES;
    use crate::spec::ClassId;
    use crate::stroke::{StrokeClass, WINDOW_FEATURES, WINDOW_FRAMES};
    use serde_json::{json, Value};

    fn user() -> UserId {
        UserId::new("swimmer-1").unwrap()
    }

    fn frames(seed: f64) -> Value {
        let f: Vec<Vec<f64>> = (0..WINDOW_FRAMES)
            .map(|i| {
                (0..WINDOW_FEATURES)
                    .map(|j| seed + i as f64 * 0.01 + j as f64 * 0.001)
                    .collect()
            })
            .collect();
        json!(f)
    }

    fn body(n: usize) -> Value {
        let samples: Vec<Value> = (0..n)
            .map(|i| json!({"id": format!("s{i}"), "frames": frames(i as f64), "label": StrokeClass::ALL[i % 6].name()}))
            .collect();
        json!({"batch_id": "b1", "samples": samples})
    }

    /// `text` as an upload body, under the default limits and spec.
    fn validate_text(text: &str) -> Result<ValidatedBatch, BatchError> {
        validate_upload(
            &user(),
            text.as_bytes(),
            BatchLimits::default(),
            &ModelSpec::default(),
        )
    }

    fn check(v: &Value) -> Result<ValidatedBatch, BatchError> {
        validate_upload(
            &user(),
            v.to_string().as_bytes(),
            BatchLimits { max_samples: 50 },
            &ModelSpec::synthetic_pose(),
        )
    }

    /// Stored batch records carry this digest, and a retried upload is a duplicate only
    /// if it matches: the encoding must never change. Pinned for a fixed batch.
    #[test]
    fn the_digest_of_a_fixed_batch_never_changes() {
        let b = check(&body(30)).unwrap();
        assert_eq!(
            b.digest,
            "blake3:12ed1228b907de3c97a23dd99e2ca33b94f2853b5ccf47a16642be0b2d292f52"
        );
        // The SHA-256 that records staged by earlier releases carry.
        let legacy = digest_sha256(&b.batch_id, &b.samples);
        assert_eq!(
            legacy,
            "14b6cec52d7e0119266dee7d8beb570b474ac329d2a481f5f2e18949e648e986"
        );
        // Either kind is this batch's; another batch's is not.
        assert!(same_content(&b.digest, &b));
        assert!(same_content(&legacy, &b));
        let other = check(&body(29)).unwrap();
        assert!(!same_content(&b.digest, &other));
        assert!(!same_content(&legacy, &other));
        assert!(!same_content(&format!("{DIGEST_BLAKE3}{legacy}"), &b));
    }

    #[test]
    fn a_good_batch_validates_with_split_and_digest() {
        let b = check(&body(30)).unwrap();
        assert_eq!(b.batch_id.as_str(), "b1");
        assert_eq!(b.samples.len(), 30);
        assert_eq!(b.samples[7].label, ClassId::from(StrokeClass::ALL[1]));
        assert_eq!(b.samples[0].frames.len(), WINDOW_VALUES);
        for s in &b.samples {
            assert_eq!(s.heldout, is_heldout("swimmer-1", "b1", &s.id));
        }
        assert_eq!(b.digest.len(), DIGEST_BLAKE3.len() + 64);
        // Same content, different formatting: same digest.
        let pretty = serde_json::to_string_pretty(&body(30)).unwrap();
        let b2 = validate_upload(
            &user(),
            pretty.as_bytes(),
            BatchLimits { max_samples: 50 },
            &ModelSpec::synthetic_pose(),
        )
        .unwrap();
        assert_eq!(b.digest, b2.digest);
        // `1` and `1.0` are the same number.
        let mut ints = body(1);
        ints["samples"][0]["frames"][0][0] = json!(1);
        let mut floats = body(1);
        floats["samples"][0]["frames"][0][0] = json!(1.0);
        assert_eq!(check(&ints).unwrap().digest, check(&floats).unwrap().digest);
        // Different content: different digest.
        let mut other = body(30);
        other["samples"][3]["label"] = json!("glide");
        assert_ne!(check(&other).unwrap().digest, b.digest);
    }

    fn code(v: &Value) -> &'static str {
        check(v).unwrap_err().code()
    }

    #[test]
    fn malformed_json_and_bad_shapes_of_the_document() {
        for bad in [
            &b"{"[..],
            b"",
            b"[]",
            b"{\"batch_id\": \"b1\"}",
            b"{\"batch_id\": \"b1\", \"samples\": {}}",
            b"{\"batch_id\": 5, \"samples\": []}",
            b"\xff\xfe",
        ] {
            let e = validate_upload(&user(), bad, BatchLimits::default(), &ModelSpec::default())
                .unwrap_err();
            assert_eq!(
                e.code(),
                "malformed_json",
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut extra = body(1);
        extra["user"] = json!("someone-else");
        assert_eq!(code(&extra), "malformed_json");
        let mut s_extra = body(1);
        s_extra["samples"][0]["weight"] = json!(2);
        assert_eq!(code(&s_extra), "malformed_json");
        let mut str_value = body(1);
        str_value["samples"][0]["frames"][0][0] = json!("1.0");
        assert_eq!(code(&str_value), "malformed_json");
    }

    #[test]
    fn bad_batch_id() {
        for id in ["", "a/b", "../x", &"x".repeat(129)] {
            let mut b = body(1);
            b["batch_id"] = json!(id);
            assert_eq!(code(&b), "bad_batch_id", "{id:?}");
        }
    }

    #[test]
    fn zero_and_too_many_samples() {
        assert_eq!(code(&body(0)), "no_samples");
        assert_eq!(check(&body(50)).unwrap().samples.len(), 50);
        assert_eq!(
            check(&body(51)).unwrap_err(),
            BatchError::TooManySamples { count: 51, max: 50 }
        );
    }

    #[test]
    fn empty_long_and_duplicated_sample_ids() {
        let mut b = body(3);
        b["samples"][2]["id"] = json!("");
        assert_eq!(
            check(&b).unwrap_err(),
            BatchError::EmptySampleId { index: 2 }
        );
        let mut b = body(3);
        b["samples"][1]["id"] = json!("é".repeat(65));
        assert_eq!(code(&b), "sample_id_too_long");
        let mut b = body(3);
        b["samples"][2]["id"] = json!("s0");
        let e = check(&b).unwrap_err();
        assert_eq!(
            e,
            BatchError::DuplicateSampleId {
                index: 2,
                id: "s0".into(),
                first: 0
            }
        );
        assert!(e.to_string().contains("sample 2"));
    }

    #[test]
    fn wrong_frame_and_feature_counts_name_the_sample_and_frame() {
        let mut b = body(3);
        b["samples"][1]["frames"].as_array_mut().unwrap().pop();
        let e = check(&b).unwrap_err();
        assert_eq!(e.code(), "bad_frame_count");
        assert!(
            e.to_string()
                .contains("sample 1 (\"s1\") has 31 frames, expected 32"),
            "{e}"
        );
        let mut b = body(3);
        b["samples"][1]["frames"]
            .as_array_mut()
            .unwrap()
            .push(frames(0.0)[0].clone());
        assert_eq!(code(&b), "bad_frame_count");
        let mut b = body(3);
        b["samples"][2]["frames"][7]
            .as_array_mut()
            .unwrap()
            .push(json!(0.5));
        let e = check(&b).unwrap_err();
        assert_eq!(
            e,
            BatchError::BadFeatureCount {
                index: 2,
                id: "s2".into(),
                frame: 7,
                found: 17,
                expected: 16
            }
        );
        assert!(e.to_string().contains("frame 7 has 17 features"), "{e}");
        let mut b = body(1);
        b["samples"][0]["frames"][0] = json!([]);
        assert_eq!(code(&b), "bad_feature_count");
    }

    #[test]
    fn non_finite_values_are_rejected() {
        // JSON has no NaN or Infinity literal: those are malformed JSON.
        let text = body(1).to_string().replacen("0.0", "NaN", 1);
        let e = validate_text(&text).unwrap_err();
        assert_eq!(e.code(), "malformed_json");
        let text = body(1).to_string().replacen("0.0", "Infinity", 1);
        assert!(validate_text(&text).is_err());
        // A number that overflows f64 is refused by the JSON parser.
        let text = body(1).to_string().replacen("0.0", "1e400", 1);
        assert!(validate_text(&text).is_err());
        // A number that fits f64 but overflows f32.
        let mut b = body(2);
        b["samples"][1]["frames"][3][5] = json!(1e39);
        assert_eq!(
            check(&b).unwrap_err(),
            BatchError::NonFinite {
                index: 1,
                id: "s1".into(),
                frame: 3,
                feature: 5
            }
        );
        let mut b = body(1);
        b["samples"][0]["frames"][0][0] = json!(-3.5e38);
        assert_eq!(code(&b), "non_finite_value");
        // The largest f32 is fine.
        let mut b = body(1);
        b["samples"][0]["frames"][0][0] = json!(f32::MAX as f64);
        assert!(check(&b).is_ok());
    }

    #[test]
    fn unknown_labels() {
        for l in ["Freestyle", "", "crawl", "0"] {
            let mut b = body(2);
            b["samples"][1]["label"] = json!(l);
            assert_eq!(code(&b), "unknown_label", "{l:?}");
        }
        let mut b = body(1);
        b["samples"][0]["label"] = json!(0);
        assert_eq!(code(&b), "malformed_json");
    }

    #[test]
    fn codes_are_a_closed_set() {
        let errors = [
            BatchError::MalformedJson(String::new()),
            BatchError::BadBatchId(String::new()),
            BatchError::NoSamples,
            BatchError::TooManySamples { count: 0, max: 0 },
            BatchError::EmptySampleId { index: 0 },
            BatchError::SampleIdTooLong {
                index: 0,
                len: 0,
                max: 0,
            },
            BatchError::DuplicateSampleId {
                index: 0,
                id: String::new(),
                first: 0,
            },
            BatchError::BadFrameCount {
                index: 0,
                id: String::new(),
                found: 0,
                expected: 0,
            },
            BatchError::BadFeatureCount {
                index: 0,
                id: String::new(),
                frame: 0,
                found: 0,
                expected: 0,
            },
            BatchError::NonFinite {
                index: 0,
                id: String::new(),
                frame: 0,
                feature: 0,
            },
            BatchError::UnknownLabel {
                index: 0,
                id: String::new(),
                label: String::new(),
                expected: String::new(),
            },
            BatchError::UnsupportedFormat(3),
            BatchError::BadFeedback {
                index: 0,
                id: String::new(),
                why: String::new(),
            },
            BatchError::BadFrames {
                index: 0,
                id: String::new(),
                why: String::new(),
            },
            BatchError::BadBinary(String::new()),
        ];
        let codes: Vec<_> = errors.iter().map(|e| e.code()).collect();
        assert_eq!(codes, BatchError::CODES);
    }

    #[test]
    fn another_spec_sets_the_shape_and_the_classes_and_errors_name_them() {
        let watch = ModelSpec::smartwatch();
        let window = |n: usize| json!(vec![vec![0.25; 6]; n]);
        let doc = json!({"batch_id": "w1", "samples": [
            {"id": "a", "frames": window(64), "label": "null"},
            {"id": "b", "frames": window(64), "label": "turn"}]});
        let upload = |d: &serde_json::Value| {
            validate_upload(
                &user(),
                d.to_string().as_bytes(),
                BatchLimits::default(),
                &watch,
            )
        };
        let b = upload(&doc).unwrap();
        assert_eq!(b.samples[1].label, ClassId(5));
        assert_eq!(b.samples[0].frames.len(), 384);
        // The pose spec refuses the smartwatch window and names the problem.
        let e = check(&doc).unwrap_err();
        assert_eq!(e.to_string(), "sample 0 (\"a\") has 64 frames, expected 32");
        // A pose window and a pose class are refused by the smartwatch spec.
        let e = upload(&body(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sample 0 (\"s0\") has 32 frames, expected 64"
        );
        let mut d = doc.clone();
        d["samples"][0]["label"] = json!("glide");
        let e = upload(&d).unwrap_err();
        assert_eq!(e.code(), "unknown_label");
        assert!(
            e.to_string().ends_with(
                "expected one of null, freestyle, breaststroke, backstroke, butterfly, turn"
            ),
            "{e}"
        );
    }

    /// `v` with every sample's `frames` replaced by `frames_f32le`.
    fn encoded(v: &Value) -> Value {
        use base64::Engine as _;
        let mut v = v.clone();
        for s in v["samples"].as_array_mut().unwrap() {
            let bytes: Vec<u8> = s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|f| f.as_array().unwrap().iter())
                .flat_map(|x| (x.as_f64().unwrap() as f32).to_le_bytes())
                .collect();
            let s = s.as_object_mut().unwrap();
            s.remove("frames");
            s.insert(
                "frames_f32le".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
        }
        v
    }

    #[test]
    fn frames_sent_as_base64_f32_validate_to_the_same_batch_and_bad_ones_are_named() {
        use base64::Engine as _;
        let b64 = |b: &[u8]| json!(base64::engine::general_purpose::STANDARD.encode(b));
        let plain = body(5);
        let enc = encoded(&plain);
        assert!(enc["samples"][0].get("frames").is_none());
        // The same values, ids, labels, split and digest.
        assert_eq!(check(&enc).unwrap(), check(&plain).unwrap());

        let mut both = enc.clone();
        both["samples"][1]["frames"] = plain["samples"][1]["frames"].clone();
        let e = check(&both).unwrap_err();
        assert_eq!(e.code(), "bad_frames");
        assert!(
            e.to_string()
                .starts_with("sample 1 (\"s1\") frames: give either"),
            "{e}"
        );
        let mut neither = enc.clone();
        neither["samples"][2]
            .as_object_mut()
            .unwrap()
            .remove("frames_f32le");
        assert_eq!(code(&neither), "bad_frames");
        let mut garbage = enc.clone();
        garbage["samples"][0]["frames_f32le"] = json!("not base64!");
        assert!(check(&garbage)
            .unwrap_err()
            .to_string()
            .contains("not base64"));
        // Whole frames too few, and bytes that are not whole frames.
        let mut short = enc.clone();
        short["samples"][0]["frames_f32le"] = b64(&vec![0u8; 31 * 16 * 4]);
        assert_eq!(
            check(&short).unwrap_err().to_string(),
            "sample 0 (\"s0\") has 31 frames, expected 32"
        );
        let mut ragged = enc.clone();
        ragged["samples"][0]["frames_f32le"] = b64(&[0u8; 10]);
        assert!(check(&ragged)
            .unwrap_err()
            .to_string()
            .contains("not whole frames"));
        // Far too long is refused before decoding.
        let mut long = enc.clone();
        long["samples"][0]["frames_f32le"] = json!("A".repeat(1 << 20));
        assert!(check(&long).unwrap_err().to_string().contains("more than"));
        // A NaN is named by frame and feature, as with numbers.
        let mut values = vec![0u8; 32 * 16 * 4];
        values[(2 * 16 + 3) * 4..(2 * 16 + 4) * 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let mut nan = enc.clone();
        nan["samples"][4]["frames_f32le"] = b64(&values);
        assert_eq!(
            check(&nan).unwrap_err().to_string(),
            "sample 4 (\"s4\") frame 2 feature 3 is not a finite 32-bit float"
        );
    }

    /// `v` as a binary upload: its samples' windows taken out of the document and put
    /// after it.
    fn binary(v: &Value) -> Vec<u8> {
        let mut doc = v.clone();
        let mut windows: Vec<Vec<f32>> = Vec::new();
        for s in doc["samples"].as_array_mut().unwrap() {
            let f = s.as_object_mut().unwrap().remove("frames").unwrap();
            windows.push(
                f.as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|f| f.as_array().unwrap().iter())
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            );
        }
        let refs: Vec<&[f32]> = windows.iter().map(Vec::as_slice).collect();
        binary_upload(doc.to_string().as_bytes(), &refs)
    }

    fn check_bytes(b: &[u8]) -> Result<ValidatedBatch, BatchError> {
        validate_upload(
            &user(),
            b,
            BatchLimits { max_samples: 50 },
            &ModelSpec::synthetic_pose(),
        )
    }

    #[test]
    fn windows_after_the_document_validate_to_the_same_batch_and_bad_ones_are_named() {
        let plain = body(5);
        let bin = binary(&plain);
        let doc_len = u32::from_le_bytes(bin[8..12].try_into().unwrap()) as usize;
        assert_eq!(bin.len(), 12 + doc_len + 5 * 32 * 16 * 4);
        // The same values, ids, labels, split and digest; fewer bytes than base64.
        assert_eq!(check_bytes(&bin).unwrap(), check(&plain).unwrap());
        assert!(bin.len() < encoded(&plain).to_string().len());
        // Gzip'd or not is ingest's business: the envelope is only these bytes.
        let err = |b: &[u8]| check_bytes(b).unwrap_err();
        let msg = |b: &[u8]| err(b).to_string();
        // Another version, a body cut anywhere in the header, a length past the end.
        let mut v2 = bin.clone();
        v2[4] = 2;
        assert_eq!(err(&v2).code(), "bad_binary");
        assert!(msg(&v2).contains("not [53, 57, 4c, 42, 01"), "{}", msg(&v2));
        for cut in [4, 8, 11] {
            assert_eq!(err(&bin[..cut]).code(), "bad_binary", "cut at {cut}");
        }
        let mut long = bin.clone();
        long[8..12].copy_from_slice(&(bin.len() as u32).to_le_bytes());
        assert!(msg(&long).contains("only"), "{}", msg(&long));
        // A window short, one too many, a byte more: the count is checked first.
        for (n, what) in [(-1i64, "short"), (2048, "window more"), (1, "byte more")] {
            let mut b = bin.clone();
            if n < 0 {
                b.truncate(b.len() - 4);
            } else {
                b.extend(std::iter::repeat_n(0u8, n as usize));
            }
            let e = err(&b);
            assert_eq!(e.code(), "bad_binary", "{what}");
            assert!(
                e.to_string().contains("not the 10240 of its 5 samples"),
                "{what}: {e}"
            );
        }
        // The document in a binary upload carries no window: sample 1 keeps its base64.
        let mut both = plain.clone();
        both["samples"][1]["frames_f32le"] = json!("AAAA");
        let e = err(&binary(&both));
        assert_eq!(e.code(), "bad_frames");
        assert!(
            e.to_string()
                .starts_with("sample 1 (\"s1\") frames: a binary upload"),
            "{e}"
        );
        // A NaN is named by sample, frame and feature, as in the other encodings.
        let mut nan = bin.clone();
        let at = 12 + doc_len + (3 * 512 + 2 * 16 + 5) * 4;
        nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(
            msg(&nan),
            "sample 3 (\"s3\") frame 2 feature 5 is not a finite 32-bit float"
        );
        // The document is checked as ever.
        let bad_doc = [&BINARY_MAGIC[..], &2u32.to_le_bytes(), b"{]"].concat();
        assert_eq!(err(&bad_doc).code(), "malformed_json");
    }

    #[test]
    fn format_2_carries_feedback_and_checks_it() {
        let mut d = body(3);
        d["format"] = json!(2);
        d["samples"][0]["feedback"] =
            json!({"kind": "corrected", "predicted": "turn", "model_version": 4});
        d["samples"][1]["feedback"] =
            json!({"kind": "confirmed", "predicted": "backstroke", "model_version": null});
        let b = check(&d).unwrap();
        assert_eq!(
            b.samples[0].feedback,
            Some(Feedback {
                corrected: true,
                predicted: ClassId(4),
                model_version: Some(4)
            })
        );
        assert_eq!(b.samples[1].feedback.unwrap().model_version, None);
        assert_eq!(b.samples[2].feedback, None);
        assert_ne!(b.digest, check(&body(3)).unwrap().digest);
        // Format 1 carries no feedback; unknown formats, kinds and contradictions fail.
        let mut f1 = d.clone();
        f1.as_object_mut().unwrap().remove("format");
        assert_eq!(code(&f1), "bad_feedback");
        let mut f3 = d.clone();
        f3["format"] = json!(3);
        assert_eq!(code(&f3), "unsupported_format");
        let mut k = d.clone();
        k["samples"][0]["feedback"]["kind"] = json!("maybe");
        assert_eq!(code(&k), "bad_feedback");
        let mut c = d.clone();
        c["samples"][0]["feedback"]["predicted"] = json!("freestyle");
        assert!(check(&c).unwrap_err().to_string().contains("must differ"));
        let mut c = d.clone();
        c["samples"][1]["feedback"]["predicted"] = json!("glide");
        assert!(check(&c)
            .unwrap_err()
            .to_string()
            .contains("must be the prediction"));
        let mut u = d.clone();
        u["samples"][0]["feedback"]["predicted"] = json!("crawl");
        assert_eq!(code(&u), "unknown_label");
    }

    #[test]
    fn long_ids_are_shortened_in_messages() {
        assert_eq!(shown("abc"), "abc");
        let s = shown(&"é".repeat(100));
        assert!(s.len() <= 44 && s.ends_with('…'));
    }
}
