//! The `finagent` stage's output rows: decisions (with the high-level reflection of the day)
//! and the reflections retrieved.
use flag_core::StageResult;
use flag_core::arrow::array::RecordBatch;
use flag_core::schema::schema;

use super::agent_config::AgentConfig;
use super::answer::{Action, Decision, HighReflection};
use super::memory_view::Retrieved;
use crate::runner::Outcome;
use crate::util;

/// One output row of the decisions table.
pub struct DecisionRow {
    pub ticker: String,
    pub date: i32,
    pub action: Action,
    pub traded: bool,
    pub decision: Outcome<Decision>,
    pub prompt: String,
    pub high: Option<(String, Outcome<HighReflection>)>,
}

/// One retrieval of the run (memory_hits rows).
pub struct RetrievalRow {
    pub ticker: String,
    pub date: i32,
    pub query_type: &'static str,
    pub query: String,
    pub hit: Retrieved,
}

pub fn decisions_batch(cfg: &AgentConfig, rows: &[DecisionRow]) -> StageResult<RecordBatch> {
    let n = rows.len();
    let dec = |f: &dyn Fn(&Decision) -> String| {
        util::opt_utf8(
            rows.iter()
                .map(|r| r.decision.value.as_ref().map(f))
                .collect(),
        )
    };
    let high = |f: &dyn Fn(&HighReflection) -> String| {
        util::opt_utf8(
            rows.iter()
                .map(|r| r.high.as_ref().and_then(|(_, o)| o.value.as_ref()).map(f))
                .collect(),
        )
    };
    let verdicts: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.high
                .as_ref()
                .and_then(|(_, o)| o.value.as_ref())
                .map(|h| {
                    h.verdicts
                        .iter()
                        .map(|v| format!("{v:?}").to_uppercase())
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    let letters = cfg.modules.letters();
    schema("finagent_decisions")?.batch(vec![
        util::utf8(std::iter::repeat_n(cfg.strategy.as_str(), n)),
        util::utf8(std::iter::repeat_n(letters.as_str(), n)),
        util::utf8(rows.iter().map(|r| r.ticker.as_str())),
        util::date32(rows.iter().map(|r| r.date).collect()),
        util::utf8(rows.iter().map(|r| r.action.as_str())),
        util::boolean(rows.iter().map(|r| r.traded).collect()),
        dec(&|d| d.analysis.clone()),
        dec(&|d| d.reasoning.clone()),
        util::utf8(rows.iter().map(|r| r.prompt.as_str())),
        util::int64(rows.iter().map(|r| r.decision.attempts as i64).collect()),
        util::boolean(rows.iter().map(|r| r.decision.value.is_none()).collect()),
        util::opt_utf8(rows.iter().map(|r| r.decision.error.clone()).collect()),
        util::utf8(rows.iter().map(|r| r.decision.raw_text.as_str())),
        util::boolean(rows.iter().map(|r| r.high.is_some()).collect()),
        util::list_utf8(&verdicts),
        high(&|h| h.summary.clone()),
        high(&|h| h.improvement.clone()),
        util::opt_utf8(
            rows.iter()
                .map(|r| r.high.as_ref().map(|(p, _)| p.clone()))
                .collect(),
        ),
        util::int64(
            rows.iter()
                .map(|r| r.high.as_ref().map_or(0, |(_, o)| o.attempts as i64))
                .collect(),
        ),
        util::boolean(
            rows.iter()
                .map(|r| r.high.as_ref().is_some_and(|(_, o)| o.value.is_none()))
                .collect(),
        ),
        util::opt_utf8(
            rows.iter()
                .map(|r| r.high.as_ref().map(|(_, o)| o.raw_text.clone()))
                .collect(),
        ),
    ])
}

pub fn retrievals_batch(rows: &[RetrievalRow]) -> StageResult<RecordBatch> {
    schema("memory_hits")?.batch(vec![
        util::utf8(rows.iter().map(|r| r.ticker.as_str())),
        util::date32(rows.iter().map(|r| r.date).collect()),
        util::utf8(rows.iter().map(|r| r.query_type)),
        util::utf8(rows.iter().map(|r| r.query.as_str())),
        util::int64(rows.iter().map(|r| r.hit.rank as i64).collect()),
        util::utf8(rows.iter().map(|r| r.hit.id.as_str())),
        util::date32(rows.iter().map(|r| r.hit.date).collect()),
        util::float64(rows.iter().map(|r| r.hit.score).collect()),
        util::boolean(vec![true; rows.len()]),
    ])
}
