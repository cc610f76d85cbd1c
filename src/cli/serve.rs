//! `flag serve`: the embedded models behind an OpenAI-compatible HTTP API, so one warm model
//! serves many clients (the `backend: openai` stages, scripts, other tools).
//!
//!   POST /v1/chat/completions  messages -> the GGUF's chat template; a final assistant message
//!                              is a prefill the answer continues. temperature, top_p, seed,
//!                              max_tokens (or max_completion_tokens), stop, logprobs,
//!                              top_logprobs (<= 20). Returns choices[0].message.content,
//!                              finish_reason, logprobs.content[{token, logprob, bytes,
//!                              top_logprobs[{token, logprob, bytes}]}] and usage.
//!   POST /v1/embeddings        input: a string or a list of strings -> MiniLM vectors
//!                              (384 dims, L2-normalised) as data[{embedding, index}].
//!   GET  /v1/models            the two model ids.
//!
//! Threads: HTTP handler threads parse and tokenize; the decoder (tch, not `Sync`) lives on
//! one worker thread that takes requests from a channel and runs those that arrive together
//! (within `--batch-wait-ms`, up to `--max-batch`) with the same generation options as one
//! batched `generate_ids` call. Greedy requests are batched whatever their seed; sampled ones
//! run alone, so a (prompt, seed) pair gives the same answer whatever else is being served.
//! The embedder (loaded on first use) has a worker thread of its own.
//!
//! Scores are the embedded engine's: each generated token's logprob under the untempered
//! distribution, the end-of-turn token included as the last `logprobs.content` entry when the
//! model ends its answer (as in flag's own perplexity). User text has chat-control markers
//! (`<|im_start|>`...) removed, exactly as the embedded backend does, so data can never open
//! or close a turn. Errors are OpenAI-style `{"error": {"message", "type"}}` with status 400
//! (bad request), 401 (missing key with `--api-key-env`), 404, 405, 413 or 500. Bodies are
//! never logged; stderr gets one line per request.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use flag_agents::backend::strip_control_markers;
use flag_llm::embed::MiniLmEmbedder;
use flag_llm::generate::{Engine, FinishReason, GenerateOptions, Generation, TopLogprobs};
use flag_llm::models;
use flag_llm::tokenizer::{ChatMessage, LlmTokenizer};
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to bind (loopback by default; bind elsewhere only on purpose)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port; 0 picks a free one. The bound address is the first line on stdout:
    /// "listening on http://HOST:PORT"
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// GGUF model [default: the packaged SmolLM2-135M-Instruct; env FLAG_SMOLLM2_GGUF]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// MiniLM directory for /v1/embeddings [default: the packaged all-MiniLM-L6-v2;
    /// env FLAG_MINILM_DIR]
    #[arg(long)]
    pub embed_model: Option<PathBuf>,
    /// cpu, cuda or cuda:N (CUDA runs the decoder in bf16)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Intra-op CPU threads of the models [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Connections handled at once
    #[arg(long, default_value_t = 8)]
    pub http_threads: usize,
    /// Most prompts decoded in one batch
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Milliseconds the model worker waits for more requests to join a batch
    #[arg(long, default_value_t = 5)]
    pub batch_wait_ms: u64,
    /// Require "Authorization: Bearer KEY", KEY read from this environment variable
    #[arg(long)]
    pub api_key_env: Option<String>,
}

/// Largest request body accepted.
const MAX_BODY: u64 = 16 << 20;
/// The OpenAI API's limit on top_logprobs.
const MAX_TOP_LOGPROBS: usize = 20;
/// max_tokens when the request gives none.
const DEFAULT_MAX_TOKENS: usize = 512;
/// Most inputs in one embeddings request (as the OpenAI API).
const MAX_EMBED_INPUTS: usize = 2048;

/// An error answered to the client.
#[derive(Debug)]
struct ApiError {
    status: u16,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    fn server(message: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            kind: "server_error",
            message: message.into(),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": null}})
    }
}

type ApiResult<T> = Result<T, ApiError>;

type ChatReply = Result<(Generation, Vec<TopLogprobs>), String>;

/// Vectors and the number of word pieces embedded.
type EmbedReply = Result<(Vec<Vec<f32>>, usize), String>;

struct ChatJob {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    top_n: usize,
    reply: Sender<ChatReply>,
}

struct EmbedJob {
    texts: Vec<String>,
    reply: Sender<EmbedReply>,
}

/// What the handler threads share.
struct Shared {
    tok: LlmTokenizer,
    ctx_len: usize,
    model_id: String,
    embed_id: String,
    chat: Sender<ChatJob>,
    embed: Sender<EmbedJob>,
    api_key: Option<String>,
    /// byte-level BPE character -> byte (GPT-2's bytes_to_unicode, inverted).
    byte_of: Vec<Option<u8>>,
    counter: std::sync::atomic::AtomicU64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.http_threads == 0 || args.max_batch == 0 {
        bail!("--http-threads and --max-batch must be at least 1");
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    tch::set_num_threads(threads as i32);
    let device = super::llm::parse_device(&args.device)?;
    let api_key = match &args.api_key_env {
        Some(name) => Some(
            std::env::var(name)
                .ok()
                .filter(|k| !k.is_empty())
                .with_context(|| format!("--api-key-env {name}: the variable is not set"))?,
        ),
        None => None,
    };
    let gguf = models::smollm2_gguf(args.model.as_deref())?;
    let engine =
        Engine::load(&gguf, device).with_context(|| format!("loading {}", gguf.display()))?;
    let model_id = gguf
        .file_stem()
        .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
    let embed_dir = models::minilm_dir(args.embed_model.as_deref()).ok();
    let embed_id = embed_dir
        .as_ref()
        .and_then(|d| {
            // The packaged layout is .../all-MiniLM-L6-v2/model or similar: name the model.
            let name = d.file_name()?.to_string_lossy().into_owned();
            Some(if name == "model" {
                models::MINILM.name.to_string()
            } else {
                name
            })
        })
        .unwrap_or_else(|| models::MINILM.name.to_string());

    let (chat_tx, chat_rx) = mpsc::channel::<ChatJob>();
    let (embed_tx, embed_rx) = mpsc::channel::<EmbedJob>();
    let shared = Arc::new(Shared {
        tok: engine.tokenizer().clone(),
        ctx_len: engine.model().cfg.ctx_len,
        model_id,
        embed_id,
        chat: chat_tx,
        embed: embed_tx,
        api_key,
        byte_of: byte_decoder(),
        counter: std::sync::atomic::AtomicU64::new(0),
    });
    let wait = Duration::from_millis(args.batch_wait_ms);
    let max_batch = args.max_batch;
    std::thread::Builder::new()
        .name("flag-serve-decoder".into())
        .spawn(move || decoder_worker(engine, chat_rx, max_batch, wait))?;
    let embed_model = args.embed_model.clone();
    std::thread::Builder::new()
        .name("flag-serve-embedder".into())
        .spawn(move || embed_worker(embed_model, device, embed_rx))?;

    let server = tiny_http::Server::http((args.host.as_str(), args.port))
        .map_err(|e| anyhow::anyhow!("binding {}:{}: {e}", args.host, args.port))?;
    let addr = server
        .server_addr()
        .to_ip()
        .context("the server is not bound to an IP address")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    eprintln!(
        "flag serve: {} ({}), embeddings {}, on http://{addr}/v1",
        shared.model_id, args.device, shared.embed_id
    );
    let server = Arc::new(server);
    let handlers: Vec<_> = (0..args.http_threads)
        .map(|i| {
            let server = Arc::clone(&server);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("flag-serve-http-{i}"))
                .spawn(move || {
                    while let Ok(req) = server.recv() {
                        handle(&shared, req);
                    }
                })
        })
        .collect::<Result<_, _>>()?;
    for h in handlers {
        let _ = h.join();
    }
    Ok(())
}

fn handle(shared: &Shared, mut req: tiny_http::Request) {
    let t0 = Instant::now();
    let method = req.method().as_str().to_string();
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let result = route(shared, &mut req, &method, &path);
    let (status, body) = match result {
        Ok(v) => (200, v),
        Err(e) => (e.status, e.body()),
    };
    let header =
        tiny_http::Header::from_bytes("Content-Type", "application/json").expect("a valid header");
    let resp = tiny_http::Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(header);
    let _ = req.respond(resp);
    eprintln!(
        "{method} {path} -> {status} ({:.0} ms)",
        t0.elapsed().as_secs_f64() * 1e3
    );
}

fn route(
    shared: &Shared,
    req: &mut tiny_http::Request,
    method: &str,
    path: &str,
) -> ApiResult<Value> {
    let known = ["/v1/chat/completions", "/v1/embeddings", "/v1/models"];
    if !known.contains(&path) {
        return Err(ApiError {
            status: 404,
            kind: "invalid_request_error",
            message: format!(
                "no route {method} {path} (served: POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models)"
            ),
        });
    }
    if let Some(key) = &shared.api_key {
        let want = format!("Bearer {key}");
        let ok = req
            .headers()
            .iter()
            .any(|h| h.field.equiv("Authorization") && h.value.as_str() == want);
        if !ok {
            return Err(ApiError {
                status: 401,
                kind: "invalid_request_error",
                message: "missing or wrong API key (Authorization: Bearer ...)".into(),
            });
        }
    }
    match (method, path) {
        ("GET", "/v1/models") => Ok(models_list(shared)),
        ("POST", "/v1/chat/completions") => chat(shared, &read_json(req)?),
        ("POST", "/v1/embeddings") => embeddings(shared, &read_json(req)?),
        _ => Err(ApiError {
            status: 405,
            kind: "invalid_request_error",
            message: format!("{method} is not allowed on {path}"),
        }),
    }
}

fn read_json(req: &mut tiny_http::Request) -> ApiResult<Value> {
    let mut body = Vec::new();
    req.as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::bad(format!("reading the request body: {e}")))?;
    if body.len() as u64 > MAX_BODY {
        return Err(ApiError {
            status: 413,
            kind: "invalid_request_error",
            message: format!("the request body exceeds {MAX_BODY} bytes"),
        });
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object"));
    }
    Ok(v)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn models_list(shared: &Shared) -> Value {
    let model = |id: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "flag"});
    json!({"object": "list", "data": [model(&shared.model_id), model(&shared.embed_id)]})
}

// ---- chat completions ------------------------------------------------------------------

/// A validated chat request.
#[derive(Debug)]
struct ChatRequest {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    logprobs: bool,
    top_logprobs: usize,
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

fn parse_chat(shared: &Shared, v: &Value) -> ApiResult<ChatRequest> {
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
    let max_tokens = match opt_usize(v, "max_completion_tokens")? {
        Some(n) => n,
        None => opt_usize(v, "max_tokens")?.unwrap_or(DEFAULT_MAX_TOKENS),
    };
    if max_tokens == 0 {
        return Err(ApiError::bad("'max_tokens' must be at least 1"));
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
    let chat: Vec<ChatMessage> = msgs
        .iter()
        .map(|(role, c)| ChatMessage::new(*role, strip_control_markers(c)))
        .collect();
    let text = shared
        .tok
        .apply_chat_template(&chat, true)
        .map_err(|e| ApiError::bad(format!("applying the chat template: {e}")))?;
    let mut prompt = shared
        .tok
        .encode(&text, true)
        .map_err(|e| ApiError::server(e.to_string()))?;
    if !prefill.is_empty() {
        prompt.extend(
            shared
                .tok
                .encode(&prefill, false)
                .map_err(|e| ApiError::server(e.to_string()))?,
        );
    }
    if prompt.len() + max_tokens > shared.ctx_len {
        return Err(ApiError::bad(format!(
            "{} prompt tokens + max_tokens {max_tokens} exceed the model context of {}",
            prompt.len(),
            shared.ctx_len
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
            constraint: None,
        },
        logprobs,
        top_logprobs,
    })
}

/// The bytes a token stands for (byte-level BPE pieces decoded; other entries as UTF-8).
fn token_bytes(shared: &Shared, id: u32) -> Vec<u8> {
    let piece = shared.tok.token(id).unwrap_or("");
    let mut out = Vec::with_capacity(piece.len());
    for c in piece.chars() {
        match shared.byte_of.get(c as usize).copied().flatten() {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// GPT-2's bytes_to_unicode, inverted: char code -> byte.
fn byte_decoder() -> Vec<Option<u8>> {
    let mut table = vec![None; 512];
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut n = 0;
    for b in 0u32..256 {
        if printable(b) {
            table[b as usize] = Some(b as u8);
        } else {
            table[(256 + n) as usize] = Some(b as u8);
            n += 1;
        }
    }
    table
}

fn token_entry(shared: &Shared, id: u32, logprob: f32) -> Value {
    let bytes = token_bytes(shared, id);
    json!({
        "token": String::from_utf8_lossy(&bytes),
        "logprob": logprob,
        "bytes": bytes,
    })
}

fn chat(shared: &Shared, v: &Value) -> ApiResult<Value> {
    let req = parse_chat(shared, v)?;
    let (tx, rx) = mpsc::channel();
    let n_prompt = req.prompt.len();
    let job = ChatJob {
        prompt: req.prompt,
        opts: req.opts,
        top_n: if req.logprobs { req.top_logprobs } else { 0 },
        reply: tx,
    };
    shared
        .chat
        .send(job)
        .map_err(|_| ApiError::server("the model worker has stopped"))?;
    let (g, top) = rx
        .recv()
        .map_err(|_| ApiError::server("the model worker has stopped"))?
        .map_err(ApiError::server)?;
    let logprobs = if req.logprobs {
        let content: Vec<Value> = g
            .ids
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                let mut e = token_entry(shared, id, g.logprobs[t]);
                let tops: Vec<Value> = top
                    .get(t)
                    .map(|row| {
                        row.iter()
                            .take(req.top_logprobs)
                            .map(|&(tid, lp)| token_entry(shared, tid, lp))
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
    let n = shared
        .counter
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(json!({
        "id": format!("chatcmpl-{n}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": shared.model_id,
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
    }))
}

/// Owns the decoder. Takes the requests waiting (the first, then whatever arrives within
/// `wait`, up to `max_batch`) and decodes those with equal options together.
fn decoder_worker(engine: Engine, rx: Receiver<ChatJob>, max_batch: usize, wait: Duration) {
    while let Ok(first) = rx.recv() {
        let mut pending = vec![first];
        let deadline = Instant::now() + wait;
        while pending.len() < max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => pending.push(j),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        while !pending.is_empty() {
            let head = &pending[0];
            let batchable = head.opts.temperature == 0.0;
            let (opts, top_n) = (head.opts.clone(), head.top_n);
            let (group, rest): (Vec<ChatJob>, Vec<ChatJob>) = if batchable {
                pending
                    .into_iter()
                    .partition(|j| j.opts == opts && j.top_n == top_n)
            } else {
                let mut it = pending.into_iter();
                (it.next().into_iter().collect(), it.collect())
            };
            pending = rest;
            let prompts: Vec<Vec<u32>> = group.iter().map(|j| j.prompt.clone()).collect();
            let t0 = Instant::now();
            let result = engine.generate_ids_with_top(&prompts, &opts, top_n);
            eprintln!(
                "decoded a batch of {} ({:.0} ms)",
                prompts.len(),
                t0.elapsed().as_secs_f64() * 1e3
            );
            match result {
                Ok(outs) => {
                    for (j, out) in group.into_iter().zip(outs) {
                        let _ = j.reply.send(Ok(out));
                    }
                }
                Err(e) => {
                    for j in group {
                        let _ = j.reply.send(Err(format!("generation failed: {e}")));
                    }
                }
            }
        }
    }
}

// ---- embeddings ------------------------------------------------------------------------

fn embeddings(shared: &Shared, v: &Value) -> ApiResult<Value> {
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
    let (tx, rx) = mpsc::channel();
    shared
        .embed
        .send(EmbedJob { texts, reply: tx })
        .map_err(|_| ApiError::server("the embedding worker has stopped"))?;
    let (vecs, n_tokens) = rx
        .recv()
        .map_err(|_| ApiError::server("the embedding worker has stopped"))?
        .map_err(ApiError::server)?;
    let data: Vec<Value> = vecs
        .into_iter()
        .enumerate()
        .map(|(i, e)| json!({"object": "embedding", "index": i, "embedding": e}))
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": shared.embed_id,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }))
}

/// Owns the embedder, loaded on the first request (a missing model fails only those).
fn embed_worker(dir: Option<PathBuf>, device: tch::Device, rx: Receiver<EmbedJob>) {
    let mut model: Option<MiniLmEmbedder> = None;
    while let Ok(job) = rx.recv() {
        if model.is_none() {
            let loaded = models::minilm_dir(dir.as_deref())
                .map_err(|e| e.to_string())
                .and_then(|d| {
                    MiniLmEmbedder::load(&d, device)
                        .map_err(|e| format!("loading {}: {e}", d.display()))
                });
            match loaded {
                Ok(m) => model = Some(m),
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                    continue;
                }
            }
        }
        let Some(m) = model.as_ref() else { continue };
        let out = (|| -> Result<_, String> {
            let vecs = m.embed(&job.texts).map_err(|e| e.to_string())?;
            let mut n = 0;
            for t in &job.texts {
                n += m.token_ids(t).map_err(|e| e.to_string())?.len();
            }
            Ok((vecs, n))
        })();
        let _ = job.reply.send(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_decoder_inverts_gpt2_bytes_to_unicode() {
        let t = byte_decoder();
        // 'Ġ' (U+0120) is the space byte, 'Ċ' (U+010A) the newline.
        assert_eq!(t['Ġ' as usize], Some(b' '));
        assert_eq!(t['Ċ' as usize], Some(b'\n'));
        assert_eq!(t['a' as usize], Some(b'a'));
        assert_eq!(t['Ã' as usize], Some(0xC3));
        let mut seen: Vec<u8> = t.iter().flatten().copied().collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn errors_are_openai_shaped() {
        let e = ApiError::bad("x");
        assert_eq!(e.status, 400);
        assert_eq!(e.body()["error"]["message"], "x");
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    }
}
