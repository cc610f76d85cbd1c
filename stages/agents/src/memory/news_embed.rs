//! `news_embed`: every news item (of the chosen tickers and trading dates) embedded once, as
//! the rows of a `news_items` table; FinAgent's memory at day t is its rows dated before t.
use std::collections::BTreeMap;
use std::sync::Arc;

use flag_core::arrow::array::{
    Array, Date32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use flag_core::schema::schema;
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use flag_llm::backend::{backend_numerics, device_env};
use serde_json::{Value, json};

use super::{
    EmbedSettings, Embedder, embed_by_length, embed_model_files, embed_param_specs, embedding_array,
};
use super::{input_file, item_id, item_text};
use crate::util::{self, column};

const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/news_embed-1"
);

pub struct NewsEmbed;

#[derive(Debug, Clone)]
pub struct NewsEmbedConfig {
    pub tickers: Option<Vec<String>>,
    pub start: Option<i32>,
    pub end: Option<i32>,
    pub max_chars: usize,
    pub batch_size: usize,
    pub embed: EmbedSettings,
}

impl NewsEmbedConfig {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let positive = |n: &str| -> StageResult<usize> {
            match p.usize(n)? {
                0 => Err(StageError::param(n, "must be at least 1")),
                v => Ok(v),
            }
        };
        let cfg = NewsEmbedConfig {
            tickers: util::ticker_filter(p)?,
            start: util::opt_date(p, "start")?,
            end: util::opt_date(p, "end")?,
            max_chars: positive("max_chars")?,
            batch_size: positive("batch_size")?,
            embed: EmbedSettings::from_params(p)?,
        };
        if matches!((cfg.start, cfg.end), (Some(s), Some(e)) if s > e) {
            return Err(StageError::param("end", "is before start"));
        }
        Ok(cfg)
    }
}

/// The items to embed, in news order, before embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub item_id: String,
    pub ticker: String,
    pub trading_date: i32,
    pub published_at: i64,
    pub title: String,
    pub summary: Option<String>,
    pub url: Option<String>,
    pub text: String,
}

/// The news rows that pass the filters, as items with their ids and texts. A null where the
/// news schema allows none is an error naming the file, row and column; two rows with one
/// id (the same ticker, instant, title and url) are an error naming both rows.
pub fn select_items(
    batch: &RecordBatch,
    file: &std::path::Path,
    cfg: &NewsEmbedConfig,
) -> StageResult<Vec<Item>> {
    let ticker = column::<StringArray>(batch, "news", "ticker", "utf8")?;
    let published =
        column::<TimestampMicrosecondArray>(batch, "news", "published_at", "timestamp_us_utc")?;
    let date = column::<Date32Array>(batch, "news", "trading_date", "date32")?;
    let title = column::<StringArray>(batch, "news", "title", "utf8")?;
    let summary = column::<StringArray>(batch, "news", "summary", "utf8")?;
    let url = column::<StringArray>(batch, "news", "url", "utf8")?;
    let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
    let mut items = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..batch.num_rows() {
        for (arr, name) in [
            (ticker as &dyn Array, "ticker"),
            (published, "published_at"),
            (date, "trading_date"),
            (title, "title"),
        ] {
            if arr.is_null(i) {
                return Err(StageError::data(file, i as u64 + 1, name, "is null"));
            }
        }
        let (t, d) = (ticker.value(i), date.value(i));
        if cfg
            .tickers
            .as_ref()
            .is_some_and(|w| !w.iter().any(|x| x == t))
            || cfg.start.is_some_and(|s| d < s)
            || cfg.end.is_some_and(|e| d > e)
        {
            continue;
        }
        let (summary, url) = (opt(summary, i), opt(url, i));
        let id = item_id(t, published.value(i), title.value(i), url.as_deref());
        if let Some(first) = seen.insert(id.clone(), i) {
            return Err(StageError::file(
                file,
                format!(
                    "rows {} and {} have the same item_id {id} (the same ticker, \
                     published_at, title and url): the news input has a duplicate",
                    first + 1,
                    i + 1
                ),
            ));
        }
        items.push(Item {
            item_id: id,
            ticker: t.to_string(),
            trading_date: d,
            published_at: published.value(i),
            text: item_text(title.value(i), summary.as_deref(), cfg.max_chars),
            title: title.value(i).to_string(),
            summary,
            url,
        });
    }
    Ok(items)
}

/// Embeds the items' texts, `batch_size` at a time, shortest first ([`embed_by_length`]).
pub fn embed_items(
    items: &[Item],
    batch_size: usize,
    embedder: &Embedder,
    progress: &dyn Fn(u64, u64, &str),
) -> StageResult<Vec<Vec<f32>>> {
    let texts: Vec<String> = items.iter().map(|it| it.text.clone()).collect();
    embed_by_length(embedder, &texts, batch_size, "news items", progress)
}

/// The `news_items` batch.
pub fn items_batch(items: &[Item], vectors: &[Vec<f32>]) -> StageResult<RecordBatch> {
    schema("news_items")?.batch(vec![
        util::utf8(items.iter().map(|i| i.item_id.as_str())),
        util::utf8(items.iter().map(|i| i.ticker.as_str())),
        util::date32(items.iter().map(|i| i.trading_date).collect()),
        Arc::new(
            TimestampMicrosecondArray::from(
                items.iter().map(|i| i.published_at).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        util::utf8(items.iter().map(|i| i.title.as_str())),
        util::opt_utf8(items.iter().map(|i| i.summary.clone()).collect()),
        util::opt_utf8(items.iter().map(|i| i.url.clone()).collect()),
        util::utf8(items.iter().map(|i| i.text.as_str())),
        embedding_array(vectors),
    ])
}

/// The params of the stages that embed: the embedder's, shared with `memory_search`.
pub(crate) fn embed_environment(p: &Params) -> Vec<(String, String)> {
    device_env(p)
}

impl Stage for NewsEmbed {
    fn kind(&self) -> &'static str {
        "news_embed"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        NewsEmbedConfig::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        let mut params = vec![
            ParamSpec::with_default(
                "tickers",
                ParamKind::List,
                Value::Null,
                "Tickers to embed (default: all in the news)",
            ),
            ParamSpec::with_default(
                "start",
                ParamKind::Date,
                Value::Null,
                "First trading_date embedded",
            ),
            ParamSpec::with_default(
                "end",
                ParamKind::Date,
                Value::Null,
                "Last trading_date embedded",
            ),
            ParamSpec::with_default(
                "max_chars",
                ParamKind::Int,
                json!(1000),
                "Characters of \"title: summary\" embedded (whitespace-normalised, then cut); \
                 MiniLM reads at most 256 word pieces, about 1,000 characters of English",
            ),
            ParamSpec::with_default(
                "batch_size",
                ParamKind::Int,
                json!(64),
                "Texts per embedding call",
            ),
        ];
        params.extend(embed_param_specs());
        StageSpec {
            doc: "News items embedded with all-MiniLM-L6-v2 (384-dim unit vectors): FinAgent's \
                  memory, one row per item with a stable item_id and the exact text embedded.",
            inputs: vec![InputSpec::one(
                "news",
                "news",
                "News items with their trading date",
            )],
            outputs: vec![OutputSpec::parquet(
                "items",
                "news_items",
                "Embedded news items",
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

impl flag_core::RunStage for NewsEmbed {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let cfg = NewsEmbedConfig::from_params(&ctx.params)?;
        let file = input_file(ctx, "news")?;
        let items = select_items(&ctx.read_input("news")?, &file, &cfg)?;
        let embedder = cfg.embed.load()?;
        ctx.log(format!(
            "embedder {}, device {}, {} news items",
            embedder.name(),
            cfg.embed.device_name,
            items.len()
        ));
        let started = std::time::Instant::now();
        let progress = |d: u64, t: u64, m: &str| ctx.progress(d, t, m);
        let vectors = embed_items(&items, cfg.batch_size, &embedder, &progress)?;
        let secs = started.elapsed().as_secs_f64();
        ctx.log(format!(
            "{} items embedded in {secs:.1} s ({:.1} items/s)",
            items.len(),
            items.len() as f64 / secs.max(1e-9)
        ));
        ctx.write_parquet("items", &[items_batch(&items, &vectors)?])?;
        Ok(())
    }
}
