//! Typed rows of the FinAgent artifacts the report reads (decisions, market intelligence,
//! low-level reflections, memory hits, tool records), each remembering its input reference.
use std::collections::BTreeMap;

use flag_core::{StageContext, StageError, StageResult};

use crate::data::{Cols, Key, fmt_date, read_all};

/// One row of `finagent_decisions` (the columns the report shows).
#[derive(Debug, Clone)]
pub struct Decision {
    pub modules: String,
    pub action: String,
    pub traded: bool,
    pub reasoning: Option<String>,
    pub prompt: String,
    pub attempts: i64,
    pub failed: bool,
    pub raw_text: String,
    pub high_called: bool,
    pub high_summary: Option<String>,
    pub high_prompt: Option<String>,
    pub high_attempts: i64,
    pub high_failed: bool,
    pub high_raw_text: Option<String>,
}

/// One row of `finagent_intel` (latest or past market intelligence).
#[derive(Debug, Clone)]
pub struct Intel {
    pub called: bool,
    pub summary: Option<String>,
    /// The latest module's short, medium and long retrieval queries (None where null).
    pub queries: [Option<String>; 3],
    pub prompt: Option<String>,
    pub attempts: i64,
    pub failed: bool,
    pub raw_text: Option<String>,
}

/// One row of `finagent_low_reflection`.
#[derive(Debug, Clone)]
pub struct Low {
    pub reflection: Option<String>,
    pub prompt: String,
    pub attempts: i64,
    pub failed: bool,
    pub raw_text: String,
}

/// One row of `memory_hits`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub ticker: String,
    pub date: i32,
    pub query_type: String,
    pub rank: i64,
    pub item_id: String,
    pub item_date: i32,
    pub score: f64,
    pub kept: bool,
}

/// One row of `finagent_tool_records`.
#[derive(Debug, Clone)]
pub struct ToolRecord {
    pub first_date: i32,
    pub last_date: i32,
    pub days: i64,
    pub arr: f64,
    pub sr: f64,
    pub mdd: f64,
    pub source: usize,
}

/// (strategy, ticker, date)
pub type DayKey = (String, String, i32);

/// Everything the report reads besides metrics, equity, trades and bars.
#[derive(Debug, Default)]
pub struct FinAgentInputs {
    /// Input references of these inputs, in binding order.
    pub sources: Vec<String>,
    /// Input name -> its references, in binding order.
    pub refs: BTreeMap<&'static str, Vec<String>>,
    pub decisions: BTreeMap<DayKey, Decision>,
    /// Whether the intel / low / hits / tool_records inputs are bound.
    pub has_intel: bool,
    pub has_low: bool,
    pub has_hits: bool,
    pub has_tools: bool,
    /// (module, ticker, date) -> row.
    pub intel: BTreeMap<(String, String, i32), Intel>,
    /// (ticker, date) -> row.
    pub low: BTreeMap<(String, i32), Low>,
    /// Per hits artifact (reference), its rows in file order.
    pub hits: Vec<(String, Vec<Hit>)>,
    /// (ticker, tool) -> record.
    pub tools: BTreeMap<(String, String), ToolRecord>,
    /// Equity key -> the first row's daily_return (initial capital = value / (1 + r)).
    pub first_return: BTreeMap<Key, f64>,
    /// Whether the usage input is bound.
    pub has_usage: bool,
    /// Module -> its calls' cost, summed over every usage artifact.
    pub usage: BTreeMap<String, Usage>,
}

/// Calls, tokens and wall time of one module (from `llm_usage` tables).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Usage {
    pub calls: u64,
    pub attempts: u64,
    /// Prompt tokens of the calls that counted them, and how many did.
    pub prompt_tokens: u64,
    pub prompt_counted: u64,
    pub completion_tokens: u64,
    pub ms: f64,
}

fn twice(input: &str, what: String, a: &str, b: &str) -> StageError {
    StageError::Input {
        input: input.into(),
        message: format!("{what} appears twice ({a} and {b})"),
    }
}

impl FinAgentInputs {
    /// The references bound to `input`, as a provenance entry.
    pub fn provenance(&self, input: &str, what: &str) -> Vec<(String, String)> {
        self.refs
            .get(input)
            .into_iter()
            .flatten()
            .map(|r| (r.clone(), what.to_string()))
            .collect()
    }

    fn bind(&mut self, input: &'static str, reference: &str) -> usize {
        self.refs
            .entry(input)
            .or_default()
            .push(reference.to_string());
        self.source(reference)
    }

    fn source(&mut self, reference: &str) -> usize {
        match self.sources.iter().position(|s| s == reference) {
            Some(i) => i,
            None => {
                self.sources.push(reference.to_string());
                self.sources.len() - 1
            }
        }
    }

    pub fn read(ctx: &StageContext) -> StageResult<FinAgentInputs> {
        let mut out = FinAgentInputs::default();
        let mut from: BTreeMap<String, String> = BTreeMap::new();
        for (reference, batch, file) in read_all(ctx, "decisions")? {
            out.bind("decisions", &reference);
            let c = Cols {
                batch: &batch,
                file,
            };
            let (strategy, modules, ticker, date) = (
                c.str("strategy")?,
                c.str("modules")?,
                c.str("ticker")?,
                c.date("date")?,
            );
            let (action, traded, reasoning, prompt) = (
                c.str("action")?,
                c.bool("traded")?,
                c.opt_str("reasoning")?,
                c.str("prompt")?,
            );
            let (attempts, failed, raw) =
                (c.i64("attempts")?, c.bool("failed")?, c.str("raw_text")?);
            let (h_called, h_summary, h_prompt) = (
                c.bool("high_called")?,
                c.opt_str("high_summary")?,
                c.opt_str("high_prompt")?,
            );
            let (h_attempts, h_failed, h_raw) = (
                c.i64("high_attempts")?,
                c.bool("high_failed")?,
                c.opt_str("high_raw_text")?,
            );
            for row in 0..batch.num_rows() {
                let key = (
                    strategy(row)?.to_string(),
                    ticker(row)?.to_string(),
                    date(row)?,
                );
                let name = format!("{} / {} / {}", key.0, key.1, fmt_date(key.2));
                if let Some(old) = from.insert(name.clone(), reference.clone()) {
                    return Err(twice("decisions", name, &old, &reference));
                }
                out.decisions.insert(
                    key,
                    Decision {
                        modules: modules(row)?.to_string(),
                        action: action(row)?.to_string(),
                        traded: traded(row)?,
                        reasoning: reasoning(row).map(str::to_string),
                        prompt: prompt(row)?.to_string(),
                        attempts: attempts(row)?,
                        failed: failed(row)?,
                        raw_text: raw(row)?.to_string(),
                        high_called: h_called(row)?,
                        high_summary: h_summary(row).map(str::to_string),
                        high_prompt: h_prompt(row).map(str::to_string),
                        high_attempts: h_attempts(row)?,
                        high_failed: h_failed(row)?,
                        high_raw_text: h_raw(row).map(str::to_string),
                    },
                );
            }
        }
        out.read_intel(ctx)?;
        out.read_low(ctx)?;
        out.read_hits(ctx)?;
        out.read_tools(ctx)?;
        out.read_usage(ctx)?;
        out.read_first_returns(ctx)?;
        Ok(out)
    }

    fn read_intel(&mut self, ctx: &StageContext) -> StageResult<()> {
        if !ctx.has_input("intel") {
            return Ok(());
        }
        self.has_intel = true;
        let mut from: BTreeMap<String, String> = BTreeMap::new();
        for (reference, batch, file) in read_all(ctx, "intel")? {
            self.bind("intel", &reference);
            let c = Cols {
                batch: &batch,
                file,
            };
            let (ticker, date, module, called) = (
                c.str("ticker")?,
                c.date("date")?,
                c.str("module")?,
                c.bool("called")?,
            );
            let (summary, qs, qm, ql) = (
                c.opt_str("summary")?,
                c.opt_str("query_short")?,
                c.opt_str("query_medium")?,
                c.opt_str("query_long")?,
            );
            let (prompt, attempts, failed, raw) = (
                c.opt_str("prompt")?,
                c.i64("attempts")?,
                c.bool("failed")?,
                c.opt_str("raw_text")?,
            );
            for row in 0..batch.num_rows() {
                let key = (
                    module(row)?.to_string(),
                    ticker(row)?.to_string(),
                    date(row)?,
                );
                let name = format!("{} intel of {} on {}", key.0, key.1, fmt_date(key.2));
                if let Some(old) = from.insert(name.clone(), reference.clone()) {
                    return Err(twice("intel", name, &old, &reference));
                }
                let own = |x: Option<&str>| x.map(str::to_string);
                self.intel.insert(
                    key,
                    Intel {
                        called: called(row)?,
                        summary: own(summary(row)),
                        queries: [own(qs(row)), own(qm(row)), own(ql(row))],
                        prompt: own(prompt(row)),
                        attempts: attempts(row)?,
                        failed: failed(row)?,
                        raw_text: own(raw(row)),
                    },
                );
            }
        }
        Ok(())
    }

    fn read_low(&mut self, ctx: &StageContext) -> StageResult<()> {
        if !ctx.has_input("low") {
            return Ok(());
        }
        self.has_low = true;
        let mut from: BTreeMap<String, String> = BTreeMap::new();
        for (reference, batch, file) in read_all(ctx, "low")? {
            self.bind("low", &reference);
            let c = Cols {
                batch: &batch,
                file,
            };
            let (ticker, date, reflection, prompt) = (
                c.str("ticker")?,
                c.date("date")?,
                c.opt_str("reflection")?,
                c.str("prompt")?,
            );
            let (attempts, failed, raw) =
                (c.i64("attempts")?, c.bool("failed")?, c.str("raw_text")?);
            for row in 0..batch.num_rows() {
                let key = (ticker(row)?.to_string(), date(row)?);
                let name = format!("low-level reflection of {} on {}", key.0, fmt_date(key.1));
                if let Some(old) = from.insert(name.clone(), reference.clone()) {
                    return Err(twice("low", name, &old, &reference));
                }
                self.low.insert(
                    key,
                    Low {
                        reflection: reflection(row).map(str::to_string),
                        prompt: prompt(row)?.to_string(),
                        attempts: attempts(row)?,
                        failed: failed(row)?,
                        raw_text: raw(row)?.to_string(),
                    },
                );
            }
        }
        Ok(())
    }

    fn read_hits(&mut self, ctx: &StageContext) -> StageResult<()> {
        if !ctx.has_input("hits") {
            return Ok(());
        }
        self.has_hits = true;
        for (reference, batch, file) in read_all(ctx, "hits")? {
            self.bind("hits", &reference);
            let c = Cols {
                batch: &batch,
                file,
            };
            let (ticker, date, qtype, rank) = (
                c.str("ticker")?,
                c.date("date")?,
                c.str("query_type")?,
                c.i64("rank")?,
            );
            let (item, item_date, score, kept) = (
                c.str("item_id")?,
                c.date("item_date")?,
                c.f64("score")?,
                c.bool("kept")?,
            );
            let mut rows = Vec::with_capacity(batch.num_rows());
            for row in 0..batch.num_rows() {
                rows.push(Hit {
                    ticker: ticker(row)?.to_string(),
                    date: date(row)?,
                    query_type: qtype(row)?.to_string(),
                    rank: rank(row)?,
                    item_id: item(row)?.to_string(),
                    item_date: item_date(row)?,
                    score: score(row)?,
                    kept: kept(row)?,
                });
            }
            self.hits.push((reference, rows));
        }
        Ok(())
    }

    fn read_usage(&mut self, ctx: &StageContext) -> StageResult<()> {
        if !ctx.has_input("usage") {
            return Ok(());
        }
        self.has_usage = true;
        for (reference, batch, file) in read_all(ctx, "usage")? {
            self.bind("usage", &reference);
            let c = Cols {
                batch: &batch,
                file,
            };
            let (module, attempts, prompt, completion, ms) = (
                c.str("module")?,
                c.i64("attempts")?,
                c.opt_i64("prompt_tokens")?,
                c.i64("completion_tokens")?,
                c.f64("ms")?,
            );
            for row in 0..batch.num_rows() {
                let u = self.usage.entry(module(row)?.to_string()).or_default();
                u.calls += 1;
                u.attempts += attempts(row)?.max(0) as u64;
                if let Some(n) = prompt(row) {
                    u.prompt_tokens += n.max(0) as u64;
                    u.prompt_counted += 1;
                }
                u.completion_tokens += completion(row)?.max(0) as u64;
                u.ms += ms(row)?;
            }
        }
        Ok(())
    }

    fn read_tools(&mut self, ctx: &StageContext) -> StageResult<()> {
        if !ctx.has_input("tool_records") {
            return Ok(());
        }
        self.has_tools = true;
        for (reference, batch, file) in read_all(ctx, "tool_records")? {
            let src = self.bind("tool_records", &reference);
            let c = Cols {
                batch: &batch,
                file,
            };
            let (ticker, tool, first, last) = (
                c.str("ticker")?,
                c.str("tool")?,
                c.date("first_date")?,
                c.date("last_date")?,
            );
            let (days, arr, sr, mdd) = (c.i64("days")?, c.f64("arr")?, c.f64("sr")?, c.f64("mdd")?);
            for row in 0..batch.num_rows() {
                let key = (ticker(row)?.to_string(), tool(row)?.to_string());
                let rec = ToolRecord {
                    first_date: first(row)?,
                    last_date: last(row)?,
                    days: days(row)?,
                    arr: arr(row)?,
                    sr: sr(row)?,
                    mdd: mdd(row)?,
                    source: src,
                };
                if let Some(old) = self.tools.insert(key.clone(), rec) {
                    return Err(twice(
                        "tool_records",
                        format!("tool {} of {}", key.1, key.0),
                        &self.sources[old.source],
                        &reference,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The first equity row's daily_return per path, for the initial capital of the return
    /// curves (the equity schema: initial capital = value / (1 + daily_return) of row one).
    fn read_first_returns(&mut self, ctx: &StageContext) -> StageResult<()> {
        for (_, batch, file) in read_all(ctx, "equity")? {
            let c = Cols {
                batch: &batch,
                file,
            };
            let (key, date, ret) = (c.key()?, c.date("date")?, c.f64("daily_return")?);
            let mut first: BTreeMap<Key, (i32, f64)> = BTreeMap::new();
            for row in 0..batch.num_rows() {
                let (k, d) = (key(row)?, date(row)?);
                let e = first.entry(k).or_insert((d, 0.0));
                if d <= e.0 {
                    *e = (d, ret(row)?);
                }
            }
            self.first_return
                .extend(first.into_iter().map(|(k, (_, r))| (k, r)));
        }
        Ok(())
    }
}
