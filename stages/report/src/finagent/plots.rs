//! Return curves per asset and the full configuration's trades on the price.
use std::collections::{BTreeMap, BTreeSet};

use flag_core::StageResult;
use plotters::prelude::*;

use super::FinAgentParams;
use super::read::FinAgentInputs;
use super::sections::{Config, Out, full, key};
use crate::charts::{self, Mark};
use crate::data::{Inputs, SourceId};
use crate::render::{Block, ChartFile, file_name};

/// Cumulative return in % of several paths on one asset.
fn return_chart(title: &str, lines: &[charts::Line]) -> StageResult<String> {
    let x = charts::x_range(lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)));
    let y = charts::y_range(lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)));
    let legend: Vec<(&str, Mark)> = lines
        .iter()
        .map(|l| (l.label, Mark::Line(l.color)))
        .collect();
    charts::render(title, "cumulative return, %", x, y, &legend, |chart| {
        for line in lines {
            chart.draw_series(LineSeries::new(
                line.points.iter().copied(),
                line.color.stroke_width(2),
            ))?;
        }
        Ok(())
    })
}

/// Section 3: return curves per asset and the full configuration's trades.
pub fn charts(
    out: &mut Out,
    p: &FinAgentParams,
    inputs: &Inputs,
    fa: &FinAgentInputs,
    configs: &[Config],
) -> StageResult<()> {
    out.blocks
        .push(Block::Heading(2, "Returns and trades".into()));
    let mut strategies: Vec<&str> = configs.iter().map(|c| c.strategy.as_str()).collect();
    strategies.push(&p.baseline);
    let tickers: BTreeSet<&str> = inputs
        .equity
        .keys()
        .filter(|k| k.env == p.env && k.split == p.split)
        .filter(|k| configs.iter().any(|c| c.strategy == k.strategy))
        .map(|k| k.ticker.as_str())
        .collect();
    if tickers.is_empty() {
        out.blocks.push(Block::Para(
            "No equity path of a FinAgent configuration in the inputs.".into(),
        ));
        return Ok(());
    }
    out.blocks.push(Block::Para(
        "Cumulative return = value / initial capital - 1, the initial capital being the first \
         row's value / (1 + daily_return) as the equity schema defines it."
            .into(),
    ));
    for ticker in tickers {
        let at = out.charts.len();
        let mut prov: BTreeMap<SourceId, BTreeSet<String>> = BTreeMap::new();
        // The baseline is drawn only over the same days as a configuration.
        let span = |s: &str| {
            let e = inputs.equity.get(&key(p, ticker, s))?;
            Some((e.points.first()?.date, e.points.last()?.date))
        };
        let spans: BTreeSet<(i32, i32)> =
            configs.iter().filter_map(|c| span(&c.strategy)).collect();
        let lines: Vec<charts::Line> = strategies
            .iter()
            .enumerate()
            .filter(|(_, s)| span(s).is_some_and(|x| spans.contains(&x)))
            .filter_map(|(i, s)| {
                let k = key(p, ticker, s);
                let series = inputs.equity.get(&k)?;
                let first = series.points.first()?;
                let initial = first.value / (1.0 + fa.first_return.get(&k).copied().unwrap_or(0.0));
                prov.entry(series.source)
                    .or_default()
                    .insert(format!("equity of {s}"));
                Some(charts::Line {
                    label: s,
                    color: charts::color(i),
                    points: series
                        .points
                        .iter()
                        .map(|x| (x.date, (x.value / initial - 1.0) * 100.0))
                        .collect(),
                })
            })
            .collect();
        let title = format!("{ticker}: cumulative return ({}, {})", p.env, p.split);
        out.charts.push(ChartFile {
            file: file_name(&mut out.used, &["finagent", "returns", ticker]),
            alt: title.clone(),
            svg: return_chart(&title, &lines)?,
        });
        if let Some(c) = full(configs) {
            let k = key(p, ticker, &c.strategy);
            if let Some(eq) = inputs.equity.get(&k) {
                let (from, to) = (
                    eq.points.first().map_or(0, |x| x.date),
                    eq.points.last().map_or(0, |x| x.date),
                );
                let prices = match inputs.closes(ticker, from, to) {
                    Some((closes, src)) => {
                        prov.entry(src).or_default().insert("close prices".into());
                        closes
                    }
                    None => eq.points.iter().map(|x| (x.date, x.price)).collect(),
                };
                let trades = inputs.trades.get(&k);
                if let Some(t) = trades {
                    prov.entry(t.source)
                        .or_default()
                        .insert(format!("trades of {}", c.strategy));
                }
                let list = trades.map_or(&[][..], |t| &t.trades[..]);
                let title = format!(
                    "{ticker}: trades of {} ({}, {} trade{})",
                    c.strategy,
                    c.modules,
                    list.len(),
                    if list.len() == 1 { "" } else { "s" }
                );
                out.charts.push(ChartFile {
                    file: file_name(&mut out.used, &["finagent", "trades", ticker]),
                    alt: title.clone(),
                    svg: charts::trades_chart(&title, &prices, list)?,
                });
            }
        }
        out.blocks.push(Block::Heading(3, ticker.to_string()));
        out.blocks.push(Block::Figures(
            (at..out.charts.len()).collect(),
            prov.into_iter()
                .map(|(src, w)| {
                    (
                        inputs.sources[src].clone(),
                        w.into_iter().collect::<Vec<_>>().join(", "),
                    )
                })
                .collect(),
        ));
    }
    Ok(())
}
