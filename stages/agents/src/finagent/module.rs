//! Running one FinAgent module over many prompts: batches, retries, and a JSON Schema pinned
//! to each prompt's list length. An answer that analyses 4 of 5 news items is useless, and a
//! schema cannot say "as many as the prompt has"; so prompts are grouped by that count and
//! each group is decoded under a copy of the schema whose list has exactly that many entries.
use std::collections::BTreeMap;

use flag_core::StageResult;
use flag_llm::backend::{LlmBackend, LlmRequest, LlmSettings};
use flag_llm::constrain::Constraint;
use serde_json::Value;

use crate::parse::ParseError;
use crate::runner::{Outcome, run_with_retries};

/// One module call: the rendered prompt and the length its answer's list must have.
#[derive(Debug, Clone)]
pub struct Call {
    pub prompt: String,
    pub list_len: usize,
    /// Chart PNGs sent with the prompt (only with `chart_images` on a vision backend).
    pub images: Vec<Vec<u8>>,
}

/// The module's prompt files and form.
pub struct ModuleForm<'a> {
    /// The answer schema (`prompts/finagent/<name>.schema.json`).
    pub schema: &'a Value,
    /// Property whose array length is pinned per call (None: no list).
    pub list_property: Option<&'a str>,
    /// (file, text) of the retry note.
    pub retry: (&'a str, &'a str),
}

/// `schema` with `properties.<property>` holding exactly `n` entries.
pub fn pin_list_len(schema: &Value, property: &str, n: usize) -> Value {
    let mut s = schema.clone();
    if let Some(p) = s
        .get_mut("properties")
        .and_then(|p| p.get_mut(property))
        .and_then(Value::as_object_mut)
    {
        p.insert("minItems".into(), n.into());
        p.insert("maxItems".into(), n.into());
    }
    s
}

/// Runs `calls` through the model, `batch_size` prompts at a time, each group of equal list
/// length under its pinned schema; outcomes come back in `calls` order.
pub fn run_module<T>(
    backend: &dyn LlmBackend,
    llm: &LlmSettings,
    form: &ModuleForm,
    calls: &[Call],
    batch_size: usize,
    parse: impl Fn(&str, usize) -> Result<T, ParseError>,
    progress: &dyn Fn(u64),
) -> StageResult<Vec<Outcome<T>>> {
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, c) in calls.iter().enumerate() {
        groups.entry(c.list_len).or_default().push(i);
    }
    let mut out: Vec<Option<Outcome<T>>> = (0..calls.len()).map(|_| None).collect();
    let mut done = 0u64;
    for (n, idx) in groups {
        let schema = match form.list_property {
            Some(p) => pin_list_len(form.schema, p, n),
            None => form.schema.clone(),
        };
        let settings = llm.clone().constrained_by(Constraint::JsonSchema(schema));
        let prefill = settings.answer_prefill("{").to_string();
        for chunk in idx.chunks(batch_size.max(1)) {
            let requests: Vec<LlmRequest> = chunk
                .iter()
                .map(|&i| LlmRequest {
                    user: calls[i].prompt.clone(),
                    prefill: prefill.clone(),
                    images: calls[i].images.clone(),
                })
                .collect();
            let outcomes =
                run_with_retries(backend, &settings, form.retry, &requests, |a| parse(a, n))?;
            for (&i, o) in chunk.iter().zip(outcomes) {
                out[i] = Some(o);
            }
            done += chunk.len() as u64;
            progress(done);
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.expect("every call ran"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pins_only_the_named_list() {
        let s = json!({"properties": {"analysis": {"type": "array", "maxItems": 10},
                                      "summary": {"type": "string"}}});
        let p = pin_list_len(&s, "analysis", 3);
        assert_eq!(p["properties"]["analysis"]["minItems"], 3);
        assert_eq!(p["properties"]["analysis"]["maxItems"], 3);
        assert_eq!(p["properties"]["summary"], s["properties"]["summary"]);
    }
}
