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
//! The file is streamed (`serde_json` over a reader; the texts are skipped unbuffered), never
//! read whole: a JSON string or bare token longer than [`MAX_TOKEN_BYTES`] is refused when it
//! is read, at its line, and an error quotes at most `util::QUOTE_MAX` bytes of a key.
//!
//! Duplicate date keys: a plain `serde_json` map would keep the last copy silently, so the
//! object is read entry by entry (a map visitor) and every copy becomes a row; `ingest_ohlcv`
//! then drops copies with the same price (counted in `duplicates_dropped`) and rejects a date
//! whose copies disagree, naming both lines, exactly as for the CSV formats.
use std::cell::RefCell;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;

use chrono::NaiveDate;
use flag_core::{StageError, StageResult};
use serde::Deserializer as _;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use serde_json::error::Category;

use super::ohlcv_formats::{ParsedFile, RawRow};
use super::util::{QUOTE_MAX, check_price_range, cut_message, quote, quote_bytes};

/// The longest JSON string or bare token (number, literal) read: real days hold short news
/// texts and one number; a longer one is refused before `serde_json` buffers it.
pub const MAX_TOKEN_BYTES: usize = 4 << 20;

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
    /// 1-based line of the key.
    line: u64,
    prices: Vec<Value>,
    unknown: Vec<String>,
}

struct FileVisitor<'a>(&'a RefCell<Where>, &'a Rc<RefCell<JsonScan>>);

impl<'de> Visitor<'de> for FileVisitor<'_> {
    type Value = Vec<Entry>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object keyed by YYYY-MM-DD dates")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            // The reader has consumed exactly the key (its closing quote): its line is the
            // line being read (JSON strings hold no raw newline).
            let line = self.1.borrow().line;
            self.0.borrow_mut().key = Some(key.clone());
            let (prices, unknown) = map.next_value_seed(DaySeed(self.0))?;
            *self.0.borrow_mut() = Where::default();
            out.push(Entry {
                key,
                line,
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

/// What [`TokenCapped`] has seen: the line being read, whether it is inside a string, and
/// the length and first bytes of the current string or bare token.
#[derive(Default)]
struct JsonScan {
    /// 1-based line being read.
    line: u64,
    /// A byte other than whitespace was read.
    seen: bool,
    in_str: bool,
    escaped: bool,
    run: usize,
    head: Vec<u8>,
    /// Set when a token went over the cap: (line, first bytes of the token).
    overflow: Option<(u64, Vec<u8>)>,
}

/// A reader that counts lines and fails as soon as one JSON string or bare token is longer
/// than `max` bytes, so `serde_json` above it never buffers more than that.
struct TokenCapped<R> {
    inner: R,
    max: usize,
    scan: Rc<RefCell<JsonScan>>,
}

impl<R: Read> Read for TokenCapped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.scan.borrow_mut();
        if s.overflow.is_some() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "token too long"));
        }
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                s.line += 1;
            }
            s.seen |= !b.is_ascii_whitespace();
            let in_token = if s.in_str {
                if s.escaped {
                    s.escaped = false;
                } else if b == b'\\' {
                    s.escaped = true;
                } else if b == b'"' {
                    s.in_str = false;
                }
                s.in_str
            } else if b == b'"' {
                s.in_str = true;
                s.run = 0;
                s.head.clear();
                false
            } else {
                !(b.is_ascii_whitespace() || b"{}[],:".contains(&b))
            };
            if !in_token {
                if !s.in_str {
                    s.run = 0;
                    s.head.clear();
                }
                continue;
            }
            s.run += 1;
            if s.head.len() < QUOTE_MAX {
                s.head.push(b);
            }
            if s.run > self.max {
                let over = (s.line, std::mem::take(&mut s.head));
                s.overflow = Some(over);
                return Err(io::Error::new(io::ErrorKind::InvalidData, "token too long"));
            }
        }
        Ok(n)
    }
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
    let bad =
        |m: String| StageError::data(file, line, "prices", format!("date {}: {m}", quote(key)));
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
    check_price_range(x).map_err(bad)
}

/// Reads one InvestorBench file from a text (see [`read_file`]).
#[cfg(test)]
pub fn read(file: &Path, text: &str) -> StageResult<ParsedFile> {
    read_from(file, text.as_bytes(), || Some(text.as_bytes().to_vec()))
}

/// Reads one InvestorBench file (see the module doc), streamed. Rows come in file order.
pub fn read_file(file: &Path) -> StageResult<ParsedFile> {
    if !file.is_file() {
        return Err(StageError::file(file, "file not found"));
    }
    let io_err = |e| StageError::io(format!("reading {}", file.display()), e);
    let mut r = BufReader::with_capacity(64 << 10, File::open(file).map_err(io_err)?);
    if r.fill_buf().map_err(io_err)?.starts_with(BOM) {
        r.consume(3);
    }
    read_from(file, r, || whole_file(file))
}

/// A UTF-8 byte-order mark is no JSON: skipped.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The file's bytes (without a BOM) when it is small enough to read whole, for the exact
/// position of a syntax error (see [`read_from`]).
fn whole_file(file: &Path) -> Option<Vec<u8>> {
    let len = std::fs::metadata(file).ok()?.len();
    if len > super::util::MAX_WHOLE_FILE_BYTES {
        return None;
    }
    let b = std::fs::read(file).ok()?;
    Some(b.strip_prefix(BOM).map(<[u8]>::to_vec).unwrap_or(b))
}

/// Parses the file streamed through [`TokenCapped`]. serde_json over a reader places its
/// errors after the byte it peeked (the next line, for a value at the end of one), so on an
/// error in a file small enough to read whole (`whole`), the error is taken from a parse of
/// the bytes in memory, which places it where the slice parser always has.
fn read_from<R: Read>(
    file: &Path,
    reader: R,
    whole: impl FnOnce() -> Option<Vec<u8>>,
) -> StageResult<ParsedFile> {
    let scan = Rc::new(RefCell::new(JsonScan {
        line: 1,
        ..JsonScan::default()
    }));
    let capped = TokenCapped {
        inner: reader,
        max: MAX_TOKEN_BYTES,
        scan: scan.clone(),
    };
    let at = RefCell::new(Where::default());
    let mut de = serde_json::Deserializer::from_reader(capped);
    let parsed = de
        .deserialize_map(FileVisitor(&at, &scan))
        .and_then(|e| de.end().map(|()| e));
    let entries = match parsed {
        Ok(entries) => entries,
        Err(e) => {
            let column = |w: &Where| {
                w.field
                    .as_deref()
                    .map(quote)
                    .unwrap_or_else(|| "(json)".into())
            };
            let day = |w: &Where| {
                w.key
                    .as_ref()
                    .map(|k| format!("date {}: ", quote(k)))
                    .unwrap_or_default()
            };
            if let Some((line, head)) = scan.borrow_mut().overflow.take() {
                let w = at.borrow();
                return Err(StageError::data(
                    file,
                    line,
                    column(&w),
                    format!(
                        "{}a JSON string or value longer than {MAX_TOKEN_BYTES} bytes, the \
                         most one may be (not read further); its first {} bytes: '{}'",
                        day(&w),
                        head.len(),
                        quote_bytes(&head)
                    ),
                ));
            }
            if e.classify() == Category::Eof && !scan.borrow().seen {
                // Nothing but whitespace, or nothing at all.
                return Err(StageError::file(file, "file is empty"));
            }
            let (e, at) = match whole() {
                Some(bytes) => {
                    let at2 = RefCell::new(Where::default());
                    let dummy = Rc::new(RefCell::new(JsonScan::default()));
                    let mut de = serde_json::Deserializer::from_slice(&bytes);
                    match de
                        .deserialize_map(FileVisitor(&at2, &dummy))
                        .and_then(|e| de.end().map(|()| e))
                    {
                        Err(e2) => (e2, at2),
                        Ok(_) => (e, at),
                    }
                }
                None => (e, at),
            };
            let w = at.borrow();
            // 1e999 is valid JSON syntax, but no f64: serde_json's "number out of range".
            let what = if e.to_string().starts_with("number out of range") {
                "not a finite number: "
            } else if e.classify() == Category::Data {
                ""
            } else {
                "malformed JSON: "
            };
            return Err(StageError::data(
                file,
                e.line() as u64,
                column(&w),
                format!("{}{what}{}", day(&w), cut_message(&e.to_string())),
            ));
        }
    };
    if entries.is_empty() {
        return Err(StageError::file(file, "the JSON object has no dates"));
    }
    let mut out = ParsedFile::default();
    for e in &entries {
        let line = e.line;
        out.rows_read += 1;
        let date = NaiveDate::parse_from_str(&e.key, "%Y-%m-%d")
            .ok()
            .filter(|_| e.key.len() == 10)
            .ok_or_else(|| {
                StageError::data(
                    file,
                    line,
                    "date",
                    format!("key '{}' is not a YYYY-MM-DD date", quote(&e.key)),
                )
            })?;
        if let Some(f) = e.unknown.first() {
            return Err(StageError::data(
                file,
                line,
                quote(f),
                format!(
                    "date {}: unknown field (a day has {})",
                    quote(&e.key),
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
        let p = read(Path::new("x.json"), text).unwrap();
        let lines: Vec<u64> = p.rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![2, 3]);
    }

    #[test]
    fn a_long_string_is_refused_at_its_line_and_quoted_short() {
        let long = "x".repeat(MAX_TOKEN_BYTES + 10);
        let text = format!("{{\n\"2020-01-02\": {{\"prices\": 1,\n \"news\": [\"{long}\"]}}}}");
        let e = read(Path::new("x.json"), &text).unwrap_err().to_string();
        assert!(
            e.starts_with("x.json:3: column 'news': date 2020-01-02: a JSON string"),
            "{e}"
        );
        assert!(e.len() < 600, "{}", e.len());
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
