//! Writes the seed corpus of every fuzz target into `corpus/<target>/`: real values
//! made by the project's own encoders (an upload as a device sends it, records as the
//! stages store them, a model as the trainer saves it and the publisher exports it),
//! small. Deterministic: the same files every run.
//!
//! `cargo run --release --bin make_corpus` from `fuzz/` (see README.md).
use std::io::Write;
use std::path::Path;

use rand::SeedableRng;
use serde_json::json;
use swimlane_bus::wire::{encode_log_record, encode_outbox_entry};
use swimlane_core::records::{encode_chunk, BatchRecord, BatchStatus, StagedSample};
use swimlane_core::{BatchId, Event, UserId};
use swimlane_model::onnx::{self, Lineage};
use swimlane_model::synth::Swimmer;
use swimlane_model::{dataset, MicroModel, Sample};
use swimlane_state::encode_sample_set;
use swimlane_store::blob::{BlobHeader, CHUNK_SIZE};

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed written");
}

fn with_selector(selector: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![selector];
    v.extend_from_slice(bytes);
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn samples(n: usize, seed: u64) -> Vec<Sample> {
    Swimmer::new(seed).windows(n, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed))
}

fn staged(samples: &[Sample]) -> Vec<StagedSample> {
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| StagedSample {
            id: format!("s{i}"),
            frames: s.frames.clone(),
            label: s.label,
            heldout: i % 5 == 0,
            feedback: (i % 3 == 1).then_some(swimlane_core::records::Feedback {
                corrected: true,
                predicted: swimlane_core::ClassId(((s.label.0 as usize + 1) % 6) as u8),
                model_version: Some(i as u64),
            }),
        })
        .collect()
}

/// An upload body: `samples` windows with short numbers (a device's would be longer).
fn upload(batch_id: &str, n: usize, label: &str) -> Vec<u8> {
    let window: Vec<Vec<f64>> = (0..32)
        .map(|f| (0..16).map(|j| ((f * 16 + j) % 10) as f64 / 10.0).collect())
        .collect();
    let samples: Vec<_> = (0..n)
        .map(|i| json!({"id": format!("s{i}"), "frames": window, "label": label}))
        .collect();
    json!({"batch_id": batch_id, "samples": samples})
        .to_string()
        .into_bytes()
}

/// The same upload as a binary body (`swimlane_core::batch::binary_upload`): the
/// document without windows, then the windows' little-endian `f32`s.
fn binary_upload(batch_id: &str, n: usize, label: &str) -> Vec<u8> {
    let window: Vec<f32> = (0..32 * 16).map(|i| (i % 10) as f32 / 10.0).collect();
    let samples: Vec<_> = (0..n)
        .map(|i| json!({"id": format!("s{i}"), "label": label}))
        .collect();
    let document = json!({"batch_id": batch_id, "samples": samples}).to_string();
    let windows: Vec<&[f32]> = (0..n).map(|_| window.as_slice()).collect();
    swimlane_core::batch::binary_upload(document.as_bytes(), &windows)
}

fn main() {
    // upload_body: [encoding selector: 0 identity, 1 gzip] + body.
    put(
        "upload_body",
        "one-sample",
        &with_selector(0, &upload("b-1", 1, "freestyle")),
    );
    put(
        "upload_body",
        "two-samples-gzip",
        &with_selector(1, &gzip(&upload("night-2", 2, "turn"))),
    );
    put(
        "upload_body",
        "unknown-label",
        &with_selector(0, &upload("b-3", 1, "crawl")),
    );
    put(
        "upload_body",
        "binary-two-samples",
        &with_selector(0, &binary_upload("b-4", 2, "butterfly")),
    );

    // stored_records: [0 batch, 1 run, 2 model version, 3 user state, 4 token] + JSON.
    let batch = |status: BatchStatus| BatchRecord {
        v: 1,
        digest: "3f".repeat(32),
        samples: 42,
        heldout: 8,
        chunks: 2,
        staged_at_ms: 1_790_000_000_000,
        status,
        chunk_samples: 0,
    };
    put(
        "stored_records",
        "batch-staged",
        &with_selector(0, &batch(BatchStatus::Staged).encode()),
    );
    put(
        "stored_records",
        "batch-published",
        &with_selector(
            0,
            &batch(BatchStatus::Published {
                run_id: "run-ab".into(),
                version: 3,
            })
            .encode(),
        ),
    );
    put(
        "stored_records",
        "batch-rejected",
        &with_selector(
            0,
            &batch(BatchStatus::Rejected {
                run_id: None,
                reason: "no gain".into(),
            })
            .encode(),
        ),
    );
    let run = json!({"v": 1, "run_id": "run-ab", "parent_version": 2, "batches": ["b-1", "b-2"],
        "train_samples": 34, "model_blob": "run-ab-weights", "model_sha256": "aa".repeat(32),
        "model_bytes": 301_234, "created_at_ms": 1_790_000_000_000u64, "train_seconds": 1.5,
        "verdict": {"accepted": true, "reason": "gain 0.12", "candidate_heldout_accuracy": 0.95,
            "current_heldout_accuracy": 0.8, "heldout_samples": 20, "candidate_guard_accuracy": 0.9,
            "current_guard_accuracy": 0.91, "validate_seconds": 0.2},
        "published_version": 3});
    put(
        "stored_records",
        "run",
        &with_selector(1, run.to_string().as_bytes()),
    );
    let version = json!({"v": 1, "version": 3, "run_id": "run-ab", "parent_version": 2,
        "batches": ["b-1"], "model_blob": "run-ab-weights", "sha256": "aa".repeat(32),
        "size_bytes": 301_234, "heldout_accuracy": 0.95, "parent_heldout_accuracy": 0.8,
        "guard_accuracy": 0.9, "published_at_ms": 1_790_000_000_500u64,
        "onnx": {"blob": "run-ab-onnx", "sha256": "bb".repeat(32), "size_bytes": 302_000}});
    put(
        "stored_records",
        "model-version",
        &with_selector(2, version.to_string().as_bytes()),
    );
    let state = json!({"v": 1, "inflight_run": "run-cd", "head": 3, "last_version": 3,
        "head_heldout_accuracy": 0.95, "converged": false, "counted_accuracy_bucket": 7});
    put(
        "stored_records",
        "user-state",
        &with_selector(3, state.to_string().as_bytes()),
    );
    let token =
        json!({"v": 1, "user": "alice", "created_at_ms": 1_790_000_000_000u64, "revoked": false});
    put(
        "stored_records",
        "token",
        &with_selector(4, token.to_string().as_bytes()),
    );

    // sample_codecs: [0 chunk, 1 sample set] + bytes.
    let s = samples(3, 7);
    put(
        "sample_codecs",
        "chunk-2",
        &with_selector(0, &encode_chunk(&staged(&s[..2]))),
    );
    put(
        "sample_codecs",
        "set-3",
        &with_selector(1, &encode_sample_set(&staged(&s))),
    );

    // blob_header and blob_read.
    let header = |data: &[u8], chunk_size: u32, generation: u64| BlobHeader {
        chunk_size,
        chunk_count: data.len().div_ceil(chunk_size as usize) as u32,
        ..BlobHeader::for_data(data, generation)
    };
    let data = b"weights of a small model, stored in chunks under one generation".to_vec();
    put(
        "blob_header",
        "one-chunk",
        &header(&data, CHUNK_SIZE as u32, 7).encode(),
    );
    put(
        "blob_header",
        "empty",
        &header(b"", CHUNK_SIZE as u32, 9).encode(),
    );
    let mut one = header(&data, CHUNK_SIZE as u32, 7).encode();
    one.extend_from_slice(&data);
    put("blob_read", "one-chunk", &one);
    let mut three = header(&data, 24, 11).encode();
    three.extend_from_slice(&data);
    put("blob_read", "three-chunks", &three);
    // A corrupt header that agrees with itself but claims ~69 GB, with two chunks of
    // data: reading it once allocated what the header claimed (FINDINGS.md).
    let claims = BlobHeader {
        len: u32::MAX as u64 * 16,
        sha256: [0; 32],
        chunk_size: 16,
        chunk_count: u32::MAX,
        generation: 13,
        crc32: Some(0),
    };
    put("blob_header", "claims-69gb", &claims.encode());
    let mut claims_read = claims.encode();
    claims_read.extend_from_slice(&data[..24]);
    put("blob_read", "claims-69gb", &claims_read);

    // bus_event and bus_records.
    let user = UserId::new("alice").unwrap();
    let events = [
        Event::BatchStaged {
            user: user.clone(),
            batch_id: BatchId::new("b-1").unwrap(),
            samples: 40,
        },
        Event::CandidateTrained {
            user: user.clone(),
            run_id: "run-ab".into(),
            batches: vec![BatchId::new("b-1").unwrap()],
        },
        Event::CandidateAccepted {
            user: user.clone(),
            run_id: "run-ab".into(),
        },
        Event::CandidateRejected {
            user: user.clone(),
            run_id: "run-ab".into(),
            reason: "no gain".into(),
        },
        Event::ModelPublished {
            user: user.clone(),
            run_id: "run-ab".into(),
            version: 3,
        },
    ];
    for (i, e) in events.iter().enumerate() {
        put("bus_event", &format!("event-{i}"), &e.encode());
    }
    put(
        "bus_records",
        "log-record",
        &with_selector(0, &encode_log_record("alice", &events[0].encode())),
    );
    put(
        "bus_records",
        "outbox-entry",
        &with_selector(
            1,
            &encode_outbox_entry(events[1].topic(), "alice", &events[1].encode()),
        ),
    );

    // model_safetensors and model_onnx: an initialised micro model (the trained one
    // has the same layout), and a sample-set file.
    let model = MicroModel::init(
        &swimlane_core::ModelSpec::synthetic_pose(),
        &samples(24, 3),
        3,
    )
    .expect("a model");
    put("model_safetensors", "micro-model", &model.to_bytes());
    put(
        "model_safetensors",
        "sample-set-file",
        &dataset::to_bytes(&samples(2, 5)).unwrap(),
    );
    put(
        "model_onnx",
        "micro-model",
        &onnx::export(&model, &Lineage::base()).expect("exports"),
    );

    // auth_header.
    for (name, h) in [
        ("bearer", format!("Bearer swl_{}", "0a".repeat(32))),
        ("lowercase-padded", "bearer   abc.DEF-~+/==  ".to_string()),
        ("basic", "Basic dXNlcjpwYXNz".to_string()),
    ] {
        put("auth_header", name, h.as_bytes());
    }
    eprintln!("corpus written under {}/corpus", env!("CARGO_MANIFEST_DIR"));
}
