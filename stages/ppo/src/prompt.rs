//! The state prompt (FLAG-Trader Fig. 3): task text, the legible actions, the state as JSON
//! and the output format, from a plain-text template under `prompts/flag_trader/`.
//!
//! Template syntax: `{{ticker}}`, `{{allowed}}` and `{{state}}` are replaced; a line
//! `---assistant---` splits the user message (above) from the start of the assistant's answer
//! (below, without its final newline). The policy reads the hidden state after that answer
//! prefix (`{"Action": "`), exactly where the model would write the action word, so a head
//! initialised from the action words' embedding rows starts at the model's own preference.

use serde_json::{Map, Value, json};

/// The line that separates the user message from the answer prefix.
pub const ASSISTANT_MARKER: &str = "---assistant---";

/// Root-relative path of a FLAG-Trader prompt.
pub fn prompt_path(name: &str) -> String {
    format!("prompts/flag_trader/{name}.txt")
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateTemplate {
    user: String,
    answer_prefix: String,
}

/// A rendered prompt: the user message and the answer prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptText {
    pub user: String,
    pub answer_prefix: String,
    /// Bytes at the start of `user` that depend on the ticker and the legible actions only
    /// (the template before `{{state}}`): a head many prompts share, whose pass through the
    /// frozen blocks the policy keeps ([`crate::policy::LlmPolicy::frozen_with_head`]). 0 for
    /// none.
    pub head: usize,
}

/// What the state JSON shows on one day.
#[derive(Debug, Clone)]
pub struct StateView<'a> {
    pub ticker: &'a str,
    /// The last closes, oldest first (today's last).
    pub closes: &'a [f64],
    pub cash: f64,
    pub shares: f64,
    pub total_value: f64,
    pub last_rewards: &'a [f64],
    pub last_net_values: &'a [f64],
    pub last_actions: &'a [&'a str],
    /// Legible action names in policy order (masked ones left out).
    pub allowed: &'a [&'a str],
}

/// Rounds for display: prices and money to cents, shares to 4 places, rewards to 4. The
/// prompt shows what a reader would; full precision would only add tokens.
fn round(x: f64, places: i32) -> Value {
    let f = 10f64.powi(places);
    let r = (x * f).round() / f;
    // -0.0 prints as "-0.0"; show 0.
    json!(if r == 0.0 { 0.0 } else { r })
}

impl StateTemplate {
    /// Parses a template; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, String> {
        let marker = format!("\n{ASSISTANT_MARKER}\n");
        let mut parts = text.splitn(2, marker.as_str());
        let user = parts.next().unwrap_or_default().to_string();
        let answer_prefix = parts.next().ok_or_else(|| {
            format!("{file}: no line '{ASSISTANT_MARKER}' before the answer prefix")
        })?;
        let answer_prefix = answer_prefix
            .strip_suffix('\n')
            .unwrap_or(answer_prefix)
            .to_string();
        if !user.contains("{{state}}") {
            return Err(format!(
                "{file}: the user message has no {{{{state}}}} placeholder"
            ));
        }
        if answer_prefix.contains(ASSISTANT_MARKER) {
            return Err(format!("{file}: '{ASSISTANT_MARKER}' appears twice"));
        }
        Ok(StateTemplate {
            user,
            answer_prefix,
        })
    }

    /// The state JSON of one day (keys in a fixed order).
    pub fn state_json(view: &StateView) -> String {
        let mut m = Map::new();
        m.insert(
            "closes".into(),
            Value::Array(view.closes.iter().map(|&c| round(c, 2)).collect()),
        );
        m.insert("cash".into(), round(view.cash, 2));
        m.insert("shares".into(), round(view.shares, 4));
        m.insert("total_value".into(), round(view.total_value, 2));
        m.insert(
            "last_rewards".into(),
            Value::Array(view.last_rewards.iter().map(|&r| round(r, 4)).collect()),
        );
        m.insert(
            "last_net_values".into(),
            Value::Array(view.last_net_values.iter().map(|&v| round(v, 2)).collect()),
        );
        m.insert(
            "last_actions".into(),
            Value::Array(view.last_actions.iter().map(|a| json!(a)).collect()),
        );
        Value::Object(m).to_string()
    }

    pub fn render(&self, view: &StateView) -> PromptText {
        let allowed = view
            .allowed
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let fill = |t: &str| {
            t.replace("{{ticker}}", view.ticker)
                .replace("{{allowed}}", &allowed)
        };
        // `{{state}}` last: the JSON could contain the other placeholders' text.
        let user = fill(&self.user).replace("{{state}}", &Self::state_json(view));
        let head = self
            .user
            .find("{{state}}")
            .map(|at| fill(&self.user[..at]))
            .filter(|h| user.starts_with(h.as_str()))
            .map_or(0, |h| h.len());
        PromptText {
            user,
            answer_prefix: self.answer_prefix.clone(),
            head,
        }
    }

    pub fn answer_prefix(&self) -> &str {
        &self.answer_prefix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_state_and_splits_the_answer_prefix() {
        let t = StateTemplate::parse(
            "Trade {{ticker}}. Allowed: {{allowed}}.\n{{state}}\n---assistant---\n{\"Action\": \"\n",
            "t.txt",
        )
        .unwrap();
        let view = StateView {
            ticker: "MSFT",
            closes: &[210.004, 211.5],
            cash: 0.0,
            shares: 4.716_981_13,
            total_value: 997.641_2,
            last_rewards: &[0.012_34, -0.000_001],
            last_net_values: &[1000.0, 997.641_2],
            last_actions: &["Buy", "Hold"],
            allowed: &["Sell", "Hold"],
        };
        let p = t.render(&view);
        assert_eq!(
            p.user,
            "Trade MSFT. Allowed: \"Sell\", \"Hold\".\n{\"closes\":[210.0,211.5],\"cash\":0.0,\
             \"shares\":4.717,\"total_value\":997.64,\"last_rewards\":[0.0123,0.0],\
             \"last_net_values\":[1000.0,997.64],\"last_actions\":[\"Buy\",\"Hold\"]}"
        );
        assert_eq!(p.answer_prefix, "{\"Action\": \"");
        assert_eq!(
            &p.user[..p.head],
            "Trade MSFT. Allowed: \"Sell\", \"Hold\".\n"
        );
    }

    #[test]
    fn a_template_without_marker_or_state_is_an_error() {
        let e = StateTemplate::parse("{{state}}", "prompts/flag_trader/x.txt").unwrap_err();
        assert!(
            e.contains("prompts/flag_trader/x.txt") && e.contains(ASSISTANT_MARKER),
            "{e}"
        );
        let e = StateTemplate::parse("no state\n---assistant---\nx", "y.txt").unwrap_err();
        assert!(e.contains("{{state}}"), "{e}");
    }
}
