//! Runs a validated pipeline against the store: computes keys in dependency order, reuses
//! verified cached outputs, runs stale stages (independent ones concurrently) on blocking
//! threads, commits their outputs atomically, and reports each stage with the reason.
mod execute;
mod progress;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;
use tokio::task::JoinSet;

use crate::error::Result;
use crate::pipeline::Pipeline;
use crate::store::{Manifest, Store};

pub use execute::{Outcome, bind_inputs, plan_stage, run_into};
pub use progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ran,
    Cached,
    Failed,
    Skipped,
    /// Dry run / status: would run.
    Stale,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ran => "ran",
            Status::Cached => "cached",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::Stale => "stale",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputInfo {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    pub hash: String,
}

/// One line of `flag run` / `--json` record.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: String,
    pub status: Status,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub seconds: f64,
    pub outputs: BTreeMap<String, OutputInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub only: Vec<String>,
    pub from: Option<String>,
    pub force: bool,
    pub jobs: usize,
    /// Where stages run (local child processes, or Slurm batch jobs).
    pub executor: crate::worker::Executor,
}

/// Which stages a run considers, and which of them `--force` applies to.
pub fn select(p: &Pipeline, opts: &RunOptions) -> Result<(BTreeSet<usize>, BTreeSet<usize>)> {
    let check = |name: &str| {
        p.stage(name).map(|_| ()).ok_or_else(|| {
            crate::error::EngineError::Usage(format!(
                "no stage '{name}' in {}{}",
                p.file.display(),
                crate::registry::suggest(name, p.stages.iter().map(|s| s.name.as_str()))
            ))
        })
    };
    let index = |name: &str| p.stages.iter().position(|s| s.name == name).unwrap();
    let mut targets: BTreeSet<usize> = BTreeSet::new();
    for o in &opts.only {
        check(o)?;
        targets.insert(index(o));
    }
    if let Some(f) = &opts.from {
        check(f)?;
        targets.insert(index(f));
        targets.extend(p.downstream(f));
    }
    if targets.is_empty() {
        targets = (0..p.stages.len()).collect();
    }
    let mut selected = targets.clone();
    for &t in &targets {
        selected.extend(p.upstream(&p.stages[t].name));
    }
    let forced = if opts.force { targets } else { BTreeSet::new() };
    Ok((selected, forced))
}

/// Runs the pipeline; `report` is called as each stage finishes.
pub async fn run(
    pipeline: Arc<Pipeline>,
    store: Arc<Store>,
    opts: RunOptions,
    progress: Arc<Progress>,
    mut report: impl FnMut(&StageReport),
) -> Result<Vec<StageReport>> {
    let (selected, forced) = select(&pipeline, &opts)?;
    let jobs = opts.jobs.max(1);
    let mut results: BTreeMap<String, (StageReport, Option<Manifest>)> = BTreeMap::new();
    let mut started: BTreeSet<usize> = BTreeSet::new();
    let mut running: JoinSet<(usize, Outcome)> = JoinSet::new();
    progress.set_total(selected.len() as u64);

    loop {
        // Start every stage whose inputs are settled, up to the job limit.
        for (i, st) in pipeline.stages.iter().enumerate() {
            if !selected.contains(&i) || started.contains(&i) || running.len() >= jobs {
                continue;
            }
            let deps: Vec<&str> = st
                .inputs
                .values()
                .flatten()
                .map(|r| r.stage.as_str())
                .collect();
            if !deps.iter().all(|d| results.contains_key(*d)) {
                continue;
            }
            started.insert(i);
            if let Some(bad) = deps.iter().find(|d| results[**d].1.is_none()) {
                let r = StageReport {
                    stage: st.name.clone(),
                    status: Status::Skipped,
                    reason: format!("upstream stage '{bad}' did not complete"),
                    key: None,
                    seconds: 0.0,
                    outputs: BTreeMap::new(),
                    error: None,
                    log: None,
                };
                progress.finish_stage(&r);
                report(&r);
                results.insert(st.name.clone(), (r, None));
                continue;
            }
            let upstream: BTreeMap<String, Manifest> = deps
                .iter()
                .map(|d| (d.to_string(), results[*d].1.clone().unwrap()))
                .collect();
            let (p, s, pr) = (pipeline.clone(), store.clone(), progress.clone());
            let force = forced.contains(&i);
            let executor = opts.executor.clone();
            running.spawn_blocking(move || {
                (
                    i,
                    execute::execute(&p, i, &s, &upstream, force, &pr, &executor),
                )
            });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (i, outcome) = joined.expect("stage task panicked outside the stage");
        let r = outcome.report;
        progress.finish_stage(&r);
        report(&r);
        results.insert(pipeline.stages[i].name.clone(), (r, outcome.manifest));
    }
    Ok(pipeline
        .stages
        .iter()
        .filter_map(|s| results.remove(&s.name).map(|(r, _)| r))
        .collect())
}

/// Dry run / status: what would run and why, without running anything.
pub fn plan(pipeline: &Pipeline, store: &Store, opts: &RunOptions) -> Result<Vec<StageReport>> {
    let (selected, forced) = select(pipeline, opts)?;
    let mut known: BTreeMap<String, Option<Manifest>> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, st) in pipeline.stages.iter().enumerate() {
        if !selected.contains(&i) {
            continue;
        }
        let (report, manifest) = plan_stage(pipeline, i, store, &known, forced.contains(&i))?;
        known.insert(st.name.clone(), manifest);
        out.push(report);
    }
    Ok(out)
}
