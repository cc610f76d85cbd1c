//! `flag verify`: check every manifest and re-hash every stored object. A manifest that does
//! not parse, was edited after it was written, is stored under another key, or names objects
//! that are not its outputs' tables is reported as DAMAGED (with its path) and dropped;
//! corrupted objects are reported and dropped with the manifests that trusted them. Either
//! way the next run recomputes the stage, and verify exits 1.
//! `flag verify --recompute STAGE --pipeline FILE`: rerun a stored stage here and compare its
//! bytes (see `recompute`).
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::store::{ManifestRead, Store};

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
    if let Some(r) = store.remote() {
        return super::remote_ops::verify(&store, r, args.report_only);
    }
    let (mut runs, mut files, mut bad_runs, mut damaged) = (0usize, 0usize, 0usize, 0usize);
    for (path, ours) in store.manifest_files()? {
        if !ours {
            // Never removed: the store did not name it.
            println!(
                "DAMAGED {}: not a manifest (the store names them manifests/<ab>/<key>.json); \
                 left alone",
                path.display()
            );
            damaged += 1;
            continue;
        }
        runs += 1;
        let m = match store.read_manifest(&path)? {
            ManifestRead::Ok(m) => m,
            ManifestRead::Damaged {
                manifest,
                mut problems,
            } => {
                damaged += 1;
                // What it names, too (say, another run's table).
                if let Some(m) = &manifest {
                    problems.extend(store.check_objects(m));
                }
                let what = manifest
                    .as_ref()
                    .map(|m| format!(" (stage '{}' of '{}')", m.stage, m.pipeline))
                    .unwrap_or_default();
                for p in &problems {
                    println!("DAMAGED {}{what}: {p}", path.display());
                }
                drop_manifest(&store, &path, args.report_only)?;
                continue;
            }
        };
        files += m.outputs.values().map(|o| o.files.len()).sum::<usize>();
        let bad = store.verify(&m)?;
        if !bad.is_empty() {
            bad_runs += 1;
            for c in &bad {
                println!(
                    "CORRUPT {}.{}: {c} (manifest {})",
                    m.stage,
                    m.outputs
                        .iter()
                        .find(|(_, o)| o.files.iter().any(|f| store.object_path(f) == c.path))
                        .map(|(n, _)| n.as_str())
                        .unwrap_or("?"),
                    path.display()
                );
            }
            if !args.report_only {
                store.invalidate(&m, &bad)?;
                println!(
                    "        dropped run {} of stage '{}': it will be recomputed",
                    crate::store::short(&m.key),
                    m.stage
                );
            }
            continue;
        }
        // Intact objects, but are they this run's? (A manifest pointed at another object.)
        let problems = store.check_objects(&m);
        if !problems.is_empty() {
            damaged += 1;
            for p in &problems {
                println!(
                    "DAMAGED {} (stage '{}' of '{}'): {p}",
                    path.display(),
                    m.stage,
                    m.pipeline
                );
            }
            // The objects are intact (another run may own them): only the manifest goes.
            drop_manifest(&store, &path, args.report_only)?;
        }
    }
    Ok(verdict(runs, files, bad_runs, damaged, ""))
}

/// Prints verify's last line and gives its exit status (`place`: " in <where>" or nothing).
pub(super) fn verdict(
    runs: usize,
    files: usize,
    bad_runs: usize,
    damaged: usize,
    place: &str,
) -> ExitCode {
    let mut verdict = Vec::new();
    if bad_runs > 0 {
        verdict.push(format!("{bad_runs} runs with corrupted objects"));
    }
    if damaged > 0 {
        verdict.push(format!("{damaged} damaged manifests"));
    }
    println!(
        "verified {runs} runs, {files} files{place}: {}",
        if verdict.is_empty() {
            "all intact".to_string()
        } else {
            verdict.join(", ")
        }
    );
    if verdict.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn drop_manifest(store: &Store, path: &Path, report_only: bool) -> anyhow::Result<()> {
    if !report_only {
        store.drop_manifest(path)?;
        println!(
            "        dropped {}: its stage will be recomputed",
            path.display()
        );
    }
    Ok(())
}
