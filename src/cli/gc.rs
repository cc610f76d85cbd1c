//! `flag gc`: remove what no manifest needs (objects left by killed runs, staging dirs);
//! with --prune also runs that no pipeline's latest state refers to, and the logs of failed
//! runs.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::store::{ManifestRead, is_object_name, log_key};

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Also drop runs that are not the latest of any stage in any pipeline
    #[arg(long)]
    pub prune: bool,
    /// Print what would be removed
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(
    args: GcArgs,
    cli_store: &Option<PathBuf>,
    cli_root: &Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let store = super::existing_store(cli_store, cli_root)?;
    let _lock = store.lock(true, |h| eprintln!("waiting for another flag run ({h})"))?;
    if let Some(r) = store.remote() {
        return super::remote_ops::gc(&store, r, args.prune, args.dry_run);
    }
    let tmp = if args.dry_run { 0 } else { store.clean_tmp()? };
    let temps = store.clean_write_temps(args.dry_run)?;
    let live_keys: BTreeSet<String> = store.refs()?.into_iter().map(|(_, _, k)| k).collect();
    let mut keep = BTreeSet::new();
    let mut keep_keys = BTreeSet::new();
    let (mut runs, mut objects, mut bytes) = (0usize, 0usize, 0u64);
    // A manifest that does not parse may name any object: while there is one, no object is
    // removed (`flag verify` reports and drops it).
    let mut unreadable = Vec::new();
    for (path, ours) in store.manifest_files()? {
        if !ours {
            continue;
        }
        let m = match store.read_manifest(&path)? {
            ManifestRead::Ok(m) => m,
            // Parsed but inconsistent: its objects stay until verify drops it.
            ManifestRead::Damaged {
                manifest: Some(m), ..
            } => m,
            ManifestRead::Damaged { manifest: None, .. } => {
                // Its log is named by the key in its file name.
                if let Some(k) = path.file_stem() {
                    keep_keys.insert(k.to_string_lossy().to_string());
                }
                unreadable.push(path);
                continue;
            }
        };
        if args.prune && !live_keys.contains(&m.key) {
            runs += 1;
            if !args.dry_run {
                store.drop_manifest(&path)?;
            }
            continue;
        }
        keep_keys.insert(m.key.clone());
        for o in m.outputs.values() {
            for f in &o.files {
                // A damaged manifest's hash may be any text: only a content hash names an
                // object (and only such names are ever deleted).
                if crate::store::is_hex(&f.hash, 64) {
                    keep.insert(store.object_path(f));
                }
            }
        }
    }
    // Only files named the way the store names its own are ever removed; anything else is
    // left where it is and counted.
    let mut foreign = 0usize;
    for sub in std::fs::read_dir(store.root.join("objects"))?.flatten() {
        if !sub.path().is_dir() {
            foreign += 1;
            continue;
        }
        let dir = sub.file_name().to_string_lossy().to_string();
        for f in std::fs::read_dir(sub.path())?.flatten() {
            let p = f.path();
            if !p.is_file() || !is_object_name(&dir, &f.file_name().to_string_lossy()) {
                foreign += 1;
                continue;
            }
            if !keep.contains(&p) && unreadable.is_empty() {
                objects += 1;
                bytes += f.metadata().map(|m| m.len()).unwrap_or(0);
                if !args.dry_run {
                    std::fs::remove_file(&p)?;
                }
            }
        }
    }
    // A log no kept manifest names is a failed run's (or a dropped run's): what the user
    // reads to find out why, so only --prune removes it.
    let (mut logs, mut failure_logs) = (0, 0);
    for f in std::fs::read_dir(store.root.join("logs"))?.flatten() {
        let name = f.file_name().to_string_lossy().to_string();
        let key = match log_key(&name) {
            Some(k) if f.path().is_file() => k,
            _ => {
                foreign += 1;
                continue;
            }
        };
        if !keep_keys.contains(key) {
            if !args.prune {
                failure_logs += 1;
                continue;
            }
            logs += 1;
            if !args.dry_run {
                std::fs::remove_file(f.path())?;
            }
        }
    }
    println!(
        "{}{runs} runs, {objects} objects ({:.1} MB), {logs} logs, {tmp} staging dirs, \
         {temps} temp files",
        if args.dry_run {
            "would remove "
        } else {
            "removed "
        },
        bytes as f64 / 1e6
    );
    if failure_logs > 0 {
        eprintln!(
            "kept {failure_logs} logs of failed or dropped runs under {} (--prune removes them)",
            store.root.join("logs").display()
        );
    }
    if !unreadable.is_empty() {
        eprintln!(
            "removed no objects: {} manifests do not parse, so what they name is unknown \
             ({}{}); `flag verify` reports and drops them",
            unreadable.len(),
            unreadable[0].display(),
            if unreadable.len() > 1 { ", ..." } else { "" }
        );
    }
    if foreign > 0 {
        eprintln!(
            "left {foreign} files under {} and {} alone: the store did not name them",
            store.root.join("objects").display(),
            store.root.join("logs").display()
        );
    }
    Ok(if unreadable.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
