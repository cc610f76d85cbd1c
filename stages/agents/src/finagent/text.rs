//! Charts as text. FinAgent shows a vision model two images: the Kline chart of the last 14
//! trading days (with MA5, Bollinger bands and MACD) and the trading chart (price with the
//! agent's BUY/SELL markers and its cumulative return). A text-only model gets the same
//! series as a table plus a few facts read off them; every number is computed here from
//! closes up to the decision day only, and printed with fixed precision so prompts are
//! byte-stable.
use flag_trading::series::{Series, from_days};

/// Rows in the chart tables (FinAgent's window).
pub const CHART_DAYS: usize = 14;
const BOLL_WINDOW: usize = 20;
const BOLL_K: f64 = 2.0;

/// Indicator values of one day (None while their window is not full).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChartRow {
    pub close: f64,
    pub ma5: Option<f64>,
    pub boll_upper: Option<f64>,
    pub boll_lower: Option<f64>,
    pub macd: f64,
    pub macd_signal: f64,
}

fn ema(prev: f64, x: f64, span: usize) -> f64 {
    let a = 2.0 / (span as f64 + 1.0);
    a * x + (1.0 - a) * prev
}

/// Indicators of `close[..=end]`, one row per day. MA5 and Bollinger (20 days, 2 sample
/// standard deviations) need full windows; MACD is EMA12 - EMA26 with an EMA9 signal, each
/// EMA seeded at the first close (pandas `ewm(adjust=False)`).
pub fn chart_rows(close: &[f64], end: usize) -> Vec<ChartRow> {
    let mut out = Vec::with_capacity(end + 1);
    let (mut e12, mut e26, mut sig) = (close[0], close[0], 0.0);
    for i in 0..=end {
        let c = close[i];
        if i > 0 {
            e12 = ema(e12, c, 12);
            e26 = ema(e26, c, 26);
        }
        let macd = e12 - e26;
        sig = if i == 0 { macd } else { ema(sig, macd, 9) };
        let window = |w: usize| (i + 1 >= w).then(|| &close[i + 1 - w..=i]);
        let ma5 = window(5).map(|w| w.iter().sum::<f64>() / 5.0);
        let (boll_upper, boll_lower) = match window(BOLL_WINDOW) {
            Some(w) => {
                let n = w.len() as f64;
                let m = w.iter().sum::<f64>() / n;
                let sd = (w.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
                (Some(m + BOLL_K * sd), Some(m - BOLL_K * sd))
            }
            None => (None, None),
        };
        out.push(ChartRow {
            close: c,
            ma5,
            boll_upper,
            boll_lower,
            macd,
            macd_signal: sig,
        });
    }
    out
}

fn num(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

fn pct(a: f64, b: f64) -> String {
    format!("{:+.2}%", (b / a - 1.0) * 100.0)
}

/// Percentage moves of the close over 1, 7 and 14 trading days up to day `i`.
pub fn price_moves(s: &Series, i: usize) -> String {
    [1usize, 7, 14]
        .iter()
        .map(|&k| {
            let v = if i >= k {
                pct(s.close[i - k], s.close[i])
            } else {
                "n/a".to_string()
            };
            format!("{k}-day {v}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Today's prices: the close, with open/high/low where the data has them.
pub fn todays_prices(s: &Series, i: usize) -> String {
    let mut parts = Vec::new();
    for name in ["open", "high", "low"] {
        if let Some(v) = s.get(name, i) {
            parts.push(format!("{name} {v:.2}"));
        }
    }
    parts.push(format!("close {:.2}", s.close[i]));
    format!("{}: {}", from_days(s.dates[i]), parts.join(", "))
}

/// The Kline chart of the `CHART_DAYS` trading days up to day `i` as a table plus facts.
pub fn kline_text(s: &Series, i: usize) -> String {
    let rows = chart_rows(&s.close, i);
    let first = (i + 1).saturating_sub(CHART_DAYS);
    let mut t = String::from(
        "date | close | MA5 | Bollinger upper | Bollinger lower | MACD | MACD signal\n",
    );
    for (k, r) in rows.iter().enumerate().skip(first) {
        t.push_str(&format!(
            "{} | {:.2} | {} | {} | {} | {:.3} | {:.3}\n",
            from_days(s.dates[k]),
            r.close,
            num(r.ma5),
            num(r.boll_upper),
            num(r.boll_lower),
            r.macd,
            r.macd_signal
        ));
    }
    let today = rows[i];
    let mut facts = Vec::new();
    if let Some(m) = today.ma5 {
        facts.push(format!(
            "The close is {} its 5-day average.",
            if today.close >= m { "above" } else { "below" }
        ));
    }
    if let (Some(u), Some(l)) = (today.boll_upper, today.boll_lower) {
        let where_ = if today.close > u {
            "above the upper Bollinger band"
        } else if today.close < l {
            "below the lower Bollinger band"
        } else {
            "inside the Bollinger bands"
        };
        facts.push(format!("The close is {where_}."));
    }
    facts.push(format!(
        "MACD is {} its signal line.",
        if today.macd >= today.macd_signal {
            "above"
        } else {
            "below"
        }
    ));
    let crossing = (first.max(1)..=i).rev().find(|&k| {
        let (a, b) = (rows[k - 1], rows[k]);
        (a.macd - a.macd_signal).signum() != (b.macd - b.macd_signal).signum()
    });
    if let Some(k) = crossing {
        facts.push(format!(
            "MACD last crossed {} its signal on {}.",
            if rows[k].macd >= rows[k].macd_signal {
                "above"
            } else {
                "below"
            },
            from_days(s.dates[k])
        ));
    }
    t.push_str(&facts.join(" "));
    t
}

/// One earlier decision on the trading chart.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartDecision {
    pub date: i32,
    pub close: f64,
    pub action: &'static str,
    /// Portfolio value at that close.
    pub value: f64,
}

/// The trading chart: the last `CHART_DAYS` decisions with the close, the action and the
/// cumulative return of the portfolio since the start.
pub fn trading_chart_text(history: &[ChartDecision], initial_capital: f64) -> String {
    if history.is_empty() {
        return "No decisions yet.".to_string();
    }
    let first = history.len().saturating_sub(CHART_DAYS);
    let mut t = String::from("date | close | action | cumulative return\n");
    for d in &history[first..] {
        t.push_str(&format!(
            "{} | {:.2} | {} | {}\n",
            from_days(d.date),
            d.close,
            d.action,
            pct(initial_capital, d.value)
        ));
    }
    t.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indicators_by_hand() {
        let close: Vec<f64> = (1..=25).map(f64::from).collect();
        let rows = chart_rows(&close, 24);
        assert_eq!(rows[3].ma5, None);
        assert_eq!(rows[4].ma5, Some(3.0));
        // Days 6..25: mean 15.5, sample sd of 20 consecutive integers = sqrt(35).
        let u = rows[24].boll_upper.unwrap();
        assert!((u - (15.5 + 2.0 * 35f64.sqrt())).abs() < 1e-9);
        assert_eq!(rows[18].boll_upper, None);
        // EMA seeded at the first close: day 1 EMA12 = 1 + (2/13)(2 - 1).
        let e12 = 1.0 + 2.0 / 13.0;
        let e26 = 1.0 + 2.0 / 27.0;
        assert!((rows[1].macd - (e12 - e26)).abs() < 1e-12);
        assert!((rows[1].macd_signal - 0.2 * (e12 - e26)).abs() < 1e-12);
    }

    #[test]
    fn texts_use_no_later_data() {
        let close: Vec<f64> = (0..40).map(|i| 100.0 + ((i * 7) % 11) as f64).collect();
        let s = Series {
            ticker: "X".into(),
            dates: (0..40).map(|d| 19_000 + d).collect(),
            close: close.clone(),
            cols: Default::default(),
        };
        let mut later = s.clone();
        for c in &mut later.close[31..] {
            *c *= 3.0;
        }
        assert_eq!(kline_text(&s, 30), kline_text(&later, 30));
        assert_eq!(price_moves(&s, 30), price_moves(&later, 30));
        assert_ne!(kline_text(&s, 31), kline_text(&later, 31));
        assert_eq!(kline_text(&s, 30).lines().count(), 1 + CHART_DAYS + 1);
        assert!(price_moves(&s, 3).contains("7-day n/a"));
    }
}
