//! FinAgent's memory stages with the real all-MiniLM-L6-v2 on real news (stocknewsapi, AAPL
//! and MSFT, 3-14 January 2022): retrieval equals a brute-force f64 reference over the vectors
//! read back from the Parquet, no query sees an item dated on or after its decision day,
//! ids and artifacts are stable, the diversified de-duplication, and errors that name the
//! file, row and column.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use chrono::NaiveDate;
use flag_agents::memory::news_embed::NewsEmbed;
use flag_agents::memory::search::MemorySearch;
use flag_agents::memory::{
    EmbedSettings, Embedder, Hit, diversify, embed_by_length, item_id, item_text, query_text,
    read_embeddings,
};
use flag_core::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Float32Array, Float32Builder, Float64Array,
    Int64Array, ListBuilder, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use flag_core::arrow::datatypes::{DataType, Field, Schema};
use flag_core::parquet_io::write_parquet_file;
use flag_llm::embed::MiniLmEmbedder;
use serde_json::json;

const TICKERS: [&str; 2] = ["AAPL", "MSFT"];
const START: &str = "2022-01-03";
const END: &str = "2022-01-14";

fn days(s: &str) -> i32 {
    flag_trading::series::to_days(NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap())
}

fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("memory-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The news slice and its `news_embed` output, made once per test binary.
struct Fixture {
    news: PathBuf,
    items: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        tch::set_num_threads(2);
        let root = tmp("slice");
        let slice = common::slice(&root, &TICKERS, Some((&TICKERS, START, END)));
        let news = slice.news.unwrap();
        let dir = common::run(
            &NewsEmbed,
            json!({}),
            &[("news", news.clone())],
            &root.join("a"),
        )
        .unwrap();
        Fixture {
            news,
            items: common::output(&dir, &NewsEmbed, "items"),
        }
    })
}

fn strings(b: &RecordBatch, n: &str) -> Vec<String> {
    let a = b.column_by_name(n).unwrap();
    let a = a.as_any().downcast_ref::<StringArray>().unwrap();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

fn dates(b: &RecordBatch, n: &str) -> Vec<i32> {
    let a = b.column_by_name(n).unwrap();
    a.as_any()
        .downcast_ref::<Date32Array>()
        .unwrap()
        .values()
        .to_vec()
}

/// A `memory_queries` table (nullable fields, so a test can put a null in).
fn queries_file(dir: &Path, rows: &[(&str, &str, &str, Option<&str>)]) -> PathBuf {
    let schema = Arc::new(Schema::new(vec![
        Field::new("ticker", DataType::Utf8, true),
        Field::new("date", DataType::Date32, true),
        Field::new("query_type", DataType::Utf8, true),
        Field::new("query", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(Date32Array::from(
            rows.iter().map(|r| days(r.1)).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.3).collect::<Vec<_>>(),
        )),
    ];
    let path = dir.join("queries.parquet");
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    write_parquet_file(&path, schema, &[batch]).unwrap();
    path
}

/// FinAgent-style queries: three horizons for both tickers on a few decision days, the first
/// one before any news (empty memory).
fn finagent_queries() -> Vec<(
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
)> {
    let mut q = Vec::new();
    for t in TICKERS {
        for d in ["2022-01-03", "2022-01-06", "2022-01-11", "2022-01-14"] {
            q.push((
                t,
                d,
                "short",
                Some("earnings expectations and analyst price targets"),
            ));
            q.push((
                t,
                d,
                "medium",
                Some("supply chain, chip shortage and product demand"),
            ));
            q.push((
                t,
                d,
                "long",
                Some("long-term growth strategy, cloud and services"),
            ));
        }
    }
    q
}

fn search(memory: &Path, queries: &Path, dir: &Path, given: serde_json::Value) -> RecordBatch {
    tch::set_num_threads(2);
    let out = common::run(
        &MemorySearch,
        given,
        &[
            ("memory", memory.to_path_buf()),
            ("queries", queries.to_path_buf()),
        ],
        dir,
    )
    .unwrap();
    common::read(&common::output(&out, &MemorySearch, "hits"))
}

/// The stages' embedder with its default params.
fn embedder() -> Embedder {
    tch::set_num_threads(2);
    let p = common::params(&MemorySearch, json!({}));
    EmbedSettings::from_params(&p).unwrap().load().unwrap()
}

fn minilm() -> MiniLmEmbedder {
    tch::set_num_threads(2);
    let dir = flag_llm::models::minilm_dir(None).expect("MiniLM installed (just setup)");
    MiniLmEmbedder::load(&dir, tch::Device::Cpu).unwrap()
}

#[test]
fn news_items_are_the_news_with_stable_ids_texts_and_unit_vectors() {
    let fx = fixture();
    let news = common::read(&fx.news);
    let items = common::read(&fx.items);
    assert!(items.num_rows() > 200, "{} items", items.num_rows());
    assert_eq!(items.num_rows(), news.num_rows());
    let published = news
        .column_by_name("published_at")
        .unwrap()
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .unwrap();
    let (ticker, title, summary, url) = (
        strings(&news, "ticker"),
        strings(&news, "title"),
        strings(&news, "summary"),
        strings(&news, "url"),
    );
    let ids = strings(&items, "item_id");
    let texts = strings(&items, "text");
    for i in 0..news.num_rows() {
        assert_eq!(
            ids[i],
            item_id(&ticker[i], published.value(i), &title[i], Some(&url[i]))
        );
        assert_eq!(texts[i], item_text(&title[i], Some(&summary[i]), 1000));
    }
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    let vecs = read_embeddings(items.column_by_name("embedding").unwrap().as_ref(), 384).unwrap();
    for v in &vecs {
        let n: f64 = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "norm {n}");
    }
    // The vectors are MiniLM's: re-embedding a few texts alone gives the same direction.
    let emb = minilm();
    let again = emb.embed(&texts[..4]).unwrap();
    for (a, b) in again.iter().zip(&vecs) {
        let cos: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        assert!(cos > 0.9999, "cosine {cos}");
    }
}

#[test]
fn two_runs_give_identical_artifacts() {
    let fx = fixture();
    let root = tmp("twice");
    let dir = common::run(
        &NewsEmbed,
        json!({}),
        &[("news", fx.news.clone())],
        &root.join("b"),
    )
    .unwrap();
    let again = common::output(&dir, &NewsEmbed, "items");
    assert_eq!(
        std::fs::read(&fx.items).unwrap(),
        std::fs::read(&again).unwrap(),
        "news_embed is not byte-reproducible"
    );
    let q = queries_file(&root, &finagent_queries());
    let a = search(&fx.items, &q, &root.join("s1"), json!({}));
    let b = search(&again, &q, &root.join("s2"), json!({}));
    assert_eq!(a, b);
    assert_eq!(
        std::fs::read(root.join("s1/hits.parquet")).unwrap(),
        std::fs::read(root.join("s2/hits.parquet")).unwrap()
    );
}

/// One reference ranking: every item of the ticker dated before the day, scored in f64 by a
/// plain sequential sum, sorted by (score desc, date, item_id).
fn reference(
    q: &[f32],
    ticker: &str,
    day: i32,
    items: &[(String, String, i32, Vec<f64>)],
) -> Vec<(String, i32, f64)> {
    let mut r: Vec<(String, i32, f64)> = items
        .iter()
        .filter(|(_, t, d, _)| t == ticker && *d < day)
        .map(|(id, _, d, v)| {
            let s: f64 = q.iter().zip(v).map(|(x, y)| f64::from(*x) * y).sum();
            (id.clone(), *d, s)
        })
        .collect();
    r.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.1.cmp(&b.1)).then(a.0.cmp(&b.0)));
    r
}

#[test]
fn retrieval_equals_a_brute_force_f64_reference_and_never_looks_ahead() {
    let fx = fixture();
    let root = tmp("reference");
    let qrows = finagent_queries();
    let qfile = queries_file(&root, &qrows);
    let hits = search(&fx.items, &qfile, &root.join("s"), json!({}));

    // The memory exactly as stored: the float32 values read back from the Parquet, widened.
    let items = common::read(&fx.items);
    let emb = items.column_by_name("embedding").unwrap();
    let emb = emb
        .as_any()
        .downcast_ref::<flag_core::arrow::array::ListArray>()
        .unwrap();
    let memory: Vec<(String, String, i32, Vec<f64>)> = strings(&items, "item_id")
        .into_iter()
        .zip(strings(&items, "ticker"))
        .zip(dates(&items, "trading_date"))
        .enumerate()
        .map(|(i, ((id, t), d))| {
            let v = emb.value(i);
            let v = v.as_any().downcast_ref::<Float32Array>().unwrap();
            (id, t, d, v.values().iter().map(|&x| f64::from(x)).collect())
        })
        .collect();
    let date_of: BTreeMap<&str, (&str, i32)> = memory
        .iter()
        .map(|(id, t, d, _)| (id.as_str(), (t.as_str(), *d)))
        .collect();

    // The queries as the stage embeds them: the horizon suffix, shortest first, 64 a call.
    let texts: Vec<String> = qrows
        .iter()
        .map(|r| query_text(r.3.unwrap(), r.2, true))
        .collect();
    assert_eq!(
        texts[0],
        "earnings expectations and analyst price targets (short-term)"
    );
    let qvecs = embed_by_length(&embedder(), &texts, 64, "queries", &|_, _, _| {}).unwrap();

    let (h_ticker, h_date, h_type) = (
        strings(&hits, "ticker"),
        dates(&hits, "date"),
        strings(&hits, "query_type"),
    );
    let (h_id, h_item_date) = (strings(&hits, "item_id"), dates(&hits, "item_date"));
    let h_rank = hits
        .column_by_name("rank")
        .unwrap()
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .values()
        .to_vec();
    let h_score = hits
        .column_by_name("score")
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap()
        .values()
        .to_vec();
    let h_kept = hits
        .column_by_name("kept")
        .unwrap()
        .as_any()
        .downcast_ref::<BooleanArray>()
        .unwrap()
        .clone();

    // (b) no look-ahead, and only the query's ticker.
    for i in 0..hits.num_rows() {
        assert!(
            h_item_date[i] < h_date[i],
            "row {i}: item dated on or after the day"
        );
        let (t, d) = date_of[h_id[i].as_str()];
        assert_eq!((t, d), (h_ticker[i].as_str(), h_item_date[i]));
    }

    // (a) per query: the stage's top 3 are the reference's, in order (exact ties aside).
    let mut by_query: BTreeMap<(String, i32, String), Vec<usize>> = BTreeMap::new();
    for i in 0..hits.num_rows() {
        by_query
            .entry((h_ticker[i].clone(), h_date[i], h_type[i].clone()))
            .or_default()
            .push(i);
    }
    let mut empty = 0;
    for (q, row) in qrows.iter().enumerate() {
        let day = days(row.1);
        let want = reference(&qvecs[q], row.0, day, &memory);
        let got = by_query
            .get(&(row.0.to_string(), day, row.2.to_string()))
            .cloned()
            .unwrap_or_default();
        if want.is_empty() {
            empty += 1;
            assert!(got.is_empty(), "{row:?}: hits without memory");
            continue;
        }
        assert_eq!(got.len(), want.len().min(3), "{row:?}");
        for (r, &i) in got.iter().enumerate() {
            assert_eq!(h_rank[i], r as i64 + 1);
            let tie = |a: f64, b: f64| (a - b).abs() < 1e-12;
            assert!(
                h_id[i] == want[r].0 || tie(h_score[i], want[r].2),
                "{row:?} rank {}: {} ({}) vs reference {} ({})",
                r + 1,
                h_id[i],
                h_score[i],
                want[r].0,
                want[r].2
            );
            let own = want.iter().find(|w| w.0 == h_id[i]).unwrap().2;
            assert!(tie(h_score[i], own), "score {} vs {own}", h_score[i]);
        }
    }
    // The first decision day precedes every item: 6 queries (3 per ticker) without memory.
    assert_eq!(empty, 6);

    // kept = the day's diversified result: first occurrences across the three horizons.
    let mut day_rows: BTreeMap<(String, i32), Vec<usize>> = BTreeMap::new();
    for i in 0..hits.num_rows() {
        day_rows
            .entry((h_ticker[i].clone(), h_date[i]))
            .or_default()
            .push(i);
    }
    for rows in day_rows.values() {
        let mut seen = std::collections::BTreeSet::new();
        for &i in rows {
            assert_eq!(h_kept.value(i), seen.insert(h_id[i].clone()), "row {i}");
        }
    }
}

/// A memory table written by hand: list<float32> embeddings (as DuckDB's FLOAT[] would be).
fn memory_file(dir: &Path, rows: &[(&str, &str, &str, Vec<f32>)]) -> PathBuf {
    let mut b = ListBuilder::new(Float32Builder::new());
    for r in rows {
        b.values().append_slice(&r.3);
        b.append(true);
    }
    let cols: Vec<(&str, ArrayRef)> = vec![
        (
            "item_id",
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        ),
        (
            "ticker",
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
        ),
        (
            "day",
            Arc::new(Date32Array::from(
                rows.iter().map(|r| days(r.2)).collect::<Vec<_>>(),
            )),
        ),
        ("embedding", Arc::new(b.finish())),
    ];
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let path = dir.join("memory.parquet");
    write_parquet_file(&path, batch.schema(), &[batch]).unwrap();
    path
}

#[test]
fn an_item_identical_to_the_query_is_found_only_when_dated_before_the_day() {
    let root = tmp("lookahead");
    let q = "Apple faces a new antitrust probe in Europe";
    let emb = minilm();
    // The query's own embedding (as the stage computes it, suffix included) on the decision
    // day, the day after and the day before, plus an unrelated item two days before.
    let v = emb
        .embed(&[query_text(q, "short", true), "Bananas are yellow".into()])
        .unwrap();
    let memory = memory_file(
        &root,
        &[
            ("same_day", "AAPL", "2022-03-10", v[0].clone()),
            ("next_day", "AAPL", "2022-03-11", v[0].clone()),
            ("day_before", "AAPL", "2022-03-09", v[0].clone()),
            ("other", "AAPL", "2022-03-08", v[1].clone()),
            ("other_ticker", "MSFT", "2022-03-01", v[0].clone()),
        ],
    );
    let queries = queries_file(&root, &[("AAPL", "2022-03-10", "short", Some(q))]);
    let hits = search(
        &memory,
        &queries,
        &root.join("s"),
        json!({"date_column": "day"}),
    );
    assert_eq!(strings(&hits, "item_id"), ["day_before", "other"]);
    let score = hits
        .column_by_name("score")
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap()
        .value(0);
    assert!((score - 1.0).abs() < 1e-6, "self-similarity {score}");
}

fn hit(id: &str, date: i32, score: f64) -> Hit {
    Hit {
        row: 0,
        item_id: id.into(),
        date,
        score,
    }
}

#[test]
fn diversified_result_is_top_k_per_type_deduplicated_in_date_order() {
    let short = vec![
        hit("a", 5, 0.9),
        hit("b", 3, 0.8),
        hit("c", 9, 0.7),
        hit("z", 1, 0.6),
    ];
    let medium = vec![hit("b", 3, 0.95), hit("d", 2, 0.5), hit("e", 4, 0.4)];
    let long = vec![hit("c", 9, 0.99), hit("a", 5, 0.9), hit("f", 3, 0.3)];
    let got = diversify(&[short, medium, long], 3);
    let ids: Vec<&str> = got.iter().map(|c| c.hit.item_id.as_str()).collect();
    // z is short's 4th (beyond k); b, c, a repeat and keep their first occurrence; the rest
    // in date order, ties (b and f on day 3) by item id.
    assert_eq!(ids, ["d", "b", "f", "e", "a", "c"]);
    let from: Vec<(usize, usize)> = got.iter().map(|c| (c.kind, c.rank)).collect();
    assert_eq!(from, [(1, 1), (0, 1), (2, 2), (1, 2), (0, 0), (0, 2)]);
    assert!(diversify(&[vec![], vec![]], 3).is_empty());
    assert_eq!(diversify(&[vec![hit("a", 1, 0.1)]], 0), vec![]);
}

fn search_err(memory: &Path, queries: &Path, dir: &Path, given: serde_json::Value) -> String {
    common::run(
        &MemorySearch,
        given,
        &[
            ("memory", memory.to_path_buf()),
            ("queries", queries.to_path_buf()),
        ],
        dir,
    )
    .unwrap_err()
    .to_string()
}

#[test]
fn bad_inputs_are_errors_naming_file_row_and_column() {
    let root = tmp("errors");
    let unit = |i: usize| {
        let mut v = vec![0f32; 384];
        v[i] = 1.0;
        v
    };
    let good = root.join("good");
    std::fs::create_dir_all(&good).unwrap();
    let good_q = queries_file(&good, &[("AAPL", "2022-03-10", "short", Some("rates"))]);

    // An embedding of the wrong width, on the third row.
    let mut short = unit(2);
    short.pop();
    let memory = memory_file(
        &root,
        &[
            ("a", "AAPL", "2022-03-01", unit(0)),
            ("b", "AAPL", "2022-03-02", unit(1)),
            ("c", "AAPL", "2022-03-03", short),
        ],
    );
    let e = search_err(
        &memory,
        &good_q,
        &root.join("s1"),
        json!({"date_column": "day"}),
    );
    assert_eq!(
        e,
        format!(
            "{}:3: column 'embedding': has 383 values, expected 384 (the model's width)",
            memory.display()
        )
    );

    // A null query, on the second row.
    let memory = memory_file(&root, &[("a", "AAPL", "2022-03-01", unit(0))]);
    let q = queries_file(
        &root,
        &[
            ("AAPL", "2022-03-10", "short", Some("rates")),
            ("AAPL", "2022-03-10", "medium", None),
        ],
    );
    let e = search_err(&memory, &q, &root.join("s2"), json!({"date_column": "day"}));
    assert_eq!(e, format!("{}:2: column 'query': is null", q.display()));

    // The same query type twice for one ticker and day.
    let q = queries_file(
        &root,
        &[
            ("AAPL", "2022-03-10", "short", Some("rates")),
            ("AAPL", "2022-03-10", "short", Some("jobs")),
        ],
    );
    let e = search_err(&memory, &q, &root.join("s3"), json!({"date_column": "day"}));
    assert_eq!(
        e,
        format!(
            "{}:2: column 'query_type': a second 'short' query for AAPL on 2022-03-10 (the \
             first is row 1)",
            q.display()
        )
    );

    // A duplicate item id, a missing date column, a NaN.
    let memory = memory_file(
        &root,
        &[
            ("a", "AAPL", "2022-03-01", unit(0)),
            ("a", "AAPL", "2022-03-02", unit(1)),
        ],
    );
    let e = search_err(
        &memory,
        &good_q,
        &root.join("s4"),
        json!({"date_column": "day"}),
    );
    assert_eq!(
        e,
        format!(
            "{}:2: column 'item_id': 'a' is also row 1",
            memory.display()
        )
    );
    let e = search_err(&memory, &good_q, &root.join("s5"), json!({}));
    assert_eq!(e, "input 'memory': has no column 'trading_date'");
    let mut nan = unit(0);
    nan[7] = f32::NAN;
    let memory = memory_file(&root, &[("a", "AAPL", "2022-03-01", nan)]);
    let e = search_err(
        &memory,
        &good_q,
        &root.join("s6"),
        json!({"date_column": "day"}),
    );
    assert_eq!(
        e,
        format!(
            "{}:1: column 'embedding': value 7 is not a finite number",
            memory.display()
        )
    );

    // Params.
    let e = search_err(&memory, &good_q, &root.join("s7"), json!({"top_k": 0}));
    assert_eq!(e, "param 'top_k': must be at least 1");
    let e = search_err(
        &memory,
        &good_q,
        &root.join("s8"),
        json!({"backend": "openai", "api_key_env": "x"}),
    );
    assert!(
        e.contains("param 'base_url': is required with backend openai"),
        "{e}"
    );
}

#[test]
fn duplicate_news_items_are_an_error_naming_both_rows() {
    let fx = fixture();
    let root = tmp("dup");
    let news = common::read(&fx.news);
    let first = news.slice(0, 3);
    let again = news.slice(1, 1);
    let both = flag_core::arrow::compute::concat_batches(&news.schema(), &[first, again]).unwrap();
    let path = root.join("news.parquet");
    write_parquet_file(&path, both.schema(), &[both]).unwrap();
    let e = common::run(
        &NewsEmbed,
        json!({}),
        &[("news", path.clone())],
        &root.join("o"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with(&format!(
            "{}: rows 2 and 4 have the same item_id ",
            path.display()
        )),
        "{e}"
    );
}
