//! `flag serve`: the embedded models behind an OpenAI-compatible HTTP API, so one warm model
//! serves many clients (the `backend: openai` stages, scripts, other tools). The API itself
//! (validation, response_format, batching, scores) is `flag_llm::protocol`; this module is
//! the HTTP transport: binding, the optional API key, body limits, one log line per request.
//! Errors are OpenAI-style `{"error": {"message", "type"}}` with status 400 (bad request), 401
//! (missing key with `--api-key-env`), 404, 405, 413 or 500. Bodies are never logged.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flag_llm::generate::Engine;
use flag_llm::models;
use flag_llm::protocol::{ApiError, ApiResult, Service, ServiceConfig};
use serde_json::Value;

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
    let service = Service::start(ServiceConfig {
        engine,
        model_id,
        embed_dir: args.embed_model.clone(),
        device,
        max_batch: args.max_batch,
        batch_wait: Duration::from_millis(args.batch_wait_ms),
    })?;

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
        service.model_id(),
        args.device,
        service.embed_id()
    );
    let server = Arc::new(server);
    let shared = Arc::new((service, api_key));
    let handlers: Vec<_> = (0..args.http_threads)
        .map(|i| {
            let server = Arc::clone(&server);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("flag-serve-http-{i}"))
                .spawn(move || {
                    while let Ok(req) = server.recv() {
                        handle(&shared.0, shared.1.as_deref(), req);
                    }
                })
        })
        .collect::<Result<_, _>>()?;
    for h in handlers {
        let _ = h.join();
    }
    Ok(())
}

fn handle(service: &Service, api_key: Option<&str>, mut req: tiny_http::Request) {
    let t0 = Instant::now();
    let method = req.method().as_str().to_string();
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let result = route(service, api_key, &mut req, &method, &path);
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
    service: &Service,
    api_key: Option<&str>,
    req: &mut tiny_http::Request,
    method: &str,
    path: &str,
) -> ApiResult<Value> {
    let known = ["/v1/chat/completions", "/v1/embeddings", "/v1/models"];
    if !known.contains(&path) {
        return Err(ApiError::with_status(
            404,
            format!(
                "no route {method} {path} (served: POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models)"
            ),
        ));
    }
    if let Some(key) = api_key {
        let want = format!("Bearer {key}");
        let ok = req
            .headers()
            .iter()
            .any(|h| h.field.equiv("Authorization") && h.value.as_str() == want);
        if !ok {
            return Err(ApiError::with_status(
                401,
                "missing or wrong API key (Authorization: Bearer ...)",
            ));
        }
    }
    match (method, path) {
        ("GET", "/v1/models") => Ok(service.models()),
        ("POST", "/v1/chat/completions") => service.chat(&read_json(req)?),
        ("POST", "/v1/embeddings") => service.embeddings(&read_json(req)?),
        _ => Err(ApiError::with_status(
            405,
            format!("{method} is not allowed on {path}"),
        )),
    }
}

fn read_json(req: &mut tiny_http::Request) -> ApiResult<Value> {
    let mut body = Vec::new();
    req.as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::bad(format!("reading the request body: {e}")))?;
    if body.len() as u64 > MAX_BODY {
        return Err(ApiError::with_status(
            413,
            format!("the request body exceeds {MAX_BODY} bytes"),
        ));
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object"));
    }
    Ok(v)
}
