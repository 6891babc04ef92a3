// The checks of the fuzz target `upload_body` (fuzz/fuzz_targets/upload_body.rs says what it
// feeds and what it checks). Included by that target and by the corpus replay in
// the workspace's tests (cli/tests/fuzz_corpus.rs): plain comments, no inner
// attributes, so `include!` takes it anywhere.
use std::collections::HashSet;

use swimlane_core::batch::{BatchLimits, MAX_SAMPLE_ID_LEN};
use swimlane_core::records::{decode_chunk, encode_chunk, is_heldout, samples_per_chunk};
use swimlane_core::{ModelSpec, UserId};
use swimlane_ingest::stage::{decode_and_validate, Encoding};

const MAX_BODY: u64 = 1 << 20;
const LIMITS: BatchLimits = BatchLimits { max_samples: 100 };

pub fn check(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let encoding = if selector & 1 == 1 {
        Encoding::Gzip
    } else {
        Encoding::Identity
    };
    let user = UserId::new("fuzz-user").expect("a valid user id");
    let spec = ModelSpec::synthetic_pose();
    match decode_and_validate(&user, body, encoding, MAX_BODY, LIMITS, &spec) {
        Err(e) => {
            assert!(e.status.is_client_error(), "{} {}", e.status, e.code);
            assert!(!e.code.is_empty() && !e.message.is_empty());
        }
        Ok(b) => {
            assert!(!b.samples.is_empty() && b.samples.len() <= LIMITS.max_samples);
            let prefix = swimlane_core::batch::DIGEST_BLAKE3;
            assert!(b.digest.starts_with(prefix) && b.digest.len() == prefix.len() + 64);
            let mut ids = HashSet::new();
            for s in &b.samples {
                assert!(!s.id.is_empty() && s.id.len() <= MAX_SAMPLE_ID_LEN);
                assert!(ids.insert(s.id.as_str()), "duplicate id {:?}", s.id);
                assert_eq!(s.frames.len(), spec.window_values());
                assert!(s.frames.iter().all(|v| v.is_finite()));
                assert_eq!(
                    s.heldout,
                    is_heldout(user.as_str(), b.batch_id.as_str(), &s.id)
                );
            }
            for chunk in b.samples.chunks(samples_per_chunk(spec.window_values())) {
                let bytes = encode_chunk(chunk);
                assert!(bytes.len() < 100_000);
                assert_eq!(
                    decode_chunk(&bytes).expect("an encoded chunk decodes"),
                    chunk
                );
            }
        }
    }
}
