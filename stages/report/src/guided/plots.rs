//! The two charts of the LLM-guided RL paper: price with the RL agent's trades and the
//! LLM's periodic signals, and the Sharpe ratio over training episodes with a band over runs.
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::charts::{
    self, BUY, FONT, HEIGHT, INK, LABEL_SIZE, Mark, SELL, WIDTH, draw_legend, err, legend_layout,
    render, x_range, y_range,
};
use crate::data::Trade;
use crate::guided::read::Decision;
use flag_core::StageResult;

/// Close price, the agent's trades (small triangles) and each LLM decision as a circle on
/// the price at its decision date: green LONG, red SHORT, grey failed (no view), radius
/// growing with the signal strength.
pub fn signals_chart(
    title: &str,
    prices: &[(i32, f64)],
    trades: &[Trade],
    decisions: &[Decision],
) -> StageResult<String> {
    let x = x_range(prices.iter().map(|p| p.0));
    let y = y_range(prices.iter().map(|p| p.1));
    let price_at = |d: i32| -> Option<f64> {
        let i = prices.partition_point(|p| p.0 < d);
        prices.get(i).filter(|p| p.0 == d).map(|p| p.1)
    };
    let price_color = RGBColor(0x55, 0x5f, 0x6d);
    let none = RGBColor(0x99, 0x99, 0x99);
    let legend = [
        ("close", Mark::Line(price_color)),
        ("RL buy", Mark::Up(BUY)),
        ("RL sell", Mark::Down(SELL)),
        ("LLM LONG (size = strength)", Mark::Line(BUY)),
        ("LLM SHORT", Mark::Line(SELL)),
    ];
    render(title, "close price", x, y, &legend, |chart| {
        chart.draw_series(LineSeries::new(
            prices.iter().copied(),
            price_color.stroke_width(2),
        ))?;
        chart.draw_series(decisions.iter().filter_map(|d| {
            let p = price_at(d.date)?;
            let color = if d.failed || d.direction == 0.0 {
                none
            } else if d.direction > 0.0 {
                BUY
            } else {
                SELL
            };
            let r = 3 + (d.strength.clamp(0.0, 1.0) * 9.0).round() as i32;
            Some(Circle::new((d.date, p), r, color.mix(0.35).filled()))
        }))?;
        charts::draw_trades(chart, trades, 9)
    })
}

/// One agent's mean over runs and a band around it (the episode chart: mean +- one sample
/// standard deviation; the FLAG-Trader training charts: min..max).
pub struct Band<'a> {
    pub label: &'a str,
    pub color: RGBColor,
    /// (x, mean, lower, upper).
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// Sharpe ratio against training episode for each agent: a line for the mean over runs and
/// a shaded band for +- one standard deviation.
pub fn episodes_chart(title: &str, y_desc: &str, bands: &[Band]) -> StageResult<String> {
    band_chart(title, "training episode", y_desc, bands)
}

/// A line per band (its mean) over a numeric x axis, with the band's lower..upper shaded.
pub fn band_chart(title: &str, x_desc: &str, y_desc: &str, bands: &[Band]) -> StageResult<String> {
    let xs = bands.iter().flat_map(|b| b.points.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (x0, x1) = if x0.is_finite() && x1 > x0 {
        (x0, x1)
    } else {
        (0.0, 1.0)
    };
    let y = y_range(
        bands
            .iter()
            .flat_map(|b| b.points.iter().flat_map(|p| [p.1, p.2, p.3])),
    );
    let legend: Vec<(&str, Mark)> = bands
        .iter()
        .map(|b| (b.label, Mark::Line(b.color)))
        .collect();
    let labels: Vec<&str> = legend.iter().map(|l| l.0).collect();
    let (_, legend_h) = legend_layout(&labels);
    let mut svg = String::new();
    {
        let e = err(title);
        let root =
            SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT + legend_h)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (plot, strip) = root.split_vertically(HEIGHT);
        let mut chart = ChartBuilder::on(&plot)
            .caption(title, (FONT, 24).into_font().color(&INK))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(86)
            .build_cartesian_2d(x0..x1, y.0..y.1)
            .map_err(&e)?;
        let span = y.1 - y.0;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| charts::y_label(*v, span))
            .x_labels(8)
            .y_labels(7)
            .label_style((FONT, LABEL_SIZE).into_font().color(&INK))
            .axis_desc_style(
                (FONT, LABEL_SIZE)
                    .into_font()
                    .color(&INK)
                    .pos(Pos::new(HPos::Center, VPos::Center)),
            )
            .bold_line_style(INK.mix(0.10))
            .light_line_style(TRANSPARENT)
            .axis_style(INK.mix(0.6))
            .draw()
            .map_err(&e)?;
        for b in bands {
            let finite: Vec<&(f64, f64, f64, f64)> = b
                .points
                .iter()
                .filter(|p| p.2.is_finite() && p.3.is_finite())
                .collect();
            if finite.len() > 1 {
                let mut outline: Vec<(f64, f64)> = finite.iter().map(|p| (p.0, p.3)).collect();
                outline.extend(finite.iter().rev().map(|p| (p.0, p.2)));
                chart
                    .draw_series(std::iter::once(Polygon::new(outline, b.color.mix(0.18))))
                    .map_err(&e)?;
            }
            chart
                .draw_series(LineSeries::new(
                    b.points.iter().map(|p| (p.0, p.1)),
                    b.color.stroke_width(2),
                ))
                .map_err(&e)?;
        }
        draw_legend(&strip, &legend).map_err(&e)?;
        root.present().map_err(&e)?;
    }
    Ok(svg)
}
