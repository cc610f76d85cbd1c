//! `flag verify` and `flag gc` on a store on object storage: the same checks and the same
//! rules as on a folder (see verify.rs, gc.rs), over the bucket's listing. Objects are hashed
//! as they stream from the bucket. The local copy is a cache and is only kept consistent
//! (a dropped run's local manifest goes too).
use std::collections::BTreeSet;
use std::process::ExitCode;

use crate::store::remote::{Remote, SMALL_MAX};
use crate::store::{
    ManifestRead, Store, check_manifest, is_hex, is_object_name, log_key, short, sync,
};

/// How old (seconds) an object no manifest names must be before gc removes it: well past a
/// lease term plus the longest request (`FLAG_S3_TIMEOUT_SECS`, 300 s by default).
const GC_GRACE_SECS: i64 = 900;

/// `manifests/<ab>/<key>.json` -> (dir, file name) when named the way the store names them.
fn manifest_name(rel: &str) -> Option<(&str, &str)> {
    let rest = rel.strip_prefix("manifests/")?;
    let (dir, file) = rest.split_once('/')?;
    let key = file.strip_suffix(".json")?;
    (is_hex(dir, 2) && is_hex(key, 64) && key.starts_with(dir)).then_some((dir, file))
}

/// Drops a run's manifest from the bucket and from the local copy.
fn drop_run(store: &Store, r: &Remote, rel: &str, report_only: bool) -> anyhow::Result<()> {
    if report_only {
        return Ok(());
    }
    store.ensure_lease()?;
    r.delete(rel)?;
    let local = store.root.join(rel);
    if local.is_file() {
        std::fs::remove_file(&local)?;
    }
    println!(
        "        dropped {}: its stage will be recomputed",
        r.url_of(rel)
    );
    Ok(())
}

pub fn verify(store: &Store, r: &Remote, report_only: bool) -> anyhow::Result<ExitCode> {
    let (mut runs, mut files, mut bad_runs, mut damaged) = (0usize, 0usize, 0usize, 0usize);
    for (rel, size) in r.list("manifests/")? {
        let Some((dir, file)) = manifest_name(&rel) else {
            println!(
                "DAMAGED {}: not a manifest (the store names them manifests/<ab>/<key>.json); \
                 left alone",
                r.url_of(&rel)
            );
            damaged += 1;
            continue;
        };
        runs += 1;
        let read = if size > SMALL_MAX {
            ManifestRead::Damaged {
                manifest: None,
                problems: vec![format!("{size} bytes: no manifest is that large")],
            }
        } else {
            match r.get_small(&rel)? {
                Some(f) => check_manifest(&f.bytes, dir, file),
                None => continue, // removed since the listing
            }
        };
        let m = match read {
            ManifestRead::Ok(m) => m,
            ManifestRead::Damaged { manifest, problems } => {
                damaged += 1;
                let what = manifest
                    .as_ref()
                    .map(|m| format!(" (stage '{}' of '{}')", m.stage, m.pipeline))
                    .unwrap_or_default();
                for p in &problems {
                    println!("DAMAGED {}{what}: {p}", r.url_of(&rel));
                }
                drop_run(store, r, &rel, report_only)?;
                continue;
            }
        };
        let mut bad = Vec::new();
        for (name, out) in &m.outputs {
            for f in &out.files {
                files += 1;
                let obj = sync::object_rel(f);
                match r.hash(&obj)? {
                    None => bad.push((name, obj, "missing".to_string())),
                    Some(h) if h != f.hash => bad.push((
                        name,
                        obj,
                        format!(
                            "corrupted (content hash {}, expected {})",
                            short(&h),
                            short(&f.hash)
                        ),
                    )),
                    Some(_) => {}
                }
            }
        }
        if !bad.is_empty() {
            bad_runs += 1;
            for (name, obj, what) in &bad {
                println!(
                    "CORRUPT {}.{name}: {} is {what} (manifest {})",
                    m.stage,
                    r.url_of(obj),
                    r.url_of(&rel)
                );
            }
            if !report_only {
                for (_, obj, what) in &bad {
                    if what != "missing" {
                        store.ensure_lease()?;
                        r.delete(obj)?;
                    }
                }
                drop_run(store, r, &rel, false)?;
            }
            continue;
        }
        // Intact objects, but are they this run's tables? Read their footers from the local
        // copy (pulled, hash-checked, if it lacks them).
        store.pull_objects(r, &m)?;
        let problems = store.check_objects(&m);
        if !problems.is_empty() {
            damaged += 1;
            for p in &problems {
                println!(
                    "DAMAGED {} (stage '{}' of '{}'): {p}",
                    r.url_of(&rel),
                    m.stage,
                    m.pipeline
                );
            }
            drop_run(store, r, &rel, report_only)?;
        }
    }
    Ok(super::verify::verdict(
        runs,
        files,
        bad_runs,
        damaged,
        &format!(" in {}", store.location()),
    ))
}

pub fn gc(store: &Store, r: &Remote, prune: bool, dry_run: bool) -> anyhow::Result<ExitCode> {
    let live_keys: BTreeSet<String> = store.refs()?.into_iter().map(|(_, _, k)| k).collect();
    let (mut keep, mut keep_keys) = (BTreeSet::new(), BTreeSet::new());
    let (mut runs, mut objects, mut bytes, mut logs, mut foreign) = (0usize, 0usize, 0u64, 0, 0);
    let mut unreadable = Vec::new();
    for (rel, size) in r.list("manifests/")? {
        let Some((dir, file)) = manifest_name(&rel) else {
            foreign += 1;
            continue;
        };
        let read = if size > SMALL_MAX {
            ManifestRead::Damaged {
                manifest: None,
                problems: vec![],
            }
        } else {
            match r.get_small(&rel)? {
                Some(f) => check_manifest(&f.bytes, dir, file),
                None => continue,
            }
        };
        let m = match read {
            ManifestRead::Ok(m) => m,
            ManifestRead::Damaged {
                manifest: Some(m), ..
            } => m,
            ManifestRead::Damaged { manifest: None, .. } => {
                keep_keys.insert(file.trim_end_matches(".json").to_string());
                unreadable.push(rel);
                continue;
            }
        };
        if prune && !live_keys.contains(&m.key) {
            runs += 1;
            if !dry_run {
                drop_run(store, r, &rel, false)?;
            }
            continue;
        }
        keep_keys.insert(m.key.clone());
        for f in m.outputs.values().flat_map(|o| &o.files) {
            if is_hex(&f.hash, 64) {
                // As the listing names it (object_store escapes some characters).
                keep.insert(r.listed_name(&sync::object_rel(f)));
            }
        }
    }
    // An object no manifest names yet may be a commit in flight of a coordinator whose lease
    // lapsed mid-upload; only objects older than the grace period are removed.
    let grace = std::env::var("FLAG_S3_GC_GRACE_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(GC_GRACE_SECS);
    let mut young = 0usize;
    for (rel, size, age) in r.list_meta("objects/")? {
        let named = rel
            .strip_prefix("objects/")
            .and_then(|x| x.split_once('/'))
            .is_some_and(|(dir, file)| !file.contains('/') && is_object_name(dir, file));
        if !named {
            foreign += 1;
            continue;
        }
        if !keep.contains(&rel) && unreadable.is_empty() {
            if age < grace {
                young += 1;
                continue;
            }
            objects += 1;
            bytes += size;
            if !dry_run {
                store.ensure_lease()?;
                r.delete(&rel)?;
            }
        }
    }
    for (rel, _) in r.list("logs/")? {
        let Some(key) = rel.strip_prefix("logs/").and_then(log_key) else {
            foreign += 1;
            continue;
        };
        if !keep_keys.contains(key) {
            logs += 1;
            if !dry_run {
                store.ensure_lease()?;
                r.delete(&rel)?;
            }
        }
    }
    println!(
        "{}{runs} runs, {objects} objects ({:.1} MB), {logs} logs in {}",
        if dry_run { "would remove " } else { "removed " },
        bytes as f64 / 1e6,
        store.location()
    );
    if !unreadable.is_empty() {
        eprintln!(
            "removed no objects: {} manifests do not parse, so what they name is unknown \
             ({}{}); `flag verify` reports and drops them",
            unreadable.len(),
            r.url_of(&unreadable[0]),
            if unreadable.len() > 1 { ", ..." } else { "" }
        );
    }
    if young > 0 {
        eprintln!(
            "kept {young} objects no run names yet: written less than {grace} s ago, they may \
             belong to a commit in flight (FLAG_S3_GC_GRACE_SECS)"
        );
    }
    if foreign > 0 {
        eprintln!(
            "left {foreign} objects under {} alone: the store did not name them",
            store.location()
        );
    }
    Ok(if unreadable.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
