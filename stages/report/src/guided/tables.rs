//! Tables of the LLM-guided RL paper, computed from the metrics, curves and signals
//! artifacts: agent comparison over runs with paired t-tests, the published TDQN figures
//! beside ours, and the prompt-version tables (Sharpe, perplexity, entropy, failures).
use std::collections::{BTreeMap, BTreeSet};

use crate::data::{Inputs, MetricKind};
use crate::guided::GuidedParams;
use crate::guided::read::{Decisions, split_run};
use crate::stats::{MeanStd, TTest, mean_std, one_sample_t_test, paired_t_test};
use crate::tables::{Cell, Table, cell, fmt_num, mark_best, mean_std_text};

/// SR and MDD of one agent on one ticker, by run (None = an unsuffixed, single-run strategy).
#[derive(Debug, Default, Clone)]
pub struct AgentRuns {
    pub sr: BTreeMap<Option<usize>, f64>,
    pub mdd: BTreeMap<Option<usize>, f64>,
}

impl AgentRuns {
    fn values(&self, kind: MetricKind) -> Vec<f64> {
        self.map(kind).values().copied().collect()
    }

    fn map(&self, kind: MetricKind) -> &BTreeMap<Option<usize>, f64> {
        if kind == MetricKind::Sr {
            &self.sr
        } else {
            &self.mdd
        }
    }
}

/// ticker -> agent base name -> runs, for the params' env and split.
pub fn collect_runs(
    inputs: &Inputs,
    p: &GuidedParams,
    agents: &[&str],
) -> BTreeMap<String, BTreeMap<String, AgentRuns>> {
    let mut out: BTreeMap<String, BTreeMap<String, AgentRuns>> = BTreeMap::new();
    for (k, m) in inputs.metrics_of(&p.env, &p.split) {
        let (base, run) = split_run(&k.strategy);
        if !agents.contains(&base) {
            continue;
        }
        let a = out
            .entry(k.ticker.clone())
            .or_default()
            .entry(base.to_string())
            .or_default();
        a.sr.insert(run, m.get(MetricKind::Sr));
        a.mdd.insert(run, m.get(MetricKind::Mdd));
    }
    out
}

fn missing() -> Cell {
    cell("–".into())
}

fn p_text(t: Option<TTest>) -> String {
    match t {
        None => "n/a".into(),
        Some(t) if t.p < 0.001 => "<0.001".into(),
        Some(t) => format!("{:.3}", t.p),
    }
}

/// Test of `a` against `b`: paired by run when both have runs, a one-sample test against
/// `b`'s single value when it has one (a deterministic agent such as LLM-only).
fn compare(a: &AgentRuns, b: &AgentRuns, kind: MetricKind) -> Option<TTest> {
    let (am, bm) = (a.map(kind), b.map(kind));
    if bm.len() == 1 && bm.contains_key(&None) {
        return one_sample_t_test(&a.values(kind), bm[&None]);
    }
    let runs: Vec<&Option<usize>> = am.keys().filter(|r| bm.contains_key(r)).collect();
    let x: Vec<f64> = runs.iter().map(|r| am[r]).collect();
    let y: Vec<f64> = runs.iter().map(|r| bm[r]).collect();
    paired_t_test(&x, &y)
}

/// Three "mean (std)" cells with the best mean in bold, then the two p-values.
fn stat_group(
    stats: &[MeanStd],
    kind: MetricKind,
    d: usize,
    tests: [Option<TTest>; 2],
) -> Vec<Cell> {
    let mut group: Vec<Cell> = stats.iter().map(|m| cell(mean_std_text(m, d))).collect();
    let means: Vec<Option<f64>> = stats.iter().map(|m| (m.n > 0).then_some(m.mean)).collect();
    mark_best(&mut group, &means, |v| kind.score(v));
    group.extend(tests.into_iter().map(|t| cell(p_text(t))));
    group
}

/// The paper's main table: SR and MDD of LLM+RL, RL-only and LLM-only as mean (std) over
/// runs, with two-sided t-test p-values of LLM+RL against each of the other two.
pub fn comparison_table(inputs: &Inputs, p: &GuidedParams) -> Option<(Table, usize)> {
    let agents = [p.guided.as_str(), p.rl_only.as_str(), p.llm_only.as_str()];
    let runs = collect_runs(inputs, p, &agents);
    if runs.is_empty() {
        return None;
    }
    let empty = AgentRuns::default();
    let mut rows = Vec::new();
    let mut max_runs = 0;
    let mut per_ticker: Vec<[&AgentRuns; 3]> = Vec::new();
    for (ticker, by_agent) in &runs {
        let get = |name: &str| by_agent.get(name).unwrap_or(&empty);
        let agents3 = [get(&p.guided), get(&p.rl_only), get(&p.llm_only)];
        let [g, r, l] = agents3;
        let mut cells = Vec::new();
        for kind in [MetricKind::Sr, MetricKind::Mdd] {
            let stats: Vec<MeanStd> = agents3.iter().map(|a| mean_std(&a.values(kind))).collect();
            max_runs = max_runs.max(stats[0].n).max(stats[1].n);
            cells.extend(stat_group(
                &stats,
                kind,
                p.decimals,
                [compare(g, r, kind), compare(g, l, kind)],
            ));
        }
        rows.push((ticker.clone(), cells));
        per_ticker.push(agents3);
    }
    if per_ticker.len() > 1 {
        let mut cells = Vec::new();
        for kind in [MetricKind::Sr, MetricKind::Mdd] {
            let stats: Vec<MeanStd> = (0..3)
                .map(|i| {
                    let all: Vec<f64> = per_ticker.iter().flat_map(|a| a[i].values(kind)).collect();
                    mean_std(&all)
                })
                .collect();
            let vs = |j: usize| {
                let pairs: Vec<(&AgentRuns, &AgentRuns)> =
                    per_ticker.iter().map(|a| (a[0], a[j])).collect();
                pooled_test(&pairs, kind)
            };
            cells.extend(stat_group(&stats, kind, p.decimals, [vs(1), vs(2)]));
        }
        rows.push(("all tickers".into(), cells));
    }
    let sub = ["LLM+RL", "RL-only", "LLM-only", "p vs RL", "p vs LLM"];
    let columns: Vec<String> = sub
        .iter()
        .chain(sub.iter())
        .map(|s| s.to_string())
        .collect();
    let sources: BTreeSet<String> = inputs
        .metrics_of(&p.env, &p.split)
        .filter(|(k, _)| agents.contains(&split_run(&k.strategy).0))
        .map(|(k, _)| inputs.sources[inputs.metrics[k].source].clone())
        .collect();
    Some((
        Table {
            caption: format!(
                "{} split, {} environment: SR and MDD% as mean (std) over runs (LLM+RL = {}, \
                 RL-only = {}, LLM-only = {}); p = two-sided t-test of LLM+RL against the other \
                 agent, paired by run (seed), or one-sample against a single-run agent. Best \
                 mean in bold.",
                p.split, p.env, p.guided, p.rl_only, p.llm_only
            ),
            corner: "ticker".into(),
            groups: vec![("SR".into(), 5), ("MDD %".into(), 5)],
            columns,
            rows,
            provenance: sources
                .into_iter()
                .map(|s| (s, "metrics".to_string()))
                .collect(),
            mark: "best",
        },
        max_runs,
    ))
}

/// Paired test over every (ticker, run) pair of the tickers; a single-run agent's value is
/// paired with every run of the same ticker.
fn pooled_test(pairs: &[(&AgentRuns, &AgentRuns)], kind: MetricKind) -> Option<TTest> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (a, b) in pairs {
        let (am, bm) = (a.map(kind), b.map(kind));
        let single = if bm.len() == 1 { bm.get(&None) } else { None };
        for (run, v) in am {
            if let Some(w) = bm.get(run).or(single) {
                x.push(*v);
                y.push(*w);
            }
        }
    }
    paired_t_test(&x, &y)
}

/// The published TDQN test Sharpe ratios beside our RL-only runs, with one sentence per
/// ticker on the gap.
pub fn published_table(inputs: &Inputs, p: &GuidedParams) -> Option<(Table, Vec<String>)> {
    if p.published.is_empty() {
        return None;
    }
    let runs = collect_runs(inputs, p, &[p.rl_only.as_str()]);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (ticker, published) in &p.published {
        let ours = runs
            .get(ticker)
            .and_then(|a| a.get(&p.rl_only))
            .map(|a| mean_std(&a.values(MetricKind::Sr)));
        let Some(m) = ours.filter(|m| m.n > 0) else {
            rows.push((
                ticker.clone(),
                vec![
                    cell(fmt_num(*published, 3)),
                    missing(),
                    missing(),
                    missing(),
                    missing(),
                ],
            ));
            continue;
        };
        let diff = m.mean - published;
        let values = runs[ticker][&p.rl_only].values(MetricKind::Sr);
        let test = one_sample_t_test(&values, *published);
        rows.push((
            ticker.clone(),
            vec![
                cell(fmt_num(*published, 3)),
                cell(mean_std_text(&m, p.decimals)),
                cell(m.n.to_string()),
                cell(fmt_num(diff, p.decimals)),
                cell(p_text(test)),
            ],
        ));
        let spread = if m.n > 1 && m.std > 0.0 {
            format!(
                "{:.1} standard deviations of our {} runs",
                diff.abs() / m.std,
                m.n
            )
        } else {
            "with a single run we cannot tell that gap from seed noise".to_string()
        };
        let verdict = match test {
            Some(t) if t.p >= 0.05 && t.n >= 10 => format!(
                "the t-test does not reject equality (p = {:.3}): reproduced within noise",
                t.p
            ),
            Some(t) if t.p >= 0.05 => format!(
                "the t-test does not reject equality (p = {:.3}), but with {} runs it has \
                 little power: run more before calling it reproduced",
                t.p, t.n
            ),
            Some(t) => format!(
                "the t-test rejects equality (p = {}): not reproduced",
                p_text(Some(t))
            ),
            None => "too few runs for a test".to_string(),
        };
        notes.push(format!(
            "{ticker}: ours {} vs published {}: a gap of {} ({spread}), {verdict}.",
            fmt_num(m.mean, p.decimals),
            fmt_num(*published, 3),
            fmt_num(diff, p.decimals)
        ));
    }
    Some((
        Table {
            caption: format!(
                "TDQN test Sharpe ratio: published ({}) vs this run's RL-only agent ({}), mean \
                 (std) over runs; p = two-sided one-sample t-test of our runs against the \
                 published value",
                p.published_source, p.rl_only
            ),
            corner: "ticker".into(),
            groups: Vec::new(),
            columns: vec![
                "published SR".into(),
                "ours SR".into(),
                "runs".into(),
                "ours - published".into(),
                "p (H0: ours = published)".into(),
            ],
            rows,
            provenance: vec![
                ("pipeline params".into(), "published SR".into()),
                ("metrics".into(), "ours".into()),
            ],
            mark: "best",
        },
        notes,
    ))
}

/// Per-prompt tables (the paper's Tables III-V): Sharpe of the LLM-only strategy of each
/// prompt version, mean perplexity and mean entropy of its decisions, and failure counts.
pub fn prompt_tables(inputs: &Inputs, p: &GuidedParams, decisions: &Decisions) -> Vec<Table> {
    if p.prompts.is_empty() {
        return Vec::new();
    }
    let tickers: BTreeSet<&str> = decisions
        .keys()
        .filter(|(prompt, _)| p.prompts.contains(prompt))
        .map(|(_, t)| t.as_str())
        .chain(
            inputs
                .metrics_of(&p.env, &p.split)
                .filter(|(k, _)| p.prompts.iter().any(|q| k.strategy == p.prompt_strategy(q)))
                .map(|(k, _)| k.ticker.as_str()),
        )
        .collect();
    let in_split = |d: &&crate::guided::read::Decision| {
        p.split_range.is_none_or(|(a, b)| (a..=b).contains(&d.date))
    };
    let mut sharpe = Vec::new();
    let mut ppl = Vec::new();
    let mut ent = Vec::new();
    let mut fails = Vec::new();
    let mut variety = Vec::new();
    let mut mix = Vec::new();
    for t in &tickers {
        let mut srow = Vec::new();
        let mut svals = Vec::new();
        let (mut prow, mut erow, mut frow) = (Vec::new(), Vec::new(), Vec::new());
        let mut vrow = Vec::new();
        let mut mrow = Vec::new();
        for q in &p.prompts {
            let key = crate::data::Key {
                env: p.env.clone(),
                split: p.split.clone(),
                ticker: (*t).to_string(),
                strategy: p.prompt_strategy(q),
            };
            let sr = inputs.metrics.get(&key).map(|m| m.get(MetricKind::Sr));
            srow.push(sr.map_or_else(missing, |v| cell(fmt_num(v, p.decimals))));
            svals.push(sr);
            match decisions.get(&(q.clone(), (*t).to_string())) {
                Some(ds) => {
                    let ds: Vec<_> = ds.iter().filter(in_split).collect();
                    let ok: Vec<_> = ds.iter().filter(|d| !d.failed).collect();
                    let pm = mean_std(&ds.iter().map(|d| d.perplexity).collect::<Vec<_>>());
                    let em = mean_std(&ok.iter().map(|d| d.entropy).collect::<Vec<_>>());
                    prow.push(cell(mean_std_text(&pm, 3)));
                    erow.push(cell(mean_std_text(&em, 3)));
                    let failed = ds.len() - ok.len();
                    let retried = ds.iter().filter(|d| d.attempts > 1).count();
                    let mut c = cell(format!("{failed}/{} ({retried})", ds.len()));
                    c.bold = failed > 0;
                    frow.push(c);
                    vrow.push(variety_cell(&ok));
                    mrow.push(mix_cell(&ok));
                }
                None => {
                    prow.push(missing());
                    erow.push(missing());
                    frow.push(missing());
                    vrow.push(missing());
                    mrow.push(missing());
                }
            }
        }
        mark_best(&mut srow, &svals, |v| v);
        sharpe.push(((*t).to_string(), srow));
        ppl.push(((*t).to_string(), prow));
        ent.push(((*t).to_string(), erow));
        fails.push(((*t).to_string(), frow));
        variety.push(((*t).to_string(), vrow));
        mix.push(((*t).to_string(), mrow));
    }
    let columns: Vec<String> = p.prompts.clone();
    let table = |caption: String, rows, mark| Table {
        caption,
        corner: "ticker".into(),
        groups: Vec::new(),
        columns: columns.clone(),
        rows,
        provenance: vec![(
            "signals, metrics".into(),
            "decisions and LLM-only metrics".into(),
        )],
        mark,
    };
    vec![
        table(
            format!(
                "Sharpe ratio of the LLM-only strategy per prompt version ({} split; strategy \
                 names {})",
                p.split,
                p.prompt_strategy("<prompt>")
            ),
            sharpe,
            "best",
        ),
        table(
            format!(
                "Perplexity of the strategist's answers, mean (std) over the {} split's decisions",
                p.split
            ),
            ppl,
            "best",
        ),
        table(
            format!(
                "Normalised top-k entropy of the decision token, mean (std) over valid decisions \
                 ({} split)",
                p.split
            ),
            ent,
            "best",
        ),
        table(
            format!(
                "Strategist failures: failed/decisions (decisions needing a retry), {} split; a \
                 failed decision gives the neutral signal",
                p.split
            ),
            fails,
            "warn",
        ),
        table(
            format!(
                "Answer variety over valid decisions ({} split): distinct explanations / \
                 decisions, share LONG; one explanation for every decision means the model \
                 repeated itself rather than read the data",
                p.split
            ),
            variety,
            "warn",
        ),
        table(
            format!(
                "What the model decided ({} split, valid decisions): LONG/SHORT counts, \
                 confidence 1/2/3 counts, certainty median [min, max]; bold when every \
                 decision is the same (direction, confidence). Certainty = eps + (1 - eps)(1 - \
                 H), eps = 1e-4; with constrained answers H is the binary entropy in bits of \
                 q = P(LONG) / (P(LONG) + P(SHORT)) over the tokens the grammar allowed at the \
                 decision step, otherwise the normalised top-k entropy of the decision token",
                p.split
            ),
            mix,
            "warn",
        ),
    ]
}

/// "L 12 / S 3; c 10/4/1; cert 0.81 [0.72, 0.90]" over valid decisions; bold when every
/// decision has the same direction and confidence.
fn mix_cell(ok: &[&&crate::guided::read::Decision]) -> Cell {
    if ok.is_empty() {
        return missing();
    }
    let long = ok.iter().filter(|d| d.direction > 0.0).count();
    let conf = |c: i64| ok.iter().filter(|d| d.confidence == Some(c)).count();
    let mut certs: Vec<f64> = ok.iter().filter_map(|d| d.certainty).collect();
    certs.sort_by(f64::total_cmp);
    let cert = match certs.len() {
        0 => "-".to_string(),
        n => {
            let median = if n % 2 == 1 {
                certs[n / 2]
            } else {
                (certs[n / 2 - 1] + certs[n / 2]) / 2.0
            };
            format!("{median:.2} [{:.2}, {:.2}]", certs[0], certs[n - 1])
        }
    };
    let answers: BTreeSet<(bool, Option<i64>)> = ok
        .iter()
        .map(|d| (d.direction > 0.0, d.confidence))
        .collect();
    let mut c = cell(format!(
        "L {long} / S {}; c {}/{}/{}; cert {cert}",
        ok.len() - long,
        conf(1),
        conf(2),
        conf(3)
    ));
    c.bold = answers.len() <= 1;
    c
}

/// "distinct/valid, LONG share" of valid decisions; bold when every decision has the same
/// explanation (a model repeating itself) or there are none.
fn variety_cell(ok: &[&&crate::guided::read::Decision]) -> Cell {
    let distinct: BTreeSet<&str> = ok.iter().map(|d| d.explanation.as_str()).collect();
    let long = ok.iter().filter(|d| d.direction > 0.0).count();
    let share = if ok.is_empty() {
        "-".to_string()
    } else {
        format!("{:.0}% LONG", 100.0 * long as f64 / ok.len() as f64)
    };
    let mut c = cell(format!("{}/{}, {share}", distinct.len(), ok.len()));
    c.bold = distinct.len() <= 1;
    c
}
