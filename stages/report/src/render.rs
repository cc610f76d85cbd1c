//! Assembles the report as a list of blocks and writes it as Markdown and as HTML.
use std::collections::{BTreeMap, BTreeSet};

use flag_core::StageResult;

use crate::ReportParams;
use crate::charts::{self, Line};
use crate::data::{Inputs, Key, MetricKind, SourceId};
use crate::quality::Quality;
use crate::tables::{self, Table, fmt_num, html_escape};

pub struct ChartFile {
    /// File name inside `charts/`.
    pub file: String,
    pub alt: String,
    pub svg: String,
}

/// Writes a built report into `dir`: report.md, report.html and charts/*.svg.
pub fn write_files(dir: &std::path::Path, report: &Report) -> flag_core::StageResult<()> {
    use flag_core::StageError;
    let charts_dir = dir.join("charts");
    std::fs::create_dir_all(&charts_dir)
        .map_err(|e| StageError::io(format!("creating {}", charts_dir.display()), e))?;
    let write = |name: &std::path::Path, bytes: &[u8]| {
        std::fs::write(name, bytes)
            .map_err(|e| StageError::io(format!("writing {}", name.display()), e))
    };
    for chart in &report.charts {
        write(&charts_dir.join(&chart.file), chart.svg.as_bytes())?;
    }
    write(&dir.join("report.md"), report.markdown.as_bytes())?;
    write(&dir.join("report.html"), report.html.as_bytes())
}

pub struct Report {
    pub markdown: String,
    pub html: String,
    pub charts: Vec<ChartFile>,
    pub tables: usize,
}

pub(crate) enum Block {
    Heading(u8, String),
    Para(String),
    Table(Table),
    /// Indices into `Report::charts`, with the provenance line of the group.
    Figures(Vec<usize>, Vec<(String, String)>),
}

/// Chart file names keep to [A-Za-z0-9._-]; a clash after cleaning gets a number.
pub(crate) fn file_name(used: &mut BTreeSet<String>, parts: &[&str]) -> String {
    let clean: Vec<String> = parts
        .iter()
        .map(|p| {
            p.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        })
        .collect();
    let base = clean.join("_");
    let mut name = format!("{base}.svg");
    let mut n = 2;
    while used.contains(&name) {
        name = format!("{base}_{n}.svg");
        n += 1;
    }
    used.insert(name.clone());
    name
}

pub fn build(p: &ReportParams, inputs: &Inputs, quality: Option<&Quality>) -> StageResult<Report> {
    let mut blocks = Vec::new();
    let mut charts: Vec<ChartFile> = Vec::new();
    let mut used_names = BTreeSet::new();
    let mut ntables = 0;
    let envs: BTreeSet<&str> = inputs
        .envs()
        .into_iter()
        .chain(inputs.equity.keys().map(|k| k.env.as_str()))
        .collect();

    blocks.push(Block::Para(format!(
        "Splits shown: {}. Values printed with {} decimals; every number is read from the input \
         artifacts named under each table and chart.",
        p.splits.join(", "),
        p.decimals
    )));

    blocks.push(Block::Heading(2, "Metrics by strategy and asset".into()));
    for env in &envs {
        for split in &p.splits {
            if let Some(t) = tables::metrics_table(inputs, env, split, p.decimals) {
                blocks.push(Block::Heading(3, format!("{env} · {split}")));
                blocks.push(Block::Table(t));
                ntables += 1;
            }
        }
    }

    blocks.push(Block::Heading(
        2,
        format!("Sharpe ratio by asset ({} split)", p.sharpe_split),
    ));
    let mut any = false;
    for env in &envs {
        if let Some(t) = tables::sharpe_table(inputs, env, &p.sharpe_split, p.decimals) {
            blocks.push(Block::Heading(3, env.to_string()));
            blocks.push(Block::Table(t));
            ntables += 1;
            any = true;
        }
    }
    if !any {
        blocks.push(Block::Para(format!(
            "No metrics for the '{}' split.",
            p.sharpe_split
        )));
    }

    blocks.push(Block::Heading(2, "Charts".into()));
    // One colour per strategy for the whole report, so charts compare at a glance.
    let strategies: Vec<&str> = inputs
        .metrics
        .keys()
        .chain(inputs.equity.keys())
        .map(|k| k.strategy.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for env in &envs {
        for split in &p.splits {
            let tickers: BTreeSet<&str> = inputs
                .metrics
                .keys()
                .chain(inputs.equity.keys())
                .filter(|k| k.env == *env && k.split == *split)
                .map(|k| k.ticker.as_str())
                .collect();
            if tickers.is_empty() {
                continue;
            }
            blocks.push(Block::Heading(3, format!("{env} · {split}")));
            for ticker in tickers {
                let at = charts.len();
                let prov = asset_charts(
                    inputs,
                    (*env, split.as_str(), ticker),
                    &strategies,
                    p.decimals,
                    &mut charts,
                    &mut used_names,
                )?;
                if charts.len() > at {
                    blocks.push(Block::Heading(4, ticker.to_string()));
                    blocks.push(Block::Figures((at..charts.len()).collect(), prov));
                }
            }
        }
    }

    if let Some(q) = quality {
        blocks.push(Block::Heading(2, "Data quality".into()));
        if q.rows.is_empty() {
            blocks.push(Block::Para("The ingest report has no rows.".into()));
        } else {
            blocks.push(Block::Table(q.table()));
            ntables += 1;
        }
        let clean = q.clean_columns();
        if !clean.is_empty() {
            blocks.push(Block::Para(format!(
                "Found in no file: {}.",
                clean
                    .iter()
                    .map(|c| c.replace('_', " "))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        for (format, note) in &q.notes {
            let who = if format.is_empty() {
                String::new()
            } else {
                format!("{format}: ")
            };
            blocks.push(Block::Para(format!("{who}{note}")));
        }
    }

    blocks.push(Block::Heading(2, "Inputs".into()));
    blocks.push(Block::Para(
        inputs
            .sources
            .iter()
            .chain(quality.map(|q| q.sources.iter()).into_iter().flatten())
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", "),
    ));

    Ok(Report {
        markdown: markdown(&p.title, &blocks, &charts),
        html: html(&p.title, &blocks, &charts),
        charts,
        tables: ntables,
    })
}

/// Equity, drawdown and price/trade charts of one asset; returns their provenance.
fn asset_charts(
    inputs: &Inputs,
    (env, split, ticker): (&str, &str, &str),
    strategies: &[&str],
    decimals: usize,
    out: &mut Vec<ChartFile>,
    used: &mut BTreeSet<String>,
) -> StageResult<Vec<(String, String)>> {
    let key = |s: &str| Key {
        env: env.into(),
        split: split.into(),
        ticker: ticker.into(),
        strategy: s.into(),
    };
    let mut prov: BTreeMap<SourceId, BTreeSet<&str>> = BTreeMap::new();
    let series: Vec<(usize, &str, &crate::data::Series)> = strategies
        .iter()
        .enumerate()
        .filter_map(|(i, s)| inputs.equity.get(&key(s)).map(|x| (i, *s, x)))
        .collect();
    let what = format!("{ticker}, {env}, {split}");
    if !series.is_empty() {
        for (_, _, s) in &series {
            prov.entry(s.source).or_default().insert("equity");
        }
        let lines: Vec<Line> = series
            .iter()
            .map(|(i, s, x)| Line {
                label: s,
                color: charts::color(*i),
                points: x.points.iter().map(|p| (p.date, p.value)).collect(),
            })
            .collect();
        out.push(ChartFile {
            file: file_name(used, &["equity", env, split, ticker]),
            alt: format!("Portfolio value, {what}"),
            svg: charts::equity_chart(
                &format!("{ticker}: portfolio value ({env}, {split})"),
                &lines,
            )?,
        });
        let dd: Vec<Line> = series
            .iter()
            .map(|(i, s, x)| Line {
                label: s,
                color: charts::color(*i),
                points: charts::drawdown(&x.points),
            })
            .collect();
        out.push(ChartFile {
            file: file_name(used, &["drawdown", env, split, ticker]),
            alt: format!("Drawdown, {what}"),
            svg: charts::drawdown_chart(&format!("{ticker}: drawdown ({env}, {split})"), &dd)?,
        });
    }

    // The best strategy is the one the metrics table ranks first by Sharpe ratio.
    let best = strategies
        .iter()
        .filter_map(|s| inputs.metrics.get(&key(s)).map(|m| (*s, m)))
        .filter(|(_, m)| m.get(MetricKind::Sr).is_finite())
        .fold(
            None::<(&str, &crate::data::Metric)>,
            |acc, (s, m)| match acc {
                Some((_, b)) if b.get(MetricKind::Sr) >= m.get(MetricKind::Sr) => acc,
                _ => Some((s, m)),
            },
        );
    if let Some((s, m)) = best {
        prov.entry(m.source)
            .or_default()
            .insert("best strategy by SR");
        let eq = inputs.equity.get(&key(s));
        let (from, to) = eq
            .and_then(|e| Some((e.points.first()?.date, e.points.last()?.date)))
            .unwrap_or((m.start, m.end));
        // Bars are the better price source; the equity path's valuation price is the fallback.
        let prices = match inputs.closes(ticker, from, to) {
            Some((c, src)) => {
                prov.entry(src).or_default().insert("close prices");
                Some(c)
            }
            None => eq.map(|e| {
                prov.entry(e.source).or_default().insert("close prices");
                e.points.iter().map(|p| (p.date, p.price)).collect()
            }),
        };
        if let Some(prices) = prices {
            let trades = inputs.trades.get(&key(s));
            if let Some(t) = trades {
                prov.entry(t.source).or_default().insert("trades");
            }
            let list = trades.map_or(&[][..], |t| &t.trades[..]);
            let title = format!(
                "{ticker}: trades of {s}, SR {} ({env}, {split})",
                fmt_num(m.get(MetricKind::Sr), decimals)
            );
            out.push(ChartFile {
                file: file_name(used, &["trades", env, split, ticker]),
                alt: format!("Close price and trades of {s}, {what}"),
                svg: charts::trades_chart(&title, &prices, list)?,
            });
        }
    }
    Ok(prov
        .into_iter()
        .map(|(src, w)| {
            (
                inputs.sources[src].clone(),
                w.into_iter().collect::<Vec<_>>().join(", "),
            )
        })
        .collect())
}

pub(crate) fn markdown(title: &str, blocks: &[Block], charts: &[ChartFile]) -> String {
    let mut s = format!("# {title}\n\n");
    for b in blocks {
        match b {
            Block::Heading(level, text) => {
                s.push_str(&format!("{} {text}\n\n", "#".repeat(*level as usize)));
            }
            Block::Para(text) => s.push_str(&format!("{text}\n\n")),
            Block::Table(t) => {
                s.push_str(&t.to_markdown());
                s.push('\n');
            }
            Block::Figures(ids, prov) => {
                for i in ids {
                    let c = &charts[*i];
                    s.push_str(&format!("![{}](charts/{})\n", c.alt, c.file));
                }
                let parts: Vec<String> = prov.iter().map(|(r, w)| format!("`{r}` ({w})")).collect();
                s.push_str(&format!("\nSource: {}.\n\n", parts.join("; ")));
            }
        }
    }
    s
}

const CSS: &str = include_str!("report.css");

/// Inline SVG needs no namespace declaration in HTML; dropping it keeps the page free of
/// any URL-looking text.
fn inline_svg(svg: &str) -> String {
    svg.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1)
        .replacen("xmlns=\"http://www.w3.org/2000/svg\"", "", 1)
}

/// Anchor of a heading; numbered so repeated headings (e.g. per env) stay unique.
fn anchor(n: usize) -> String {
    format!("s{n}")
}

/// Turns `code` spans of a plain paragraph into HTML.
fn inline_code(text: &str) -> String {
    let mut out = String::new();
    for (i, part) in text.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str(&format!("<code>{}</code>", html_escape(part)));
        } else {
            out.push_str(&html_escape(part));
        }
    }
    out
}

pub(crate) fn html(title: &str, blocks: &[Block], charts: &[ChartFile]) -> String {
    let t = html_escape(title);
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t}</title>\n<style>\n{CSS}</style>\n</head>\n<body>\n<main>\n<h1>{t}</h1>\n"
    );
    // Table of contents from the level-2 and level-3 headings.
    let toc: Vec<(u8, usize, &str)> = blocks
        .iter()
        .enumerate()
        .filter_map(|(n, b)| match b {
            Block::Heading(l @ (2 | 3), text) => Some((*l, n, text.as_str())),
            _ => None,
        })
        .collect();
    s.push_str("<nav class=\"toc\"><ul>\n");
    for (i, (level, n, text)) in toc.iter().enumerate() {
        let link = format!("<a href=\"#{}\">{}</a>", anchor(*n), html_escape(text));
        let next = toc.get(i + 1).map(|x| x.0);
        match (level, next) {
            (2, Some(3)) => s.push_str(&format!("<li>{link}<ul>\n")),
            (2, _) => s.push_str(&format!("<li>{link}</li>\n")),
            (_, Some(3)) => s.push_str(&format!("<li>{link}</li>\n")),
            _ => s.push_str(&format!("<li>{link}</li></ul></li>\n")),
        }
    }
    s.push_str("</ul></nav>\n");
    for (n, b) in blocks.iter().enumerate() {
        match b {
            Block::Heading(level, text) => {
                s.push_str(&format!(
                    "<h{level} id=\"{}\">{}</h{level}>\n",
                    anchor(n),
                    html_escape(text)
                ));
            }
            Block::Para(text) => s.push_str(&format!("<p>{}</p>\n", inline_code(text))),
            Block::Table(t) => s.push_str(&t.to_html()),
            Block::Figures(ids, prov) => {
                s.push_str("<div class=\"figs\">\n");
                for i in ids {
                    let c = &charts[*i];
                    s.push_str(&format!(
                        "<figure data-file=\"charts/{}\" aria-label=\"{}\">\n{}</figure>\n",
                        html_escape(&c.file),
                        html_escape(&c.alt),
                        inline_svg(&c.svg)
                    ));
                }
                s.push_str("</div>\n");
                let parts: Vec<String> = prov
                    .iter()
                    .map(|(r, w)| format!("<code>{}</code> ({})", html_escape(r), html_escape(w)))
                    .collect();
                s.push_str(&format!(
                    "<p class=\"prov\">Source: {}.</p>\n",
                    parts.join("; ")
                ));
            }
        }
    }
    s.push_str("</main>\n</body>\n</html>\n");
    s
}
