//! The schema registry: every artifact column is defined once, in `schemas/*.yaml`.
//! Writers build batches from it and readers check files against it.
//!
//! Finiteness: a float column is `finite` when its column says `finite: true`, or the schema
//! says `finite: true` (every float column of it, unless a column says `finite: false`).
//! A stage's output with NaN or an infinity in such a column is refused before it is written
//! ([`Schema::check_finite`]): an overflowed price, equity or metric is no result. Prices,
//! equity, trades and metrics are finite; training logs and model scores, where a NaN is
//! itself the record (a diverged loss), are not.
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema as ArrowSchema, SchemaRef, TimeUnit};
use serde::Deserialize;

use crate::error::{StageError, StageResult};

include!(concat!(env!("OUT_DIR"), "/schema_files.rs"));

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ColumnType {
    #[serde(rename = "utf8")]
    Utf8,
    #[serde(rename = "date32")]
    Date32,
    #[serde(rename = "int32")]
    Int32,
    #[serde(rename = "int64")]
    Int64,
    #[serde(rename = "float64")]
    Float64,
    #[serde(rename = "bool")]
    Bool,
    /// Microseconds since the epoch, UTC.
    #[serde(rename = "timestamp_us_utc")]
    TimestampUsUtc,
    #[serde(rename = "list<utf8>")]
    ListUtf8,
    #[serde(rename = "list<float64>")]
    ListFloat64,
    /// Embeddings: the model's float32 values as they are (half the bytes of float64).
    #[serde(rename = "list<float32>")]
    ListFloat32,
}

impl ColumnType {
    pub fn to_arrow(self) -> DataType {
        match self {
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::Date32 => DataType::Date32,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::TimestampUsUtc => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            ColumnType::ListUtf8 => {
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
            }
            ColumnType::ListFloat64 => {
                DataType::List(Arc::new(Field::new("item", DataType::Float64, true)))
            }
            ColumnType::ListFloat32 => {
                DataType::List(Arc::new(Field::new("item", DataType::Float32, true)))
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ColumnType,
    #[serde(default)]
    pub nullable: bool,
    /// NaN and infinities are refused (default: the schema's `finite`).
    #[serde(default)]
    pub finite: Option<bool>,
    #[serde(default)]
    pub doc: String,
}

/// One artifact kind's columns, in order.
#[derive(Debug, Clone, Deserialize)]
pub struct Schema {
    pub name: String,
    #[serde(default)]
    pub doc: String,
    /// Every float column is finite unless it says `finite: false`.
    #[serde(default)]
    pub finite: bool,
    pub columns: Vec<Column>,
    /// Bytes of the YAML file, hashed into the key of every stage writing this schema.
    #[serde(skip)]
    pub source: &'static str,
    #[serde(skip)]
    arrow: OnceLock<SchemaRef>,
}

impl Schema {
    pub fn arrow(&self) -> SchemaRef {
        self.arrow
            .get_or_init(|| {
                Arc::new(ArrowSchema::new(
                    self.columns
                        .iter()
                        .map(|c| Field::new(&c.name, c.ty.to_arrow(), c.nullable))
                        .collect::<Vec<_>>(),
                ))
            })
            .clone()
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Whether `c` (a column of this schema) must hold only finite values: a float column
    /// (scalar or list) that says so, or whose schema does.
    pub fn is_finite_column(&self, c: &Column) -> bool {
        let float = matches!(
            c.ty,
            ColumnType::Float64 | ColumnType::ListFloat64 | ColumnType::ListFloat32
        );
        float && c.finite.unwrap_or(self.finite)
    }

    /// Checks that no finite column of `batch` (already checked against this schema) holds
    /// NaN or an infinity. `first_row` is the 0-based row of the batch's first row in the
    /// whole output. The error names the column, the 1-based row, the value, and the row's
    /// leading text/date columns (ticker, date, strategy, ...), which say which input row
    /// produced it.
    pub fn check_finite(&self, batch: &RecordBatch, first_row: usize) -> Result<(), String> {
        for (ci, c) in self.columns.iter().enumerate() {
            if !self.is_finite_column(c) {
                continue;
            }
            let Some(col) = batch.columns().get(ci) else {
                continue;
            };
            if let Some((row, v)) = first_non_finite(col.as_ref()) {
                return Err(format!(
                    "column '{}' row {}{} is {v}, but schema '{}' says the column is finite: a \
                     value that over- or underflowed is no result (check the inputs and params \
                     that give this row)",
                    c.name,
                    first_row + row + 1,
                    self.row_keys(batch, row),
                    self.name
                ));
            }
        }
        Ok(())
    }

    /// " (ticker=AAPL, date=2019-12-31, ...)": the text and date columns of a row, the keys
    /// a user finds the input row by (at most 6, each value cut to 60 characters).
    fn row_keys(&self, batch: &RecordBatch, row: usize) -> String {
        use arrow::array::{Array, Date32Array, StringArray};
        let mut keys = Vec::new();
        for (c, col) in self.columns.iter().zip(batch.columns()) {
            if keys.len() == 6 {
                break;
            }
            if col.is_null(row) {
                continue;
            }
            let v = match c.ty {
                ColumnType::Utf8 => col
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .map(|a| a.value(row).chars().take(60).collect::<String>()),
                ColumnType::Date32 => col
                    .as_any()
                    .downcast_ref::<Date32Array>()
                    .and_then(|a| a.value_as_date(row))
                    .map(|d| d.to_string()),
                _ => None,
            };
            if let Some(v) = v {
                keys.push(format!("{}={v}", c.name));
            }
        }
        if keys.is_empty() {
            String::new()
        } else {
            format!(" ({})", keys.join(", "))
        }
    }

    /// Builds a batch in this schema; a wrong type, count or a null in a non-null column
    /// is an error naming the column.
    pub fn batch(&self, columns: Vec<ArrayRef>) -> StageResult<RecordBatch> {
        if columns.len() != self.columns.len() {
            return Err(StageError::Invalid(format!(
                "schema '{}': {} columns given, {} defined",
                self.name,
                columns.len(),
                self.columns.len()
            )));
        }
        for (c, a) in self.columns.iter().zip(&columns) {
            let want = c.ty.to_arrow();
            if a.data_type() != &want {
                return Err(StageError::Invalid(format!(
                    "schema '{}': column '{}' is {}, schema says {}",
                    self.name,
                    c.name,
                    a.data_type(),
                    want
                )));
            }
            if !c.nullable && a.null_count() > 0 {
                return Err(StageError::Invalid(format!(
                    "schema '{}': column '{}' has {} nulls but is not nullable",
                    self.name,
                    c.name,
                    a.null_count()
                )));
            }
        }
        RecordBatch::try_new(self.arrow(), columns).map_err(|e| StageError::Arrow {
            context: format!("schema '{}'", self.name),
            source: e,
        })
    }

    /// Checks that a batch read from, or about to be written to, an artifact matches this
    /// schema exactly: names, order, types, and no nulls where none are allowed.
    pub fn check(&self, got: &ArrowSchema, what: &str) -> StageResult<()> {
        let names: Vec<&str> = got.fields().iter().map(|f| f.name().as_str()).collect();
        for (i, c) in self.columns.iter().enumerate() {
            let Some(f) = got.fields().get(i) else {
                return Err(StageError::Invalid(format!(
                    "{what}: missing column '{}' (schema '{}'; has {:?})",
                    c.name, self.name, names
                )));
            };
            if f.name() != &c.name {
                return Err(StageError::Invalid(format!(
                    "{what}: column {} is '{}', schema '{}' expects '{}'",
                    i + 1,
                    f.name(),
                    self.name,
                    c.name
                )));
            }
            let want = c.ty.to_arrow();
            if !types_match(f.data_type(), &want) {
                return Err(StageError::Invalid(format!(
                    "{what}: column '{}' is {}, schema '{}' says {}",
                    c.name,
                    f.data_type(),
                    self.name,
                    want
                )));
            }
        }
        if got.fields().len() > self.columns.len() {
            return Err(StageError::Invalid(format!(
                "{what}: extra column '{}' not in schema '{}'",
                got.fields()[self.columns.len()].name(),
                self.name
            )));
        }
        Ok(())
    }
}

/// The 0-based row and value of the first NaN or infinity in a float array (a list array:
/// in any of its row's items); nulls are not values.
fn first_non_finite(col: &dyn arrow::array::Array) -> Option<(usize, String)> {
    use arrow::array::{Array, Float32Array, Float64Array, ListArray};
    if let Some(a) = col.as_any().downcast_ref::<Float64Array>() {
        return (0..a.len())
            .find(|&i| a.is_valid(i) && !a.value(i).is_finite())
            .map(|i| (i, a.value(i).to_string()));
    }
    if let Some(a) = col.as_any().downcast_ref::<Float32Array>() {
        return (0..a.len())
            .find(|&i| a.is_valid(i) && !a.value(i).is_finite())
            .map(|i| (i, a.value(i).to_string()));
    }
    if let Some(l) = col.as_any().downcast_ref::<ListArray>() {
        for row in 0..l.len() {
            if l.is_valid(row)
                && let Some((k, v)) = first_non_finite(l.value(row).as_ref())
            {
                return Some((row, format!("{v} (item {})", k + 1)));
            }
        }
    }
    None
}

/// List fields may differ only in the inner field's nullability/name after a Parquet round trip.
fn types_match(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y)) => x.data_type() == y.data_type(),
        _ => a == b,
    }
}

/// All schemas compiled into this build.
pub struct SchemaRegistry {
    schemas: BTreeMap<String, Schema>,
}

static REGISTRY: OnceLock<SchemaRegistry> = OnceLock::new();

impl SchemaRegistry {
    pub fn global() -> &'static SchemaRegistry {
        REGISTRY.get_or_init(|| {
            let mut schemas = BTreeMap::new();
            for (stem, text) in SCHEMA_FILES {
                let mut s: Schema = serde_yaml::from_str(text)
                    .unwrap_or_else(|e| panic!("schemas/{stem}.yaml is invalid: {e}"));
                assert_eq!(
                    &s.name, stem,
                    "schemas/{stem}.yaml must declare name: {stem}"
                );
                s.source = text;
                schemas.insert(s.name.clone(), s);
            }
            SchemaRegistry { schemas }
        })
    }

    pub fn get(&self, name: &str) -> StageResult<&Schema> {
        self.schemas
            .get(name)
            .ok_or_else(|| StageError::Invalid(format!("no schema '{name}' in schemas/")))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.schemas.keys().map(String::as_str)
    }
}

/// Column `name` of `batch` as array type `T` (`ty` names it in the message). The error is
/// the bare message; callers add which input or file it concerns.
pub fn typed_column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
    ty: &str,
) -> Result<&'a T, String> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| format!("has no column '{name}'"))?;
    col.as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| format!("column '{name}' is {}, expected {ty}", col.data_type()))
}

/// Shorthand for `SchemaRegistry::global().get(name)`.
pub fn schema(name: &str) -> StageResult<&'static Schema> {
    SchemaRegistry::global().get(name)
}

#[cfg(test)]
mod tests {
    use arrow::array::{Float64Array, StringArray};

    use super::*;

    #[test]
    fn non_finite_values_in_finite_columns_are_named_with_their_row() {
        let s: Schema = serde_yaml::from_str(
            "name: x\nfinite: true\ncolumns:\n  - {name: ticker, type: utf8}\n  \
             - {name: value, type: float64}\n  - {name: loss, type: float64, finite: false}\n",
        )
        .unwrap();
        let batch = |value: Vec<f64>, loss: Vec<f64>| {
            RecordBatch::try_new(
                s.arrow(),
                vec![
                    Arc::new(StringArray::from(vec!["AAPL", "MSFT"])) as ArrayRef,
                    Arc::new(Float64Array::from(value)),
                    Arc::new(Float64Array::from(loss)),
                ],
            )
            .unwrap()
        };
        assert_eq!(
            s.check_finite(&batch(vec![1.0, 2.0], vec![f64::NAN, 1.0]), 0),
            Ok(())
        );
        assert_eq!(
            s.check_finite(&batch(vec![1.0, f64::INFINITY], vec![0.0, 0.0]), 10)
                .unwrap_err(),
            "column 'value' row 12 (ticker=MSFT) is inf, but schema 'x' says the column is \
             finite: a value that over- or underflowed is no result (check the inputs and \
             params that give this row)"
        );
    }

    #[test]
    fn typed_column_names_a_missing_or_mistyped_column() {
        let batch = RecordBatch::try_from_iter([(
            "close",
            Arc::new(StringArray::from(vec!["1.5"])) as ArrayRef,
        )])
        .unwrap();
        assert_eq!(
            typed_column::<Float64Array>(&batch, "close", "float64").unwrap_err(),
            "column 'close' is Utf8, expected float64"
        );
        assert_eq!(
            typed_column::<Float64Array>(&batch, "open", "float64").unwrap_err(),
            "has no column 'open'"
        );
        let s = typed_column::<StringArray>(&batch, "close", "utf8").unwrap();
        assert_eq!(s.value(0), "1.5");
    }
}
