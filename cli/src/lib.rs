//! The `swimlane` command's library: the in-process fleet, deployment set-up and the
//! demo, shared by the binary and the integration tests.
pub mod audit;
pub mod bench_pipeline;
pub mod chaos;
pub mod client;
pub mod demo;
pub mod fleet;
pub mod init;
pub mod plot;
pub mod procfleet;
pub mod recording;
pub mod replay;
pub mod upload;
