//! `flag verify`: re-hash every stored object; corrupted ones are reported and dropped
//! (with the manifests that trusted them) so the next run recomputes them.
//! `flag verify --recompute STAGE --pipeline FILE`: rerun a stored stage here and compare its
//! bytes (see `recompute`).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Only report; do not drop corrupted objects
    #[arg(long)]
    pub report_only: bool,
    /// Rerun this stage's stored run here, in a scratch area, and report per output whether
    /// the bytes are identical (Parquet: per column, with the largest numeric difference).
    /// Exit 1 when an output differs.
    #[arg(long, value_name = "STAGE", requires = "pipeline")]
    pub recompute: Option<String>,
    /// The pipeline file of --recompute
    #[arg(long, value_name = "FILE")]
    pub pipeline: Option<PathBuf>,
    /// Override a param of --pipeline: KEY=VALUE or STAGE.PARAM=VALUE (as given to `run`)
    #[arg(long = "set", value_name = "K=V", requires = "recompute")]
    pub set: Vec<String>,
    /// --recompute's result as JSON
    #[arg(long, requires = "recompute")]
    pub json: bool,
}

pub fn run(
    args: VerifyArgs,
    cli_store: &Option<PathBuf>,
    cli_root: &Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    if let (Some(stage), Some(file)) = (&args.recompute, &args.pipeline) {
        return super::recompute::run(stage, file, &args.set, args.json, cli_store, cli_root);
    }
    let store = super::existing_store(cli_store, cli_root)?;
    let _lock = store.lock(true, |h| eprintln!("waiting for another flag run ({h})"))?;
    let manifests = store.manifests()?;
    let (mut files, mut bad_runs) = (0usize, 0usize);
    for m in &manifests {
        files += m.outputs.values().map(|o| o.files.len()).sum::<usize>();
        let bad = store.verify(m)?;
        if bad.is_empty() {
            continue;
        }
        bad_runs += 1;
        for c in &bad {
            println!(
                "CORRUPT {}.{}: {c}",
                m.stage,
                m.outputs
                    .iter()
                    .find(|(_, o)| o.files.iter().any(|f| store.object_path(f) == c.path))
                    .map(|(n, _)| n.as_str())
                    .unwrap_or("?")
            );
        }
        if !args.report_only {
            store.invalidate(m, &bad)?;
            println!(
                "        dropped run {} of stage '{}': it will be recomputed",
                crate::store::short(&m.key),
                m.stage
            );
        }
    }
    println!(
        "verified {} runs, {files} files: {}",
        manifests.len(),
        if bad_runs == 0 {
            "all intact".to_string()
        } else {
            format!("{bad_runs} runs with corrupted objects")
        }
    );
    Ok(if bad_runs == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
