//! Every fuzz target's seed corpus (`fuzz/corpus/<target>/`) and every reproducer kept in
//! `fuzz/artifacts/<target>/` replayed through the target's own checks
//! (`fuzz/checks/<target>.rs`, the same file the libFuzzer target includes), in the
//! workspace's ordinary test build: no sanitizer, no nightly toolchain, nothing to
//! install. A seed that panics here is a regression in a decoder.
//!
//! The fuzzing itself (coverage-guided, AddressSanitizer) is `fuzz/run.sh SECONDS`
//! (fuzz/README.md); it is not part of `.ci/run`, whose budget its sanitizer build
//! would take a quarter of.
use std::path::{Path, PathBuf};

mod auth_header {
    include!("../../fuzz/checks/auth_header.rs");
}
mod blob_header {
    include!("../../fuzz/checks/blob_header.rs");
}
mod blob_read {
    include!("../../fuzz/checks/blob_read.rs");
}
mod bus_event {
    include!("../../fuzz/checks/bus_event.rs");
}
mod bus_records {
    include!("../../fuzz/checks/bus_records.rs");
}
mod model_onnx {
    include!("../../fuzz/checks/model_onnx.rs");
}
mod model_safetensors {
    include!("../../fuzz/checks/model_safetensors.rs");
}
mod sample_codecs {
    include!("../../fuzz/checks/sample_codecs.rs");
}
mod stored_records {
    include!("../../fuzz/checks/stored_records.rs");
}
mod upload_body {
    include!("../../fuzz/checks/upload_body.rs");
}

/// Every target, with its checks. `every_fuzz_target_is_replayed` keeps this list equal
/// to the targets `fuzz/Cargo.toml` declares.
const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("auth_header", auth_header::check),
    ("blob_header", blob_header::check),
    ("blob_read", blob_read::check),
    ("bus_event", bus_event::check),
    ("bus_records", bus_records::check),
    ("model_onnx", model_onnx::check),
    ("model_safetensors", model_safetensors::check),
    ("sample_codecs", sample_codecs::check),
    ("stored_records", stored_records::check),
    ("upload_body", upload_body::check),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted (none when it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str) -> usize {
    let (_, check) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no checks for target {target}"));
    replay_with(target, *check)
}

/// Feeds every seed and kept reproducer of `target` to `check`; panics naming the first
/// input that fails. Returns how many inputs were fed.
fn replay_with(target: &str, check: fn(&[u8])) -> usize {
    let seeds = inputs(&fuzz_dir().join("corpus").join(target));
    assert!(
        !seeds.is_empty(),
        "fuzz/corpus/{target} has no seeds: make_corpus writes them (fuzz/README.md)"
    );
    let kept = inputs(&fuzz_dir().join("artifacts").join(target));
    for path in seeds.iter().chain(&kept) {
        let bytes = std::fs::read(path).expect("a readable input");
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(
            outcome.is_ok(),
            "{target}: {} fails its checks (replay it under the fuzzer: \
             cd fuzz && cargo +nightly fuzz run {target} {})",
            path.display(),
            path.display()
        );
    }
    seeds.len() + kept.len()
}

#[test]
fn every_fuzz_target_is_replayed() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let mut declared: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("path = \"fuzz_targets/"))
        .filter_map(|l| l.strip_suffix(".rs\""))
        .collect();
    declared.sort_unstable();
    let mut replayed: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    replayed.sort_unstable();
    assert_eq!(
        declared, replayed,
        "fuzz/Cargo.toml's targets and this file's list differ"
    );
}

#[test]
#[should_panic(expected = "fails its checks")]
fn a_seed_that_fails_its_checks_fails_the_replay() {
    // The replay must not swallow a failing check: the same seeds through a check that
    // rejects everything are reported.
    replay_with("bus_event", |_| panic!("made to fail"));
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let n = replay(stringify!($name));
            eprintln!("{}: {n} inputs replayed", stringify!($name));
        }
    )*};
}
replay_tests!(
    auth_header,
    blob_header,
    blob_read,
    bus_event,
    bus_records,
    model_onnx,
    model_safetensors,
    sample_codecs,
    stored_records,
    upload_body,
);
