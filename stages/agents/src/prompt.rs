//! Prompt files: plain text with `{{name}}` placeholders, read from `prompts/<agent>/` through
//! the stage fingerprint (so editing one reruns exactly the stages that use it).
use std::collections::BTreeMap;

use flag_core::{Params, StageContext, StageError, StageResult};
use flag_llm::constrain::Constraint;

/// Prompt names are file stems: letters, digits, `_` and `-` (no paths).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Root-relative path of prompt `name` of `agent`.
pub fn prompt_path(agent: &str, name: &str) -> String {
    format!("prompts/{agent}/{name}.txt")
}

/// Root-relative path of the JSON Schema that constrains answers to prompt `name`.
pub fn schema_path(agent: &str, name: &str) -> String {
    format!("prompts/{agent}/{name}.schema.json")
}

/// The prompt name from param `prompt` (validated), or the default.
pub fn prompt_param(p: &Params, default: &str) -> StageResult<String> {
    let name = p.opt_str("prompt")?.unwrap_or_else(|| default.to_string());
    if !valid_name(&name) {
        return Err(StageError::param(
            "prompt",
            format!("'{name}' is not a prompt name (letters, digits, _ and - only)"),
        ));
    }
    Ok(name)
}

/// The prompt files a stage reads for `params`: its prompt, the schema its answers must
/// match, and the shared retry note. An invalid name lists neither; `run` then reports the
/// param error.
pub fn prompt_files(agent: &str, p: &Params, default: &str) -> Vec<String> {
    let mut files = Vec::new();
    if let Ok(name) = prompt_param(p, default) {
        files.push(prompt_path(agent, &name));
        files.push(schema_path(agent, &name));
    }
    files.push(prompt_path(agent, "retry"));
    files
}

/// A stage's prompt files, read through the context (so their bytes are the ones in the
/// cache key).
#[derive(Debug, Clone)]
pub struct PromptFiles {
    pub template: String,
    pub retry: String,
    /// The answer's JSON Schema (the decoder enforces it with the embedded backend).
    pub schema: Constraint,
}

/// Reads prompt `name` of `agent`, its schema and the shared retry note.
pub fn read_prompts(ctx: &StageContext, agent: &str, name: &str) -> StageResult<PromptFiles> {
    let schema_file = schema_path(agent, name);
    let schema: serde_json::Value =
        serde_json::from_str(ctx.resource_str(&schema_file)?).map_err(|e| {
            StageError::data(
                &schema_file,
                e.line() as u64,
                "schema",
                format!("not JSON: {e}"),
            )
        })?;
    Ok(PromptFiles {
        template: ctx.resource_str(&prompt_path(agent, name))?.to_string(),
        retry: ctx.resource_str(&prompt_path(agent, "retry"))?.to_string(),
        schema: Constraint::JsonSchema(schema),
    })
}

/// Placeholder names of `template`, in order of appearance (repeats kept once).
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(a) = rest.find("{{") {
        let Some(b) = rest[a + 2..].find("}}") else {
            break;
        };
        let name = rest[a + 2..a + 2 + b].trim();
        if !out.contains(&name) {
            out.push(name);
        }
        rest = &rest[a + 2 + b + 2..];
    }
    out
}

/// Replaces every `{{name}}` with `vars[name]`; an unknown or unclosed placeholder is an
/// error naming the file and its 1-based line.
pub fn render(template: &str, file: &str, vars: &BTreeMap<&str, String>) -> StageResult<String> {
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    let line_of = |pos: usize| template[..pos].matches('\n').count() as u64 + 1;
    while let Some(a) = rest.find("{{") {
        out.push_str(&rest[..a]);
        let abs = template.len() - rest.len() + a;
        let Some(b) = rest[a + 2..].find("}}") else {
            return Err(StageError::data(
                file,
                line_of(abs),
                "placeholder",
                "'{{' is not closed by '}}'",
            ));
        };
        let name = rest[a + 2..a + 2 + b].trim();
        let value = vars.get(name).ok_or_else(|| {
            let known: Vec<&str> = vars.keys().copied().collect();
            StageError::data(
                file,
                line_of(abs),
                "placeholder",
                format!(
                    "unknown placeholder '{{{{{name}}}}}' (known: {})",
                    known.join(", ")
                ),
            )
        })?;
        out.push_str(value);
        rest = &rest[a + 2 + b + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_reports_unknown_placeholders() {
        let vars: BTreeMap<&str, String> = [("market", "M".to_string()), ("news", "N".to_string())]
            .into_iter()
            .collect();
        assert_eq!(
            render("a {{market}} b {{ news }}{{market}}", "p.txt", &vars).unwrap(),
            "a M b NM"
        );
        assert_eq!(placeholders("{{a}} {{b}} {{a}}"), vec!["a", "b"]);
        let e = render("x\ny {{memory}}", "prompts/strategist/P9.txt", &vars).unwrap_err();
        assert_eq!(
            e.to_string(),
            "prompts/strategist/P9.txt:2: column 'placeholder': unknown placeholder '{{memory}}' (known: market, news)"
        );
        let e = render("x {{market", "f", &vars).unwrap_err();
        assert_eq!(
            e.to_string(),
            "f:1: column 'placeholder': '{{' is not closed by '}}'"
        );
    }

    /// The strategist prompts keep what is the same for every stock (instructions, answer
    /// form) before the stock's data, so a batch's shared head, and the head kept across
    /// batches, covers all of it (`FLAG_LLM_PREFIX_STORE`).
    #[test]
    fn strategist_prompts_put_their_fixed_instructions_before_the_data() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../prompts/strategist");
        for name in ["P0", "P1", "P2", "P3", "P4"] {
            let t = std::fs::read_to_string(format!("{dir}/{name}.txt")).unwrap();
            let vars = |stock: &str| -> BTreeMap<&str, String> {
                placeholders(&t)
                    .into_iter()
                    .map(|p| {
                        let v = if p == "period" {
                            "20".to_string()
                        } else {
                            format!("{stock} {p}")
                        };
                        (p, v)
                    })
                    .collect()
            };
            let a = render(&t, name, &vars("A")).unwrap();
            let b = render(&t, name, &vars("B")).unwrap();
            let shared = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
            let form = a.find("Answer with one JSON object").expect("answer form");
            let form_end = form + a[form..].find("\n\n").expect("data after the form");
            assert!(
                shared >= form_end,
                "{name}: stocks share the first {shared} bytes, the fixed part ends at {form_end}"
            );
        }
    }

    #[test]
    fn names_cannot_escape_the_prompt_folder() {
        assert!(valid_name("P4") && valid_name("v1-short"));
        for bad in ["", "../x", "a/b", "P 1", "p.txt"] {
            assert!(!valid_name(bad), "{bad}");
        }
        let p = Params::new(
            [("prompt".to_string(), serde_json::json!("../../etc/passwd"))]
                .into_iter()
                .collect(),
        );
        assert_eq!(
            prompt_files("strategist", &p, "P0"),
            vec!["prompts/strategist/retry.txt"]
        );
        assert!(prompt_param(&p, "P0").is_err());
        assert_eq!(
            prompt_files("strategist", &Params::default(), "P0"),
            vec![
                "prompts/strategist/P0.txt",
                "prompts/strategist/P0.schema.json",
                "prompts/strategist/retry.txt"
            ]
        );
    }
}
