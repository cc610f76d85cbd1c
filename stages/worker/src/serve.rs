//! `flag serve`: the embedded models behind an OpenAI-compatible HTTP API, so one warm model
//! serves many clients (the `backend: openai` stages, scripts, other tools). The API itself
//! (validation, response_format, batching, scores) is `flag_llm::protocol`; this module and
//! [`http`] are the transport: binding, the optional API key, limits, one log line per request.
//! Errors are OpenAI-style `{"error": {"message", "type"}}` with status 400 (bad request), 401
//! (missing key with `--api-key-env`), 404, 405, 413, 503 (busy) or 500. Bodies are never
//! logged.
//!
//! Bounds, so no client can exhaust the server's memory or its model:
//! - a body over `--max-body-mb` is refused (413) from its Content-Length, unread;
//! - a prompt whose bytes cannot fit in the context (every token is at most the model's
//!   longest token in bytes) is refused before it is tokenized (400);
//! - at most `--max-pending` model requests (chat, embeddings), holding at most
//!   `--max-pending-mb` of bodies, are admitted at once: more are refused with 503 and
//!   `Retry-After`, before their bodies are read;
//! - `max_tokens` above `--max-tokens-cap` is refused (400), and a batch holds at most
//!   `--max-batch-tokens` KV-cache positions;
//! - at most `--http-threads` connections are served at once (one thread each); one more is
//!   answered 503 and closed;
//! - a chat request whose client closes the connection is noticed within 100 ms (the socket
//!   is peeked while the answer is decoded) and its sequence is dropped from the batch:
//!   logged as "dropped N sequence(s) whose client went away" and counted in `GET /metrics`
//!   (`flag_serve_sequences_cancelled_total`).

mod http;

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flag_llm::generate::{Engine, PrefixStore};
use flag_llm::models;
use flag_llm::protocol::{ApiError, ApiResult, Service, ServiceConfig};
use serde_json::Value;

use http::{BodyError, Exchange, Response};

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
    /// Connections served at once (one thread each); one more is answered 503 and closed
    #[arg(long, default_value_t = 64)]
    pub http_threads: usize,
    /// Most prompts decoded in one batch
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Most KV-cache positions of one batch: rows x (longest prompt + max_tokens); a single
    /// larger request still runs, alone
    #[arg(long, default_value_t = 32768)]
    pub max_batch_tokens: usize,
    /// Milliseconds the model worker waits for more requests to join a batch
    #[arg(long, default_value_t = 5)]
    pub batch_wait_ms: u64,
    /// Largest max_tokens (max_completion_tokens) a request may ask for; more is refused
    /// with 400 (not clamped: an answer is never cut shorter than asked without saying so)
    #[arg(long, default_value_t = flag_llm::protocol::DEFAULT_MAX_TOKENS_CAP)]
    pub max_tokens_cap: usize,
    /// Largest request body, in MiB (413 past it, refused before it is read)
    #[arg(long, default_value_t = 8)]
    pub max_body_mb: u64,
    /// Model requests (chat, embeddings) admitted at once, reading, queued or decoding;
    /// more are answered 503 with Retry-After
    #[arg(long, default_value_t = 32)]
    pub max_pending: usize,
    /// Body bytes of the admitted requests together, in MiB; a request that would pass it is
    /// answered 503 with Retry-After
    #[arg(long, default_value_t = 64)]
    pub max_pending_mb: u64,
    /// Require "Authorization: Bearer KEY", KEY read from this environment variable
    #[arg(long)]
    pub api_key_env: Option<String>,
}

/// What every connection's thread shares.
struct State {
    service: Service,
    api_key: Option<String>,
    max_body: u64,
    max_pending: usize,
    max_pending_bytes: u64,
    /// (requests, body bytes) admitted and not yet answered.
    pending: Mutex<(usize, u64)>,
}

/// An admitted model request; releases its share of the limits when dropped.
struct Permit<'a> {
    state: &'a State,
    bytes: u64,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut p = self.state.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.0 -= 1;
        p.1 -= self.bytes;
        self.state.publish(&p);
    }
}

impl State {
    fn publish(&self, p: &(usize, u64)) {
        let m = self.service.metrics();
        m.in_flight.store(p.0 as u64, Ordering::Relaxed);
        m.in_flight_bytes.store(p.1, Ordering::Relaxed);
    }

    /// Admits a request of `bytes` body bytes, or says why not (503).
    fn admit(&self, bytes: u64) -> ApiResult<Permit<'_>> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.0 >= self.max_pending || p.1 + bytes > self.max_pending_bytes {
            self.service
                .metrics()
                .rejected_busy
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::with_status(
                503,
                format!(
                    "the server is busy: {} requests holding {} body bytes are in flight and \
                     this one ({bytes} bytes) would pass the limits of {} requests or {} bytes \
                     (flag serve --max-pending, --max-pending-mb); retry later",
                    p.0, p.1, self.max_pending, self.max_pending_bytes
                ),
            ));
        }
        p.0 += 1;
        p.1 += bytes;
        self.publish(&p);
        Ok(Permit { state: self, bytes })
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.http_threads == 0
        || args.max_batch == 0
        || args.max_pending == 0
        || args.max_tokens_cap == 0
        || args.max_batch_tokens == 0
        || args.max_body_mb == 0
        || args.max_pending_mb == 0
    {
        bail!(
            "--http-threads, --max-batch, --max-batch-tokens, --max-tokens-cap, --max-body-mb, \
             --max-pending and --max-pending-mb must be at least 1"
        );
    }
    let max_body = args.max_body_mb << 20;
    let max_pending_bytes = args.max_pending_mb << 20;
    if max_pending_bytes < max_body {
        bail!(
            "--max-pending-mb {} is below --max-body-mb {}: a body of the largest size could never be admitted",
            args.max_pending_mb,
            args.max_body_mb
        );
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    tch::set_num_threads(threads as i32);
    let device = crate::llm::parse_device(&args.device)?;
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
    // One warm model for many clients: heads (chat template, a client's fixed instructions)
    // are kept across requests.
    engine.set_prefix_store(PrefixStore::Any);
    let model_id = gguf
        .file_stem()
        .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
    let service = Service::start(ServiceConfig {
        engine,
        model_id,
        embed_dir: args.embed_model.clone(),
        device,
        max_batch: args.max_batch,
        max_batch_tokens: args.max_batch_tokens,
        max_tokens_cap: args.max_tokens_cap,
        batch_wait: Duration::from_millis(args.batch_wait_ms),
    })?;

    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener
        .local_addr()
        .context("the server's bound address")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    let limits = service.limits();
    eprintln!(
        "flag serve: {} ({}), embeddings {}, on http://{addr}/v1; context {} tokens, \
         max_tokens <= {}, prompts <= {} bytes (longest token {} bytes), bodies <= {} bytes",
        service.model_id(),
        args.device,
        service.embed_id(),
        limits.ctx_len,
        limits.max_tokens_cap,
        limits.max_prompt_bytes(),
        limits.max_token_bytes,
        max_body,
    );
    let state = Arc::new(State {
        service,
        api_key,
        max_body,
        max_pending: args.max_pending,
        max_pending_bytes,
        pending: Mutex::new((0, 0)),
    });
    let connections = Arc::new(AtomicUsize::new(0));
    // 1 while a new connection waits for a slot: one idle connection then claims it (back to
    // 0) and closes.
    let slot_wanted = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                eprintln!("accepting a connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if !take_slot(&connections, &slot_wanted, args.http_threads) {
            state
                .service
                .metrics()
                .rejected_busy
                .fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let e = ApiError::with_status(
                503,
                format!(
                    "the server is busy: {} connections are open (flag serve --http-threads); retry later",
                    args.http_threads
                ),
            );
            let _ = http::write_response(&stream, &error_response(&e), true, false);
            continue;
        }
        let (state, connections, wanted) = (
            Arc::clone(&state),
            Arc::clone(&connections),
            Arc::clone(&slot_wanted),
        );
        let held = Arc::clone(&connections);
        let spawned = std::thread::Builder::new()
            .name("flag-serve-conn".into())
            .spawn(move || {
                http::serve_connection(
                    stream,
                    state.max_body,
                    &|| {
                        wanted
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok()
                    },
                    &|ex| handle(&state, ex),
                );
                connections.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            held.fetch_sub(1, Ordering::SeqCst);
            eprintln!("starting a connection thread: {e}");
        }
    }
    Ok(())
}

/// How long a new connection waits for a slot (while idle connections give theirs up)
/// before it is answered 503.
const SLOT_WAIT: Duration = Duration::from_secs(2);

/// Takes one of the `limit` connection slots, waiting at most [`SLOT_WAIT`] with `wanted`
/// at 1, which makes one connection idle between requests close.
fn take_slot(connections: &AtomicUsize, wanted: &AtomicUsize, limit: usize) -> bool {
    let try_take = || {
        connections
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    };
    if try_take() {
        return true;
    }
    wanted.store(1, Ordering::SeqCst);
    let since = Instant::now();
    let mut took = false;
    while since.elapsed() < SLOT_WAIT {
        std::thread::sleep(Duration::from_millis(10));
        if try_take() {
            took = true;
            break;
        }
    }
    wanted.store(0, Ordering::SeqCst);
    took
}

fn error_response(e: &ApiError) -> Response {
    let mut r = Response::json(e.status, &e.body());
    if e.status == 503 {
        r.headers.push(("Retry-After", "1".into()));
    }
    r
}

/// A successful answer.
enum Reply {
    Json(Value),
    /// Prometheus text.
    Text(String),
}

fn handle(state: &State, ex: &mut Exchange) -> Response {
    let t0 = Instant::now();
    let (method, path) = (ex.head.method.clone(), ex.head.path.clone());
    let resp = match route(state, ex) {
        Ok(Reply::Json(v)) => Response::json(200, &v),
        Ok(Reply::Text(t)) => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: t.into_bytes(),
            headers: Vec::new(),
        },
        Err(e) => error_response(&e),
    };
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if resp.status == 499 {
        eprintln!("{method} {path} -> client went away ({ms:.0} ms)");
    } else {
        eprintln!("{method} {path} -> {} ({ms:.0} ms)", resp.status);
    }
    resp
}

fn route(state: &State, ex: &mut Exchange) -> ApiResult<Reply> {
    let (method, path) = (ex.head.method.as_str(), ex.head.path.as_str());
    let known = [
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/metrics",
    ];
    if !known.contains(&path) {
        return Err(ApiError::with_status(
            404,
            format!(
                "no route {method} {path} (served: POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models, GET /metrics)"
            ),
        ));
    }
    if let Some(key) = &state.api_key {
        let want = format!("Bearer {key}");
        if ex.head.header("Authorization") != Some(want.as_str()) {
            return Err(ApiError::with_status(
                401,
                "missing or wrong API key (Authorization: Bearer ...)",
            ));
        }
    }
    let service = &state.service;
    match (method, path) {
        ("GET", "/v1/models") => Ok(Reply::Json(service.models())),
        ("GET", "/metrics") => Ok(Reply::Text(service.metrics().render())),
        ("POST", "/v1/chat/completions") => {
            let _permit = admit(state, ex)?;
            let v = read_json(state, ex)?;
            service.chat(&v, &mut || ex.client_gone()).map(Reply::Json)
        }
        ("POST", "/v1/embeddings") => {
            let _permit = admit(state, ex)?;
            let v = read_json(state, ex)?;
            service
                .embeddings(&v, &mut || ex.client_gone())
                .map(Reply::Json)
        }
        _ => Err(ApiError::with_status(
            405,
            format!("{method} is not allowed on {path}"),
        )),
    }
}

fn too_large(state: &State, n: u64) -> ApiError {
    state
        .service
        .metrics()
        .rejected_too_large
        .fetch_add(1, Ordering::Relaxed);
    ApiError::with_status(
        413,
        format!(
            "the request body is {n} bytes, over the limit of {} bytes (flag serve --max-body-mb)",
            state.max_body
        ),
    )
}

/// Admits a model request by its declared size (a chunked body counts as the largest).
fn admit<'a>(state: &'a State, ex: &Exchange) -> ApiResult<Permit<'a>> {
    let bytes = ex.content_length().unwrap_or(state.max_body);
    if bytes > state.max_body {
        return Err(too_large(state, bytes));
    }
    state.admit(bytes)
}

fn read_json(state: &State, ex: &mut Exchange) -> ApiResult<Value> {
    let body = ex.read_body().map_err(|e| match e {
        BodyError::TooLarge(n) => too_large(state, n),
        BodyError::Bad(m) => ApiError::bad(format!("reading the request body: {m}")),
        BodyError::Io(e) => ApiError::bad(format!("reading the request body: {e}")),
    })?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object"));
    }
    Ok(v)
}
