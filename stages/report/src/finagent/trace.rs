//! One decision day traced through the modules: each module's prompt and answer in the
//! order the method runs them. Markdown shows them as fenced blocks, HTML as `<details>`.
//!
//! The shared [`Block`](crate::render::Block) list has no collapsible block, so each step
//! is a placeholder paragraph that [`splice`] replaces in the rendered Markdown and HTML.
use flag_core::{StageError, StageResult};
use serde_json::Value;

use super::read::FinAgentInputs;
use crate::data::fmt_date;
use crate::tables::html_escape;

/// The `trace` param: which (strategy, ticker, day) to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceKey {
    pub strategy: String,
    pub ticker: String,
    pub date: i32,
}

pub fn parse_key(v: &Value) -> StageResult<Option<TraceKey>> {
    let bad = |m: String| StageError::param("trace", m);
    let m = match v {
        Value::Null => return Ok(None),
        Value::Object(m) => m,
        other => {
            return Err(bad(format!(
                "must be a map {{strategy, ticker, date}}, got {other}"
            )));
        }
    };
    if let Some(k) = m
        .keys()
        .find(|k| !["strategy", "ticker", "date"].contains(&k.as_str()))
    {
        return Err(bad(format!(
            "unknown key '{k}' (expected strategy, ticker, date)"
        )));
    }
    let field = |k: &str| -> StageResult<&str> {
        m.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("'{k}' is missing or not a string")))
    };
    let date = field("date")?;
    let day = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d")
        .map_err(|e| bad(format!("date '{date}' is not YYYY-MM-DD: {e}")))?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    Ok(Some(TraceKey {
        strategy: field("strategy")?.to_string(),
        ticker: field("ticker")?.to_string(),
        date: (day - epoch).num_days() as i32,
    }))
}

/// One module's part of the traced day.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub module: &'static str,
    /// How the module ran that day (called, attempts, failed), or why it has no text.
    pub status: String,
    pub prompt: Option<String>,
    pub answer: Option<String>,
}

fn ran(attempts: i64, failed: bool) -> String {
    format!(
        "called, {attempts} attempt{}{}",
        if attempts == 1 { "" } else { "s" },
        if failed {
            ", failed (no valid answer)"
        } else {
            ""
        }
    )
}

/// The five modules of the day `k`, in the order the method runs them. The key must name
/// a decision (the caller checks).
pub fn steps(fa: &FinAgentInputs, k: &TraceKey) -> Vec<Step> {
    let mut out = Vec::new();
    for (module, name) in [
        ("latest", "Latest market intelligence"),
        ("past", "Past market intelligence"),
    ] {
        let row = fa
            .intel
            .get(&(module.to_string(), k.ticker.clone(), k.date));
        out.push(match row {
            _ if !fa.has_intel => Step {
                module: name,
                status: "no intel input bound".into(),
                prompt: None,
                answer: None,
            },
            None => Step {
                module: name,
                status: "no row for this day in the intel inputs".into(),
                prompt: None,
                answer: None,
            },
            Some(r) if !r.called => Step {
                module: name,
                status: "not called (nothing to read that day)".into(),
                prompt: None,
                answer: None,
            },
            Some(r) => Step {
                module: name,
                status: ran(r.attempts, r.failed),
                prompt: r.prompt.clone(),
                answer: r.raw_text.clone(),
            },
        });
    }
    let low = fa.low.get(&(k.ticker.clone(), k.date));
    out.push(match low {
        _ if !fa.has_low => Step {
            module: "Low-level reflection",
            status: "no low input bound".into(),
            prompt: None,
            answer: None,
        },
        None => Step {
            module: "Low-level reflection",
            status: "no row for this day in the low inputs".into(),
            prompt: None,
            answer: None,
        },
        Some(r) => Step {
            module: "Low-level reflection",
            status: ran(r.attempts, r.failed),
            prompt: Some(r.prompt.clone()),
            answer: Some(r.raw_text.clone()),
        },
    });
    if let Some(d) = fa
        .decisions
        .get(&(k.strategy.clone(), k.ticker.clone(), k.date))
    {
        out.push(if d.high_called {
            Step {
                module: "High-level reflection",
                status: ran(d.high_attempts, d.high_failed),
                prompt: d.high_prompt.clone(),
                answer: d.high_raw_text.clone(),
            }
        } else {
            Step {
                module: "High-level reflection",
                status: "not called (H off, or no earlier decision of this ticker)".into(),
                prompt: None,
                answer: None,
            }
        });
        out.push(Step {
            module: "Decision",
            status: format!("{}; action {}", ran(d.attempts, d.failed), d.action),
            prompt: Some(d.prompt.clone()),
            answer: Some(d.raw_text.clone()),
        });
    }
    out
}

/// Placeholder paragraph of step `i` (control characters no prompt or answer contains).
pub fn marker(i: usize) -> String {
    format!("\u{1}finagent-trace-{i}\u{1}")
}

/// A fence longer than any run of backticks in `text`.
fn fence(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    "`".repeat((longest + 1).max(3))
}

fn step_markdown(n: usize, s: &Step) -> String {
    let mut out = format!("**{n}. {}**: {}.\n\n", s.module, s.status);
    for (what, text) in [("Prompt", &s.prompt), ("Answer", &s.answer)] {
        if let Some(t) = text {
            let f = fence(t);
            out.push_str(&format!("{what}:\n\n{f}text\n{t}\n{f}\n\n"));
        }
    }
    out
}

fn step_html(n: usize, s: &Step) -> String {
    let mut out = format!(
        "<p><b>{n}. {}</b>: {}.</p>\n",
        html_escape(s.module),
        html_escape(&s.status)
    );
    for (what, text) in [("prompt", &s.prompt), ("answer", &s.answer)] {
        if let Some(t) = text {
            out.push_str(&format!(
                "<details><summary>{} {what} ({} characters)</summary>\n<pre>{}</pre>\n</details>\n",
                html_escape(s.module),
                t.chars().count(),
                html_escape(t)
            ));
        }
    }
    out
}

/// Replaces the placeholders of `steps` in the rendered Markdown and HTML.
pub fn splice(markdown: &mut String, html: &mut String, steps: &[Step]) {
    for (i, s) in steps.iter().enumerate() {
        let m = marker(i);
        *markdown = markdown.replacen(&format!("{m}\n\n"), &step_markdown(i + 1, s), 1);
        *html = html.replacen(&format!("<p>{m}</p>\n"), &step_html(i + 1, s), 1);
    }
}

/// The heading line of the traced day.
pub fn title(k: &TraceKey) -> String {
    format!("{} on {}, {}", k.ticker, fmt_date(k.date), k.strategy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_parses_and_names_the_param_on_errors() {
        let k = parse_key(
            &json!({"strategy": "finagent_MLHT", "ticker": "MSFT", "date": "2023-06-01"}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(fmt_date(k.date), "2023-06-01");
        assert_eq!(parse_key(&Value::Null).unwrap(), None);
        for bad in [
            json!({"strategy": "s", "ticker": "MSFT", "date": "June 1"}),
            json!({"strategy": "s", "ticker": "MSFT"}),
            json!({"strategy": "s", "ticker": "MSFT", "date": "2023-06-01", "x": 1}),
            json!("MSFT"),
        ] {
            let e = parse_key(&bad).unwrap_err().to_string();
            assert!(e.contains("trace"), "{e}");
        }
    }

    #[test]
    fn fences_outgrow_the_text() {
        assert_eq!(fence("plain"), "```");
        assert_eq!(fence("a ```` b"), "`````");
    }
}
