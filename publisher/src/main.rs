//! The publisher worker: its flags and config, then serve and publish until signalled.
swimlane_runtime::worker_binary!(
    Publisher,
    "Versions accepted candidates and serves models to devices (consumer group `publishers`).",
    swimlane_publisher::run_process
);
