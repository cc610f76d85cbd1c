//! Tables as data (cells, bold marks, provenance), rendered to Markdown and HTML.
use std::collections::{BTreeMap, BTreeSet};

use crate::data::{Inputs, Key, MetricKind, SourceId, fmt_date};

#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub text: String,
    pub bold: bool,
}

impl Cell {
    fn missing() -> Cell {
        Cell {
            text: "–".into(),
            bold: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Table {
    pub caption: String,
    /// Header of the row-label column.
    pub corner: String,
    /// Column groups (label, width); empty when the table has one header row.
    pub groups: Vec<(String, usize)>,
    pub columns: Vec<String>,
    pub rows: Vec<(String, Vec<Cell>)>,
    /// Which input reference each number came from: (reference, what it supplied).
    pub provenance: Vec<(String, String)>,
    /// CSS class of bold cells: "best" (a winner) or "warn" (a defect worth a look).
    pub mark: &'static str,
}

/// Fixed-decimal text of a metric; "-0.00" is printed as "0.00" and non-finite values as
/// words, so every printed number parses back to the value it came from.
pub fn fmt_num(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        return "n/a".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let s = format!("{v:.decimals$}");
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => s,
    }
}

/// A plain (not bold) cell.
pub(crate) fn cell(text: String) -> Cell {
    Cell { text, bold: false }
}

/// "mean (std)", or the value alone for a single run.
pub(crate) fn mean_std_text(m: &crate::stats::MeanStd, d: usize) -> String {
    match m.n {
        0 => "–".into(),
        1 => fmt_num(m.mean, d),
        _ => format!("{} ({})", fmt_num(m.mean, d), fmt_num(m.std, d)),
    }
}

/// Marks the best finite value(s) of `values` (by `score`, higher is better) in bold; values
/// that print the same as the best are tied and bold too.
pub(crate) fn mark_best(cells: &mut [Cell], values: &[Option<f64>], score: impl Fn(f64) -> f64) {
    let best = values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.filter(|x| x.is_finite()).map(|x| (i, score(x))))
        .fold(None::<(usize, f64)>, |acc, (i, s)| match acc {
            Some((_, b)) if b >= s => acc,
            _ => Some((i, s)),
        });
    if let Some((i, _)) = best {
        let text = cells[i].text.clone();
        for (c, v) in cells.iter_mut().zip(values) {
            if v.is_some_and(f64::is_finite) && c.text == text {
                c.bold = true;
            }
        }
    }
}

/// Strategies listed per source, for the provenance line.
fn provenance(
    inputs: &Inputs,
    used: &BTreeMap<SourceId, BTreeSet<String>>,
    noun: &str,
) -> Vec<(String, String)> {
    used.iter()
        .map(|(src, names)| {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            (
                inputs.sources[*src].clone(),
                format!("{noun} {}", names.join(", ")),
            )
        })
        .collect()
}

/// FinAgent Table 4: rows = strategies, a group of six metric columns per asset.
pub fn metrics_table(inputs: &Inputs, env: &str, split: &str, decimals: usize) -> Option<Table> {
    let rows: Vec<(&Key, _)> = inputs.metrics_of(env, split).collect();
    if rows.is_empty() {
        return None;
    }
    let strategies: BTreeSet<&str> = rows.iter().map(|(k, _)| k.strategy.as_str()).collect();
    let tickers: BTreeSet<&str> = rows.iter().map(|(k, _)| k.ticker.as_str()).collect();
    let start = rows.iter().map(|(_, m)| m.start).min().unwrap_or_default();
    let end = rows.iter().map(|(_, m)| m.end).max().unwrap_or_default();

    let mut grid: Vec<Vec<Cell>> = Vec::new();
    let mut values: Vec<Vec<Option<f64>>> = Vec::new();
    let mut used: BTreeMap<SourceId, BTreeSet<String>> = BTreeMap::new();
    for s in &strategies {
        let (mut cells, mut vals) = (Vec::new(), Vec::new());
        for t in &tickers {
            let key = Key {
                env: env.into(),
                split: split.into(),
                ticker: (*t).into(),
                strategy: (*s).into(),
            };
            let m = inputs.metrics.get(&key);
            if let Some(m) = m {
                used.entry(m.source).or_default().insert((*s).to_string());
            }
            for k in MetricKind::ALL {
                let v = m.map(|m| m.get(k));
                cells.push(v.map_or_else(Cell::missing, |v| Cell {
                    text: fmt_num(v, decimals),
                    bold: false,
                }));
                vals.push(v);
            }
        }
        grid.push(cells);
        values.push(vals);
    }
    // Best per column, down the strategies.
    let ncols = tickers.len() * MetricKind::ALL.len();
    for col in 0..ncols {
        let kind = MetricKind::ALL[col % MetricKind::ALL.len()];
        let mut column: Vec<Cell> = grid.iter().map(|r| r[col].clone()).collect();
        let vals: Vec<Option<f64>> = values.iter().map(|r| r[col]).collect();
        mark_best(&mut column, &vals, |v| kind.score(v));
        for (r, c) in grid.iter_mut().zip(column) {
            r[col] = c;
        }
    }
    Some(Table {
        caption: format!(
            "{env} environment, {split} split, {} to {}: best value per column in bold \
             (ARR, SR, CR, SoR: higher is better; MDD, VOL: lower is better).",
            fmt_date(start),
            fmt_date(end)
        ),
        corner: "Strategy".into(),
        groups: tickers
            .iter()
            .map(|t| (t.to_string(), MetricKind::ALL.len()))
            .collect(),
        columns: tickers
            .iter()
            .flat_map(|_| MetricKind::ALL.iter().map(|k| metric_header(*k)))
            .collect(),
        rows: strategies.iter().map(|s| s.to_string()).zip(grid).collect(),
        provenance: provenance(inputs, &used, "strategies"),
        mark: "best",
    })
}

fn metric_header(k: MetricKind) -> String {
    format!(
        "{}{}",
        k.label(),
        if k.higher_is_better() { "↑" } else { "↓" }
    )
}

/// TDQN Table 6: rows = assets, columns = strategies, cells = Sharpe ratio.
pub fn sharpe_table(inputs: &Inputs, env: &str, split: &str, decimals: usize) -> Option<Table> {
    let rows: Vec<(&Key, _)> = inputs.metrics_of(env, split).collect();
    if rows.is_empty() {
        return None;
    }
    let strategies: BTreeSet<&str> = rows.iter().map(|(k, _)| k.strategy.as_str()).collect();
    let tickers: BTreeSet<&str> = rows.iter().map(|(k, _)| k.ticker.as_str()).collect();
    let mut used: BTreeMap<SourceId, BTreeSet<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for t in &tickers {
        let vals: Vec<Option<f64>> = strategies
            .iter()
            .map(|s| {
                let key = Key {
                    env: env.into(),
                    split: split.into(),
                    ticker: (*t).into(),
                    strategy: (*s).into(),
                };
                inputs.metrics.get(&key).map(|m| {
                    used.entry(m.source).or_default().insert((*s).to_string());
                    m.get(MetricKind::Sr)
                })
            })
            .collect();
        let mut cells: Vec<Cell> = vals
            .iter()
            .map(|v| {
                v.map_or_else(Cell::missing, |v| Cell {
                    text: fmt_num(v, decimals),
                    bold: false,
                })
            })
            .collect();
        mark_best(&mut cells, &vals, |v| v);
        out.push((t.to_string(), cells));
    }
    Some(Table {
        caption: format!(
            "Sharpe ratio, {env} environment, {split} split: best strategy per asset in bold."
        ),
        corner: "Asset".into(),
        groups: Vec::new(),
        columns: strategies.iter().map(|s| s.to_string()).collect(),
        rows: out,
        provenance: provenance(inputs, &used, "strategies"),
        mark: "best",
    })
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('*', "\\*")
}

pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

impl Table {
    /// Markdown has one header row, so grouped columns read "AAPL ARR%↑".
    pub fn to_markdown(&self) -> String {
        let mut s = format!("_{}_\n\n", md_escape(&self.caption));
        let headers: Vec<String> = if self.groups.is_empty() {
            self.columns.clone()
        } else {
            let mut h = Vec::new();
            let mut cols = self.columns.iter();
            for (g, n) in &self.groups {
                for c in cols.by_ref().take(*n) {
                    h.push(format!("{g} {c}"));
                }
            }
            h
        };
        s.push_str(&format!("| {} |", md_escape(&self.corner)));
        for h in &headers {
            s.push_str(&format!(" {} |", md_escape(h)));
        }
        s.push_str("\n|---|");
        s.push_str(&"---:|".repeat(headers.len()));
        s.push('\n');
        for (label, cells) in &self.rows {
            s.push_str(&format!("| {} |", md_escape(label)));
            for c in cells {
                if c.bold {
                    s.push_str(&format!(" **{}** |", c.text));
                } else {
                    s.push_str(&format!(" {} |", c.text));
                }
            }
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&self.provenance_markdown());
        s
    }

    fn provenance_markdown(&self) -> String {
        let parts: Vec<String> = self
            .provenance
            .iter()
            .map(|(r, what)| format!("`{r}` ({})", md_escape(what)))
            .collect();
        format!("Source: {}.\n", parts.join("; "))
    }

    pub fn to_html(&self) -> String {
        // The caption sits outside the table so a narrow table does not squeeze it.
        let mut s = format!(
            "<p class=\"cap\">{}</p>\n<div class=\"table-wrap\"><table>\n<thead>\n",
            html_escape(&self.caption)
        );
        if self.groups.is_empty() {
            s.push_str(&format!(
                "<tr><th class=\"rowh\">{}</th>",
                html_escape(&self.corner)
            ));
            for c in &self.columns {
                s.push_str(&format!("<th>{}</th>", html_escape(c)));
            }
            s.push_str("</tr>\n");
        } else {
            s.push_str(&format!(
                "<tr><th class=\"rowh\" rowspan=\"2\">{}</th>",
                html_escape(&self.corner)
            ));
            for (g, n) in &self.groups {
                s.push_str(&format!(
                    "<th class=\"group\" colspan=\"{n}\">{}</th>",
                    html_escape(g)
                ));
            }
            s.push_str("</tr>\n<tr>");
            for (i, c) in self.columns.iter().enumerate() {
                let first = self.group_start(i);
                s.push_str(&format!(
                    "<th{}>{}</th>",
                    if first { " class=\"gs\"" } else { "" },
                    html_escape(c)
                ));
            }
            s.push_str("</tr>\n");
        }
        s.push_str("</thead>\n<tbody>\n");
        for (label, cells) in &self.rows {
            s.push_str(&format!(
                "<tr><th class=\"rowh\">{}</th>",
                html_escape(label)
            ));
            for (i, c) in cells.iter().enumerate() {
                let mut class = Vec::new();
                if self.group_start(i) {
                    class.push("gs");
                }
                if c.bold {
                    class.push(self.mark);
                }
                let attr = if class.is_empty() {
                    String::new()
                } else {
                    format!(" class=\"{}\"", class.join(" "))
                };
                let text = html_escape(&c.text);
                if c.bold {
                    s.push_str(&format!("<td{attr}><b>{text}</b></td>"));
                } else {
                    s.push_str(&format!("<td{attr}>{text}</td>"));
                }
            }
            s.push_str("</tr>\n");
        }
        s.push_str("</tbody>\n</table></div>\n");
        let parts: Vec<String> = self
            .provenance
            .iter()
            .map(|(r, what)| format!("<code>{}</code> ({})", html_escape(r), html_escape(what)))
            .collect();
        s.push_str(&format!(
            "<p class=\"prov\">Source: {}.</p>\n",
            parts.join("; ")
        ));
        s
    }

    /// True for the first column of a group (drawn with a left rule).
    fn group_start(&self, col: usize) -> bool {
        let mut at = 0;
        for (_, n) in &self.groups {
            if col == at {
                return true;
            }
            at += n;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_without_negative_zero() {
        assert_eq!(fmt_num(-0.001, 2), "0.00");
        assert_eq!(fmt_num(-0.006, 2), "-0.01");
        assert_eq!(fmt_num(12.345, 1), "12.3");
        assert_eq!(fmt_num(f64::INFINITY, 2), "inf");
        assert_eq!(fmt_num(f64::NAN, 2), "n/a");
    }

    #[test]
    fn best_skips_missing_and_non_finite_and_bolds_ties() {
        let vals = [Some(1.0), None, Some(f64::INFINITY), Some(1.004), Some(0.5)];
        let mut cells: Vec<Cell> = vals
            .iter()
            .map(|v| {
                v.map_or_else(Cell::missing, |v| Cell {
                    text: fmt_num(v, 2),
                    bold: false,
                })
            })
            .collect();
        mark_best(&mut cells, &vals, |v| v);
        let bold: Vec<bool> = cells.iter().map(|c| c.bold).collect();
        assert_eq!(bold, [true, false, false, true, false]);
        // Lower is better for drawdown, whatever its sign.
        let vals = [Some(-30.0), Some(-12.0), Some(-50.0)];
        let mut cells: Vec<Cell> = vals
            .iter()
            .map(|v| Cell {
                text: fmt_num(v.unwrap(), 2),
                bold: false,
            })
            .collect();
        mark_best(&mut cells, &vals, |v| MetricKind::Mdd.score(v));
        assert!(cells[1].bold && !cells[0].bold && !cells[2].bold);
    }
}
