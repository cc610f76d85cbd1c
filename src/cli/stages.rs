//! `flag stages [KIND] [--json]`: the catalogue of stage kinds, from the same declarations the
//! engine validates pipelines with: inputs, outputs, params, and each kind's numerics class
//! (the reproducibility contract: which kinds are bit-identical on any machine and which are
//! keyed by the kernel path).
use std::process::ExitCode;

use clap::Args;
use flag_core::{OutputKind, ParamKind, Params, Stage};
use serde_json::{Value, json};

use crate::registry::{Registry, suggest};

#[derive(Args, Debug)]
pub struct StagesArgs {
    /// Show one stage kind in full
    pub kind: Option<String>,
    /// The catalogue as JSON
    #[arg(long)]
    pub json: bool,
}

fn param_kind(k: ParamKind) -> &'static str {
    match k {
        ParamKind::Str => "string",
        ParamKind::Int => "int",
        ParamKind::Float => "float",
        ParamKind::Bool => "bool",
        ParamKind::Date => "date",
        ParamKind::List => "list",
        ParamKind::Any => "any",
        ParamKind::Path => "path",
    }
}

/// One kind as JSON. Numerics is given for the default params; the LLM stages' HTTP backend
/// (`backend: openai`) is `remote`.
pub fn describe(kind: &str, stage: &dyn Stage) -> Value {
    let spec = stage.spec();
    let numerics = stage.numerics(&Params::default());
    json!({
        "kind": kind,
        "doc": spec.doc,
        "numerics": numerics.label(),
        "reproducibility": numerics.describe(),
        "inputs": spec.inputs.iter().map(|i| json!({
            "name": i.name, "schema": i.schema, "required": i.required, "many": i.many, "doc": i.doc,
        })).collect::<Vec<_>>(),
        "outputs": spec.outputs.iter().map(|o| json!({
            "name": o.name,
            "kind": match &o.kind {
                OutputKind::Parquet { schema } => format!("parquet ({schema})"),
                OutputKind::File { ext } => format!("file (.{ext})"),
                OutputKind::Dir => "dir".to_string(),
            } + if o.measured { ", measured" } else { "" },
            "measured": o.measured,
            "doc": o.doc,
        })).collect::<Vec<_>>(),
        "params": spec.params.iter().map(|p| json!({
            "name": p.name, "kind": param_kind(p.kind), "default": p.default, "doc": p.doc,
        })).collect::<Vec<_>>(),
    })
}

fn first_sentence(doc: &str) -> &str {
    let line = doc.lines().next().unwrap_or("");
    line.split_once(". ").map_or(line, |(s, _)| s)
}

pub fn run(args: StagesArgs) -> anyhow::Result<ExitCode> {
    let registry = Registry::builtin();
    let kinds: Vec<&str> = match &args.kind {
        Some(k) if registry.get(k).is_none() => anyhow::bail!(
            "no stage kind '{k}'{}; `flag stages` lists them",
            suggest(k, registry.kinds())
        ),
        Some(k) => vec![k.as_str()],
        None => registry.kinds().collect(),
    };
    let all: Vec<Value> = kinds
        .iter()
        .map(|k| describe(k, registry.get(k).expect("listed kind").as_ref()))
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    if args.kind.is_none() {
        for d in &all {
            println!(
                "{:<18} {:<12} {}",
                d["kind"].as_str().unwrap_or(""),
                d["numerics"].as_str().unwrap_or(""),
                first_sentence(d["doc"].as_str().unwrap_or(""))
            );
        }
        println!(
            "\nnumerics: portable = same key, same bytes on any machine; kernel-path = the \
             kernel path (libtorch, CPU dispatch, BLAS path, device, threads) is in the key; \
             remote = computed by the service named in the params. `flag stages KIND` for one \
             kind in full."
        );
        return Ok(ExitCode::SUCCESS);
    }
    let d = &all[0];
    println!(
        "{}: {}",
        d["kind"].as_str().unwrap_or(""),
        d["doc"].as_str().unwrap_or("")
    );
    println!(
        "numerics: {} ({})",
        d["numerics"].as_str().unwrap_or(""),
        d["reproducibility"].as_str().unwrap_or("")
    );
    for (title, field) in [
        ("inputs", "inputs"),
        ("outputs", "outputs"),
        ("params", "params"),
    ] {
        println!("{title}:");
        for x in d[field].as_array().into_iter().flatten() {
            let what = match field {
                "inputs" => x["schema"].as_str().unwrap_or("any").to_string(),
                "outputs" => x["kind"].as_str().unwrap_or("").to_string(),
                _ => match &x["default"] {
                    Value::Null => format!("{}, required", x["kind"].as_str().unwrap_or("")),
                    v => format!("{}, default {v}", x["kind"].as_str().unwrap_or("")),
                },
            };
            println!(
                "  {:<20} {what}: {}",
                x["name"].as_str().unwrap_or(""),
                x["doc"].as_str().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
