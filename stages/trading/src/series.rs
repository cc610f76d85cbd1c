//! One ticker's daily rows from the `indicators` table, read by column name.
use std::collections::BTreeMap;
use std::ops::Range;

use chrono::NaiveDate;
use flag_core::arrow::array::{Array, Date32Array, Float64Array, RecordBatch, StringArray};
use flag_core::schema::typed_column;
use flag_core::{StageError, StageResult};

/// Days since 1970-01-01, the Arrow `date32` encoding.
pub fn to_days(d: NaiveDate) -> i32 {
    (d - NaiveDate::default()).num_days() as i32
}

/// The calendar date of a `date32` value.
pub fn from_days(days: i32) -> NaiveDate {
    NaiveDate::default() + chrono::Duration::days(days as i64)
}

/// A ticker's rows sorted by date; `cols` holds the indicator columns a strategy asked for.
#[derive(Debug, Clone)]
pub struct Series {
    pub ticker: String,
    pub dates: Vec<i32>,
    pub close: Vec<f64>,
    pub cols: BTreeMap<String, Vec<Option<f64>>>,
}

impl Series {
    /// Indices of the rows dated within `[start, end]` (inclusive).
    pub fn range(&self, start: i32, end: i32) -> Range<usize> {
        let a = self.dates.partition_point(|&d| d < start);
        let b = self.dates.partition_point(|&d| d <= end);
        a..b.max(a)
    }

    /// Value of indicator `name` on row `i` (None: warm-up or missing).
    pub fn get(&self, name: &str, i: usize) -> Option<f64> {
        self.cols
            .get(name)
            .and_then(|c| c[i])
            .filter(|x| x.is_finite())
    }
}

fn input_err(input: &str, message: String) -> StageError {
    StageError::Input {
        input: input.to_string(),
        message,
    }
}

/// Column `name` of `batch` as `T`, or an input error naming the input and the column.
pub fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    input: &str,
    name: &str,
    ty: &str,
) -> StageResult<&'a T> {
    typed_column(batch, name, ty).map_err(|m| input_err(input, m))
}

/// Splits `batch` into one [`Series`] per ticker (sorted by ticker), keeping `needed`
/// indicator columns. Rows are validated: a null ticker/date, a duplicate date or a close
/// that is not a finite positive number is an error naming the 1-based row.
pub fn read_series(batch: &RecordBatch, input: &str, needed: &[&str]) -> StageResult<Vec<Series>> {
    let ticker = column::<StringArray>(batch, input, "ticker", "utf8")?;
    let date = column::<Date32Array>(batch, input, "date", "date32")?;
    let close = column::<Float64Array>(batch, input, "close", "float64")?;
    let mut extra = Vec::new();
    for &name in needed {
        extra.push((name, column::<Float64Array>(batch, input, name, "float64")?));
    }
    let mut rows: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for i in 0..batch.num_rows() {
        if ticker.is_null(i) || date.is_null(i) {
            return Err(input_err(
                input,
                format!("row {}: ticker or date is null", i + 1),
            ));
        }
        rows.entry(ticker.value(i)).or_default().push(i);
    }
    let mut out = Vec::with_capacity(rows.len());
    for (t, mut idx) in rows {
        idx.sort_by_key(|&i| date.value(i));
        for w in idx.windows(2) {
            if date.value(w[0]) == date.value(w[1]) {
                return Err(input_err(
                    input,
                    format!(
                        "row {}: ticker {t} has a second row for {}",
                        w[1] + 1,
                        from_days(date.value(w[1]))
                    ),
                ));
            }
        }
        let mut closes = Vec::with_capacity(idx.len());
        for &i in &idx {
            let c = (!close.is_null(i)).then(|| close.value(i));
            match c {
                Some(c) if c.is_finite() && c > 0.0 => closes.push(c),
                _ => {
                    return Err(input_err(
                        input,
                        format!(
                            "row {}: column 'close' of {t} on {} is {c:?}, expected a positive price",
                            i + 1,
                            from_days(date.value(i))
                        ),
                    ));
                }
            }
        }
        let cols = extra
            .iter()
            .map(|(name, arr)| {
                let v = idx
                    .iter()
                    .map(|&i| (!arr.is_null(i)).then(|| arr.value(i)))
                    .collect();
                (name.to_string(), v)
            })
            .collect();
        out.push(Series {
            ticker: t.to_string(),
            dates: idx.iter().map(|&i| date.value(i)).collect(),
            close: closes,
            cols,
        });
    }
    Ok(out)
}
