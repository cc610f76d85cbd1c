//! Command-line interface (clap derive). One module per subcommand.
pub mod bench;
pub mod env;
pub mod gc;
pub mod path;
pub mod recompute;
mod remote_ops;
pub mod run;
pub mod show;
pub mod stages;
pub mod status;
mod table;
pub mod verify;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "flag",
    version,
    about = "Reproducible, content-addressed pipelines for LLM + RL trading research"
)]
pub struct Cli {
    /// The store (cache): a directory [default: <project root>/artifacts], or
    /// s3://BUCKET/PREFIX on S3-compatible storage (endpoint, region and credentials from the
    /// AWS_* environment; a local copy is kept under $FLAG_STORE_CACHE)
    #[arg(long, global = true, env = "FLAG_STORE")]
    pub store: Option<PathBuf>,
    /// Project root for relative paths, SQL and prompt files [default: parent of pipelines/]
    #[arg(long, global = true, env = "FLAG_ROOT")]
    pub root: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run what is stale in a pipeline, reuse what is cached
    Run(run::RunArgs),
    /// Show each stage's state (cached / stale and why) without running anything
    Status(status::StatusArgs),
    /// Print an artifact's rows, or query it with SQL (DataFusion)
    Show(show::ShowArgs),
    /// Print the file path(s) of an artifact, for duckdb / pandas
    Path(path::PathArgs),
    /// Re-hash every stored object (or recompute a stage and compare its bytes)
    Verify(verify::VerifyArgs),
    /// This machine's compute environment and the kernel path that keys libtorch stages
    Env(env::EnvArgs),
    /// The stage kinds: inputs, outputs, params, and which are bit-identical on any machine
    Stages(stages::StagesArgs),
    /// Remove objects no manifest uses, and staging left by killed runs
    Gc(gc::GcArgs),
    /// The embedded language models (tokenize, logits, generate, embed, bench)
    #[command(disable_help_flag = true)]
    Llm(Forwarded),
    /// Serve the embedded models over an OpenAI-compatible HTTP API (chat, embeddings)
    #[command(disable_help_flag = true)]
    Serve(Forwarded),
    /// Run one stage job the coordinator wrote (a stage kind this binary links; internal)
    #[command(hide = true)]
    StageExec {
        /// The job file (JSON) in the stage's staging directory
        job: PathBuf,
    },
    /// Measure the store's hashing/commit throughput (for `just bench`)
    #[command(hide = true)]
    BenchStore(bench::BenchStoreArgs),
}

/// The arguments of a subcommand that `flag-worker` runs (it links libtorch; `flag` does not):
/// passed on untouched, `--help` included.
#[derive(clap::Args, Debug)]
pub struct Forwarded {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<std::ffi::OsString>,
}

/// The store directory for a command.
pub fn store_dir(cli_store: &Option<PathBuf>, root: &Path) -> PathBuf {
    cli_store.clone().unwrap_or_else(|| root.join("artifacts"))
}

/// The store of a command: `s3://bucket/prefix`, or a folder. `create`: make it if it is
/// new (run, status); otherwise it must exist.
pub fn open_store(
    cli_store: &Option<PathBuf>,
    root: &Path,
    create: bool,
) -> anyhow::Result<crate::store::Store> {
    if let Some(url) = cli_store
        .as_ref()
        .and_then(|s| s.to_str())
        .and_then(crate::store::remote::S3Url::parse)
    {
        let url = url.map_err(|e| anyhow::anyhow!("--store {e}"))?;
        return Ok(crate::store::Store::open_remote(&url, create)?);
    }
    let dir = store_dir(cli_store, root);
    Ok(if create {
        crate::store::Store::open(&dir)?
    } else {
        crate::store::Store::existing(&dir)?
    })
}

/// The existing store of a command that has no pipeline file (show, path, verify, gc).
pub fn existing_store(
    cli_store: &Option<PathBuf>,
    cli_root: &Option<PathBuf>,
) -> anyhow::Result<crate::store::Store> {
    let root = cli_root.clone().unwrap_or_else(|| PathBuf::from("."));
    open_store(cli_store, &root, false)
}

/// The store and the latest record of `STAGE.OUTPUT` (show, path).
pub fn latest_output(
    cli_store: &Option<PathBuf>,
    cli_root: &Option<PathBuf>,
    pipeline: &Option<PathBuf>,
    reference: &str,
) -> anyhow::Result<(crate::store::Store, crate::store::OutputRecord)> {
    let store = existing_store(cli_store, cli_root)?;
    let name = resolve_pipeline_name(&store, pipeline)?;
    let (_, rec) = resolve_output(&store, &name, reference)?;
    Ok((store, rec))
}

/// Pipeline name + store for commands that address `STAGE.OUTPUT`.
pub fn resolve_pipeline_name(
    store: &crate::store::Store,
    pipeline: &Option<PathBuf>,
) -> anyhow::Result<String> {
    if let Some(p) = pipeline {
        // A name that has run in this store (`--pipeline guided`) needs no file.
        if !p.exists()
            && let Some(name) = p.to_str().filter(|n| !n.contains(['/', '.']))
            && store.refs()?.iter().any(|(pl, _, _)| pl == name)
        {
            return Ok(name.to_string());
        }
        // A regular file only, of bounded size (a FIFO would block).
        let text = crate::pipeline::read_file(p).map_err(|e| {
            anyhow::anyhow!(
                "{e} (--pipeline takes a pipeline file, or the name of one that has run in \
                 this store)"
            )
        })?;
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or(serde_yaml::Value::Null);
        if let Some(n) = doc.get("name").and_then(|n| n.as_str()) {
            return Ok(n.to_string());
        }
        return Ok(p
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string());
    }
    store.last_pipeline()?.ok_or_else(|| {
        anyhow::anyhow!(
            "no pipeline has run in {} yet; pass --pipeline",
            store.location()
        )
    })
}

/// `stage.output` -> the latest manifest of that stage and the output's record.
pub fn resolve_output(
    store: &crate::store::Store,
    pipeline: &str,
    reference: &str,
) -> anyhow::Result<(crate::store::Manifest, crate::store::OutputRecord)> {
    let (stage, output) = reference
        .split_once('.')
        .ok_or_else(|| anyhow::anyhow!("'{reference}': expected STAGE.OUTPUT"))?;
    // Both become path components under refs/: never read outside it.
    crate::pipeline::check_name(pipeline, true)
        .map_err(|e| anyhow::anyhow!("pipeline name {e}"))?;
    crate::pipeline::check_name(stage, false)
        .map_err(|e| anyhow::anyhow!("'{reference}': stage name {e}"))?;
    let key = store.get_ref(pipeline, stage)?.ok_or_else(|| {
        anyhow::anyhow!(
            "stage '{stage}' has not run in pipeline '{pipeline}' (store {})",
            store.location()
        )
    })?;
    let m = store.lookup(&key)?.ok_or_else(|| {
        anyhow::anyhow!(
            "the latest run of '{stage}' ({}) is no longer in the store; rerun the pipeline",
            crate::store::short(&key)
        )
    })?;
    let rec = m.outputs.get(output).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "stage '{stage}' has no output '{output}' (outputs: {})",
            m.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    Ok((m, rec))
}
