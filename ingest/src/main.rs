//! The ingest worker: its flags and config, then serve until signalled.
fn main() -> anyhow::Result<()> {
    swimlane_runtime::worker_main(
        swimlane_runtime::Worker::Ingest,
        "swimlane's device-facing upload API.",
        swimlane_ingest::run_process,
    )?;
    Ok(())
}
