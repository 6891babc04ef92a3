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

/// A command's options as its flags' defaults give them: one home for each default (the
/// flag's attribute), whether the options come from the command line or from code.
pub(crate) fn defaults_of_args<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"));
    let matches = command
        .try_get_matches_from(["defaults"])
        .expect("every flag of an options struct has a default or is optional");
    T::from_arg_matches(&matches).expect("the defaults parse as the options")
}
