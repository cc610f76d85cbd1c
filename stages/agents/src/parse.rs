//! Strict parsing of model answers. The answer is untrusted input: it must be one JSON object
//! (optionally in a ```json fence, optionally followed by prose that holds no second object)
//! with exactly the expected keys and types; every value is range-checked. Nothing outside
//! {LONG, SHORT} x {1, 2, 3} can come out of [`parse_strategy`].
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

pub const MAX_EXPLANATION_CHARS: usize = 1000;
pub const MAX_FEATURES: usize = 12;
pub const MAX_NAME_CHARS: usize = 48;
pub const MIN_FACTORS: usize = 2;
pub const MAX_FACTORS: usize = 5;
pub const MAX_FACTOR_CHARS: usize = 300;

/// Why an answer was rejected. The message is shown to the model on a retry and recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum ParseError {
    /// No `{` at the start of the answer.
    NoObject,
    /// The object never closes (cut by max_tokens, or unbalanced).
    Unterminated,
    /// Another JSON object follows the first: the answer is ambiguous.
    SecondObject,
    /// Invalid JSON, a missing/unknown/duplicate key or a wrong type (serde's message).
    Json(String),
    /// direction is not LONG or SHORT.
    Direction(String),
    /// confidence is not 1, 2 or 3.
    Confidence(i64),
    Explanation(String),
    Features(String),
    Factors(String),
    /// The answer repeats the prompt's format example (named part): the model copied the
    /// form instead of answering for these data.
    CopiedExample(&'static str),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NoObject => write!(f, "the answer does not start with a JSON object"),
            ParseError::Unterminated => write!(f, "the JSON object is not closed"),
            ParseError::SecondObject => write!(f, "the answer holds more than one JSON object"),
            ParseError::Json(m) => write!(f, "invalid JSON: {m}"),
            ParseError::Direction(d) => write!(f, "direction {d:?} is not \"LONG\" or \"SHORT\""),
            ParseError::Confidence(c) => write!(f, "confidence {c} is not 1, 2 or 3"),
            ParseError::Explanation(m) => write!(f, "explanation {m}"),
            ParseError::Features(m) => write!(f, "features: {m}"),
            ParseError::Factors(m) => write!(f, "factors: {m}"),
            ParseError::CopiedExample(what) => write!(
                f,
                "the {what} repeats the format example; write your own for these data"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Long,
    Short,
}

impl Direction {
    pub fn sign(self) -> f64 {
        match self {
            Direction::Long => 1.0,
            Direction::Short => -1.0,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Long => "LONG",
            Direction::Short => "SHORT",
        }
    }
}

/// A validated strategy.
#[derive(Debug, Clone, PartialEq)]
pub struct Strategy {
    pub direction: Direction,
    /// 1..=3.
    pub confidence: u8,
    pub explanation: String,
    /// (feature, weight in [0, 1]) in the model's order.
    pub features: Vec<(String, f64)>,
    /// Byte offset, in the answer, of the first character of the direction value.
    pub direction_offset: usize,
}

/// Feature weights as a JSON object; a repeated name is an error (serde_json keeps the last).
#[derive(Debug)]
struct Features(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for Features {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Features;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of feature name -> weight")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Features, A::Error> {
                let mut out: Vec<(String, f64)> = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, f64>()? {
                    if out.iter().any(|(n, _)| *n == k) {
                        return Err(de::Error::custom(format!("duplicate feature `{k}`")));
                    }
                    out.push((k, v));
                }
                Ok(Features(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStrategy {
    direction: String,
    confidence: i64,
    explanation: String,
    features: Features,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFactors {
    factors: Vec<String>,
}

/// The first JSON object of `answer`: (its byte range). Enforces the framing rules.
fn object_span(answer: &str) -> Result<(usize, usize), ParseError> {
    let mut start = answer.len() - answer.trim_start().len();
    for fence in ["```json", "```JSON", "```"] {
        if answer[start..].starts_with(fence) {
            start += fence.len();
            start += answer[start..].len() - answer[start..].trim_start().len();
            break;
        }
    }
    if !answer[start..].starts_with('{') {
        return Err(ParseError::NoObject);
    }
    let end = balanced_end(answer.as_bytes(), start).ok_or(ParseError::Unterminated)?;
    if answer[end..].contains('{') {
        return Err(ParseError::SecondObject);
    }
    Ok((start, end))
}

/// End (exclusive) of the object opening at `start`, honouring strings and escapes.
fn balanced_end(b: &[u8], start: usize) -> Option<usize> {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, &c) in b.iter().enumerate().skip(start) {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return (c == b'}').then_some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// Byte offset of the string value of top-level `key` in the object at `obj_start`.
fn top_level_string_value(answer: &str, obj_start: usize, key: &str) -> Option<usize> {
    let b = answer.as_bytes();
    let (mut depth, mut i) = (0usize, obj_start);
    while i < b.len() {
        match b[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let s = i + 1;
                let mut j = s;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                let rest = answer.get(j + 1..)?.trim_start();
                if depth == 1 && answer.get(s..j) == Some(key) && rest.starts_with(':') {
                    let after = rest[1..].trim_start();
                    return after
                        .starts_with('"')
                        .then(|| answer.len() - after.len() + 1);
                }
                i = j;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn json_err(e: serde_json::Error) -> ParseError {
    // serde's "at line 1 column 7" positions refer to the extracted object; keep them.
    ParseError::Json(e.to_string())
}

/// Parses and validates a strategist answer.
pub fn parse_strategy(answer: &str) -> Result<Strategy, ParseError> {
    let (start, end) = object_span(answer)?;
    let raw: RawStrategy = serde_json::from_str(&answer[start..end]).map_err(json_err)?;
    let direction = match raw.direction.as_str() {
        d if d.eq_ignore_ascii_case("LONG") => Direction::Long,
        d if d.eq_ignore_ascii_case("SHORT") => Direction::Short,
        d => return Err(ParseError::Direction(d.chars().take(40).collect())),
    };
    let confidence = match raw.confidence {
        c @ 1..=3 => c as u8,
        c => return Err(ParseError::Confidence(c)),
    };
    let explanation = raw.explanation.trim().to_string();
    if explanation.is_empty() {
        return Err(ParseError::Explanation("is empty".into()));
    }
    if explanation.chars().count() > MAX_EXPLANATION_CHARS {
        return Err(ParseError::Explanation(format!(
            "is longer than {MAX_EXPLANATION_CHARS} characters"
        )));
    }
    let features = raw.features.0;
    if features.is_empty() || features.len() > MAX_FEATURES {
        return Err(ParseError::Features(format!(
            "{} entries, expected 1 to {MAX_FEATURES}",
            features.len()
        )));
    }
    for (name, w) in &features {
        if name.trim().is_empty() || name.chars().count() > MAX_NAME_CHARS {
            return Err(ParseError::Features(format!(
                "name {name:?} must be 1 to {MAX_NAME_CHARS} characters"
            )));
        }
        if !(0.0..=1.0).contains(w) {
            return Err(ParseError::Features(format!(
                "weight {w} of {name:?} is not in [0, 1]"
            )));
        }
    }
    let direction_offset = top_level_string_value(answer, start, "direction")
        .ok_or_else(|| ParseError::Json("direction value not found".into()))?;
    Ok(Strategy {
        direction,
        confidence,
        explanation,
        features,
        direction_offset,
    })
}

/// The first JSON object of `answer`, framed as [`parse_strategy`] requires, deserialised as
/// `T` (whose serde derive should deny unknown fields). Range checks are the caller's.
pub fn parse_object<T: serde::de::DeserializeOwned>(answer: &str) -> Result<T, ParseError> {
    let (start, end) = object_span(answer)?;
    serde_json::from_str(&answer[start..end]).map_err(json_err)
}

/// Parses and validates an analyst answer: 2 to 5 short, distinct factors.
pub fn parse_factors(answer: &str) -> Result<Vec<String>, ParseError> {
    let (start, end) = object_span(answer)?;
    let raw: RawFactors = serde_json::from_str(&answer[start..end]).map_err(json_err)?;
    let factors: Vec<String> = raw
        .factors
        .iter()
        .map(|f| f.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    if factors.len() > MAX_FACTORS {
        return Err(ParseError::Factors(format!(
            "{} given, expected {MIN_FACTORS} to {MAX_FACTORS}",
            factors.len()
        )));
    }
    for (i, f) in factors.iter().enumerate() {
        if f.is_empty() || f.chars().count() > MAX_FACTOR_CHARS {
            return Err(ParseError::Factors(format!(
                "factor {} must be 1 to {MAX_FACTOR_CHARS} characters",
                i + 1
            )));
        }
    }
    // A factor repeated word for word adds nothing: repeats are dropped (a small model under
    // greedy decoding loops), and what remains must still be 2 to 5 distinct factors.
    let mut distinct: Vec<String> = Vec::with_capacity(factors.len());
    for f in factors {
        if !distinct.contains(&f) {
            distinct.push(f);
        }
    }
    if distinct.len() < MIN_FACTORS {
        return Err(ParseError::Factors(format!(
            "{} distinct given, expected {MIN_FACTORS} to {MAX_FACTORS}",
            distinct.len()
        )));
    }
    let factors = distinct;
    Ok(factors)
}

/// The format examples a prompt template shows: every line that alone parses as an answer.
/// A template whose form uses placeholders has none.
pub fn template_examples<T>(
    template: &str,
    parse: impl Fn(&str) -> Result<T, ParseError>,
) -> Vec<T> {
    template
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| parse(l).ok())
        .collect()
}

fn same_text(a: &str, b: &str) -> bool {
    let words = |s: &str| {
        s.split_whitespace()
            .map(str::to_lowercase)
            .collect::<Vec<_>>()
    };
    words(a) == words(b)
}

/// Rejects a strategy whose explanation or feature weights are those of a format example
/// (direction and confidence alone may legitimately match).
pub fn reject_copied_strategy(s: Strategy, examples: &[Strategy]) -> Result<Strategy, ParseError> {
    let sorted = |f: &[(String, f64)]| {
        let mut v: Vec<(String, f64)> = f.iter().map(|(n, w)| (n.to_lowercase(), *w)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    for e in examples {
        if same_text(&s.explanation, &e.explanation) {
            return Err(ParseError::CopiedExample("explanation"));
        }
        if sorted(&s.features) == sorted(&e.features) {
            return Err(ParseError::CopiedExample("features"));
        }
    }
    Ok(s)
}

/// Rejects factors that include a factor of a format example.
pub fn reject_copied_factors(
    factors: Vec<String>,
    examples: &[Vec<String>],
) -> Result<Vec<String>, ParseError> {
    let copied = factors
        .iter()
        .any(|f| examples.iter().flatten().any(|e| same_text(f, e)));
    if copied {
        Err(ParseError::CopiedExample("factors"))
    } else {
        Ok(factors)
    }
}
