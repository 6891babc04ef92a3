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
    // Live accuracy, session by session, as the swimmer saw it: at the end no swimmer's
    // is below what the base model would have given on the same windows.
    for s in &report.swimmers {
        assert_eq!(s.session_base_accuracy.len(), s.uploads);
        println!(
            "{}: live per session {:?} (base {:?}); end {:.3} vs base {:.3}; {} rollbacks",
            s.swimmer,
            s.session_accuracy,
            s.session_base_accuracy,
            s.live_end,
            s.live_end_base,
            s.rollbacks
        );
    }
    assert_eq!(report.live_below_base, 0, "{report:#?}");
    assert_eq!(report.live_significantly_below_base, 0, "{report:#?}");
    // What the device fixed and broke against the base model adds up to its live
    // accuracy: right = right by the base - broken + fixed.
    let ((fixed, base_wrong), (broken, base_right)) = (report.live_fixed, report.live_broken);
    assert!(fixed <= base_wrong && broken <= base_right && base_wrong + base_right > 0);
    let windows = (base_wrong + base_right) as f64;
    assert!((report.live_accuracy_base - base_right as f64 / windows).abs() < 1e-9);
    assert!(
        (report.live_accuracy - (base_right + fixed - broken) as f64 / windows).abs() < 1e-9,
        "{report:#?}"
    );
    // The plot is a PNG.
    let png = swimlane_cli::plot::session_accuracy_png_bytes(&report);
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}
