//! The publisher worker: its flags and config, then serve and publish until signalled.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    swimlane_runtime::worker_main(
        swimlane_runtime::Worker::Publisher,
        "Versions accepted candidates and serves models to devices (consumer group `publishers`).",
        swimlane_publisher::run,
    )?;
    Ok(())
}
