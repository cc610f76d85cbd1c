//! The `finagent` stage's params: which modules are on (the ablation), the environment and
//! the reflection memory sizes.
use flag_core::{ParamKind, ParamSpec, Params, StageError, StageResult};
use serde_json::{Value, json};

use super::config::{ModuleConfig, chart_images_param, module_param_specs, positive};

/// Which modules feed the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modules {
    pub market: bool,
    pub low: bool,
    pub high: bool,
    pub tools: bool,
}

impl Modules {
    /// Parses letters of M, L, H, T (each at most once, at least one).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut m = Modules {
            market: false,
            low: false,
            high: false,
            tools: false,
        };
        for c in s.chars() {
            let slot = match c {
                'M' => &mut m.market,
                'L' => &mut m.low,
                'H' => &mut m.high,
                'T' => &mut m.tools,
                _ => return Err(format!("'{c}' is not a module (M, L, H or T)")),
            };
            if *slot {
                return Err(format!("'{c}' is given twice"));
            }
            *slot = true;
        }
        if s.is_empty() {
            return Err("at least one of M, L, H, T".into());
        }
        Ok(m)
    }

    pub fn letters(self) -> String {
        [
            (self.market, 'M'),
            (self.low, 'L'),
            (self.high, 'H'),
            (self.tools, 'T'),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, c)| *c)
        .collect()
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub module: ModuleConfig,
    pub modules: Modules,
    pub strategy: String,
    pub high_prompt: String,
    pub preference: String,
    pub initial_capital: f64,
    pub cost: f64,
    pub history: usize,
    pub top_k: usize,
}

impl AgentConfig {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let module = ModuleConfig::from_params(p, "decision")?;
        let letters = p.str("modules")?;
        let modules = Modules::parse(&letters).map_err(|e| StageError::param("modules", e))?;
        let strategy = p
            .opt_str("strategy")?
            .unwrap_or_else(|| format!("finagent_{}", modules.letters()));
        let high_prompt = p.str("high_prompt")?;
        if !crate::prompt::valid_name(&high_prompt) {
            return Err(StageError::param("high_prompt", "is not a prompt name"));
        }
        let initial_capital = p.capital("initial_capital")?;
        let cost = p.f64("cost")?;
        if !(0.0..0.5).contains(&cost) {
            return Err(StageError::param("cost", "must be in [0, 0.5)"));
        }
        let history = positive(p, "history")?;
        if history > 14 {
            return Err(StageError::param(
                "history",
                "at most 14 (the high-level answer schema's verdict list)",
            ));
        }
        Ok(AgentConfig {
            module,
            modules,
            strategy,
            high_prompt,
            preference: p.str("preference")?,
            initial_capital,
            cost,
            history,
            top_k: positive(p, "top_k")?,
        })
    }
}

pub fn agent_params() -> Vec<ParamSpec> {
    // The longest high-level answer the schema allows, spelt one token per character (a looping
    // small model does): two 200-character texts, an 80-character query, 14 verdicts, JSON.
    let mut v = module_param_specs("decision", 640);
    v.push(chart_images_param());
    v.extend([
        ParamSpec::with_default(
            "modules",
            ParamKind::Str,
            json!("MLHT"),
            "Modules feeding the decision: letters of M, L, H, T (the paper's ablations: T, M, ML, MLH, MLHT)",
        ),
        ParamSpec::with_default(
            "strategy",
            ParamKind::Str,
            Value::Null,
            "Strategy name in equity/trades (default finagent_<modules>)",
        ),
        ParamSpec::with_default(
            "high_prompt",
            ParamKind::Str,
            json!("high_reflection"),
            "High-level reflection prompt: prompts/finagent/<high_prompt>.txt",
        ),
        ParamSpec::with_default(
            "preference",
            ParamKind::Str,
            json!("Balanced: seek returns, avoid large drawdowns, trade only on clear evidence."),
            "Trader preference shown to the decision module",
        ),
        ParamSpec::with_default(
            "initial_capital",
            ParamKind::Float,
            json!(10_000.0),
            "Starting cash (paper: 1e4 stocks, 1e5 ETH)",
        ),
        ParamSpec::with_default(
            "cost",
            ParamKind::Float,
            json!(0.001),
            "Proportional transaction cost (paper: 1e-3 stocks, 1.5e-4 ETH)",
        ),
        ParamSpec::with_default(
            "history",
            ParamKind::Int,
            json!(14),
            "Earlier decisions the high-level reflection reviews (at most 14)",
        ),
        ParamSpec::with_default(
            "top_k",
            ParamKind::Int,
            json!(5),
            "Earlier reflections retrieved per module and day",
        ),
    ]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_parse_and_name() {
        let m = Modules::parse("MLHT").unwrap();
        assert!(m.market && m.low && m.high && m.tools);
        assert_eq!(Modules::parse("TM").unwrap().letters(), "MT");
        assert!(Modules::parse("").is_err());
        assert!(Modules::parse("MM").unwrap_err().contains("twice"));
        assert!(Modules::parse("X").unwrap_err().contains("not a module"));
    }
}
