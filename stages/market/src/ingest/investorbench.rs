//! The InvestorBench / FLAG-Trader market files (`<ticker lowercased>.json`, felis33/
//! INVESTOR-BENCH `data/`): one JSON object keyed by `YYYY-MM-DD`, each day
//! `{"prices": close, "news": [str], "10k": [str], "10q": [str]}` (crypto files have only
//! `prices` and `news`).
//!
//! Only `prices` is read: it is the day's close, and the files have no open, high, low or
//! volume, so those are `None` (null in the bars), never invented. The texts (`news`, `10k`,
//! `10q`) are skipped unread here, whatever they hold.
//!
//! Every defect is an error naming the file, the line of the day's date key, the field and the
//! date: a top level that is not an object, a key that is not a `YYYY-MM-DD` date, a day that
//! is not an object, a field other than `prices`/`news`/`10k`/`10q`, and a `prices` that is
//! missing, repeated, not a number (null, a string, ...), not finite or not > 0. Malformed JSON
//! is an error at serde_json's line, naming the date and field being read when it is inside a
//! day.
//!
//! Duplicate date keys: a plain `serde_json` map would keep the last copy silently, so the
//! object is read entry by entry (a map visitor) and every copy becomes a row; `ingest_ohlcv`
//! then drops copies with the same price (counted in `duplicates_dropped`) and rejects a date
//! whose copies disagree, naming both lines, exactly as for the CSV formats.
use std::cell::RefCell;
use std::fmt;
use std::path::Path;

use chrono::NaiveDate;
use flag_core::{StageError, StageResult};
use serde::Deserializer as _;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use serde_json::error::Category;

use super::ohlcv_formats::{ParsedFile, RawRow};

/// The fields a day may have.
const FIELDS: [&str; 4] = ["prices", "news", "10k", "10q"];

/// Where the parser is, for serde_json's own errors (syntax, types).
#[derive(Default)]
struct Where {
    key: Option<String>,
    field: Option<String>,
}

/// One top-level entry as read: every `prices` value (normally one) and the unknown fields.
struct Entry {
    key: String,
    prices: Vec<Value>,
    unknown: Vec<String>,
}

struct FileVisitor<'a>(&'a RefCell<Where>);

impl<'de> Visitor<'de> for FileVisitor<'_> {
    type Value = Vec<Entry>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object keyed by YYYY-MM-DD dates")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            self.0.borrow_mut().key = Some(key.clone());
            let (prices, unknown) = map.next_value_seed(DaySeed(self.0))?;
            *self.0.borrow_mut() = Where::default();
            out.push(Entry {
                key,
                prices,
                unknown,
            });
        }
        Ok(out)
    }
}

struct DaySeed<'a>(&'a RefCell<Where>);

impl<'de> DeserializeSeed<'de> for DaySeed<'_> {
    type Value = (Vec<Value>, Vec<String>);

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DaySeed<'_> {
    type Value = (Vec<Value>, Vec<String>);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with a 'prices' number")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut prices, mut unknown) = (Vec::new(), Vec::new());
        while let Some(field) = map.next_key::<String>()? {
            self.0.borrow_mut().field = Some(field.clone());
            if field == "prices" {
                prices.push(map.next_value::<Value>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
                if !FIELDS.contains(&field.as_str()) {
                    unknown.push(field);
                }
            }
            self.0.borrow_mut().field = None;
        }
        Ok((prices, unknown))
    }
}

/// 1-based line of each key of the top-level object, in file order (the order serde visits
/// them). A key is a string at depth 1 followed by `:`; strings are skipped with their escapes.
fn top_level_key_lines(text: &str) -> Vec<u64> {
    let b = text.as_bytes();
    let (mut depth, mut line, mut i) = (0usize, 1u64, 0usize);
    let mut out = Vec::new();
    while i < b.len() {
        match b[i] {
            b'\n' => line += 1,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let start = line;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    match b[i] {
                        b'\\' => i += 1,
                        b'\n' => line += 1,
                        _ => {}
                    }
                    i += 1;
                }
                if depth == 1 {
                    let rest = &b[(i + 1).min(b.len())..];
                    if rest.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b':') {
                        out.push(start);
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 40 => {
            format!("a string \"{}...\"", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("the string \"{s}\""),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A strictly positive, finite close.
fn close_price(file: &Path, line: u64, key: &str, v: &Value) -> StageResult<f64> {
    let bad = |m: String| StageError::data(file, line, "prices", format!("date {key}: {m}"));
    let x = match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| bad(format!("{n} is not a number")))?,
        other => return Err(bad(format!("expected a number, found {}", describe(other)))),
    };
    if !x.is_finite() {
        return Err(bad(format!("{x} is not a finite number")));
    }
    if x <= 0.0 {
        return Err(bad(format!("price must be > 0, got {x}")));
    }
    Ok(x)
}

/// Reads one InvestorBench file (see the module doc). Rows come in file order.
pub fn read(file: &Path, text: &str) -> StageResult<ParsedFile> {
    let at = RefCell::new(Where::default());
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = de
        .deserialize_map(FileVisitor(&at))
        .and_then(|e| de.end().map(|()| e))
        .map_err(|e| {
            let w = at.borrow();
            let column = w.field.clone().unwrap_or_else(|| "(json)".into());
            let day = w
                .key
                .as_ref()
                .map(|k| format!("date {k}: "))
                .unwrap_or_default();
            // 1e999 is valid JSON syntax, but no f64: serde_json's "number out of range".
            let what = if e.to_string().starts_with("number out of range") {
                "not a finite number: "
            } else if e.classify() == Category::Data {
                ""
            } else {
                "malformed JSON: "
            };
            StageError::data(file, e.line() as u64, column, format!("{day}{what}{e}"))
        })?;
    if entries.is_empty() {
        return Err(StageError::file(file, "the JSON object has no dates"));
    }
    let lines = top_level_key_lines(text);
    let mut out = ParsedFile::default();
    for (i, e) in entries.iter().enumerate() {
        let line = lines.get(i).copied().unwrap_or(0);
        out.rows_read += 1;
        let date = NaiveDate::parse_from_str(&e.key, "%Y-%m-%d")
            .ok()
            .filter(|_| e.key.len() == 10)
            .ok_or_else(|| {
                StageError::data(
                    file,
                    line,
                    "date",
                    format!("key '{}' is not a YYYY-MM-DD date", e.key),
                )
            })?;
        if let Some(f) = e.unknown.first() {
            return Err(StageError::data(
                file,
                line,
                f.clone(),
                format!(
                    "date {}: unknown field (a day has {})",
                    e.key,
                    FIELDS.join(", ")
                ),
            ));
        }
        let v = match e.prices.as_slice() {
            [v] => v,
            [] => {
                return Err(StageError::data(
                    file,
                    line,
                    "prices",
                    format!("date {}: missing", e.key),
                ));
            }
            many => {
                return Err(StageError::data(
                    file,
                    line,
                    "prices",
                    format!("date {}: appears {} times in one day", e.key, many.len()),
                ));
            }
        };
        out.rows.push(RawRow {
            date,
            open: None,
            high: None,
            low: None,
            close: close_price(file, line, &e.key, v)?,
            volume: None,
            adj_close: None,
            line,
            off_midnight: false,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lines_skip_nested_keys_and_strings() {
        let text = "{\n \"2020-01-02\": {\"prices\": 1, \"news\": [\"a \\\"b\\\": c\", \"{\"]},\n\
                    \"2020-01-03\"\n : {\"prices\": 2}\n}";
        assert_eq!(top_level_key_lines(text), vec![2, 3]);
    }

    #[test]
    fn duplicate_keys_are_all_kept_in_file_order() {
        let text = "{\"2020-01-02\": {\"prices\": 1},\n\"2020-01-02\": {\"prices\": 2}}";
        let p = read(Path::new("x.json"), text).unwrap();
        let got: Vec<(u64, f64)> = p.rows.iter().map(|r| (r.line, r.close)).collect();
        assert_eq!(got, vec![(1, 1.0), (2, 2.0)]);
        assert_eq!(p.rows_read, 2);
    }
}
