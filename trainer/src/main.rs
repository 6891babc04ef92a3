//! The trainer worker: its flags and config, then train until signalled.
// Training allocates a tensor per op; mimalloc avoids glibc's page-fault storm (5x).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    swimlane_runtime::worker_main(
        swimlane_runtime::Worker::Trainer,
        "Fine-tunes candidates from staged corrections (consumer group `trainers`).",
        swimlane_trainer::run_process,
    )?;
    Ok(())
}
