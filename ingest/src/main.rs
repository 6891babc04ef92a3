//! The ingest worker: its flags and config, then serve until signalled.
swimlane_runtime::worker_binary!(
    Ingest,
    "swimlane's device-facing upload API.",
    swimlane_ingest::run_process
);
