//! The data blocks a strategist prompt can place: `{{market}}`, `{{features}}`, `{{memory}}`,
//! `{{news}}`, `{{period}}`, `{{history}}`. Every block uses data dated <= the decision day t
//! only, speaks in relative days ("day t-5"), and shows prices rebased so that the close of
//! day t is 100 (absolute price levels would let the model recognise the stock and year).
use std::collections::BTreeMap;

use flag_trading::series::Series;

use crate::parse::Direction;

/// Indicator columns the blocks read (all from the `indicators` schema).
pub const COLUMNS: &[&str] = &[
    "sma_20",
    "sma_50",
    "sma_200",
    "rsi_14",
    "macd",
    "macd_signal",
    "macd_hist",
    "ret_1d",
    "ret_5d",
    "ret_20d",
    "vol_20",
    "atr_14",
    "bb_upper",
    "bb_lower",
    "zscore_20",
    "kdj_k",
    "kdj_d",
    "kdj_j",
    "sma_20_slope",
    "sma_50_slope",
    "sma_200_slope",
    "volume_z",
    "rsi_14_z",
    "macd_hist_z",
];

/// A decision already taken for this ticker (the in-context memory of prompt P2+).
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// Row index in the ticker's series.
    pub row: usize,
    pub direction: Direction,
    pub confidence: u8,
    pub features: Vec<(String, f64)>,
    pub explanation: String,
}

/// What the blocks are built from.
pub struct BlockInput<'a> {
    pub series: &'a Series,
    /// Row of the decision day t.
    pub row: usize,
    pub history: usize,
    pub period: usize,
    /// This ticker's earlier decisions (oldest first); the last `max_memory` are shown.
    pub memory: &'a [Decided],
    pub max_memory: usize,
    /// (row, factors) of this ticker's news factors, rows <= t.
    pub news: &'a [(usize, Vec<String>)],
    pub news_days: usize,
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".into(), |v| format!("{:+.2}%", v * 100.0))
}

fn day(k: usize) -> String {
    if k == 0 {
        "day t".into()
    } else {
        format!("day t-{k}")
    }
}

/// All blocks for one decision.
pub fn blocks(b: &BlockInput) -> BTreeMap<&'static str, String> {
    let s = b.series;
    let t = b.row;
    let close = s.close[t];
    let rebase = |x: Option<f64>| x.map(|v| v / close * 100.0);
    let get = |name: &str| s.get(name, t);
    let first = t.saturating_sub(b.history.saturating_sub(1));

    let mut market = String::from("Closing prices, rebased so that the close of day t = 100:\n");
    for i in first..=t {
        market.push_str(&format!(
            "{}: {}\n",
            day(t - i),
            num(rebase(Some(s.close[i])), 2)
        ));
    }
    market.push_str(&format!(
        "Moving averages (same scale): SMA20 {}, SMA50 {}, SMA200 {}\nRSI(14): {}\n\
         MACD(12,26,9) in % of the price: line {}, signal {}, histogram {}",
        num(rebase(get("sma_20")), 2),
        num(rebase(get("sma_50")), 2),
        num(rebase(get("sma_200")), 2),
        num(get("rsi_14"), 1),
        pct(get("macd").map(|v| v / close)),
        pct(get("macd_signal").map(|v| v / close)),
        pct(get("macd_hist").map(|v| v / close)),
    ));

    let bb_pos = match (get("bb_upper"), get("bb_lower")) {
        (Some(u), Some(l)) if u > l => Some((close - l) / (u - l)),
        _ => None,
    };
    let features = format!(
        "Returns: 1-day {}, 5-day {}, 20-day {}\n\
         Volatility: 20-day std of daily returns {}, ATR(14) {} of the price\n\
         Bollinger position (0 = lower band, 1 = upper band): {}; 20-day z-score of the price: {}\n\
         KDJ(9,3,3): K {}, D {}, J {}\n\
         Trend (1-day change of the average): SMA20 {}, SMA50 {}, SMA200 {}\n\
         Z-scores over 20 days: volume {}, RSI {}, MACD histogram {}",
        pct(get("ret_1d")),
        pct(get("ret_5d")),
        pct(get("ret_20d")),
        pct(get("vol_20")),
        pct(get("atr_14").map(|v| v / close)),
        num(bb_pos, 2),
        num(get("zscore_20"), 2),
        num(get("kdj_k"), 1),
        num(get("kdj_d"), 1),
        num(get("kdj_j"), 1),
        pct(get("sma_20_slope")),
        pct(get("sma_50_slope")),
        pct(get("sma_200_slope")),
        num(get("volume_z"), 2),
        num(get("rsi_14_z"), 2),
        num(get("macd_hist_z"), 2),
    );

    let shown = &b.memory[b.memory.len().saturating_sub(b.max_memory)..];
    let memory = if shown.is_empty() {
        "No previous strategies.".to_string()
    } else {
        shown
            .iter()
            .map(|m| {
                let feats: Vec<String> = m.features.iter().map(|(n, w)| format!("{n} {w:.2}")).collect();
                format!(
                    "{}: {} (confidence {}); features: {}; rationale: {}; price change since then: {}",
                    day(t - m.row),
                    m.direction.as_str(),
                    m.confidence,
                    feats.join(", "),
                    m.explanation,
                    pct(Some(close / s.close[m.row] - 1.0)),
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    let oldest = t.saturating_sub(b.news_days.saturating_sub(1));
    let lines: Vec<String> = b
        .news
        .iter()
        .filter(|(r, _)| (oldest..=t).contains(r))
        .flat_map(|(r, fs)| fs.iter().map(move |f| format!("{}: {f}", day(t - r))))
        .collect();
    let news = if lines.is_empty() {
        format!("No news factors in the last {} trading days.", b.news_days)
    } else {
        lines.join("\n")
    };

    [
        ("market", market),
        ("features", features),
        ("memory", memory),
        ("news", news),
        ("period", b.period.to_string()),
        ("history", b.history.to_string()),
    ]
    .into_iter()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_relative_and_rebased() {
        let mut cols = BTreeMap::new();
        cols.insert("sma_20".to_string(), vec![None, None, Some(45.0)]);
        cols.insert("rsi_14".to_string(), vec![None, None, Some(61.34)]);
        let s = Series {
            ticker: "AAPL".into(),
            dates: vec![19000, 19001, 19002],
            close: vec![40.0, 48.0, 50.0],
            cols,
        };
        let memory = [Decided {
            row: 0,
            direction: Direction::Long,
            confidence: 2,
            features: vec![("rsi".into(), 0.5)],
            explanation: "oversold".into(),
        }];
        let news = [(1, vec!["f1".to_string()]), (0, vec!["old".to_string()])];
        let b = blocks(&BlockInput {
            series: &s,
            row: 2,
            history: 2,
            period: 20,
            memory: &memory,
            max_memory: 3,
            news: &news,
            news_days: 2,
        });
        assert!(b["market"].starts_with(
            "Closing prices, rebased so that the close of day t = 100:\nday t-1: 96.00\nday t: 100.00\n\
             Moving averages (same scale): SMA20 90.00, SMA50 n/a, SMA200 n/a\nRSI(14): 61.3\n"
        ), "{}", b["market"]);
        assert_eq!(
            b["memory"],
            "day t-2: LONG (confidence 2); features: rsi 0.50; rationale: oversold; price change since then: +25.00%"
        );
        assert_eq!(b["news"], "day t-1: f1");
        assert_eq!(b["period"], "20");
    }
}
