//! The trainer worker: its flags and config, then train until signalled.
swimlane_runtime::worker_binary!(
    Trainer,
    "Fine-tunes candidates from staged corrections (consumer group `trainers`).",
    swimlane_trainer::run_process
);
