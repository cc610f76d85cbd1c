//! `flag show STAGE.OUTPUT`: rows of an artifact, or a SQL query over it (DataFusion).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::store::{hash_file, short};

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The artifact, as STAGE.OUTPUT
    pub output: String,
    /// Rows to print (ignored with --sql)
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// SQL over the artifact, registered as table `t` (and as STAGE_OUTPUT)
    #[arg(long)]
    pub sql: Option<String>,
    /// The pipeline (file, or name of one run in this store) whose latest run to read
    /// [default: the last pipeline run in this store]
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
}

pub fn run(
    args: ShowArgs,
    cli_store: &Option<PathBuf>,
    cli_root: &Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let (store, rec) = super::latest_output(cli_store, cli_root, &args.pipeline, &args.output)?;
    if rec.kind != "parquet" {
        for f in &rec.files {
            println!("{}", store.object_path(f).display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Never read an object without checking it is what the manifest says it is.
    let path = store.object_path(&rec.files[0]);
    let actual = hash_file(&path)?;
    if actual != rec.files[0].hash {
        anyhow::bail!(
            "{} is corrupted (content hash {}, expected {}); run `flag verify` and rerun the pipeline",
            path.display(),
            short(&actual),
            short(&rec.files[0].hash)
        );
    }
    let table = args.output.replace('.', "_");
    let sql = args
        .sql
        .clone()
        .unwrap_or_else(|| format!("SELECT * FROM t LIMIT {}", args.limit));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let batches = rt.block_on(async {
        let ctx = SessionContext::new();
        let p = path.to_string_lossy().to_string();
        ctx.register_parquet("t", &p, ParquetReadOptions::default())
            .await?;
        ctx.register_parquet(table.as_str(), &p, ParquetReadOptions::default())
            .await?;
        ctx.sql(&sql).await?.collect().await
    })?;
    println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
    Ok(ExitCode::SUCCESS)
}
