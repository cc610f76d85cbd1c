//! A corpus of bad inputs — pipeline files and data files — each asserting its exact, helpful
//! error message and that the store is unchanged by the failed run.
mod common;

use common::*;

/// A project root whose store already holds a good run of `ohlcv`.
type Fixture = ProjectStore;

fn fixture() -> Fixture {
    ProjectStore::new("ohlcv")
}

impl ProjectStore {
    /// Runs `flag run` on a pipeline text; returns stderr+stdout after checking the run
    /// failed and the store's manifests, objects and refs are unchanged.
    fn fails(&self, name: &str, yaml: &str, extra: &[&str]) -> String {
        let file = self.root().join("pipelines").join(format!("{name}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let before = snapshot(&self.store());
        let mut c = flag(self.root(), &self.store());
        c.arg("run").arg(&file).args(extra);
        let out = c.output().unwrap();
        assert!(
            !out.status.success(),
            "{name}: expected failure\n{}",
            stdout(&out)
        );
        assert_eq!(before, snapshot(&self.store()), "{name}: the store changed");
        assert!(
            !self.store().join("tmp").exists()
                || std::fs::read_dir(self.store().join("tmp"))
                    .unwrap()
                    .next()
                    .is_none(),
            "{name}: staging left behind"
        );
        format!("{}{}", stdout(&out), stderr(&out))
    }
}

fn has(out: &str, want: &str) {
    assert!(
        out.contains(want),
        "expected message:\n  {want}\ngot:\n{out}"
    );
}

#[test]
fn pipeline_file_errors_name_file_line_and_stage() {
    let f = fixture();
    let p = |n: &str| {
        f.root()
            .join("pipelines")
            .join(format!("{n}.yaml"))
            .display()
            .to_string()
    };

    let out = f.fails("cycle", "stages:\n  a:\n    uses: indicators\n    inputs:\n      bars: b.table\n  b:\n    uses: indicators\n    inputs:\n      bars: a.table\n", &[]);
    has(
        &out,
        &format!("{}:2: cycle between stages: a -> b -> a", p("cycle")),
    );

    let out = f.fails(
        "unknown_kind",
        "stages:\n  ohlcv:\n    uses: ingest_ohlc\n",
        &[],
    );
    has(
        &out,
        &format!(
            "{}:3: stage 'ohlcv': unknown stage kind 'ingest_ohlc' (did you mean 'ingest_ohlcv'?)",
            p("unknown_kind")
        ),
    );

    let out = f.fails("bad_output_ref", "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params: {source: x, format: tdqn, tickers: [AAPL]}\n  ind:\n    uses: indicators\n    inputs:\n      bars: ohlcv.bar\n", &[]);
    has(
        &out,
        &format!(
            "{}:8: stage 'ind': input 'bars': stage 'ohlcv' has no output 'bar' (did you mean 'bars'?)",
            p("bad_output_ref")
        ),
    );

    let out = f.fails("bad_stage_ref", "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params: {source: x, format: tdqn, tickers: [AAPL]}\n  ind:\n    uses: indicators\n    inputs:\n      bars: ohlvc.bars\n", &[]);
    has(
        &out,
        &format!(
            "{}:8: stage 'ind': input 'bars' refers to unknown stage 'ohlvc' (did you mean 'ohlcv'?)",
            p("bad_stage_ref")
        ),
    );

    let out = f.fails(
        "duplicate",
        "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n  ohlcv:\n    uses: ingest_ohlcv\n",
        &[],
    );
    has(
        &out,
        &format!(
            "{}:4: duplicate stage name 'ohlcv' (first defined at line 2)",
            p("duplicate")
        ),
    );

    let out = f.fails("missing_param", "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params:\n      format: tdqn\n      tickers: [AAPL]\n", &[]);
    has(
        &out,
        &format!(
            "{}:2: stage 'ohlcv': missing required param 'source'",
            p("missing_param")
        ),
    );

    let out = f.fails("unknown_param", "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params:\n      source: x\n      format: tdqn\n      tickers: [AAPL]\n      tikers: [MSFT]\n", &[]);
    has(
        &out,
        &format!(
            "{}:8: stage 'ohlcv': unknown param 'tikers' for kind 'ingest_ohlcv' (did you mean 'tickers'?)",
            p("unknown_param")
        ),
    );

    let out = f.fails("escape", "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params: {source: x, format: tdqn, tickers: [AAPL]}\n    outputs:\n      bars: ../../../etc/bars.parquet\n", &[]);
    has(
        &out,
        &format!(
            "{}:6: stage 'ohlcv': output 'bars': output path '../../../etc/bars.parquet' escapes the store ('..' is not allowed)",
            p("escape")
        ),
    );

    let out = f.fails("absolute", "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params: {source: x, format: tdqn, tickers: [AAPL]}\n    outputs:\n      bars: /tmp/bars.parquet\n", &[]);
    has(
        &out,
        &format!(
            "{}:6: stage 'ohlcv': output 'bars': output path '/tmp/bars.parquet' must be relative to the store",
            p("absolute")
        ),
    );

    let out = f.fails(
        "syntax",
        "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n   params: [\n",
        &[],
    );
    has(&out, &format!("{}:4: invalid YAML", p("syntax")));

    let out = f.fails("unknown_ref_param", "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params:\n      source: ${data}/tdqn\n      format: tdqn\n      tickers: [AAPL]\n", &[]);
    has(
        &out,
        &format!(
            "{}:5: stage 'ohlcv': param 'source': unknown pipeline param '${{data}}' (pipeline params: data_dir)",
            p("unknown_ref_param")
        ),
    );

    let out = f.fails("wrong_type", "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params:\n      source: x\n      format: tdqn\n      tickers: 5\n", &[]);
    has(
        &out,
        &format!(
            "{}:7: stage 'ohlcv': param 'tickers' must be a list, got a number 5",
            p("wrong_type")
        ),
    );

    let out = f.fails("unknown_set", "params:\n  tickers: [AAPL]\nstages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params:\n      source: x\n      format: tdqn\n      tickers: ${tickers}\n", &["--set", "tikers=[MSFT]"]);
    has(
        &out,
        "--set tikers: unknown pipeline param (did you mean 'tickers'?)",
    );

    let out = f.fails("unknown_input", "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params: {source: x, format: tdqn, tickers: [AAPL]}\n  ind:\n    uses: indicators\n    inputs:\n      bar: ohlcv.bars\n", &[]);
    has(
        &out,
        &format!(
            "{}:8: stage 'ind': unknown input 'bar' for kind 'indicators' (did you mean 'bars'?)",
            p("unknown_input")
        ),
    );
    has(
        &out,
        &format!(
            "{}:5: stage 'ind': missing required input 'bars'",
            p("unknown_input")
        ),
    );

    let out = f.fails(
        "self_ref",
        "stages:\n  ind:\n    uses: indicators\n    inputs:\n      bars: ind.table\n",
        &[],
    );
    has(
        &out,
        &format!(
            "{}:5: stage 'ind': input 'bars' refers to the stage itself",
            p("self_ref")
        ),
    );
}

/// A bad param value in a downstream stage fails when the pipeline loads, at the param's line,
/// before its upstream stages run (indicators has never run in the fixture's store, so a run
/// that started would have committed it).
#[test]
fn param_values_fail_at_load_before_any_stage_runs() {
    let f = fixture();
    let text = std::fs::read_to_string(repo_root().join("pipelines/test-small.yaml")).unwrap();
    let anchor = "      env: tdqn\n";
    assert!(text.contains(anchor));
    let line = text[..text.find(anchor).unwrap()].lines().count() + 1;
    let bad = text.replacen(anchor, "      env: tdqn\n      cost: -1\n", 1);
    let data = format!("data_dir={}", data_dir().display());
    let out = f.fails("bad_cost", &bad, &["--set", &data]);
    let file = f.root().join("pipelines/bad_cost.yaml");
    has(
        &out,
        &format!(
            "{}:{}: stage 'baselines': param 'cost': must be in [0, 1), got -1",
            file.display(),
            line + 1
        ),
    );
    // From --set: the stage's line.
    let out = f.fails(
        "set_cost",
        &text,
        &["--set", &data, "--set", "baselines.cost=2"],
    );
    has(
        &out,
        "stage 'baselines': param 'cost': must be in [0, 1), got 2",
    );
    // indicators too, at load (a run-time failure would read "... failed: param ...").
    let out = f.fails(
        "chunk_rows",
        &text,
        &["--set", &data, "--set", "indicators.chunk_rows=0"],
    );
    has(
        &out,
        "stage 'indicators': param 'chunk_rows': must be at least 1",
    );
}

/// Bad data files through the real binary: the run fails naming file, line and column, and
/// the store (which holds a good earlier run) is unchanged.
#[test]
fn bad_data_files_fail_with_file_line_and_column() {
    let f = fixture();
    let cases: &[(&str, &str, &str)] = &[
        (
            "malformed_row",
            "Timestamp,Open,High,Low,Close,Volume\n2012-01-03,1,2,0.5,1.5,10\n2012-01-04,1,2,0.5\n",
            ":3: column 'Close': missing field: 4 fields, header has 6",
        ),
        (
            "wrong_type",
            "Timestamp,Open,High,Low,Close,Volume\n2012-01-03,abc,2,0.5,1.5,10\n",
            ":2: column 'Open': 'abc' is not a number",
        ),
        ("empty", "", ": file is empty"),
        (
            "nan",
            "Timestamp,Open,High,Low,Close,Volume\n2012-01-03,1,2,0.5,NaN,10\n",
            ":2: column 'Close': 'NaN' is not a finite number",
        ),
        (
            "negative_price",
            "Timestamp,Open,High,Low,Close,Volume\n2012-01-03,1,2,-0.5,1.5,10\n",
            ":2: column 'Low': price must be > 0, got -0.5",
        ),
        (
            "duplicate_dates",
            "Timestamp,Open,High,Low,Close,Volume\n2012-01-03,1,2,0.5,1.5,10\n2012-01-03,1,2,0.5,1.6,10\n",
            ":3: column 'Close': conflicting duplicate date 2012-01-03: 1.6 here, 1.5 at ",
        ),
        (
            "missing_column",
            "Timestamp,Open,High,Low,Close\n2012-01-03,1,2,0.5,1.5\n",
            ":1: column 'Volume': missing column",
        ),
    ];
    for (name, content, want) in cases {
        let data = f.root().join(format!("data-{name}/tdqn"));
        std::fs::create_dir_all(&data).unwrap();
        let file = data.join("AAPL_2012-1-1_2018-1-1.csv");
        std::fs::write(&file, content).unwrap();
        // The test-period file is the real one: only the train file is bad.
        std::fs::copy(
            data_dir().join("tdqn/AAPL_2018-1-1_2020-1-1.csv"),
            data.join("AAPL_2018-1-1_2020-1-1.csv"),
        )
        .unwrap();
        let yaml = format!(
            "stages:\n  ohlcv:\n    uses: ingest_ohlcv\n    params:\n      source: {}\n      format: tdqn\n      tickers: [AAPL]\n",
            data.display()
        );
        let out = f.fails(name, &yaml, &[]);
        has(
            &out,
            &format!(
                "error: stage 'ohlcv' (ingest_ohlcv) failed: {}{want}",
                file.display()
            ),
        );
        has(&out, "log:");
    }
}
