//! The `usage` output of the FinAgent module stages: calls, tokens and time per module, for
//! the report's cost table (schema `llm_usage`, a measured output).
use flag_core::arrow::array::RecordBatch;
use flag_core::schema::schema;
use flag_core::{OutputSpec, StageResult};

use crate::runner::CallUsage;
use crate::util;

/// One call of one module on one (ticker, day).
#[derive(Debug, Clone)]
pub struct UsageRow {
    pub ticker: String,
    pub date: i32,
    pub module: &'static str,
    pub attempts: usize,
    pub usage: CallUsage,
}

pub fn usage_output() -> OutputSpec {
    OutputSpec::measured_parquet(
        "usage",
        "llm_usage",
        "Calls, tokens and wall time per module call (measured: not compared by verify \
         --recompute)",
    )
}

/// The rows sorted by (ticker, date, module).
pub fn usage_batch(mut rows: Vec<UsageRow>) -> StageResult<RecordBatch> {
    rows.sort_by(|a, b| (&a.ticker, a.date, a.module).cmp(&(&b.ticker, b.date, b.module)));
    schema("llm_usage")?.batch(vec![
        util::utf8(rows.iter().map(|r| r.ticker.as_str())),
        util::date32(rows.iter().map(|r| r.date).collect()),
        util::utf8(rows.iter().map(|r| r.module)),
        util::int64(rows.iter().map(|r| r.attempts as i64).collect()),
        util::opt_int64(
            rows.iter()
                .map(|r| r.usage.prompt_tokens.map(|n| n as i64))
                .collect(),
        ),
        util::int64(
            rows.iter()
                .map(|r| r.usage.completion_tokens as i64)
                .collect(),
        ),
        util::float64(rows.iter().map(|r| r.usage.ms).collect()),
    ])
}
