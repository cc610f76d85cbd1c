//! `flag verify`: re-hash every stored object; corrupted ones are reported and dropped
//! (with the manifests that trusted them) so the next run recomputes them.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Only report; do not drop corrupted objects
    #[arg(long)]
    pub report_only: bool,
}

pub fn run(
    args: VerifyArgs,
    cli_store: &Option<PathBuf>,
    cli_root: &Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
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
