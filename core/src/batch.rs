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
//! Invariants of a [`ValidatedBatch`]:
//! - the batch id is a valid [`BatchId`];
//! - there are 1 to `limits.max_samples` samples, with distinct, non-empty sample ids
//!   of at most [`MAX_SAMPLE_ID_LEN`] bytes;
//! - every sample has exactly [`WINDOW_FRAMES`] frames of [`WINDOW_FEATURES`] finite
//!   `f32` values (numbers that overflow `f32` are rejected, not saturated);
//! - every label is a [`StrokeClass`] wire name;
//! - each sample's `heldout` flag is [`is_heldout`]`(user, batch, sample id)`;
//! - `digest` is the SHA-256 of a canonical encoding of (batch id, samples in order:
//!   id, label, values as `f32` bits), so the same batch re-sent with different JSON
//!   formatting (whitespace, `1` vs `1.0`, key order) has the same digest.
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::ids::{BatchId, UserId};
use crate::records::{is_heldout, StagedSample, WINDOW_VALUES};
use crate::stroke::{StrokeClass, WINDOW_FEATURES, WINDOW_FRAMES};

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
    /// SHA-256 (lowercase hex) of the canonical encoding of the content.
    pub digest: String,
}

impl ValidatedBatch {
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
    #[error("sample {index} ({id:?}) has unknown label {label:?}; expected one of freestyle, backstroke, breaststroke, butterfly, turn, glide")]
    UnknownLabel {
        index: usize,
        id: String,
        label: String,
    },
}

impl BatchError {
    /// Every code [`BatchError::code`] can return (a closed set, used as metric labels).
    pub const CODES: [&'static str; 11] = [
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
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    batch_id: String,
    samples: Vec<RawSample>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSample {
    id: String,
    frames: Vec<Vec<f64>>,
    label: String,
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

/// Parse and check an upload for `user`. Checks run in document order, so the error
/// names the first offending sample (and frame, and feature).
pub fn validate_upload(
    user: &UserId,
    body: &[u8],
    limits: BatchLimits,
) -> Result<ValidatedBatch, BatchError> {
    let raw: RawBatch =
        serde_json::from_slice(body).map_err(|e| BatchError::MalformedJson(e.to_string()))?;
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
        if s.frames.len() != WINDOW_FRAMES {
            return Err(BatchError::BadFrameCount {
                index,
                id: shown(&s.id),
                found: s.frames.len(),
                expected: WINDOW_FRAMES,
            });
        }
        let mut values = Vec::with_capacity(WINDOW_VALUES);
        for (frame, f) in s.frames.iter().enumerate() {
            if f.len() != WINDOW_FEATURES {
                return Err(BatchError::BadFeatureCount {
                    index,
                    id: shown(&s.id),
                    frame,
                    found: f.len(),
                    expected: WINDOW_FEATURES,
                });
            }
            for (feature, &v) in f.iter().enumerate() {
                let x = v as f32;
                if !x.is_finite() {
                    return Err(BatchError::NonFinite {
                        index,
                        id: shown(&s.id),
                        frame,
                        feature,
                    });
                }
                values.push(x);
            }
        }
        let label = StrokeClass::from_name(&s.label).ok_or_else(|| BatchError::UnknownLabel {
            index,
            id: shown(&s.id),
            label: shown(&s.label),
        })?;
        let heldout = is_heldout(user.as_str(), batch_id.as_str(), &s.id);
        // Keep the id only once the sample is known good.
        samples.push(StagedSample {
            id: s.id,
            frames: values,
            label,
            heldout,
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

/// SHA-256 hex of the canonical encoding: a domain tag, then length-prefixed batch id,
/// sample count, and per sample length-prefixed id, label index and the 512 values'
/// `f32` bits (little-endian). The held-out flag is derived, so it is not included.
pub fn digest(batch_id: &BatchId, samples: &[StagedSample]) -> String {
    let mut h = Sha256::new();
    h.update(b"swimlane-batch-v1\0");
    h.update((batch_id.as_str().len() as u32).to_le_bytes());
    h.update(batch_id.as_str().as_bytes());
    h.update((samples.len() as u32).to_le_bytes());
    for s in samples {
        h.update((s.id.len() as u32).to_le_bytes());
        h.update(s.id.as_bytes());
        h.update([s.label.index() as u8]);
        for v in &s.frames {
            h.update(v.to_bits().to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn check(v: &Value) -> Result<ValidatedBatch, BatchError> {
        validate_upload(
            &user(),
            v.to_string().as_bytes(),
            BatchLimits { max_samples: 50 },
        )
    }

    #[test]
    fn a_good_batch_validates_with_split_and_digest() {
        let b = check(&body(30)).unwrap();
        assert_eq!(b.batch_id.as_str(), "b1");
        assert_eq!(b.samples.len(), 30);
        assert_eq!(b.samples[7].label, StrokeClass::ALL[1]);
        assert_eq!(b.samples[0].frames.len(), WINDOW_VALUES);
        for s in &b.samples {
            assert_eq!(s.heldout, is_heldout("swimmer-1", "b1", &s.id));
        }
        assert_eq!(b.digest.len(), 64);
        // Same content, different formatting: same digest.
        let pretty = serde_json::to_string_pretty(&body(30)).unwrap();
        let b2 =
            validate_upload(&user(), pretty.as_bytes(), BatchLimits { max_samples: 50 }).unwrap();
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
            let e = validate_upload(&user(), bad, BatchLimits::default()).unwrap_err();
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
        let e = validate_upload(&user(), text.as_bytes(), BatchLimits::default()).unwrap_err();
        assert_eq!(e.code(), "malformed_json");
        let text = body(1).to_string().replacen("0.0", "Infinity", 1);
        assert!(validate_upload(&user(), text.as_bytes(), BatchLimits::default()).is_err());
        // A number that overflows f64 is refused by the JSON parser.
        let text = body(1).to_string().replacen("0.0", "1e400", 1);
        assert!(validate_upload(&user(), text.as_bytes(), BatchLimits::default()).is_err());
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
            },
        ];
        let codes: Vec<_> = errors.iter().map(|e| e.code()).collect();
        assert_eq!(codes, BatchError::CODES);
    }

    #[test]
    fn long_ids_are_shortened_in_messages() {
        assert_eq!(shown("abc"), "abc");
        let s = shown(&"é".repeat(100));
        assert!(s.len() <= 44 && s.ends_with('…'));
    }
}
