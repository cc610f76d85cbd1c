//! FinAgent's two charts as PNG images for a vision model (`chart_images: true` with
//! `backend: openai`): the Kline chart of the last `CHART_DAYS` trading days (close, MA5,
//! Bollinger bands; MACD and its signal in a lower panel, the histogram as bars) and the
//! trading chart (close with BUY/SELL markers; cumulative return in a lower panel). The same
//! series as the text tables of `text.rs`, from closes up to the decision day only.
//!
//! Drawn by plotters into an RGB buffer and encoded by png: no text (no font is needed, so the
//! bytes depend on nothing but the data); the prompt keeps the text table with the dates and
//! values. Identical data gives identical bytes.
use plotters::prelude::*;

use super::text::{CHART_DAYS, ChartDecision, chart_rows};
use flag_core::{StageError, StageResult};
use flag_trading::series::Series;

pub const WIDTH: u32 = 640;
pub const HEIGHT: u32 = 480;
const CLOSE: RGBColor = RGBColor(20, 20, 20);
const MA5: RGBColor = RGBColor(31, 119, 180);
const BAND: RGBColor = RGBColor(150, 150, 150);
const MACD: RGBColor = RGBColor(214, 39, 40);
const SIGNAL: RGBColor = RGBColor(44, 160, 44);
const BUY: RGBColor = RGBColor(0, 150, 0);
const SELL: RGBColor = RGBColor(200, 0, 0);

fn draw_err<E: std::fmt::Debug>(e: E) -> StageError {
    StageError::Invalid(format!("drawing a chart: {e:?}"))
}

/// (min, max) of the finite values, widened by 5% (and to a unit range when flat).
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (-1.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9 * hi.abs().max(1.0));
    (lo - pad, hi + pad)
}

fn encode(rgb: &[u8]) -> StageResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(draw_err)?;
    w.write_image_data(rgb).map_err(draw_err)?;
    w.finish().map_err(draw_err)?;
    Ok(out)
}

/// A panel over x in [-0.5, n - 0.5] and y in `y`, with a y grid and no text.
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, plotters::coord::Shift>,
    n: f64,
    y: (f64, f64),
) -> StageResult<
    ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
> {
    let mut c = ChartBuilder::on(area)
        .margin(8)
        .build_cartesian_2d(-0.5..n - 0.5, y.0..y.1)
        .map_err(draw_err)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(0)
        .draw()
        .map_err(draw_err)?;
    Ok(c)
}

/// A line over x = 0.. of the values that are present.
fn line(values: &[Option<f64>]) -> Vec<(f64, f64)> {
    values
        .iter()
        .enumerate()
        .filter_map(|(k, v)| v.map(|v| (k as f64, v)))
        .collect()
}

/// The Kline chart of the `CHART_DAYS` trading days up to day `i`.
pub fn kline_png(s: &Series, i: usize) -> StageResult<Vec<u8>> {
    let rows = chart_rows(&s.close, i);
    let first = (i + 1).saturating_sub(CHART_DAYS);
    let rows = &rows[first..];
    let n = rows.len() as f64;
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (top, bottom) = root.split_vertically(HEIGHT * 2 / 3);
        let mut c = panel(
            &top,
            n,
            range(rows.iter().flat_map(|r| {
                [Some(r.close), r.ma5, r.boll_upper, r.boll_lower]
                    .into_iter()
                    .flatten()
            })),
        )?;
        for (vals, color) in [
            (rows.iter().map(|r| r.boll_upper).collect::<Vec<_>>(), BAND),
            (rows.iter().map(|r| r.boll_lower).collect(), BAND),
            (rows.iter().map(|r| r.ma5).collect(), MA5),
            (rows.iter().map(|r| Some(r.close)).collect(), CLOSE),
        ] {
            c.draw_series(LineSeries::new(line(&vals), color.stroke_width(2)))
                .map_err(draw_err)?;
        }
        let mut m = panel(
            &bottom,
            n,
            range(rows.iter().flat_map(|r| [r.macd, r.macd_signal, 0.0])),
        )?;
        m.draw_series(rows.iter().enumerate().map(|(k, r)| {
            let h = r.macd - r.macd_signal;
            let color = if h >= 0.0 { SIGNAL } else { MACD };
            Rectangle::new(
                [(k as f64 - 0.3, 0.0), (k as f64 + 0.3, h)],
                color.mix(0.4).filled(),
            )
        }))
        .map_err(draw_err)?;
        for (vals, color) in [
            (rows.iter().map(|r| Some(r.macd)).collect::<Vec<_>>(), MACD),
            (rows.iter().map(|r| Some(r.macd_signal)).collect(), SIGNAL),
        ] {
            m.draw_series(LineSeries::new(line(&vals), color.stroke_width(2)))
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    encode(&buf)
}

/// The trading chart of the last `CHART_DAYS` decisions: closes with BUY (up triangle,
/// green) and SELL (down triangle, red) markers; the cumulative return below.
pub fn trading_png(history: &[ChartDecision], initial_capital: f64) -> StageResult<Vec<u8>> {
    let first = history.len().saturating_sub(CHART_DAYS);
    let h = &history[first..];
    let n = h.len().max(1) as f64;
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (top, bottom) = root.split_vertically(HEIGHT * 2 / 3);
        let mut c = panel(&top, n, range(h.iter().map(|d| d.close)))?;
        let closes: Vec<Option<f64>> = h.iter().map(|d| Some(d.close)).collect();
        c.draw_series(LineSeries::new(line(&closes), CLOSE.stroke_width(2)))
            .map_err(draw_err)?;
        c.draw_series(h.iter().enumerate().filter_map(|(k, d)| {
            let at = (k as f64, d.close);
            match d.action {
                "BUY" => Some(TriangleMarker::new(at, 9, BUY.filled())),
                "SELL" => Some(TriangleMarker::new(at, 9, SELL.filled())),
                _ => None,
            }
        }))
        .map_err(draw_err)?;
        let ret: Vec<Option<f64>> = h
            .iter()
            .map(|d| Some(d.value / initial_capital - 1.0))
            .collect();
        let mut r = panel(
            &bottom,
            n,
            range(ret.iter().flatten().copied().chain([0.0])),
        )?;
        r.draw_series(LineSeries::new(line(&ret), MA5.stroke_width(2)))
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    encode(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(close: Vec<f64>) -> Series {
        let n = close.len();
        Series {
            ticker: "T".into(),
            dates: (0..n as i32).map(|d| 19000 + d).collect(),
            close,
            cols: Default::default(),
        }
    }

    fn decode(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(png_bytes);
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn prices(n: usize) -> Vec<f64> {
        (0..n)
            .map(|k| 100.0 + (k as f64 * 0.7).sin() * 5.0 + k as f64 * 0.2)
            .collect()
    }

    #[test]
    fn kline_png_is_a_real_deterministic_image_of_past_data_only() {
        let mut close = prices(60);
        let a = kline_png(&series(close.clone()), 40).unwrap();
        assert_eq!(&a[..8], b"\x89PNG\r\n\x1a\n");
        let (w, h, px) = decode(&a);
        assert_eq!((w, h), (WIDTH, HEIGHT));
        // Not blank: the close line's dark pixels are there.
        assert!(px.chunks(3).any(|p| p == [20, 20, 20]));
        assert_eq!(a, kline_png(&series(close.clone()), 40).unwrap());
        // Later prices change nothing; an earlier one does.
        for c in close.iter_mut().skip(41) {
            *c *= 3.0;
        }
        assert_eq!(a, kline_png(&series(close.clone()), 40).unwrap());
        close[39] += 4.0;
        assert_ne!(a, kline_png(&series(close), 40).unwrap());
    }

    #[test]
    fn trading_png_marks_buys_and_sells() {
        let close = prices(10);
        let action = |k: usize| match k {
            2 => "BUY",
            6 => "SELL",
            _ => "HOLD",
        };
        let h: Vec<ChartDecision> = close
            .iter()
            .enumerate()
            .map(|(k, &c)| ChartDecision {
                date: 19000 + k as i32,
                close: c,
                action: action(k),
                value: 1e4 * (1.0 + k as f64 / 100.0),
            })
            .collect();
        let (_, _, px) = decode(&trading_png(&h, 1e4).unwrap());
        assert!(px.chunks(3).any(|p| p == [0, 150, 0]), "a BUY marker");
        assert!(px.chunks(3).any(|p| p == [200, 0, 0]), "a SELL marker");
        let holds: Vec<ChartDecision> = h
            .iter()
            .map(|d| ChartDecision {
                action: "HOLD",
                ..d.clone()
            })
            .collect();
        let (_, _, px) = decode(&trading_png(&holds, 1e4).unwrap());
        assert!(!px.chunks(3).any(|p| p == [0, 150, 0] || p == [200, 0, 0]));
        assert!(trading_png(&[], 1e4).is_ok());
    }
}
