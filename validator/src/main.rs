//! The validator worker: its flags and config, then validate until signalled.
swimlane_runtime::worker_binary!(
    Validator,
    "Scores candidates on held-out data and the guard set (consumer group `validators`).",
    swimlane_validator::run_process
);
