//! The validator worker: its flags and config, then validate until signalled.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    swimlane_runtime::worker_main(
        swimlane_runtime::Worker::Validator,
        "Scores candidates on held-out data and the guard set (consumer group `validators`).",
        swimlane_validator::run_process,
    )?;
    Ok(())
}
