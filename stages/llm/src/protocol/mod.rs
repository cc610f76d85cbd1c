//! The server side of the OpenAI-compatible API that `flag serve` offers: request
//! validation, responses and errors ([`ApiError`], OpenAI-shaped), and the [`Service`] that
//! owns the decoder and the embedder on worker threads. The HTTP transport itself (binding,
//! authentication, body limits) stays in the binary; the client side is
//! [`crate::backend::openai`].
//!
//!   POST /v1/chat/completions  messages -> the GGUF's chat template; a final assistant message
//!                              is a prefill the answer continues. temperature, top_p, seed,
//!                              max_tokens (or max_completion_tokens), stop, logprobs,
//!                              top_logprobs (<= 20), response_format (text, json_object, or
//!                              json_schema: enforced by the constrained decoder). Returns
//!                              choices[0].message.content, finish_reason,
//!                              logprobs.content[{token, logprob, bytes, top_logprobs[...]}]
//!                              and usage.
//!   POST /v1/embeddings        input: a string or a list of strings -> MiniLM vectors
//!                              (384 dims, L2-normalised) as data[{embedding, index}].
//!   GET  /v1/models            the two model ids.
//!
//! Scores are the embedded engine's: each generated token's logprob under the untempered,
//! unconstrained distribution (what the model wanted), the end-of-turn token included as the
//! last `logprobs.content` entry when the model ends its answer. User text has chat-control
//! markers (`<|im_start|>`...) removed, exactly as the embedded backend does, so data can
//! never open or close a turn.
use serde_json::{Value, json};

use crate::backend::strip_control_markers;
use crate::constrain::{Constraint, TextChecker};
use crate::generate::{FinishReason, GenerateOptions, Generation, TopLogprobs};
use crate::tokenizer::{ChatMessage, LlmTokenizer};

mod service;

pub use service::{Metrics, Service, ServiceConfig};

/// The OpenAI API's limit on top_logprobs.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// max_tokens when the request gives none.
pub const DEFAULT_MAX_TOKENS: usize = 512;
/// Most inputs in one embeddings request (as the OpenAI API).
pub const MAX_EMBED_INPUTS: usize = 2048;
/// The server's cap on a request's max_tokens when none is configured.
pub const DEFAULT_MAX_TOKENS_CAP: usize = 2048;

/// What one chat request may ask of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatLimits {
    /// The model's context: prompt tokens + max_tokens must fit in it.
    pub ctx_len: usize,
    /// The most bytes of text one token stands for ([`LlmTokenizer::max_token_bytes`]): a
    /// prompt of `n` bytes is at least `ceil(n / max_token_bytes)` tokens, so one that cannot
    /// fit is refused before it is tokenized (tokenizing costs ~100 bytes of memory per byte).
    pub max_token_bytes: usize,
    /// The most `max_tokens` a request may ask for; more is refused (400), not clamped, so a
    /// client never receives a shorter answer than it asked for without being told.
    pub max_tokens_cap: usize,
}

impl ChatLimits {
    /// The limits of `tok`'s model with context `ctx_len` and the default cap.
    pub fn new(tok: &LlmTokenizer, ctx_len: usize) -> Self {
        ChatLimits {
            ctx_len,
            max_token_bytes: tok.max_token_bytes(),
            max_tokens_cap: DEFAULT_MAX_TOKENS_CAP,
        }
    }

    /// The largest prompt (in bytes of rendered text) that could still fit with one token of
    /// answer; longer ones are refused without tokenizing.
    pub fn max_prompt_bytes(&self) -> usize {
        self.ctx_len.saturating_sub(1) * self.max_token_bytes
    }
}

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    pub fn server(message: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            kind: "server_error",
            message: message.into(),
        }
    }

    /// A client error with another status (401, 404, 405, 413).
    pub fn with_status(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": null}})
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A validated chat request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub logprobs: bool,
    pub top_logprobs: usize,
}

fn opt_f64(v: &Value, name: &str, default: f64) -> ApiResult<f64> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| ApiError::bad(format!("'{name}' must be a number, got {x}"))),
    }
}

fn opt_usize(v: &Value, name: &str) -> ApiResult<Option<usize>> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            ApiError::bad(format!("'{name}' must be a non-negative integer, got {x}"))
        }),
    }
}

/// A message's text: a string, or a list of {"type": "text", "text"} parts.
fn content_text(m: &Value, i: usize) -> ApiResult<String> {
    match m.get("content") {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    _ => Err(ApiError::bad(format!(
                        "messages[{i}].content: only text parts are supported"
                    ))),
                },
            )
            .collect::<ApiResult<Vec<_>>>()
            .map(|v| v.concat()),
        Some(other) => Err(ApiError::bad(format!(
            "messages[{i}].content must be a string or a list of text parts, got {other}"
        ))),
    }
}

/// `response_format` as a constraint: none for `text`, any JSON object for `json_object`,
/// the given schema for `json_schema` (checked to compile, so a bad schema is a 400).
pub fn response_format(v: &Value) -> ApiResult<Option<Constraint>> {
    let Some(rf) = v.get("response_format").filter(|r| !r.is_null()) else {
        return Ok(None);
    };
    let c = match rf.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => Constraint::JsonSchema(json!({"type": "object"})),
        Some("json_schema") => {
            let schema = rf
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .filter(|s| s.is_object() || s.is_boolean())
                .ok_or_else(|| {
                    ApiError::bad("response_format.json_schema.schema must be a JSON Schema object")
                })?;
            Constraint::JsonSchema(schema.clone())
        }
        _ => {
            return Err(ApiError::bad(
                "response_format.type must be one of text, json_object, json_schema",
            ));
        }
    };
    TextChecker::new(&c).map_err(|e| ApiError::bad(format!("response_format: {e}")))?;
    Ok(Some(c))
}

/// Validates a chat request and renders its prompt, within `limits`.
pub fn parse_chat(tok: &LlmTokenizer, limits: &ChatLimits, v: &Value) -> ApiResult<ChatRequest> {
    let ctx_len = limits.ctx_len;
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad("'messages' must be a non-empty list"))?;
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad(format!("messages[{i}] has no string 'role'")))?;
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad(format!(
                    "messages[{i}].role '{other}' is not system, user or assistant"
                )));
            }
        };
        msgs.push((role, content_text(m, i)?));
    }
    if v.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::bad(
            "streaming is not supported; send stream: false",
        ));
    }
    if let Some(n) = opt_usize(v, "n")?
        && n != 1
    {
        return Err(ApiError::bad("only n = 1 is supported"));
    }
    let temperature = opt_f64(v, "temperature", 1.0)?;
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(format!(
            "'temperature' must be in [0, 2], got {temperature}"
        )));
    }
    let top_p = opt_f64(v, "top_p", 1.0)?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(format!(
            "'top_p' must be in (0, 1], got {top_p}"
        )));
    }
    let seed = match v.get("seed") {
        None | Some(Value::Null) => 0,
        Some(x) => x
            .as_i64()
            .map(|s| s as u64)
            .or_else(|| x.as_u64())
            .ok_or_else(|| ApiError::bad(format!("'seed' must be an integer, got {x}")))?,
    };
    let (max_tokens, max_name) = match opt_usize(v, "max_completion_tokens")? {
        Some(n) => (n, "max_completion_tokens"),
        None => match opt_usize(v, "max_tokens")? {
            Some(n) => (n, "max_tokens"),
            None => (DEFAULT_MAX_TOKENS.min(limits.max_tokens_cap), "max_tokens"),
        },
    };
    if max_tokens == 0 {
        return Err(ApiError::bad(format!("'{max_name}' must be at least 1")));
    }
    if max_tokens > limits.max_tokens_cap {
        return Err(ApiError::bad(format!(
            "'{max_name}' {max_tokens} exceeds this server's cap of {} tokens per answer \
             (flag serve --max-tokens-cap)",
            limits.max_tokens_cap
        )));
    }
    if max_tokens >= ctx_len {
        return Err(ApiError::bad(format!(
            "'{max_name}' {max_tokens} leaves no room for a prompt in the model context of \
             {ctx_len} tokens"
        )));
    }
    let stop: Vec<String> = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::bad("'stop' must be a string or a list of strings"))
            })
            .collect::<ApiResult<_>>()?,
        Some(_) => {
            return Err(ApiError::bad(
                "'stop' must be a string or a list of strings",
            ));
        }
    };
    if stop.iter().any(String::is_empty) || stop.len() > 16 {
        return Err(ApiError::bad("'stop' takes 1 to 16 non-empty strings"));
    }
    let logprobs = match v.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(x) => {
            return Err(ApiError::bad(format!(
                "'logprobs' must be a boolean, got {x}"
            )));
        }
    };
    let top_logprobs = opt_usize(v, "top_logprobs")?.unwrap_or(0);
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad(format!(
            "'top_logprobs' must be at most {MAX_TOP_LOGPROBS}, got {top_logprobs}"
        )));
    }
    if top_logprobs > 0 && !logprobs {
        return Err(ApiError::bad("'top_logprobs' requires 'logprobs': true"));
    }
    let constraint = response_format(v)?;

    // A final assistant message is the start of the answer (prefill).
    let prefill = match msgs.last() {
        Some(("assistant", _)) => msgs.pop().map(|(_, c)| c).unwrap_or_default(),
        _ => String::new(),
    };
    if msgs.is_empty() {
        return Err(ApiError::bad(
            "'messages' needs a system or user message before the final assistant message",
        ));
    }
    if constraint.is_some() && !prefill.is_empty() {
        return Err(ApiError::bad(
            "response_format with a final assistant message (prefill) is not supported: the \
             schema constrains the whole answer",
        ));
    }
    let chat: Vec<ChatMessage> = msgs
        .iter()
        .map(|(role, c)| ChatMessage::new(*role, strip_control_markers(c)))
        .collect();
    let text = tok
        .apply_chat_template(&chat, true)
        .map_err(|e| ApiError::bad(format!("applying the chat template: {e}")))?;
    // Every token stands for at most `max_token_bytes` bytes: a prompt too long to fit is
    // refused here, before tokenizing it (which costs far more memory and time than its bytes).
    let n_bytes = text.len() + prefill.len();
    let at_least = n_bytes.div_ceil(limits.max_token_bytes.max(1));
    if at_least + max_tokens > ctx_len {
        return Err(ApiError::bad(format!(
            "the prompt is {n_bytes} bytes, so at least {at_least} tokens (no token of this \
             model is longer than {} bytes); with max_tokens {max_tokens} it cannot fit in the \
             model context of {ctx_len} tokens",
            limits.max_token_bytes
        )));
    }
    let mut prompt = tok
        .encode(&text, true)
        .map_err(|e| ApiError::server(e.to_string()))?;
    if !prefill.is_empty() {
        prompt.extend(
            tok.encode(&prefill, false)
                .map_err(|e| ApiError::server(e.to_string()))?,
        );
    }
    if prompt.len() + max_tokens > ctx_len {
        return Err(ApiError::bad(format!(
            "{} prompt tokens + max_tokens {max_tokens} exceed the model context of {ctx_len}",
            prompt.len(),
        )));
    }
    let greedy = temperature == 0.0;
    Ok(ChatRequest {
        prompt,
        opts: GenerateOptions {
            max_tokens,
            temperature,
            // Greedy decoding ignores seed and top_p: normalised so such requests batch.
            top_p: if greedy { 1.0 } else { top_p },
            seed: if greedy { 0 } else { seed },
            stop,
            // Entropies are not reported; k = 1 keeps their cost negligible.
            top_k_entropy: 1,
            chat: true,
            json_prefill: None,
            constraint,
        },
        logprobs,
        top_logprobs,
    })
}

fn token_entry(tok: &LlmTokenizer, id: u32, logprob: f32) -> Value {
    let bytes = tok.token_bytes(id).unwrap_or_default();
    json!({
        "token": String::from_utf8_lossy(&bytes),
        "logprob": logprob,
        "bytes": bytes,
    })
}

/// The chat completion body for a generation (`n`: the completion's serial number).
pub fn chat_response(
    tok: &LlmTokenizer,
    model_id: &str,
    n: u64,
    req: &ChatRequest,
    g: &Generation,
    top: &[TopLogprobs],
) -> Value {
    let logprobs = if req.logprobs {
        let content: Vec<Value> = g
            .ids
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                let mut e = token_entry(tok, id, g.logprobs[t]);
                let tops: Vec<Value> = top
                    .get(t)
                    .map(|row| {
                        row.iter()
                            .take(req.top_logprobs)
                            .map(|&(tid, lp)| token_entry(tok, tid, lp))
                            .collect()
                    })
                    .unwrap_or_default();
                e["top_logprobs"] = Value::Array(tops);
                e
            })
            .collect();
        json!({"content": content})
    } else {
        Value::Null
    };
    let finish = match g.finish_reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Error => "error",
    };
    let n_prompt = req.prompt.len();
    json!({
        "id": format!("chatcmpl-{n}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model_id,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": g.text},
            "logprobs": logprobs,
            "finish_reason": finish,
        }],
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": g.ids.len(),
            "total_tokens": n_prompt + g.ids.len(),
        },
    })
}

/// The texts of an embeddings request.
pub fn parse_embeddings(v: &Value) -> ApiResult<Vec<String>> {
    let texts: Vec<String> = match v.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|s| {
                s.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::bad("'input' must be a string or a list of strings (token arrays are not supported)")
                })
            })
            .collect::<ApiResult<_>>()?,
        _ => {
            return Err(ApiError::bad(
                "'input' must be a string or a non-empty list of strings",
            ));
        }
    };
    if texts.len() > MAX_EMBED_INPUTS {
        return Err(ApiError::bad(format!(
            "at most {MAX_EMBED_INPUTS} inputs per request, got {}",
            texts.len()
        )));
    }
    if let Some(f) = v.get("encoding_format").and_then(Value::as_str)
        && f != "float"
    {
        return Err(ApiError::bad(format!(
            "encoding_format '{f}' is not supported (only float)"
        )));
    }
    Ok(texts)
}

/// The embeddings body (`n_tokens`: word pieces embedded).
pub fn embeddings_response(model_id: &str, vecs: Vec<Vec<f32>>, n_tokens: usize) -> Value {
    let data: Vec<Value> = vecs
        .into_iter()
        .enumerate()
        .map(|(i, e)| json!({"object": "embedding", "index": i, "embedding": e}))
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model_id,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    })
}

/// The /v1/models body.
pub fn models_list(ids: &[&str]) -> Value {
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "flag"}))
        .collect();
    json!({"object": "list", "data": data})
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_openai_shaped() {
        let e = ApiError::bad("x");
        assert_eq!(e.status, 400);
        assert_eq!(e.body()["error"]["message"], "x");
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn response_format_becomes_a_constraint() {
        assert_eq!(response_format(&json!({})).unwrap(), None);
        assert_eq!(
            response_format(&json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            response_format(&json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema}}}))
            .unwrap(),
            Some(Constraint::JsonSchema(schema))
        );
        assert_eq!(
            response_format(&json!({"response_format": {"type": "json_object"}})).unwrap(),
            Some(Constraint::JsonSchema(json!({"type": "object"})))
        );
        for bad in [
            json!({"response_format": {"type": "xml"}}),
            json!({"response_format": {"type": "json_schema"}}),
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}),
            json!({"response_format": {"type": "json_schema",
                "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}),
        ] {
            let e = response_format(&bad).unwrap_err();
            assert_eq!(e.status, 400, "{bad}: {e:?}");
        }
    }
}
