//! An [`LlmBackend`] over any OpenAI-compatible HTTP server (`POST {base_url}/chat/completions`):
//! `flag serve`, llama.cpp's server, vLLM, or a hosted API.
//!
//! One request per prompt, at most [`CONCURRENCY`] in flight, results in request order.
//! Each sends one user message and, when the request has a prefill, a trailing assistant
//! message holding it: servers that continue a final assistant message (`flag serve`,
//! llama.cpp) answer with the continuation, and the answer parsed is `prefill + text` as with
//! the embedded backend. A server that instead starts a new message which itself begins with
//! the prefill gets the repeated prefill (and the tokens spelling it) removed, so the answer
//! parsed is the same.
//!
//! Scores come from `choices[0].logprobs.content[*]`: each token's `logprob`, and its top-k
//! entropy from the probabilities of its `top_logprobs` (k = `top_k_entropy`, at most the
//! OpenAI limit of 20) with [`top_k_entropy`], so the signal math is the embedded backend's.
//! Remote tokens are strings, not ids of a known vocabulary: each generated token gets a
//! synthetic id (its index in this backend's token table), and [`LlmBackend::decode`]
//! concatenates the tokens' bytes (the `bytes` field when the server sends it).
//!
//! `opts.json_prefill` (stop where the JSON object the prefill opens closes) has no OpenAI
//! equivalent: the answer is cut here, after the first token whose text closes the object,
//! exactly where the embedded engine stops (the server may have generated a few more tokens).
//!
//! With `opts.constraint` a JSON Schema is sent as `response_format: {"type": "json_schema"}`
//! (`flag serve`, vLLM, llama.cpp and hosted APIs enforce it); regex and Lark constraints have
//! no OpenAI field and are checked here only. Either way the answer is checked here byte by
//! byte against the constraint ([`TextChecker`]): text after a complete answer is cut (a
//! server that ignored the schema may ramble on), and an answer that leaves the form is
//! returned with [`Generation::error`] set, so the caller's retry sees the reason. The
//! constrained scores are rebuilt from `top_logprobs`: at each step, the candidates the
//! constraint allows after the text so far, renormalised among themselves. The ratio of two
//! allowed tokens is the same under the server's mask and without it, so the strategist's
//! LONG-vs-SHORT certainty is the embedded one whenever both are among the top candidates.
//!
//! `embed` posts to `{base_url}/embeddings` with the model `all-MiniLM-L6-v2` (what
//! `flag serve` serves).
//!
//! The API key is read from the environment variable named by `api_key_env` when the backend
//! is built, sent only in the `Authorization` header, and never stored, logged or shown (the
//! `Debug` output and error messages leave it out).
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flag_core::{StageError, StageResult};
use serde_json::{Value, json};

use super::{LlmBackend, LlmRequest};
use crate::constrain::{Constraint, TextChecker};
use crate::generate::{
    ConstrainedScores, FinishReason, GenerateOptions, Generation, json_object_end,
};
use crate::models;
use crate::sampling::top_k_entropy;

/// Requests in flight at once.
pub const CONCURRENCY: usize = 4;
/// Extra attempts after a connection error, a 429 or a 5xx answer.
pub const RETRIES: usize = 2;
/// The most `top_logprobs` the OpenAI API returns per token.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Characters of an error body quoted in the error message.
const EXCERPT: usize = 400;

/// Where and what to ask. Holds no secret: the key stays in the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiSettings {
    /// e.g. `http://127.0.0.1:8080/v1` (no trailing slash needed).
    pub base_url: String,
    /// The `model` field of each request.
    pub model: String,
    /// Name of the environment variable holding the API key (may be unset).
    pub api_key_env: String,
    /// Whole-request timeout.
    pub timeout: Duration,
}

pub struct OpenAiBackend {
    settings: OpenAiSettings,
    /// `{base_url}/chat/completions`.
    url: String,
    /// `{base_url}/embeddings`.
    embed_url: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    /// Synthetic token id -> the token's bytes.
    tokens: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("url", &self.url)
            .field("model", &self.settings.model)
            .field(
                "api_key",
                &self.api_key.as_ref().map(|_| "<from the environment>"),
            )
            .finish()
    }
}

/// One generated token as the server reported it.
#[derive(Debug, Clone, PartialEq)]
struct Token {
    bytes: Vec<u8>,
    logprob: f32,
    entropy: f32,
    /// The step's `top_logprobs` candidates: (bytes, ln p).
    top: Vec<(Vec<u8>, f32)>,
}

/// `base_url` with any `user:password@` removed, for messages.
pub fn display_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find('/').unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(h) = host.strip_prefix('[') {
        h.split(']').next().unwrap_or(h)
    } else {
        host.split(':').next().unwrap_or(host)
    };
    host == "localhost" || host.starts_with("127.") || host == "::1"
}

impl OpenAiBackend {
    /// Builds the backend, reading the API key from `settings.api_key_env` (absent or empty:
    /// no `Authorization` header, for servers that need none).
    pub fn from_env(settings: OpenAiSettings) -> StageResult<Self> {
        let key = match std::env::var(&settings.api_key_env) {
            Ok(k) if !k.is_empty() => Some(k),
            Ok(_) | Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(StageError::param(
                    "api_key_env",
                    format!(
                        "environment variable {} is not valid UTF-8",
                        settings.api_key_env
                    ),
                ));
            }
        };
        Self::with_key(settings, key)
    }

    /// Builds the backend with an explicit key (tests; callers that hold the key elsewhere).
    pub fn with_key(settings: OpenAiSettings, api_key: Option<String>) -> StageResult<Self> {
        let base = settings.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(StageError::param(
                "base_url",
                format!(
                    "'{}' must start with http:// or https://",
                    display_url(base)
                ),
            ));
        }
        let url = format!("{base}/chat/completions");
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(settings.timeout))
            .http_status_as_error(false)
            .user_agent(concat!("flag/", env!("CARGO_PKG_VERSION")));
        if is_loopback(base) {
            // A local server is reached directly, whatever HTTP_PROXY says.
            config = config.proxy(None);
        }
        Ok(OpenAiBackend {
            agent: config.build().into(),
            url,
            embed_url: format!("{base}/embeddings"),
            api_key,
            settings,
            tokens: Mutex::new(Vec::new()),
        })
    }

    /// The JSON body of one request.
    pub fn request_body(&self, r: &LlmRequest, opts: &GenerateOptions) -> Value {
        let content = if r.images.is_empty() {
            json!(r.user)
        } else {
            // OpenAI's vision form: the text, then each PNG as a base64 data URL.
            use base64::Engine as _;
            let mut parts = vec![json!({"type": "text", "text": r.user})];
            for png in &r.images {
                let url = format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(png)
                );
                parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            Value::Array(parts)
        };
        let mut messages = vec![json!({"role": "user", "content": content})];
        if !r.prefill.is_empty() {
            messages.push(json!({"role": "assistant", "content": r.prefill}));
        }
        let mut body = json!({
            "model": self.settings.model,
            "messages": messages,
            "temperature": opts.temperature,
            "seed": opts.seed,
            "max_tokens": opts.max_tokens,
            "logprobs": true,
            "top_logprobs": opts.top_k_entropy.min(MAX_TOP_LOGPROBS),
        });
        if opts.top_p < 1.0 {
            body["top_p"] = json!(opts.top_p);
        }
        if !opts.stop.is_empty() {
            body["stop"] = json!(opts.stop);
        }
        if let Some(Constraint::JsonSchema(schema)) = &opts.constraint {
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": true},
            });
        }
        body
    }

    /// `text` with the key (should a server echo it) masked.
    fn redact(&self, text: &str) -> String {
        match &self.api_key {
            Some(k) => text.replace(k.as_str(), "***"),
            None => text.to_string(),
        }
    }

    /// POSTs `body`, retrying connection errors, 429 and 5xx answers with backoff.
    fn post(&self, url: &str, body: &str) -> StageResult<Value> {
        let context = || format!("POST {}", display_url(url));
        let mut attempt = 0;
        loop {
            let mut req = self
                .agent
                .post(url)
                .header("Content-Type", "application/json");
            if let Some(k) = &self.api_key {
                req = req.header("Authorization", format!("Bearer {k}"));
            }
            let failure = match req.send(body) {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let text = resp
                        .body_mut()
                        .with_config()
                        .limit(64 << 20)
                        .lossy_utf8(true)
                        .read_to_string()
                        .map_err(|e| {
                            StageError::external(context(), self.redact(&e.to_string()))
                        })?;
                    if (200..300).contains(&status) {
                        return serde_json::from_str(&text).map_err(|e| {
                            StageError::external(
                                context(),
                                format!(
                                    "the answer is not JSON ({e}): {}",
                                    self.redact(&excerpt(&text))
                                ),
                            )
                        });
                    }
                    let msg = format!("HTTP {status}: {}", self.redact(&excerpt(&text)));
                    if status == 429 || status >= 500 {
                        msg
                    } else {
                        return Err(StageError::external(context(), msg));
                    }
                }
                Err(e) if retryable(&e) => self.redact(&e.to_string()),
                Err(e) => {
                    return Err(StageError::external(context(), self.redact(&e.to_string())));
                }
            };
            if attempt == RETRIES {
                return Err(StageError::external(
                    context(),
                    format!("{failure} (after {} attempts)", RETRIES + 1),
                ));
            }
            attempt += 1;
            std::thread::sleep(Duration::from_millis(500 << (attempt - 1)));
        }
    }

    /// One request: its text, tokens and finish reason (checked against the constraint by
    /// the caller).
    fn complete(&self, r: &LlmRequest, opts: &GenerateOptions) -> StageResult<Answer> {
        let body = self.request_body(r, opts).to_string();
        let answer = self.post(&self.url, &body)?;
        let (text, tokens, finish) = parse_answer(&answer, r, opts).map_err(|m| {
            StageError::external(
                format!("POST {}", display_url(&self.url)),
                format!("unexpected answer: {m}"),
            )
        })?;
        Ok(Answer {
            text,
            tokens,
            finish,
            steps: None,
            error: None,
        })
    }
}

fn retryable(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
            | ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve)
    )
}

fn excerpt(text: &str) -> String {
    let t = text.trim();
    if t.chars().count() <= EXCERPT {
        t.to_string()
    } else {
        format!("{}...", t.chars().take(EXCERPT).collect::<String>())
    }
}

fn token_bytes(v: &Value) -> Result<Vec<u8>, String> {
    match v.get("bytes") {
        Some(Value::Array(bs)) => bs
            .iter()
            .map(|b| {
                b.as_u64()
                    .filter(|&x| x < 256)
                    .map(|x| x as u8)
                    .ok_or_else(|| format!("token bytes {b} is not a byte"))
            })
            .collect(),
        _ => v
            .get("token")
            .and_then(Value::as_str)
            .map(|s| s.as_bytes().to_vec())
            .ok_or_else(|| "a logprobs entry has no string 'token'".to_string()),
    }
}

/// An answer as the client returns it.
#[derive(Debug)]
struct Answer {
    text: String,
    tokens: Vec<Token>,
    finish: FinishReason,
    /// Per token, the scores among the candidates the constraint allowed (with a constraint).
    steps: Option<Vec<AllowedStep>>,
    /// Where the answer left the constraint.
    error: Option<String>,
}

/// One step's scores restricted to the allowed `top_logprobs` candidates, renormalised.
#[derive(Debug, Clone, PartialEq)]
struct AllowedStep {
    logprob: f32,
    entropy: f32,
    /// (bytes, renormalised ln p), most likely first.
    alternatives: Vec<(Vec<u8>, f32)>,
}

/// Checks the answer's tokens against `c` byte by byte: cuts what follows a complete answer,
/// flags an answer that leaves the form or stops short of it, and scores each step among the
/// candidates the constraint allowed there (`constraint`: compiled once per batch; each
/// answer checks on a fresh copy).
fn check_answer(
    constraint: &TextChecker,
    mut tokens: Vec<Token>,
    finish: FinishReason,
    k: usize,
) -> Answer {
    let mut checker = constraint.clone();
    let mut steps = Vec::with_capacity(tokens.len());
    let mut error = None;
    let mut cut = None;
    for (i, t) in tokens.iter().enumerate() {
        let complete_before = checker.is_complete();
        let mut allowed: Vec<(Vec<u8>, f32)> = t
            .top
            .iter()
            .filter(|(b, _)| !b.is_empty() && checker.allows(b))
            .cloned()
            .collect();
        if !allowed.iter().any(|(b, _)| *b == t.bytes) && checker.allows(&t.bytes) {
            allowed.push((t.bytes.clone(), t.logprob));
        }
        if let Err(e) = checker.feed(&t.bytes) {
            if complete_before || checker.is_complete() {
                // Text after a complete answer (a server that ignored the schema).
                cut = Some(i + usize::from(!complete_before));
            } else {
                error = Some(e);
                cut = Some(i + 1);
            }
            break;
        }
        steps.push(allowed_step(allowed, t.logprob, k));
    }
    let mut finish = finish;
    if let Some(n) = cut {
        tokens.truncate(n);
        steps.truncate(n);
        finish = FinishReason::Stop;
    }
    // Cut by max_tokens, an answer is unfinished as the embedded engine's would be (the
    // caller's parser says so); stopping short of the form any other way is the server's.
    if error.is_none() && finish != FinishReason::Length && !checker.is_complete() {
        error = Some("the answer stops before its form is complete".to_string());
    }
    if error.is_some() {
        finish = FinishReason::Error;
    }
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.bytes.clone()).collect();
    // A cut inside a token (`}` and a newline in one) keeps the bytes the checker accepted.
    let kept = if cut.is_some() && error.is_none() {
        &bytes[..checker.consumed().min(bytes.len())]
    } else {
        &bytes[..]
    };
    let text = String::from_utf8_lossy(kept).into_owned();
    Answer {
        text,
        tokens,
        finish,
        steps: Some(steps),
        error,
    }
}

/// Renormalises the allowed candidates' ln p among themselves.
fn allowed_step(mut allowed: Vec<(Vec<u8>, f32)>, chosen: f32, k: usize) -> AllowedStep {
    allowed.sort_by(|a, b| b.1.total_cmp(&a.1));
    let max = allowed.iter().map(|a| a.1).fold(chosen, f32::max);
    let sum: f64 = allowed.iter().map(|a| f64::from(a.1 - max).exp()).sum();
    let lse = f64::from(max) + sum.max(f64::MIN_POSITIVE).ln();
    let renorm = |lp: f32| (f64::from(lp) - lse) as f32;
    let probs: Vec<f64> = allowed
        .iter()
        .take(k)
        .map(|a| f64::from(renorm(a.1)).exp())
        .collect();
    AllowedStep {
        logprob: renorm(chosen).min(0.0),
        entropy: top_k_entropy(&probs) as f32,
        alternatives: allowed.into_iter().map(|(b, lp)| (b, renorm(lp))).collect(),
    }
}

/// Text, tokens and finish reason of a chat completion answer (`Err`: what is wrong).
fn parse_answer(
    v: &Value,
    r: &LlmRequest,
    opts: &GenerateOptions,
) -> Result<(String, Vec<Token>, FinishReason), String> {
    let choice = v
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or("no choices[0]")?;
    let mut text = match choice.get("message").and_then(|m| m.get("content")) {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(other) => return Err(format!("message.content is {other}, not a string")),
    };
    let entries = match choice.get("logprobs").and_then(|l| l.get("content")) {
        Some(Value::Array(a)) => a.as_slice(),
        None | Some(Value::Null) if text.is_empty() => &[],
        _ => {
            return Err(
                "no logprobs.content: the server must support logprobs and top_logprobs".into(),
            );
        }
    };
    let k = opts.top_k_entropy.min(MAX_TOP_LOGPROBS);
    let mut tokens = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let logprob = e
            .get("logprob")
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("logprobs.content[{i}] has no numeric logprob"))?;
        let top = e
            .get("top_logprobs")
            .and_then(Value::as_array)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("logprobs.content[{i}] has no top_logprobs"))?;
        let top =
            top.iter()
                .map(|t| {
                    let lp = t.get("logprob").and_then(Value::as_f64).ok_or_else(|| {
                        format!("logprobs.content[{i}].top_logprobs has no logprob")
                    })?;
                    let bytes = token_bytes(t)
                        .map_err(|m| format!("logprobs.content[{i}].top_logprobs: {m}"))?;
                    Ok((bytes, lp as f32))
                })
                .collect::<Result<Vec<_>, String>>()?;
        let probs: Vec<f64> = top.iter().take(k).map(|t| f64::from(t.1).exp()).collect();
        tokens.push(Token {
            bytes: token_bytes(e).map_err(|m| format!("logprobs.content[{i}]: {m}"))?,
            logprob: logprob as f32,
            entropy: top_k_entropy(&probs) as f32,
            top,
        });
    }
    if !r.prefill.is_empty() && text.starts_with(&r.prefill) {
        // A new message that repeats the prefill: drop it and the tokens spelling it.
        text.drain(..r.prefill.len());
        let mut skip = r.prefill.len();
        while skip > 0 && !tokens.is_empty() {
            let n = tokens[0].bytes.len();
            if n <= skip {
                tokens.remove(0);
                skip -= n;
            } else {
                tokens[0].bytes.drain(..skip);
                skip = 0;
            }
        }
    }
    if let Some(cut) = cut_at_json_end(&tokens, opts) {
        // As the embedded engine: stop after the token that closes the JSON object.
        let (n, text_end) = cut;
        tokens.truncate(n);
        let all: Vec<u8> = tokens.iter().flat_map(|t| t.bytes.clone()).collect();
        text = String::from_utf8_lossy(&all)[..text_end].to_string();
        return Ok((text, tokens, FinishReason::Stop));
    }
    let finish = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("length") => FinishReason::Length,
        _ => {
            let all: Vec<u8> = tokens.iter().flat_map(|t| t.bytes.clone()).collect();
            let all = String::from_utf8_lossy(&all);
            if opts.stop.iter().any(|s| all.contains(s.as_str())) {
                FinishReason::Stop
            } else {
                FinishReason::Eos
            }
        }
    };
    Ok((text, tokens, finish))
}

/// With `opts.json_prefill`: (tokens kept, text length) where the embedded engine would have
/// stopped, i.e. after the first token whose text closes the JSON object (or holds a stop
/// string).
fn cut_at_json_end(tokens: &[Token], opts: &GenerateOptions) -> Option<(usize, usize)> {
    let prefill = opts.json_prefill.as_deref()?;
    let mut bytes = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        bytes.extend_from_slice(&t.bytes);
        let text = String::from_utf8_lossy(&bytes);
        let at_stop = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min();
        let cut = match (at_stop, json_object_end(prefill, &text)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(c) = cut {
            return Some((i + 1, c));
        }
    }
    None
}

impl LlmBackend for OpenAiBackend {
    fn name(&self) -> String {
        format!(
            "{} at {}",
            self.settings.model,
            display_url(&self.settings.base_url)
        )
    }

    fn generate(
        &self,
        requests: &[LlmRequest],
        opts: &GenerateOptions,
    ) -> StageResult<Vec<Generation>> {
        // Compiled before any request is sent: a constraint that cannot compile costs no call.
        let checker = opts
            .constraint
            .as_ref()
            .map(TextChecker::new)
            .transpose()
            .map_err(|e| StageError::external("compiling the answer's constraint", e))?;
        let results: Vec<Mutex<Option<StageResult<_>>>> =
            requests.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..CONCURRENCY.min(requests.len()) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(r) = requests.get(i) else { break };
                        let out = self.complete(r, opts);
                        let failed = out.is_err();
                        *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
                        if failed {
                            // Later requests are not sent once one has failed.
                            next.store(requests.len(), Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let mut table = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(requests.len());
        for r in results {
            let mut a: Answer = match r.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(res) => res?,
                None => {
                    return Err(StageError::Invalid(
                        "a request was not sent after an earlier one failed".into(),
                    ));
                }
            };
            if let Some(c) = &checker {
                a = check_answer(c, a.tokens, a.finish, opts.top_k_entropy);
            }
            let tokens = a.tokens;
            let first = table.len();
            let count = tokens.len().max(1) as f64;
            let mean_lp = tokens.iter().map(|t| f64::from(t.logprob)).sum::<f64>() / count;
            let entropy = tokens.iter().map(|t| f64::from(t.entropy)).sum::<f64>() / count;
            let ids = (first..first + tokens.len()).map(|i| i as u32).collect();
            let logprobs = tokens.iter().map(|t| t.logprob).collect();
            let entropies = tokens.iter().map(|t| t.entropy).collect();
            table.extend(tokens.into_iter().map(|t| t.bytes));
            // Alternatives get synthetic ids too, so `decode` spells them.
            let constrained = a.steps.map(|steps| {
                let mut c = ConstrainedScores::default();
                for st in steps {
                    c.logprobs.push(st.logprob);
                    c.entropies.push(st.entropy);
                    c.allowed.push(st.alternatives.len() as u32);
                    let alts = st
                        .alternatives
                        .into_iter()
                        .map(|(bytes, lp)| {
                            table.push(bytes);
                            ((table.len() - 1) as u32, lp)
                        })
                        .collect();
                    c.alternatives.push(alts);
                }
                c
            });
            out.push(Generation {
                text: a.text,
                ids,
                logprobs,
                entropies,
                entropy,
                perplexity: (-mean_lp).exp(),
                finish_reason: a.finish,
                constrained,
                error: a.error,
                prompt_tokens: None,
            });
        }
        Ok(out)
    }

    fn decode(&self, ids: &[u32]) -> StageResult<String> {
        let table = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = Vec::new();
        for &id in ids {
            let t = table.get(id as usize).ok_or_else(|| {
                StageError::Invalid(format!("token id {id} was not generated by this backend"))
            })?;
            bytes.extend_from_slice(t);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn embed(&self, texts: &[String]) -> StageResult<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(EMBED_CHUNK) {
            let body = json!({"model": models::MINILM.name, "input": chunk}).to_string();
            let answer = self.post(&self.embed_url, &body)?;
            let vecs = parse_embeddings(&answer, chunk.len()).map_err(|m| {
                StageError::external(
                    format!("POST {}", display_url(&self.embed_url)),
                    format!("unexpected answer: {m}"),
                )
            })?;
            out.extend(vecs);
        }
        Ok(out)
    }

    fn enforces_schema(&self) -> bool {
        // Whatever the server claims, every answer is checked here (`check_answer`).
        false
    }
}

/// Inputs per embeddings request.
const EMBED_CHUNK: usize = 256;

/// `data[*].embedding` in `index` order; exactly `n` vectors of one width.
fn parse_embeddings(v: &Value, n: usize) -> Result<Vec<Vec<f32>>, String> {
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or("no 'data' list")?;
    if data.len() != n {
        return Err(format!("{} embeddings for {n} inputs", data.len()));
    }
    let mut out: Vec<Option<Vec<f32>>> = vec![None; n];
    for (i, d) in data.iter().enumerate() {
        let index = d
            .get("index")
            .and_then(Value::as_u64)
            .map_or(i, |x| x as usize);
        let e = d
            .get("embedding")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("data[{i}] has no 'embedding' list"))?
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| format!("data[{i}].embedding holds a non-number"))?;
        let slot = out
            .get_mut(index)
            .ok_or_else(|| format!("data[{i}].index {index} is out of range"))?;
        if slot.replace(e).is_some() {
            return Err(format!("index {index} appears twice"));
        }
    }
    let out: Vec<Vec<f32>> = out.into_iter().map(Option::unwrap_or_default).collect();
    if out.iter().any(|e| e.is_empty() || e.len() != out[0].len()) {
        return Err("embeddings are empty or of different widths".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(k: usize) -> GenerateOptions {
        GenerateOptions {
            top_k_entropy: k,
            chat: true,
            ..GenerateOptions::default()
        }
    }

    fn req(prefill: &str) -> LlmRequest {
        LlmRequest::text("u", prefill)
    }

    fn entry(token: &str, lp: f64, top: &[f64]) -> Value {
        json!({
            "token": token,
            "logprob": lp,
            "top_logprobs": top.iter().map(|l| json!({"token": "x", "logprob": l})).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn urls_hide_credentials_and_loopback_is_detected() {
        assert_eq!(
            display_url("https://me:pw@api.example.com/v1"),
            "https://***@api.example.com/v1"
        );
        assert_eq!(
            display_url("http://127.0.0.1:8080/v1"),
            "http://127.0.0.1:8080/v1"
        );
        assert!(is_loopback("http://127.0.0.1:8080/v1"));
        assert!(is_loopback("http://localhost/v1"));
        assert!(is_loopback("http://[::1]:9/v1"));
        assert!(!is_loopback("https://api.openai.com/v1"));
    }

    fn backend() -> OpenAiBackend {
        OpenAiBackend::with_key(
            OpenAiSettings {
                base_url: "http://127.0.0.1:1/v1/".into(),
                model: "m".into(),
                api_key_env: "X".into(),
                timeout: Duration::from_secs(1),
            },
            None,
        )
        .unwrap()
    }

    #[test]
    fn request_body_sends_images_as_data_urls_after_the_text() {
        let b = backend();
        let mut r = req("");
        r.images = vec![vec![0x89, b'P', b'N', b'G'], vec![1, 2, 3]];
        let body = b.request_body(&r, &GenerateOptions::default());
        let parts = body["messages"][0]["content"].as_array().unwrap();
        assert_eq!(parts[0], json!({"type": "text", "text": "u"}));
        assert_eq!(
            parts[1]["image_url"]["url"],
            "data:image/png;base64,iVBORw=="
        );
        assert_eq!(parts[2]["image_url"]["url"], "data:image/png;base64,AQID");
        assert_eq!(parts.len(), 3);
        // Text-only requests keep the plain string form.
        let plain = b.request_body(&req(""), &GenerateOptions::default());
        assert_eq!(plain["messages"][0]["content"], "u");
    }

    #[test]
    fn request_body_sends_prefill_as_trailing_assistant_message() {
        let b = OpenAiBackend::with_key(
            OpenAiSettings {
                base_url: "http://127.0.0.1:1/v1/".into(),
                model: "m".into(),
                api_key_env: "X".into(),
                timeout: Duration::from_secs(1),
            },
            Some("sk-secret".into()),
        )
        .unwrap();
        assert_eq!(b.url, "http://127.0.0.1:1/v1/chat/completions");
        assert!(!format!("{b:?}").contains("sk-secret"));
        let mut o = opts(50);
        o.stop = vec!["\n\n".into()];
        let body = b.request_body(&req("{\"d\": \""), &o);
        assert_eq!(body["messages"][1]["role"], "assistant");
        assert_eq!(body["messages"][1]["content"], "{\"d\": \"");
        assert_eq!(body["top_logprobs"], 20);
        assert_eq!(body["logprobs"], true);
        assert_eq!(body["stop"][0], "\n\n");
        assert!(body.get("top_p").is_none());
        let body = b.request_body(&req(""), &opts(3));
        assert_eq!(body["messages"].as_array().unwrap().len(), 1);
        assert!(body.get("stop").is_none());
    }

    #[test]
    fn answer_scores_match_the_embedded_math() {
        let top = [-0.1f64, -2.5, -3.0];
        let answer = json!({"choices": [{
            "message": {"role": "assistant", "content": "LONG\""},
            "finish_reason": "stop",
            "logprobs": {"content": [entry("LONG", -0.1, &top), entry("\"", -0.01, &[-0.01])]},
        }]});
        let (text, toks, finish) = parse_answer(&answer, &req("{"), &opts(2)).unwrap();
        assert_eq!((text.as_str(), finish), ("LONG\"", FinishReason::Eos));
        assert_eq!(toks.len(), 2);
        assert_eq!(toks[0].bytes, b"LONG");
        assert_eq!(toks[0].logprob, -0.1f32);
        // k = 2: only the two most likely probabilities count.
        let want = top_k_entropy(&[(-0.1f64).exp(), (-2.5f64).exp()]) as f32;
        assert_eq!(toks[0].entropy, want);
        // `bytes` wins over the token string (a token may split a UTF-8 character).
        let answer = json!({"choices": [{"message": {"content": "é"}, "finish_reason": "length",
            "logprobs": {"content": [
                {"token": "\u{fffd}", "bytes": [195], "logprob": -1.0, "top_logprobs": [{"token": "a", "logprob": -1.0}]},
                {"token": "\u{fffd}", "bytes": [169], "logprob": -1.0, "top_logprobs": [{"token": "a", "logprob": -1.0}]}]}}]});
        let (_, toks, finish) = parse_answer(&answer, &req(""), &opts(5)).unwrap();
        assert_eq!(finish, FinishReason::Length);
        assert_eq!(
            (toks[0].bytes.clone(), toks[1].bytes.clone()),
            (vec![195], vec![169])
        );
    }

    #[test]
    fn a_repeated_prefill_is_removed_with_its_tokens() {
        let answer = json!({"choices": [{"message": {"content": "{\"d\": \"LONG\"}"},
            "finish_reason": "stop",
            "logprobs": {"content": [entry("{\"", -0.5, &[-0.5]), entry("d\": \"LO", -0.2, &[-0.2]),
                entry("NG", -0.1, &[-0.1]), entry("\"}", -0.3, &[-0.3])]}}]});
        let (text, toks, _) = parse_answer(&answer, &req("{\"d\": \""), &opts(1)).unwrap();
        assert_eq!(text, "LONG\"}");
        let bytes: Vec<Vec<u8>> = toks.iter().map(|t| t.bytes.clone()).collect();
        assert_eq!(bytes, [b"LO".to_vec(), b"NG".to_vec(), b"\"}".to_vec()]);
        assert_eq!(toks[0].logprob, -0.2f32);
    }

    #[test]
    fn json_prefill_cuts_where_the_object_closes() {
        let answer = json!({"choices": [{"message": {"content": "LONG\"}} and more<|im_end|>"},
            "finish_reason": "stop",
            "logprobs": {"content": [entry("LONG", -0.1, &[-0.1]), entry("\"}", -0.2, &[-0.2]),
                entry("} and", -0.3, &[-0.3]), entry(" more", -0.4, &[-0.4])]}}]});
        let mut o = opts(1);
        o.json_prefill = Some("{\"d\": \"".into());
        let (text, toks, finish) = parse_answer(&answer, &req("{\"d\": \""), &o).unwrap();
        assert_eq!((text.as_str(), finish), ("LONG\"}", FinishReason::Stop));
        assert_eq!(toks.len(), 2);
        // Without it the server's answer is taken as is.
        let (text, toks, _) = parse_answer(&answer, &req("{\"d\": \""), &opts(1)).unwrap();
        assert_eq!(
            (text.as_str(), toks.len()),
            ("LONG\"}} and more<|im_end|>", 4)
        );
    }

    #[test]
    fn answers_without_scores_are_rejected() {
        let answer =
            json!({"choices": [{"message": {"content": "LONG"}, "finish_reason": "stop"}]});
        let e = parse_answer(&answer, &req(""), &opts(5)).unwrap_err();
        assert!(e.contains("no logprobs.content"), "{e}");
        let answer = json!({"choices": [{"message": {"content": "L"}, "finish_reason": "stop",
            "logprobs": {"content": [{"token": "L", "logprob": -1.0, "top_logprobs": []}]}}]});
        let e = parse_answer(&answer, &req(""), &opts(5)).unwrap_err();
        assert!(e.contains("no top_logprobs"), "{e}");
        assert!(parse_answer(&json!({"choices": []}), &req(""), &opts(5)).is_err());
    }

    #[test]
    fn connection_errors_name_the_url_and_never_the_key() {
        // Port 9 on loopback (discard) is closed on CI machines: connection refused.
        let b = OpenAiBackend::with_key(
            OpenAiSettings {
                base_url: "http://127.0.0.1:9/v1".into(),
                model: "m".into(),
                api_key_env: "X".into(),
                timeout: Duration::from_secs(5),
            },
            Some("sk-very-secret".into()),
        )
        .unwrap();
        let e = b.generate(&[req("")], &opts(5)).unwrap_err().to_string();
        assert!(
            e.contains("POST http://127.0.0.1:9/v1/chat/completions"),
            "{e}"
        );
        assert!(e.contains("after 3 attempts"), "{e}");
        assert!(!e.contains("sk-very-secret"), "{e}");
    }

    fn tok(text: &str, lp: f32, top: &[(&str, f32)]) -> Token {
        Token {
            bytes: text.as_bytes().to_vec(),
            logprob: lp,
            entropy: 0.0,
            top: top
                .iter()
                .map(|(t, l)| (t.as_bytes().to_vec(), *l))
                .collect(),
        }
    }

    fn direction_schema() -> Constraint {
        Constraint::JsonSchema(json!({
            "type": "object",
            "properties": {"d": {"enum": ["LONG", "SHORT"]}},
            "required": ["d"],
            "additionalProperties": false,
        }))
    }

    #[test]
    fn answers_are_checked_against_the_constraint() {
        let c = TextChecker::new(&direction_schema()).unwrap();
        // Valid, then text after the closing brace (a server that ignored the schema): cut.
        let tokens = vec![
            tok("{\"d\": \"", -0.1, &[]),
            tok(
                "SH",
                -1.0,
                &[("Long", -0.5), ("SH", -1.0), ("L", -2.0), ("No", -3.0)],
            ),
            tok("ORT\"}", -0.1, &[]),
            tok(" Because", -0.2, &[]),
        ];
        let a = check_answer(&c, tokens, FinishReason::Length, 10);
        assert_eq!(a.text, "{\"d\": \"SHORT\"}");
        assert_eq!(
            (a.error, a.finish, a.tokens.len()),
            (None, FinishReason::Stop, 3)
        );
        // At the decision step only "SH" and "L" were allowed ("Long", "No" are not):
        // renormalised among the two, most likely first.
        let step = &a.steps.as_ref().unwrap()[1];
        let alts: Vec<&[u8]> = step.alternatives.iter().map(|a| a.0.as_slice()).collect();
        assert_eq!(alts, [b"SH".as_slice(), b"L".as_slice()]);
        let p_sh = 1.0 / (1.0 + (-1.0f64).exp());
        assert!((f64::from(step.alternatives[0].1) - p_sh.ln()).abs() < 1e-6);
        assert!((f64::from(step.logprob) - p_sh.ln()).abs() < 1e-6);

        // `}` and junk in one token: the text keeps the bytes up to the end of the object.
        let a = check_answer(
            &c,
            vec![tok("{\"d\": \"LONG\"}\n\nOK", -0.1, &[])],
            FinishReason::Eos,
            10,
        );
        assert_eq!((a.text.as_str(), a.error), ("{\"d\": \"LONG\"}", None));

        // Leaves the form: flagged with where, finish `error`.
        let a = check_answer(
            &c,
            vec![tok("{\"d\": \"", -0.1, &[]), tok("BUY\"}", -0.1, &[])],
            FinishReason::Eos,
            10,
        );
        assert_eq!(a.finish, FinishReason::Error);
        assert!(
            a.error.as_deref().unwrap().contains("at byte 7"),
            "{:?}",
            a.error
        );

        // Stops short of the form: flagged, unless max_tokens cut it (left to the parser, as
        // with the embedded engine).
        let short = || vec![tok("{\"d\": \"LO", -0.1, &[])];
        let a = check_answer(&c, short(), FinishReason::Eos, 10);
        assert!(
            a.error
                .as_deref()
                .unwrap()
                .contains("before its form is complete")
        );
        let a = check_answer(&c, short(), FinishReason::Length, 10);
        assert_eq!((a.error, a.finish), (None, FinishReason::Length));
    }

    #[test]
    fn a_json_schema_is_sent_as_response_format() {
        let b = OpenAiBackend::with_key(
            OpenAiSettings {
                base_url: "http://127.0.0.1:1/v1".into(),
                model: "m".into(),
                api_key_env: "X".into(),
                timeout: Duration::from_secs(1),
            },
            None,
        )
        .unwrap();
        let mut o = opts(5);
        o.constraint = Some(direction_schema());
        let body = b.request_body(&req(""), &o);
        assert_eq!(body["response_format"]["type"], "json_schema");
        assert_eq!(
            body["response_format"]["json_schema"]["schema"]["properties"]["d"]["enum"][1],
            "SHORT"
        );
        o.constraint = Some(Constraint::Regex("[0-9]+".into()));
        assert!(
            b.request_body(&req(""), &o)
                .get("response_format")
                .is_none()
        );
        assert!(
            b.request_body(&req(""), &opts(5))
                .get("response_format")
                .is_none()
        );
    }

    #[test]
    fn embeddings_are_read_in_index_order() {
        let v = json!({"data": [
            {"index": 1, "embedding": [0.0, 1.0]},
            {"index": 0, "embedding": [1.0, 0.0]},
        ]});
        assert_eq!(
            parse_embeddings(&v, 2).unwrap(),
            vec![vec![1.0, 0.0], vec![0.0, 1.0]]
        );
        assert!(
            parse_embeddings(&v, 3)
                .unwrap_err()
                .contains("2 embeddings for 3")
        );
        let dup =
            json!({"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]});
        assert!(parse_embeddings(&dup, 2).unwrap_err().contains("twice"));
        let ragged = json!({"data": [{"embedding": [1.0]}, {"embedding": [1.0, 2.0]}]});
        assert!(parse_embeddings(&ragged, 2).is_err());
    }
}
