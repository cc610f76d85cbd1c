//! What the agent's prompts show of its own state: its position, its last decisions with the
//! move that followed each, and retrieved reflections.
use flag_trading::series::from_days;
use serde::{Deserialize, Serialize};

use super::answer::{Action, HighReflection};
use super::memory_view::Retrieved;

/// One decision of the run, with what the next prompts show of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PastDecision {
    pub date: i32,
    pub close: f64,
    pub action: Action,
    pub reasoning: Option<String>,
    pub value: f64,
}

/// The holding before today's decision, from the environment's (cash, shares, value at the
/// last close).
pub fn position_text((cash, shares, value): (f64, f64, f64)) -> String {
    if shares > 0.0 {
        format!(
            "{shares:.4} shares worth {:.2} (all in), cash {cash:.2}",
            value - cash
        )
    } else {
        format!("no shares, cash {cash:.2}")
    }
}

pub fn decisions_text(history: &[PastDecision], today_close: f64) -> String {
    history
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let next = history.get(k + 1).map_or(today_close, |n| n.close);
            format!(
                "{}. {}: {} at {:.2}; next close {:.2} ({:+.2}%); reasoning: {}",
                k + 1,
                from_days(d.date),
                d.action.as_str(),
                d.close,
                next,
                (next / d.close - 1.0) * 100.0,
                d.reasoning.as_deref().unwrap_or("(no valid answer; held)")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn retrieved_text(hits: &[Retrieved]) -> String {
    if hits.is_empty() {
        return "(none yet)".into();
    }
    let mut v: Vec<&Retrieved> = hits.iter().collect();
    v.sort_by_key(|h| (h.date, h.id.clone()));
    v.iter()
        .map(|h| format!("- [{}] {}", from_days(h.date), h.text))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn high_text(h: &HighReflection) -> String {
    format!("{} Improvement: {}", h.summary, h.improvement)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_history_shows_the_next_close() {
        let h = vec![
            PastDecision {
                date: 19_000,
                close: 100.0,
                action: Action::Buy,
                reasoning: Some("trend up".into()),
                value: 1000.0,
            },
            PastDecision {
                date: 19_001,
                close: 110.0,
                action: Action::Hold,
                reasoning: None,
                value: 1100.0,
            },
        ];
        let t = decisions_text(&h, 99.0);
        assert!(
            t.contains(
                "1. 2022-01-08: BUY at 100.00; next close 110.00 (+10.00%); reasoning: trend up"
            ),
            "{t}"
        );
        assert!(t.contains("2. 2022-01-09: HOLD at 110.00; next close 99.00 (-10.00%); reasoning: (no valid answer; held)"), "{t}");
    }
}
