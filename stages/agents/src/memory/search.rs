//! `memory_search`: FinAgent's retrieval, as a table. Each query (ticker, decision day,
//! query type, text) is embedded with the memory's model and searched in that ticker's
//! memory rows dated strictly before the decision day; the top k hits become rows, and
//! `kept` marks the ones FinAgent shows after its diversified de-duplication.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use flag_core::arrow::array::{Array, Date32Array, RecordBatch, StringArray};
use flag_core::schema::schema;
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use flag_llm::backend::backend_numerics;
use serde_json::json;

use super::index::{Entry, ExactIndex, Filter, Hit, IndexError, VectorIndex, diversify};
use super::news_embed::embed_environment;
use super::{
    EmbedSettings, Embedder, embed_by_length, embed_model_files, embed_param_specs, input_file,
    query_text, read_embedding_rows, row_error,
};
use crate::util;

const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/memory_search-1"
);

pub struct MemorySearch;

#[derive(Debug, Clone)]
pub struct SearchConfig {
    pub top_k: usize,
    pub date_column: String,
    pub suffix_horizon: bool,
    pub batch_size: usize,
    pub embed: EmbedSettings,
}

impl SearchConfig {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let positive = |n: &str| -> StageResult<usize> {
            match p.usize(n)? {
                0 => Err(StageError::param(n, "must be at least 1")),
                v => Ok(v),
            }
        };
        let date_column = p.str("date_column")?;
        if date_column.trim().is_empty() {
            return Err(StageError::param("date_column", "is empty"));
        }
        Ok(SearchConfig {
            top_k: positive("top_k")?,
            date_column,
            suffix_horizon: p.bool("suffix_horizon")?,
            batch_size: positive("batch_size")?,
            embed: EmbedSettings::from_params(p)?,
        })
    }
}

/// One row of `memory_queries`.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub ticker: String,
    pub date: i32,
    pub query_type: String,
    pub query: String,
}

/// The queries, validated: no null, no empty query or type, and one query per (ticker,
/// date, query_type). Errors name the file, the 1-based row and the column.
pub fn read_queries(batch: &RecordBatch, file: &Path) -> StageResult<Vec<Query>> {
    let ticker = util::column::<StringArray>(batch, "queries", "ticker", "utf8")?;
    let date = util::column::<Date32Array>(batch, "queries", "date", "date32")?;
    let qtype = util::column::<StringArray>(batch, "queries", "query_type", "utf8")?;
    let query = util::column::<StringArray>(batch, "queries", "query", "utf8")?;
    let mut out = Vec::with_capacity(batch.num_rows());
    let mut seen: HashMap<(String, i32, String), usize> = HashMap::new();
    for i in 0..batch.num_rows() {
        let row = i as u64 + 1;
        for (arr, name) in [
            (ticker as &dyn Array, "ticker"),
            (date, "date"),
            (qtype, "query_type"),
            (query, "query"),
        ] {
            if arr.is_null(i) {
                return Err(StageError::data(file, row, name, "is null"));
            }
        }
        for (arr, name) in [(qtype, "query_type"), (query, "query"), (ticker, "ticker")] {
            if arr.value(i).trim().is_empty() {
                return Err(StageError::data(file, row, name, "is empty"));
            }
        }
        let q = Query {
            ticker: ticker.value(i).to_string(),
            date: date.value(i),
            query_type: qtype.value(i).to_string(),
            query: query.value(i).to_string(),
        };
        let key = (q.ticker.clone(), q.date, q.query_type.clone());
        if let Some(first) = seen.insert(key, i) {
            return Err(StageError::data(
                file,
                row,
                "query_type",
                format!(
                    "a second '{}' query for {} on {} (the first is row {})",
                    q.query_type,
                    q.ticker,
                    flag_trading::series::from_days(q.date),
                    first + 1
                ),
            ));
        }
        out.push(q);
    }
    Ok(out)
}

/// Builds the exact index of the memory rows of `tickers` (item_id, ticker, the date
/// column, embedding of width `dim`). Errors name the file, 1-based row and column.
pub fn memory_index(
    batch: &RecordBatch,
    file: &Path,
    date_column: &str,
    tickers: &BTreeSet<&str>,
    dim: usize,
) -> StageResult<ExactIndex> {
    let id = util::column::<StringArray>(batch, "memory", "item_id", "utf8")?;
    let ticker = util::column::<StringArray>(batch, "memory", "ticker", "utf8")?;
    let date = util::column::<Date32Array>(batch, "memory", date_column, "date32")?;
    let emb = batch
        .column_by_name("embedding")
        .ok_or_else(|| StageError::Input {
            input: "memory".into(),
            message: format!("{}: has no column 'embedding'", file.display()),
        })?;
    let mut rows = Vec::new();
    for i in 0..batch.num_rows() {
        for (arr, name) in [
            (id as &dyn Array, "item_id"),
            (ticker, "ticker"),
            (date, date_column),
        ] {
            if arr.is_null(i) {
                return Err(StageError::data(file, i as u64 + 1, name, "is null"));
            }
        }
        if tickers.contains(ticker.value(i)) {
            rows.push(i);
        }
    }
    let vectors = read_embedding_rows(emb.as_ref(), &rows, dim)
        .map_err(|e| row_error(file, "embedding", e))?;
    let entries: Vec<Entry> = rows
        .iter()
        .zip(vectors)
        .map(|(&i, vector)| Entry {
            item_id: id.value(i).to_string(),
            group: ticker.value(i).to_string(),
            date: date.value(i),
            vector,
        })
        .collect();
    ExactIndex::build(Some(dim), entries).map_err(|e| match e {
        IndexError::Duplicate {
            item_id,
            first,
            row,
        } => StageError::data(
            file,
            rows[row] as u64 + 1,
            "item_id",
            format!("'{item_id}' is also row {}", rows[first] + 1),
        ),
        IndexError::Dim { row, .. } | IndexError::NotFinite { row, .. } => {
            StageError::data(file, rows[row] as u64 + 1, "embedding", e.to_string())
        }
    })
}

/// One output row.
#[derive(Debug, Clone, PartialEq)]
pub struct HitRow {
    /// Position of the query in the queries input.
    pub query: usize,
    pub rank: usize,
    pub hit: Hit,
    pub kept: bool,
}

/// What a search run found: the rows and how many queries had no memory before them.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieval {
    pub rows: Vec<HitRow>,
    pub empty_memory: usize,
}

/// Searches every query (vector `vectors[q]`) in `index`: per (ticker, date), in input order,
/// the top `k` hits of the ticker's memory dated before the date; `kept` marks the hits of
/// [`diversify`] over that day's queries. Rows are ordered by (ticker, date), then the
/// queries' input order, then rank.
pub fn retrieve(
    queries: &[Query],
    vectors: &[Vec<f32>],
    index: &dyn VectorIndex,
    k: usize,
) -> Retrieval {
    let mut days: BTreeMap<(&str, i32), Vec<usize>> = BTreeMap::new();
    for (q, query) in queries.iter().enumerate() {
        days.entry((query.ticker.as_str(), query.date))
            .or_default()
            .push(q);
    }
    let mut rows = Vec::new();
    let mut empty_memory = 0;
    for ((ticker, date), qs) in days {
        let filter = Filter::memory(ticker, date);
        if index.count(&filter) == 0 {
            empty_memory += qs.len();
            continue;
        }
        let per_type: Vec<Vec<Hit>> = qs
            .iter()
            .map(|&q| index.search(&vectors[q], k, &filter))
            .collect();
        let kept: BTreeSet<(usize, usize)> = diversify(&per_type, k)
            .into_iter()
            .map(|c| (c.kind, c.rank))
            .collect();
        for (kind, (&q, hits)) in qs.iter().zip(per_type).enumerate() {
            for (rank, hit) in hits.into_iter().enumerate() {
                rows.push(HitRow {
                    query: q,
                    rank: rank + 1,
                    kept: kept.contains(&(kind, rank)),
                    hit,
                });
            }
        }
    }
    Retrieval { rows, empty_memory }
}

/// The `memory_hits` batch.
pub fn hits_batch(queries: &[Query], rows: &[HitRow]) -> StageResult<RecordBatch> {
    let q = |r: &HitRow| &queries[r.query];
    schema("memory_hits")?.batch(vec![
        util::utf8(rows.iter().map(|r| q(r).ticker.as_str())),
        util::date32(rows.iter().map(|r| q(r).date).collect()),
        util::utf8(rows.iter().map(|r| q(r).query_type.as_str())),
        util::utf8(rows.iter().map(|r| q(r).query.as_str())),
        util::int64(rows.iter().map(|r| r.rank as i64).collect()),
        util::utf8(rows.iter().map(|r| r.hit.item_id.as_str())),
        util::date32(rows.iter().map(|r| r.hit.date).collect()),
        util::float64(rows.iter().map(|r| r.hit.score).collect()),
        util::boolean(rows.iter().map(|r| r.kept).collect()),
    ])
}

/// Embeds the queries' texts ([`query_text`]), `batch_size` at a time, shortest first.
pub fn embed_queries(
    queries: &[Query],
    cfg: &SearchConfig,
    embedder: &Embedder,
    progress: &dyn Fn(u64, u64, &str),
) -> StageResult<Vec<Vec<f32>>> {
    let texts: Vec<String> = queries
        .iter()
        .map(|q| query_text(&q.query, &q.query_type, cfg.suffix_horizon))
        .collect();
    embed_by_length(embedder, &texts, cfg.batch_size, "queries", progress)
}

impl Stage for MemorySearch {
    fn kind(&self) -> &'static str {
        "memory_search"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        SearchConfig::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        let mut params = vec![
            ParamSpec::with_default(
                "top_k",
                ParamKind::Int,
                json!(3),
                "Hits per query (FinAgent: 3 per query type)",
            ),
            ParamSpec::with_default(
                "date_column",
                ParamKind::Str,
                json!("trading_date"),
                "Date column of the memory table (date32): a query on day t sees rows dated < t",
            ),
            ParamSpec::with_default(
                "suffix_horizon",
                ParamKind::Bool,
                json!(true),
                "Embed \"<query> (<query_type>-term)\", e.g. \"... (short-term)\" (false: the query alone)",
            ),
            ParamSpec::with_default(
                "batch_size",
                ParamKind::Int,
                json!(64),
                "Queries per embedding call",
            ),
        ];
        params.extend(embed_param_specs());
        StageSpec {
            doc: "FinAgent memory retrieval: each query embedded and searched (exact cosine) in \
                  its ticker's memory rows dated before the decision day; top_k hits per query, \
                  `kept` after the diversified de-duplication.",
            inputs: vec![
                InputSpec {
                    name: "memory",
                    schema: None,
                    required: true,
                    many: false,
                    doc: "Embedded items: item_id, ticker, the date_column (date32) and embedding \
                          (e.g. news_embed.items), embedded with the same model",
                },
                InputSpec::one(
                    "queries",
                    "memory_queries",
                    "Queries per ticker, decision day and query type",
                ),
            ],
            outputs: vec![OutputSpec::parquet(
                "hits",
                "memory_hits",
                "Top-k hits per query",
            )],
            params,
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(VERSION)
    }

    fn external_files(&self, params: &Params) -> StageResult<Vec<std::path::PathBuf>> {
        embed_model_files(params)
    }

    fn environment(&self, params: &Params) -> Vec<(String, String)> {
        embed_environment(params)
    }

    fn numerics(&self, params: &Params) -> flag_core::Numerics {
        backend_numerics(params)
    }
}

impl flag_core::RunStage for MemorySearch {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let cfg = SearchConfig::from_params(&ctx.params)?;
        let qfile = input_file(ctx, "queries")?;
        let queries = read_queries(&ctx.read_input("queries")?, &qfile)?;
        let embedder = cfg.embed.load()?;
        let tickers: BTreeSet<&str> = queries.iter().map(|q| q.ticker.as_str()).collect();
        let mfile = input_file(ctx, "memory")?;
        let index = memory_index(
            &ctx.read_input("memory")?,
            &mfile,
            &cfg.date_column,
            &tickers,
            embedder.dim(),
        )?;
        ctx.log(format!(
            "embedder {}, device {}, {} queries, {} memory items of {} tickers",
            embedder.name(),
            cfg.embed.device_name,
            queries.len(),
            index.len(),
            tickers.len()
        ));
        let progress = |d: u64, t: u64, m: &str| ctx.progress(d, t, m);
        let vectors = embed_queries(&queries, &cfg, &embedder, &progress)?;
        let started = std::time::Instant::now();
        let found = retrieve(&queries, &vectors, &index, cfg.top_k);
        ctx.log(format!(
            "{} hits ({} kept) in {:.3} s; {} of {} queries had an empty memory before their \
             date (no rows)",
            found.rows.len(),
            found.rows.iter().filter(|r| r.kept).count(),
            started.elapsed().as_secs_f64(),
            found.empty_memory,
            queries.len()
        ));
        let batch = hits_batch(&queries, &found.rows)?;
        ctx.write_parquet("hits", &[batch])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, date: i32, v: [f32; 2]) -> Entry {
        Entry {
            item_id: id.into(),
            group: "AAPL".into(),
            date,
            vector: v.to_vec(),
        }
    }

    fn query(date: i32, kind: &str) -> Query {
        Query {
            ticker: "AAPL".into(),
            date,
            query_type: kind.into(),
            query: "q".into(),
        }
    }

    #[test]
    fn retrieve_marks_first_occurrences_and_counts_empty_memories() {
        let index = ExactIndex::build(
            None,
            vec![
                entry("x", 10, [1.0, 0.0]),
                entry("y", 11, [0.6, 0.8]),
                entry("z", 12, [0.0, 1.0]),
            ],
        )
        .unwrap();
        let queries = [
            query(10, "short"),  // nothing before day 10
            query(20, "short"),  // x, y
            query(20, "long"),   // z, y (y already kept by short)
            query(10, "medium"), // nothing either
        ];
        let vectors = [
            vec![1.0, 0.0],
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![0.0, 1.0],
        ];
        let r = retrieve(&queries, &vectors, &index, 2);
        assert_eq!(r.empty_memory, 2);
        let rows: Vec<(usize, usize, &str, bool)> = r
            .rows
            .iter()
            .map(|h| (h.query, h.rank, h.hit.item_id.as_str(), h.kept))
            .collect();
        assert_eq!(
            rows,
            [
                (1, 1, "x", true),
                (1, 2, "y", true),
                (2, 1, "z", true),
                (2, 2, "y", false)
            ]
        );
    }
}
