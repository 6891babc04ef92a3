//! The body of `POST /v1/users/{user}/batches` as a device sends it (docs/batch-format.md):
//! one JSON object with the batch id and its samples, each with an id (`w0`, `w1`, … in
//! order), its 32 frames of 16 features (as numbers, or as base64 of little-endian
//! `f32`s, or raw after the document: [`Frames`]), and its corrected label's name.
//! Used by the demo, the
//! benchmarks, the chaos soak and the tests, so they all upload what a phone would.
use swimlane_core::records::Feedback;
use swimlane_core::ModelSpec;
use swimlane_model::Sample;

/// How a window's values are written (docs/batch-format.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Frames {
    /// `"frames"`: one array of numbers per frame.
    #[default]
    Numbers,
    /// `"frames_f32le"`: base64 of the little-endian `f32`s, frame by frame (about half
    /// the bytes, and much less for ingest to parse).
    F32le,
    /// A binary upload: the document without windows, then every window's
    /// little-endian `f32`s (`swimlane_core::batch::binary_upload`; three quarters of
    /// base64's bytes, and nothing to parse).
    Binary,
}

/// The upload as a JSON value for the synthetic pose spec (format 1); it passes
/// ingest's validation whenever `batch_id` is a valid batch id and `samples` are 1 to
/// the configured maximum.
pub fn upload_json(batch_id: &str, samples: &[Sample]) -> serde_json::Value {
    upload_json_with(&ModelSpec::synthetic_pose(), batch_id, samples, None)
}

/// The upload for any spec; with `feedback` (one per sample), format 2: each window
/// says what the device predicted, with which version, and whether the user corrected
/// it (docs/batch-format.md).
pub fn upload_json_with(
    spec: &ModelSpec,
    batch_id: &str,
    samples: &[Sample],
    feedback: Option<&[Feedback]>,
) -> serde_json::Value {
    upload_json_as(spec, batch_id, samples, feedback, Frames::Numbers)
}

/// [`upload_json_with`], the windows written as `frames` (with [`Frames::Binary`], the
/// document alone: its windows follow it, [`upload_body_as`]).
pub fn upload_json_as(
    spec: &ModelSpec,
    batch_id: &str,
    samples: &[Sample],
    feedback: Option<&[Feedback]>,
    frames: Frames,
) -> serde_json::Value {
    use base64::Engine as _;
    let channels = spec.channels.len();
    let samples: Vec<_> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v =
                serde_json::json!({"id": format!("w{i}"), "label": spec.class_name(s.label)});
            match frames {
                Frames::Numbers => {
                    let rows: Vec<&[f32]> = s.frames.chunks(channels).collect();
                    v["frames"] = serde_json::json!(rows);
                }
                Frames::F32le => {
                    let bytes: Vec<u8> = s.frames.iter().flat_map(|x| x.to_le_bytes()).collect();
                    v["frames_f32le"] = base64::engine::general_purpose::STANDARD
                        .encode(bytes)
                        .into();
                }
                Frames::Binary => {}
            }
            if let Some(f) = feedback.and_then(|f| f.get(i)) {
                v["feedback"] = serde_json::json!({
                    "kind": if f.corrected { "corrected" } else { "confirmed" },
                    "predicted": spec.class_name(f.predicted),
                    "model_version": f.model_version,
                });
            }
            v
        })
        .collect();
    if feedback.is_some() {
        serde_json::json!({"format": 2, "batch_id": batch_id, "samples": samples})
    } else {
        serde_json::json!({"batch_id": batch_id, "samples": samples})
    }
}

/// The same upload serialized, ready to send.
pub fn upload_body(batch_id: &str, samples: &[Sample]) -> Vec<u8> {
    upload_body_as(batch_id, samples, Frames::Numbers)
}

/// [`upload_body`] with the windows written as `frames`.
pub fn upload_body_as(batch_id: &str, samples: &[Sample], frames: Frames) -> Vec<u8> {
    let spec = ModelSpec::synthetic_pose();
    let document = serde_json::to_vec(&upload_json_as(&spec, batch_id, samples, None, frames))
        .expect("a JSON value serializes");
    match frames {
        Frames::Binary => {
            let windows: Vec<&[f32]> = samples.iter().map(|s| s.frames.as_slice()).collect();
            swimlane_core::batch::binary_upload(&document, &windows)
        }
        Frames::Numbers | Frames::F32le => document,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swimlane_core::batch::{validate_upload, BatchLimits};
    use swimlane_core::records::WINDOW_VALUES;
    use swimlane_core::{StrokeClass, UserId};

    #[test]
    fn the_body_passes_ingest_validation_and_keeps_every_value_and_label() {
        let samples: Vec<Sample> = (0..3)
            .map(|i| Sample {
                frames: (0..WINDOW_VALUES)
                    .map(|v| (i * 1000 + v) as f32 * 0.5)
                    .collect(),
                label: StrokeClass::ALL[i].into(),
            })
            .collect();
        let body = upload_body("night-1", &samples);
        let user = UserId::new("alice").unwrap();
        let limits = BatchLimits { max_samples: 10 };
        let batch = validate_upload(&user, &body, limits, &ModelSpec::synthetic_pose()).unwrap();
        // The compact encoding: fewer bytes, the same batch.
        let compact = upload_body_as("night-1", &samples, Frames::F32le);
        assert!(
            compact.len() < body.len(),
            "{} vs {}",
            compact.len(),
            body.len()
        );
        let same = validate_upload(&user, &compact, limits, &ModelSpec::synthetic_pose()).unwrap();
        assert_eq!(same, batch);
        // The binary upload: fewer bytes again, the same batch.
        let binary = upload_body_as("night-1", &samples, Frames::Binary);
        assert!(binary.len() < compact.len(), "{}", binary.len());
        let same = validate_upload(&user, &binary, limits, &ModelSpec::synthetic_pose()).unwrap();
        assert_eq!(same, batch);
        assert_eq!(batch.batch_id.as_str(), "night-1");
        assert_eq!(batch.samples.len(), 3);
        for (i, (got, want)) in batch.samples.iter().zip(&samples).enumerate() {
            assert_eq!(got.id, format!("w{i}"));
            assert_eq!(got.frames, want.frames);
            assert_eq!(got.label, want.label);
        }
    }

    #[test]
    fn a_smartwatch_upload_with_feedback_is_format_2_and_validates() {
        let spec = ModelSpec::smartwatch();
        let samples: Vec<Sample> = (0..2)
            .map(|i| Sample {
                frames: vec![i as f32; spec.window_values()],
                label: swimlane_core::ClassId(i as u8),
            })
            .collect();
        let fb = [
            Feedback {
                corrected: true,
                predicted: swimlane_core::ClassId(5),
                model_version: None,
            },
            Feedback {
                corrected: false,
                predicted: swimlane_core::ClassId(1),
                model_version: Some(2),
            },
        ];
        let body =
            serde_json::to_vec(&upload_json_with(&spec, "s-1", &samples, Some(&fb))).unwrap();
        let user = UserId::new("alice").unwrap();
        let batch = validate_upload(&user, &body, BatchLimits { max_samples: 10 }, &spec).unwrap();
        assert_eq!(batch.samples[0].feedback, Some(fb[0]));
        assert_eq!(batch.samples[1].feedback, Some(fb[1]));
        assert_eq!(batch.samples[1].label, swimlane_core::ClassId(1));
    }
}
