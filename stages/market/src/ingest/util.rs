//! Small parsing helpers shared by the ingest stages. Every failure is a `StageError::Data`
//! naming the file, the 1-based line and the column, so a user can open the file and look.
//!
//! Input files are streamed, never read whole (except the small per-day JSON news files,
//! which are size-capped): CSV files through [`CsvRecords`], whose reader refuses a physical
//! line longer than [`MAX_LINE_BYTES`] before the CSV parser buffers it, so a 2 GB file
//! without a newline costs about one megabyte. What an error quotes from the file is cut to
//! [`QUOTE_MAX`] bytes by [`quote`], with a marker saying how long it was.
use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use chrono::NaiveDate;
use flag_core::{StageError, StageResult};

/// Days since 1970-01-01, the Arrow `date32` encoding.
pub fn date32(d: NaiveDate) -> i32 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid epoch");
    (d - epoch).num_days() as i32
}

/// Inverse of [`date32`].
pub fn from_date32(days: i32) -> NaiveDate {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid epoch");
    epoch + chrono::Duration::days(i64::from(days))
}

/// A value that is present but empty or Yahoo's `null` placeholder.
pub fn is_blank(s: &str) -> bool {
    let t = s.trim();
    t.is_empty() || t.eq_ignore_ascii_case("null")
}

/// A finite number; NaN and infinities are rejected because no price or volume can be one.
pub fn parse_f64(file: &Path, line: u64, column: &str, raw: &str) -> StageResult<f64> {
    let t = raw.trim();
    if t.is_empty() {
        return Err(StageError::data(file, line, column, "empty value"));
    }
    let x: f64 = t.parse().map_err(|_| {
        StageError::data(
            file,
            line,
            column,
            format!("'{}' is not a number", quote(t)),
        )
    })?;
    if !x.is_finite() {
        return Err(StageError::data(
            file,
            line,
            column,
            format!("'{}' is not a finite number", quote(t)),
        ));
    }
    Ok(x)
}

/// Prices must lie strictly between these: below, a price is not one any market quotes and
/// its returns under- or overflow (a close of 1e-320 is a subnormal whose ratios are NaN or
/// inf); above, value = shares x price and the volatility of returns overflow to inf.
pub const PRICE_MIN: f64 = 1e-6;
pub const PRICE_MAX: f64 = 1e12;
/// A day's volume must be below this (more than any market trades in a day, in shares or
/// in currency); above it, volume-weighted sums overflow.
pub const VOLUME_MAX: f64 = 1e15;

/// `x` (already finite and > 0) is a price a market could quote: see [`PRICE_MIN`].
pub fn check_price_range(x: f64) -> Result<f64, String> {
    if x <= PRICE_MIN || x >= PRICE_MAX {
        return Err(format!(
            "price {x:e} is outside the sane range ({PRICE_MIN:e}, {PRICE_MAX:e}): no market \
             quotes it, and returns and values computed from it under- or overflow"
        ));
    }
    Ok(x)
}

/// A strictly positive price in the sane range ([`PRICE_MIN`], [`PRICE_MAX`]).
pub fn parse_price(file: &Path, line: u64, column: &str, raw: &str) -> StageResult<f64> {
    let x = parse_f64(file, line, column, raw)?;
    if x <= 0.0 {
        return Err(StageError::data(
            file,
            line,
            column,
            format!("price must be > 0, got {x}"),
        ));
    }
    check_price_range(x).map_err(|m| StageError::data(file, line, column, m))
}

/// A volume >= 0 (zero-volume days are real and are counted by the caller), below
/// [`VOLUME_MAX`].
pub fn parse_volume(file: &Path, line: u64, column: &str, raw: &str) -> StageResult<f64> {
    let x = parse_f64(file, line, column, raw)?;
    if x < 0.0 {
        return Err(StageError::data(
            file,
            line,
            column,
            format!("volume must be >= 0, got {x}"),
        ));
    }
    if x >= VOLUME_MAX {
        return Err(StageError::data(
            file,
            line,
            column,
            format!(
                "volume {x:e} is outside the sane range [0, {VOLUME_MAX:e}): more than any \
                 market trades in a day, and volume-weighted sums overflow"
            ),
        ));
    }
    Ok(x)
}

/// A `YYYY-MM-DD` date.
pub fn parse_ymd(file: &Path, line: u64, column: &str, raw: &str) -> StageResult<NaiveDate> {
    let t = raw.trim();
    NaiveDate::parse_from_str(t, "%Y-%m-%d").map_err(|_| {
        StageError::data(
            file,
            line,
            column,
            format!("'{}' is not a YYYY-MM-DD date", quote(t)),
        )
    })
}

/// At most this many bytes of a value from an input file are quoted in an error.
pub const QUOTE_MAX: usize = 200;

/// Tickers become parts of file names the stages read (`<source>/<TICKER>_....csv`), so
/// each must be a symbol: 1 to 24 ASCII letters, digits and `. _ ^ = -` (BRK.B, ^GSPC,
/// BTC-USD, EURUSD=X), not starting with '.' ('..' and hidden files), never '/'.
pub fn check_tickers(param: &str, tickers: &[String]) -> StageResult<()> {
    for t in tickers {
        let bad = t
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '^' | '=' | '-')));
        let problem = if t.is_empty() {
            Some("is empty".to_string())
        } else if t.len() > 24 {
            Some("is longer than 24 characters".to_string())
        } else if let Some(c) = bad {
            Some(format!(
                "may not contain {c:?} (a ticker is ASCII letters, digits and . _ ^ = -)"
            ))
        } else if t.starts_with('.') {
            Some("may not start with '.'".to_string())
        } else {
            None
        };
        if let Some(p) = problem {
            return Err(StageError::param(
                param,
                format!("ticker '{}' {p}", quote(t)),
            ));
        }
    }
    Ok(())
}

/// `s` as an error quotes it: control characters escaped, cut to about [`QUOTE_MAX`] bytes
/// (at a character boundary) with a marker giving the full length, so a 200 MB field gives
/// a 250-byte message, not a 200 MB one.
pub fn quote(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.char_indices() {
        if out.len() >= QUOTE_MAX {
            return format!("{out}...[cut: {} of {} bytes shown]", i, s.len());
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A library's error message (which may quote a whole value from the input) cut in the
/// middle to about 2 x [`QUOTE_MAX`] bytes, keeping its end (serde_json's "at line L column
/// C"), with a marker saying how much was left out.
pub fn cut_message(m: &str) -> String {
    if m.len() <= 2 * QUOTE_MAX {
        return m.to_string();
    }
    let mut head = QUOTE_MAX;
    while !m.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = m.len() - QUOTE_MAX / 2;
    while !m.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}...[cut: {} of {} bytes left out]...{}",
        quote(&m[..head]),
        tail - head,
        m.len(),
        quote(&m[tail..])
    )
}

/// [`quote`] for raw bytes (invalid UTF-8 shown lossily).
pub fn quote_bytes(b: &[u8]) -> String {
    quote(&String::from_utf8_lossy(b))
}

/// A header as an error shows it: its fields quoted, the whole cut like [`quote`].
pub fn quote_header(header: &[String]) -> String {
    let fields: Vec<String> = header.iter().map(|h| format!("\"{}\"", quote(h))).collect();
    quote(&format!("[{}]", fields.join(", ")))
}

/// The longest physical line a CSV input may have. Real rows are at most a few KB (the
/// longest news row in the shared data is 5 KB); a longer line is refused when it is read,
/// before the CSV parser buffers it.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// The largest file read whole (the per-day CryptoTrade JSON news files, tens of KB).
pub const MAX_WHOLE_FILE_BYTES: u64 = 64 << 20;

/// Reads a whole file as UTF-8; a missing file and an empty one are whole-file errors, and
/// so is one over [`MAX_WHOLE_FILE_BYTES`] (only small files are read whole).
pub fn read_text(file: &Path) -> StageResult<String> {
    if !file.is_file() {
        return Err(StageError::file(file, "file not found"));
    }
    let len = fs::metadata(file)
        .map_err(|e| StageError::io(format!("reading {}", file.display()), e))?
        .len();
    if len > MAX_WHOLE_FILE_BYTES {
        return Err(StageError::file(
            file,
            format!(
                "file is {len} bytes; a file of this format is read whole and may be at most \
                 {MAX_WHOLE_FILE_BYTES} bytes"
            ),
        ));
    }
    let bytes =
        fs::read(file).map_err(|e| StageError::io(format!("reading {}", file.display()), e))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(StageError::file(file, "file is empty"));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = upto.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        StageError::data(file, line, "(text)", "invalid UTF-8")
    })?;
    // A UTF-8 byte-order mark would otherwise become part of the first column name.
    Ok(text
        .strip_prefix('\u{feff}')
        .map(str::to_string)
        .unwrap_or(text))
}

/// What [`LineCapped`] has seen: the line it is on, that line's length so far and its
/// first bytes, and the field (commas outside quotes) it is in.
#[derive(Default)]
struct LineScan {
    /// 1-based line being read.
    line: u64,
    /// The line the current record started on (a quoted field may span lines).
    rec_line: u64,
    /// Bytes of the current record so far.
    len: usize,
    head: Vec<u8>,
    field: usize,
    in_quote: bool,
    /// At the start of a field (only there does a quote open a quoted field).
    at_field_start: bool,
    /// The byte before was a quote that closed a quoted field (`""` is an escaped quote).
    just_closed: bool,
    /// Set when a record went over the cap: (record's first line, field, its first bytes,
    /// whether it spans lines).
    overflow: Option<(u64, usize, Vec<u8>, bool)>,
}

/// A reader that fails as soon as a physical line is longer than `max` bytes, remembering
/// where (shared with the caller through `scan`), so the CSV parser above it never buffers
/// more than `max` bytes of one line.
struct LineCapped<R> {
    inner: R,
    max: usize,
    scan: Rc<RefCell<LineScan>>,
}

impl<R: Read> Read for LineCapped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.scan.borrow_mut();
        if s.overflow.is_some() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                s.line += 1;
                if !s.in_quote {
                    // The record ends here (a newline inside quotes continues it, and its
                    // bytes count against the same cap).
                    s.rec_line = s.line;
                    s.len = 0;
                    s.field = 0;
                    s.head.clear();
                    s.at_field_start = true;
                    s.just_closed = false;
                    continue;
                }
            }
            s.len += 1;
            if s.head.len() < QUOTE_MAX {
                s.head.push(b);
            }
            // The csv crate's quoting: a quote opens a quoted field only at its start, `""`
            // inside is a quote, and a lone quote closes it.
            let closed = std::mem::take(&mut s.just_closed);
            match b {
                b'"' if s.in_quote => {
                    s.in_quote = false;
                    s.just_closed = true;
                }
                b'"' if s.at_field_start || closed => s.in_quote = true,
                b',' if !s.in_quote => {
                    s.field += 1;
                    s.at_field_start = true;
                    continue;
                }
                _ => {}
            }
            s.at_field_start = false;
            if s.len > self.max {
                let spans = s.line != s.rec_line;
                let over = (s.rec_line, s.field, std::mem::take(&mut s.head), spans);
                s.overflow = Some(over);
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
        }
        Ok(n)
    }
}

/// CSV records of one input, streamed with their 1-based line numbers (the line a record
/// starts on; quoted fields may hold commas and newlines). Blank lines are skipped, a
/// leading UTF-8 byte-order mark is dropped, and a line over [`MAX_LINE_BYTES`] or a field
/// that is not UTF-8 is an error naming the line and field.
pub struct CsvRecords<R: Read> {
    file: PathBuf,
    rd: csv::Reader<LineCapped<R>>,
    scan: Rc<RefCell<LineScan>>,
    rec: csv::ByteRecord,
    done: bool,
}

impl CsvRecords<BufReader<File>> {
    /// Opens `file`; a missing file is a whole-file error.
    pub fn open(file: &Path) -> StageResult<Self> {
        if !file.is_file() {
            return Err(StageError::file(file, "file not found"));
        }
        let f = File::open(file)
            .map_err(|e| StageError::io(format!("reading {}", file.display()), e))?;
        let mut r = BufReader::with_capacity(64 << 10, f);
        let start = r
            .fill_buf()
            .map_err(|e| StageError::io(format!("reading {}", file.display()), e))?;
        if start.starts_with(b"\xEF\xBB\xBF") {
            r.consume(3);
        }
        Ok(CsvRecords::new(file, r))
    }
}

impl<R: Read> CsvRecords<R> {
    pub fn new(file: &Path, reader: R) -> Self {
        let scan = Rc::new(RefCell::new(LineScan {
            line: 1,
            rec_line: 1,
            at_field_start: true,
            ..LineScan::default()
        }));
        let capped = LineCapped {
            inner: reader,
            max: MAX_LINE_BYTES,
            scan: scan.clone(),
        };
        let rd = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(capped);
        CsvRecords {
            file: file.to_path_buf(),
            rd,
            scan,
            rec: csv::ByteRecord::new(),
            done: false,
        }
    }

    /// The next non-blank record, or `None` at the end of the file.
    pub fn next_record(&mut self) -> StageResult<Option<(u64, Vec<String>)>> {
        let file = self.file.as_path();
        loop {
            if self.done {
                return Ok(None);
            }
            let more = self.rd.read_byte_record(&mut self.rec).map_err(|e| {
                if let Some((line, field, head, spans)) = self.scan.borrow_mut().overflow.take() {
                    let what = if spans {
                        "quoted record (its field spans lines)"
                    } else {
                        "line"
                    };
                    return StageError::data(
                        file,
                        line,
                        format!("field {}", field + 1),
                        format!(
                            "{what} is longer than {MAX_LINE_BYTES} bytes, the most a CSV line \
                             may be (not read further); its first {} bytes: '{}'",
                            head.len(),
                            quote_bytes(&head)
                        ),
                    );
                }
                let line = e.position().map_or(0, |p| p.line());
                StageError::data(
                    file,
                    line,
                    "(csv)",
                    format!("malformed CSV: {}", cut_message(&e.to_string())),
                )
            });
            let more = match more {
                Ok(m) => m,
                Err(e) => {
                    self.done = true;
                    return Err(e);
                }
            };
            if !more {
                self.done = true;
                return Ok(None);
            }
            let line = self.rec.position().map_or(0, |p| p.line());
            let mut fields = Vec::with_capacity(self.rec.len());
            for (i, f) in self.rec.iter().enumerate() {
                match std::str::from_utf8(f) {
                    Ok(s) => fields.push(s.to_string()),
                    Err(_) => {
                        self.done = true;
                        return Err(StageError::data(
                            file,
                            line,
                            format!("field {}", i + 1),
                            format!("invalid UTF-8: '{}'", quote_bytes(f)),
                        ));
                    }
                }
            }
            // A blank line in the middle of a file reads as one empty field; skip it.
            if fields.len() == 1 && fields[0].trim().is_empty() {
                continue;
            }
            return Ok(Some((line, fields)));
        }
    }
}

impl<R: Read> Iterator for CsvRecords<R> {
    type Item = StageResult<(u64, Vec<String>)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// Parses a CSV text into records with their 1-based line numbers (see [`CsvRecords`]).
#[cfg(test)]
pub fn csv_records(file: &Path, text: &str) -> StageResult<Vec<(u64, Vec<String>)>> {
    CsvRecords::new(file, text.as_bytes()).collect()
}

/// The header record of a CSV file: its first non-blank record (none: "file is empty").
pub fn csv_header<R: Read>(
    file: &Path,
    recs: &mut CsvRecords<R>,
) -> StageResult<(u64, Vec<String>)> {
    recs.next_record()?
        .ok_or_else(|| StageError::file(file, "file is empty"))
}

/// Checks a record has exactly the header's field count, naming the first missing or extra field.
pub fn check_width(file: &Path, line: u64, header: &[String], rec: &[String]) -> StageResult<()> {
    if rec.len() < header.len() {
        return Err(StageError::data(
            file,
            line,
            quote(&header[rec.len()]),
            format!(
                "missing field: {} fields, header has {}",
                rec.len(),
                header.len()
            ),
        ));
    }
    if rec.len() > header.len() {
        return Err(StageError::data(
            file,
            line,
            format!("field {}", header.len() + 1),
            format!(
                "extra field: {} fields, header has {}",
                rec.len(),
                header.len()
            ),
        ));
    }
    Ok(())
}

/// Position of each wanted column in a header row; a missing one is an error on line 1.
pub fn column_index(
    file: &Path,
    line: u64,
    header: &[String],
    wanted: &[&str],
) -> StageResult<Vec<usize>> {
    wanted
        .iter()
        .map(|w| {
            header.iter().position(|h| h.trim() == *w).ok_or_else(|| {
                StageError::data(
                    file,
                    line,
                    *w,
                    format!("missing column (header is {})", quote_header(header)),
                )
            })
        })
        .collect()
}

/// The header row must be exactly `want`, in order.
pub fn expect_header(file: &Path, line: u64, header: &[String], want: &[&str]) -> StageResult<()> {
    column_index(file, line, header, want)?;
    for (i, w) in want.iter().enumerate() {
        let got = header.get(i).map(|s| s.trim()).unwrap_or("");
        if got != *w {
            return Err(StageError::data(
                file,
                line,
                *w,
                format!(
                    "header column {} is '{}', expected '{w}'",
                    i + 1,
                    quote(got)
                ),
            ));
        }
    }
    if header.len() > want.len() {
        return Err(StageError::data(
            file,
            line,
            quote(&header[want.len()]),
            format!("unexpected extra header column (expected {:?})", want),
        ));
    }
    Ok(())
}

/// Parses a Python list literal of strings (`['a', "b"]`, `[]`), as the vendor exports write.
pub fn parse_py_list(file: &Path, line: u64, column: &str, raw: &str) -> StageResult<Vec<String>> {
    let err =
        |m: &str| StageError::data(file, line, column, format!("{m} in list '{}'", quote(raw)));
    let t = raw.trim();
    let inner = t
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| err("not a [...] list"))?;
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(q) = chars.next() else { break };
        if q != '\'' && q != '"' {
            return Err(err("expected a quoted string"));
        }
        let mut item = String::new();
        loop {
            match chars.next() {
                None => return Err(err("unterminated string")),
                Some('\\') => item.push(chars.next().ok_or_else(|| err("dangling escape"))?),
                Some(c) if c == q => break,
                Some(c) => item.push(c),
            }
        }
        out.push(item);
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => break,
            Some(',') => {}
            Some(_) => return Err(err("expected ',' between items")),
        }
    }
    Ok(out)
}

/// Every `*.ext` file directly in `dir`, sorted by name (so the read order is stable).
pub fn files_with_ext(dir: &Path, ext: &str) -> StageResult<Vec<PathBuf>> {
    let rd =
        fs::read_dir(dir).map_err(|e| StageError::io(format!("listing {}", dir.display()), e))?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
        .collect();
    out.sort();
    Ok(out)
}

/// The name a report row shows for a file: relative to the source, so the output does not
/// depend on where the data lives (the cache key does not either).
pub fn display_name(source: &Path, file: &Path) -> String {
    file.strip_prefix(source)
        .ok()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new(file.file_name().unwrap_or(file.as_os_str())))
        .to_string_lossy()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn py_list() {
        let f = Path::new("x.csv");
        assert_eq!(
            parse_py_list(f, 1, "t", "[]").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            parse_py_list(f, 1, "t", "['AAPL', \"MS,FT\"]").unwrap(),
            vec!["AAPL".to_string(), "MS,FT".to_string()]
        );
        let e = parse_py_list(f, 3, "tickers", "['AAPL'").unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.csv:3: column 'tickers': not a [...] list in list '['AAPL''"
        );
        assert!(parse_py_list(f, 1, "t", "['a' 'b']").is_err());
        assert!(parse_py_list(f, 1, "t", "[a]").is_err());
    }

    #[test]
    fn quotes_are_cut_and_say_so() {
        assert_eq!(quote("a\tb"), "a\\tb");
        let long = "é".repeat(1000);
        let q = quote(&long);
        assert!(q.len() < QUOTE_MAX + 50, "{q}");
        assert!(q.ends_with("...[cut: 200 of 2000 bytes shown]"), "{q}");
        let m = format!(
            "invalid type: string \"{}\" at line 3 column 9",
            "x".repeat(5000)
        );
        let c = cut_message(&m);
        assert!(c.len() < 3 * QUOTE_MAX, "{c}");
        assert!(c.ends_with("at line 3 column 9"), "{c}");
        assert!(c.contains("bytes left out]"), "{c}");
    }

    #[test]
    fn a_line_over_the_cap_is_refused_at_its_line_and_field() {
        let text = format!("a,b\n1,{}\n", "x".repeat(MAX_LINE_BYTES + 1));
        let e = csv_records(Path::new("x.csv"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.csv:2: column 'field 2': line is longer than 1048576 bytes"),
            "{e}"
        );
        assert!(e.len() < 600, "{}", e.len());
    }

    #[test]
    fn a_quoted_record_spanning_lines_is_capped_too() {
        // Many short lines inside one quoted field: no line is long, the record is.
        let body = "x\n".repeat(MAX_LINE_BYTES / 2 + 1);
        let text = format!("a,b\n1,\"{body}\"\n2,3\n");
        let e = csv_records(Path::new("x.csv"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "x.csv:2: column 'field 2': quoted record (its field spans lines) is longer \
                 than 1048576 bytes"
            ),
            "{e}"
        );
        // Quotes that do not open a field, escaped quotes and short multi-line fields pass.
        let ok = "a,b,c\n1,ab\"c,\"say \"\"hi\"\"\"\n2,\"two\nlines\",x\n3,4,5\n";
        let recs = csv_records(Path::new("x.csv"), ok).unwrap();
        let lines: Vec<u64> = recs.iter().map(|r| r.0).collect();
        assert_eq!(lines, [1, 2, 3, 5]);
        assert_eq!(recs[1].1, ["1", "ab\"c", "say \"hi\""]);
        assert_eq!(recs[2].1, ["2", "two\nlines", "x"]);
    }

    #[test]
    fn numbers() {
        let f = Path::new("x.csv");
        assert_eq!(parse_f64(f, 2, "Open", " 1.13E+11 ").unwrap(), 1.13e11);
        assert!(parse_f64(f, 2, "Open", "NaN").is_err());
        assert!(parse_f64(f, 2, "Open", "inf").is_err());
        assert!(parse_price(f, 2, "Open", "0").is_err());
        assert!(parse_price(f, 2, "Close", "1e-320").is_err());
        assert!(parse_price(f, 2, "Close", "1e300").is_err());
        assert_eq!(parse_price(f, 2, "Close", "0.0001").unwrap(), 0.0001);
        assert!(parse_volume(f, 2, "Volume", "1e300").is_err());
        assert!(parse_volume(f, 2, "Volume", "-1").is_err());
        assert_eq!(parse_volume(f, 2, "Volume", "0").unwrap(), 0.0);
        assert_eq!(
            from_date32(date32(NaiveDate::from_ymd_opt(2020, 1, 2).unwrap())).to_string(),
            "2020-01-02"
        );
    }
}
