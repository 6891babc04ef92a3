//! The body of `POST /v1/users/{user}/batches` as a device sends it (docs/batch-format.md):
//! one JSON object with the batch id and its samples, each with an id (`w0`, `w1`, … in
//! order), its 32 frames of 16 features, and its corrected label's name. Used by the
//! demo, the benchmarks, the chaos soak and the tests, so they all upload what a phone
//! would.
use swimlane_core::WINDOW_FEATURES;
use swimlane_model::Sample;

/// The upload as a JSON value; it passes ingest's validation whenever `batch_id` is a
/// valid batch id and `samples` are 1 to the configured maximum.
pub fn upload_json(batch_id: &str, samples: &[Sample]) -> serde_json::Value {
    let samples: Vec<_> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let frames: Vec<&[f32]> = s.frames.chunks(WINDOW_FEATURES).collect();
            serde_json::json!({"id": format!("w{i}"), "frames": frames, "label": s.label.name()})
        })
        .collect();
    serde_json::json!({"batch_id": batch_id, "samples": samples})
}

/// The same upload serialized, ready to send.
pub fn upload_body(batch_id: &str, samples: &[Sample]) -> Vec<u8> {
    serde_json::to_vec(&upload_json(batch_id, samples)).expect("a JSON value serializes")
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
                label: StrokeClass::ALL[i],
            })
            .collect();
        let body = upload_body("night-1", &samples);
        let user = UserId::new("alice").unwrap();
        let batch = validate_upload(&user, &body, BatchLimits { max_samples: 10 }).unwrap();
        assert_eq!(batch.batch_id.as_str(), "night-1");
        assert_eq!(batch.samples.len(), 3);
        for (i, (got, want)) in batch.samples.iter().zip(&samples).enumerate() {
            assert_eq!(got.id, format!("w{i}"));
            assert_eq!(got.frames, want.frames);
            assert_eq!(got.label, want.label);
        }
    }
}
