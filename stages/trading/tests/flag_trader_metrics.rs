//! FLAG-Trader's metrics (log_cr, log_sr, log_av, log_mdd of the `metrics` table) against the
//! paper's Buy & Hold rows (Xiong et al. 2025, Table: MSFT and JNJ, 2020-10-01..2021-05-05,
//! 149 closes) on the real InvestorBench closes (`../shared/data/investorbench`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flag_core::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, RecordBatch, StringArray,
};
use flag_core::schema::schema;
use flag_trading::metrics::{self, flag_trader};
use flag_trading::stages::PeriodsPerYear;
use flag_trading::stages::metrics::metrics_table;

fn data_dir() -> PathBuf {
    std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// (date32 days, close) of one InvestorBench file within [from, to], sorted by date.
fn closes(ticker: &str, from: &str, to: &str) -> Vec<(i32, f64)> {
    let path = data_dir()
        .join("investorbench")
        .join(format!("{}.json", ticker.to_lowercase()));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let epoch = chrono::NaiveDate::default();
    let mut out: Vec<(i32, f64)> = v
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.as_str() >= from && k.as_str() <= to)
        .map(|(k, day)| {
            let d = chrono::NaiveDate::parse_from_str(k, "%Y-%m-%d").unwrap();
            (
                (d - epoch).num_days() as i32,
                day["prices"].as_f64().unwrap(),
            )
        })
        .collect();
    out.sort_by_key(|x| x.0);
    out
}

/// The Buy & Hold equity path without cost: all in at the first close, value = capital × the
/// price relative (so V_1 = the initial capital and daily_return(1) = 0).
fn buy_and_hold(ticker: &str, rows: &[(i32, f64)]) -> RecordBatch {
    let n = rows.len();
    let p0 = rows[0].1;
    let shares = 100_000.0 / p0;
    let value: Vec<f64> = rows.iter().map(|r| shares * r.1).collect();
    let ret: Vec<f64> = (0..n)
        .map(|i| {
            if i == 0 {
                0.0
            } else {
                value[i] / value[i - 1] - 1.0
            }
        })
        .collect();
    let s = |x: &str| -> ArrayRef { Arc::new(StringArray::from(vec![x; n])) };
    let f = |v: Vec<f64>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
    schema("equity")
        .unwrap()
        .batch(vec![
            s("buy_and_hold"),
            s("finagent"),
            s(ticker),
            s("test"),
            Arc::new(Date32Array::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            f(rows.iter().map(|r| r.1).collect()),
            Arc::new(StringArray::from(
                (0..n)
                    .map(|i| if i == 0 { "BUY" } else { "HOLD" })
                    .collect::<Vec<_>>(),
            )),
            f(vec![shares; n]),
            f(vec![0.0; n]),
            f(value),
            f(ret),
            Arc::new(BooleanArray::from(
                (0..n).map(|i| i == 0).collect::<Vec<_>>(),
            )),
        ])
        .unwrap()
}

fn col(b: &RecordBatch, name: &str) -> Vec<f64> {
    let a = b
        .column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    (0..a.len()).map(|i| a.value(i)).collect()
}

fn assert_near(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, paper {want} (tolerance {tol})"
    );
}

/// The paper's Buy & Hold rows: (ticker, CR %, SR, AV %, MDD %) and the standard running-peak
/// drawdown of the same closes (%), which is not the paper's MDD.
const PAPER: [(&str, f64, f64, f64, f64, f64); 2] = [
    ("MSFT", 15.340, 1.039, 24.980, 9.428, 9.212),
    ("JNJ", 13.895, 1.343, 17.500, 9.847, 9.701),
];

#[test]
fn metrics_stage_reproduces_the_papers_buy_and_hold_rows() {
    let mut tables = Vec::new();
    for (tk, ..) in PAPER {
        let rows = closes(tk, "2020-10-01", "2021-05-05");
        assert_eq!(rows.len(), 149, "{tk}");
        tables.push((format!("bh.{tk}"), buy_and_hold(tk, &rows)));
    }
    let periods = PeriodsPerYear {
        default: 252,
        overrides: BTreeMap::new(),
    };
    let m = metrics_table(&tables, None, &periods).unwrap();
    assert_eq!(m.num_rows(), 2);
    let tickers = m
        .column_by_name("ticker")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    for (tk, cr, sr, av, mdd, std_mdd) in PAPER {
        let r = (0..m.num_rows()).find(|&i| tickers.value(i) == tk).unwrap();
        let get = |c: &str| col(&m, c)[r];
        assert_near(get("log_cr"), cr, 0.01, &format!("{tk} CR"));
        assert_near(get("log_av"), av, 0.01, &format!("{tk} AV"));
        assert_near(get("log_sr"), sr, 0.001, &format!("{tk} SR"));
        // InvestorBench's MDD (log returns compounded as simple ones) is the paper's number;
        // the standard drawdown of the same path (column mdd) is smaller.
        assert_near(get("log_mdd"), mdd, 0.001, &format!("{tk} MDD"));
        assert_near(get("mdd"), std_mdd, 0.001, &format!("{tk} standard MDD"));
        assert!(get("mdd") < get("log_mdd") - 0.1, "{tk}");
    }
}

#[test]
fn flag_trader_on_the_closes_and_the_mdd_definitions_compared() {
    for (tk, cr, sr, av, mdd, std_mdd) in PAPER {
        let p: Vec<f64> = closes(tk, "2020-10-01", "2021-05-05")
            .iter()
            .map(|x| x.1)
            .collect();
        let m = flag_trader(&p, 252.0).unwrap();
        assert_near(m.cr, cr, 0.01, tk);
        assert_near(m.av, av, 0.01, tk);
        assert_near(m.sr, sr, 0.001, tk);
        assert_near(m.mdd, mdd, 0.001, tk);
        // Standard drawdown of the closes: 9.212 / 9.701, not the paper's.
        assert_near(metrics::max_drawdown(p[0], &p) * 100.0, std_mdd, 0.001, tk);
        // Neither is the drawdown of the log price, max ln(peak / p): 9.664 / 10.204.
        let mut peak = p[0];
        let log_dd = p.iter().fold(0.0_f64, |acc, &x| {
            peak = peak.max(x);
            acc.max((peak / x).ln())
        }) * 100.0;
        assert!(
            (log_dd - mdd).abs() > 0.2,
            "{tk}: log-price drawdown {log_dd}"
        );
    }
}
