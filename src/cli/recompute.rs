//! `flag verify --recompute STAGE --pipeline FILE`: reruns the stored run of a stage on this
//! machine, from the very inputs that run read, in a scratch directory, and says per output
//! whether the bytes are identical (for Parquet: per column, with the largest numeric
//! difference). Nothing is committed; the store is only read.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use flag_core::OutputKind;
use serde::Serialize;

use crate::cache::{self, KeyParts};
use crate::pipeline::{self, Pipeline};
use crate::registry::{Registry, suggest};
use crate::scheduler;
use crate::store::diff::{TableDiff, diff_parquet};
use crate::store::{Manifest, Store, short};

#[derive(Debug, Serialize)]
pub struct OutputVerdict {
    pub output: String,
    pub identical: bool,
    /// A measurement of the run (wall-clock): compared and reported, but not part of the
    /// verdict, since no rerun reproduces a stopwatch.
    pub measured: bool,
    /// Parquet outputs: the column comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<TableDiff>,
    /// File and dir outputs: names of the files whose bytes differ (or exist on one side).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files_differing: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Recomputed {
    pub stage: String,
    pub key: String,
    /// `name old -> new` for each kernel-path entry of the key that differs from the stored run.
    pub environment_changes: Vec<String>,
    /// The same for the recorded machine facts (CPU, cores...).
    pub machine_changes: Vec<String>,
    pub outputs: Vec<OutputVerdict>,
    pub seconds: f64,
}

/// The manifest of `stage` that produced `output` with content `hash`: the pipeline's current
/// ref when it matches, else any stored run of that stage that did.
fn producer(
    store: &Store,
    pipeline: &str,
    stage: &str,
    output: &str,
    hash: &str,
    all: &mut Option<Vec<Manifest>>,
) -> anyhow::Result<Manifest> {
    let matches = |m: &Manifest| m.outputs.get(output).is_some_and(|o| o.hash == hash);
    if let Some(k) = store.get_ref(pipeline, stage)?
        && let Some(m) = store.lookup(&k)?
        && matches(&m)
    {
        return Ok(m);
    }
    if all.is_none() {
        *all = Some(store.manifests()?);
    }
    all.as_ref()
        .into_iter()
        .flatten()
        .find(|m| m.stage == stage && matches(m))
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "input {stage}.{output} ({}) of the stored run is no longer in the store \
                 (collected?); rerun the pipeline first",
                short(hash)
            )
        })
}

fn compare_output(
    store: &Store,
    stored: &Manifest,
    spec: &flag_core::OutputSpec,
    scratch: &Path,
) -> anyhow::Result<OutputVerdict> {
    let (name, kind) = (spec.name, &spec.kind);
    let rec = stored
        .outputs
        .get(name)
        .ok_or_else(|| anyhow!("the stored run has no output '{name}'"))?;
    let mut verdict = OutputVerdict {
        output: name.to_string(),
        identical: true,
        measured: spec.measured,
        table: None,
        files_differing: Vec::new(),
    };
    match kind {
        OutputKind::Parquet { .. } => {
            let new = scratch.join(format!("{name}.parquet"));
            let table = diff_parquet(&store.object_path(&rec.files[0]), &new)?;
            verdict.identical = table == TableDiff::Identical;
            verdict.table = Some(table);
        }
        OutputKind::File { ext } => {
            let new = scratch.join(format!("{name}.{ext}"));
            if crate::store::hash_file(&new)? != rec.files[0].hash {
                verdict.identical = false;
                verdict.files_differing.push(rec.files[0].name.clone());
            }
        }
        OutputKind::Dir => {
            let dir = scratch.join(name);
            let mut new: BTreeMap<String, String> = BTreeMap::new();
            let mut stack = vec![dir.clone()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d)
                    .with_context(|| format!("listing {}", d.display()))?
                    .flatten()
                {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else {
                        let rel = p.strip_prefix(&dir)?.to_string_lossy().to_string();
                        new.insert(rel, crate::store::hash_file(&p)?);
                    }
                }
            }
            let old: BTreeMap<String, String> = rec
                .files
                .iter()
                .map(|f| (f.name.clone(), f.hash.clone()))
                .collect();
            for n in old
                .keys()
                .chain(new.keys().filter(|k| !old.contains_key(*k)))
            {
                if old.get(n) != new.get(n) {
                    verdict.files_differing.push(n.clone());
                }
            }
            verdict.identical = verdict.files_differing.is_empty();
        }
    }
    Ok(verdict)
}

/// Recomputes the stored run of `stage_name` and compares.
pub fn recompute(p: &Pipeline, store: &Store, stage_name: &str) -> anyhow::Result<Recomputed> {
    let started = std::time::Instant::now();
    let st = p.stage(stage_name).ok_or_else(|| {
        anyhow!(
            "no stage '{stage_name}' in {}{}",
            p.file.display(),
            suggest(stage_name, p.stages.iter().map(|s| s.name.as_str()))
        )
    })?;
    let key = store.get_ref(&p.name, stage_name)?.ok_or_else(|| {
        anyhow!(
            "stage '{stage_name}' has not run in pipeline '{}' (store {}): nothing to recompute",
            p.name,
            store.root.display()
        )
    })?;
    let stored = store.lookup(&key)?.ok_or_else(|| {
        anyhow!(
            "the latest run of '{stage_name}' ({}) is no longer in the store",
            short(&key)
        )
    })?;
    let old: KeyParts = serde_json::from_value(stored.parts.clone())
        .context("the stored run was recorded by an older store format")?;

    // The upstream runs whose outputs the stored run read.
    let mut upstream: BTreeMap<String, Manifest> = BTreeMap::new();
    let mut all = None;
    for (input, refs) in &old.inputs {
        for (reference, hash) in refs {
            let (up, output) = reference
                .split_once('.')
                .ok_or_else(|| anyhow!("input {input}: malformed reference '{reference}'"))?;
            if upstream
                .get(up)
                .is_some_and(|m| m.outputs.get(output).is_some_and(|o| &o.hash == hash))
            {
                continue;
            }
            let m = producer(store, &p.name, up, output, hash, &mut all)?;
            upstream.insert(up.to_string(), m);
        }
    }
    for r in st.inputs.values().flatten() {
        if !upstream.contains_key(&r.stage) {
            bail!(
                "the pipeline binds {r} to stage '{stage_name}', which its stored run did not \
                 read; rerun the pipeline first"
            );
        }
    }
    let (hashes, artifacts) = scheduler::bind_inputs(st, store, &upstream);
    let (parts, resources) = cache::key_parts(st, &p.root, hashes)?;
    let mut same_env = parts.clone();
    same_env.env = old.env.clone();
    let why = cache::explain(&old, &same_env);
    if !why.is_empty() {
        bail!(
            "stage '{stage_name}' of {} no longer matches its stored run ({}): {}; run the \
             pipeline first, then recompute",
            p.file.display(),
            short(&key),
            why.join("; ")
        );
    }
    let environment_changes = cache::diff_maps(&old.env, &parts.env);
    // Machine facts beyond the keyed ones (and not the flag version, which the key covers).
    let machine_changes = cache::diff_maps(&stored.compute, &cache::recorded_compute(st))
        .into_iter()
        .filter(|c| {
            let name = c.split(' ').next().unwrap_or("");
            name != "flag" && !parts.env.contains_key(name)
        })
        .collect();

    let scratch = store.staging_dir(&format!("recompute-{key}"))?;
    let header = format!(
        "recompute of stage {} ({}) stored key {key}\ncompute: {}",
        st.name,
        st.kind,
        serde_json::to_string(&cache::recorded_compute(st)).unwrap_or_default()
    );
    let log = scratch.join("recompute.log");
    let log = std::fs::File::create(&log).ok().map(|_| log);
    let result = scheduler::run_into(
        st,
        &artifacts,
        &resources,
        &scratch,
        log.as_deref(),
        None,
        &header,
        &parts.env,
        &crate::worker::Executor::Local,
    );
    let outputs = result.map_err(anyhow::Error::from).and_then(|_queued| {
        st.imp
            .spec()
            .outputs
            .iter()
            .map(|o| compare_output(store, &stored, o, &scratch))
            .collect::<anyhow::Result<Vec<_>>>()
    });
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Recomputed {
        stage: stage_name.to_string(),
        key,
        environment_changes,
        machine_changes,
        outputs: outputs?,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl Recomputed {
    /// Every output that is a function of the key is byte-identical.
    pub fn reproduced(&self) -> bool {
        self.outputs.iter().all(|o| o.measured || o.identical)
    }
}

fn print(r: &Recomputed) {
    println!(
        "recomputed stage '{}' (stored run {}) in {:.2}s",
        r.stage,
        short(&r.key),
        r.seconds
    );
    if r.environment_changes.is_empty() {
        println!("  kernel path: the stored run's");
    } else {
        println!(
            "  kernel path differs from the stored run: {}",
            r.environment_changes.join(", ")
        );
    }
    if !r.machine_changes.is_empty() {
        println!("  machine differs: {}", r.machine_changes.join(", "));
    }
    for o in &r.outputs {
        if o.measured {
            println!(
                "  {}: measured (wall-clock), not compared{}",
                o.output,
                if o.identical {
                    "; identical anyway"
                } else {
                    ""
                }
            );
            continue;
        }
        match (&o.table, o.identical) {
            (_, true) => println!("  {}: identical", o.output),
            (Some(TableDiff::SameValues), _) => println!(
                "  {}: DIFFERENT bytes, identical values in every column",
                o.output
            ),
            (Some(TableDiff::Schema { stored, recomputed }), _) => println!(
                "  {}: DIFFERENT columns: stored [{stored}], recomputed [{recomputed}]",
                o.output
            ),
            (Some(TableDiff::Rows { stored, recomputed }), _) => println!(
                "  {}: DIFFERENT row counts: stored {stored}, recomputed {recomputed}",
                o.output
            ),
            (Some(TableDiff::Columns { columns }), _) => {
                println!("  {}: DIFFERENT", o.output);
                for c in columns.iter().filter(|c| !c.identical()) {
                    println!("    {}", c.describe());
                }
                let same: Vec<&str> = columns
                    .iter()
                    .filter(|c| c.identical())
                    .map(|c| c.column.as_str())
                    .collect();
                if !same.is_empty() {
                    println!("    identical columns: {}", same.join(", "));
                }
            }
            (_, false) => println!(
                "  {}: DIFFERENT files: {}",
                o.output,
                o.files_differing.join(", ")
            ),
        }
    }
    let compared = r.outputs.iter().filter(|o| !o.measured).count();
    let same = r
        .outputs
        .iter()
        .filter(|o| !o.measured && o.identical)
        .count();
    println!(
        "{}: {same} of {compared} outputs byte-identical{}",
        if r.reproduced() {
            "reproduced"
        } else {
            "NOT reproduced"
        },
        match r.outputs.len() - compared {
            0 => String::new(),
            n => format!(
                " ({n} measured output{} not compared)",
                if n == 1 { "" } else { "s" }
            ),
        }
    );
}

/// The `verify --recompute` entry point: exit 0 when every output is byte-identical, 1 when
/// one differs.
pub fn run(
    stage: &str,
    pipeline_file: &Path,
    overrides: &[String],
    json: bool,
    cli_store: &Option<PathBuf>,
    cli_root: &Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let registry = Registry::builtin();
    let p = pipeline::load(pipeline_file, cli_root.as_deref(), overrides, &registry)?;
    let store = super::open_store(cli_store, &p.root, false)?;
    // Held like a run: a concurrent gc must not drop the objects the recompute reads.
    let _lock = store.lock(true, |h| eprintln!("waiting for another flag run ({h})"))?;
    let r = recompute(&p, &store, stage)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print(&r);
    }
    Ok(if r.reproduced() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
