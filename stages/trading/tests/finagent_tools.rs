//! FinAgent's four tools (`flag_trading::finagent_tools`): hand-computed signals, no
//! look-ahead, and the reproduction of FinAgent's released strategy records on the real
//! data of `../shared/data` (stocks-2020-2023 and crypto/eth_daily.csv).
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use flag_trading::finagent_tools::{
    self, Bars, MissingBar, ParamOverrides, RunSettings, Tool, ToolParams, ToolSignal,
};
use serde_json::Value;

fn data_dir() -> PathBuf {
    std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// A yfinance export (`Date,Close,High,Low,Open,Volume`, a ticker row, then data).
fn yfinance(ticker: &str) -> (Vec<NaiveDate>, Bars) {
    let path = data_dir().join(format!("stocks-2020-2023/{ticker}_historical_data.csv"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let (mut dates, mut bars) = (Vec::new(), Bars::default());
    for line in text.lines().skip(2) {
        let c: Vec<&str> = line.split(',').collect();
        let f = |i: usize| c[i].parse::<f64>().unwrap();
        dates.push(NaiveDate::parse_from_str(c[0], "%Y-%m-%d").unwrap());
        bars.close.push(f(1));
        bars.high.push(Some(f(2)));
        bars.low.push(Some(f(3)));
    }
    (dates, bars)
}

/// ETH bars as the `ingest_ohlcv` stage (coingecko) makes them: open = the day's 00:00 UTC
/// snapshot, close = the next day's, high/low = their max/min (the file has no high/low).
fn eth() -> (Vec<NaiveDate>, Bars) {
    let path = data_dir().join("crypto/eth_daily.csv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let snaps: Vec<(NaiveDate, f64)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (
                NaiveDate::parse_from_str(&c[0][..10], "%Y-%m-%d").unwrap(),
                c[1].parse().unwrap(),
            )
        })
        .collect();
    let (mut dates, mut bars) = (Vec::new(), Bars::default());
    for w in snaps.windows(2) {
        if (w[1].0 - w[0].0).num_days() == 1 {
            dates.push(w[0].0);
            bars.close.push(w[1].1);
            bars.high.push(Some(w[0].1.max(w[1].1)));
            bars.low.push(Some(w[0].1.min(w[1].1)));
        }
    }
    (dates, bars)
}

fn ymd(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

/// Rows dated within `[a, b]`.
fn rows(dates: &[NaiveDate], a: &str, b: &str) -> std::ops::Range<usize> {
    let (a, b) = (ymd(a), ymd(b));
    dates.partition_point(|d| *d < a)..dates.partition_point(|d| *d <= b)
}

/// FinAgent's released records, `res/strategy_record/trading/<asset>/<n>/exp001/<kind>/
/// best_result.json` of github.com/DVampire/FinAgent @ 17248a0 (n = 0 buy-and-hold, 1 MACD,
/// 2 KDJ & RSI, 3 Stochastic + Bollinger, 4 mean reversion): ARR, SR, MDD, VOL, rounded to
/// 6 decimals.
const PUBLISHED: [(&str, usize, &str, f64, f64, f64, f64); 60] = [
    ("AAPL", 0, "default", 0.195657, 0.733756, 0.279825, 0.019403),
    ("AAPL", 0, "trained", 0.195657, 0.733756, 0.279825, 0.019403),
    ("AAPL", 1, "default", 0.086771, 0.523827, 0.203276, 0.012297),
    ("AAPL", 1, "trained", 0.229035, 1.110941, 0.170171, 0.012879),
    ("AAPL", 2, "default", 0.075464, 0.480234, 0.157485, 0.011894),
    ("AAPL", 2, "trained", 0.317543, 1.116927, 0.232465, 0.017799),
    ("AAPL", 3, "default", 0.307669, 1.421930, 0.153186, 0.012808),
    ("AAPL", 3, "trained", 0.663756, 2.569994, 0.084593, 0.013012),
    ("AAPL", 4, "default", 0.002630, 0.124483, 0.156735, 0.014278),
    ("AAPL", 4, "trained", 0.002630, 0.124483, 0.156735, 0.014278),
    (
        "AMZN", 0, "default", -0.010018, 0.191946, 0.434418, 0.027270,
    ),
    (
        "AMZN", 0, "trained", -0.010018, 0.191946, 0.434418, 0.027270,
    ),
    ("AMZN", 1, "default", 0.103961, 0.499702, 0.239343, 0.017058),
    ("AMZN", 1, "trained", 0.189511, 0.753775, 0.223013, 0.017828),
    (
        "AMZN", 2, "default", -0.236320, -0.766114, 0.399613, 0.018600,
    ),
    ("AMZN", 2, "trained", 0.118581, 0.483281, 0.417209, 0.023930),
    (
        "AMZN", 3, "default", -0.256681, -0.893635, 0.401263, 0.018028,
    ),
    (
        "AMZN", 3, "trained", -0.132288, -0.275665, 0.401740, 0.020446,
    ),
    (
        "AMZN", 4, "default", -0.055174, -0.048051, 0.244035, 0.018503,
    ),
    (
        "AMZN", 4, "trained", -0.001472, 0.140172, 0.234880, 0.018510,
    ),
    (
        "GOOGL", 0, "default", 0.077135, 0.385659, 0.314180, 0.023455,
    ),
    (
        "GOOGL", 0, "trained", 0.077135, 0.385659, 0.314180, 0.023455,
    ),
    (
        "GOOGL", 1, "default", 0.031536, 0.252140, 0.240987, 0.013481,
    ),
    (
        "GOOGL", 1, "trained", 0.133293, 0.608134, 0.209977, 0.016576,
    ),
    (
        "GOOGL", 2, "default", 0.172893, 0.715853, 0.248963, 0.017390,
    ),
    (
        "GOOGL", 2, "trained", 0.129466, 0.741331, 0.178285, 0.011841,
    ),
    (
        "GOOGL", 3, "default", -0.001025, 0.093468, 0.190046, 0.012488,
    ),
    (
        "GOOGL", 3, "trained", 0.170294, 0.740252, 0.228294, 0.016164,
    ),
    (
        "GOOGL", 4, "default", 0.055233, 0.338233, 0.228325, 0.015967,
    ),
    (
        "GOOGL", 4, "trained", 0.107197, 0.531698, 0.228603, 0.015743,
    ),
    ("MSFT", 0, "default", 0.214827, 0.756854, 0.267195, 0.020660),
    ("MSFT", 0, "trained", 0.214827, 0.756854, 0.267195, 0.020660),
    ("MSFT", 1, "default", 0.153845, 0.773275, 0.105516, 0.013525),
    ("MSFT", 1, "trained", 0.153845, 0.773275, 0.105516, 0.013525),
    ("MSFT", 2, "default", 0.163465, 0.747325, 0.218199, 0.015216),
    ("MSFT", 2, "trained", 0.388967, 1.358788, 0.229292, 0.016903),
    ("MSFT", 3, "default", 0.362268, 1.282642, 0.201125, 0.016960),
    ("MSFT", 3, "trained", 0.502602, 1.831055, 0.131821, 0.014979),
    ("MSFT", 4, "default", 0.210751, 0.921655, 0.162287, 0.014989),
    ("MSFT", 4, "trained", 0.269697, 1.129604, 0.163354, 0.014856),
    (
        "TSLA", 0, "default", -0.172427, -0.004312, 0.644351, 0.038381,
    ),
    (
        "TSLA", 0, "trained", -0.172427, -0.004312, 0.644351, 0.038381,
    ),
    ("TSLA", 1, "default", 0.851786, 1.692373, 0.252980, 0.026145),
    ("TSLA", 1, "trained", 0.851786, 1.692373, 0.252980, 0.026145),
    (
        "TSLA", 2, "default", -0.384347, -0.857608, 0.562695, 0.028152,
    ),
    (
        "TSLA", 2, "trained", -0.049521, 0.062895, 0.366734, 0.024229,
    ),
    (
        "TSLA", 3, "default", -0.221157, -0.364185, 0.563781, 0.027068,
    ),
    ("TSLA", 3, "trained", 0.380811, 0.994479, 0.446553, 0.025735),
    (
        "TSLA", 4, "default", -0.319679, -0.624692, 0.524687, 0.028406,
    ),
    (
        "TSLA", 4, "trained", -0.304206, -0.573419, 0.520319, 0.028445,
    ),
    (
        "ETHUSD", 0, "default", -0.024460, 0.342128, 0.498386, 0.040118,
    ),
    (
        "ETHUSD", 0, "trained", -0.024460, 0.342128, 0.498386, 0.040118,
    ),
    (
        "ETHUSD", 1, "default", -0.111684, -0.149650, 0.369650, 0.024435,
    ),
    (
        "ETHUSD", 1, "trained", 0.108265, 0.545679, 0.225829, 0.024852,
    ),
    (
        "ETHUSD", 2, "default", 0.301630, 0.922686, 0.500821, 0.030328,
    ),
    (
        "ETHUSD", 2, "trained", 0.517076, 1.247861, 0.500821, 0.031041,
    ),
    (
        "ETHUSD", 3, "default", 0.115297, 0.562582, 0.498799, 0.026629,
    ),
    (
        "ETHUSD", 3, "trained", 0.522018, 1.279521, 0.498799, 0.029801,
    ),
    (
        "ETHUSD", 4, "default", -0.028958, 0.212133, 0.498386, 0.029520,
    ),
    (
        "ETHUSD", 4, "trained", 0.050349, 0.413633, 0.498799, 0.029275,
    ),
];

/// `res/strategy_record/trading/<asset>/<n>/exp001/trained/best_params.json`.
const TRAINED_PARAMS: [(&str, usize, &str); 24] = [
    ("AAPL", 1, r#"{"short_window":6}"#),
    (
        "AAPL",
        2,
        r#"{"ilong":7,"isig":3,"rsiOverbought":72,"rsiOversold":45}"#,
    ),
    (
        "AAPL",
        3,
        r#"{"std_dev":2.1000192536316638,"overbought":90,"oversold":19}"#,
    ),
    ("AAPL", 4, r#"{"z_score_threshold":0.949816047538945}"#),
    ("AMZN", 1, r#"{"short_window":6}"#),
    (
        "AMZN",
        2,
        r#"{"ilong":7,"isig":3,"rsiOverbought":69,"rsiOversold":45}"#,
    ),
    (
        "AMZN",
        3,
        r#"{"std_dev":1.6152645218045207,"overbought":96,"oversold":24}"#,
    ),
    ("AMZN", 4, r#"{"z_score_threshold":1.1917979378476968}"#),
    ("GOOGL", 1, r#"{"short_window":6}"#),
    (
        "GOOGL",
        2,
        r#"{"ilong":10,"isig":2,"rsiOverbought":54,"rsiOversold":35}"#,
    ),
    (
        "GOOGL",
        3,
        r#"{"std_dev":1.606846792210885,"overbought":78,"oversold":19}"#,
    ),
    ("GOOGL", 4, r#"{"z_score_threshold":1.1802857225639665}"#),
    ("MSFT", 1, r#"{"short_window":5}"#),
    (
        "MSFT",
        2,
        r#"{"ilong":10,"isig":2,"rsiOverbought":67,"rsiOversold":34}"#,
    ),
    (
        "MSFT",
        3,
        r#"{"std_dev":1.746723607882747,"overbought":74,"oversold":20}"#,
    ),
    ("MSFT", 4, r#"{"z_score_threshold":1.1802857225639665}"#),
    ("TSLA", 1, r#"{"short_window":5}"#),
    (
        "TSLA",
        2,
        r#"{"ilong":9,"isig":2,"rsiOverbought":55,"rsiOversold":38}"#,
    ),
    (
        "TSLA",
        3,
        r#"{"std_dev":2.2659541126403373,"overbought":71,"oversold":17}"#,
    ),
    ("TSLA", 4, r#"{"z_score_threshold":1.146470458309974}"#),
    ("ETHUSD", 1, r#"{"short_window":6}"#),
    (
        "ETHUSD",
        2,
        r#"{"ilong":9,"isig":3,"rsiOverbought":65,"rsiOversold":41}"#,
    ),
    (
        "ETHUSD",
        3,
        r#"{"std_dev":2.2360290354990164,"overbought":86,"oversold":16}"#,
    ),
    ("ETHUSD", 4, r#"{"z_score_threshold":1.1802857225639665}"#),
];

fn published(asset: &str, n: usize, kind: &str) -> Numbers {
    let r = PUBLISHED
        .iter()
        .find(|r| r.0 == asset && r.1 == n && r.2 == kind)
        .unwrap();
    (r.3, r.4, r.5, r.6)
}

/// The parameters behind a record: `trained` = the asset's best_params.json; `default` =
/// the code defaults, except MACD whose default records were made with short_window 5.
fn params_for(asset: &str, n: usize, kind: &str) -> ToolParams {
    let mut p = ToolParams::default();
    if n == 0 {
        return p;
    }
    let tool = Tool::ALL[n - 1];
    if kind == "trained" {
        let s = TRAINED_PARAMS
            .iter()
            .find(|r| r.0 == asset && r.1 == n)
            .unwrap()
            .2;
        let v: Value = serde_json::from_str(s).unwrap();
        p.set(tool, v.as_object().unwrap()).unwrap();
    } else if tool == Tool::Macd {
        p.macd_short_window = 5;
    }
    p
}

/// Cash dividends (ex-date, amount per share) of AAPL and MSFT from 2022-05 to 2023-11, as
/// the companies declared them; GOOGL, AMZN and TSLA paid none in 2020-2023.
const DIVIDENDS: [(&str, &str, f64); 14] = [
    ("AAPL", "2022-05-06", 0.23),
    ("AAPL", "2022-08-05", 0.23),
    ("AAPL", "2022-11-04", 0.23),
    ("AAPL", "2023-02-10", 0.23),
    ("AAPL", "2023-05-12", 0.24),
    ("AAPL", "2023-08-11", 0.24),
    ("AAPL", "2023-11-10", 0.24),
    ("MSFT", "2022-05-18", 0.62),
    ("MSFT", "2022-08-17", 0.62),
    ("MSFT", "2022-11-16", 0.68),
    ("MSFT", "2023-02-15", 0.68),
    ("MSFT", "2023-05-17", 0.68),
    ("MSFT", "2023-08-16", 0.68),
    ("MSFT", "2023-11-15", 0.75),
];

/// Bars as FinAgent had them: its rules read FMP's `close`/`high`/`low`, adjusted for splits
/// but not for dividends, and its environment trades `adj_close`. Our yfinance bars are
/// adjusted for both, so they become `adj_close` here, and close/high/low are un-adjusted:
/// yfinance multiplies every bar before an ex-date by `1 - dividend / close(day before)`,
/// so dividing by the product of the later factors restores the paid prices (to within the
/// factor's own rounding, ~1e-5). Only the 2022-05..2023-11 dividends are undone: bars before
/// 2022-05 keep a constant factor, which no rule (all scale-free within a window) notices.
fn finagent_bars(asset: &str) -> (Vec<NaiveDate>, Bars) {
    let (dates, adj) = yfinance(asset);
    let mut factor = vec![1.0_f64; dates.len()];
    for &(_, ex, amount) in DIVIDENDS.iter().filter(|d| d.0 == asset) {
        let k = dates.partition_point(|d| *d < ymd(ex));
        let f = 1.0 - amount / adj.close[k - 1];
        for x in &mut factor[..k] {
            *x *= f;
        }
    }
    let raw = |v: &[Option<f64>]| -> Vec<Option<f64>> {
        v.iter()
            .zip(&factor)
            .map(|(x, f)| x.map(|x| x / f))
            .collect()
    };
    let bars = Bars {
        close: adj.close.iter().zip(&factor).map(|(c, f)| c / f).collect(),
        high: raw(&adj.high),
        low: raw(&adj.low),
        adj_close: adj.close.iter().map(|&c| Some(c)).collect(),
    };
    (dates, bars)
}

fn bars_of(asset: &str) -> (Vec<NaiveDate>, Bars) {
    if asset == "ETHUSD" {
        eth()
    } else {
        finagent_bars(asset)
    }
}

/// ARR, SR, MDD, VOL.
type Numbers = (f64, f64, f64, f64);
/// (asset, n, kind, ours, published).
type Row = (&'static str, usize, &'static str, Numbers, Numbers);

/// One row for every released record.
fn reproduce() -> Vec<Row> {
    let mut out = Vec::new();
    for asset in ["AAPL", "AMZN", "GOOGL", "MSFT", "TSLA", "ETHUSD"] {
        let (dates, bars) = bars_of(asset);
        let days = rows(&dates, "2022-06-01", "2023-05-31");
        for n in 0..5 {
            for kind in ["default", "trained"] {
                let p = params_for(asset, n, kind);
                let tool = (n > 0).then(|| Tool::ALL[n - 1]);
                let run = finagent_tools::run_tool(
                    tool,
                    &p,
                    &bars,
                    days.clone(),
                    &RunSettings::default(),
                )
                .unwrap();
                let r = run.record;
                out.push((
                    asset,
                    n,
                    kind,
                    (r.arr, r.sr, r.mdd, r.vol),
                    published(asset, n, kind),
                ));
            }
        }
    }
    out
}

/// Records that do not reproduce within the tolerances, and why.
const KNOWN_MISMATCHES: [(&str, usize, &str, &str); 2] = [
    (
        "MSFT",
        2,
        "trained",
        "KDJ & RSI 10/2/67/34: ARR 38.35 % vs 38.90 % (0.55 pp), SR 1.335 vs 1.359, MDD 23.20 % vs 22.93 %: \
         same trades as far as the numbers tell, valued at our prices",
    ),
    (
        "MSFT",
        4,
        "default",
        "mean reversion z = 1: ARR 20.55 % vs 21.08 % (0.53 pp), SR 0.902 vs 0.922, MDD 16.44 % vs 16.23 %: \
         ~146 trades, each at a slightly different price than FinAgent's",
    ),
];

/// FinAgent's released records reproduced on our data. Window 2022-06-01..=2023-05-31 (FinAgent's
/// train run 2022-06-01..2023-06-01, whose last bar is never traded), 10,000 capital, 0.1 %
/// cost, whole shares, 252.
///
/// Bars: [`finagent_bars`] (rules on dividend-unadjusted prices, trades at the adjusted close,
/// as FinAgent did). Reading the rules on the dividend-adjusted closes instead moves AAPL's
/// MACD records by 2.7 pp and 1.5 pp of ARR and its mean reversion by 1.8 pp, and MSFT's
/// KDJ & RSI (trained) by 2.0 pp: a dividend step inside a 15-bar window shifts a near-tie.
///
/// Tolerances: 0.5 percentage points on ARR and MDD, 0.025 on SR. Our adjusted closes are
/// yfinance's (adjusted for dividends up to 2023-12); FinAgent's environment traded FMP's
/// adjusted closes of an earlier download, whose level differs by ~0.9 % (AAPL): at 10,000
/// capital that is 67 instead of 68 whole shares, so even buy-and-hold, whose trades are
/// fixed, differs by up to 0.20 pp ARR and 0.32 pp MDD (AAPL, MSFT). An SR difference of 0.025 is what 0.5 pp of ARR makes at
/// these volatilities (ARR / (VOL * sqrt(252)) with VOL about 0.013 to 0.028). A rule that
/// trades differently (a flipped signal) is far outside these bounds, not near them.
///
/// ETH does not reproduce at all, not even buy-and-hold (ARR +1.5 % vs -2.5 %, MDD 42.6 %
/// vs 49.8 %): FinAgent's ETHUSD file (FMP) is another price series than the CoinGecko
/// 00:00 UTC snapshots we have (no high/low either), so no ETH record is asserted.
#[test]
fn reproduces_finagent_records_on_stocks() {
    let (tol_pp, tol_sr) = (0.005, 0.025);
    let mut checked = 0;
    let mut failures = Vec::new();
    for (a, n, k, o, p) in reproduce() {
        let known = KNOWN_MISMATCHES
            .iter()
            .any(|m| m.0 == a && m.1 == n && m.2 == k);
        let ok = (o.0 - p.0).abs() <= tol_pp
            && (o.2 - p.2).abs() <= tol_pp
            && (o.1 - p.1).abs() <= tol_sr;
        println!(
            "{a:6} {n} {k:8} ARR {:8.4} vs {:8.4} | SR {:7.3} vs {:7.3} | MDD {:6.4} vs {:6.4}{}",
            o.0,
            p.0,
            o.1,
            p.1,
            o.2,
            p.2,
            if known { "  (known mismatch)" } else { "" }
        );
        if a == "ETHUSD" {
            continue;
        }
        if known {
            // Kept honest: a known mismatch that starts to match must leave the list.
            assert!(
                !ok,
                "{a} {n} {k} now matches: remove it from KNOWN_MISMATCHES"
            );
            continue;
        }
        checked += 1;
        if !ok {
            failures.push(format!("{a} {n} {k}: ours {o:?}, FinAgent {p:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // 5 stocks x 5 strategies x 2 record kinds, less the known mismatches.
    assert_eq!(checked, 48);
}

#[test]
fn eth_records_are_computed_but_differ_from_finagents() {
    // ETH's buy-and-hold already differs (module doc above); the tools still run on the
    // ingested bars (high/low = max/min of the two snapshots).
    let rows: Vec<_> = reproduce()
        .into_iter()
        .filter(|r| r.0 == "ETHUSD")
        .collect();
    assert_eq!(rows.len(), 10);
    for (_, n, k, o, _) in &rows {
        assert!(
            o.0.is_finite() && o.1.is_finite() && o.2.is_finite(),
            "{n} {k}"
        );
    }
    let bh = rows.iter().find(|r| r.1 == 0).unwrap();
    assert!((bh.3.0 - bh.4.0).abs() > 0.03 && (bh.3.2 - bh.4.2).abs() > 0.05);
    // 365 daily returns in the window (crypto trades every day).
    let (dates, bars) = eth();
    let days = rows_of(&dates);
    let run = finagent_tools::run_tool(
        None,
        &ToolParams::default(),
        &bars,
        days,
        &RunSettings::default(),
    )
    .unwrap();
    assert_eq!(run.record.days, 365);
}

fn rows_of(dates: &[NaiveDate]) -> std::ops::Range<usize> {
    rows(dates, "2022-06-01", "2023-05-31")
}

// ---------------------------------------------------------------------------------------
// Hand-computed signals.

fn bars(close: &[f64]) -> Bars {
    Bars {
        close: close.to_vec(),
        high: close.iter().map(|c| Some(c + 1.0)).collect(),
        low: close.iter().map(|c| Some(c - 1.0)).collect(),
        adj_close: Vec::new(),
    }
}

fn last_signal(tool: Tool, p: &ToolParams, b: &Bars) -> (ToolSignal, finagent_tools::Indicators) {
    finagent_tools::signal_on(tool, p, b, b.close.len() - 1, 14).unwrap()
}

fn near(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9)
}

#[test]
fn macd_crossings_by_hand() {
    // short_window 1: the short EMA is the close; EMA_14 has a = 2/15, the signal a = 0.2.
    let p = ToolParams {
        macd_short_window: 1,
        ..ToolParams::default()
    };
    // 10, 7, 13: EMA_14 10, 9.6, 10.05333; MACD 0, -2.6, 2.94667; signal 0, -0.52, 0.17333.
    let (s, ind) = last_signal(Tool::Macd, &p, &bars(&[10.0, 7.0, 13.0]));
    assert_eq!(s, ToolSignal::Buy);
    assert!(near(ind.macd, 13.0 - (9.6 + 3.4 * 2.0 / 15.0)));
    assert!(near(
        ind.macd_signal,
        -0.52 + 0.2 * (ind.macd.unwrap() + 0.52)
    ));
    assert!(near(ind.macd_prev, -2.6) && near(ind.macd_signal_prev, -0.52));
    // 10, 13, 7: the mirror image -> SELL.
    let (s, ind) = last_signal(Tool::Macd, &p, &bars(&[10.0, 13.0, 7.0]));
    assert_eq!(s, ToolSignal::Sell);
    assert!(near(ind.macd_prev, 2.6) && near(ind.macd_signal_prev, 0.52));
    // 10, 7, 8: MACD -1.38667 stays below the signal -0.69333 -> HOLD.
    let (s, ind) = last_signal(Tool::Macd, &p, &bars(&[10.0, 7.0, 8.0]));
    assert_eq!(s, ToolSignal::Hold);
    assert!(near(ind.macd, 8.0 - (9.6 - 1.6 * 2.0 / 15.0)));
    // 10, 10, 13: yesterday MACD == signal (0 == 0); FinAgent needs a strict "below" -> HOLD.
    assert_eq!(
        last_signal(Tool::Macd, &p, &bars(&[10.0, 10.0, 13.0])).0,
        ToolSignal::Hold
    );
    // The first row of the data has nothing to compare with.
    assert_eq!(
        last_signal(Tool::Macd, &p, &bars(&[10.0])).0,
        ToolSignal::Hold
    );
    // The code default is short_window 7.
    assert_eq!(ToolParams::default().macd_short_window, 7);
}

/// 15 bars whose raw stochastic value RSV (ilong 1: on the bar itself) is `rsv[t]`, closes
/// `close[t]`.
fn kdj_bars(close: &[f64], rsv: &[f64]) -> Bars {
    // RSV = (c - l) / (h - l) * 100 with h - l = 2.
    let low: Vec<Option<f64>> = close
        .iter()
        .zip(rsv)
        .map(|(c, r)| Some(c - 2.0 * r / 100.0))
        .collect();
    Bars {
        close: close.to_vec(),
        high: low.iter().map(|l| l.map(|l| l + 2.0)).collect(),
        low,
        adj_close: Vec::new(),
    }
}

#[test]
fn kdj_rsi_by_hand() {
    let p = ToolParams {
        kdj_ilong: 1,
        kdj_isig: 2,
        ..ToolParams::default()
    };
    let falling: Vec<f64> = (0..15).map(|t| 100.0 - t as f64).collect();
    let rising: Vec<f64> = (0..15).map(|t| 100.0 + t as f64).collect();
    let mut up = vec![50.0; 15];
    up[13] = 0.0;
    up[14] = 100.0;
    // K_12..14 = 50, 25, 50; D_13 = D_14 = 37.5; J_13 = 0 < D, J_14 = 75 > D: J crosses
    // above D. All moves down: RSI 0 < 40 -> BUY.
    let (s, ind) = last_signal(Tool::KdjRsi, &p, &kdj_bars(&falling, &up));
    assert_eq!(s, ToolSignal::Buy);
    assert!(near(ind.k, 50.0) && near(ind.d, 37.5) && near(ind.j, 75.0));
    assert!(near(ind.d_prev, 37.5) && near(ind.j_prev, 0.0) && near(ind.rsi, 0.0));
    // The same cross with all moves up (RSI 100, not < 40): HOLD.
    let (s, ind) = last_signal(Tool::KdjRsi, &p, &kdj_bars(&rising, &up));
    assert_eq!(s, ToolSignal::Hold);
    assert!(near(ind.rsi, 100.0));
    // Mirror: RSV ..., 100, 0 -> K 75, 50; D 62.5; J 100 -> 25: J crosses below D, RSI 100
    // > 60 -> SELL.
    let mut down = vec![50.0; 15];
    down[13] = 100.0;
    down[14] = 0.0;
    let (s, ind) = last_signal(Tool::KdjRsi, &p, &kdj_bars(&rising, &down));
    assert_eq!(s, ToolSignal::Sell);
    assert!(near(ind.d, 62.5) && near(ind.j, 25.0) && near(ind.j_prev, 100.0));
    // With 14 bars only, the last is row 13 < max(ilong, isig, 14): warm-up HOLD.
    let b = kdj_bars(&falling[1..], &up[1..]);
    assert_eq!(last_signal(Tool::KdjRsi, &p, &b).0, ToolSignal::Hold);
}

#[test]
fn rsi_matches_wilder_by_hand_on_15_bars() {
    // 14 moves of +1 then -1 alternating from 100: ups 1,0,1,...; the ta RSI counts the
    // first (missing) move as 0. Checked against a direct evaluation of the recursion.
    let close: Vec<f64> = (0..15).map(|t| 100.0 + (t % 2) as f64).collect();
    let rsi = finagent_tools::rules::rsi(&close, 14);
    let (mut eu, mut ed) = (0.0_f64, 0.0_f64);
    for t in 1..15 {
        let d = close[t] - close[t - 1];
        eu = eu * 13.0 / 14.0 + d.max(0.0) / 14.0;
        ed = ed * 13.0 / 14.0 + (-d).max(0.0) / 14.0;
    }
    assert!(rsi[12].is_nan());
    assert!((rsi[14] - (100.0 - 100.0 / (1.0 + eu / ed))).abs() < 1e-9);
}

/// Bar 0 at 100, bars 1..13 at 100, bar 14 at `last`; high = close + 1, low = close - 1.
fn band_bars(last: f64) -> Bars {
    let mut c = vec![100.0; 15];
    c[14] = last;
    bars(&c)
}

#[test]
fn stochastic_bollinger_by_hand() {
    let p = ToolParams::default();
    // Last 14 closes: 13 x 100 and 86: mean 99, sample std sqrt(182 / 13) = sqrt(14);
    // lower band 99 - 2 sqrt(14) = 91.52 > 86; %K = 100 (86 - 85) / (101 - 85) = 6.25 < 20.
    let (s, ind) = last_signal(Tool::StochasticBollinger, &p, &band_bars(86.0));
    assert_eq!(s, ToolSignal::Buy);
    assert!(near(ind.bb_lower, 99.0 - 2.0 * 14f64.sqrt()));
    assert!(near(ind.bb_upper, 99.0 + 2.0 * 14f64.sqrt()));
    assert!(near(ind.stochastic, 6.25));
    // Mirror at 114: upper 101 + 2 sqrt(14) = 108.48 < 114; %K = 100 (114 - 99) / 16 = 93.75.
    let (s, ind) = last_signal(Tool::StochasticBollinger, &p, &band_bars(114.0));
    assert_eq!(s, ToolSignal::Sell);
    assert!(near(ind.stochastic, 93.75));
    // Oversold threshold 5: 6.25 is not below it -> HOLD.
    let p5 = ToolParams {
        stoch_oversold: 5.0,
        ..p
    };
    assert_eq!(
        last_signal(Tool::StochasticBollinger, &p5, &band_bars(86.0)).0,
        ToolSignal::Hold
    );
    // A 14-bar window (row 13 < 14): HOLD even though the bands are defined.
    let mut b = band_bars(86.0);
    for v in [&mut b.high, &mut b.low] {
        v.remove(0);
    }
    b.close.remove(0);
    let (s, ind) = last_signal(Tool::StochasticBollinger, &p, &b);
    assert_eq!(s, ToolSignal::Hold);
    assert!(ind.bb_lower.is_some());
}

#[test]
fn mean_reversion_by_hand() {
    let p = ToolParams::default();
    // z = (86 - 99) / sqrt(14) = -3.474 < -1 -> BUY; (114 - 101) / sqrt(14) -> SELL.
    let (s, ind) = last_signal(Tool::MeanReversion, &p, &band_bars(86.0));
    assert_eq!(s, ToolSignal::Buy);
    assert!(near(ind.z_score, -13.0 / 14f64.sqrt()));
    assert_eq!(
        last_signal(Tool::MeanReversion, &p, &band_bars(114.0)).0,
        ToolSignal::Sell
    );
    // Threshold 4: |z| = 3.47 -> HOLD.
    let p4 = ToolParams {
        z_score_threshold: 4.0,
        ..p
    };
    assert_eq!(
        last_signal(Tool::MeanReversion, &p4, &band_bars(86.0)).0,
        ToolSignal::Hold
    );
    // A flat window: std 0, z undefined -> HOLD with no z value.
    let (s, ind) = last_signal(Tool::MeanReversion, &p, &band_bars(100.0));
    assert_eq!((s, ind.z_score), (ToolSignal::Hold, None));
}

// ---------------------------------------------------------------------------------------
// No look-ahead, the window, missing bars.

#[test]
fn no_look_ahead_on_real_data() {
    let (dates, b) = yfinance("TSLA");
    let p = ToolParams::default();
    let all = 0..b.close.len();
    for tool in Tool::ALL {
        let full = finagent_tools::signals(tool, &p, &b, all.clone(), 14).unwrap();
        assert!(
            full.iter().any(|s| s.0 != ToolSignal::Hold),
            "{tool:?} never trades"
        );
        for cut in [20, 300, 611, 900] {
            // Truncate after the cut, and separately scramble every bar after it.
            let mut trunc = b.clone();
            trunc.close.truncate(cut + 1);
            trunc.high.truncate(cut + 1);
            trunc.low.truncate(cut + 1);
            let mut scrambled = b.clone();
            for t in cut + 1..b.close.len() {
                let f = 0.5 + (t % 7) as f64 * 0.25;
                scrambled.close[t] *= f;
                scrambled.high[t] = scrambled.high[t].map(|x| x * f * 1.1);
                scrambled.low[t] = scrambled.low[t].map(|x| x * f * 0.9);
            }
            for other in [&trunc, &scrambled] {
                let got = finagent_tools::signals(tool, &p, other, 0..cut + 1, 14).unwrap();
                assert_eq!(got, full[..cut + 1], "{tool:?} cut at {}", dates[cut]);
            }
            // The path of running the rule up to the cut is unchanged too.
            let s = RunSettings::default();
            let a = finagent_tools::run_tool(Some(tool), &p, &b, 0..cut + 1, &s).unwrap();
            let z = finagent_tools::run_tool(Some(tool), &p, &scrambled, 0..cut + 1, &s).unwrap();
            assert_eq!(a.steps, z.steps);
        }
    }
}

/// Changes the bar `r` drastically.
fn bump(b: &Bars, r: usize) -> Bars {
    let mut o = b.clone();
    o.close[r] *= 3.0;
    o.high[r] = Some(1e6);
    o.low[r] = Some(1e-3);
    o
}

#[test]
fn the_window_is_the_last_15_bars() {
    // FinAgent shows the rule the bars t-14..=t. MACD's EMAs and the RSI start at the
    // window's first bar, so that bar matters; the 14-bar rolling statistics of Stochastic +
    // Bollinger and mean reversion see t-13..=t only (the 15th bar only ends the warm-up).
    let (_, b) = yfinance("AAPL");
    let p = ToolParams::default();
    let t = 500;
    for tool in Tool::ALL {
        let base = finagent_tools::signal_on(tool, &p, &b, t, 14).unwrap();
        let at = |r: usize| finagent_tools::signal_on(tool, &p, &bump(&b, r), t, 14).unwrap();
        assert_eq!(at(t - 15), base, "{tool:?}");
        let first_used = match tool {
            Tool::Macd | Tool::KdjRsi => t - 14,
            Tool::StochasticBollinger | Tool::MeanReversion => {
                assert_eq!(at(t - 14), base, "{tool:?}");
                t - 13
            }
        };
        assert_ne!(at(first_used).1, base.1, "{tool:?}");
    }
}

#[test]
fn missing_high_or_low_is_an_error_naming_column_and_row() {
    let mut b = band_bars(86.0);
    b.low[9] = None;
    let p = ToolParams::default();
    for tool in [Tool::KdjRsi, Tool::StochasticBollinger] {
        assert_eq!(
            finagent_tools::signal_on(tool, &p, &b, 14, 14).unwrap_err(),
            MissingBar {
                column: "low",
                row: 9
            }
        );
    }
    b.high[3] = None;
    assert_eq!(
        finagent_tools::signal_on(Tool::KdjRsi, &p, &b, 14, 14).unwrap_err(),
        MissingBar {
            column: "high",
            row: 3
        }
    );
    // Outside the window (day 20 sees 6..=20) or for a close-only rule: no error.
    let mut long = band_bars(86.0);
    long.close.extend(std::iter::repeat_n(100.0, 10));
    long.high.extend(std::iter::repeat_n(Some(101.0), 10));
    long.low.extend(std::iter::repeat_n(Some(99.0), 10));
    long.high[3] = None;
    assert!(finagent_tools::signal_on(Tool::KdjRsi, &p, &long, 20, 14).is_ok());
    assert!(finagent_tools::signal_on(Tool::Macd, &p, &b, 14, 14).is_ok());
    assert!(finagent_tools::signal_on(Tool::MeanReversion, &p, &b, 14, 14).is_ok());
}

#[test]
fn trades_at_adj_close_where_present() {
    // Signals read close; the environment trades adj_close (FinAgent's split), else close.
    let mut b = band_bars(86.0);
    b.adj_close = vec![Some(50.0); 15];
    b.adj_close[14] = Some(43.0);
    b.adj_close[13] = None;
    let prices = b.trade_prices(12..15);
    assert_eq!(prices, vec![50.0, 100.0, 43.0]);
    // Mean reversion says BUY on day 14 (from the closes); 10,000 / 43 / 1.001 -> 232 shares.
    let p = ToolParams::default();
    let s = RunSettings::default();
    let run = finagent_tools::run_tool(Some(Tool::MeanReversion), &p, &b, 14..15, &s).unwrap();
    assert_eq!(run.steps[0].signal, ToolSignal::Buy);
    assert_eq!(run.steps[0].shares, 232.0);
    assert!((run.steps[0].cash - (10_000.0 - 232.0 * 43.0 * 1.001)).abs() < 1e-9);
}

#[test]
fn params_take_finagents_names_and_reject_bad_values() {
    let v: Value = serde_json::from_str(
        r#"{"default": {"macd": {"short_window": 5}},
            "AAPL": {"kdj_rsi": {"ilong": 7, "isig": 3, "rsiOverbought": 72, "rsiOversold": 45},
                     "macd": {"short_window": 6}}}"#,
    )
    .unwrap();
    let o = ParamOverrides::parse(Some(&v)).unwrap();
    let a = o.for_ticker("AAPL");
    assert_eq!(
        (a.macd_short_window, a.kdj_ilong, a.rsi_overbought),
        (6, 7, 72.0)
    );
    let m = o.for_ticker("MSFT");
    assert_eq!((m.macd_short_window, m.kdj_ilong), (5, 9));
    for (bad, msg) in [
        (r#"{"default": {"rsi": {}}}"#, "unknown tool 'rsi'"),
        (
            r#"{"default": {"macd": {"long_window": 3}}}"#,
            "unknown parameter 'long_window'",
        ),
        (
            r#"{"AAPL": {"macd": {"short_window": 0}}}"#,
            "AAPL.macd.short_window",
        ),
        (
            r#"{"AAPL": {"mean_reversion": {"z_score_threshold": "x"}}}"#,
            "expected a number",
        ),
        (r#"[1]"#, "expected a map"),
    ] {
        let e = ParamOverrides::parse(Some(&serde_json::from_str(bad).unwrap())).unwrap_err();
        assert!(e.contains(msg), "{bad}: {e}");
    }
    assert_eq!(
        ToolParams::default().to_json(Tool::StochasticBollinger),
        serde_json::json!({"std_dev": 2.0, "overbought": 80.0, "oversold": 20.0})
    );
}

// ---------------------------------------------------------------------------------------
// The `finagent_tools` stage, driven through `StageContext` as the engine drives it.

mod stage {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use flag_core::arrow::array::{
        Array, ArrayRef, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
    };
    use flag_core::parquet_io::{read_parquet_file, write_parquet_file};
    use flag_core::{InputArtifact, Params, RunStage, Stage, StageContext, StageResult};
    use flag_trading::finagent_tools::{self, RunSettings, Tool};
    use flag_trading::stages::finagent_tools::FinAgentTools;
    use serde_json::{Value, json};

    use super::{published, rows_of, yfinance};

    /// An `ohlcv` table of `tickers` (stocks-2020-2023); `null_high` blanks one ticker's high
    /// on one date.
    fn ohlcv(tickers: &[&str], null_high: Option<(&str, &str)>) -> RecordBatch {
        let epoch = chrono::NaiveDate::default();
        let (mut t, mut d, mut h, mut l, mut c) = (vec![], vec![], vec![], vec![], vec![]);
        for &tk in tickers {
            let (dates, b) = yfinance(tk);
            for (i, date) in dates.iter().enumerate() {
                t.push(tk.to_string());
                d.push((*date - epoch).num_days() as i32);
                let blank = null_high.is_some_and(|(x, day)| x == tk && *date == super::ymd(day));
                h.push(if blank { None } else { b.high[i] });
                l.push(b.low[i]);
                c.push(b.close[i]);
            }
        }
        let n = t.len();
        let none = || -> ArrayRef { Arc::new(Float64Array::from(vec![None::<f64>; n])) };
        flag_core::schema::schema("ohlcv")
            .unwrap()
            .batch(vec![
                Arc::new(StringArray::from(t)),
                Arc::new(Date32Array::from(d)),
                none(),
                Arc::new(Float64Array::from(h)),
                Arc::new(Float64Array::from(l)),
                Arc::new(Float64Array::from(c)),
                none(),
                none(),
            ])
            .unwrap()
    }

    fn params(set: Value) -> Params {
        let mut m: BTreeMap<String, Value> = FinAgentTools
            .spec()
            .params
            .iter()
            .filter_map(|p| p.default.clone().map(|d| (p.name.to_string(), d)))
            .collect();
        for (k, v) in set.as_object().unwrap() {
            m.insert(k.clone(), v.clone());
        }
        Params::new(m)
    }

    fn run(bars: RecordBatch, set: Value, dir: &Path) -> StageResult<PathBuf> {
        let input = dir.join("bars.parquet");
        write_parquet_file(&input, bars.schema(), &[bars]).unwrap();
        let staging = dir.join("out");
        std::fs::create_dir_all(&staging).unwrap();
        let inputs = [(
            "bars".to_string(),
            vec![InputArtifact {
                reference: "ohlcv.bars".into(),
                files: vec![input],
                schema: Some("ohlcv"),
            }],
        )]
        .into_iter()
        .collect();
        let mut ctx = StageContext::new(
            "finagent_tools",
            params(set),
            inputs,
            FinAgentTools.spec().outputs,
            staging.clone(),
            BTreeMap::new(),
            None,
            None,
        );
        FinAgentTools.run(&mut ctx)?;
        Ok(staging)
    }

    fn read(dir: &Path, name: &str) -> RecordBatch {
        let (schema, batches) = read_parquet_file(&dir.join(format!("{name}.parquet"))).unwrap();
        flag_core::arrow::compute::concat_batches(&schema, &batches).unwrap()
    }

    fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
        b.column_by_name(name)
            .unwrap_or_else(|| panic!("no column {name}"))
            .as_any()
            .downcast_ref()
            .unwrap()
    }

    fn base() -> Value {
        json!({"train_start": "2022-06-01", "train_end": "2023-05-31",
               "start": "2023-06-01", "end": "2023-12-29"})
    }

    #[test]
    fn records_and_signals_on_real_bars() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = base();
        // AAPL with its released trained parameters; MSFT with the code defaults.
        set["tool_params"] = json!({"AAPL": {
            "macd": {"short_window": 6},
            "kdj_rsi": {"ilong": 7, "isig": 3, "rsiOverbought": 72, "rsiOversold": 45},
            "stochastic_bollinger": {"std_dev": 2.1000192536316638, "overbought": 90, "oversold": 19},
            "mean_reversion": {"z_score_threshold": 0.949816047538945}}});
        let out = run(ohlcv(&["MSFT", "AAPL"], None), set, dir.path()).unwrap();
        let rec = read(&out, "records");
        let (ticker, tool) = (
            col::<StringArray>(&rec, "ticker"),
            col::<StringArray>(&rec, "tool"),
        );
        let got: Vec<(String, String)> = (0..rec.num_rows())
            .map(|i| (ticker.value(i).to_string(), tool.value(i).to_string()))
            .collect();
        let order = [
            "buy_and_hold",
            "macd",
            "kdj_rsi",
            "stochastic_bollinger",
            "mean_reversion",
        ];
        let want: Vec<(String, String)> = ["AAPL", "MSFT"]
            .iter()
            .flat_map(|t| order.iter().map(move |o| (t.to_string(), o.to_string())))
            .collect();
        assert_eq!(got, want);
        let (arr, sr, mdd) = (
            col::<Float64Array>(&rec, "arr"),
            col::<Float64Array>(&rec, "sr"),
            col::<Float64Array>(&rec, "mdd"),
        );
        let days = col::<Int64Array>(&rec, "days");
        assert!((0..10).all(|i| days.value(i) == 251));
        // AAPL's trained records (n = 2, 3, 4) and MSFT's defaults (n = 2, 3) as published
        // (tolerances: the reproduction test above).
        for (i, asset, n, kind) in [
            (0, "AAPL", 0, "trained"),
            (2, "AAPL", 2, "trained"),
            (3, "AAPL", 3, "trained"),
            (4, "AAPL", 4, "trained"),
            (5, "MSFT", 0, "default"),
            (7, "MSFT", 2, "default"),
            (8, "MSFT", 3, "default"),
        ] {
            let p = published(asset, n, kind);
            assert!(
                (arr.value(i) - p.0).abs() <= 0.005,
                "{asset} {n}: {} vs {}",
                arr.value(i),
                p.0
            );
            assert!((sr.value(i) - p.1).abs() <= 0.025, "{asset} {n}");
            assert!((mdd.value(i) - p.2).abs() <= 0.005, "{asset} {n}");
        }
        assert_eq!(
            col::<StringArray>(&rec, "params").value(1),
            r#"{"short_window":6}"#
        );
        assert_eq!(
            col::<StringArray>(&rec, "params").value(6),
            r#"{"short_window":7}"#
        );
        assert_eq!(col::<StringArray>(&rec, "params").value(0), "{}");

        // Signals: 2 tickers x 4 tools x the trading days of 2023-06-01..2023-12-29.
        let sig = read(&out, "signals");
        let (dates, b) = yfinance("AAPL");
        let period = super::rows(&dates, "2023-06-01", "2023-12-29");
        assert_eq!(sig.num_rows(), 2 * 4 * period.len());
        // AAPL's rows come first, tools in FinAgent's order, days ascending; each equals the
        // pure function's signal on the same bars.
        let p = finagent_tools::ParamOverrides::parse(Some(
            &json!({"AAPL": {"macd": {"short_window": 6}}}),
        ))
        .unwrap()
        .for_ticker("AAPL");
        let pure = finagent_tools::signals(Tool::Macd, &p, &b, period.clone(), 14).unwrap();
        let (s_sig, s_tool) = (
            col::<StringArray>(&sig, "signal"),
            col::<StringArray>(&sig, "tool"),
        );
        let (macd, k) = (
            col::<Float64Array>(&sig, "macd"),
            col::<Float64Array>(&sig, "k"),
        );
        for (j, (s, ind)) in pure.iter().enumerate() {
            assert_eq!((s_tool.value(j), s_sig.value(j)), ("macd", s.as_str()));
            assert_eq!(macd.value(j), ind.macd.unwrap());
            assert!(k.is_null(j), "macd rows carry no KDJ values");
        }
        assert!((0..sig.num_rows()).any(|i| s_sig.value(i) != "HOLD"));
        // No adj_close in these bars: the traded price is the close.
        let (price, close) = (
            col::<Float64Array>(&sig, "price"),
            col::<Float64Array>(&sig, "close"),
        );
        assert!((0..sig.num_rows()).all(|i| price.value(i) == close.value(i)));
        // The value column is the rule run from 10,000 at the period's start.
        let value = col::<Float64Array>(&sig, "value");
        let run = finagent_tools::run_tool(
            Some(Tool::Macd),
            &p,
            &b,
            period.clone(),
            &RunSettings::default(),
        )
        .unwrap();
        assert_eq!(
            value.value(period.len() - 1),
            run.steps.last().unwrap().value
        );
        // The records window used the bars before 2022-06-01 for the first signals.
        let train = rows_of(&dates);
        assert!(train.start >= 14);
    }

    #[test]
    fn a_null_high_fails_only_the_rules_that_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let bars = || ohlcv(&["AAPL", "MSFT"], Some(("MSFT", "2023-03-01")));
        let e = run(bars(), base(), dir.path()).unwrap_err().to_string();
        // AAPL's 1,006 rows come first; MSFT's 2023-03-01 is its 796th row: 1,006 + 796.
        assert!(
            e.starts_with("input 'bars': row 1802: column 'high' of MSFT on 2023-03-01 is null, and tool kdj_rsi"),
            "{e}"
        );
        let mut set = base();
        set["tools"] = json!(["macd", "mean_reversion"]);
        let out = run(bars(), set, dir.path()).unwrap();
        assert_eq!(read(&out, "records").num_rows(), 2 * 3);
    }
}
