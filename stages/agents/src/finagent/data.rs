//! Readers of the tables FinAgent's stages share: embedded news items (`news_items`), bars,
//! and the per-day module outputs, keyed by (ticker, date).
use std::collections::BTreeMap;

use flag_core::arrow::array::{
    Array, BooleanArray, Date32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use flag_core::{StageError, StageResult};
use flag_trading::series::{Series, from_days, read_series};

use crate::util::{column, null_err};

/// One news item as the modules show it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewsItem {
    pub id: String,
    pub date: i32,
    pub published_at: i64,
    pub text: String,
}

/// News items per ticker, sorted by (trading date, publication instant, id).
pub type ItemsByTicker = BTreeMap<String, Vec<NewsItem>>;

pub fn read_items(batch: &RecordBatch, input: &str) -> StageResult<ItemsByTicker> {
    let id = column::<StringArray>(batch, input, "item_id", "utf8")?;
    let ticker = column::<StringArray>(batch, input, "ticker", "utf8")?;
    let date = column::<Date32Array>(batch, input, "trading_date", "date32")?;
    let published =
        column::<TimestampMicrosecondArray>(batch, input, "published_at", "timestamp_us_utc")?;
    let text = column::<StringArray>(batch, input, "text", "utf8")?;
    let mut out: ItemsByTicker = BTreeMap::new();
    for i in 0..batch.num_rows() {
        for (null, name) in [
            (id.is_null(i), "item_id"),
            (ticker.is_null(i), "ticker"),
            (date.is_null(i), "trading_date"),
            (published.is_null(i), "published_at"),
            (text.is_null(i), "text"),
        ] {
            if null {
                return Err(null_err(input, i, name));
            }
        }
        out.entry(ticker.value(i).to_string())
            .or_default()
            .push(NewsItem {
                id: id.value(i).to_string(),
                date: date.value(i),
                published_at: published.value(i),
                text: text.value(i).to_string(),
            });
    }
    for items in out.values_mut() {
        items.sort_by(|a, b| (a.date, a.published_at, &a.id).cmp(&(b.date, b.published_at, &b.id)));
    }
    Ok(out)
}

/// The news a module sees on `date`: items whose trading date is `date` (the ingest already
/// moved after-close items to the next trading day), at most `max` of them: the latest
/// published, shown in publication order. Latest, because they are the freshest information
/// at the decision; the choice is deterministic (ties by id).
pub fn todays_items(items: &[NewsItem], date: i32, max: usize) -> Vec<&NewsItem> {
    let lo = items.partition_point(|x| x.date < date);
    let hi = items.partition_point(|x| x.date <= date);
    let day = &items[lo..hi];
    day[day.len().saturating_sub(max)..].iter().collect()
}

/// Bars per ticker with open/high/low kept where present.
pub fn read_bars(batch: &RecordBatch, input: &str) -> StageResult<BTreeMap<String, Series>> {
    Ok(read_series(batch, input, &["open", "high", "low"])?
        .into_iter()
        .map(|s| (s.ticker.clone(), s))
        .collect())
}

/// A per-(ticker, date) row of an upstream module, as later modules use it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModuleRow {
    /// The module's text for later prompts (None: not called, or failed).
    pub text: Option<String>,
    pub failed: bool,
}

/// Reads `text_column` of a module table keyed by (ticker, date); `failed` marks a
/// recorded failure.
pub fn read_module_rows(
    batch: &RecordBatch,
    input: &str,
    text_column: &str,
) -> StageResult<BTreeMap<(String, i32), ModuleRow>> {
    let ticker = column::<StringArray>(batch, input, "ticker", "utf8")?;
    let date = column::<Date32Array>(batch, input, "date", "date32")?;
    let text = column::<StringArray>(batch, input, text_column, "utf8")?;
    let failed = column::<BooleanArray>(batch, input, "failed", "bool")?;
    let mut out = BTreeMap::new();
    for i in 0..batch.num_rows() {
        if ticker.is_null(i) || date.is_null(i) {
            return Err(null_err(input, i, "ticker/date"));
        }
        let key = (ticker.value(i).to_string(), date.value(i));
        let row = ModuleRow {
            text: (!text.is_null(i)).then(|| text.value(i).to_string()),
            failed: !failed.is_null(i) && failed.value(i),
        };
        if out.insert(key.clone(), row).is_some() {
            return Err(StageError::Input {
                input: input.into(),
                message: format!(
                    "row {}: a second row for {} on {}",
                    i + 1,
                    key.0,
                    from_days(key.1)
                ),
            });
        }
    }
    Ok(out)
}

/// Per (ticker, decision date): the kept (item date, item id), in date order.
pub type KeptHits = BTreeMap<(String, i32), Vec<(i32, String)>>;

/// The items a `memory_hits` table keeps for each (ticker, decision date), in date order.
pub fn read_kept_hits(batch: &RecordBatch, input: &str) -> StageResult<KeptHits> {
    let ticker = column::<StringArray>(batch, input, "ticker", "utf8")?;
    let date = column::<Date32Array>(batch, input, "date", "date32")?;
    let item = column::<StringArray>(batch, input, "item_id", "utf8")?;
    let item_date = column::<Date32Array>(batch, input, "item_date", "date32")?;
    let kept = column::<BooleanArray>(batch, input, "kept", "bool")?;
    let mut out: KeptHits = BTreeMap::new();
    for i in 0..batch.num_rows() {
        for (null, name) in [
            (ticker.is_null(i), "ticker"),
            (date.is_null(i), "date"),
            (item.is_null(i), "item_id"),
            (item_date.is_null(i), "item_date"),
            (kept.is_null(i), "kept"),
        ] {
            if null {
                return Err(null_err(input, i, name));
            }
        }
        if !kept.value(i) {
            continue;
        }
        if item_date.value(i) >= date.value(i) {
            // The retrieval stage guarantees this; a table that breaks it would leak the future.
            return Err(StageError::Input {
                input: input.into(),
                message: format!(
                    "row {}: item {} dated {} retrieved for {}: memory must be strictly earlier",
                    i + 1,
                    item.value(i),
                    from_days(item_date.value(i)),
                    from_days(date.value(i))
                ),
            });
        }
        let v = out
            .entry((ticker.value(i).to_string(), date.value(i)))
            .or_default();
        let entry = (item_date.value(i), item.value(i).to_string());
        if !v.contains(&entry) {
            v.push(entry);
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, date: i32, t: i64) -> NewsItem {
        NewsItem {
            id: id.into(),
            date,
            published_at: t,
            text: id.into(),
        }
    }

    #[test]
    fn todays_items_are_the_latest_in_publication_order() {
        let v = vec![
            item("a", 1, 5),
            item("b", 2, 1),
            item("c", 2, 2),
            item("d", 2, 3),
            item("e", 3, 0),
        ];
        let ids = |d, m| {
            todays_items(&v, d, m)
                .iter()
                .map(|x| x.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(2, 2), vec!["c", "d"]);
        assert_eq!(ids(2, 9), vec!["b", "c", "d"]);
        assert!(ids(4, 3).is_empty());
    }
}
