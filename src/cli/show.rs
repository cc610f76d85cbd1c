//! `flag show STAGE.OUTPUT`: rows of an artifact, or a SQL query over it (DataFusion).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use datafusion::prelude::{ParquetReadOptions, SQLOptions, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

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
    read_only_query(&sql)?;
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
        // Second line of defence: DataFusion itself refuses to plan DDL, DML (COPY, INSERT)
        // and statements (SET, ...) for this query.
        let read_only = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        ctx.sql_with_options(&sql, read_only).await?.collect().await
    })?;
    println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
    Ok(ExitCode::SUCCESS)
}

/// `show` is read-only: the SQL must be exactly one query (SELECT, WITH ... SELECT, VALUES)
/// or an EXPLAIN of one. Decided on DataFusion's own parse of the text, before anything runs:
/// COPY ... TO would write any file (the store's objects included), CREATE/INSERT/DROP/SET
/// change state, and several statements are refused whatever they are.
pub fn read_only_query(sql: &str) -> anyhow::Result<()> {
    let statements = DFParser::parse_sql(sql)
        .map_err(|e| anyhow::anyhow!("--sql: cannot parse the query: {e}"))?;
    if statements.len() != 1 {
        anyhow::bail!(
            "--sql must be a single query statement, got {} statements; `flag show` is read-only",
            statements.len()
        );
    }
    fn check(s: &DfStatement) -> Result<(), String> {
        match s {
            DfStatement::Statement(inner) => match inner.as_ref() {
                SqlStatement::Query(_) => Ok(()),
                SqlStatement::Explain { statement, .. } => match statement.as_ref() {
                    SqlStatement::Query(_) => Ok(()),
                    other => Err(first_words(&other.to_string())),
                },
                other => Err(first_words(&other.to_string())),
            },
            DfStatement::Explain(e) => check(&e.statement),
            DfStatement::CopyTo(_) => Err("COPY ... TO".into()),
            DfStatement::CreateExternalTable(_) => Err("CREATE EXTERNAL TABLE".into()),
            DfStatement::Reset(_) => Err("RESET".into()),
        }
    }
    check(&statements[0]).map_err(|what| {
        anyhow::anyhow!(
            "--sql accepts only a query (SELECT, WITH ... SELECT, EXPLAIN SELECT); \
             refusing {what}: `flag show` is read-only"
        )
    })
}

/// The leading keywords of a statement, for an error message ("CREATE TABLE", "INSERT INTO").
fn first_words(text: &str) -> String {
    let words = text
        .split_whitespace()
        .take_while(|w| w.chars().all(|c| c.is_ascii_uppercase()))
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    if words.is_empty() {
        "this statement".into()
    } else {
        words
    }
}
