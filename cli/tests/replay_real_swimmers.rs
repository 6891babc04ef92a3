//! A short replay of real swimmers (../shared/data/swim-imu, not shipped with the
//! project) through the real pipeline: ingest's HTTP API, the trainers, the validator's
//! gate and the publisher. Asserts the no-regression property: no swimmer's final
//! model is more than 0.02 below its base model on the never-uploaded final test.
//! Skips, saying why, when the data folder is absent.
use std::path::PathBuf;

use swimlane_cli::replay::{run, ReplayOptions};

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_replay_of_real_swimmers_leaves_no_swimmer_below_its_base() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/swim-imu");
    if !swimlane_cli::replay::data_present(&data) {
        eprintln!(
            "SKIPPED: {} is absent (the real swimmers' recordings are read at run time, never shipped)",
            data.display()
        );
        return;
    }
    let report = run(ReplayOptions {
        data,
        swimmers: Some(4),
        progress: false,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(report.swimmers.len(), 4, "{report:#?}");
    for s in &report.swimmers {
        assert!(s.uploads > 0 && s.test_windows > 0, "{s:?}");
        assert_eq!(s.session_accuracy.len(), s.uploads);
        assert!(
            s.final_accuracy >= s.base_accuracy - 0.02,
            "{} ended below its base: {:.3} < {:.3}",
            s.swimmer,
            s.final_accuracy,
            s.base_accuracy
        );
    }
    assert_eq!(report.swimlane.below_base, 0);
    // The plot is a PNG.
    let png = swimlane_cli::plot::session_accuracy_png_bytes(&report);
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}
