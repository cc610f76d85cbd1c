//! `finagent`: the part of FinAgent that depends on its own decisions, stepped day by day and
//! batched across tickers per day: high-level reflection (H) over the last decisions, then
//! the decision (D) from the trader preference and the blocks of the modules that are on,
//! executed in the FinAgent environment at the day's close.
//!
//! Ablations (paper Table 5) are the `modules` param: any of M (latest + past market
//! intelligence), L (low-level reflection + 5 retrieved earlier ones), H (high-level
//! reflection + 5 retrieved earlier ones), T (the four rule-strategy tools). A module that
//! is off removes exactly its prompt block, and for H its model call; the upstream stages
//! are the same for every ablation, so their cache keys are shared.
use std::collections::{BTreeMap, BTreeSet};

use flag_core::{
    Fingerprint, InputSpec, OutputSpec, Params, Stage, StageContext, StageError, StageResult,
    StageSpec,
};
use flag_llm::backend::LlmBackend;
use flag_trading::env::StepOutcome;
use flag_trading::env::finagent::{FinAgentAction, FinAgentConfig, FinAgentEnv};
use flag_trading::series::{Series, from_days};
use serde_json::Value;

use super::agent_config::{AgentConfig, agent_params};
use super::agent_state::{AgentState, STATE_FORMAT, TickerState};
use super::agent_tables::{DecisionRow, RetrievalRow, decisions_batch, retrievals_batch};
use super::agent_text::{PastDecision, decisions_text, high_text, position_text, retrieved_text};
use super::answer::{Action, HighReflection, parse_decision, parse_high_reflection};
use super::chart_png::trading_png;
use super::config::{AGENT, module_files, read_module_prompts};
use super::data::{ModuleRow, read_bars, read_module_rows};
use super::memory_view::{ReflectionMemory, Retrieved, embed_all};
use super::module::{Call, ModuleForm, run_module};
use super::reflect::intel_text;
use super::text::{ChartDecision, trading_chart_text};
use super::tools::ToolBoard;
use super::usage::{UsageRow, usage_batch, usage_output};
use crate::prompt::{prompt_path, render, schema_path};
use crate::runner::Outcome;

const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/finagent-agent-1"
);

/// Per-ticker state of the run.
struct TickerRun<'a> {
    series: &'a Series,
    env: FinAgentEnv,
    history: Vec<PastDecision>,
    dates: Vec<i32>,
    prices: Vec<f64>,
    steps: Vec<StepOutcome>,
}

fn to_env(a: Action) -> FinAgentAction {
    match a {
        Action::Buy => FinAgentAction::Buy,
        Action::Sell => FinAgentAction::Sell,
        Action::Hold => FinAgentAction::Hold,
    }
}

/// The upstream tables a run reads (each filled when its module is on).
#[derive(Default)]
pub struct Upstream {
    pub latest: BTreeMap<(String, i32), ModuleRow>,
    pub past: BTreeMap<(String, i32), ModuleRow>,
    /// Low-level reflection texts.
    pub low: BTreeMap<(String, i32), ModuleRow>,
    /// (ticker, date) -> (low-level query, its embedding).
    pub low_queries: BTreeMap<(String, i32), (String, Vec<f32>)>,
    /// Earlier low-level reflections keyed by their query embeddings.
    pub low_memory: ReflectionMemory,
    pub tools: Option<ToolBoard>,
}

fn read_upstream(
    ctx: &StageContext,
    cfg: &AgentConfig,
    backend: &dyn LlmBackend,
) -> StageResult<Upstream> {
    let need = |name: &str, module: char| -> StageResult<()> {
        if ctx.has_input(name) {
            Ok(())
        } else {
            Err(StageError::param(
                "modules",
                format!("module {module} needs input '{name}'"),
            ))
        }
    };
    let mut up = Upstream::default();
    if cfg.modules.market || cfg.modules.high {
        need("latest", 'M')?;
        need("past", 'M')?;
        up.latest = read_module_rows(&ctx.read_input("latest")?, "latest", "summary")?;
        up.past = read_module_rows(&ctx.read_input("past")?, "past", "summary")?;
    }
    if cfg.modules.low || cfg.modules.high {
        need("low", 'L')?;
        let batch = ctx.read_input("low")?;
        up.low = read_module_rows(&batch, "low", "reflection")?;
        let queries = read_module_rows(&batch, "low", "query")?;
        let keyed: Vec<((String, i32), String)> = queries
            .into_iter()
            .filter_map(|(k, r)| r.text.map(|t| (k, t)))
            .collect();
        if cfg.modules.low && !keyed.is_empty() {
            let texts: Vec<String> = keyed.iter().map(|(_, q)| q.clone()).collect();
            let vecs = embed_all(backend, &texts)?;
            for ((key, q), v) in keyed.into_iter().zip(vecs) {
                if let Some(text) = up.low.get(&key).and_then(|r| r.text.clone()) {
                    let id = format!("L:{}:{}", key.0, from_days(key.1));
                    up.low_memory.add(&key.0, key.1, id, text, v.clone());
                }
                up.low_queries.insert(key, (q, v));
            }
            up.low_memory.build()?;
        }
    }
    if cfg.modules.tools {
        need("tools", 'T')?;
        need("tool_records", 'T')?;
        up.tools = Some(ToolBoard::read(
            &ctx.read_input("tools")?,
            &ctx.read_input("tool_records")?,
        )?);
    }
    Ok(up)
}

pub struct FinAgentStage;

impl Stage for FinAgentStage {
    fn kind(&self) -> &'static str {
        "finagent"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        AgentConfig::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "FinAgent agent: day by day, high-level reflection on its own recent decisions, then \
                  BUY/SELL/HOLD with reasoning from the modules that are on (ablations), executed in the \
                  FinAgent environment.",
            inputs: vec![
                InputSpec::one("bars", "ohlcv", "Daily bars: decision days and closes"),
                InputSpec::one(
                    "latest",
                    "finagent_intel",
                    "Latest market intelligence (M, H)",
                )
                .optional(),
                InputSpec::one("past", "finagent_intel", "Past market intelligence (M, H)")
                    .optional(),
                InputSpec::one(
                    "low",
                    "finagent_low_reflection",
                    "Low-level reflections (L, H)",
                )
                .optional(),
                InputSpec::one(
                    "tools",
                    "finagent_tool_signals",
                    "Rule-strategy signals (T)",
                )
                .optional(),
                InputSpec::one(
                    "tool_records",
                    "finagent_tool_records",
                    "Rule-strategy train records (T)",
                )
                .optional(),
                InputSpec {
                    name: "resume",
                    schema: None,
                    required: false,
                    many: false,
                    doc: "The `state` of the previous segment of the same run (monthly chaining)",
                },
            ],
            outputs: vec![
                OutputSpec::parquet("equity", "equity", "Daily portfolio path"),
                OutputSpec::parquet("trades", "trades", "Executed trades"),
                OutputSpec::parquet(
                    "decisions",
                    "finagent_decisions",
                    "Every decision with its reasoning",
                ),
                OutputSpec::parquet(
                    "retrievals",
                    "memory_hits",
                    "Earlier reflections retrieved each day",
                ),
                OutputSpec::file(
                    "state",
                    "json",
                    "Where the run stands after its last day: the next segment's `resume`",
                ),
                usage_output(),
            ],
            params: agent_params(),
        }
    }

    fn fingerprint(&self, params: &Params) -> Fingerprint {
        let mut f = Fingerprint::new(VERSION);
        // The decision prompt, its schema and the retry note, as every module stage; then the
        // high-level reflection's prompt and schema.
        f.files = module_files(params, "decision");
        let high = params
            .opt_str("high_prompt")
            .ok()
            .flatten()
            .unwrap_or_else(|| "high_reflection".into());
        if crate::prompt::valid_name(&high) {
            f.files.push(prompt_path(AGENT, &high));
            f.files.push(schema_path(AGENT, &high));
        }
        f
    }

    super::config::llm_stage_environment!();
}

impl flag_core::RunStage for FinAgentStage {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let cfg = AgentConfig::from_params(&ctx.params)?;
        let (d_template, d_schema, retry) = cfg.module.read_prompts(ctx)?;
        let (h_template, h_schema, _) = read_module_prompts(ctx, &cfg.high_prompt)?;
        let bars = read_bars(&ctx.read_input("bars")?, "bars")?;
        let backend = cfg.module.llm.load_backend()?;
        let up = read_upstream(ctx, &cfg, backend.as_ref())?;
        let prompts = AgentPrompts {
            decision: (&d_template, &d_schema),
            high: (&h_template, &h_schema),
            retry: &retry,
        };
        let progress = |d: u64, t: u64| ctx.progress(d, t, "days");
        let resume = if ctx.has_input("resume") {
            let input = ctx.input("resume")?;
            let file = input.files.first().ok_or_else(|| StageError::Input {
                input: "resume".into(),
                message: "the artifact has no file".into(),
            })?;
            let bytes =
                std::fs::read(file).map_err(|e| StageError::io(file.display().to_string(), e))?;
            Some(AgentState::parse(&bytes, &file.display().to_string())?)
        } else {
            None
        };
        let out = run_agent(
            &cfg,
            &bars,
            &up,
            backend.as_ref(),
            &prompts,
            resume.as_ref(),
            &progress,
        )?;
        let failed = out
            .decisions
            .iter()
            .filter(|r| r.decision.value.is_none())
            .count();
        ctx.log(format!(
            "{} decisions ({}), {failed} failed",
            out.decisions.len(),
            cfg.modules.letters()
        ));
        ctx.write_parquet("usage", &[usage_batch(out.usage())?])?;
        let paths: Vec<crate::llm_only::TickerPath> = out.paths;
        let (equity, trades) = crate::llm_only::batches(&cfg.strategy, "finagent", "test", &paths)?;
        ctx.write_parquet("equity", &[equity])?;
        ctx.write_parquet("trades", &[trades])?;
        let d = decisions_batch(&cfg, &out.decisions)?;
        ctx.write_parquet("decisions", &[d])?;
        let r = retrievals_batch(&out.retrievals)?;
        ctx.write_parquet("retrievals", &[r])?;
        let state = serde_json::to_vec_pretty(&out.state)
            .map_err(|e| StageError::Invalid(format!("serialising the state: {e}")))?;
        ctx.write_file("state", &state)?;
        Ok(())
    }
}

/// What a run produced.
pub struct RunOutput {
    pub paths: Vec<crate::llm_only::TickerPath>,
    /// Where the run stands after its last day (the next segment's `resume`).
    pub state: AgentState,
    decisions: Vec<DecisionRow>,
    retrievals: Vec<RetrievalRow>,
}

impl RunOutput {
    /// (ticker, date, decision prompt, high-level prompt if called) of every decision.
    pub fn prompts(&self) -> Vec<(String, i32, String, Option<String>)> {
        self.decisions
            .iter()
            .map(|d| {
                (
                    d.ticker.clone(),
                    d.date,
                    d.prompt.clone(),
                    d.high.as_ref().map(|h| h.0.clone()),
                )
            })
            .collect()
    }

    /// Actions in (ticker, date) order, failures as HOLD.
    pub fn actions(&self) -> Vec<&'static str> {
        self.decisions.iter().map(|d| d.action.as_str()).collect()
    }

    /// The `usage` rows: one per high-level reflection and per decision call.
    pub fn usage(&self) -> Vec<UsageRow> {
        let mut rows = Vec::new();
        for d in &self.decisions {
            if let Some((_, h)) = &d.high {
                rows.push(UsageRow {
                    ticker: d.ticker.clone(),
                    date: d.date,
                    module: "high_reflection",
                    attempts: h.attempts,
                    usage: h.usage,
                });
            }
            rows.push(UsageRow {
                ticker: d.ticker.clone(),
                date: d.date,
                module: "decision",
                attempts: d.decision.attempts,
                usage: d.decision.usage,
            });
        }
        rows
    }

    pub fn failures(&self) -> usize {
        self.decisions
            .iter()
            .filter(|d| d.decision.value.is_none())
            .count()
    }
}

/// The agent's prompt templates and answer schemas, and the retry note.
pub struct AgentPrompts<'a> {
    pub decision: (&'a str, &'a Value),
    pub high: (&'a str, &'a Value),
    pub retry: &'a str,
}

/// Steps every wanted ticker through the decision days of `cfg`, all tickers of a day in
/// one batch per module.
pub fn run_agent(
    cfg: &AgentConfig,
    bars: &BTreeMap<String, Series>,
    up: &Upstream,
    backend: &dyn LlmBackend,
    prompts: &AgentPrompts,
    resume: Option<&AgentState>,
    progress: &dyn Fn(u64, u64),
) -> StageResult<RunOutput> {
    let (decision, high, retry) = (prompts.decision, prompts.high, prompts.retry);
    let d_file = prompt_path(AGENT, &cfg.module.prompt);
    let h_file = prompt_path(AGENT, &cfg.high_prompt);
    let retry_file = prompt_path(AGENT, "retry");
    let env_cfg = FinAgentConfig {
        initial_capital: cfg.initial_capital,
        cost: cfg.cost,
    };
    let mut runs: BTreeMap<&str, TickerRun> = BTreeMap::new();
    let mut firsts: BTreeMap<&str, (&Series, usize)> = BTreeMap::new();
    let mut days: BTreeSet<i32> = BTreeSet::new();
    for (t, s) in bars.iter().filter(|(t, _)| cfg.module.wants(t)) {
        let r = cfg.module.days(s);
        if r.is_empty() {
            continue;
        }
        firsts.insert(t.as_str(), (s, r.start));
        days.extend(s.dates[r].iter().copied());
        runs.insert(
            t.as_str(),
            TickerRun {
                series: s,
                env: FinAgentEnv::new(env_cfg),
                history: Vec::new(),
                dates: Vec::new(),
                prices: Vec::new(),
                steps: Vec::new(),
            },
        );
    }
    let mut high_memory = ReflectionMemory::new();
    if let Some(state) = resume {
        state.check(cfg, &firsts)?;
        for (t, r) in runs.iter_mut() {
            let st = &state.tickers[*t];
            r.env = FinAgentEnv::resume(env_cfg, st.cash, st.shares, st.value);
            r.history = st.history.clone();
        }
        for m in &state.high_memory {
            high_memory.add(
                &m.ticker,
                m.date,
                m.id.clone(),
                m.text.clone(),
                m.vector.clone(),
            );
        }
        high_memory.build()?;
    }
    let mut decisions = Vec::new();
    let mut retrievals = Vec::new();
    let total = days.len() as u64;
    for (n, &date) in days.iter().enumerate() {
        progress(n as u64, total);
        let active: Vec<(&str, usize)> = runs
            .iter()
            .filter_map(|(t, r)| r.series.dates.binary_search(&date).ok().map(|i| (*t, i)))
            .filter(|(t, i)| {
                let s = &runs[t].series;
                cfg.module.days(s).contains(i)
            })
            .collect();
        let key = |t: &str| (t.to_string(), date);
        let latest_past = |t: &str| {
            (
                intel_text(up.latest.get(&key(t)), "no news today."),
                intel_text(up.past.get(&key(t)), "nothing relevant in memory."),
            )
        };
        // Low-level: today's reflection and the nearest earlier ones.
        let mut low_block: BTreeMap<&str, (String, Vec<Retrieved>)> = BTreeMap::new();
        if cfg.modules.low || cfg.modules.high {
            for &(t, _) in &active {
                let own = intel_text(up.low.get(&key(t)), "(no reflection today)");
                let mut hits = Vec::new();
                if cfg.modules.low
                    && let Some((q, v)) = up.low_queries.get(&key(t))
                {
                    hits = up.low_memory.search(t, date, v, cfg.top_k)?;
                    for h in &hits {
                        retrievals.push(RetrievalRow {
                            ticker: t.to_string(),
                            date,
                            query_type: "low_reflection",
                            query: q.clone(),
                            hit: h.clone(),
                        });
                    }
                }
                low_block.insert(t, (own, hits));
            }
        }
        // High-level reflection over each ticker's last decisions.
        let mut highs: BTreeMap<&str, (String, Outcome<HighReflection>)> = BTreeMap::new();
        let mut high_hits: BTreeMap<&str, Vec<Retrieved>> = BTreeMap::new();
        if cfg.modules.high {
            let mut calls = Vec::new();
            let mut who = Vec::new();
            for &(t, i) in &active {
                let r = &runs[t];
                if r.history.is_empty() {
                    continue;
                }
                let shown = &r.history[r.history.len().saturating_sub(cfg.history)..];
                let chart: Vec<ChartDecision> = r
                    .history
                    .iter()
                    .map(|d| ChartDecision {
                        date: d.date,
                        close: d.close,
                        action: d.action.as_str(),
                        value: d.value,
                    })
                    .collect();
                let (latest, past) = latest_past(t);
                let vars: BTreeMap<&str, String> = [
                    ("asset", t.to_string()),
                    ("date", from_days(date).to_string()),
                    ("latest", latest),
                    ("past", past),
                    (
                        "low",
                        low_block.get(t).map_or_else(String::new, |b| b.0.clone()),
                    ),
                    ("chart", trading_chart_text(&chart, cfg.initial_capital)),
                    ("n_decisions", shown.len().to_string()),
                    ("decisions", decisions_text(shown, r.series.close[i])),
                ]
                .into_iter()
                .collect();
                let prompt = render(high.0, &h_file, &vars)?;
                calls.push(Call {
                    prompt,
                    list_len: shown.len(),
                    images: if cfg.module.chart_images {
                        vec![trading_png(&chart, cfg.initial_capital)?]
                    } else {
                        Vec::new()
                    },
                });
                who.push(t);
            }
            if !calls.is_empty() {
                let form = ModuleForm {
                    schema: high.1,
                    list_property: Some("verdicts"),
                    retry: (&retry_file, retry),
                };
                let outs = run_module(
                    backend,
                    &cfg.module.llm,
                    &form,
                    &calls,
                    cfg.module.batch_size,
                    parse_high_reflection,
                    &|_| {},
                )?;
                let answered: Vec<(usize, String)> = outs
                    .iter()
                    .enumerate()
                    .filter_map(|(k, o)| o.value.as_ref().map(|h| (k, h.query.clone())))
                    .collect();
                let vecs = embed_all(
                    backend,
                    &answered.iter().map(|a| a.1.clone()).collect::<Vec<_>>(),
                )?;
                let mut new_entries = Vec::new();
                for ((k, q), v) in answered.into_iter().zip(vecs) {
                    let t = who[k];
                    let hits = high_memory.search(t, date, &v, cfg.top_k)?;
                    for h in &hits {
                        retrievals.push(RetrievalRow {
                            ticker: t.to_string(),
                            date,
                            query_type: "high_reflection",
                            query: q.clone(),
                            hit: h.clone(),
                        });
                    }
                    high_hits.insert(t, hits);
                    let text = high_text(outs[k].value.as_ref().expect("answered"));
                    new_entries.push((t, text, v));
                }
                // Today's reflections enter memory only after today's retrieval.
                for (t, text, v) in new_entries {
                    let id = format!("H:{t}:{}", from_days(date));
                    high_memory.add(t, date, id, text, v);
                }
                high_memory.build()?;
                for ((t, c), o) in who.into_iter().zip(calls).zip(outs) {
                    highs.insert(t, (c.prompt, o));
                }
            }
        }
        // Decisions.
        let mut calls = Vec::new();
        for &(t, _) in &active {
            let r = &runs[t];
            // Each module on adds one paragraph; none leaves the prompt's frame as it is.
            let mut blocks: Vec<String> = Vec::new();
            if cfg.modules.market {
                let (latest, past) = latest_past(t);
                blocks.push(format!(
                    "Latest market intelligence: {latest}\nPast market intelligence: {past}"
                ));
            }
            if cfg.modules.low
                && let Some((own, hits)) = low_block.get(t)
            {
                blocks.push(format!(
                    "Price reflection today: {own}\nEarlier price reflections:\n{}",
                    retrieved_text(hits)
                ));
            }
            if cfg.modules.high {
                let own = highs
                    .get(t)
                    .and_then(|(_, o)| o.value.as_ref())
                    .map_or_else(|| "(none today)".to_string(), high_text);
                blocks.push(format!(
                    "Reflection on your recent decisions: {own}\nEarlier lessons:\n{}",
                    retrieved_text(high_hits.get(t).map_or(&[][..], Vec::as_slice))
                ));
            }
            if let Some(tools) = up.tools.as_ref().filter(|_| cfg.modules.tools) {
                blocks.push(tools.text(t, date));
            }
            let vars: BTreeMap<&str, String> = [
                ("asset", t.to_string()),
                ("date", from_days(date).to_string()),
                ("position", position_text(r.env.state())),
                ("preference", cfg.preference.clone()),
                (
                    "blocks",
                    blocks.iter().map(|b| format!("{b}\n\n")).collect(),
                ),
            ]
            .into_iter()
            .collect();
            calls.push(Call {
                prompt: render(decision.0, &d_file, &vars)?,
                list_len: 0,
                images: Vec::new(),
            });
        }
        let form = ModuleForm {
            schema: decision.1,
            list_property: None,
            retry: (&retry_file, retry),
        };
        let outs = run_module(
            backend,
            &cfg.module.llm,
            &form,
            &calls,
            cfg.module.batch_size,
            |a, _| parse_decision(a),
            &|_| {},
        )?;
        for ((&(t, i), c), o) in active.iter().zip(calls).zip(outs) {
            let action = o.value.as_ref().map_or(Action::Hold, |d| d.action);
            let r = runs.get_mut(t).expect("active ticker has a run");
            let close = r.series.close[i];
            let step = r.env.step(close, to_env(action));
            r.history.push(PastDecision {
                date,
                close,
                action,
                reasoning: o.value.as_ref().map(|d| d.reasoning.clone()),
                value: step.value,
            });
            r.dates.push(date);
            r.prices.push(close);
            let traded = step.fill.is_some();
            r.steps.push(step);
            decisions.push(DecisionRow {
                ticker: t.to_string(),
                date,
                action,
                traded,
                decision: o,
                prompt: c.prompt,
                high: highs.remove(t),
            });
        }
    }
    progress(total, total);
    decisions.sort_by(|a, b| (&a.ticker, a.date).cmp(&(&b.ticker, b.date)));
    let state = AgentState {
        format: STATE_FORMAT,
        strategy: cfg.strategy.clone(),
        modules: cfg.modules.letters(),
        initial_capital: cfg.initial_capital,
        cost: cfg.cost,
        tickers: runs
            .iter()
            .map(|(t, r)| {
                let (cash, shares, value) = r.env.state();
                let st = TickerState {
                    last_date: r.history.last().map_or(i32::MIN, |d| d.date),
                    cash,
                    shares,
                    value,
                    history: r.history.clone(),
                };
                (t.to_string(), st)
            })
            .collect(),
        high_memory: high_memory.records(),
    };
    let paths = runs
        .into_iter()
        .map(|(t, r)| (t.to_string(), r.dates, r.prices, r.steps))
        .collect();
    Ok(RunOutput {
        paths,
        decisions,
        retrievals,
        state,
    })
}
