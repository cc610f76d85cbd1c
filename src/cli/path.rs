//! `flag path STAGE.OUTPUT`: where the artifact's file(s) are, for duckdb / pandas.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Args, Debug)]
pub struct PathArgs {
    /// The artifact, as STAGE.OUTPUT
    pub output: String,
    /// The pipeline (file, or name of one run in this store) whose latest run to use
    /// [default: the last pipeline run in this store]
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
}

pub fn run(
    args: PathArgs,
    cli_store: &Option<PathBuf>,
    cli_root: &Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let (store, rec) = super::latest_output(cli_store, cli_root, &args.pipeline, &args.output)?;
    // On object storage, the object's URL (duckdb and pandas read s3:// with the same AWS_*
    // environment).
    for f in &rec.files {
        println!("{}", store.object_location(f));
    }
    Ok(ExitCode::SUCCESS)
}
