//! `llm_only`: the strategist's direction as the position in the TDQN environment
//! (direction 1 -> LONG, -1 -> SHORT, 0 -> keep the current position; flat until the first
//! non-zero signal). Writes `equity` and `trades` like the baselines, so `metrics` and
//! `report` take it unchanged.
use std::collections::BTreeMap;

use flag_core::arrow::array::{Array, Date32Array, Float64Array, RecordBatch, StringArray};
use flag_core::schema::schema;
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use flag_trading::backtest::{EnvKind, EnvSettings, simulate};
use flag_trading::env::StepOutcome;
use flag_trading::series::{Series, read_series};
use flag_trading::stages::{env_params, env_settings};
use flag_trading::strategy::Signal;
use serde_json::{Value, json};

use crate::util::{self, column};

const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/llm_only-1"
);

pub struct LlmOnly;

/// Per ticker: date -> direction in {-1, 0, 1}.
pub fn read_directions(batch: &RecordBatch) -> StageResult<BTreeMap<String, BTreeMap<i32, f64>>> {
    let ticker = column::<StringArray>(batch, "signals", "ticker", "utf8")?;
    let date = column::<Date32Array>(batch, "signals", "date", "date32")?;
    let dir = column::<Float64Array>(batch, "signals", "direction", "float64")?;
    let mut out: BTreeMap<String, BTreeMap<i32, f64>> = BTreeMap::new();
    for i in 0..batch.num_rows() {
        if ticker.is_null(i) || date.is_null(i) || dir.is_null(i) {
            return Err(util::null_err("signals", i, "ticker/date/direction"));
        }
        let d = dir.value(i);
        if ![-1.0, 0.0, 1.0].contains(&d) {
            return Err(StageError::Input {
                input: "signals".into(),
                message: format!(
                    "row {}: column 'direction' is {d}, expected -1, 0 or 1",
                    i + 1
                ),
            });
        }
        if out
            .entry(ticker.value(i).to_string())
            .or_default()
            .insert(date.value(i), d)
            .is_some()
        {
            return Err(StageError::Input {
                input: "signals".into(),
                message: format!(
                    "row {}: a second signal for ticker {} on that date",
                    i + 1,
                    ticker.value(i)
                ),
            });
        }
    }
    Ok(out)
}

/// One ticker's path over the days of `s` from its first to its last signal date.
/// Returns (dates, prices, outcomes).
pub fn run_ticker(
    env: &EnvSettings,
    s: &Series,
    dirs: &BTreeMap<i32, f64>,
) -> (Vec<i32>, Vec<f64>, Vec<StepOutcome>) {
    let (Some((&first, _)), Some((&last, _))) = (dirs.first_key_value(), dirs.last_key_value())
    else {
        return (Vec::new(), Vec::new(), Vec::new());
    };
    let r = s.range(first, last);
    let signals: Vec<Signal> = s.dates[r.clone()]
        .iter()
        .map(|d| match dirs.get(d) {
            Some(x) if *x > 0.0 => Signal::Long,
            Some(x) if *x < 0.0 => Signal::Short,
            _ => Signal::Keep,
        })
        .collect();
    let steps = simulate(env, &s.close[r.clone()], &signals);
    (s.dates[r.clone()].to_vec(), s.close[r].to_vec(), steps)
}

/// (ticker, dates, closes, one outcome per day) of one simulated path.
pub type TickerPath = (String, Vec<i32>, Vec<f64>, Vec<StepOutcome>);

/// Equity and trades batches for the paths (ticker order) in environment `env`.
pub fn batches(
    name: &str,
    env: &str,
    split: &str,
    paths: &[TickerPath],
) -> StageResult<(RecordBatch, RecordBatch)> {
    let rows: Vec<(&str, i32, f64, &StepOutcome)> = paths
        .iter()
        .flat_map(|(t, d, p, s)| {
            d.iter()
                .zip(p)
                .zip(s)
                .map(move |((&d, &p), s)| (t.as_str(), d, p, s))
        })
        .collect();
    let n = rows.len();
    let equity = schema("equity")?.batch(vec![
        util::utf8(std::iter::repeat_n(name, n)),
        util::utf8(std::iter::repeat_n(env, n)),
        util::utf8(rows.iter().map(|r| r.0)),
        util::utf8(std::iter::repeat_n(split, n)),
        util::date32(rows.iter().map(|r| r.1).collect()),
        util::float64(rows.iter().map(|r| r.2).collect()),
        util::utf8(rows.iter().map(|r| r.3.action)),
        util::float64(rows.iter().map(|r| r.3.position).collect()),
        util::float64(rows.iter().map(|r| r.3.cash).collect()),
        util::float64(rows.iter().map(|r| r.3.value).collect()),
        util::float64(rows.iter().map(|r| r.3.daily_return).collect()),
        util::boolean(rows.iter().map(|r| r.3.fill.is_some()).collect()),
    ])?;
    let fills: Vec<_> = rows
        .iter()
        .filter_map(|r| r.3.fill.map(|f| (r.0, r.1, f)))
        .collect();
    let m = fills.len();
    let trades = schema("trades")?.batch(vec![
        util::utf8(std::iter::repeat_n(name, m)),
        util::utf8(std::iter::repeat_n(env, m)),
        util::utf8(fills.iter().map(|f| f.0)),
        util::utf8(std::iter::repeat_n(split, m)),
        util::date32(fills.iter().map(|f| f.1).collect()),
        util::utf8(fills.iter().map(|f| f.2.side.as_str())),
        util::float64(fills.iter().map(|f| f.2.shares).collect()),
        util::float64(fills.iter().map(|f| f.2.price).collect()),
        util::float64(fills.iter().map(|f| f.2.cost).collect()),
    ])?;
    Ok((equity, trades))
}

impl Stage for LlmOnly {
    fn kind(&self) -> &'static str {
        "llm_only"
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "LLM-only strategy: the strategist's daily direction as the TDQN position (LONG/SHORT; \
                  0 keeps the position), from the first to the last signal date of each ticker within \
                  [start, end].",
            inputs: vec![
                InputSpec::one("signals", "llm_signal", "Strategist signals"),
                InputSpec {
                    name: "table",
                    // Read by column name: ticker, date, close (schema `ohlcv` or `indicators`).
                    schema: None,
                    required: true,
                    many: false,
                    doc: "Prices: ticker, date, close",
                },
            ],
            outputs: vec![
                OutputSpec::parquet("equity", "equity", "Daily portfolio path per ticker"),
                OutputSpec::parquet("trades", "trades", "Executed trades"),
            ],
            params: vec![
                ParamSpec::with_default(
                    "name",
                    ParamKind::Str,
                    json!("llm_only"),
                    "Strategy name in the outputs",
                ),
                ParamSpec::with_default(
                    "split",
                    ParamKind::Str,
                    json!("test"),
                    "Split label in the outputs",
                ),
                ParamSpec::with_default(
                    "tickers",
                    ParamKind::List,
                    Value::Null,
                    "Tickers (default: all with signals)",
                ),
                ParamSpec::with_default(
                    "start",
                    ParamKind::Date,
                    Value::Null,
                    "First day traded (default: the first signal); signals before it are ignored",
                ),
                ParamSpec::with_default(
                    "end",
                    ParamKind::Date,
                    Value::Null,
                    "Last day traded (default: the last signal)",
                ),
            ]
            .into_iter()
            .chain(env_params())
            .collect(),
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(VERSION)
    }
}

impl flag_core::RunStage for LlmOnly {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let p = &ctx.params;
        let (name, split) = (p.str("name")?, p.str("split")?);
        let env = env_settings(p, EnvKind::Tdqn)?;
        let tickers = util::ticker_filter(p)?;
        let day = |n: &str| -> StageResult<Option<i32>> {
            match p.get(n) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => Ok(Some(flag_trading::series::to_days(p.date(n)?))),
            }
        };
        let (start, end) = (day("start")?, day("end")?);
        if let (Some(a), Some(b)) = (start, end)
            && a > b
        {
            return Err(StageError::param("start", "must be on or before end"));
        }
        let mut dirs = read_directions(&ctx.read_input("signals")?)?;
        // The window: the strategy trades from `start` with the signal in force then.
        for d in dirs.values_mut() {
            d.retain(|date, _| start.is_none_or(|a| *date >= a) && end.is_none_or(|b| *date <= b));
        }
        let series = read_series(&ctx.read_input("table")?, "table", &[])?;
        let mut paths = Vec::new();
        for (t, d) in &dirs {
            if tickers.as_ref().is_some_and(|w| !w.contains(t)) {
                continue;
            }
            let s = series
                .iter()
                .find(|s| &s.ticker == t)
                .ok_or_else(|| StageError::Input {
                    input: "table".into(),
                    message: format!("has no prices for ticker {t} of the signals"),
                })?;
            let (dates, prices, steps) = run_ticker(&env, s, d);
            paths.push((t.clone(), dates, prices, steps));
        }
        let (equity, trades) = batches(&name, "tdqn", &split, &paths)?;
        ctx.log(format!(
            "{} tickers, {} equity rows, {} trades",
            paths.len(),
            equity.num_rows(),
            trades.num_rows()
        ));
        ctx.write_parquet("equity", &[equity])?;
        ctx.write_parquet("trades", &[trades])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_path() {
        let env = EnvSettings {
            kind: EnvKind::Tdqn,
            initial_capital: 1000.0,
            cost: 0.001,
            epsilon: 0.1,
        };
        let s = Series {
            ticker: "X".into(),
            dates: vec![1, 2, 3, 4, 5, 6],
            close: vec![9.0, 10.0, 11.0, 12.0, 12.0, 13.0],
            cols: BTreeMap::new(),
        };
        // Day 1 has no signal (before the first one) and day 6 none after the last: the path
        // runs days 2..=5. Direction 0 on day 3 keeps the long position.
        let dirs: BTreeMap<i32, f64> = [(2, 1.0), (3, 0.0), (4, -1.0), (5, 1.0)]
            .into_iter()
            .collect();
        let (dates, prices, steps) = run_ticker(&env, &s, &dirs);
        assert_eq!(dates, vec![2, 3, 4, 5]);
        assert_eq!(prices, vec![10.0, 11.0, 12.0, 12.0]);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // LONG at 10: floor(1000 / 10.01) = 99 shares, cash 9.01, value 999.01.
        assert_eq!((steps[0].action, steps[0].position), ("LONG", 99.0));
        assert!(close(steps[0].cash, 9.01) && close(steps[0].value, 999.01));
        // Kept: value 9.01 + 99 * 11 = 1098.01, no trade.
        assert_eq!((steps[1].action, steps[1].fill), ("LONG", None));
        assert!(close(steps[1].value, 1098.01));
        // SHORT at 12: sell 99 and short 99: cash 2382.634, value 2382.634 - 1188 = 1194.634.
        assert_eq!(steps[2].position, -99.0);
        assert!(close(steps[2].cash, 2382.634) && close(steps[2].value, 1194.634));
        // LONG at 12: buy back 99 and buy 99: cash 4.258, value 4.258 + 1188.
        assert_eq!(steps[3].position, 99.0);
        assert!(close(steps[3].value, 1192.258));
        let (eq, tr) = batches(
            "llm_only",
            "tdqn",
            "test",
            &[("X".into(), dates, prices, steps)],
        )
        .unwrap();
        assert_eq!((eq.num_rows(), tr.num_rows()), (4, 3));
        let sides = column::<StringArray>(&tr, "trades", "side", "utf8").unwrap();
        let shares = column::<Float64Array>(&tr, "trades", "shares", "float64").unwrap();
        assert_eq!(
            (sides.value(0), sides.value(1), sides.value(2)),
            ("BUY", "SELL", "BUY")
        );
        assert_eq!(
            (shares.value(0), shares.value(1), shares.value(2)),
            (99.0, 198.0, 198.0)
        );
        let ret = column::<Float64Array>(&eq, "equity", "daily_return", "float64").unwrap();
        assert!(close(ret.value(0), -0.00099));
        assert!(close(ret.value(3), 1192.258 / 1194.634 - 1.0));
    }

    #[test]
    fn rejects_directions_outside_the_action_space() {
        let batch = RecordBatch::try_from_iter(vec![
            ("ticker", util::utf8(["X"])),
            ("date", util::date32(vec![1])),
            ("direction", util::float64(vec![2.0])),
        ])
        .unwrap();
        let e = read_directions(&batch).unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 'signals': row 1: column 'direction' is 2, expected -1, 0 or 1"
        );
    }
}
