//! Diagnostics: retrieval statistics, module calls and failures, answer variety.
use std::collections::BTreeSet;

use super::MISSING;
use super::read::FinAgentInputs;
use super::retrieval;
use super::sections::{Config, Out};
use crate::render::Block;
use crate::tables::{Cell, Table, cell, fmt_num};

fn pct(part: usize, whole: usize) -> String {
    if whole == 0 {
        MISSING.into()
    } else {
        fmt_num(part as f64 / whole as f64 * 100.0, 1)
    }
}

/// Section 4: retrieval diagnostics (omitted without a hits input).
pub fn retrieval(out: &mut Out, fa: &FinAgentInputs) {
    if !fa.has_hits {
        return;
    }
    out.blocks.push(Block::Heading(2, "Retrieval".into()));
    out.blocks.push(Block::Para(
        "Per hits artifact and query type: queries = (ticker, day) with a hit; score = cosine \
         similarity; age = decision day - item date, in days; quantiles interpolate linearly. \
         Shared = hits whose item another query type of the same ticker and day also retrieved."
            .into(),
    ));
    for (reference, hits) in &fa.hits {
        out.blocks.push(Block::Heading(3, format!("`{reference}`")));
        if hits.is_empty() {
            out.blocks
                .push(Block::Para("No hit rows in this artifact.".into()));
            continue;
        }
        let (types, overlap) = retrieval::stats(hits);
        let q = ["min", "p25", "median", "p75", "max"];
        let mut columns: Vec<String> = ["queries", "hits", "kept"].map(String::from).to_vec();
        columns.extend(q.iter().map(|x| x.to_string()));
        columns.push("mean".into());
        columns.extend(q.iter().map(|x| x.to_string()));
        columns.push("shared".into());
        let rows = types
            .iter()
            .map(|t| {
                let mut c = vec![
                    cell(t.queries.to_string()),
                    cell(t.hits.to_string()),
                    cell(t.kept.to_string()),
                ];
                c.extend(t.scores.iter().map(|x| cell(fmt_num(*x, 3))));
                c.push(cell(fmt_num(t.mean_score, 3)));
                c.extend(t.ages.iter().map(|x| cell(fmt_num(*x, 1))));
                c.push(cell(format!("{} ({} %)", t.shared, pct(t.shared, t.hits))));
                (t.query_type.clone(), c)
            })
            .collect();
        out.table(Table {
            caption: format!(
                "Hits by query type in {reference}: scores (3 decimals) and ages in days."
            ),
            corner: "Query type".into(),
            groups: vec![
                ("count".into(), 3),
                ("cosine score".into(), 6),
                ("age, days".into(), 5),
                ("overlap".into(), 1),
            ],
            columns,
            rows,
            provenance: vec![(reference.clone(), "memory_hits rows".into())],
            mark: "best",
        });
        out.blocks.push(Block::Para(format!(
            "Overlap: {} of {} (ticker, day, item) were retrieved by two query types or more \
             ({} %).",
            overlap.multi,
            overlap.items,
            if overlap.items == 0 {
                MISSING.to_string()
            } else {
                fmt_num(overlap.fraction() * 100.0, 2)
            }
        )));
    }

    // Empty memory: the latest intel's queries with no hit row anywhere.
    if !fa.has_intel {
        out.blocks.push(Block::Para(
            "Queries with empty memory: not derivable without the intel input (the queries \
             asked are the latest market intelligence's query_short/medium/long)."
                .into(),
        ));
        return;
    }
    let hit_tickers: BTreeSet<&str> = fa
        .hits
        .iter()
        .flat_map(|(_, r)| r.iter().map(|h| h.ticker.as_str()))
        .collect();
    let mut asked: BTreeSet<(String, i32, String)> = BTreeSet::new();
    for ((module, ticker, date), r) in &fa.intel {
        if module != "latest" || !hit_tickers.contains(ticker.as_str()) {
            continue;
        }
        for (q, t) in r.queries.iter().zip(["short", "medium", "long"]) {
            if q.is_some() {
                asked.insert((ticker.clone(), *date, t.to_string()));
            }
        }
    }
    let rows: Vec<(String, Vec<Cell>)> = retrieval::empty_queries(&asked, &fa.hits)
        .into_iter()
        .map(|(t, n, empty)| {
            (
                t,
                vec![
                    cell(n.to_string()),
                    cell(empty.to_string()),
                    cell(pct(empty, n)),
                ],
            )
        })
        .collect();
    if rows.is_empty() {
        out.blocks.push(Block::Para(
            "Queries with empty memory: no latest-intel query of a ticker in the hits.".into(),
        ));
        return;
    }
    out.table(Table {
        caption: "News queries with empty memory: the latest market intelligence's queries \
                  (tickers present in the hits) that have no hit row, i.e. no item before \
                  their day."
            .into(),
        corner: "Query type".into(),
        groups: Vec::new(),
        columns: ["queries", "empty", "empty %"].map(String::from).to_vec(),
        rows,
        provenance: fa
            .provenance("intel", "queries asked")
            .into_iter()
            .chain(fa.provenance("hits", "hit rows"))
            .collect(),
        mark: "best",
    });
}

/// Calls, failures, retries and distinct answers of one module.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ModuleCount {
    pub rows: usize,
    pub calls: usize,
    pub failed: usize,
    pub retried: usize,
    pub distinct: usize,
}

fn count<'a, I>(rows: I) -> ModuleCount
where
    I: Iterator<Item = (bool, i64, bool, Option<&'a str>)>,
{
    let mut c = ModuleCount::default();
    let mut answers: BTreeSet<&str> = BTreeSet::new();
    for (called, attempts, failed, answer) in rows {
        c.rows += 1;
        if !called {
            continue;
        }
        c.calls += 1;
        c.failed += failed as usize;
        c.retried += (attempts > 1) as usize;
        if !failed && let Some(a) = answer {
            answers.insert(a);
        }
    }
    c.distinct = answers.len();
    c
}

/// The decisions of one strategy.
fn decisions_of<'a>(
    fa: &'a FinAgentInputs,
    strategy: &str,
) -> impl Iterator<Item = (&'a super::read::DayKey, &'a super::read::Decision)> + use<'a> {
    let strategy = strategy.to_string();
    fa.decisions.iter().filter(move |(k, _)| k.0 == strategy)
}

/// Section 5: module calls, failures, retries, answer variety and the action mix.
pub fn modules(out: &mut Out, fa: &FinAgentInputs, configs: &[Config]) {
    out.blocks.push(Block::Heading(
        2,
        "Modules: calls, failures, variety".into(),
    ));
    let mut table: Vec<(String, ModuleCount)> = Vec::new();
    if fa.has_intel {
        for (module, name) in [
            ("latest", "latest market intelligence"),
            ("past", "past market intelligence"),
        ] {
            table.push((
                name.into(),
                count(
                    fa.intel
                        .iter()
                        .filter(|(k, _)| k.0 == module)
                        .map(|(_, r)| (r.called, r.attempts, r.failed, r.summary.as_deref())),
                ),
            ));
        }
    }
    if fa.has_low {
        table.push((
            "low-level reflection".into(),
            count(
                fa.low
                    .values()
                    .map(|r| (true, r.attempts, r.failed, r.reflection.as_deref())),
            ),
        ));
    }
    for c in configs {
        if decisions_of(fa, &c.strategy).next().is_none() {
            continue;
        }
        table.push((
            format!("high-level reflection, {}", c.strategy),
            count(decisions_of(fa, &c.strategy).map(|(_, d)| {
                (
                    d.high_called,
                    d.high_attempts,
                    d.high_failed,
                    d.high_summary.as_deref(),
                )
            })),
        ));
        table.push((
            format!("decision, {}", c.strategy),
            count(
                decisions_of(fa, &c.strategy)
                    .map(|(_, d)| (true, d.attempts, d.failed, d.reasoning.as_deref())),
            ),
        ));
    }
    out.table(Table {
        caption: "Per module: rows = (ticker, day) rows of its artifact; calls = rows where the \
                  model was asked; failed = no valid answer after the retries; retried = \
                  attempts > 1; distinct = distinct answers (intel: summary, low: reflection, \
                  high: summary, decision: reasoning) among the valid ones."
            .into(),
        corner: "Module".into(),
        groups: Vec::new(),
        columns: [
            "rows",
            "calls",
            "failed",
            "failed %",
            "retried",
            "distinct",
            "distinct / calls %",
        ]
        .map(String::from)
        .to_vec(),
        rows: table
            .iter()
            .map(|(name, c)| {
                (
                    name.clone(),
                    vec![
                        cell(c.rows.to_string()),
                        cell(c.calls.to_string()),
                        cell(c.failed.to_string()),
                        cell(pct(c.failed, c.calls)),
                        cell(c.retried.to_string()),
                        cell(c.distinct.to_string()),
                        cell(pct(c.distinct, c.calls)),
                    ],
                )
            })
            .collect(),
        provenance: ["decisions", "intel", "low"]
            .iter()
            .flat_map(|i| fa.provenance(i, "module rows"))
            .collect(),
        mark: "warn",
    });
    usage(out, fa);

    let rows: Vec<(String, Vec<Cell>)> = configs
        .iter()
        .filter(|c| decisions_of(fa, &c.strategy).next().is_some())
        .map(|c| {
            let ds: Vec<_> = decisions_of(fa, &c.strategy).map(|(_, d)| d).collect();
            let n = ds.len();
            let k = |a: &str| ds.iter().filter(|d| d.action == a).count();
            let mut cells: Vec<Cell> = ["BUY", "SELL", "HOLD"]
                .iter()
                .map(|a| cell(format!("{} ({} %)", k(a), pct(k(a), n))))
                .collect();
            cells.push(cell(ds.iter().filter(|d| d.failed).count().to_string()));
            cells.push(cell(ds.iter().filter(|d| d.traded).count().to_string()));
            cells.push(cell(
                ds.iter()
                    .map(|d| d.action.as_str())
                    .collect::<BTreeSet<_>>()
                    .len()
                    .to_string(),
            ));
            let mut row = vec![cell(n.to_string())];
            row.extend(cells);
            (format!("{} ({})", c.strategy, c.modules), row)
        })
        .collect();
    if !rows.is_empty() {
        out.table(Table {
            caption: "Action mix per configuration: decisions, BUY / SELL / HOLD (failed \
                      decisions are HOLD), failed, traded (the position changed), distinct \
                      actions."
                .into(),
            corner: "Configuration".into(),
            groups: Vec::new(),
            columns: [
                "decisions",
                "BUY",
                "SELL",
                "HOLD",
                "failed",
                "traded",
                "distinct actions",
            ]
            .map(String::from)
            .to_vec(),
            rows,
            provenance: fa.provenance("decisions", "action, failed, traded"),
            mark: "best",
        });
    }
}

/// Calls, tokens and wall time per module, from the module stages' `usage` outputs.
fn usage(out: &mut Out, fa: &FinAgentInputs) {
    if !fa.has_usage {
        out.blocks.push(Block::Para(
            "Tokens and time per module: no `usage` input is bound (bind the module stages' \
             usage outputs to show them)."
                .into(),
        ));
        return;
    }
    const ORDER: [&str; 5] = [
        "latest_intel",
        "past_intel",
        "low_reflection",
        "high_reflection",
        "decision",
    ];
    let rank = |m: &str| ORDER.iter().position(|o| *o == m).unwrap_or(ORDER.len());
    let mut modules: Vec<(&String, &super::read::Usage)> = fa.usage.iter().collect();
    modules.sort_by_key(|(m, _)| (rank(m), (*m).clone()));
    let per = |x: u64, n: u64| {
        if n == 0 {
            "-".to_string()
        } else {
            format!("{:.0}", x as f64 / n as f64)
        }
    };
    let total_ms: f64 = modules.iter().map(|(_, u)| u.ms).sum();
    out.table(Table {
        caption: "Per module, over every bound usage artifact: calls = (ticker, day) calls; \
                  attempts include retries; tokens are per call (prompt: chat template and \
                  answer prefill included; '-' when the backend did not count them); time is \
                  wall-clock, a batch's time split evenly over its calls (a measurement of that \
                  run, not reproducible)."
            .into(),
        corner: "Module".into(),
        groups: Vec::new(),
        columns: [
            "calls",
            "attempts",
            "prompt tokens / call",
            "answer tokens / call",
            "time s",
            "ms / call",
            "time %",
        ]
        .map(String::from)
        .to_vec(),
        rows: modules
            .iter()
            .map(|(m, u)| {
                (
                    (*m).clone(),
                    vec![
                        cell(u.calls.to_string()),
                        cell(u.attempts.to_string()),
                        cell(per(u.prompt_tokens, u.prompt_counted)),
                        cell(per(u.completion_tokens, u.calls)),
                        cell(format!("{:.1}", u.ms / 1e3)),
                        cell(if u.calls == 0 {
                            "-".into()
                        } else {
                            format!("{:.0}", u.ms / u.calls as f64)
                        }),
                        cell(if total_ms > 0.0 {
                            format!("{:.1}", 100.0 * u.ms / total_ms)
                        } else {
                            "-".into()
                        }),
                    ],
                )
            })
            .collect(),
        provenance: fa.provenance("usage", "usage rows"),
        mark: "warn",
    });
}
