//! Comparing a stored output with a recomputed one (`flag verify --recompute`): byte equality
//! first, then, for Parquet, column by column, with the largest numeric difference, so a user
//! sees *where* two machines disagree and by how much.
use std::path::Path;

use arrow::array::{Array, ArrayRef, Float64Array, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde::Serialize;

use crate::error::{EngineError, Result};

/// How one column of a recomputed table compares with the stored one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnDiff {
    pub column: String,
    /// Rows whose values differ (null vs value counts as a difference).
    pub rows_differing: usize,
    pub rows: usize,
    /// First differing row.
    pub first_row: Option<usize>,
    /// Numeric columns (and lists of numbers, element by element): the largest
    /// |stored - recomputed| and its row.
    pub largest_abs_diff: Option<f64>,
    pub largest_at_row: Option<usize>,
    /// Lists of numbers: the element of `largest_at_row` where that difference is.
    pub largest_at_element: Option<usize>,
    /// The two values at `largest_at_row` (or `first_row`), as text: that element of a list;
    /// long values cut to [`SHOWN_CHARS`] characters.
    pub stored: Option<String>,
    pub recomputed: Option<String>,
}

impl ColumnDiff {
    pub fn identical(&self) -> bool {
        self.rows_differing == 0
    }

    pub fn describe(&self) -> String {
        if self.identical() {
            return format!("{}: identical", self.column);
        }
        let mut s = format!(
            "{}: {} of {} rows differ",
            self.column, self.rows_differing, self.rows
        );
        let element = self
            .largest_at_element
            .map_or(String::new(), |e| format!(" element {e}"));
        match (self.largest_abs_diff, self.largest_at_row) {
            (Some(d), Some(r)) => s.push_str(&format!(
                ", largest |diff| {d:.3e} at row {r}{element} (stored {}, recomputed {})",
                self.stored.as_deref().unwrap_or("null"),
                self.recomputed.as_deref().unwrap_or("null")
            )),
            _ => {
                if let Some(r) = self.first_row {
                    s.push_str(&format!(
                        ", first at row {r} (stored {}, recomputed {})",
                        self.stored.as_deref().unwrap_or("null"),
                        self.recomputed.as_deref().unwrap_or("null")
                    ));
                }
            }
        }
        s
    }
}

/// How a recomputed Parquet table compares with the stored one.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum TableDiff {
    /// Same bytes.
    Identical,
    /// Different bytes, same values in every column (e.g. other Parquet metadata).
    SameValues,
    /// The columns (names or types) differ.
    Schema { stored: String, recomputed: String },
    /// Different row counts.
    Rows { stored: usize, recomputed: usize },
    /// Per column; at least one differs.
    Columns { columns: Vec<ColumnDiff> },
}

fn read(path: &Path) -> Result<RecordBatch> {
    let (schema, batches) =
        flag_core::parquet_io::read_parquet_file(path).map_err(|e| EngineError::Store {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    concat_batches(&schema, &batches).map_err(|e| EngineError::Store {
        path: path.to_path_buf(),
        message: format!("concatenating batches: {e}"),
    })
}

fn is_numeric(t: &DataType) -> bool {
    t.is_numeric()
        || matches!(
            t,
            DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
        )
}

fn as_f64(a: &ArrayRef) -> Option<Float64Array> {
    let c = cast(a, &DataType::Float64).ok()?;
    c.as_any().downcast_ref::<Float64Array>().cloned()
}

/// Values shown in a difference are cut to this many characters (a row's summary or a
/// 384-number embedding would bury the verdict).
pub const SHOWN_CHARS: usize = 80;

fn text(a: &ArrayRef, row: usize) -> Option<String> {
    if a.is_null(row) {
        return None;
    }
    let f = ArrayFormatter::try_new(a.as_ref(), &FormatOptions::default()).ok()?;
    let full = f.value(row).to_string();
    let chars = full.chars().count();
    Some(if chars > SHOWN_CHARS {
        let head: String = full.chars().take(SHOWN_CHARS).collect();
        format!("{head}... ({chars} chars)")
    } else {
        full
    })
}

/// A row of a list-of-numbers column (List, LargeList, FixedSizeList) as f64, or None for
/// another type or a null row.
fn list_row(a: &ArrayRef, row: usize) -> Option<Float64Array> {
    use arrow::array::AsArray;
    if a.is_null(row) {
        return None;
    }
    let values = match a.data_type() {
        DataType::List(f) if is_numeric(f.data_type()) => a.as_list::<i32>().value(row),
        DataType::LargeList(f) if is_numeric(f.data_type()) => a.as_list::<i64>().value(row),
        DataType::FixedSizeList(f, _) if is_numeric(f.data_type()) => {
            a.as_fixed_size_list().value(row)
        }
        _ => return None,
    };
    as_f64(&values)
}

fn is_numeric_list(t: &DataType) -> bool {
    match t {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            is_numeric(f.data_type())
        }
        _ => false,
    }
}

fn same_bits(x: f64, y: f64) -> bool {
    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
}

fn abs_diff(x: f64, y: f64) -> f64 {
    let d = (x - y).abs();
    if d.is_nan() { f64::INFINITY } else { d }
}

/// Compares one column (same type, same length).
pub fn diff_column(name: &str, stored: &ArrayRef, recomputed: &ArrayRef) -> ColumnDiff {
    let rows = stored.len();
    let mut d = ColumnDiff {
        column: name.to_string(),
        rows_differing: 0,
        rows,
        first_row: None,
        largest_abs_diff: None,
        largest_at_row: None,
        largest_at_element: None,
        stored: None,
        recomputed: None,
    };
    if stored.to_data() == recomputed.to_data() {
        return d;
    }
    if is_numeric_list(stored.data_type()) {
        diff_lists(&mut d, stored, recomputed);
        return d;
    }
    let numeric = is_numeric(stored.data_type())
        .then(|| as_f64(stored).zip(as_f64(recomputed)))
        .flatten();
    for row in 0..rows {
        let differs = match &numeric {
            Some((a, b)) => match (a.is_null(row), b.is_null(row)) {
                (true, true) => false,
                (false, false) => !same_bits(a.value(row), b.value(row)),
                _ => true,
            },
            None => !same_row(stored, recomputed, row),
        };
        if !differs {
            continue;
        }
        d.rows_differing += 1;
        d.first_row.get_or_insert(row);
        if let Some((a, b)) = &numeric
            && !a.is_null(row)
            && !b.is_null(row)
        {
            let diff = abs_diff(a.value(row), b.value(row));
            if d.largest_abs_diff.is_none_or(|m| diff > m) {
                d.largest_abs_diff = Some(diff);
                d.largest_at_row = Some(row);
            }
        }
    }
    if let Some(row) = d.largest_at_row.or(d.first_row) {
        d.stored = text(stored, row);
        d.recomputed = text(recomputed, row);
    }
    d
}

/// Whether one row holds the same value in both arrays (by their data, not their text,
/// which is cut).
fn same_row(a: &ArrayRef, b: &ArrayRef, row: usize) -> bool {
    a.slice(row, 1).to_data() == b.slice(row, 1).to_data()
}

/// Lists of numbers, element by element: a row differs when its length or any element's bits
/// do; the largest difference names its row and element.
fn diff_lists(d: &mut ColumnDiff, stored: &ArrayRef, recomputed: &ArrayRef) {
    let mut shown: Option<(String, String)> = None;
    for row in 0..d.rows {
        let differs = match (list_row(stored, row), list_row(recomputed, row)) {
            (None, None) => stored.is_null(row) != recomputed.is_null(row),
            (Some(a), Some(b)) if a.len() == b.len() => {
                let mut differs = false;
                for e in 0..a.len() {
                    let (x, y) = (
                        a.is_valid(e).then(|| a.value(e)),
                        b.is_valid(e).then(|| b.value(e)),
                    );
                    match (x, y) {
                        (Some(x), Some(y)) if !same_bits(x, y) => {
                            differs = true;
                            let diff = abs_diff(x, y);
                            if d.largest_abs_diff.is_none_or(|m| diff > m) {
                                d.largest_abs_diff = Some(diff);
                                d.largest_at_row = Some(row);
                                d.largest_at_element = Some(e);
                                shown = Some((x.to_string(), y.to_string()));
                            }
                        }
                        (Some(_), None) | (None, Some(_)) => differs = true,
                        _ => {}
                    }
                }
                differs
            }
            _ => true,
        };
        if differs {
            d.rows_differing += 1;
            d.first_row.get_or_insert(row);
        }
    }
    match shown {
        Some((x, y)) => {
            d.stored = Some(x);
            d.recomputed = Some(y);
        }
        None => {
            if let Some(row) = d.first_row {
                d.stored = text(stored, row);
                d.recomputed = text(recomputed, row);
            }
        }
    }
}

/// Compares two Parquet files: bytes, then schema, rows and every column.
pub fn diff_parquet(stored: &Path, recomputed: &Path) -> Result<TableDiff> {
    let bytes =
        |p: &Path| std::fs::read(p).map_err(|e| EngineError::io(p.display().to_string(), e));
    if bytes(stored)? == bytes(recomputed)? {
        return Ok(TableDiff::Identical);
    }
    let (a, b) = (read(stored)?, read(recomputed)?);
    let fields = |t: &RecordBatch| {
        t.schema()
            .fields()
            .iter()
            .map(|f| format!("{}: {}", f.name(), f.data_type()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if a.schema().fields() != b.schema().fields() {
        return Ok(TableDiff::Schema {
            stored: fields(&a),
            recomputed: fields(&b),
        });
    }
    if a.num_rows() != b.num_rows() {
        return Ok(TableDiff::Rows {
            stored: a.num_rows(),
            recomputed: b.num_rows(),
        });
    }
    let columns: Vec<ColumnDiff> = a
        .schema()
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| diff_column(f.name(), a.column(i), b.column(i)))
        .collect();
    Ok(if columns.iter().all(ColumnDiff::identical) {
        TableDiff::SameValues
    } else {
        TableDiff::Columns { columns }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn write(dir: &Path, name: &str, x: Vec<Option<f64>>, s: Vec<&str>) -> std::path::PathBuf {
        let n = x.len() as i64;
        let schema = Arc::new(Schema::new(vec![
            Field::new("day", DataType::Int64, false),
            Field::new("equity", DataType::Float64, true),
            Field::new("action", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from((0..n).collect::<Vec<_>>())),
                Arc::new(Float64Array::from(x)),
                Arc::new(StringArray::from(s)),
            ],
        )
        .unwrap();
        let p = dir.join(name);
        flag_core::parquet_io::write_parquet_file(&p, schema, &[batch]).unwrap();
        p
    }

    #[test]
    fn identical_files_are_identical() {
        let d = tempfile::tempdir().unwrap();
        let a = write(
            d.path(),
            "a.parquet",
            vec![Some(1.0), None],
            vec!["LONG", "SHORT"],
        );
        let b = write(
            d.path(),
            "b.parquet",
            vec![Some(1.0), None],
            vec!["LONG", "SHORT"],
        );
        assert_eq!(diff_parquet(&a, &b).unwrap(), TableDiff::Identical);
    }

    #[test]
    fn names_the_differing_columns_and_the_largest_difference() {
        let d = tempfile::tempdir().unwrap();
        let a = write(
            d.path(),
            "a.parquet",
            vec![Some(100.0), Some(101.0), Some(102.0), None],
            vec!["LONG", "LONG", "SHORT", "LONG"],
        );
        let b = write(
            d.path(),
            "b.parquet",
            vec![Some(100.0), Some(101.5), Some(102.25), Some(3.0)],
            vec!["LONG", "SHORT", "SHORT", "LONG"],
        );
        let TableDiff::Columns { columns } = diff_parquet(&a, &b).unwrap() else {
            panic!("expected column differences");
        };
        let by = |n: &str| columns.iter().find(|c| c.column == n).unwrap();
        assert!(by("day").identical());
        let eq = by("equity");
        assert_eq!((eq.rows_differing, eq.rows), (3, 4), "null vs value counts");
        assert_eq!(eq.largest_abs_diff, Some(0.5));
        assert_eq!(eq.largest_at_row, Some(1));
        assert_eq!(
            (eq.stored.as_deref(), eq.recomputed.as_deref()),
            (Some("101.0"), Some("101.5"))
        );
        let act = by("action");
        assert_eq!((act.rows_differing, act.first_row), (1, Some(1)));
        assert!(act.largest_abs_diff.is_none());
        assert_eq!(
            act.describe(),
            "action: 1 of 4 rows differ, first at row 1 (stored LONG, recomputed SHORT)"
        );
        assert!(
            eq.describe()
                .starts_with("equity: 3 of 4 rows differ, largest |diff| 5.000e-1 at row 1")
        );
    }

    /// Regression: an embedding column printed both 384-number vectors in full, and a long
    /// text column its whole value; now the element with the largest difference is named and
    /// long values are cut.
    #[test]
    fn lists_of_numbers_are_compared_element_by_element_and_long_values_cut() {
        use arrow::array::{FixedSizeListBuilder, Float32Builder, ListBuilder};
        let fixed = |rows: &[[f32; 3]]| -> ArrayRef {
            let mut b = FixedSizeListBuilder::new(Float32Builder::new(), 3);
            for r in rows {
                b.values().append_slice(r);
                b.append(true);
            }
            Arc::new(b.finish())
        };
        let a = fixed(&[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]);
        let b = fixed(&[[1.0, 2.0, 3.0], [4.0, 5.25, 6.0], [7.0, 8.0, 9.5]]);
        let d = diff_column("embedding", &a, &b);
        assert_eq!((d.rows_differing, d.first_row), (2, Some(1)));
        assert_eq!(d.largest_abs_diff, Some(0.5));
        assert_eq!((d.largest_at_row, d.largest_at_element), (Some(2), Some(2)));
        assert_eq!(
            d.describe(),
            "embedding: 2 of 3 rows differ, largest |diff| 5.000e-1 at row 2 element 2 \
             (stored 9, recomputed 9.5)"
        );
        assert!(diff_column("embedding", &a, &a.clone()).identical());

        // Variable lists: another length differs without a numeric difference.
        let list = |rows: &[&[f32]]| -> ArrayRef {
            let mut b = ListBuilder::new(Float32Builder::new());
            for r in rows {
                b.values().append_slice(r);
                b.append(true);
            }
            Arc::new(b.finish())
        };
        let d = diff_column("v", &list(&[&[1.0], &[2.0, 3.0]]), &list(&[&[1.0], &[2.0]]));
        assert_eq!(
            (d.rows_differing, d.first_row, d.largest_abs_diff),
            (1, Some(1), None)
        );

        let long = "x".repeat(200);
        let a: ArrayRef = Arc::new(StringArray::from(vec![format!("{long}a")]));
        let b: ArrayRef = Arc::new(StringArray::from(vec![format!("{long}b")]));
        let d = diff_column("summary", &a, &b);
        assert_eq!(
            d.rows_differing, 1,
            "a difference past the cut is still one"
        );
        let shown = d.stored.unwrap();
        assert!(shown.ends_with("... (201 chars)"), "{shown}");
        assert_eq!(shown.chars().count(), SHOWN_CHARS + "... (201 chars)".len());
    }

    #[test]
    fn row_count_differences_are_named() {
        let d = tempfile::tempdir().unwrap();
        let a = write(d.path(), "a.parquet", vec![Some(1.0)], vec!["LONG"]);
        let b = write(
            d.path(),
            "b.parquet",
            vec![Some(1.0), Some(2.0)],
            vec!["LONG", "LONG"],
        );
        assert_eq!(
            diff_parquet(&a, &b).unwrap(),
            TableDiff::Rows {
                stored: 1,
                recomputed: 2
            }
        );
    }
}
