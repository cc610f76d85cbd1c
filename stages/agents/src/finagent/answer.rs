//! FinAgent's module answers, parsed and range-checked (model output is untrusted input).
//! The bounds agree with the JSON Schemas in `prompts/finagent/`, which the embedded decoder
//! enforces; an HTTP backend's answer is held to the same checks here.
use serde::{Deserialize, Serialize};

use crate::parse::{ParseError, parse_object};

/// Longest intelligence summary (characters after whitespace normalisation). The bounds
/// keep a 135M model that writes up to the limit affordable on a CPU.
pub const MAX_SUMMARY_CHARS: usize = 300;
/// Longest reasoning, improvement or analysis text.
pub const MAX_REASON_CHARS: usize = 200;
/// Longest retrieval query.
pub const MAX_QUERY_CHARS: usize = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Horizon {
    #[serde(rename = "SHORT-TERM")]
    Short,
    #[serde(rename = "MEDIUM-TERM")]
    Medium,
    #[serde(rename = "LONG-TERM")]
    Long,
}

impl Horizon {
    pub const ALL: [Horizon; 3] = [Horizon::Short, Horizon::Medium, Horizon::Long];
    pub fn as_str(self) -> &'static str {
        match self {
            Horizon::Short => "SHORT-TERM",
            Horizon::Medium => "MEDIUM-TERM",
            Horizon::Long => "LONG-TERM",
        }
    }
    /// The `query_type` of the memory_queries table.
    pub fn query_type(self) -> &'static str {
        match self {
            Horizon::Short => "short",
            Horizon::Medium => "medium",
            Horizon::Long => "long",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Sentiment {
    Positive,
    Negative,
    Neutral,
}

impl Sentiment {
    pub fn as_str(self) -> &'static str {
        match self {
            Sentiment::Positive => "POSITIVE",
            Sentiment::Negative => "NEGATIVE",
            Sentiment::Neutral => "NEUTRAL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Buy,
    Sell,
    Hold,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Buy => "BUY",
            Action::Sell => "SELL",
            Action::Hold => "HOLD",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Right,
    Wrong,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemAnalysis {
    pub duration: Horizon,
    pub sentiment: Sentiment,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queries {
    pub short_term: String,
    pub medium_term: String,
    pub long_term: String,
}

impl Queries {
    pub fn by_horizon(&self) -> [(Horizon, &str); 3] {
        [
            (Horizon::Short, self.short_term.as_str()),
            (Horizon::Medium, self.medium_term.as_str()),
            (Horizon::Long, self.long_term.as_str()),
        ]
    }
}

/// Latest market intelligence: one analysis per news item (in the prompt's order), a summary
/// and three retrieval queries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntelAnswer {
    pub analysis: Vec<ItemAnalysis>,
    pub summary: String,
    pub queries: Queries,
}

/// Past market intelligence: the same analysis over retrieved items, and a summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PastIntelAnswer {
    pub analysis: Vec<ItemAnalysis>,
    pub summary: String,
}

/// Low-level reflection on price movements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LowReflection {
    pub short_term: String,
    pub medium_term: String,
    pub long_term: String,
    pub query: String,
}

/// High-level reflection on the agent's own recent decisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HighReflection {
    pub verdicts: Vec<Verdict>,
    pub improvement: String,
    pub summary: String,
    pub query: String,
}

/// The trading decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    pub analysis: String,
    pub action: Action,
    pub reasoning: String,
}

/// Whitespace-normalised `text`, or an error naming `field` if it is empty or too long.
fn clean(text: &str, field: &str, max: usize) -> Result<String, ParseError> {
    let t = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let n = t.chars().count();
    if n < 3 || n > max {
        return Err(ParseError::Json(format!(
            "{field} must be 3 to {max} characters, got {n}"
        )));
    }
    Ok(t)
}

fn count(field: &str, got: usize, expected: usize) -> Result<(), ParseError> {
    if got != expected {
        return Err(ParseError::Json(format!(
            "{field} has {got} entries, expected exactly {expected} (one per item, in order)"
        )));
    }
    Ok(())
}

fn clean_queries(q: Queries) -> Result<Queries, ParseError> {
    Ok(Queries {
        short_term: clean(&q.short_term, "queries.short_term", MAX_QUERY_CHARS)?,
        medium_term: clean(&q.medium_term, "queries.medium_term", MAX_QUERY_CHARS)?,
        long_term: clean(&q.long_term, "queries.long_term", MAX_QUERY_CHARS)?,
    })
}

/// An intelligence answer for `n_items` news items.
pub fn parse_intel(answer: &str, n_items: usize) -> Result<IntelAnswer, ParseError> {
    let a: IntelAnswer = parse_object(answer)?;
    count("analysis", a.analysis.len(), n_items)?;
    Ok(IntelAnswer {
        summary: clean(&a.summary, "summary", MAX_SUMMARY_CHARS)?,
        queries: clean_queries(a.queries)?,
        analysis: a.analysis,
    })
}

pub fn parse_past_intel(answer: &str, n_items: usize) -> Result<PastIntelAnswer, ParseError> {
    let a: PastIntelAnswer = parse_object(answer)?;
    count("analysis", a.analysis.len(), n_items)?;
    Ok(PastIntelAnswer {
        summary: clean(&a.summary, "summary", MAX_SUMMARY_CHARS)?,
        analysis: a.analysis,
    })
}

pub fn parse_low_reflection(answer: &str) -> Result<LowReflection, ParseError> {
    let a: LowReflection = parse_object(answer)?;
    Ok(LowReflection {
        short_term: clean(&a.short_term, "short_term", MAX_REASON_CHARS)?,
        medium_term: clean(&a.medium_term, "medium_term", MAX_REASON_CHARS)?,
        long_term: clean(&a.long_term, "long_term", MAX_REASON_CHARS)?,
        query: clean(&a.query, "query", MAX_QUERY_CHARS)?,
    })
}

/// A high-level reflection over `n_decisions` earlier decisions.
pub fn parse_high_reflection(
    answer: &str,
    n_decisions: usize,
) -> Result<HighReflection, ParseError> {
    let a: HighReflection = parse_object(answer)?;
    count("verdicts", a.verdicts.len(), n_decisions)?;
    Ok(HighReflection {
        improvement: clean(&a.improvement, "improvement", MAX_REASON_CHARS)?,
        summary: clean(&a.summary, "summary", MAX_REASON_CHARS)?,
        query: clean(&a.query, "query", MAX_QUERY_CHARS)?,
        verdicts: a.verdicts,
    })
}

pub fn parse_decision(answer: &str) -> Result<Decision, ParseError> {
    let a: Decision = parse_object(answer)?;
    Ok(Decision {
        analysis: clean(&a.analysis, "analysis", MAX_REASON_CHARS)?,
        reasoning: clean(&a.reasoning, "reasoning", MAX_REASON_CHARS)?,
        action: a.action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intel_answers_are_checked_against_the_item_count() {
        let ok = r#"{"analysis": [{"duration": "SHORT-TERM", "sentiment": "POSITIVE"},
            {"duration": "LONG-TERM", "sentiment": "NEUTRAL"}], "summary": "Demand  is strong.",
            "queries": {"short_term": "earnings beat", "medium_term": "product cycle",
            "long_term": "market share"}}"#;
        let a = parse_intel(ok, 2).unwrap();
        assert_eq!(a.summary, "Demand is strong.");
        assert_eq!(a.analysis[1].duration, Horizon::Long);
        assert_eq!(a.queries.by_horizon()[2], (Horizon::Long, "market share"));
        let e = parse_intel(ok, 3).unwrap_err().to_string();
        assert!(
            e.contains("analysis has 2 entries, expected exactly 3"),
            "{e}"
        );
        let bad = ok.replace("POSITIVE", "BULLISH");
        assert!(parse_intel(&bad, 2).is_err());
        let extra = ok.replace("\"summary\"", "\"note\": \"x\", \"summary\"");
        assert!(
            parse_intel(&extra, 2)
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
        let empty = ok.replace("earnings beat", "  ");
        assert!(
            parse_intel(&empty, 2)
                .unwrap_err()
                .to_string()
                .contains("short_term")
        );
    }

    #[test]
    fn decisions_and_reflections() {
        let d = parse_decision(
            r#"{"analysis": "Momentum is up.", "action": "BUY", "reasoning": "Trend and news agree."}"#,
        )
        .unwrap();
        assert_eq!(d.action, Action::Buy);
        assert!(
            parse_decision(r#"{"analysis": "x y z", "action": "SHORT", "reasoning": "abc"}"#)
                .is_err()
        );
        let h = r#"{"verdicts": ["RIGHT", "WRONG"], "improvement": "Sell earlier.",
            "summary": "Mixed record.", "query": "late exits"}"#;
        assert_eq!(
            parse_high_reflection(h, 2).unwrap().verdicts[1],
            Verdict::Wrong
        );
        assert!(parse_high_reflection(h, 1).is_err());
        let l = r#"{"short_term": "Up 2% today.", "medium_term": "Above MA5.",
            "long_term": "Uptrend since May.", "query": "breakout above band"}"#;
        assert_eq!(
            parse_low_reflection(l).unwrap().query,
            "breakout above band"
        );
    }

    /// The bounds the decoder enforces (prompts/finagent/*.schema.json) are the parser's.
    #[test]
    fn schemas_agree_with_the_parser() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../prompts/finagent");
        let expect = |file: &str, path: &[&str], max: usize| {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
            for p in path {
                v = v["properties"][*p].clone();
            }
            assert_eq!(v["maxLength"], max, "{file} {path:?}");
        };
        for f in ["intel.schema.json", "past_intel.schema.json"] {
            expect(f, &["summary"], MAX_SUMMARY_CHARS);
        }
        for h in ["short_term", "medium_term", "long_term"] {
            expect("intel.schema.json", &["queries", h], MAX_QUERY_CHARS);
            expect("low_reflection.schema.json", &[h], MAX_REASON_CHARS);
        }
        expect("low_reflection.schema.json", &["query"], MAX_QUERY_CHARS);
        for f in ["improvement", "summary"] {
            expect("high_reflection.schema.json", &[f], MAX_REASON_CHARS);
        }
        expect("high_reflection.schema.json", &["query"], MAX_QUERY_CHARS);
        for f in ["analysis", "reasoning"] {
            expect("decision.schema.json", &[f], MAX_REASON_CHARS);
        }
    }
}
