//! Small parsing helpers shared by the ingest stages. Every failure is a `StageError::Data`
//! naming the file, the 1-based line and the column, so a user can open the file and look.
use std::fs;
use std::path::{Path, PathBuf};

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
    let x: f64 = t
        .parse()
        .map_err(|_| StageError::data(file, line, column, format!("'{t}' is not a number")))?;
    if !x.is_finite() {
        return Err(StageError::data(
            file,
            line,
            column,
            format!("'{t}' is not a finite number"),
        ));
    }
    Ok(x)
}

/// A strictly positive price.
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
    Ok(x)
}

/// A volume >= 0 (zero-volume days are real and are counted by the caller).
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
            format!("'{t}' is not a YYYY-MM-DD date"),
        )
    })
}

/// Reads a whole file as UTF-8; a missing file and an empty one are whole-file errors.
pub fn read_text(file: &Path) -> StageResult<String> {
    if !file.is_file() {
        return Err(StageError::file(file, "file not found"));
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

/// Parses a CSV text into records with their 1-based line numbers. Quoted fields may hold
/// commas and newlines; the record's line is the line it starts on.
pub fn csv_records(file: &Path, text: &str) -> StageResult<Vec<(u64, Vec<String>)>> {
    let mut rd = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut out = Vec::new();
    for rec in rd.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            StageError::data(file, line, "(csv)", format!("malformed CSV: {e}"))
        })?;
        let line = rec.position().map_or(0, |p| p.line());
        // A blank line in the middle of a file reads as one empty field; skip it.
        if rec.len() == 1 && rec[0].trim().is_empty() {
            continue;
        }
        out.push((line, rec.iter().map(str::to_string).collect()));
    }
    Ok(out)
}

/// Checks a record has exactly the header's field count, naming the first missing or extra field.
pub fn check_width(file: &Path, line: u64, header: &[String], rec: &[String]) -> StageResult<()> {
    if rec.len() < header.len() {
        return Err(StageError::data(
            file,
            line,
            header[rec.len()].clone(),
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
                    format!("missing column (header is {:?})", header),
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
                format!("header column {} is '{got}', expected '{w}'", i + 1),
            ));
        }
    }
    if header.len() > want.len() {
        return Err(StageError::data(
            file,
            line,
            header[want.len()].clone(),
            format!("unexpected extra header column (expected {:?})", want),
        ));
    }
    Ok(())
}

/// Parses a Python list literal of strings (`['a', "b"]`, `[]`), as the vendor exports write.
pub fn parse_py_list(file: &Path, line: u64, column: &str, raw: &str) -> StageResult<Vec<String>> {
    let err = |m: &str| StageError::data(file, line, column, format!("{m} in list '{raw}'"));
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
    fn numbers() {
        let f = Path::new("x.csv");
        assert_eq!(parse_f64(f, 2, "Open", " 1.13E+11 ").unwrap(), 1.13e11);
        assert!(parse_f64(f, 2, "Open", "NaN").is_err());
        assert!(parse_f64(f, 2, "Open", "inf").is_err());
        assert!(parse_price(f, 2, "Open", "0").is_err());
        assert!(parse_volume(f, 2, "Volume", "-1").is_err());
        assert_eq!(parse_volume(f, 2, "Volume", "0").unwrap(), 0.0);
        assert_eq!(
            from_date32(date32(NaiveDate::from_ymd_opt(2020, 1, 2).unwrap())).to_string(),
            "2020-01-02"
        );
    }
}
