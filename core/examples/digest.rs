//! Times what ingest and every stage's readers do per upload with the bytes of 250
//! windows (512 kB), as bench/README.md ("Session sixteen") reports it:
//!
//! - the batch digest: [`batch::digest`] (BLAKE3 of the canonical encoding, built in one
//!   buffer and hashed whole) against [`batch::digest_sha256`] (what records staged
//!   before carry) and against BLAKE3 fed the encoding a piece at a time, as SHA-256 is;
//! - [`batch::f32s_from_le`] on a model's 296 kB against zeroing a vector and copying
//!   the bytes over it (what it did before).
//!
//! ```sh
//! cargo run --release -p swimlane-core --example digest
//! ```
//! Each figure is the median of 5 rounds of 200 calls.
use std::hint::black_box;
use std::time::Instant;

use swimlane_core::batch::{self, digest, digest_sha256, f32s_from_le};
use swimlane_core::records::StagedSample;
use swimlane_core::{BatchId, ClassId};

fn median_us(mut f: impl FnMut()) -> f64 {
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..200 {
                f();
            }
            t.elapsed().as_secs_f64() / 200.0 * 1e6
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

fn main() {
    let id = BatchId::new("night-1").expect("a batch id");
    // 250 windows of 512 values (the synthetic pose spec's 32 frames x 16), seeded.
    let mut x: u32 = 0x5eed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x as f32 / u32::MAX as f32) * 4.0 - 2.0
    };
    let samples: Vec<StagedSample> = (0..250)
        .map(|i| StagedSample {
            id: format!("w{i}"),
            frames: (0..512).map(|_| next()).collect(),
            label: ClassId((i % 6) as u8),
            heldout: i % 5 == 0,
            feedback: None,
        })
        .collect();
    let blake3_whole = median_us(|| {
        black_box(digest(black_box(&id), black_box(&samples)));
    });
    let sha256 = median_us(|| {
        black_box(digest_sha256(black_box(&id), black_box(&samples)));
    });
    let blake3_pieces = median_us(|| {
        let mut h = blake3::Hasher::new();
        batch::canonical_encoding(&id, &samples, |b| {
            h.update(b);
        });
        black_box(h.finalize());
    });
    println!(
        "batch digest, 250 windows (512 kB): BLAKE3 whole {blake3_whole:.0} µs, \
         SHA-256 {sha256:.0} µs, BLAKE3 a piece at a time {blake3_pieces:.0} µs"
    );

    let model: Vec<u8> = (0..296_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let one_pass = median_us(|| {
        black_box(f32s_from_le(black_box(&model)));
    });
    let zero_then_copy = median_us(|| {
        let bytes = black_box(&model);
        let n = bytes.len() / 4;
        let mut v = vec![0f32; n];
        bytemuck::cast_slice_mut::<f32, u8>(&mut v).copy_from_slice(&bytes[..n * 4]);
        black_box(v);
    });
    println!(
        "f32s from 296 kB: one pass {one_pass:.1} µs, zeroed then copied over {zero_then_copy:.1} µs"
    );
}
