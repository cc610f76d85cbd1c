//! The data-quality section: defect counts per ticker and source file from the ingest report
//! (schema `ingest_report`: one row per (ticker, file), one count column per defect kind).
//!
//! Columns are read by name, and every integer column is shown under its own name, so a
//! defect kind added to that schema appears here without a change to this stage.
use std::collections::BTreeSet;

use flag_core::arrow::array::{
    Array, Date32Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use flag_core::arrow::datatypes::DataType;
use flag_core::{StageContext, StageError, StageResult};

use crate::data::fmt_date;
use crate::tables::{Cell, Table};

/// Volume columns, always shown; every other integer column is a defect count.
const VOLUME: &[&str] = &["rows_read", "rows_kept"];

#[derive(Debug, Clone, Default)]
pub struct Quality {
    /// Integer columns in first-seen schema order.
    pub columns: Vec<String>,
    pub rows: Vec<QualityRow>,
    /// (format, note) pairs, each once.
    pub notes: BTreeSet<(String, String)>,
    pub sources: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct QualityRow {
    pub ticker: String,
    pub file: String,
    pub format: String,
    pub period: Option<(i32, i32)>,
    /// Parallel to [`Quality::columns`]; None where this artifact lacks the column.
    pub counts: Vec<Option<i64>>,
    pub source: usize,
}

fn strings<'a>(
    batch: &'a RecordBatch,
    name: &str,
    file: &str,
) -> StageResult<Option<&'a StringArray>> {
    match batch.column_by_name(name) {
        None => Ok(None),
        Some(c) => c
            .as_any()
            .downcast_ref::<StringArray>()
            .map(Some)
            .ok_or_else(|| StageError::file(file, format!("column '{name}' is not utf8"))),
    }
}

fn text(a: Option<&StringArray>, row: usize) -> String {
    a.filter(|a| !a.is_null(row))
        .map(|a| a.value(row).to_string())
        .unwrap_or_default()
}

impl Quality {
    pub fn read(ctx: &StageContext) -> StageResult<Quality> {
        let mut q = Quality::default();
        let files: Vec<String> = ctx
            .inputs("ingest")?
            .iter()
            .map(|a| {
                a.files
                    .first()
                    .map_or_else(|| a.reference.clone(), |f| f.display().to_string())
            })
            .collect();
        for ((reference, batch), file) in ctx.read_inputs("ingest")?.into_iter().zip(files) {
            q.add(&reference, &batch, &file)?;
        }
        q.rows
            .sort_by(|a, b| (&a.ticker, &a.file, a.source).cmp(&(&b.ticker, &b.file, b.source)));
        Ok(q)
    }

    /// Adds the rows of one ingest report.
    pub fn add(&mut self, reference: &str, batch: &RecordBatch, file: &str) -> StageResult<()> {
        let ticker = strings(batch, "ticker", file)?
            .ok_or_else(|| StageError::file(file, "ingest report has no 'ticker' column"))?;
        let path = strings(batch, "file", file)?
            .ok_or_else(|| StageError::file(file, "ingest report has no 'file' column"))?;
        let format = strings(batch, "format", file)?;
        let note = strings(batch, "note", file)?;
        let date = |n: &str| {
            batch
                .column_by_name(n)
                .and_then(|c| c.as_any().downcast_ref::<Date32Array>())
        };
        let (first, last) = (date("first_date"), date("last_date"));
        let ints: Vec<(usize, &dyn Array)> = batch
            .schema()
            .fields()
            .iter()
            .zip(batch.columns())
            .filter(|(f, _)| matches!(f.data_type(), DataType::Int64 | DataType::Int32))
            .map(|(f, c)| (self.column(f.name()), c.as_ref()))
            .collect();
        let source = self.sources.len();
        self.sources.push(reference.to_string());
        for row in 0..batch.num_rows() {
            let mut counts = vec![None; self.columns.len()];
            for (i, a) in &ints {
                if a.is_null(row) {
                    return Err(StageError::data(
                        file,
                        row as u64 + 1,
                        &self.columns[*i],
                        "is null",
                    ));
                }
                counts[*i] = a
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .map(|x| x.value(row))
                    .or_else(|| {
                        a.as_any()
                            .downcast_ref::<Int32Array>()
                            .map(|x| x.value(row) as i64)
                    });
            }
            let period = match (first, last) {
                (Some(f), Some(l)) if !f.is_null(row) && !l.is_null(row) => {
                    Some((f.value(row), l.value(row)))
                }
                _ => None,
            };
            let fmt = text(format, row);
            if note.is_some() {
                let n = text(note, row);
                if !n.is_empty() {
                    self.notes.insert((fmt.clone(), n));
                }
            }
            self.rows.push(QualityRow {
                ticker: text(Some(ticker), row),
                file: text(Some(path), row),
                format: fmt,
                period,
                counts,
                source,
            });
        }
        Ok(())
    }

    fn column(&mut self, name: &str) -> usize {
        match self.columns.iter().position(|c| c == name) {
            Some(i) => i,
            None => {
                self.columns.push(name.to_string());
                self.columns.len() - 1
            }
        }
    }

    /// Defect columns that are zero (or absent) in every row: named in one line instead
    /// of filling the table with zeros.
    pub fn clean_columns(&self) -> Vec<&str> {
        self.columns
            .iter()
            .enumerate()
            .filter(|(i, c)| {
                !VOLUME.contains(&c.as_str())
                    && self
                        .rows
                        .iter()
                        .all(|r| r.counts.get(*i).copied().flatten().unwrap_or(0) == 0)
            })
            .map(|(_, c)| c.as_str())
            .collect()
    }

    /// Rows = ticker (file); columns = format, period, volumes and the non-zero defect kinds.
    pub fn table(&self) -> Table {
        let clean = self.clean_columns();
        let shown: Vec<usize> = (0..self.columns.len())
            .filter(|i| !clean.contains(&self.columns[*i].as_str()))
            .collect();
        let cell = |text: String| Cell { text, bold: false };
        let rows = self
            .rows
            .iter()
            .map(|r| {
                let mut cells = vec![
                    cell(if r.format.is_empty() {
                        "–".into()
                    } else {
                        r.format.clone()
                    }),
                    cell(r.period.map_or_else(
                        || "–".into(),
                        |(a, b)| format!("{} – {}", fmt_date(a), fmt_date(b)),
                    )),
                ];
                for i in &shown {
                    let n = r.counts.get(*i).copied().flatten();
                    cells.push(Cell {
                        text: n.map_or_else(|| "–".into(), |n| n.to_string()),
                        // Non-zero defect counts stand out.
                        bold: n.is_some_and(|n| n != 0)
                            && !VOLUME.contains(&self.columns[*i].as_str()),
                    });
                }
                (format!("{} ({})", r.ticker, r.file), cells)
            })
            .collect();
        let mut columns = vec!["format".to_string(), "period kept".to_string()];
        columns.extend(shown.iter().map(|i| self.columns[*i].replace('_', " ")));
        Table {
            caption: "Per ticker and source file: rows read and kept, and defects found while \
                      ingesting (non-zero defect counts in bold)."
                .into(),
            corner: "Ticker (file)".into(),
            groups: Vec::new(),
            columns,
            rows,
            provenance: self
                .sources
                .iter()
                .map(|s| (s.clone(), "ingest report".to_string()))
                .collect(),
            mark: "warn",
        }
    }
}
