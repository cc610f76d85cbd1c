//! One stage: key, cache lookup with verification, run in a staging dir, atomic commit.
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use flag_core::InputArtifact;

use super::progress::Progress;
use super::{OutputInfo, StageReport, Status};
use crate::cache::{self, KeyParts};
use crate::error::{EngineError, Result};
use crate::pipeline::{Pipeline, PipelineStage};
use crate::store::{Manifest, Store};
use crate::worker::{self, StageJob};

pub struct Outcome {
    pub report: StageReport,
    /// The committed (or verified cached) manifest; None when the stage did not complete.
    pub manifest: Option<Manifest>,
}

/// Upstream bindings of a stage: (input -> [(ref, hash)]) for the key, and the artifacts.
pub type Bound = (
    BTreeMap<String, Vec<(String, String)>>,
    BTreeMap<String, Vec<InputArtifact>>,
);

pub fn bind_inputs(
    st: &PipelineStage,
    store: &Store,
    upstream: &BTreeMap<String, Manifest>,
) -> Bound {
    let spec = st.imp.spec();
    let mut hashes = BTreeMap::new();
    let mut arts = BTreeMap::new();
    for (iname, refs) in &st.inputs {
        let schema = spec
            .inputs
            .iter()
            .find(|i| i.name == iname)
            .and_then(|i| i.schema);
        let mut hs = Vec::new();
        let mut as_ = Vec::new();
        for r in refs {
            let rec = &upstream[&r.stage].outputs[&r.output];
            hs.push((r.to_string(), rec.hash.clone()));
            as_.push(InputArtifact {
                reference: r.to_string(),
                files: rec.files.iter().map(|f| store.object_path(f)).collect(),
                schema,
            });
        }
        hashes.insert(iname.clone(), hs);
        arts.insert(iname.clone(), as_);
    }
    (hashes, arts)
}

fn output_infos(m: &Manifest, st: &PipelineStage, store: &Store) -> BTreeMap<String, OutputInfo> {
    m.outputs
        .iter()
        .map(|(name, rec)| {
            let path = if rec.kind == "dir" {
                store.root.join("out").join(&st.publish[name])
            } else {
                store.object_path(&rec.files[0])
            };
            (
                name.clone(),
                OutputInfo {
                    path: path.to_string_lossy().to_string(),
                    rows: rec.rows,
                    hash: rec.hash.clone(),
                },
            )
        })
        .collect()
}

/// Why the stage must run, compared with the latest run of it in this pipeline.
fn why_stale(
    p: &Pipeline,
    st: &PipelineStage,
    store: &Store,
    parts: &KeyParts,
    key: &str,
) -> String {
    let Some(prev_key) = store.get_ref(&p.name, &st.name).ok().flatten() else {
        return "new: no earlier run of this stage".into();
    };
    if prev_key == key {
        return "no complete run with this key (interrupted or collected)".into();
    }
    match store.peek(&prev_key) {
        Some(prev) => match serde_json::from_value::<KeyParts>(prev.parts.clone()) {
            Ok(old) => {
                let why = cache::explain(&old, parts);
                if why.is_empty() {
                    "key changed".into()
                } else {
                    why.join("; ")
                }
            }
            Err(_) => "previous run recorded by an older format".into(),
        },
        None => "previous run no longer in the store".into(),
    }
}

fn cached_reason(p: &Pipeline, st: &PipelineStage, store: &Store, key: &str) -> String {
    match store.get_ref(&p.name, &st.name).ok().flatten() {
        Some(k) if k == key => "up to date".into(),
        Some(_) => "cache hit: identical inputs to an earlier run".into(),
        None => "cache hit: computed earlier with identical inputs".into(),
    }
}

fn report(st: &PipelineStage, status: Status, reason: String, key: Option<String>) -> StageReport {
    StageReport {
        stage: st.name.clone(),
        status,
        reason,
        key,
        seconds: 0.0,
        outputs: BTreeMap::new(),
        error: None,
        log: None,
    }
}

/// Dry-run view of one stage. `known`: upstream manifests (None = upstream would run).
pub fn plan_stage(
    p: &Pipeline,
    i: usize,
    store: &Store,
    known: &BTreeMap<String, Option<Manifest>>,
    force: bool,
) -> Result<(StageReport, Option<Manifest>)> {
    let st = &p.stages[i];
    let mut upstream = BTreeMap::new();
    for r in st.inputs.values().flatten() {
        match known.get(&r.stage) {
            Some(Some(m)) => {
                upstream.insert(r.stage.clone(), m.clone());
            }
            _ => {
                return Ok((
                    report(
                        st,
                        Status::Stale,
                        format!("upstream stage '{}' will run", r.stage),
                        None,
                    ),
                    None,
                ));
            }
        }
    }
    let (hashes, _) = bind_inputs(st, store, &upstream);
    let (parts, _) = cache::key_parts(st, &p.root, hashes)?;
    let key = parts.key();
    if force {
        return Ok((
            report(st, Status::Stale, "forced (--force)".into(), Some(key)),
            None,
        ));
    }
    match store.lookup(&key)? {
        Some(m)
            if m.outputs
                .values()
                .flat_map(|o| &o.files)
                .all(|f| store.object_path(f).exists()) =>
        {
            let mut r = report(
                st,
                Status::Cached,
                cached_reason(p, st, store, &key),
                Some(key),
            );
            r.outputs = output_infos(&m, st, store);
            Ok((r, Some(m)))
        }
        _ => {
            let why = why_stale(p, st, store, &parts, &key);
            Ok((report(st, Status::Stale, why, Some(key)), None))
        }
    }
}

/// Runs (or reuses) one stage. Never panics: failures come back as a Failed report.
pub fn execute(
    p: &Pipeline,
    i: usize,
    store: &Store,
    upstream: &BTreeMap<String, Manifest>,
    force: bool,
    progress: &Arc<Progress>,
    executor: &worker::Executor,
) -> Outcome {
    let st = &p.stages[i];
    let started = Instant::now();
    let failed = |reason: String, err: &EngineError, key: Option<String>, log: Option<String>| {
        let mut r = report(st, Status::Failed, reason, key);
        r.error = Some(err.to_string());
        r.log = log;
        r.seconds = started.elapsed().as_secs_f64();
        Outcome {
            report: r,
            manifest: None,
        }
    };
    let (hashes, artifacts) = bind_inputs(st, store, upstream);
    let (parts, resources) = match cache::key_parts(st, &p.root, hashes) {
        Ok(x) => x,
        Err(e) => return failed("could not compute the cache key".into(), &e, None, None),
    };
    let key = parts.key();

    let mut reason = if force {
        Some("forced (--force)".to_string())
    } else {
        None
    };
    if !force {
        match store.lookup(&key) {
            Ok(Some(m)) => match store.verify(&m) {
                Ok(bad) if bad.is_empty() => {
                    if let Err(e) = store
                        .set_ref(&p.name, &st.name, &key)
                        .and_then(|_| store.publish(&m, &st.publish))
                    {
                        return failed(
                            "could not record the cached result".into(),
                            &e,
                            Some(key),
                            None,
                        );
                    }
                    let mut r = report(
                        st,
                        Status::Cached,
                        cached_reason(p, st, store, &key),
                        Some(key),
                    );
                    r.outputs = output_infos(&m, st, store);
                    r.seconds = started.elapsed().as_secs_f64();
                    return Outcome {
                        report: r,
                        manifest: Some(m),
                    };
                }
                Ok(bad) => {
                    let details: Vec<String> = bad.iter().map(|c| c.to_string()).collect();
                    progress.warn(&format!(
                        "stage '{}': stored output failed verification, recomputing: {}",
                        st.name,
                        details.join("; ")
                    ));
                    if let Err(e) = store.invalidate(&m, &bad) {
                        return failed(
                            "could not remove a corrupted object".into(),
                            &e,
                            Some(key),
                            None,
                        );
                    }
                    reason = Some(format!(
                        "cached output corrupted ({}); recomputed",
                        details.join("; ")
                    ));
                }
                Err(e) => {
                    return failed(
                        "could not verify the cached outputs".into(),
                        &e,
                        Some(key),
                        None,
                    );
                }
            },
            Ok(None) => {}
            Err(e) => return failed("could not read the store".into(), &e, Some(key), None),
        }
    }
    let reason = reason.unwrap_or_else(|| why_stale(p, st, store, &parts, &key));

    // Run into a staging directory, in a worker process.
    let log_rel = format!("logs/{key}.log");
    let staging = match store.staging_dir(&key) {
        Ok(s) => s,
        Err(e) => return failed(reason, &e, Some(key), None),
    };
    let log_path = store.new_run_log(&staging);
    let spec = st.imp.spec();
    let bar = progress.stage_bar(&st.name);
    let bar2 = bar.clone();
    let header = format!(
        "stage {} ({}) key {key}\nreason: {reason}\ncompute: {}",
        st.name,
        st.kind,
        serde_json::to_string(&cache::recorded_compute(st)).unwrap_or_default()
    );
    let stage_result = run_into(
        st,
        &artifacts,
        &resources,
        &staging,
        log_path.as_deref(),
        Some(Arc::new(move |done, total, msg: &str| {
            bar2.update(done, total, msg)
        })),
        &header,
        &parts.env,
        executor,
    );
    bar.done();
    let queued = match stage_result {
        Ok(q) => q,
        Err(e) => {
            let kept = store.keep_run_log(&staging, &key, true);
            let _ = fs::remove_dir_all(&staging);
            return failed(
                reason,
                &e,
                Some(key),
                Some(kept.to_string_lossy().to_string()),
            );
        }
    };
    // The stage's own time: not the wait for CPUs held by other stages of the run.
    let seconds = started.elapsed().saturating_sub(queued).as_secs_f64();
    if let Some(log) = &log_path {
        worker::append(log, &format!("finished in {seconds:.3}s"));
    }
    // Before the manifest names it.
    store.keep_run_log(&staging, &key, false);

    // Commit: objects first, manifest last.
    let commit = || -> Result<Manifest> {
        let mut outputs = BTreeMap::new();
        for o in &spec.outputs {
            outputs.insert(
                o.name.to_string(),
                store.commit_output(&staging, o.name, &o.kind)?,
            );
        }
        let m = Manifest {
            format: crate::store::STORE_FORMAT,
            key: key.clone(),
            pipeline: p.name.clone(),
            stage: st.name.clone(),
            kind: st.kind.clone(),
            parts: serde_json::to_value(&parts).expect("parts serialise"),
            outputs,
            seconds,
            created: chrono::Utc::now().to_rfc3339(),
            log: log_rel.clone(),
            compute: cache::recorded_compute(st),
        };
        store.write_manifest(&m)?;
        store.set_ref(&p.name, &st.name, &key)?;
        store.publish(&m, &st.publish)?;
        Ok(m)
    };
    let result = commit();
    let _ = fs::remove_dir_all(&staging);
    match result {
        Ok(m) => {
            let mut r = report(st, Status::Ran, reason, Some(key));
            r.outputs = output_infos(&m, st, store);
            r.seconds = seconds;
            r.log = Some(store.root.join(&log_rel).to_string_lossy().to_string());
            Outcome {
                report: r,
                manifest: Some(m),
            }
        }
        Err(e) => failed(
            reason,
            &e,
            Some(key),
            Some(store.root.join(&log_rel).to_string_lossy().to_string()),
        ),
    }
}

/// Runs one stage into `dir` (its staging directory) in a `flag-worker` process, which logs
/// the header and params and reports a panic or crash as a stage error. `env` is the keyed
/// environment the worker must compute on; `executor` says where the worker runs. Shared by
/// `flag run` and `flag verify --recompute`.
#[allow(clippy::too_many_arguments)]
pub fn run_into(
    st: &PipelineStage,
    artifacts: &BTreeMap<String, Vec<InputArtifact>>,
    resources: &BTreeMap<String, Vec<u8>>,
    dir: &Path,
    log: Option<&Path>,
    progress: Option<flag_core::ProgressFn>,
    header: &str,
    env: &BTreeMap<String, String>,
    executor: &worker::Executor,
) -> Result<std::time::Duration> {
    let job = StageJob::new(st, artifacts, resources, dir, log, header, env);
    worker::run(st, &job, progress, executor)
}
