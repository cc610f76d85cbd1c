//! Validation of a pipeline file before anything runs. Collects every error it can find,
//! each with file, line and stage: YAML syntax, unknown keys, unknown stage kinds, unknown or
//! missing params and inputs, bad input references, duplicate names, cycles, and output
//! paths that would escape the store.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use flag_core::{OutputKind, ParamKind, Params, StageSpec};
use serde_json::Value;

use super::interpolate::interpolate;
use super::locate::Locator;
use super::resources::Resources;
use super::{OutputRef, Pipeline, PipelineStage};
use crate::error::{EngineError, Result};
use crate::registry::{Registry, suggest};

const TOP_KEYS: &[&str] = &["name", "description", "params", "resources", "stages"];
const STAGE_KEYS: &[&str] = &[
    "uses",
    "description",
    "inputs",
    "params",
    "outputs",
    "resources",
];
/// Pipeline params every pipeline has unless it sets them itself.
const BUILTIN_PARAMS: &[(&str, &str)] = &[("data_dir", "../shared/data")];

struct Errors<'a> {
    file: &'a Path,
    list: Vec<EngineError>,
}

impl Errors<'_> {
    fn push(&mut self, line: usize, message: impl Into<String>) {
        self.list.push(EngineError::Pipeline {
            file: self.file.to_path_buf(),
            line,
            message: message.into(),
        });
    }
    fn finish(mut self) -> Result<()> {
        match self.list.len() {
            0 => Ok(()),
            1 => Err(self.list.remove(0)),
            _ => {
                self.list.sort_by_key(|e| match e {
                    EngineError::Pipeline { line, .. } => *line,
                    _ => 0,
                });
                Err(EngineError::Many(self.list))
            }
        }
    }
}

/// A `--set` value as YAML, or as text when it is not YAML. `.nan` and `.inf` are refused.
fn yaml_scalar(key: &str, text: &str) -> Result<Value> {
    match super::yaml::parse(text) {
        Ok(v) => Ok(v),
        Err(super::yaml::YamlError::NonFinite { .. }) => Err(EngineError::Usage(format!(
            "--set {key}={text}: not a finite number; a pipeline value must be finite (quote \
             it for the text)"
        ))),
        Err(e @ super::yaml::YamlError::Duplicate { .. }) => {
            Err(EngineError::Usage(format!("--set {key}={text}: {e}")))
        }
        Err(_) => Ok(Value::String(text.to_string())),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// A value as an error message quotes it: its type, and the value when it says more.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "no value (null)".into(),
        _ => format!("{} {v}", type_name(v)),
    }
}

fn check_kind(kind: ParamKind, v: &Value) -> std::result::Result<(), String> {
    let ok = match kind {
        ParamKind::Str | ParamKind::Path => v.is_string(),
        ParamKind::Int => v.is_i64() || v.is_u64(),
        ParamKind::Float => v.is_number(),
        ParamKind::Bool => v.is_boolean(),
        ParamKind::List => v.is_array(),
        ParamKind::Any => true,
        ParamKind::Date => {
            return match v.as_str() {
                Some(s) if chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok() => Ok(()),
                _ => Err(format!("must be a YYYY-MM-DD date, got {v}")),
            };
        }
    };
    if ok {
        Ok(())
    } else {
        let want = match kind {
            ParamKind::Str => "a string",
            ParamKind::Path => "a path (string)",
            ParamKind::Int => "an integer",
            ParamKind::Float => "a number",
            ParamKind::Bool => "true or false",
            ParamKind::List => "a list",
            _ => "valid",
        };
        Err(format!("must be {want}, got {}", describe(v)))
    }
}

/// An output path under the store's `out/` must be relative and stay inside it.
fn check_publish_path(p: &str) -> std::result::Result<(), String> {
    let path = Path::new(p);
    if p.trim().is_empty() {
        return Err("output path is empty".into());
    }
    if path.is_absolute() || p.starts_with('~') {
        return Err(format!("output path '{p}' must be relative to the store"));
    }
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "output path '{p}' escapes the store ('..' is not allowed)"
        ));
    }
    Ok(())
}

/// Names the store reserves under `refs/` (see `Store::set_ref`).
pub const RESERVED_NAMES: &[&str] = &["LAST"];

/// Pipeline and stage names become path components in the store (`refs/<pipeline>/<stage>`),
/// so they are restricted to a plain, portable file name: ASCII letters, digits, '_' and
/// '-', not starting with '-', at most 100 characters; a pipeline's name may not be one
/// the store reserves next to the pipelines' folders under `refs/`.
/// ('.' is refused too: it would allow '.', '..' and hidden files, and splits `stage.output`.)
pub fn check_name(n: &str, pipeline: bool) -> std::result::Result<(), String> {
    if n.is_empty() {
        return Err("'' is empty".into());
    }
    if n.len() > 100 {
        return Err(format!("'{n}' is longer than 100 characters"));
    }
    if let Some(c) = n
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "'{}' may not contain {c:?} (allowed: ASCII letters, digits, '_', '-')",
            n.escape_debug()
        ));
    }
    if n.starts_with('-') {
        return Err(format!("'{n}' may not start with '-'"));
    }
    if pipeline && RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(n)) {
        return Err(format!("'{n}' is reserved by the store"));
    }
    Ok(())
}

fn parse_ref(s: &str) -> Option<OutputRef> {
    let (stage, output) = s.trim().split_once('.')?;
    (!stage.is_empty() && !output.is_empty() && !output.contains('.')).then(|| OutputRef {
        stage: stage.to_string(),
        output: output.to_string(),
    })
}

pub(super) fn validate(
    file: &Path,
    text: &str,
    root: PathBuf,
    overrides: &[String],
    registry: &Registry,
) -> Result<Pipeline> {
    let loc = Locator::new(text);
    let mut errs = Errors { file, list: vec![] };

    // Duplicate stage names: YAML parsers keep one silently or fail without a line.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (name, line) in loc.stage_definitions() {
        if let Some(first) = seen.get(&name) {
            errs.push(
                line,
                format!("duplicate stage name '{name}' (first defined at line {first})"),
            );
        } else {
            seen.insert(name, line);
        }
    }
    if !errs.list.is_empty() {
        return errs.finish().map(|_| unreachable!());
    }

    let doc: Value = super::yaml::parse(text).map_err(|e| EngineError::Pipeline {
        file: file.to_path_buf(),
        line: e.line(),
        message: e.to_string(),
    })?;
    let Value::Object(top) = doc else {
        errs.push(
            1,
            "a pipeline file must be a map with 'params' and 'stages'",
        );
        return errs.finish().map(|_| unreachable!());
    };
    for k in top.keys() {
        if !TOP_KEYS.contains(&k.as_str()) {
            errs.push(
                loc.top_key(k),
                format!(
                    "unknown top-level key '{k}'{} (allowed: {})",
                    suggest(k, TOP_KEYS.iter().copied()),
                    TOP_KEYS.join(", ")
                ),
            );
        }
    }
    let name = match top.get("name") {
        Some(Value::String(s)) => {
            if let Err(e) = check_name(s, true) {
                errs.push(loc.top_key("name"), format!("pipeline name {e}"));
            }
            s.clone()
        }
        Some(Value::Null) | None => {
            let stem = file
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "pipeline".into());
            if let Err(e) = check_name(&stem, true) {
                errs.push(
                    1,
                    format!("pipeline name (taken from the file name) {e}; set 'name:'"),
                );
            }
            stem
        }
        Some(other) => {
            errs.push(
                loc.top_key("name"),
                format!("'name' must be a string, got {}", type_name(other)),
            );
            String::new()
        }
    };

    // Cluster resources every stage asks for unless it says otherwise.
    let default_resources = match top.get("resources") {
        None | Some(Value::Null) => Resources::default(),
        Some(v) => Resources::parse(v).unwrap_or_else(|(_, msg)| {
            errs.push(loc.top_key("resources"), msg);
            Resources::default()
        }),
    };

    // Pipeline-wide params, then --set overrides.
    let mut params: BTreeMap<String, Value> = BUILTIN_PARAMS
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    match top.get("params") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => params.extend(m.iter().map(|(k, v)| (k.clone(), v.clone()))),
        Some(other) => errs.push(
            loc.top_key("params"),
            format!("'params' must be a map, got {}", type_name(other)),
        ),
    }
    let mut stage_overrides: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for o in overrides {
        let Some((k, v)) = o.split_once('=') else {
            return Err(EngineError::Usage(format!(
                "--set '{o}': expected KEY=VALUE"
            )));
        };
        let k = k.trim();
        // PARAM or STAGE.PARAM, each a name: anything else (`../../x`, `a.b.c`, ``) is
        // refused as what it is, not looked up.
        let parts: Vec<&str> = k.splitn(2, '.').collect();
        if parts.iter().any(|part| check_name(part, false).is_err()) {
            return Err(EngineError::Usage(format!(
                "--set '{}': '{}' is not PARAM or STAGE.PARAM (a name is ASCII letters, \
                 digits, '_' and '-')",
                o.escape_debug(),
                k.escape_debug()
            )));
        }
        let v = yaml_scalar(k, v.trim())?;
        if let Some((stage, p)) = k.split_once('.') {
            stage_overrides
                .entry(stage.into())
                .or_default()
                .insert(p.into(), v);
        } else if params.contains_key(k) {
            params.insert(k.into(), v);
        } else {
            return Err(EngineError::Usage(format!(
                "--set {k}: unknown pipeline param{} (params of {}: {})",
                suggest(k, params.keys().map(String::as_str)),
                file.display(),
                params.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }

    let stages_val = match top.get("stages") {
        Some(Value::Object(m)) if !m.is_empty() => m.clone(),
        Some(Value::Object(_)) | Some(Value::Null) => {
            errs.push(
                loc.top_key("stages"),
                "'stages' is empty: a pipeline needs at least one stage",
            );
            return errs.finish().map(|_| unreachable!());
        }
        Some(other) => {
            errs.push(
                loc.top_key("stages"),
                format!("'stages' must be a map, got {}", type_name(other)),
            );
            return errs.finish().map(|_| unreachable!());
        }
        None => {
            errs.push(1, "missing 'stages'");
            return errs.finish().map(|_| unreachable!());
        }
    };
    for s in stage_overrides.keys() {
        if !stages_val.contains_key(s) {
            return Err(EngineError::Usage(format!(
                "--set {s}.…: no stage '{s}' in {}{}",
                file.display(),
                suggest(s, stages_val.keys().map(String::as_str))
            )));
        }
    }

    // First pass: kinds and specs, so input references can be checked against outputs.
    let mut specs: BTreeMap<String, StageSpec> = BTreeMap::new();
    let mut kinds: BTreeMap<String, String> = BTreeMap::new();
    for (sname, sval) in &stages_val {
        let line = loc.stage(sname);
        let Value::Object(body) = sval else {
            errs.push(line, format!("stage '{sname}': must be a map with 'uses:'"));
            continue;
        };
        if let Err(e) = check_name(sname, false) {
            errs.push(line, format!("stage name {e}"));
        }
        for k in body.keys() {
            if !STAGE_KEYS.contains(&k.as_str()) {
                errs.push(
                    loc.stage_key(sname, None, k),
                    format!(
                        "stage '{sname}': unknown key '{k}'{} (allowed: {})",
                        suggest(k, STAGE_KEYS.iter().copied()),
                        STAGE_KEYS.join(", ")
                    ),
                );
            }
        }
        match body.get("uses") {
            Some(Value::String(kind)) => match registry.get(kind) {
                Some(imp) => {
                    specs.insert(sname.clone(), imp.spec());
                    kinds.insert(sname.clone(), kind.clone());
                }
                None => errs.push(
                    loc.stage_key(sname, None, "uses"),
                    format!(
                        "stage '{sname}': unknown stage kind '{kind}'{} (known kinds: {})",
                        suggest(kind, registry.kinds()),
                        registry.kinds().collect::<Vec<_>>().join(", ")
                    ),
                ),
            },
            _ => errs.push(
                line,
                format!("stage '{sname}': missing 'uses: <stage kind>'"),
            ),
        }
    }

    let mut stages: Vec<PipelineStage> = Vec::new();
    let mut deferred_checks: Vec<(usize, Vec<String>, BTreeSet<String>)> = Vec::new();
    for (sname, sval) in &stages_val {
        let (Some(spec), Value::Object(body)) = (specs.get(sname), sval) else {
            continue;
        };
        let kind = kinds[sname].clone();
        let line = loc.stage(sname);

        // Params: interpolate, check names and types, fill defaults.
        let mut given: BTreeMap<String, Value> = match body.get("params") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Some(other) => {
                errs.push(
                    loc.stage_key(sname, None, "params"),
                    format!(
                        "stage '{sname}': 'params' must be a map, got {}",
                        type_name(other)
                    ),
                );
                BTreeMap::new()
            }
        };
        if let Some(ov) = stage_overrides.get(sname) {
            given.extend(ov.clone());
        }
        let errs_before_params = errs.list.len();
        let mut resolved = BTreeMap::new();
        for (pname, pval) in &given {
            let pline = loc.stage_key(sname, Some("params"), pname);
            let Some(pspec) = spec.params.iter().find(|p| p.name == pname) else {
                errs.push(
                    pline,
                    format!(
                        "stage '{sname}': unknown param '{pname}' for kind '{kind}'{} (params: {})",
                        suggest(pname, spec.params.iter().map(|p| p.name)),
                        spec.params
                            .iter()
                            .map(|p| p.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                continue;
            };
            let v = match interpolate(pval, &params) {
                Ok(v) => v,
                Err(e) => {
                    errs.push(pline, format!("stage '{sname}': param '{pname}': {e}"));
                    continue;
                }
            };
            if let Err(e) = check_kind(pspec.kind, &v) {
                errs.push(pline, format!("stage '{sname}': param '{pname}' {e}"));
                continue;
            }
            let v = match (pspec.kind, &v) {
                (ParamKind::Path, Value::String(p)) if Path::new(p).is_relative() => {
                    Value::String(root.join(p).to_string_lossy().to_string())
                }
                _ => v,
            };
            resolved.insert(pname.clone(), v);
        }
        for p in &spec.params {
            if !resolved.contains_key(p.name) && !given.contains_key(p.name) {
                match &p.default {
                    Some(d) => {
                        resolved.insert(p.name.to_string(), d.clone());
                    }
                    None => errs.push(
                        line,
                        format!(
                            "stage '{sname}': missing required param '{}' ({})",
                            p.name, p.doc
                        ),
                    ),
                }
            }
        }

        // Inputs: names from the spec, references to declared outputs of known stages.
        let mut inputs: BTreeMap<String, Vec<OutputRef>> = BTreeMap::new();
        let given_inputs = match body.get("inputs") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(other) => {
                errs.push(
                    loc.stage_key(sname, None, "inputs"),
                    format!(
                        "stage '{sname}': 'inputs' must be a map of input: stage.output, got {}",
                        type_name(other)
                    ),
                );
                serde_json::Map::new()
            }
        };
        for (iname, ival) in &given_inputs {
            let iline = loc.stage_key(sname, Some("inputs"), iname);
            let Some(ispec) = spec.inputs.iter().find(|i| i.name == iname) else {
                errs.push(
                    iline,
                    format!(
                        "stage '{sname}': unknown input '{iname}' for kind '{kind}'{} (inputs: {})",
                        suggest(iname, spec.inputs.iter().map(|i| i.name)),
                        spec.inputs
                            .iter()
                            .map(|i| i.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                continue;
            };
            let refs: Vec<&Value> = match ival {
                Value::Array(items) => items.iter().collect(),
                v => vec![v],
            };
            if refs.len() > 1 && !ispec.many {
                errs.push(
                    iline,
                    format!(
                        "stage '{sname}': input '{iname}' takes one output, got {}",
                        refs.len()
                    ),
                );
            }
            let mut bound = Vec::new();
            for r in refs {
                let Some(rs) = r.as_str() else {
                    errs.push(
                        iline,
                        format!("stage '{sname}': input '{iname}' must be 'stage.output', got {r}"),
                    );
                    continue;
                };
                let rline = loc.stage_text(sname, rs);
                let Some(oref) = parse_ref(rs) else {
                    errs.push(rline, format!("stage '{sname}': input '{iname}': '{rs}' is not of the form 'stage.output'"));
                    continue;
                };
                if oref.stage == *sname {
                    errs.push(
                        rline,
                        format!("stage '{sname}': input '{iname}' refers to the stage itself"),
                    );
                    continue;
                }
                match (stages_val.get(&oref.stage), specs.get(&oref.stage)) {
                    (None, _) => errs.push(
                        rline,
                        format!(
                            "stage '{sname}': input '{iname}' refers to unknown stage '{}'{}",
                            oref.stage,
                            suggest(&oref.stage, stages_val.keys().map(String::as_str))
                        ),
                    ),
                    (Some(_), Some(up)) => {
                        if let Some(o) = up.outputs.iter().find(|o| o.name == oref.output) {
                            if let (Some(want), OutputKind::Parquet { schema }) =
                                (ispec.schema, &o.kind)
                                && want != *schema
                            {
                                errs.push(rline, format!("stage '{sname}': input '{iname}' needs schema '{want}', but '{rs}' has schema '{schema}'"));
                            }
                            bound.push(oref);
                        } else {
                            errs.push(
                                rline,
                                format!(
                                    "stage '{sname}': input '{iname}': stage '{}' has no output '{}'{} (outputs: {})",
                                    oref.stage,
                                    oref.output,
                                    suggest(&oref.output, up.outputs.iter().map(|o| o.name)),
                                    up.outputs.iter().map(|o| o.name).collect::<Vec<_>>().join(", ")
                                ),
                            );
                        }
                    }
                    (Some(_), None) => {} // that stage's own error is already reported
                }
            }
            inputs.insert(iname.clone(), bound);
        }
        for i in &spec.inputs {
            if i.required && !given_inputs.contains_key(i.name) {
                errs.push(
                    line,
                    format!(
                        "stage '{sname}': missing required input '{}' ({})",
                        i.name, i.doc
                    ),
                );
            }
        }

        // Outputs: optional publish paths under <store>/out/.
        let mut publish = BTreeMap::new();
        let given_outputs: Vec<(String, Option<String>)> = match body.get("outputs") {
            None | Some(Value::Null) => vec![],
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string)))
                .collect(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| (v.as_str().unwrap_or_default().to_string(), None))
                .collect(),
            Some(other) => {
                errs.push(
                    loc.stage_key(sname, None, "outputs"),
                    format!(
                        "stage '{sname}': 'outputs' must be a map of output: path, got {}",
                        type_name(other)
                    ),
                );
                vec![]
            }
        };
        for (oname, path) in given_outputs {
            let oline = loc.stage_key(sname, Some("outputs"), &oname);
            if !spec.outputs.iter().any(|o| o.name == oname) {
                errs.push(
                    oline,
                    format!(
                        "stage '{sname}': unknown output '{oname}' for kind '{kind}'{} (outputs: {})",
                        suggest(&oname, spec.outputs.iter().map(|o| o.name)),
                        spec.outputs.iter().map(|o| o.name).collect::<Vec<_>>().join(", ")
                    ),
                );
                continue;
            }
            if let Some(p) = path {
                match check_publish_path(&p) {
                    Ok(()) => {
                        publish.insert(oname, p);
                    }
                    Err(e) => errs.push(oline, format!("stage '{sname}': output '{oname}': {e}")),
                }
            }
        }
        for o in &spec.outputs {
            publish.entry(o.name.to_string()).or_insert_with(|| {
                let ext = match o.kind {
                    OutputKind::Parquet { .. } => ".parquet",
                    OutputKind::File { ext } => return format!("{name}/{sname}/{}.{ext}", o.name),
                    OutputKind::Dir => "",
                };
                format!("{name}/{sname}/{}{ext}", o.name)
            });
        }

        // Values, by the stage's own parser: `period: 0` fails here, not after upstream stages
        // ran. Skipped when a param already failed its type check (reported once), and for path
        // params (whether a file exists is the cache key's question, asked when it runs).
        let imp = registry.get(&kinds[sname]).expect("kind checked above");
        let params = Params::new(resolved);
        if errs.list.len() == errs_before_params {
            deferred_checks.push((
                stages.len(),
                inputs.keys().cloned().collect::<Vec<String>>(),
                given.keys().cloned().collect::<BTreeSet<String>>(),
            ));
        }
        let resources = match body.get("resources") {
            None | Some(Value::Null) => default_resources.clone(),
            Some(v) => match Resources::parse(v) {
                Ok(r) => r.over(&default_resources),
                Err((key, msg)) => {
                    let at = match &key {
                        Some(k) => loc.stage_key(sname, Some("resources"), k),
                        None => loc.stage_key(sname, None, "resources"),
                    };
                    errs.push(at, format!("stage '{sname}': {msg}"));
                    Resources::default()
                }
            },
        };
        stages.push(PipelineStage {
            name: sname.clone(),
            kind,
            imp,
            params,
            inputs,
            publish,
            resources,
            line,
        });
    }
    // The checks run after every stage is read, so the worker's kinds are described in one
    // batch (one process, or none when cached) rather than one process per stage.
    registry.prefetch(
        &deferred_checks
            .iter()
            .map(|(i, bound, _)| {
                let st = &stages[*i];
                (
                    st.kind.as_str(),
                    &st.params,
                    bound.iter().map(String::as_str).collect(),
                )
            })
            .collect::<Vec<_>>(),
    );
    for (i, bound, given) in &deferred_checks {
        let st = &stages[*i];
        let (sname, line) = (&st.name, st.line);
        let bound: Vec<&str> = bound.iter().map(String::as_str).collect();
        if let Err(e) = st.imp.check_params(&st.params, &bound) {
            let (at, path_param) = match &e {
                flag_core::StageError::Param { name: pname, .. } => (
                    if given.contains(pname) {
                        loc.stage_key(sname, Some("params"), pname)
                    } else {
                        line
                    },
                    st.imp
                        .spec()
                        .params
                        .iter()
                        .any(|p| p.name == pname && p.kind == ParamKind::Path),
                ),
                _ => (line, false),
            };
            if !path_param {
                errs.push(at, format!("stage '{sname}': {e}"));
            }
        }
    }
    if let Some(cyc) = find_cycle(&stages) {
        errs.push(
            loc.stage(&cyc[0]),
            format!("cycle between stages: {}", cyc.join(" -> ")),
        );
    }
    errs.finish()?;

    let stages = toposort(stages);
    Ok(Pipeline {
        name,
        file: file.to_path_buf(),
        root,
        stages,
    })
}

/// A dependency cycle, as the list of stages around it (first repeated at the end).
fn find_cycle(stages: &[PipelineStage]) -> Option<Vec<String>> {
    let mut order: Vec<&PipelineStage> = stages.iter().collect();
    order.sort_by_key(|s| s.line);
    let deps: BTreeMap<String, Vec<String>> = order
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.inputs
                    .values()
                    .flatten()
                    .map(|r| r.stage.clone())
                    .collect(),
            )
        })
        .collect();
    fn dfs(
        n: &str,
        deps: &BTreeMap<String, Vec<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|p| p == n).unwrap_or(0);
                let mut cyc = path[start..].to_vec();
                cyc.push(n.to_string());
                return Some(cyc);
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for d in deps.get(n).into_iter().flatten() {
            if let Some(c) = dfs(d, deps, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    order
        .iter()
        .find_map(|s| dfs(&s.name, &deps, &mut state, &mut Vec::new()))
}

/// Orders an acyclic set of stages so each comes after its inputs (ties: file order).
fn toposort(mut stages: Vec<PipelineStage>) -> Vec<PipelineStage> {
    stages.sort_by_key(|s| s.line);
    let deps: BTreeMap<String, BTreeSet<String>> = stages
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.inputs
                    .values()
                    .flatten()
                    .map(|r| r.stage.clone())
                    .collect(),
            )
        })
        .collect();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::with_capacity(stages.len());
    while !stages.is_empty() {
        let i = stages
            .iter()
            .position(|s| deps[&s.name].iter().all(|d| done.contains(d)))
            .expect("acyclic graph has a ready stage");
        let s = stages.remove(i);
        done.insert(s.name.clone());
        out.push(s);
    }
    out
}
