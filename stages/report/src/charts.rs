//! SVG charts drawn with plotters' SVG backend.
//!
//! Text is emitted as SVG `<text>` in the generic `sans-serif` family and laid out with
//! plotters' built-in size estimate (no `ttf` feature), so drawing needs no font files and
//! the viewer's own sans-serif face renders the labels, offline.
use chrono::Datelike;
use plotters::coord::Shift;
use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::types::{RangedCoordf64, RangedCoordi32};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::data::{EquityPoint, Trade, date_of};
use flag_core::{StageError, StageResult};

pub const WIDTH: u32 = 760;
/// Height of the plot; the legend strip below adds to it.
pub const HEIGHT: u32 = 380;
pub(crate) const FONT: &str = "sans-serif";

/// Tableau 10: distinguishable, colour-blind aware, calm on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xba, 0xb0, 0xac),
];
pub(crate) const BUY: RGBColor = RGBColor(0x1a, 0x9a, 0x50);
pub(crate) const SELL: RGBColor = RGBColor(0xd7, 0x30, 0x27);
pub(crate) const INK: RGBColor = RGBColor(0x33, 0x33, 0x33);

/// Colour of the n-th strategy, stable across all charts of a report.
pub fn color(n: usize) -> RGBColor {
    PALETTE[n % PALETTE.len()]
}

/// One line of a multi-line chart.
pub struct Line<'a> {
    pub label: &'a str,
    pub color: RGBColor,
    pub points: Vec<(i32, f64)>,
}

pub(crate) fn err(what: &str) -> impl Fn(DrawingAreaErrorKind<std::io::Error>) -> StageError + '_ {
    move |e| StageError::external(format!("drawing {what}"), e)
}

/// Tick dates at month starts, every 1, 2, 3, 6, 12 or 24 months so that at most eight
/// labels fit; short spans fall back to evenly spaced days.
pub fn date_ticks(from: i32, to: i32) -> (Vec<i32>, &'static str) {
    let month_index = |d: i32| date_of(d).map(|x| x.year() * 12 + x.month0() as i32);
    let (Some(m0), Some(m1)) = (month_index(from), month_index(to)) else {
        return (vec![from, to], "%Y-%m-%d");
    };
    for step in [1, 2, 3, 6, 12, 24, 60] {
        let mut ticks = Vec::new();
        let mut m = m0 + (step - m0.rem_euclid(step)) % step;
        while m <= m1 {
            let day =
                chrono::NaiveDate::from_ymd_opt(m.div_euclid(12), m.rem_euclid(12) as u32 + 1, 1)
                    .and_then(|d| {
                        d.signed_duration_since(chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?)
                            .num_days()
                            .try_into()
                            .ok()
                    });
            if let Some(day) = day.filter(|d| (from..=to).contains(d)) {
                ticks.push(day);
            }
            m += step;
        }
        if ticks.len() >= 3 && ticks.len() <= 8 {
            return (ticks, if step >= 12 { "%Y" } else { "%b %Y" });
        }
        if ticks.len() < 3 {
            break;
        }
    }
    let step = ((to - from) / 5).max(1);
    (
        (0..=5)
            .map(|i| from + i * step)
            .filter(|d| *d <= to)
            .collect(),
        "%Y-%m-%d",
    )
}

fn date_label(d: i32, fmt: &str) -> String {
    date_of(d)
        .map(|x| x.format(fmt).to_string())
        .unwrap_or_default()
}

/// Decimals for y labels of a given span, and thousands separators for large values.
pub(crate) fn y_label(v: f64, span: f64) -> String {
    // Seven labels over the span: whole numbers once a step is >= ~3.
    let dec = if span >= 20.0 {
        0
    } else if span >= 2.0 {
        1
    } else {
        2
    };
    let s = crate::tables::fmt_num(v, dec);
    let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(a, b)| (a, b));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

/// Padded min..max of the finite values (a flat series gets a visible band).
pub(crate) fn y_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo {
        hi - lo
    } else {
        lo.abs().max(1.0) * 0.1
    };
    (lo - span * 0.05, hi + span * 0.05)
}

pub(crate) fn x_range(points: impl Iterator<Item = i32>) -> (i32, i32) {
    let (lo, hi) = points.fold((i32::MAX, i32::MIN), |(a, b), d| (a.min(d), b.max(d)));
    if lo > hi {
        (0, 1)
    } else if lo == hi {
        (lo - 1, hi + 1)
    } else {
        (lo, hi)
    }
}

pub(crate) type Area<'b> = DrawingArea<SVGBackend<'b>, Shift>;
pub(crate) type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<WithKeyPoints<RangedCoordi32>, RangedCoordf64>>;
pub(crate) type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// How a legend entry is drawn.
#[derive(Clone, Copy)]
pub enum Mark {
    Line(RGBColor),
    Up(RGBColor),
    Down(RGBColor),
}

pub(crate) fn up(x: i32, y: i32) -> Vec<(i32, i32)> {
    vec![(x, y - 6), (x - 6, y + 5), (x + 6, y + 5)]
}

pub(crate) fn down(x: i32, y: i32) -> Vec<(i32, i32)> {
    vec![(x, y + 6), (x - 6, y - 5), (x + 6, y - 5)]
}

/// Legend entries laid out left to right below the plot, wrapping; returns (x, y) per entry
/// and the strip height. Widths use an average glyph width, as the SVG viewer picks the font.
pub(crate) fn legend_layout(labels: &[&str]) -> (Vec<(i32, i32)>, u32) {
    let (left, right, row_h) = (90, WIDTH as i32 - 16, 24);
    let (mut x, mut y) = (left, row_h / 2 + 4);
    let mut at = Vec::new();
    for l in labels {
        let w = 26 + (l.chars().count() as f64 * 0.58 * LEGEND_PX).ceil() as i32 + 22;
        if x + w > right && x > left {
            x = left;
            y += row_h;
        }
        at.push((x, y));
        x += w;
    }
    (at, (y + row_h / 2 + 4) as u32)
}

/// Rendered pixel size of legend text (plotters writes font-size = size / 1.24).
const LEGEND_PX: f64 = LABEL_SIZE / 1.24;
pub(crate) const LABEL_SIZE: f64 = 18.0;

pub(crate) fn draw_legend(area: &Area, items: &[(&str, Mark)]) -> DrawResult {
    let labels: Vec<&str> = items.iter().map(|i| i.0).collect();
    let (at, _) = legend_layout(&labels);
    let font = (FONT, LABEL_SIZE)
        .into_font()
        .color(&INK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for ((label, mark), (x, y)) in items.iter().zip(at) {
        match *mark {
            Mark::Line(c) => area.draw(&PathElement::new(
                vec![(x, y), (x + 20, y)],
                c.stroke_width(3),
            ))?,
            Mark::Up(c) => area.draw(&Polygon::new(up(x + 10, y), c.filled()))?,
            Mark::Down(c) => area.draw(&Polygon::new(down(x + 10, y), c.filled()))?,
        }
        area.draw(&Text::new(label.to_string(), (x + 26, y), font.clone()))?;
    }
    Ok(())
}

/// A titled date/value chart with a legend strip below it; `body` draws the data.
pub(crate) fn render(
    title: &str,
    y_desc: &str,
    x: (i32, i32),
    y: (f64, f64),
    legend: &[(&str, Mark)],
    body: impl FnOnce(&mut Chart) -> DrawResult,
) -> StageResult<String> {
    let labels: Vec<&str> = legend.iter().map(|i| i.0).collect();
    let (_, legend_h) = legend_layout(&labels);
    let mut svg = String::new();
    {
        let e = err(title);
        let root =
            SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT + legend_h)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let (plot, strip) = root.split_vertically(HEIGHT);
        let (ticks, fmt) = date_ticks(x.0, x.1);
        let span = y.1 - y.0;
        let mut chart = ChartBuilder::on(&plot)
            .caption(title, (FONT, 24).into_font().color(&INK))
            .margin(14)
            .x_label_area_size(34)
            .y_label_area_size(86)
            .build_cartesian_2d((x.0..x.1).with_key_points(ticks), y.0..y.1)
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_label_formatter(&|d| date_label(*d, fmt))
            .y_label_formatter(&|v| y_label(*v, span))
            .y_labels(7)
            .y_desc(y_desc)
            .label_style((FONT, LABEL_SIZE).into_font().color(&INK))
            .axis_desc_style((FONT, LABEL_SIZE).into_font().color(&INK))
            .bold_line_style(INK.mix(0.10))
            .light_line_style(TRANSPARENT)
            .axis_style(INK.mix(0.6))
            .draw()
            .map_err(&e)?;
        body(&mut chart).map_err(&e)?;
        draw_legend(&strip, legend).map_err(&e)?;
        root.present().map_err(&e)?;
    }
    Ok(svg)
}

fn lines_chart(title: &str, y_desc: &str, lines: &[Line], y: (f64, f64)) -> StageResult<String> {
    let x = x_range(lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)));
    let legend: Vec<(&str, Mark)> = lines
        .iter()
        .map(|l| (l.label, Mark::Line(l.color)))
        .collect();
    render(title, y_desc, x, y, &legend, |chart| {
        for line in lines {
            chart.draw_series(LineSeries::new(
                line.points.iter().copied(),
                line.color.stroke_width(2),
            ))?;
        }
        Ok(())
    })
}

/// Portfolio value of every strategy on one asset.
pub fn equity_chart(title: &str, lines: &[Line]) -> StageResult<String> {
    let y = y_range(lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)));
    lines_chart(title, "portfolio value", lines, y)
}

/// Drawdown from the running peak, in %, derived from an equity path (presentation only).
pub fn drawdown(points: &[EquityPoint]) -> Vec<(i32, f64)> {
    let mut peak = f64::NEG_INFINITY;
    points
        .iter()
        .map(|p| {
            peak = peak.max(p.value);
            let dd = if peak > 0.0 {
                (p.value / peak - 1.0) * 100.0
            } else {
                0.0
            };
            (p.date, dd)
        })
        .collect()
}

pub fn drawdown_chart(title: &str, lines: &[Line]) -> StageResult<String> {
    let lo = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::min);
    // 0 is the ceiling of a drawdown; a small band above it keeps the peak lines visible.
    let span = (-lo).max(1.0);
    lines_chart(
        title,
        "drawdown from peak, %",
        lines,
        (lo - span * 0.05, span * 0.03),
    )
}

/// Close price with the trades of one strategy: buys ▲ below the price, sells ▼ above.
pub fn trades_chart(title: &str, prices: &[(i32, f64)], trades: &[Trade]) -> StageResult<String> {
    let x = x_range(
        prices
            .iter()
            .map(|p| p.0)
            .chain(trades.iter().map(|t| t.date)),
    );
    let y = y_range(
        prices
            .iter()
            .map(|p| p.1)
            .chain(trades.iter().map(|t| t.price)),
    );
    let price_color = RGBColor(0x55, 0x5f, 0x6d);
    let legend = [
        ("close", Mark::Line(price_color)),
        ("buy", Mark::Up(BUY)),
        ("sell", Mark::Down(SELL)),
    ];
    render(title, "close price", x, y, &legend, |chart| {
        chart.draw_series(LineSeries::new(
            prices.iter().copied(),
            price_color.stroke_width(2),
        ))?;
        draw_trades(chart, trades, 10)
    })
}

/// Buy ▲ and sell ▼ markers of `trades`, `size` pixels tall, just off the execution price so
/// the price line stays visible.
pub(crate) fn draw_trades(chart: &mut Chart, trades: &[Trade], size: i32) -> DrawResult {
    chart.draw_series(trades.iter().filter(|t| t.buy).map(|t| {
        EmptyElement::at((t.date, t.price)) + Polygon::new(up(0, size), BUY.mix(0.9).filled())
    }))?;
    chart.draw_series(trades.iter().filter(|t| !t.buy).map(|t| {
        EmptyElement::at((t.date, t.price)) + Polygon::new(down(0, -size), SELL.mix(0.9).filled())
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(y: i32, m: u32, d: u32) -> i32 {
        (chrono::NaiveDate::from_ymd_opt(y, m, d).unwrap()
            - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap())
        .num_days() as i32
    }

    #[test]
    fn ticks_are_month_starts_within_range() {
        let (t, fmt) = date_ticks(day(2018, 1, 2), day(2019, 12, 31));
        let labels: Vec<String> = t.iter().map(|d| date_label(*d, "%Y-%m-%d")).collect();
        assert_eq!(
            labels,
            [
                "2018-04-01",
                "2018-07-01",
                "2018-10-01",
                "2019-01-01",
                "2019-04-01",
                "2019-07-01",
                "2019-10-01"
            ]
        );
        assert_eq!(fmt, "%b %Y");
        let (t, fmt) = date_ticks(day(2012, 1, 3), day(2017, 12, 29));
        assert_eq!(t.len(), 5);
        assert_eq!(fmt, "%Y");
        let (t, _) = date_ticks(day(2020, 3, 2), day(2020, 3, 20));
        assert!(
            t.len() >= 3
                && t.iter()
                    .all(|d| (day(2020, 3, 2)..=day(2020, 3, 20)).contains(d))
        );
    }

    #[test]
    fn y_labels_group_thousands() {
        assert_eq!(y_label(12345.0, 1000.0), "12,345");
        assert_eq!(y_label(-1234.6, 1000.0), "-1,235");
        assert_eq!(y_label(999.0, 1000.0), "999");
        assert_eq!(y_label(1.25, 1.0), "1.25");
    }

    #[test]
    fn drawdown_is_zero_at_peaks() {
        let p = |date, value| EquityPoint {
            date,
            price: 1.0,
            value,
        };
        let dd = drawdown(&[p(0, 100.0), p(1, 80.0), p(2, 120.0), p(3, 90.0)]);
        let want = [(0, 0.0), (1, -20.0), (2, 0.0), (3, -25.0)];
        assert_eq!(dd.len(), want.len());
        for (got, want) in dd.iter().zip(want) {
            assert!(
                got.0 == want.0 && (got.1 - want.1).abs() < 1e-9,
                "{got:?} vs {want:?}"
            );
        }
    }
}
