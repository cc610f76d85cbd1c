//! Cache keys: blake3 over a canonical encoding of everything that determines a stage's
//! outputs, and the explanation of why a key differs from the previous run's.
//!
//! Canonical encoding = serde_json of [`KeyParts`] (maps are BTreeMaps, so sorted; no
//! whitespace). Inputs enter by the *content hash* of the upstream outputs, so an upstream
//! rerun that produces identical bytes leaves downstream keys unchanged (early cutoff).
use std::collections::BTreeMap;
use std::path::Path;

use flag_core::numerics::{self, Numerics};
use flag_core::{OutputKind, ParamKind, SchemaRegistry};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::pipeline::PipelineStage;
use crate::store::{STORE_FORMAT, hash_file, short};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyParts {
    pub format: u32,
    pub kind: String,
    /// Stage implementation version (crate version + stage revision).
    pub version: String,
    /// Root-relative path of each SQL/prompt/template file -> blake3 of its bytes.
    pub resources: BTreeMap<String, String>,
    /// Resolved params. Path params are replaced by "<contents>": their files are in `external`.
    pub params: BTreeMap<String, Value>,
    /// (file name, blake3) of each external file the stage reads, in the stage's order.
    pub external: Vec<(String, String)>,
    /// Input -> (upstream `stage.output`, content hash) for each binding.
    pub inputs: BTreeMap<String, Vec<(String, String)>>,
    /// Output -> blake3 of its schema file (a schema change changes what is written).
    pub schemas: BTreeMap<String, String>,
    /// Result-relevant environment (device kind, model file hash...).
    pub env: BTreeMap<String, String>,
}

impl KeyParts {
    pub fn key(&self) -> String {
        let mut canonical = self.clone();
        for v in canonical.params.values_mut() {
            *v = sorted_keys(v);
        }
        let bytes = serde_json::to_vec(&canonical).expect("key parts serialise");
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// `v` with every object's keys in sorted order. serde_json keeps insertion order once any
/// crate in the build enables its `preserve_order` feature (llguidance does), so a param's
/// nested map must be sorted here for its key not to depend on how the YAML spelled it.
pub fn sorted_keys(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted_keys(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted_keys).collect()),
        other => other.clone(),
    }
}

/// Hash of a file, or of a directory tree (sorted relative names and file hashes).
fn tree_hash(path: &Path) -> Result<String> {
    if path.is_file() {
        return hash_file(path);
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d)
            .map_err(|e| EngineError::io(format!("reading {}", d.display()), e))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in files {
        h.update(f.strip_prefix(path).unwrap().to_string_lossy().as_bytes());
        h.update(hash_file(&f)?.as_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Computes a stage's key parts. `inputs` are the upstream outputs' content hashes.
/// Returns the parts and the bytes of the resource files (handed to the stage as read).
pub fn key_parts(
    stage: &PipelineStage,
    root: &Path,
    inputs: BTreeMap<String, Vec<(String, String)>>,
) -> Result<(KeyParts, BTreeMap<String, Vec<u8>>)> {
    let fp = stage.imp.fingerprint(&stage.params);
    let mut resources = BTreeMap::new();
    let mut resource_bytes = BTreeMap::new();
    for rel in &fp.files {
        let p = root.join(rel);
        let bytes = std::fs::read(&p).map_err(|e| {
            EngineError::io(
                format!(
                    "stage '{}': reading resource file {} (project root {})",
                    stage.name,
                    rel,
                    root.display()
                ),
                e,
            )
        })?;
        resources.insert(rel.clone(), blake3::hash(&bytes).to_hex().to_string());
        resource_bytes.insert(rel.clone(), bytes);
    }

    let external_files =
        stage
            .imp
            .external_files(&stage.params)
            .map_err(|e| EngineError::Stage {
                stage: stage.name.clone(),
                kind: stage.kind.clone(),
                source: Box::new(e),
            })?;
    let mut external = Vec::new();
    for f in &external_files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        external.push((name, hash_file(f).map_err(|e| annotate(stage, e))?));
    }
    let spec = stage.imp.spec();
    let mut params = BTreeMap::new();
    for (k, v) in &stage.params.0 {
        let is_path = spec
            .params
            .iter()
            .any(|p| p.name == k && p.kind == ParamKind::Path);
        let v = match (is_path, v.as_str()) {
            // The same data at another path is the same input; a stage that lists its files
            // in external_files covers the contents, otherwise hash the whole path.
            (true, Some(_)) if !external_files.is_empty() => Value::String("<contents>".into()),
            (true, Some(p)) if Path::new(p).exists() => Value::String(format!(
                "<contents {}>",
                tree_hash(Path::new(p)).map_err(|e| annotate(stage, e))?
            )),
            _ => v.clone(),
        };
        params.insert(k.clone(), v);
    }
    let mut schemas = BTreeMap::new();
    for o in &spec.outputs {
        if let OutputKind::Parquet { schema } = o.kind {
            let s = SchemaRegistry::global()
                .get(schema)
                .map_err(|e| EngineError::Stage {
                    stage: stage.name.clone(),
                    kind: stage.kind.clone(),
                    source: Box::new(e),
                })?;
            schemas.insert(
                o.name.to_string(),
                blake3::hash(s.source.as_bytes()).to_hex().to_string(),
            );
        }
    }
    let env = keyed_environment(stage);
    Ok((
        KeyParts {
            format: STORE_FORMAT,
            kind: stage.kind.clone(),
            version: fp.version,
            resources,
            params,
            external,
            inputs,
            schemas,
            env,
        },
        resource_bytes,
    ))
}

/// The libtorch this binary is linked against (read from torch/version.py at build time).
pub const LIBTORCH_VERSION: &str = env!("FLAG_LIBTORCH_VERSION");

/// The environment part of a stage's key: what the stage reports (device, threads...) and,
/// for a [`Numerics::KernelPath`] stage, this process's kernel path (libtorch version, ATen
/// CPU dispatch level, MKL path; the GPU model on CUDA).
pub fn keyed_environment(stage: &PipelineStage) -> BTreeMap<String, String> {
    environment_of(stage.imp.as_ref(), &stage.params)
}

/// [`keyed_environment`] of a stage kind with these params, as this process sees the machine
/// (the worker recomputes it to check it computes on what the key says).
pub fn environment_of(
    imp: &dyn flag_core::Stage,
    params: &flag_core::Params,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = imp.environment(params).into_iter().collect();
    if imp.numerics(params) == Numerics::KernelPath {
        env.extend(numerics::kernel_path(LIBTORCH_VERSION));
        if env.get("device").is_some_and(|d| d.starts_with("cuda")) {
            env.insert(
                "gpu".into(),
                numerics::gpu_models().unwrap_or_else(|| "unknown".into()),
            );
        }
    }
    env
}

/// What a manifest records about the machine that ran the stage, whatever its numerics.
pub fn recorded_compute(stage: &PipelineStage) -> BTreeMap<String, String> {
    let mut m = numerics::machine();
    m.extend(numerics::kernel_path(LIBTORCH_VERSION));
    m.extend(stage.imp.environment(&stage.params));
    m.insert(
        "numerics".into(),
        stage.imp.numerics(&stage.params).label().into(),
    );
    m.insert("flag".into(), env!("CARGO_PKG_VERSION").into());
    m
}

fn annotate(stage: &PipelineStage, e: EngineError) -> EngineError {
    match e {
        EngineError::Io { context, source } => EngineError::Io {
            context: format!("stage '{}': {context}", stage.name),
            source,
        },
        other => other,
    }
}

fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..57])
    } else {
        s
    }
}

/// Human reasons why `new` differs from `old` (the previous run of the same stage).
pub fn explain(old: &KeyParts, new: &KeyParts) -> Vec<String> {
    let mut why = Vec::new();
    if old.format != new.format {
        why.push(format!("store format {} -> {}", old.format, new.format));
    }
    if old.kind != new.kind {
        why.push(format!("stage kind {} -> {}", old.kind, new.kind));
    }
    if old.version != new.version {
        why.push(format!("implementation {} -> {}", old.version, new.version));
    }
    for (k, h) in &new.resources {
        match old.resources.get(k) {
            None => why.push(format!("new file {k}")),
            Some(o) if o != h => why.push(format!("{k} changed")),
            _ => {}
        }
    }
    for k in old
        .resources
        .keys()
        .filter(|k| !new.resources.contains_key(*k))
    {
        why.push(format!("no longer uses {k}"));
    }
    for (k, v) in &new.params {
        match old.params.get(k) {
            None => why.push(format!("param {k} = {}", show(v))),
            Some(o) if o != v => why.push(format!("param {k}: {} -> {}", show(o), show(v))),
            _ => {}
        }
    }
    for k in old.params.keys().filter(|k| !new.params.contains_key(*k)) {
        why.push(format!("param {k} removed"));
    }
    if old.external != new.external {
        let changed: Vec<&str> = new
            .external
            .iter()
            .filter(|n| !old.external.contains(n))
            .map(|(n, _)| n.as_str())
            .collect();
        if changed.is_empty() {
            why.push("set of data files changed".into());
        } else {
            why.push(format!("data file(s) changed: {}", changed.join(", ")));
        }
    }
    for (k, refs) in &new.inputs {
        let old_refs = old.inputs.get(k).cloned().unwrap_or_default();
        if old_refs != *refs {
            let desc: Vec<String> = refs
                .iter()
                .filter(|r| !old_refs.contains(r))
                .map(|(r, h)| match old_refs.iter().find(|(or, _)| or == r) {
                    Some((_, oh)) => format!("{r} {} -> {}", short(oh), short(h)),
                    None => format!("{r} (newly bound)"),
                })
                .collect();
            why.push(format!(
                "input {k} changed: {}",
                if desc.is_empty() {
                    "bindings removed".into()
                } else {
                    desc.join(", ")
                }
            ));
        }
    }
    if old.schemas != new.schemas {
        why.push("output schema changed".into());
    }
    if old.env != new.env {
        why.push(format!(
            "compute environment changed: {}",
            diff_maps(&old.env, &new.env).join(", ")
        ));
    }
    why
}

/// `name old -> new` for each entry that differs (`(none)` where one side lacks it).
pub fn diff_maps(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<String> {
    let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    names
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| {
            let side =
                |m: &BTreeMap<String, String>| m.get(k).cloned().unwrap_or_else(|| "(none)".into());
            format!("{k} {} -> {}", side(old), side(new))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(param: &str) -> KeyParts {
        KeyParts {
            format: 1,
            kind: "k".into(),
            version: "1".into(),
            resources: BTreeMap::new(),
            params: [("p".to_string(), serde_json::from_str(param).unwrap())]
                .into_iter()
                .collect(),
            external: Vec::new(),
            inputs: BTreeMap::new(),
            schemas: BTreeMap::new(),
            env: BTreeMap::new(),
        }
    }

    /// Regression: with serde_json's preserve_order on (llguidance enables it), a nested map
    /// param keyed differently by the order its keys were written in.
    #[test]
    fn key_ignores_the_order_of_nested_map_keys() {
        let a = parts(r#"{"b": 1, "a": {"y": [1, {"d": 0, "c": 1}], "x": 2}}"#);
        let b = parts(r#"{"a": {"x": 2, "y": [1, {"c": 1, "d": 0}]}, "b": 1}"#);
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), parts(r#"{"a": 1, "b": 1}"#).key());
        // Array order is content, not spelling.
        assert_ne!(parts("[1, 2]").key(), parts("[2, 1]").key());
    }
}
