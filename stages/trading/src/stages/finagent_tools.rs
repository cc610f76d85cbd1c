//! `finagent_tools`: FinAgent's four rule-strategy tools on every ticker of an `ohlcv` table:
//! each day's signal with the indicator values it used (`signals`, over `start..=end`), and
//! each tool's record next to buy-and-hold's (`records`, over `train_start..=train_end`).
//! The rules, environment and formulas: [`crate::finagent_tools`].
use flag_core::arrow::array::{Array, Date32Array, RecordBatch, StringArray};
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use serde_json::json;

use super::{PeriodsPerYear, VERSION, date32, float64, int64, utf8};
use crate::finagent_tools::{
    self as ft, Bars, Indicators, MissingBar, ParamOverrides, Record, RunSettings, Step, Tool,
    ToolSignal,
};
use crate::series::{Series, from_days, read_series, to_days};

pub struct FinAgentTools;

/// Everything the stage reads from its params, validated.
#[derive(Debug, Clone)]
pub struct ToolsConfig {
    pub tools: Vec<Tool>,
    pub overrides: ParamOverrides,
    /// The record window and the signal window, date32 days, inclusive.
    pub train: (i32, i32),
    pub signal: (i32, i32),
    pub initial_capital: f64,
    pub cost: f64,
    pub periods: PeriodsPerYear,
    pub look_back: usize,
}

impl ToolsConfig {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let mut tools = Vec::new();
        for name in p.str_list("tools")? {
            let t = Tool::parse(&name).ok_or_else(|| {
                let all: Vec<_> = Tool::ALL.iter().map(|t| t.name()).collect();
                StageError::param(
                    "tools",
                    format!("unknown tool '{name}' (known: {})", all.join(", ")),
                )
            })?;
            if !tools.contains(&t) {
                tools.push(t);
            }
        }
        tools.sort();
        let overrides = ParamOverrides::parse(p.get("tool_params"))
            .map_err(|m| StageError::param("tool_params", m))?;
        let date = |n: &str| p.date(n).map(to_days);
        let train = (date("train_start")?, date("train_end")?);
        let signal = (date("start")?, date("end")?);
        if train.0 > train.1 {
            return Err(StageError::param(
                "train_start",
                "must be on or before train_end",
            ));
        }
        if signal.0 > signal.1 {
            return Err(StageError::param("start", "must be on or before end"));
        }
        let initial_capital = p.capital("initial_capital")?;
        let cost = p.f64("cost")?;
        if !(0.0..1.0).contains(&cost) {
            return Err(StageError::param(
                "cost",
                format!("must be in [0, 1), got {cost}"),
            ));
        }
        let look_back = p.i64("look_back_days")?;
        if !(1..=1000).contains(&look_back) {
            return Err(StageError::param(
                "look_back_days",
                format!("must be 1..=1000, got {look_back}"),
            ));
        }
        Ok(ToolsConfig {
            tools,
            overrides,
            train,
            signal,
            initial_capital,
            cost,
            periods: PeriodsPerYear::from_params(p, "periods_per_year")?,
            look_back: look_back as usize,
        })
    }

    fn settings(&self, ticker: &str) -> RunSettings {
        RunSettings {
            initial_capital: self.initial_capital,
            cost: self.cost,
            periods_per_year: self.periods.for_ticker(ticker) as f64,
            look_back: self.look_back,
        }
    }
}

/// One tool's signal-period rows on one ticker.
pub struct SignalRows {
    pub ticker: String,
    pub tool: Tool,
    pub params: String,
    pub dates: Vec<i32>,
    pub close: Vec<f64>,
    /// The price traded at (adj_close, else close).
    pub price: Vec<f64>,
    pub days: Vec<(ToolSignal, Indicators)>,
    pub steps: Vec<Step>,
}

/// One record row.
pub struct RecordRow {
    pub ticker: String,
    /// None: buy-and-hold.
    pub tool: Option<Tool>,
    pub params: String,
    pub first_date: i32,
    pub last_date: i32,
    pub periods_per_year: i64,
    pub record: Record,
    pub trades: usize,
}

fn bars_of(s: &Series) -> Bars {
    let col = |n: &str| s.cols.get(n).cloned().unwrap_or_default();
    Bars {
        close: s.close.clone(),
        high: col("high"),
        low: col("low"),
        adj_close: col("adj_close"),
    }
}

/// The error for a null high/low a rule needed: names the input row (1-based), column,
/// ticker and date, and the tool and day whose window read it.
fn missing_bar(
    batch: &RecordBatch,
    s: &Series,
    tool: Tool,
    day: usize,
    look_back: usize,
    m: MissingBar,
) -> StageError {
    let date = s.dates[m.row];
    let row = (|| -> Option<usize> {
        let t = batch
            .column_by_name("ticker")?
            .as_any()
            .downcast_ref::<StringArray>()?;
        let d = batch
            .column_by_name("date")?
            .as_any()
            .downcast_ref::<Date32Array>()?;
        (0..batch.num_rows()).find(|&i| {
            !t.is_null(i) && !d.is_null(i) && t.value(i) == s.ticker && d.value(i) == date
        })
    })();
    StageError::Input {
        input: "bars".into(),
        message: format!(
            "row {}: column '{}' of {} on {} is null, and tool {} reads high and low of the \
             {} bars up to {} (choose tools that read close only, or bars with high/low)",
            row.map_or_else(|| "?".to_string(), |r| (r + 1).to_string()),
            m.column,
            s.ticker,
            from_days(date),
            tool.name(),
            look_back + 1,
            from_days(s.dates[day]),
        ),
    }
}

/// Signals over the signal window and records over the train window, for one ticker.
pub fn run_ticker(
    cfg: &ToolsConfig,
    s: &Series,
    batch: &RecordBatch,
) -> StageResult<(Vec<SignalRows>, Vec<RecordRow>)> {
    let bars = bars_of(s);
    let train = s.range(cfg.train.0, cfg.train.1);
    let signal = s.range(cfg.signal.0, cfg.signal.1);
    for (name, r) in [("train_start..train_end", &train), ("start..end", &signal)] {
        if r.is_empty() {
            return Err(StageError::Invalid(format!(
                "ticker {}: no rows in {name}; choose dates the data covers",
                s.ticker
            )));
        }
    }
    let params = cfg.overrides.for_ticker(&s.ticker);
    let settings = cfg.settings(&s.ticker);
    let err = |tool: Tool, m: MissingBar, range: &std::ops::Range<usize>| {
        // The first day of `range` whose window holds the missing row.
        let day = (range.start..range.end)
            .find(|&t| ft::window_rows(t, cfg.look_back).contains(&m.row))
            .unwrap_or(range.start);
        missing_bar(batch, s, tool, day, cfg.look_back, m)
    };
    let mut records = Vec::new();
    let tools: Vec<Option<Tool>> = std::iter::once(None)
        .chain(cfg.tools.iter().map(|&t| Some(t)))
        .collect();
    for tool in tools {
        let run = match tool {
            Some(t) => ft::run_tool(tool, &params, &bars, train.clone(), &settings)
                .map_err(|m| err(t, m, &train))?,
            // Buy-and-hold reads no bar but the closes: it cannot miss one.
            None => ft::run_tool(None, &params, &bars, train.clone(), &settings)
                .unwrap_or_else(|_| unreachable!("buy-and-hold reads close only")),
        };
        records.push(RecordRow {
            ticker: s.ticker.clone(),
            tool,
            params: tool.map_or_else(|| "{}".to_string(), |t| params.to_json(t).to_string()),
            first_date: s.dates[train.start],
            last_date: s.dates[train.end - 1],
            periods_per_year: cfg.periods.for_ticker(&s.ticker),
            record: run.record,
            trades: run.steps.iter().filter(|x| x.traded).count(),
        });
    }
    let mut signals = Vec::new();
    for &tool in &cfg.tools {
        let days = ft::signals(tool, &params, &bars, signal.clone(), cfg.look_back)
            .map_err(|m| err(tool, m, &signal))?;
        let sig: Vec<ToolSignal> = days.iter().map(|d| d.0).collect();
        let price = bars.trade_prices(signal.clone());
        let steps = ft::record::run(&price, &sig, cfg.initial_capital, cfg.cost);
        signals.push(SignalRows {
            ticker: s.ticker.clone(),
            tool,
            params: params.to_json(tool).to_string(),
            dates: s.dates[signal.clone()].to_vec(),
            close: bars.close[signal.clone()].to_vec(),
            price,
            days,
            steps,
        });
    }
    Ok((signals, records))
}

fn tool_params_spec() -> ParamSpec {
    ParamSpec::with_default(
        "tool_params",
        ParamKind::Any,
        json!({}),
        "Parameters by FinAgent's names: {default: {macd: {short_window: 7}}, AAPL: {kdj_rsi: \
         {ilong: 7, isig: 3, rsiOverbought: 72, rsiOversold: 45}}}; a ticker's override the \
         defaults'; the code defaults otherwise",
    )
}

impl Stage for FinAgentTools {
    fn kind(&self) -> &'static str {
        "finagent_tools"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        ToolsConfig::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        let all: Vec<_> = Tool::ALL.iter().map(|t| t.name()).collect();
        StageSpec {
            doc: "FinAgent's four rule-strategy tools (MACD, KDJ & RSI, Stochastic + Bollinger, \
                  mean reversion) as its released code defines them: daily signals with the \
                  indicator values, and ARR/SR/MDD records next to buy-and-hold's. \
                  Rules: stages/trading/src/finagent_tools/mod.rs.",
            inputs: vec![InputSpec::one(
                "bars",
                "ohlcv",
                "Daily bars: close for every tool, high and low for kdj_rsi and \
                 stochastic_bollinger, adj_close (where present) as the traded price; include \
                 the 14 trading days before start and train_start (the rules' window)",
            )],
            outputs: vec![
                OutputSpec::parquet(
                    "signals",
                    "finagent_tool_signals",
                    "Each tool's signal and indicators per ticker and day of start..end",
                ),
                OutputSpec::parquet(
                    "records",
                    "finagent_tool_records",
                    "ARR, SR, MDD per ticker and tool (and buy_and_hold) over train_start..train_end",
                ),
            ],
            params: vec![
                ParamSpec::required(
                    "train_start",
                    ParamKind::Date,
                    "First day of the records' window",
                ),
                ParamSpec::required(
                    "train_end",
                    ParamKind::Date,
                    "Last day of the records' window (inclusive: FinAgent's end_date is the \
                     day after, never traded)",
                ),
                ParamSpec::required("start", ParamKind::Date, "First day of the signals"),
                ParamSpec::required("end", ParamKind::Date, "Last day of the signals"),
                ParamSpec::with_default("tools", ParamKind::List, json!(all), "Tools to run"),
                tool_params_spec(),
                ParamSpec::with_default(
                    "initial_capital",
                    ParamKind::Float,
                    json!(10000.0),
                    "Cash at the start of each run (FinAgent: 10,000; whole shares)",
                ),
                ParamSpec::with_default(
                    "cost",
                    ParamKind::Float,
                    json!(0.001),
                    "Transaction cost rate (0.001 = 0.1 %)",
                ),
                ParamSpec::with_default(
                    "periods_per_year",
                    ParamKind::Any,
                    json!(252),
                    "C in ARR: a number or {default: 252, ETH: 365} (FinAgent: 252 for all)",
                ),
                ParamSpec::with_default(
                    "look_back_days",
                    ParamKind::Int,
                    json!(ft::LOOK_BACK_DAYS),
                    "Bars before day t the rule sees (FinAgent: 14, a 15-bar window)",
                ),
            ],
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(format!("{VERSION}/finagent_tools-1"))
    }
}

impl flag_core::RunStage for FinAgentTools {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let cfg = ToolsConfig::from_params(&ctx.params)?;
        let batch = ctx.read_input("bars")?;
        // high/low are read (nullable) and checked only where a rule uses them.
        let series = read_series(&batch, "bars", &["high", "low", "adj_close"])?;
        let (mut signals, mut records) = (Vec::new(), Vec::new());
        for (i, s) in series.iter().enumerate() {
            ctx.progress(i as u64, series.len() as u64, &s.ticker);
            let (a, b) = run_ticker(&cfg, s, &batch)?;
            signals.extend(a);
            records.extend(b);
        }
        ctx.progress(series.len() as u64, series.len() as u64, "done");
        let sig = signals_batch(&signals)?;
        let rec = records_batch(&records)?;
        ctx.log(format!(
            "{} tickers, {} tools, {} signal rows, {} records",
            series.len(),
            cfg.tools.len(),
            sig.num_rows(),
            rec.num_rows()
        ));
        ctx.write_parquet("signals", &[sig])?;
        ctx.write_parquet("records", &[rec])?;
        Ok(())
    }
}

fn signals_batch(rows: &[SignalRows]) -> StageResult<RecordBatch> {
    let each = || {
        rows.iter()
            .flat_map(|r| (0..r.dates.len()).map(move |i| (r, i)))
    };
    let n = each().count();
    let ind = |k: usize| -> flag_core::arrow::array::ArrayRef {
        std::sync::Arc::new(flag_core::arrow::array::Float64Array::from(
            each()
                .map(|(r, i)| r.days[i].1.columns()[k].1)
                .collect::<Vec<_>>(),
        ))
    };
    let mut cols = vec![
        utf8(each().map(|(r, _)| r.ticker.as_str())),
        utf8(each().map(|(r, _)| r.tool.name())),
        date32(each().map(|(r, i)| r.dates[i]).collect()),
        utf8(each().map(|(r, i)| r.days[i].0.as_str())),
        float64(each().map(|(r, i)| r.close[i]).collect()),
        float64(each().map(|(r, i)| r.price[i]).collect()),
    ];
    cols.extend((0..Indicators::default().columns().len()).map(ind));
    cols.extend([
        float64(each().map(|(r, i)| r.steps[i].shares).collect()),
        float64(each().map(|(r, i)| r.steps[i].cash).collect()),
        float64(each().map(|(r, i)| r.steps[i].value).collect()),
        utf8(each().map(|(r, _)| r.params.as_str())),
    ]);
    debug_assert_eq!(cols[0].len(), n);
    flag_core::schema::schema("finagent_tool_signals")?.batch(cols)
}

fn records_batch(rows: &[RecordRow]) -> StageResult<RecordBatch> {
    let name = |r: &RecordRow| r.tool.map_or("buy_and_hold", |t| t.name());
    flag_core::schema::schema("finagent_tool_records")?.batch(vec![
        utf8(rows.iter().map(|r| r.ticker.as_str())),
        utf8(rows.iter().map(name)),
        utf8(rows.iter().map(|r| r.params.as_str())),
        date32(rows.iter().map(|r| r.first_date).collect()),
        date32(rows.iter().map(|r| r.last_date).collect()),
        int64(rows.iter().map(|r| r.record.days as i64).collect()),
        int64(rows.iter().map(|r| r.periods_per_year).collect()),
        float64(rows.iter().map(|r| r.record.arr).collect()),
        float64(rows.iter().map(|r| r.record.sr).collect()),
        float64(rows.iter().map(|r| r.record.mdd).collect()),
        float64(rows.iter().map(|r| r.record.vol).collect()),
        float64(rows.iter().map(|r| r.record.total_return).collect()),
        int64(rows.iter().map(|r| r.trades as i64).collect()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finagent_tools::ToolParams;
    use serde_json::Value;
    use std::collections::BTreeMap;

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

    fn dates() -> Value {
        json!({"train_start": "2022-06-01", "train_end": "2023-05-31",
               "start": "2023-06-01", "end": "2023-12-29"})
    }

    #[test]
    fn config_defaults_are_finagents() {
        let c = ToolsConfig::from_params(&params(dates())).unwrap();
        assert_eq!(c.tools, Tool::ALL.to_vec());
        assert_eq!(
            (c.initial_capital, c.cost, c.look_back),
            (10000.0, 0.001, 14)
        );
        assert_eq!(c.periods.for_ticker("ETH"), 252);
        assert_eq!(c.overrides.for_ticker("AAPL"), ToolParams::default());
    }

    #[test]
    fn bad_params_are_named() {
        let with = |k: &str, v: Value| {
            let mut d = dates();
            d[k] = v;
            ToolsConfig::from_params(&params(d))
                .unwrap_err()
                .to_string()
        };
        assert!(with("tools", json!(["rsi"])).starts_with("param 'tools': unknown tool 'rsi'"));
        assert!(with("cost", json!(1.5)).starts_with("param 'cost'"));
        assert!(with("initial_capital", json!(0.0)).starts_with("param 'initial_capital'"));
        assert!(with("look_back_days", json!(0)).starts_with("param 'look_back_days'"));
        assert!(with("end", json!("2023-01-01")).starts_with("param 'start'"));
        assert!(with("train_end", json!("2022-01-01")).starts_with("param 'train_start'"));
        let e = with(
            "tool_params",
            json!({"AAPL": {"macd": {"short_window": -1}}}),
        );
        assert!(
            e.starts_with("param 'tool_params': AAPL.macd.short_window"),
            "{e}"
        );
    }
}
