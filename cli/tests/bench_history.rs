//! `swimlane bench pipeline --history N`: every swimmer uploads N earlier batches, each
//! round settled, before the measured one; the report's figures are the measured
//! batches' alone.
use std::process::Command;

#[test]
fn a_bench_with_history_counts_the_measured_batches_runs_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_swimlane"))
        .args([
            "bench",
            "pipeline",
            "--trainers",
            "1",
            "--users",
            "3",
            "--paced",
            "1",
            "--corrections",
            "90",
            "--history",
            "1",
            "--json",
            "--dir",
        ])
        .arg(dir.path())
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["history"], 1);
    let run = &r["runs"][0];
    let count = |k: &str| run[k].as_u64().unwrap();
    assert_eq!(count("batches"), 3);
    assert_eq!(
        count("published") + count("rejected") + count("deferred"),
        3,
        "every measured batch settled: {run}"
    );
    assert_eq!(count("paced_batches"), 1);
    // Each of the three burst swimmers had a run in the earlier round too; only the
    // runs over the measured batches are counted.
    let runs = count("burst_model_runs");
    assert!(runs >= 1, "{run}");
    assert_eq!(
        runs,
        count("published") + count("rejected"),
        "runs of the earlier round counted: {run}"
    );
}

/// What `swimlane bench pipeline ARGS` writes to stderr, once it has failed.
fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_swimlane"))
        .args(["bench", "pipeline"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_history_longer_than_the_bench_allows_is_refused() {
    let err = refused(&["--users", "1", "--history", "11"]);
    assert!(err.contains("--history must be at most 10"), "{err}");
}

#[test]
fn a_history_with_the_peer_is_refused() {
    let err = refused(&[
        "--users",
        "1",
        "--history",
        "1",
        "--peer",
        "/nonexistent/python",
    ]);
    assert!(err.contains("cannot be combined with --history"), "{err}");
}
