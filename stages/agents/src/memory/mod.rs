//! FinAgent's memory (Zhang et al., KDD 2024) as tables: the news of earlier days, embedded
//! once, and the retrievals of every decision day as rows a user can query.
//!
//! * [`news_embed`] (`news_embed`): `news` -> `news_items` (schema `news_items`): one row per
//!   news item with a stable [`item_id`], the text embedded ([`item_text`]) and its
//!   all-MiniLM-L6-v2 embedding (384 unit-norm floats).
//! * [`search`] (`memory_search`): a memory table (item_id, ticker, a date column, embedding)
//!   and `memory_queries` (the market-intelligence module's short/medium/long-term queries
//!   per ticker and decision day) -> `memory_hits`: each query's top k items of the same
//!   ticker dated strictly before the decision day, and whether each survives FinAgent's
//!   diversified de-duplication ([`diversify`]).
//! * [`index`]: the [`VectorIndex`] interface and the brute-force [`ExactIndex`].
//! * [`embedder`]: the embedding backend from params (`embedded` MiniLM or an `openai`
//!   server), as the LLM stages pick theirs.
//!
//! The memory at day t is the rows of the table with date < t: there is no mutable vector
//! store, and no look-ahead by construction (the filter is part of every search).
//!
//! ## Embeddings in Parquet
//! The schema registry has `list<float64>` but no `list<float32>`, so embeddings are stored as
//! `list<float64>` holding the model's f32 values exactly (every f32 is an f64; reading back
//! and narrowing gives the same bits), and every row is checked to have the model's width.
//! DuckDB reads the column as `DOUBLE[]`, e.g.
//! `SELECT item_id, list_cosine_similarity(embedding, ?) FROM 'items.parquet'`. The memory
//! reader also accepts `list<float32>`, `large_list` and fixed-size lists (a table written by
//! DuckDB with `FLOAT[384]`).
//!
//! ## Exact or approximate search
//! [`ExactIndex`] is one pass over the candidate vectors per query (f64 sums of exact f32
//! products, one thread, 4 bytes x 384 per item). `.ci/bench-retrieval.sh` (random unit
//! vectors, one ticker holding the whole memory, every item a candidate, k = 3) measured on
//! this project's 2-core CPU (AMD EPYC, AVX-512) while other jobs ran (load 3-5), median
//! latency per query over three runs: 0.71-0.76 ms at 10k items (15 MiB of vectors),
//! 7-12 ms at 100k (146 MiB), 77-119 ms at 1M (1.4 GiB): about 10,000 items per millisecond,
//! linear in the candidates. FinAgent searches one ticker's earlier news (10k-17k
//! stocknewsapi items per ticker over three years, fewer before a given day), so a query
//! costs about a millisecond and exact search is the right default: exact, deterministic, no
//! build step, no tuning. An ANN index pays once one searched group holds about a million
//! vectors (1.4 GiB of f32; at ~100 ms a query, 3 queries x 250 decision days spend over a
//! minute per ticker in search), e.g. a universe-wide memory searched without the ticker
//! filter. The crate to use then is `hnsw_rs` (0.3.x, pure Rust HNSW with a dot/cosine
//! distance; its `FilterT` predicate is applied during the graph traversal, so the ticker and
//! `date < t` stay inside the search and no future item is ever a candidate), or `usearch`
//! (2.x, C++ core; f16/i8 quantisation cuts the memory 2-4x, and it also takes a predicate
//! for filtered search). `instant-distance` (0.6) has no filter in its search API, so the
//! date bound would need one index per day. Either would implement [`VectorIndex`]; the hits
//! schema and `kept` stay as they are, only the hits could then miss some of the true top k.
//!
//! Embedding is the slow part: all-MiniLM-L6-v2 embeds about 20 news items per second on the
//! same 2 loaded cores (57 word pieces on average, shortest first, 64 per call), so the
//! stocknewsapi news of five tickers (~65k items) takes about an hour once, and is cached from
//! then on; `device: cuda` or an `openai` backend serve larger corpora.
pub mod embedder;
pub mod index;
pub mod news_embed;
pub mod search;

use std::sync::Arc;

use flag_core::arrow::array::{
    Array, ArrayRef, FixedSizeListArray, Float32Array, Float32Builder, Float64Array,
    LargeListArray, ListArray, ListBuilder,
};
use flag_core::arrow::datatypes::DataType;
use flag_core::{StageError, StageResult};

pub use embedder::{
    EmbedSettings, Embedder, embed_by_length, embed_model_files, embed_param_specs,
};
pub use index::{
    Chosen, Entry, ExactIndex, Filter, Hit, IndexError, VectorIndex, diversify, dot_f64, hit_order,
};

flag_core::stage_kinds!(news_embed::NewsEmbed, search::MemorySearch);

/// The id of a news item: the first 16 lowercase hex digits (64 bits) of the blake3 hash of
/// `ticker`, `published_at` (microseconds since the epoch, as a decimal string), `title` and
/// `url` (a null url as the empty string), each fed as its UTF-8 length (8 bytes, little
/// endian) followed by its bytes, so no two field splits hash the same input. It depends on
/// nothing but those four values: the same item has the same id in every run and table.
pub fn item_id(ticker: &str, published_at_us: i64, title: &str, url: Option<&str>) -> String {
    let mut h = blake3::Hasher::new();
    for bytes in [
        ticker.as_bytes(),
        published_at_us.to_string().as_bytes(),
        title.as_bytes(),
        url.unwrap_or("").as_bytes(),
    ] {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().to_hex()[..16].to_string()
}

/// The text embedded for a news item: the non-empty of `title` and `summary` (trimmed)
/// joined by ": ", every run of whitespace made one space, cut after `max_chars` characters.
pub fn item_text(title: &str, summary: Option<&str>, max_chars: usize) -> String {
    let parts: Vec<&str> = [Some(title), summary]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let joined = parts.join(": ");
    let normal = joined.split_whitespace().collect::<Vec<_>>().join(" ");
    normal.chars().take(max_chars).collect()
}

/// The text embedded for a query: with `suffix_horizon`, `"<query> (<query_type>-term)"`
/// (e.g. "Apple supply chain (short-term)"), else the query itself; the query trimmed.
pub fn query_text(query: &str, query_type: &str, suffix_horizon: bool) -> String {
    if suffix_horizon {
        format!("{} ({}-term)", query.trim(), query_type.trim())
    } else {
        query.trim().to_string()
    }
}

/// The first 60 characters of a text, for messages.
pub(crate) fn excerpt(s: &str) -> String {
    let mut t: String = s.chars().take(60).collect();
    if s.chars().count() > 60 {
        t.push_str("...");
    }
    t
}

/// The embedding column as the schemas store it: `list<float64>` of the f32 values.
pub fn embedding_array(vectors: &[Vec<f32>]) -> ArrayRef {
    let n: usize = vectors.iter().map(Vec::len).sum();
    let mut b = ListBuilder::with_capacity(Float32Builder::with_capacity(n), vectors.len());
    for v in vectors {
        for &x in v {
            b.values().append_value(x);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

/// Why one row's embedding cannot be used: (0-based row, message).
pub type RowError = (usize, String);

/// Reads an embedding column (list, large list or fixed-size list of float32 or float64)
/// into f32 vectors of width `dim`. A null list, a null or non-finite value, or another
/// width is an error naming the 0-based row; f64 values are narrowed to f32.
pub fn read_embeddings(col: &dyn Array, dim: usize) -> Result<Vec<Vec<f32>>, RowError> {
    let rows: Vec<usize> = (0..col.len()).collect();
    read_embedding_rows(col, &rows, dim)
}

/// [`read_embeddings`] of the given rows only (0-based, each < `col.len()`).
pub fn read_embedding_rows(
    col: &dyn Array,
    rows: &[usize],
    dim: usize,
) -> Result<Vec<Vec<f32>>, RowError> {
    let row_values = |i: usize| -> Result<ArrayRef, RowError> {
        if col.is_null(i) {
            return Err((i, "is null".into()));
        }
        Ok(match col.data_type() {
            DataType::List(_) => downcast::<ListArray>(col)?.value(i),
            DataType::LargeList(_) => downcast::<LargeListArray>(col)?.value(i),
            DataType::FixedSizeList(_, _) => downcast::<FixedSizeListArray>(col)?.value(i),
            other => {
                return Err((
                    i,
                    format!("is {other}, expected a list of float32 or float64"),
                ));
            }
        })
    };
    let mut out = Vec::with_capacity(rows.len());
    for &i in rows {
        let v = row_values(i)?;
        if v.null_count() > 0 {
            return Err((i, "holds a null value".into()));
        }
        let floats: Vec<f32> = if let Some(a) = v.as_any().downcast_ref::<Float32Array>() {
            a.values().to_vec()
        } else if let Some(a) = v.as_any().downcast_ref::<Float64Array>() {
            a.values().iter().map(|&x| x as f32).collect()
        } else {
            return Err((
                i,
                format!(
                    "is a list of {}, expected float32 or float64",
                    v.data_type()
                ),
            ));
        };
        if floats.len() != dim {
            return Err((
                i,
                format!(
                    "has {} values, expected {dim} (the model's width)",
                    floats.len()
                ),
            ));
        }
        if let Some(at) = floats.iter().position(|x| !x.is_finite()) {
            return Err((i, format!("value {at} is not a finite number")));
        }
        out.push(floats);
    }
    Ok(out)
}

fn downcast<T: 'static>(col: &dyn Array) -> Result<&T, RowError> {
    col.as_any().downcast_ref::<T>().ok_or_else(|| {
        (
            0,
            format!("is {}, which could not be read", col.data_type()),
        )
    })
}

/// A [`RowError`] of column `column` of `file` as the stage error users see
/// (`file:row: column 'x': message`, row 1-based).
pub(crate) fn row_error(file: &std::path::Path, column: &str, (row, msg): RowError) -> StageError {
    StageError::data(file, row as u64 + 1, column, msg)
}

/// The single file of a Parquet input (for messages naming it).
pub(crate) fn input_file(
    ctx: &flag_core::StageContext,
    name: &str,
) -> StageResult<std::path::PathBuf> {
    let art = ctx.input(name)?;
    art.files.first().cloned().ok_or_else(|| StageError::Input {
        input: name.into(),
        message: "has no file".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids_are_stable_and_field_bounded() {
        let a = item_id(
            "AAPL",
            1_700_000_000_000_000,
            "Apple up",
            Some("https://x/1"),
        );
        assert_eq!(a.len(), 16);
        assert_eq!(
            a,
            item_id(
                "AAPL",
                1_700_000_000_000_000,
                "Apple up",
                Some("https://x/1")
            )
        );
        // Moving a character across a field boundary changes the id.
        assert_ne!(
            item_id("AAPL", 1, "ab", Some("c")),
            item_id("AAPL", 1, "a", Some("bc"))
        );
        assert_ne!(
            a,
            item_id(
                "AAPL",
                1_700_000_000_000_001,
                "Apple up",
                Some("https://x/1")
            )
        );
        // Pinned: ids are part of stored artifacts and must not drift between builds.
        assert_eq!(item_id("AAPL", 0, "", None), PINNED);
    }
    const PINNED: &str = "4068473f7403f13b";

    #[test]
    fn texts_are_normalised_and_cut() {
        assert_eq!(
            item_text("  A\n title ", Some(" the\tsummary "), 100),
            "A title: the summary"
        );
        assert_eq!(item_text("T", Some("  "), 100), "T");
        assert_eq!(item_text("T", None, 100), "T");
        assert_eq!(item_text("Tiré", Some("x"), 3), "Tir");
        assert_eq!(query_text(" rates ", "short", true), "rates (short-term)");
        assert_eq!(query_text(" rates ", "short", false), "rates");
    }

    #[test]
    fn embeddings_round_trip_exactly_and_widths_are_checked() {
        let v = vec![vec![0.1f32, -0.2, 1.0 / 3.0], vec![0.5, 0.25, 0.125]];
        let arr = embedding_array(&v);
        assert_eq!(read_embeddings(arr.as_ref(), 3).unwrap(), v);
        assert_eq!(
            read_embeddings(arr.as_ref(), 4).unwrap_err(),
            (0, "has 3 values, expected 4 (the model's width)".into())
        );
    }
}
