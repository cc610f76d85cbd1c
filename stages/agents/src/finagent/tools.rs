//! FinAgent's tools block (module T): each rule strategy's signal on the decision day and its
//! train-window record (ARR, SR, MDD) next to buy-and-hold's, read from the
//! `finagent_tools` stage's two tables.
use std::collections::BTreeMap;

use flag_core::StageResult;
use flag_core::arrow::array::{Array, Date32Array, Float64Array, RecordBatch, StringArray};

use crate::util::{column, null_err};

/// A strategy's train-window record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToolRecord {
    pub arr: f64,
    pub sr: f64,
    pub mdd: f64,
}

/// Signals per (ticker, date, tool) and records per (ticker, tool).
#[derive(Debug, Clone, Default)]
pub struct ToolBoard {
    signals: BTreeMap<(String, i32), Vec<(String, String)>>,
    records: BTreeMap<(String, String), ToolRecord>,
}

const BUY_AND_HOLD: &str = "buy_and_hold";

impl ToolBoard {
    /// A board from signals per (ticker, date): [(tool, signal)] and records per (ticker, tool).
    pub fn from_parts(
        signals: BTreeMap<(String, i32), Vec<(String, String)>>,
        records: BTreeMap<(String, String), ToolRecord>,
    ) -> Self {
        ToolBoard { signals, records }
    }

    pub fn read(signals: &RecordBatch, records: &RecordBatch) -> StageResult<Self> {
        let mut board = ToolBoard::default();
        let (inp, rec) = ("tools", "tool_records");
        let ticker = column::<StringArray>(signals, inp, "ticker", "utf8")?;
        let date = column::<Date32Array>(signals, inp, "date", "date32")?;
        let tool = column::<StringArray>(signals, inp, "tool", "utf8")?;
        let signal = column::<StringArray>(signals, inp, "signal", "utf8")?;
        for i in 0..signals.num_rows() {
            for (null, name) in [
                (ticker.is_null(i), "ticker"),
                (date.is_null(i), "date"),
                (tool.is_null(i), "tool"),
                (signal.is_null(i), "signal"),
            ] {
                if null {
                    return Err(null_err(inp, i, name));
                }
            }
            board
                .signals
                .entry((ticker.value(i).to_string(), date.value(i)))
                .or_default()
                .push((tool.value(i).to_string(), signal.value(i).to_string()));
        }
        let ticker = column::<StringArray>(records, rec, "ticker", "utf8")?;
        let tool = column::<StringArray>(records, rec, "tool", "utf8")?;
        let arr = column::<Float64Array>(records, rec, "arr", "float64")?;
        let sr = column::<Float64Array>(records, rec, "sr", "float64")?;
        let mdd = column::<Float64Array>(records, rec, "mdd", "float64")?;
        for i in 0..records.num_rows() {
            if ticker.is_null(i) || tool.is_null(i) {
                return Err(null_err(rec, i, "ticker/tool"));
            }
            let value = |a: &Float64Array| if a.is_null(i) { f64::NAN } else { a.value(i) };
            board.records.insert(
                (ticker.value(i).to_string(), tool.value(i).to_string()),
                ToolRecord {
                    arr: value(arr),
                    sr: value(sr),
                    mdd: value(mdd),
                },
            );
        }
        Ok(board)
    }

    fn record_text(&self, ticker: &str, tool: &str) -> String {
        match self.records.get(&(ticker.to_string(), tool.to_string())) {
            Some(r) => format!(
                "train ARR {:.2}%, SR {:.2}, MDD {:.2}%",
                r.arr * 100.0,
                r.sr,
                r.mdd * 100.0
            ),
            None => "no train record".to_string(),
        }
    }

    /// The block the decision prompt shows for `ticker` on `date`.
    pub fn text(&self, ticker: &str, date: i32) -> String {
        let mut t =
            String::from("Rule-strategy tools (today's signal; record over the train window):");
        match self.signals.get(&(ticker.to_string(), date)) {
            Some(v) => {
                for (tool, signal) in v {
                    t.push_str(&format!(
                        "\n- {tool}: {signal} ({})",
                        self.record_text(ticker, tool)
                    ));
                }
            }
            None => t.push_str("\n- no signals today"),
        }
        t.push_str(&format!(
            "\n- buy and hold for comparison: {}",
            self.record_text(ticker, BUY_AND_HOLD)
        ));
        t
    }
}
