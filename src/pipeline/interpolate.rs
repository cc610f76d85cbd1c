//! Explicit `${param}` interpolation of pipeline-wide params into stage params.
//! A value that is exactly `${name}` takes the param's value with its type (a list stays a
//! list); `${name}` inside a longer string is replaced by the param's scalar text. `$$` is a
//! literal `$`.
use std::collections::BTreeMap;

use serde_json::Value;

/// Interpolates every string in `value`. Errors carry the offending reference.
pub fn interpolate(value: &Value, params: &BTreeMap<String, Value>) -> Result<Value, String> {
    match value {
        Value::String(s) => interpolate_str(s, params),
        Value::Array(items) => items
            .iter()
            .map(|v| interpolate(v, params))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| Ok((k.clone(), interpolate(v, params)?)))
            .collect::<Result<serde_json::Map<_, _>, String>>()
            .map(Value::Object),
        other => Ok(other.clone()),
    }
}

fn lookup<'a>(name: &str, params: &'a BTreeMap<String, Value>) -> Result<&'a Value, String> {
    params.get(name).ok_or_else(|| {
        let known: Vec<&str> = params.keys().map(String::as_str).collect();
        format!(
            "unknown pipeline param '${{{name}}}' (pipeline params: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )
    })
}

fn interpolate_str(s: &str, params: &BTreeMap<String, Value>) -> Result<Value, String> {
    let trimmed = s.trim();
    if let Some(name) = trimmed
        .strip_prefix("${")
        .and_then(|r| r.strip_suffix('}'))
        .filter(|n| !n.contains(['$', '{', '}']))
    {
        return lookup(name, params).cloned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unterminated '${{' in \"{s}\""))?;
            let v = lookup(&r[..end], params)?;
            match v {
                Value::String(t) => out.push_str(t),
                Value::Number(n) => out.push_str(&n.to_string()),
                Value::Bool(b) => out.push_str(&b.to_string()),
                _ => {
                    return Err(format!(
                        "param '${{{}}}' is a list or map and cannot be spliced into \"{s}\"",
                        &r[..end]
                    ));
                }
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_value_keeps_type_and_splices_strings() {
        let mut p = BTreeMap::new();
        p.insert("tickers".into(), json!(["AAPL", "MSFT"]));
        p.insert("data_dir".into(), json!("../shared/data"));
        p.insert("n".into(), json!(3));
        assert_eq!(
            interpolate(&json!("${tickers}"), &p).unwrap(),
            json!(["AAPL", "MSFT"])
        );
        assert_eq!(
            interpolate(&json!("${data_dir}/tdqn"), &p).unwrap(),
            json!("../shared/data/tdqn")
        );
        assert_eq!(
            interpolate(&json!("n=${n} $$5"), &p).unwrap(),
            json!("n=3 $5")
        );
        assert!(
            interpolate(&json!("${nope}"), &p)
                .unwrap_err()
                .contains("unknown pipeline param")
        );
        assert!(
            interpolate(&json!("x${tickers}"), &p)
                .unwrap_err()
                .contains("cannot be spliced")
        );
    }
}
