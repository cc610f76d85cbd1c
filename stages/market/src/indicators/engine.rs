//! Runs the indicators SQL with DataFusion Parquet in -> Parquet out ([`compute_parquet`]) in
//! groups of whole tickers, each on an [`IndicatorRunner`] (`runner.rs`), so memory stays
//! bounded by the group size whatever the input size.
//!
//! Nulls: schema `ohlcv` allows null open/high/low/volume (close-only sources such as
//! investorbench), but the indicators need every one of them (ATR, KDJ, VWAP, the pass-through
//! columns of schema `indicators` are not nullable). A null open, high, low, close or volume is
//! therefore a clear error naming the file, the 1-based row, the column, the ticker and the
//! date ([`compute_parquet`]) or the row of the batch ([`IndicatorRunner::run_batch`]),
//! raised before the SQL runs: nulls are never propagated into, or guessed by, the SQL.
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::Date32Type;
use flag_core::parquet::arrow::ArrowWriter;
use flag_core::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use flag_core::parquet::basic::Compression;
use flag_core::parquet::file::properties::WriterProperties;
use flag_core::parquet::schema::types::ColumnPath;
use flag_core::schema::schema;
use flag_core::{StageError, StageResult};

use super::runner::IndicatorRunner;

/// The table name the SQL reads.
pub const INPUT_TABLE: &str = "bars";
/// Default number of rows after which a group of tickers is closed (at the next ticker).
/// Each group in flight costs ~3 KB a row of its size at peak (input, window outputs, encoded
/// output); with the plan reused, small groups are no slower: at 1M rows, 250k-row groups
/// peaked at 638 MiB, 10k-row groups at 140 MiB, 0.58 s (`.ci/bench-indicators.sh`).
pub const DEFAULT_CHUNK_ROWS: usize = 10_000;

/// Rows after which the output's current row group is closed (at the next group boundary).
/// The writer holds one row group encoded (~350 B a row): 64k rows held 21 MiB at peak, and
/// 32k rows took 1M rows from 134 to 124 MiB with no change in time at 1M or 10M rows.
const ROW_GROUP_ROWS: usize = 32 * 1024;

/// Rows per batch read from the input (then regrouped into groups of tickers).
const READ_BATCH_ROWS: usize = 16 * 1024;

pub(super) fn df_err(context: &str, e: impl std::fmt::Display) -> StageError {
    StageError::external(format!("indicators: {context}"), e)
}

/// How [`compute_parquet`] groups and runs the work.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A group of tickers is closed at the first ticker change after this many rows. Part of
    /// the output bytes (one row group per group), so the stage takes it as a param.
    pub chunk_rows: usize,
    /// Groups computed at once, each on its own single-partition runner (0: one per core).
    /// Does not change the output: groups are written in input order.
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunk_rows: DEFAULT_CHUNK_ROWS,
            threads: 0,
        }
    }
}

/// Totals of one [`compute_parquet`] run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    pub rows: u64,
    pub groups: u64,
}

/// Caps glibc's malloc at one arena for this process (once; stage jobs run one to a process).
/// The reader, the runners and the writer each got an arena of their own, and each kept the
/// memory its groups had freed: at 1M rows (59 MiB decoded) the peak RSS was 128-130 MiB with
/// per-thread arenas and 114-116 MiB with one, for a run 10-20% slower (0.53-0.58 s -> 0.63 s;
/// TA-Lib + pyarrow takes 1.4 s). Measured with `.ci/bench-indicators.sh`'s input.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            #[allow(unsafe_code)]
            // SAFETY: mallopt only changes a glibc malloc parameter; M_ARENA_MAX is one.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        });
    }
}

/// Reads bars (schema ohlcv, sorted by ticker then date, unique) from `inputs` in order,
/// computes the indicators group by group and appends each group to the Parquet file
/// `output` as it is done. `progress(done_rows, total_rows)` is called after each group.
///
/// Threads: one reads and groups the bars, `opts.threads` runners compute groups at once,
/// and the calling thread writes them in input order (the output does not depend on the
/// number of threads). At most about two groups per runner are in flight.
pub fn compute_parquet(
    sql: &str,
    inputs: &[PathBuf],
    output: &Path,
    opts: &Options,
    progress: &dyn Fn(u64, u64),
) -> StageResult<RunStats> {
    one_malloc_arena();
    let workers = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let out_schema = schema("indicators")?;
    let wctx = || format!("writing {}", output.display());
    let file = File::create(output).map_err(|e| StageError::io(wctx(), e))?;
    // flag_core's writer settings (snappy, created_by), except that dictionary encoding is
    // on for the ticker only: the float columns are nearly all distinct values, so their
    // dictionaries were built, hashed and then abandoned, a quarter of the stage's time.
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by("flag".to_string())
        .set_dictionary_enabled(false)
        .set_column_dictionary_enabled(ColumnPath::from("ticker"), true)
        .build();
    let mut writer = ArrowWriter::try_new(file, out_schema.arrow(), Some(props)).map_err(|e| {
        StageError::Parquet {
            context: wctx(),
            source: e,
        }
    })?;

    let mut readers = Vec::with_capacity(inputs.len());
    let mut total = 0u64;
    for path in inputs {
        let rctx = || format!("reading {}", path.display());
        let f = File::open(path).map_err(|e| StageError::io(rctx(), e))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| StageError::Parquet {
                context: rctx(),
                source: e,
            })?;
        schema("ohlcv")?.check(builder.schema(), &path.display().to_string())?;
        total += builder.metadata().file_metadata().num_rows().max(0) as u64;
        readers.push((path, builder));
    }
    let chunk_rows = opts.chunk_rows;

    let mut stats = RunStats { rows: 0, groups: 0 };
    let (job_tx, job_rx) = mpsc::sync_channel::<(u64, RecordBatch)>(workers);
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::sync_channel::<(u64, StageResult<Vec<RecordBatch>>)>(workers);
    let written = std::thread::scope(|s| -> StageResult<()> {
        let reader = s.spawn(move || -> StageResult<()> {
            let mut order = OrderCheck::default();
            let mut grouper = Grouper::new(chunk_rows);
            let mut seq = 0u64;
            let mut send = |group: RecordBatch| {
                let sent = job_tx.send((seq, group)).is_ok();
                seq += 1;
                sent
            };
            for (path, builder) in readers {
                let rctx = || format!("reading {}", path.display());
                let reader = builder
                    .with_batch_size(READ_BATCH_ROWS)
                    .build()
                    .map_err(|e| StageError::Parquet {
                        context: rctx(),
                        source: e,
                    })?;
                order.start_file(path);
                for batch in reader {
                    let batch = batch.map_err(|e| StageError::Arrow {
                        context: rctx(),
                        source: e,
                    })?;
                    order.check(&batch)?;
                    for group in grouper.push(batch)? {
                        if !send(group) {
                            return Ok(()); // the writer stopped on an error of its own
                        }
                    }
                }
            }
            if let Some(group) = grouper.finish()? {
                send(group);
            }
            Ok(())
        });
        let mut runners = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (job_rx, done_tx) = (&job_rx, done_tx.clone());
            runners.push(s.spawn(move || {
                let runner = match IndicatorRunner::new(sql) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = done_tx.send((u64::MAX, Err(e)));
                        return;
                    }
                };
                loop {
                    let job = job_rx.lock().map(|rx| rx.recv());
                    let Ok(Ok((seq, group))) = job else { return };
                    if done_tx.send((seq, runner.run_batches(group))).is_err() {
                        return;
                    }
                }
            }));
        }
        drop(done_tx);
        // Write in input order; stop at the first error (dropping the receiver stops the rest).
        let mut pending = BTreeMap::new();
        let mut next = 0u64;
        let mut failed = None;
        for (seq, result) in done_rx.iter() {
            match result {
                Err(e) => {
                    failed = Some(e);
                    break;
                }
                Ok(out) => {
                    pending.insert(seq, out);
                }
            }
            while let Some(group) = pending.remove(&next) {
                let mut group_rows = 0;
                for out in &group {
                    // The schema's finite columns (prices, volume): NaN or an infinity is
                    // refused, as every other writer refuses it (StageContext::write_parquet).
                    out_schema
                        .check_finite(out, stats.rows as usize + group_rows)
                        .map_err(|message| StageError::Output {
                            output: "table".into(),
                            message,
                        })?;
                    writer.write(out).map_err(|e| StageError::Parquet {
                        context: wctx(),
                        source: e,
                    })?;
                    group_rows += out.num_rows();
                }
                // A row group closes at the first group boundary after ROW_GROUP_ROWS rows: the
                // writer buffers one row group encoded, and the footer keeps metadata for each
                // (one per 10k-row group made 10M rows 1.5x slower and +120 MiB).
                if writer.in_progress_rows() >= ROW_GROUP_ROWS {
                    writer.flush().map_err(|e| StageError::Parquet {
                        context: wctx(),
                        source: e,
                    })?;
                }
                stats.rows += group_rows as u64;
                stats.groups += 1;
                progress(stats.rows, total);
                next += 1;
            }
        }
        drop(done_rx);
        for r in runners {
            r.join()
                .map_err(|_| StageError::Invalid("indicators: a runner thread panicked".into()))?;
        }
        let read = reader
            .join()
            .map_err(|_| StageError::Invalid("indicators: the reader thread panicked".into()))?;
        // A reading error comes first: it also explains groups that were never computed.
        read?;
        failed.map_or(Ok(()), Err)
    });
    written?;
    let file = writer.into_inner().map_err(|e| StageError::Parquet {
        context: wctx(),
        source: e,
    })?;
    file.sync_all().map_err(|e| StageError::io(wctx(), e))?;
    Ok(stats)
}

/// Checks that rows come sorted by (ticker, date) with no repeat, across batches and files:
/// grouping relies on it, and a repeated day would corrupt every window. Also rejects a null
/// price or volume (module doc).
#[derive(Default)]
struct OrderCheck {
    file: PathBuf,
    row: u64,
    last: Option<(String, i32)>,
}

impl OrderCheck {
    fn start_file(&mut self, path: &Path) {
        self.file = path.to_path_buf();
        self.row = 0;
    }

    fn check(&mut self, batch: &RecordBatch) -> StageResult<()> {
        let tickers = batch.column(0).as_string::<i32>();
        let dates = batch.column(1).as_primitive::<Date32Type>();
        let any_null_price = first_null_price(batch).is_some();
        for i in 0..batch.num_rows() {
            self.row += 1;
            let bad = |column: &str, message: String| {
                StageError::data(self.file.clone(), self.row, column, message)
            };
            if tickers.is_null(i) {
                return Err(bad("ticker", "is null".into()));
            }
            if dates.is_null(i) {
                return Err(bad("date", "is null".into()));
            }
            let (t, d) = (tickers.value(i), dates.value(i));
            if any_null_price
                && let Some(&(_, column)) = PRICE_COLUMNS
                    .iter()
                    .find(|&&(c, _)| batch.column(c).is_null(i))
            {
                return Err(bad(
                    column,
                    format!("{t} on {} is null; {NEED_OHLCV}", fmt_day(d)),
                ));
            }
            if let Some((lt, ld)) = &self.last {
                if t < lt.as_str() {
                    return Err(bad(
                        "ticker",
                        format!("'{t}' after '{lt}': bars must be sorted by ticker, then date"),
                    ));
                }
                if t == lt && d <= *ld {
                    let what = if d == *ld {
                        "repeats"
                    } else {
                        "goes back from"
                    };
                    return Err(bad(
                        "date",
                        format!("{t}: day {} {what} day {}", fmt_day(d), fmt_day(*ld)),
                    ));
                }
            }
            match &mut self.last {
                Some((lt, ld)) if lt == t => *ld = d,
                _ => self.last = Some((t.to_string(), d)),
            }
        }
        Ok(())
    }
}

/// Why a null price column is fatal (see the module doc).
pub(super) const NEED_OHLCV: &str = "the indicators need open, high, low, close and volume \
                          (a close-only source such as investorbench cannot feed this stage)";

/// Columns of schema `ohlcv` the indicators need non-null, by position.
const PRICE_COLUMNS: [(usize, &str); 5] = [
    (2, "open"),
    (3, "high"),
    (4, "low"),
    (5, "close"),
    (6, "volume"),
];

/// The first (0-based row, column) of `bars` with a null in a [`PRICE_COLUMNS`] column.
pub(super) fn first_null_price(bars: &RecordBatch) -> Option<(usize, &'static str)> {
    if PRICE_COLUMNS
        .iter()
        .all(|&(c, _)| bars.column(c).null_count() == 0)
    {
        return None;
    }
    (0..bars.num_rows()).find_map(|i| {
        PRICE_COLUMNS
            .iter()
            .find(|&&(c, _)| bars.column(c).is_null(i))
            .map(|&(_, name)| (i, name))
    })
}

fn fmt_day(days: i32) -> String {
    chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163)
        .map_or_else(|| days.to_string(), |d| d.to_string())
}

/// Cuts a sorted stream of bars into groups of whole tickers. A group ends at the first
/// ticker change at or after `chunk_rows` rows, which depends on the data only (not on how
/// the reader batches it), so equal inputs give equal groups and equal output bytes.
struct Grouper {
    chunk_rows: usize,
    pending: Vec<RecordBatch>,
    rows: usize,
    last_ticker: Option<String>,
}

impl Grouper {
    fn new(chunk_rows: usize) -> Self {
        Grouper {
            chunk_rows: chunk_rows.max(1),
            pending: Vec::new(),
            rows: 0,
            last_ticker: None,
        }
    }

    /// Adds a batch; returns the groups it completes.
    fn push(&mut self, batch: RecordBatch) -> StageResult<Vec<RecordBatch>> {
        let mut done = Vec::new();
        let mut rest = batch;
        loop {
            let n = rest.num_rows();
            let tickers = rest.column(0).as_string::<i32>();
            let from = self.chunk_rows.saturating_sub(self.rows);
            let cut = (from..n).find(|&j| {
                let prev = if j == 0 {
                    self.last_ticker.as_deref()
                } else {
                    Some(tickers.value(j - 1))
                };
                prev.is_some_and(|p| p != tickers.value(j))
            });
            match cut {
                Some(j) => {
                    self.pending.push(rest.slice(0, j));
                    done.push(self.take()?);
                    rest = rest.slice(j, n - j);
                }
                None => {
                    if n > 0 {
                        self.last_ticker = Some(tickers.value(n - 1).to_string());
                    }
                    self.rows += n;
                    self.pending.push(rest);
                    return Ok(done);
                }
            }
        }
    }

    /// The last, incomplete group (None when no rows are left).
    fn finish(&mut self) -> StageResult<Option<RecordBatch>> {
        if self.rows == 0 {
            return Ok(None);
        }
        self.take().map(Some)
    }

    fn take(&mut self) -> StageResult<RecordBatch> {
        let schema = self.pending[0].schema();
        let group = concat_batches(&schema, &self.pending).map_err(|e| StageError::Arrow {
            context: "indicators: grouping bars".into(),
            source: e,
        })?;
        self.pending.clear();
        self.rows = 0;
        self.last_ticker = None;
        Ok(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema as ArrowSchema};

    fn tickers(v: &[&str]) -> RecordBatch {
        let schema = Arc::new(ArrowSchema::new(vec![Field::new(
            "ticker",
            DataType::Utf8,
            false,
        )]));
        let col: ArrayRef = Arc::new(StringArray::from(v.to_vec()));
        RecordBatch::try_new(schema, vec![col]).unwrap()
    }

    fn names(b: &RecordBatch) -> Vec<String> {
        let t = b.column(0).as_string::<i32>();
        (0..b.num_rows()).map(|i| t.value(i).to_string()).collect()
    }

    /// Groups must not depend on how the input is batched.
    #[test]
    fn groups_end_at_the_first_ticker_change_after_chunk_rows() {
        let rows = ["A", "A", "A", "B", "B", "C", "D", "D", "D", "D"];
        for split in 1..rows.len() {
            let mut g = Grouper::new(4);
            let mut got = g.push(tickers(&rows[..split])).unwrap();
            got.extend(g.push(tickers(&rows[split..])).unwrap());
            got.extend(g.finish().unwrap());
            let got: Vec<_> = got.iter().map(names).collect();
            assert_eq!(
                got,
                vec![vec!["A", "A", "A", "B", "B"], vec!["C", "D", "D", "D", "D"]],
                "split at {split}"
            );
        }
    }
}
