//! `flag show STAGE.OUTPUT`: rows of an artifact, or a SQL query over it (DataFusion).
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::{
    GreedyMemoryPool, MemoryConsumer, MemoryPool, TrackConsumersPool,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{ParquetReadOptions, SQLOptions, SessionConfig, SessionContext};
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
    /// Memory the query may use (DataFusion's memory pool plus the result rows held for
    /// printing), e.g. 512MiB, 4GiB, 1000000 (bytes). Sorts and aggregations spill to a
    /// temporary directory; a query that still needs more (a large cross join) fails naming
    /// the limit instead of growing without bound
    #[arg(
        long,
        env = "FLAG_SHOW_MEMORY_LIMIT",
        default_value = "1GiB",
        value_parser = parse_size
    )]
    pub memory_limit: u64,
}

/// "1GiB", "512MiB", "64M", "10k", "1000000": a byte count (K/M/G/T are powers of 1024,
/// with or without "i" and "B").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512MiB, 4GiB, 1000000)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "'{other}' is not a size unit (B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let bytes = x * mult as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("'{s}' is not a size of at least one byte"));
    }
    Ok(bytes as u64)
}

/// 1073741824 -> "1.0 GiB".
fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[u])
    }
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
    // On object storage the query reads the bucket's object: that is the one hashed.
    let actual = match store.remote() {
        Some(r) => r
            .hash(&crate::store::sync::object_rel(&rec.files[0]))?
            .unwrap_or_else(|| "missing".into()),
        None => hash_file(&path)?,
    };
    if actual != rec.files[0].hash {
        anyhow::bail!(
            "{} is corrupted (content hash {}, expected {}); run `flag verify` and rerun the pipeline",
            store.object_location(&rec.files[0]),
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
    // On object storage the query reads the bucket's object (hashed above) through
    // DataFusion's object store registry.
    let remote = store.remote().map(|r| {
        let (bucket_url, object_store) = r.object_store();
        (
            bucket_url,
            object_store,
            store.object_location(&rec.files[0]),
        )
    });
    let limit = args.memory_limit;
    let over_limit = |what: String| {
        anyhow::anyhow!(
            "--sql: the query needs more memory than the limit of {} ({limit} bytes; set by \
             --memory-limit or FLAG_SHOW_MEMORY_LIMIT): {what}",
            human_bytes(limit)
        )
    };
    let pool: Arc<dyn MemoryPool> = Arc::new(TrackConsumersPool::new(
        GreedyMemoryPool::new(usize::try_from(limit).unwrap_or(usize::MAX)),
        std::num::NonZeroUsize::new(5).expect("5 > 0"),
    ));
    let batches = rt.block_on(async {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(pool.clone())
            .build_arc()?;
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
        let p = match &remote {
            Some((bucket_url, object_store, url)) => {
                let u = datafusion::execution::object_store::ObjectStoreUrl::parse(bucket_url)?;
                ctx.register_object_store(u.as_ref(), object_store.clone());
                url.clone()
            }
            None => path.to_string_lossy().to_string(),
        };
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
        let mut stream = ctx
            .sql_with_options(&sql, read_only)
            .await?
            .execute_stream()
            .await?;
        // The rows held for printing count against the same pool: a cross join's output
        // is what grows, not its operators' state.
        let held = MemoryConsumer::new("flag show: result rows").register(&pool);
        let mut batches = Vec::new();
        // (Polled by hand: the crate does not depend on `futures` for StreamExt; the method
        // comes with the stream's trait object.)
        while let Some(b) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
            let b = b?;
            held.try_grow(b.get_array_memory_size())?;
            batches.push(b);
        }
        Ok::<_, DataFusionError>(batches)
    });
    let batches = match batches {
        Ok(b) => b,
        Err(e) => {
            if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
                || e.to_string().contains("Resources exhausted")
            {
                return Err(over_limit(e.find_root().to_string()));
            }
            return Err(e.into());
        }
    };
    // Printed a line at a time: the text of a table is many times its rows' size.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = super::table::write_table(&mut out, &batches)
        .and_then(|()| std::io::Write::flush(&mut out).map_err(Into::into));
    match written {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // `flag show ... | head`: the reader has what it wanted.
        Err(arrow::error::ArrowError::IoError(_, e))
            if e.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
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
