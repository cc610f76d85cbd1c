//! The rules' tunable parameters, by FinAgent's names, and per-ticker overrides.
use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::Tool;

/// The tunable parameters of the four rules; defaults are the released code's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToolParams {
    /// MACD `short_window` (7).
    pub macd_short_window: usize,
    /// KDJ `ilong` (9) and `isig` (3).
    pub kdj_ilong: usize,
    pub kdj_isig: usize,
    /// `rsiOverbought` (60) and `rsiOversold` (40).
    pub rsi_overbought: f64,
    pub rsi_oversold: f64,
    /// Bollinger `std_dev` (2).
    pub bb_std_dev: f64,
    /// Stochastic `overbought` (80) and `oversold` (20).
    pub stoch_overbought: f64,
    pub stoch_oversold: f64,
    /// `z_score_threshold` (1.0).
    pub z_score_threshold: f64,
}

impl Default for ToolParams {
    fn default() -> Self {
        ToolParams {
            macd_short_window: 7,
            kdj_ilong: 9,
            kdj_isig: 3,
            rsi_overbought: 60.0,
            rsi_oversold: 40.0,
            bb_std_dev: 2.0,
            stoch_overbought: 80.0,
            stoch_oversold: 20.0,
            z_score_threshold: 1.0,
        }
    }
}

impl ToolParams {
    /// The parameter names of `tool`, as FinAgent's code and `best_params.json` spell them.
    pub fn names(tool: Tool) -> &'static [&'static str] {
        match tool {
            Tool::Macd => &["short_window"],
            Tool::KdjRsi => &["ilong", "isig", "rsiOverbought", "rsiOversold"],
            Tool::StochasticBollinger => &["std_dev", "overbought", "oversold"],
            Tool::MeanReversion => &["z_score_threshold"],
        }
    }

    /// `tool`'s parameters as a JSON object (FinAgent's names).
    pub fn to_json(&self, tool: Tool) -> Value {
        match tool {
            Tool::Macd => json!({"short_window": self.macd_short_window}),
            Tool::KdjRsi => json!({
                "ilong": self.kdj_ilong,
                "isig": self.kdj_isig,
                "rsiOverbought": self.rsi_overbought,
                "rsiOversold": self.rsi_oversold,
            }),
            Tool::StochasticBollinger => json!({
                "std_dev": self.bb_std_dev,
                "overbought": self.stoch_overbought,
                "oversold": self.stoch_oversold,
            }),
            Tool::MeanReversion => json!({"z_score_threshold": self.z_score_threshold}),
        }
    }

    /// Sets `tool`'s parameters from a JSON object with FinAgent's names (e.g. a
    /// `best_params.json`); names not given keep their value. Unknown names, non-numbers,
    /// windows that are not whole numbers >= 1 and non-finite thresholds are errors naming the parameter.
    pub fn set(&mut self, tool: Tool, obj: &Map<String, Value>) -> Result<(), String> {
        for (k, v) in obj {
            let num = v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("{}.{k}: expected a number, got {v}", tool.name()))?;
            let window = || -> Result<usize, String> {
                v.as_u64()
                    .filter(|&n| (1..=10_000).contains(&n))
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        format!(
                            "{}.{k}: expected a whole number of days >= 1, got {v}",
                            tool.name()
                        )
                    })
            };
            match (tool, k.as_str()) {
                (Tool::Macd, "short_window") => self.macd_short_window = window()?,
                (Tool::KdjRsi, "ilong") => self.kdj_ilong = window()?,
                (Tool::KdjRsi, "isig") => self.kdj_isig = window()?,
                (Tool::KdjRsi, "rsiOverbought") => self.rsi_overbought = num,
                (Tool::KdjRsi, "rsiOversold") => self.rsi_oversold = num,
                (Tool::StochasticBollinger, "std_dev") => self.bb_std_dev = num,
                (Tool::StochasticBollinger, "overbought") => self.stoch_overbought = num,
                (Tool::StochasticBollinger, "oversold") => self.stoch_oversold = num,
                (Tool::MeanReversion, "z_score_threshold") => self.z_score_threshold = num,
                _ => {
                    return Err(format!(
                        "{}: unknown parameter '{k}' (known: {})",
                        tool.name(),
                        ToolParams::names(tool).join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Per-ticker parameter overrides: `{default: {tool: {param: value}}, TICKER: {...}}`
/// (a ticker's entries override the defaults', parameter by parameter).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamOverrides {
    pub by_key: BTreeMap<String, BTreeMap<Tool, Map<String, Value>>>,
}

impl ParamOverrides {
    /// Parses the JSON form above (None or `{}`: the code defaults everywhere).
    pub fn parse(v: Option<&Value>) -> Result<Self, String> {
        let mut out = ParamOverrides::default();
        let Some(v) = v else { return Ok(out) };
        let top = v.as_object().ok_or_else(|| {
            format!("expected a map {{default|TICKER: {{tool: {{param: value}}}}}}, got {v}")
        })?;
        for (key, tools) in top {
            let tools = tools
                .as_object()
                .ok_or_else(|| format!("{key}: expected a map of tools, got {tools}"))?;
            let mut m = BTreeMap::new();
            for (name, params) in tools {
                let tool = Tool::parse(name).ok_or_else(|| {
                    let all: Vec<_> = Tool::ALL.iter().map(|t| t.name()).collect();
                    format!("{key}: unknown tool '{name}' (known: {})", all.join(", "))
                })?;
                let obj = params
                    .as_object()
                    .ok_or_else(|| format!("{key}.{name}: expected a map, got {params}"))?;
                // Validate now, so a bad value fails before any work.
                ToolParams::default()
                    .set(tool, obj)
                    .map_err(|e| format!("{key}.{e}"))?;
                m.insert(tool, obj.clone());
            }
            out.by_key.insert(key.clone(), m);
        }
        Ok(out)
    }

    /// The parameters for `ticker`: code defaults, then `default`'s, then the ticker's.
    pub fn for_ticker(&self, ticker: &str) -> ToolParams {
        let mut p = ToolParams::default();
        for key in ["default", ticker] {
            if let Some(m) = self.by_key.get(key) {
                for (&tool, obj) in m {
                    // Validated in parse.
                    let _ = p.set(tool, obj);
                }
            }
        }
        p
    }
}
