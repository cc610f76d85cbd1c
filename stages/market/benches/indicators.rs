//! Indicators benchmark: synthetic OHLCV (2,000 tickers x 5,000 days = 10M rows by default,
//! fixed seed) to Parquet, then the stage's own code path (`compute_parquet`, Parquet in ->
//! Parquet out) on the real SQL file. Reports wall time and peak RSS (VmHWM; generation runs
//! in a child process, so neither includes it) and the input's decoded size (the memory
//! goal's yardstick) as JSON in `$FLAG_BENCH_OUT/indicators.json` (default
//! `<repo>/artifacts/bench/`).
//!
//! Scale down with FLAG_BENCH_TICKERS and FLAG_BENCH_DAYS, e.g.
//! `FLAG_BENCH_TICKERS=100 cargo bench --workspace --bench indicators`; FLAG_BENCH_CHUNK_ROWS
//! and FLAG_BENCH_THREADS set the stage's group size and runner count.
//!
//! `.ci/bench-indicators.sh` instead hands it a Parquet file in schema ohlcv
//! (FLAG_BENCH_INPUT; no generation), keeps the output (FLAG_BENCH_OUTPUT) and takes the JSON
//! at FLAG_BENCH_JSON, so the stage and the TA-Lib/polars anchors read the very same bytes.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use flag_core::arrow::array::{ArrayRef, Date32Array, Float64Array, StringArray};
use flag_core::parquet::arrow::ArrowWriter;
use flag_core::schema::schema;
use flag_market::indicators::{Options, SQL_FILE, compute_parquet};

const SEED: u64 = 0x5EED_F1A6;
/// Set for the child process that only writes the synthetic input.
const GENERATE_TO: &str = "FLAG_BENCH_GENERATE_TO";
/// Tickers per generated batch (bounded memory while generating).
const GEN_TICKERS_PER_BATCH: usize = 50;
/// 2000-01-03 as days since 1970-01-01.
const FIRST_DAY: i32 = 10_959;

/// SplitMix64: tiny, deterministic, good enough for synthetic prices.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a whole number")),
        Err(_) => default,
    }
}

/// Writes `tickers` x `days` geometric-Brownian bars, sorted by ticker then date.
fn generate(path: &Path, tickers: usize, days: usize) -> u64 {
    let ohlcv = schema("ohlcv").unwrap();
    let mut writer =
        ArrowWriter::try_new(File::create(path).unwrap(), ohlcv.arrow(), None).unwrap();
    let mut rng = Rng(SEED);
    let mut rows = 0u64;
    for first in (0..tickers).step_by(GEN_TICKERS_PER_BATCH) {
        let n = GEN_TICKERS_PER_BATCH.min(tickers - first) * days;
        let (mut t, mut d) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut cols: [Vec<f64>; 5] = std::array::from_fn(|_| Vec::with_capacity(n));
        for k in first..first + GEN_TICKERS_PER_BATCH.min(tickers - first) {
            let name = format!("T{k:05}");
            let sigma = 0.01 + 0.02 * rng.uniform();
            let mut close = 20.0 + 180.0 * rng.uniform();
            for day in 0..days {
                let open = close * (0.002 * rng.normal()).exp();
                close = open * (0.0002 + sigma * rng.normal()).exp();
                let high = open.max(close) * (1.0 + 0.005 * rng.normal().abs());
                let low = open.min(close) * (1.0 - 0.005 * rng.normal().abs());
                let volume = (1.0e6 * (0.3 * rng.normal()).exp()).round();
                t.push(name.clone());
                d.push(FIRST_DAY + day as i32);
                for (c, v) in cols.iter_mut().zip([open, high, low, close, volume]) {
                    c.push(v);
                }
            }
        }
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(t)),
            Arc::new(Date32Array::from(d)),
        ];
        arrays.extend(
            cols.into_iter()
                .map(|c| Arc::new(Float64Array::from(c)) as ArrayRef),
        );
        arrays.push(Arc::new(Float64Array::from(vec![None::<f64>; n])));
        let batch = ohlcv.batch(arrays).unwrap();
        rows += batch.num_rows() as u64;
        writer.write(&batch).unwrap();
    }
    writer.close().unwrap();
    rows
}

/// Peak resident set size of this process so far, in MiB (Linux VmHWM).
fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM")
}

/// A `/proc/self/status` figure in kB (VmRSS, RssFile, ...), in MiB.
fn status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.split(':').next() == Some(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The Parquet file's size decoded into Arrow arrays (value and offset buffers), in MiB.
fn decoded_mib(path: &Path) -> f64 {
    let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader =
        flag_core::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .and_then(|b| b.with_batch_size(64 * 1024).build())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut bytes = 0usize;
    for batch in reader {
        let batch = batch.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        bytes += batch
            .columns()
            .iter()
            .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
            .sum::<usize>();
    }
    bytes as f64 / (1024.0 * 1024.0)
}

/// Rows of an existing Parquet file (from its footer).
fn parquet_rows(path: &Path) -> u64 {
    let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = flag_core::parquet::file::reader::SerializedFileReader::new(f)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    use flag_core::parquet::file::reader::FileReader;
    reader.metadata().file_metadata().num_rows() as u64
}

fn main() {
    let tickers = env_usize("FLAG_BENCH_TICKERS", 2_000);
    let days = env_usize("FLAG_BENCH_DAYS", 5_000);
    // Generation runs in a child process (this binary again), so the peak RSS measured below
    // is the stage's alone, as in a real run, not the generator's. The child does only that.
    if let Some(path) = std::env::var_os(GENERATE_TO) {
        generate(Path::new(&path), tickers, days);
        return;
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let repo = manifest.join("../..");
    let sql = std::fs::read_to_string(repo.join(SQL_FILE)).expect("reading the indicators SQL");
    let work = std::env::temp_dir().join(format!("flag-bench-indicators-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let given = std::env::var_os("FLAG_BENCH_INPUT").map(PathBuf::from);
    let input = given.clone().unwrap_or_else(|| work.join("bars.parquet"));
    let output = std::env::var_os("FLAG_BENCH_OUTPUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| work.join("indicators.parquet"));

    let gen_start = Instant::now();
    if given.is_none() {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .env(GENERATE_TO, &input)
            .status()
            .expect("starting the generator");
        assert!(status.success(), "generating the synthetic bars failed");
    }
    let rows = parquet_rows(&input);
    let gen_s = gen_start.elapsed().as_secs_f64();
    let rss_start = status_mib("VmRSS");

    let mut opts = Options::default();
    // The stage's `chunk_rows` param, for measuring its trade-off (default: the stage's).
    opts.chunk_rows = env_usize("FLAG_BENCH_CHUNK_ROWS", opts.chunk_rows);
    opts.threads = env_usize("FLAG_BENCH_THREADS", opts.threads);
    let start = Instant::now();
    let stats = compute_parquet(
        &sql,
        std::slice::from_ref(&input),
        &output,
        &opts,
        &|_, _| {},
    )
    .unwrap();
    let wall_s = start.elapsed().as_secs_f64();
    assert_eq!(stats.rows, rows);

    let peak_rss = peak_rss_mib();
    // Pages of this binary's own file (code, read-only data): in the peak above but fixed,
    // whatever the input; they only grow, so peak minus these bounds the data's share.
    let file_rss = status_mib("RssFile");
    let decoded = decoded_mib(&input);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let report = serde_json::json!({
        "bench": "indicators",
        "rows": rows,
        "input": given.as_ref().map(|p| p.display().to_string()),
        "tickers": if given.is_some() { None } else { Some(tickers) },
        "days": if given.is_some() { None } else { Some(days) },
        "groups": stats.groups,
        "chunk_rows": opts.chunk_rows,
        "threads": threads,
        "wall_s": wall_s,
        "rows_per_s": rows as f64 / wall_s,
        "peak_rss_mib": peak_rss,
        // The memory goal's yardstick (issue 14): the input as Arrow arrays, read after the
        // timed run one batch at a time, so reading it adds nothing to the peak above.
        "decoded_input_mib": decoded,
        "rss_at_start_mib": rss_start,
        "rss_file_backed_mib": file_rss,
        "generation_s": gen_s,
        "input_bytes": size(&input),
        "output_bytes": size(&output),
    });
    let _ = std::fs::remove_dir_all(&work);
    let json = std::env::var_os("FLAG_BENCH_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("FLAG_BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo.join("artifacts/bench"))
                .join("indicators.json")
        });
    if let Some(dir) = json.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let text = serde_json::to_string_pretty(&report).unwrap();
    std::fs::write(&json, format!("{text}\n")).unwrap();
    println!("{text}");
}
