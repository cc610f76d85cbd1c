//! Reading the stage's inputs by column name, with row-precise errors.
use std::collections::BTreeMap;
use std::path::Path;

use flag_core::arrow::array::{Array, Date32Array, Float64Array, RecordBatch, StringArray};
use flag_core::schema::typed_column;
use flag_core::{StageError, StageResult};
use flag_trading::series::from_days;

use crate::features::Bars;

fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    file: &Path,
    name: &str,
    ty: &str,
) -> StageResult<&'a T> {
    typed_column(batch, name, ty).map_err(|m| StageError::file(file, m))
}

/// Splits an indicators-like table into per-ticker bars sorted by date. `file` names the
/// input in errors; rows are 1-based data rows. A null or non-finite high/low/volume, a close
/// that is not > 0, or a duplicate date is an error.
pub fn read_bars(batch: &RecordBatch, file: &Path) -> StageResult<Vec<(String, Bars)>> {
    let ticker = column::<StringArray>(batch, file, "ticker", "utf8")?;
    let date = column::<Date32Array>(batch, file, "date", "date32")?;
    let nums = [
        (
            "high",
            column::<Float64Array>(batch, file, "high", "float64")?,
        ),
        (
            "low",
            column::<Float64Array>(batch, file, "low", "float64")?,
        ),
        (
            "close",
            column::<Float64Array>(batch, file, "close", "float64")?,
        ),
        (
            "volume",
            column::<Float64Array>(batch, file, "volume", "float64")?,
        ),
    ];
    let mut rows: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for i in 0..batch.num_rows() {
        for (name, nullable) in [("ticker", ticker.is_null(i)), ("date", date.is_null(i))] {
            if nullable {
                return Err(StageError::data(file, i as u64 + 1, name, "is null"));
            }
        }
        for (name, arr) in &nums {
            let v = (!arr.is_null(i)).then(|| arr.value(i));
            let ok = match v {
                Some(x) if *name == "close" => x.is_finite() && x > 0.0,
                Some(x) => x.is_finite(),
                None => false,
            };
            if !ok {
                return Err(StageError::data(
                    file,
                    i as u64 + 1,
                    *name,
                    format!(
                        "{} on {} is {v:?}, expected a finite number{}",
                        ticker.value(i),
                        from_days(date.value(i)),
                        if *name == "close" { " > 0" } else { "" }
                    ),
                ));
            }
        }
        rows.entry(ticker.value(i)).or_default().push(i);
    }
    let mut out = Vec::with_capacity(rows.len());
    for (t, mut idx) in rows {
        idx.sort_by_key(|&i| date.value(i));
        if let Some(w) = idx
            .windows(2)
            .find(|w| date.value(w[0]) == date.value(w[1]))
        {
            return Err(StageError::data(
                file,
                w[1] as u64 + 1,
                "date",
                format!(
                    "ticker {t} has a second row for {}",
                    from_days(date.value(w[1]))
                ),
            ));
        }
        let get = |k: usize| {
            idx.iter()
                .map(|&i| nums[k].1.value(i))
                .collect::<Vec<f64>>()
        };
        out.push((
            t.to_string(),
            Bars {
                dates: idx.iter().map(|&i| date.value(i)).collect(),
                high: get(0),
                low: get(1),
                close: get(2),
                volume: get(3),
            },
        ));
    }
    Ok(out)
}

/// Number of extra features the LLM signal adds per day: interaction, direction.
pub const SIGNAL_FEATURES: usize = 2;

/// Per ticker, per date: `[interaction, direction]` from an `llm_signal` table. Values are
/// checked: direction in [-1, 1], strength in [0, 1], interaction in [-1, 1].
pub fn read_signals(
    batch: &RecordBatch,
    file: &Path,
) -> StageResult<BTreeMap<String, BTreeMap<i32, [f64; 2]>>> {
    let ticker = column::<StringArray>(batch, file, "ticker", "utf8")?;
    let date = column::<Date32Array>(batch, file, "date", "date32")?;
    let cols = [
        (
            "direction",
            column::<Float64Array>(batch, file, "direction", "float64")?,
            -1.0,
            1.0,
        ),
        (
            "strength",
            column::<Float64Array>(batch, file, "strength", "float64")?,
            0.0,
            1.0,
        ),
        (
            "interaction",
            column::<Float64Array>(batch, file, "interaction", "float64")?,
            -1.0,
            1.0,
        ),
    ];
    let mut out: BTreeMap<String, BTreeMap<i32, [f64; 2]>> = BTreeMap::new();
    for i in 0..batch.num_rows() {
        if ticker.is_null(i) || date.is_null(i) {
            return Err(StageError::data(
                file,
                i as u64 + 1,
                "ticker",
                "ticker or date is null",
            ));
        }
        let mut v = [0.0; 3];
        for (k, (name, arr, lo, hi)) in cols.iter().enumerate() {
            let x = (!arr.is_null(i)).then(|| arr.value(i));
            match x {
                Some(x) if x >= *lo && x <= *hi => v[k] = x,
                _ => {
                    return Err(StageError::data(
                        file,
                        i as u64 + 1,
                        *name,
                        format!("is {x:?}, expected a number in [{lo}, {hi}]"),
                    ));
                }
            }
        }
        let days = out.entry(ticker.value(i).to_string()).or_default();
        if days.insert(date.value(i), [v[2], v[0]]).is_some() {
            return Err(StageError::data(
                file,
                i as u64 + 1,
                "date",
                format!(
                    "ticker {} has a second signal for {}",
                    ticker.value(i),
                    from_days(date.value(i))
                ),
            ));
        }
    }
    Ok(out)
}

/// Aligns signals to `dates`: days without a signal get zeros (no view).
pub fn align_signals(dates: &[i32], signals: Option<&BTreeMap<i32, [f64; 2]>>) -> Vec<Vec<f64>> {
    dates
        .iter()
        .map(|d| {
            signals
                .and_then(|s| s.get(d))
                .map_or(vec![0.0; SIGNAL_FEATURES], |v| v.to_vec())
        })
        .collect()
}

/// Reads a TDQN data file (`Timestamp,Open,High,Low,Close,Volume`, one row per day in date
/// order, as in the TDQN repository's `Data/`). Errors name the file, 1-based line and column.
pub fn read_tdqn_csv(path: &Path) -> StageResult<Bars> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, h)| h.trim()).unwrap_or_default();
    if header != "Timestamp,Open,High,Low,Close,Volume" {
        return Err(StageError::file(
            path,
            format!("header is '{header}', expected Timestamp,Open,High,Low,Close,Volume"),
        ));
    }
    let mut b = Bars {
        dates: vec![],
        high: vec![],
        low: vec![],
        close: vec![],
        volume: vec![],
    };
    for (i, line) in lines {
        let line_no = i as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 6 {
            return Err(StageError::data(
                path,
                line_no,
                "*",
                format!("{} fields, expected 6", f.len()),
            ));
        }
        let date = chrono::NaiveDate::parse_from_str(f[0].trim(), "%Y-%m-%d").map_err(|e| {
            StageError::data(path, line_no, "Timestamp", format!("'{}': {e}", f[0]))
        })?;
        let days = flag_trading::series::to_days(date);
        if b.dates.last().is_some_and(|&d| d >= days) {
            return Err(StageError::data(
                path,
                line_no,
                "Timestamp",
                "dates must increase",
            ));
        }
        let num = |k: usize, name: &str| -> StageResult<f64> {
            f[k].trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && (name != "Close" || *x > 0.0))
                .ok_or_else(|| {
                    StageError::data(
                        path,
                        line_no,
                        name,
                        format!("'{}' is not a valid number", f[k]),
                    )
                })
        };
        let (h, l, c, v) = (
            num(2, "High")?,
            num(3, "Low")?,
            num(4, "Close")?,
            num(5, "Volume")?,
        );
        b.dates.push(days);
        b.high.push(h);
        b.low.push(l);
        b.close.push(c);
        b.volume.push(v);
    }
    Ok(b)
}
