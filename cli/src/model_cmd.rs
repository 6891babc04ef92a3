//! `swimlane model ...` (filled in by the micro-model work).
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum ModelCommand {}

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {}
}
