//! `flag status PIPELINE`: each stage's state and why, without running anything.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::pipeline;
use crate::registry::Registry;
use crate::scheduler::{self, Progress, RunOptions};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Pipeline file (YAML)
    pub pipeline: PathBuf,
    /// Override a param: KEY=VALUE or STAGE.PARAM=VALUE
    #[arg(long = "set", value_name = "K=V")]
    pub set: Vec<String>,
    /// One JSON record per stage
    #[arg(long)]
    pub json: bool,
}

pub fn run(
    args: StatusArgs,
    cli_store: &Option<PathBuf>,
    cli_root: &Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let registry = Registry::builtin();
    let p = pipeline::load(&args.pipeline, cli_root.as_deref(), &args.set, &registry)?;
    let store = super::open_store(cli_store, &p.root, true)?;
    let progress = Progress::new(false);
    for r in scheduler::plan(&p, &store, &RunOptions::default())? {
        super::run::print_report(&r, args.json, &progress);
    }
    Ok(ExitCode::SUCCESS)
}
