//! Where a `finagent` run stands after its last day: per ticker the environment and the
//! decisions so far, and the high-level reflection memory. A stage writes it as its `state`
//! output (JSON) and a later segment takes it as input `resume`, so a long window can be run
//! as monthly segments, each cached, that together equal one run (floats round-trip exactly
//! through serde_json).
use std::collections::BTreeMap;

use flag_core::{StageError, StageResult};
use flag_trading::series::{Series, from_days};
use serde::{Deserialize, Serialize};

use super::agent_config::AgentConfig;
use super::agent_text::PastDecision;

/// The state file's format version.
pub const STATE_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TickerState {
    /// date32 of the last decision.
    pub last_date: i32,
    pub cash: f64,
    pub shares: f64,
    pub value: f64,
    /// Every decision so far, oldest first (the high-level reflection reads the last ones).
    pub history: Vec<PastDecision>,
}

/// One high-level reflection in memory: the text later prompts show and its query's embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRecord {
    pub ticker: String,
    pub date: i32,
    pub id: String,
    pub text: String,
    pub vector: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentState {
    pub format: u32,
    pub strategy: String,
    pub modules: String,
    pub initial_capital: f64,
    pub cost: f64,
    pub tickers: BTreeMap<String, TickerState>,
    pub high_memory: Vec<MemoryRecord>,
}

fn resume_err(message: String) -> StageError {
    StageError::Input {
        input: "resume".into(),
        message,
    }
}

impl AgentState {
    pub fn parse(bytes: &[u8], file: &str) -> StageResult<Self> {
        let s: AgentState = serde_json::from_slice(bytes).map_err(|e| {
            StageError::data(
                file,
                e.line() as u64,
                "state",
                format!("not a finagent state: {e}"),
            )
        })?;
        if s.format != STATE_FORMAT {
            return Err(resume_err(format!(
                "state format {} is not {STATE_FORMAT}",
                s.format
            )));
        }
        Ok(s)
    }

    /// Checks that this state continues a run of `cfg` whose next segment starts, for each
    /// ticker, on the trading day right after the state's last decision.
    pub fn check(
        &self,
        cfg: &AgentConfig,
        segments: &BTreeMap<&str, (&Series, usize)>,
    ) -> StageResult<()> {
        let same = |what: &str, a: String, b: String| -> StageResult<()> {
            if a == b {
                Ok(())
            } else {
                Err(resume_err(format!(
                    "the state's {what} is {a}, this segment's is {b}: not the same run"
                )))
            }
        };
        same("strategy", self.strategy.clone(), cfg.strategy.clone())?;
        same("modules", self.modules.clone(), cfg.modules.letters())?;
        same(
            "initial_capital",
            self.initial_capital.to_string(),
            cfg.initial_capital.to_string(),
        )?;
        same("cost", self.cost.to_string(), cfg.cost.to_string())?;
        let ours: Vec<&str> = segments.keys().copied().collect();
        let theirs: Vec<&str> = self.tickers.keys().map(String::as_str).collect();
        if ours != theirs {
            return Err(resume_err(format!(
                "the state holds tickers {theirs:?}, this segment trades {ours:?}"
            )));
        }
        for (t, (s, first)) in segments {
            let st = &self.tickers[*t];
            let previous = first.checked_sub(1).map(|i| s.dates[i]);
            if previous != Some(st.last_date) {
                return Err(resume_err(format!(
                    "{t}: the state ends on {}, but this segment starts on {} and the trading day \
                     before it is {}: segments must be contiguous",
                    from_days(st.last_date),
                    from_days(s.dates[*first]),
                    previous.map_or_else(|| "none".to_string(), |d| from_days(d).to_string())
                )));
            }
        }
        Ok(())
    }
}
