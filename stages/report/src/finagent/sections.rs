//! The report's tables in the paper's layouts (Table 4, Table 5, the tools' records) and
//! the helpers the other sections share.
use std::collections::{BTreeMap, BTreeSet};

use super::read::FinAgentInputs;
use super::{FinAgentParams, MISSING};
use crate::data::{Inputs, Key, MetricKind, SourceId, fmt_date};
use crate::render::{Block, ChartFile};
use crate::tables::{Cell, Table, cell, fmt_num, mark_best};

/// The ablations of the paper's Table 5, in its order.
pub const ABLATIONS: [&str; 5] = ["T", "M", "ML", "MLH", "MLHT"];
/// The rule tools of FinAgent's records, buy-and-hold first.
const TOOLS: [&str; 5] = [
    "buy_and_hold",
    "macd",
    "kdj_rsi",
    "stochastic_bollinger",
    "mean_reversion",
];

/// One FinAgent configuration: its strategy name and the modules it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub strategy: String,
    pub modules: String,
}

/// Blocks and charts under construction.
#[derive(Default)]
pub struct Out {
    pub(crate) blocks: Vec<Block>,
    pub charts: Vec<ChartFile>,
    pub used: BTreeSet<String>,
    pub tables: usize,
}

impl Out {
    pub(super) fn table(&mut self, t: Table) {
        self.blocks.push(Block::Table(t));
        self.tables += 1;
    }
}

/// The configurations: strategies of the decisions (modules from their rows) and
/// `finagent_<letters>` strategies of the metrics and equity; Table 5 order, then by name.
pub fn configs(p: &FinAgentParams, inputs: &Inputs, fa: &FinAgentInputs) -> Vec<Config> {
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    for ((s, _, _), d) in &fa.decisions {
        found.entry(s.clone()).or_insert_with(|| d.modules.clone());
    }
    for k in inputs.metrics.keys().chain(inputs.equity.keys()) {
        if k.env != p.env || k.split != p.split {
            continue;
        }
        if let Some(m) = k.strategy.strip_prefix("finagent_")
            && !m.is_empty()
            && m.chars().all(|c| "MLHT".contains(c))
        {
            found
                .entry(k.strategy.clone())
                .or_insert_with(|| m.to_string());
        }
    }
    let mut v: Vec<Config> = found
        .into_iter()
        .map(|(strategy, modules)| Config { strategy, modules })
        .collect();
    v.sort_by_key(|c| {
        (
            ABLATIONS
                .iter()
                .position(|a| *a == c.modules)
                .unwrap_or(ABLATIONS.len()),
            c.modules.len(),
            c.modules.clone(),
            c.strategy.clone(),
        )
    });
    v
}

/// The configuration with every module (else the one with the most).
pub(super) fn full(configs: &[Config]) -> Option<&Config> {
    configs.iter().rev().max_by_key(|c| {
        (
            c.modules.chars().collect::<BTreeSet<_>>().len(),
            c.modules == "MLHT",
        )
    })
}

pub(super) fn key(p: &FinAgentParams, ticker: &str, strategy: &str) -> Key {
    Key {
        env: p.env.clone(),
        split: p.split.clone(),
        ticker: ticker.into(),
        strategy: strategy.into(),
    }
}

pub(super) fn num_cell(v: Option<f64>, d: usize) -> Cell {
    cell(v.map_or_else(|| MISSING.to_string(), |x| fmt_num(x, d)))
}

pub(super) fn provenance(
    sources: &[String],
    used: BTreeMap<SourceId, BTreeSet<String>>,
) -> Vec<(String, String)> {
    used.into_iter()
        .map(|(src, names)| {
            (
                sources[src].clone(),
                names.into_iter().collect::<Vec<_>>().join(", "),
            )
        })
        .collect()
}

/// Tickers where a configuration has metrics in the env and split.
fn config_tickers<'a>(
    p: &'a FinAgentParams,
    inputs: &'a Inputs,
    configs: &[Config],
) -> BTreeSet<&'a str> {
    inputs
        .metrics_of(&p.env, &p.split)
        .filter(|(k, _)| configs.iter().any(|c| c.strategy == k.strategy))
        .map(|(k, _)| k.ticker.as_str())
        .collect()
}

/// Section 1: the paper's Table 4 layout, one table per asset.
pub fn table4(out: &mut Out, p: &FinAgentParams, inputs: &Inputs, configs: &[Config]) {
    out.blocks.push(Block::Heading(
        2,
        "Table 4 layout: configurations and baselines".into(),
    ));
    let tickers = config_tickers(p, inputs, configs);
    if tickers.is_empty() {
        out.blocks.push(Block::Para(format!(
            "No metrics of a FinAgent configuration in the {} split of the {} environment.",
            p.split, p.env
        )));
        return;
    }
    out.blocks.push(Block::Para(format!(
        "Columns as the metrics artifact computes them (arr, sr, cr, sor, mdd, vol; FinAgent \
         section 5.2, risk-free rate 0). Every strategy of the metrics on the asset is a row; \
         the best of those rows per column is in bold (ARR, SR, CR, SoR: higher; MDD, VOL: \
         lower). The last row is the published FinAgent result ({}), from the paper's own test \
         period and setup; it reports ARR, SR and MDD only.",
        p.published_source
    )));
    let is_config = |s: &str| configs.iter().any(|c| c.strategy == s);
    for ticker in &tickers {
        // Baselines evaluated over another period than every configuration are left out:
        // the same (env, split) can hold runs of other windows.
        let periods: BTreeSet<(i32, i32)> = configs
            .iter()
            .filter_map(|c| inputs.metrics.get(&key(p, ticker, &c.strategy)))
            .map(|m| (m.start, m.end))
            .collect();
        let (mut baselines, other): (Vec<_>, Vec<_>) = inputs
            .metrics_of(&p.env, &p.split)
            .filter(|(k, _)| k.ticker == *ticker && !is_config(&k.strategy))
            .partition(|(_, m)| periods.contains(&(m.start, m.end)));
        let other: Vec<String> = other
            .iter()
            .map(|(k, m)| {
                format!(
                    "{} ({} to {})",
                    k.strategy,
                    fmt_date(m.start),
                    fmt_date(m.end)
                )
            })
            .collect();
        let mut baselines: Vec<&str> = baselines
            .drain(..)
            .map(|(k, _)| k.strategy.as_str())
            .collect();
        baselines.sort_by_key(|s| (*s != p.baseline, *s));
        let mut names: Vec<(String, String)> = baselines
            .iter()
            .map(|s| (s.to_string(), s.to_string()))
            .collect();
        names.extend(configs.iter().map(|c| {
            (
                format!("{} (ours, {})", c.strategy, c.modules),
                c.strategy.clone(),
            )
        }));
        let mut used: BTreeMap<SourceId, BTreeSet<String>> = BTreeMap::new();
        let mut range: Option<(i32, i32)> = None;
        let mut rows: Vec<(String, Vec<Cell>)> = Vec::new();
        let mut values: Vec<Vec<Option<f64>>> = Vec::new();
        for (label, strategy) in names {
            let m = inputs.metrics.get(&key(p, ticker, &strategy));
            if let Some(m) = m {
                used.entry(m.source).or_default().insert(strategy.clone());
                range =
                    Some(range.map_or((m.start, m.end), |(a, b)| (a.min(m.start), b.max(m.end))));
            }
            let vals: Vec<Option<f64>> = MetricKind::ALL
                .iter()
                .map(|k| m.map(|m| m.get(*k)))
                .collect();
            rows.push((
                label,
                vals.iter().map(|v| num_cell(*v, p.decimals)).collect(),
            ));
            values.push(vals);
        }
        for (col, kind) in MetricKind::ALL.iter().enumerate() {
            let mut column: Vec<Cell> = rows.iter().map(|r| r.1[col].clone()).collect();
            let vals: Vec<Option<f64>> = values.iter().map(|r| r[col]).collect();
            mark_best(&mut column, &vals, |v| kind.score(v));
            for (r, c) in rows.iter_mut().zip(column) {
                r.1[col] = c;
            }
        }
        let published = p.published.get(*ticker);
        let pub_vals = [
            published.and_then(|r| r[0]),
            published.and_then(|r| r[1]),
            None,
            None,
            published.and_then(|r| r[2]),
            None,
        ];
        rows.push((
            "FinAgent (published)".into(),
            pub_vals.iter().map(|v| num_cell(*v, p.decimals)).collect(),
        ));
        let mut prov = provenance(&inputs.sources, used);
        prov.push((
            "params.published".into(),
            if published.is_some() {
                p.published_source.clone()
            } else {
                format!("no entry for {ticker}")
            },
        ));
        let period = range.map_or_else(String::new, |(a, b)| {
            format!(", {} to {}", fmt_date(a), fmt_date(b))
        });
        out.blocks.push(Block::Heading(3, ticker.to_string()));
        if !other.is_empty() {
            out.blocks.push(Block::Para(format!(
                "Left out, evaluated over another period than the configurations: {}.",
                other.join(", ")
            )));
        }
        out.table(Table {
            caption: format!(
                "{ticker}, {} split{period}: FinAgent Table 4 columns. Published row: {}.",
                p.split, p.published_source
            ),
            corner: "Strategy".into(),
            groups: Vec::new(),
            columns: MetricKind::ALL
                .iter()
                .map(|k| k.label().to_string())
                .collect(),
            rows,
            provenance: prov,
            mark: "best",
        });
    }
    let absent: Vec<&str> = p
        .published
        .keys()
        .map(String::as_str)
        .filter(|t| !tickers.contains(t))
        .collect();
    if !absent.is_empty() {
        out.blocks.push(Block::Para(format!(
            "Published figures without a configuration of ours in the inputs: {}.",
            absent.join(", ")
        )));
    }
}

/// Section 2: the paper's Table 5 layout: configurations by asset, ARR % and SR.
pub fn ablation(out: &mut Out, p: &FinAgentParams, inputs: &Inputs, configs: &[Config]) {
    out.blocks
        .push(Block::Heading(2, "Table 5 layout: ablations".into()));
    let tickers = config_tickers(p, inputs, configs);
    if tickers.is_empty() {
        out.blocks
            .push(Block::Para("No configuration has metrics.".into()));
        return;
    }
    let kinds = [MetricKind::Arr, MetricKind::Sr];
    let mut used: BTreeMap<SourceId, BTreeSet<String>> = BTreeMap::new();
    let mut rows: Vec<(String, Vec<Cell>)> = Vec::new();
    let mut values: Vec<Vec<Option<f64>>> = Vec::new();
    for c in configs {
        let mut vals = Vec::new();
        for t in &tickers {
            let m = inputs.metrics.get(&key(p, t, &c.strategy));
            if let Some(m) = m {
                used.entry(m.source).or_default().insert(c.strategy.clone());
            }
            vals.extend(kinds.iter().map(|k| m.map(|m| m.get(*k))));
        }
        rows.push((
            format!("{} ({})", c.modules, c.strategy),
            vals.iter().map(|v| num_cell(*v, p.decimals)).collect(),
        ));
        values.push(vals);
    }
    for col in 0..tickers.len() * kinds.len() {
        let mut column: Vec<Cell> = rows.iter().map(|r| r.1[col].clone()).collect();
        let vals: Vec<Option<f64>> = values.iter().map(|r| r[col]).collect();
        mark_best(&mut column, &vals, |v| v);
        for (r, c) in rows.iter_mut().zip(column) {
            r.1[col] = c;
        }
    }
    let missing: Vec<&str> = ABLATIONS
        .iter()
        .copied()
        .filter(|a| !configs.iter().any(|c| c.modules == *a))
        .collect();
    out.table(Table {
        caption: format!(
            "{} split: ARR % and SR of each configuration (rows: modules on); best per column \
             in bold.{}",
            p.split,
            if missing.is_empty() {
                String::new()
            } else {
                format!(" Not run: {}.", missing.join(", "))
            }
        ),
        corner: "Modules".into(),
        groups: tickers
            .iter()
            .map(|t| (t.to_string(), kinds.len()))
            .collect(),
        columns: tickers
            .iter()
            .flat_map(|_| kinds.iter().map(|k| k.label().to_string()))
            .collect(),
        rows,
        provenance: provenance(&inputs.sources, used),
        mark: "best",
    });
}

/// Section 6: the rule tools' train records (omitted without a tool_records input).
pub fn tools(out: &mut Out, fa: &FinAgentInputs) {
    if !fa.has_tools {
        return;
    }
    out.blocks
        .push(Block::Heading(2, "Rule tools: train records".into()));
    let tickers: BTreeSet<&str> = fa.tools.keys().map(|k| k.0.as_str()).collect();
    let mut tools: Vec<&str> = fa
        .tools
        .keys()
        .map(|k| k.1.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    tools.sort_by_key(|t| (TOOLS.iter().position(|x| x == t).unwrap_or(TOOLS.len()), *t));
    if tickers.is_empty() {
        out.blocks
            .push(Block::Para("The tool_records input has no rows.".into()));
        return;
    }
    let mut used: BTreeMap<SourceId, BTreeSet<String>> = BTreeMap::new();
    let mut windows: BTreeMap<&str, String> = BTreeMap::new();
    let mut rows: Vec<(String, Vec<Cell>)> = Vec::new();
    let mut values: Vec<Vec<Option<f64>>> = Vec::new();
    for tool in &tools {
        let mut vals = Vec::new();
        for t in &tickers {
            let r = fa.tools.get(&(t.to_string(), tool.to_string()));
            if let Some(r) = r {
                used.entry(r.source).or_default().insert(t.to_string());
                windows.entry(t).or_insert_with(|| {
                    format!(
                        "{t} {}..{} ({} days)",
                        fmt_date(r.first_date),
                        fmt_date(r.last_date),
                        r.days
                    )
                });
            }
            vals.extend([r.map(|r| r.arr), r.map(|r| r.sr), r.map(|r| r.mdd)]);
        }
        rows.push((
            tool.to_string(),
            vals.iter().map(|v| num_cell(*v, 4)).collect(),
        ));
        values.push(vals);
    }
    for col in 0..tickers.len() * 3 {
        let mut column: Vec<Cell> = rows.iter().map(|r| r.1[col].clone()).collect();
        let vals: Vec<Option<f64>> = values.iter().map(|r| r[col]).collect();
        let mdd = col % 3 == 2;
        mark_best(&mut column, &vals, |v| if mdd { -v.abs() } else { v });
        for (r, c) in rows.iter_mut().zip(column) {
            r.1[col] = c;
        }
    }
    out.table(Table {
        caption: format!(
            "This project's reproduction of FinAgent's released tool records (the records the \
             decision module is shown), from fresh capital over the record window, fractions \
             as FinAgent stores them (ARR, MDD: 0.1 = 10 %), 4 decimals; best per column in \
             bold. Windows: {}.",
            windows.values().cloned().collect::<Vec<_>>().join("; ")
        ),
        corner: "Tool".into(),
        groups: tickers.iter().map(|t| (t.to_string(), 3)).collect(),
        columns: tickers
            .iter()
            .flat_map(|_| ["ARR", "SR", "MDD"].map(String::from))
            .collect(),
        rows,
        provenance: provenance(&fa.sources, used),
        mark: "best",
    });
}
