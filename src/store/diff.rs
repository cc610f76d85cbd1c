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
    /// Numeric columns: the largest |stored - recomputed| and its row.
    pub largest_abs_diff: Option<f64>,
    pub largest_at_row: Option<usize>,
    /// The two values at `largest_at_row` (or `first_row`), as text.
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
        match (self.largest_abs_diff, self.largest_at_row) {
            (Some(d), Some(r)) => s.push_str(&format!(
                ", largest |diff| {d:.3e} at row {r} (stored {}, recomputed {})",
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

fn text(a: &ArrayRef, row: usize) -> Option<String> {
    if a.is_null(row) {
        return None;
    }
    let f = ArrayFormatter::try_new(a.as_ref(), &FormatOptions::default()).ok()?;
    Some(f.value(row).to_string())
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
        stored: None,
        recomputed: None,
    };
    if stored.to_data() == recomputed.to_data() {
        return d;
    }
    let numeric = is_numeric(stored.data_type())
        .then(|| as_f64(stored).zip(as_f64(recomputed)))
        .flatten();
    for row in 0..rows {
        let differs = match &numeric {
            Some((a, b)) => match (a.is_null(row), b.is_null(row)) {
                (true, true) => false,
                (false, false) => {
                    let (x, y) = (a.value(row), b.value(row));
                    x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan())
                }
                _ => true,
            },
            None => text(stored, row) != text(recomputed, row),
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
            let diff = (a.value(row) - b.value(row)).abs();
            let diff = if diff.is_nan() { f64::INFINITY } else { diff };
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
