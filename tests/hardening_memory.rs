//! Hardening (issue 15, items 4 and 6) through the binary: a data file the user controls
//! cannot make ingest read it whole or echo it into stderr and the store's log; `flag show
//! --sql` runs under a memory limit; and a non-finite number is never stored as a result.
//! Every failing run leaves the store exactly as it was.
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

/// What a failure may print or log, at most: the errors quote at most ~200 bytes of a value.
const SMALL: usize = 4096;

/// A project root whose store already holds test-small's ohlcv, indicators and baselines.
type Fixture = ProjectStore;

fn fixture() -> Fixture {
    ProjectStore::new("baselines")
}

impl ProjectStore {
    /// A data dir with test-small's four TDQN files, the AAPL train file replaced by what
    /// `make` writes at the given path. Returns (data dir, the AAPL train file).
    fn data_with(&self, case: &str, make: impl FnOnce(&Path)) -> (PathBuf, PathBuf) {
        let data = self.root().join(format!("data-{case}"));
        let tdqn = data.join("tdqn");
        std::fs::create_dir_all(&tdqn).unwrap();
        for t in ["AAPL", "MSFT"] {
            for period in ["2012-1-1_2018-1-1", "2018-1-1_2020-1-1"] {
                let name = format!("{t}_{period}.csv");
                std::fs::copy(data_dir().join("tdqn").join(&name), tdqn.join(&name)).unwrap();
            }
        }
        let bad = tdqn.join("AAPL_2012-1-1_2018-1-1.csv");
        std::fs::remove_file(&bad).unwrap();
        make(&bad);
        (data, bad)
    }

    /// Runs test-small with `data_dir` and extra `--set`s; it must fail without changing the
    /// store. Returns the output.
    fn fails(&self, data: &Path, sets: &[&str]) -> Output {
        let before = snapshot(&self.store());
        let mut c = flag(self.root(), &self.store());
        c.args(["run", "pipelines/test-small.yaml", "--set"])
            .arg(format!("data_dir={}", data.display()));
        for s in sets {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        assert!(
            !out.status.success(),
            "must fail\nstdout:\n{}\nstderr:\n{}",
            stdout(&out),
            stderr(&out)
        );
        assert_eq!(snapshot(&self.store()), before, "the store changed");
        out
    }
}

/// The failed stage's log, from the "log: PATH" line of the output; its size must be
/// checked before it is read.
fn log_of(out: &Output) -> PathBuf {
    let text = format!("{}{}", stdout(out), stderr(out));
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("log:"))
        .unwrap_or_else(|| panic!("no 'log:' line in\n{text}"));
    PathBuf::from(line.trim())
}

/// What the run printed (the stage error goes to stdout, the summary to stderr).
fn printed(out: &Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

/// What the run printed and the stage log are small, and both name the file and line.
fn small_and_named(out: &Output, want: &str) {
    let n = out.stdout.len() + out.stderr.len();
    let text = printed(out);
    assert!(
        n < SMALL,
        "the run printed {n} bytes: {}",
        &text[..text.len().min(2000)]
    );
    assert!(text.contains(want), "output lacks {want:?}:\n{text}");
    let log = log_of(out);
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(size < SMALL as u64, "log {} is {size} bytes", log.display());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains(want), "log lacks {want:?}:\n{logged}");
}

#[test]
fn a_huge_data_file_fails_with_a_small_error_and_log() {
    let f = fixture();

    // 2 GB without a newline (sparse: no disk, no time to write): the first line is cut at
    // 1 MiB, so ingest reads about that much, not the file.
    let (data, bad) = f.data_with("sparse", |p| {
        let file = std::fs::File::create(p).unwrap();
        file.set_len(2 << 30).unwrap();
    });
    let out = f.fails(&data, &[]);
    small_and_named(
        &out,
        &format!(
            "{}:1: column 'field 1': line is longer than 1048576 bytes",
            bad.display()
        ),
    );
    // What the error quotes of the line is cut, and says so.
    assert!(printed(&out).contains("[cut: "), "{}", printed(&out));

    // One 50 MB line after a good header and row: refused at its line and field.
    let (data, bad) = f.data_with("long-line", |p| {
        let mut w = std::io::BufWriter::new(std::fs::File::create(p).unwrap());
        w.write_all(b"Timestamp,Open,High,Low,Close,Volume\n")
            .unwrap();
        w.write_all(b"2012-01-03,14.6,14.7,14.6,12.7,302220800.0\n")
            .unwrap();
        w.write_all(b"2012-01-04,14.6,14.8,14.6,12.8,").unwrap();
        let chunk = vec![b'9'; 1 << 20];
        for _ in 0..50 {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(b"\n").unwrap();
    });
    let out = f.fails(&data, &[]);
    small_and_named(
        &out,
        &format!(
            "{}:3: column 'field 6': line is longer than 1048576 bytes",
            bad.display()
        ),
    );
}

#[test]
fn a_huge_json_string_fails_with_a_small_error() {
    let f = fixture();
    let data = f.root().join("data-json");
    std::fs::create_dir_all(&data).unwrap();
    let bad = data.join("msft.json");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&bad).unwrap());
    w.write_all(b"{\n\"2020-03-12\": {\"prices\": 150.5,\n  \"news\": [\"")
        .unwrap();
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..50 {
        w.write_all(&chunk).unwrap();
    }
    w.write_all(b"\"]}\n}\n").unwrap();
    drop(w);
    let yaml = format!(
        "name: ib-big\nstages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params:\n      source: {}\n      format: investorbench\n      tickers: [MSFT]\n",
        data.display()
    );
    let file = f.root().join("pipelines/ib-big.yaml");
    std::fs::write(&file, yaml).unwrap();
    let before = snapshot(&f.store());
    let out = flag(f.root(), &f.store())
        .arg("run")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
    assert_eq!(snapshot(&f.store()), before);
    small_and_named(
        &out,
        &format!(
            "{}:3: column 'news': date 2020-03-12: a JSON string or value longer than 4194304 bytes",
            bad.display()
        ),
    );
}

/// `flag show --sql`: a cross join that would hold far more rows than the limit fails with a
/// message naming the limit; the same limit runs a small query.
#[test]
fn show_sql_runs_under_a_memory_limit() {
    let f = fixture();
    let show = |sql: &str, limit: Option<&str>| {
        let mut c = flag(f.root(), &f.store());
        c.args([
            "show",
            "ohlcv.bars",
            "--pipeline",
            "pipelines/test-small.yaml",
            "--sql",
            sql,
        ]);
        if let Some(l) = limit {
            c.args(["--memory-limit", l]);
        }
        c.output().unwrap()
    };
    // ~4,000 bars: the cross join has ~16 million rows (~256 MB of closes).
    let out = show("SELECT a.close, b.close FROM t a, t b", Some("1MiB"));
    assert!(!out.status.success(), "must fail: {}", stdout(&out).len());
    let err = stderr(&out);
    assert!(
        err.contains(
            "--sql: the query needs more memory than the limit of 1.0 MiB (1048576 bytes; set by \
             --memory-limit or FLAG_SHOW_MEMORY_LIMIT)"
        ),
        "{err}"
    );
    assert!(err.len() < SMALL, "{err}");
    // The environment variable sets it too.
    let out = flag(f.root(), &f.store())
        .args([
            "show",
            "ohlcv.bars",
            "--pipeline",
            "pipelines/test-small.yaml",
            "--sql",
            "SELECT a.close, b.close FROM t a, t b",
        ])
        .env("FLAG_SHOW_MEMORY_LIMIT", "2MiB")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the limit of 2.0 MiB (2097152 bytes"),
        "{}",
        stderr(&out)
    );
    // A small query fits the same limit.
    let out = show(
        "SELECT ticker, count(*) AS n FROM t GROUP BY ticker",
        Some("1MiB"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("AAPL"), "{}", stdout(&out));
    // A bad size is refused by the argument parser.
    let out = show("SELECT 1", Some("lots"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("'lots' is not a size"),
        "{}",
        stderr(&out)
    );
    // --help documents it with its default.
    let out = run_ok(flag(f.root(), &f.store()).args(["show", "--help"]));
    let help = stdout(&out);
    assert!(help.contains("--memory-limit"), "{help}");
    assert!(help.contains("FLAG_SHOW_MEMORY_LIMIT"), "{help}");
    assert!(help.contains("[default: 1GiB]"), "{help}");
}

/// Regression (hostile re-run): a result held under the limit was printed through arrow's
/// pretty table, a String per cell and one for the table (13 GB for a result near 1 GiB).
/// Printed a line at a time, 4 million rows (64 MB of closes; 90 MB peak RSS here) print
/// with the process's heap capped at 500 MB (`ulimit -d`).
#[test]
fn show_prints_a_large_result_a_line_at_a_time() {
    let f = fixture();
    let printed = f.root().join("printed.txt");
    let out = std::process::Command::new("sh")
        .current_dir(f.root())
        .env("FLAG_STORE", f.store())
        .env("FLAG_ROOT", f.root())
        .args(["-c", "ulimit -d 500000 && exec \"$0\" \"$@\""])
        .arg(flag_bin())
        .args([
            "show",
            "ohlcv.bars",
            "--pipeline",
            "pipelines/test-small.yaml",
            "--sql",
            "SELECT a.close AS x, b.close AS y FROM t a, t b LIMIT 4000000",
        ])
        .stdout(std::fs::File::create(&printed).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&printed).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4_000_000 + 4);
    assert!(
        lines[1].starts_with("| x ") && lines[1].contains("| y "),
        "{}",
        lines[1]
    );
    assert_eq!(lines[0], lines[2]);
    assert_eq!(lines[0], lines[lines.len() - 1]);
    assert!(lines[0].starts_with("+-") && lines[0].ends_with("-+"));
    // Every row has the table's width.
    assert!(lines.iter().all(|l| l.len() == lines[0].len()));
}

/// Replaces the Close of the AAPL train file's line `line` (1-based) with `close`.
fn with_close(src: &Path, dest: &Path, line: usize, close: &str) {
    let text = std::fs::read_to_string(src).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut fields: Vec<&str> = lines[line - 1].split(',').collect();
    fields[4] = close;
    lines[line - 1] = fields.join(",");
    std::fs::write(dest, lines.join("\n") + "\n").unwrap();
}

/// Item 6: the three cases of the issue. Each fails with a clear error naming where, and the
/// store is unchanged (checked by `fails`).
#[test]
fn non_finite_numbers_are_never_stored() {
    let f = fixture();
    let real = data_dir().join("tdqn/AAPL_2012-1-1_2018-1-1.csv");

    // A subnormal close passes "> 0" but its returns are NaN: refused at ingest.
    let (data, bad) = f.data_with("tiny-close", |p| with_close(&real, p, 40, "1e-320"));
    let out = f.fails(&data, &[]);
    let err = printed(&out);
    assert!(
        err.contains(&format!(
            "{}:40: column 'Close': price 1e-320 is outside the sane range (1e-6, 1e12)",
            bad.display()
        )),
        "{err}"
    );

    // A close of 1e300 gave vol = inf in metrics: refused at ingest.
    let (data, bad) = f.data_with("huge-close", |p| with_close(&real, p, 7, "1e300"));
    let out = f.fails(&data, &[]);
    let err = printed(&out);
    assert!(
        err.contains(&format!(
            "{}:7: column 'Close': price 1e300 is outside the sane range (1e-6, 1e12)",
            bad.display()
        )),
        "{err}"
    );

    // initial_capital 1e308 overflowed the equity (the writers' finite check refused it after
    // upstream stages ran): now refused when the pipeline loads, before anything runs. (The
    // writer check itself is unit-tested in flag_core::schema.)
    let out = f.fails(&data_dir(), &["baselines.initial_capital=1e308"]);
    let err = printed(&out);
    assert!(
        err.contains(
            "stage 'baselines': param 'initial_capital': must be > 0 and at most 1e15, got 1e308"
        ),
        "{err}"
    );
}
