//! The models behind the API on worker threads. The decoder (tch, not `Sync`) lives on one
//! thread that takes requests from a channel and runs those that arrive together (within
//! `batch_wait`, up to `max_batch`) with the same generation options as one batched
//! `generate_ids` call; requests with the same `response_format` batch like any other.
//! Greedy requests are batched whatever their seed; sampled ones run alone, so a (prompt,
//! seed) pair gives the same answer whatever else is being served. A batch holds at most
//! `max_batch_tokens` KV-cache positions (rows x (longest prompt + max_tokens)), so the
//! decoder's memory is bounded whatever the clients ask. The embedder (loaded on first use)
//! has a worker thread of its own.
//!
//! A client that goes away is noticed while its answer is decoded: [`Service::chat`] asks
//! the caller's `client_gone` probe every [`CLIENT_PROBE`] while it waits, and a `true`
//! marks the job cancelled. The decoder then drops that sequence from its batch before the
//! next token (the other rows go on) or skips it if it has not started, counts it in
//! [`Metrics`] and logs "dropped N sequence(s) whose client went away".
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ApiError, ApiResult, ChatLimits};
use crate::embed::MiniLmEmbedder;
use crate::generate::{Engine, GenerateOptions, Generation, TopLogprobs};
use crate::models;
use crate::tokenizer::LlmTokenizer;

type ChatReply = Result<(Generation, Vec<TopLogprobs>), String>;

/// Vectors and the number of word pieces embedded.
type EmbedReply = Result<(Vec<Vec<f32>>, usize), String>;

/// How often a waiting chat request asks whether its client is still there.
pub const CLIENT_PROBE: Duration = Duration::from_millis(100);

struct ChatJob {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    top_n: usize,
    /// Set when the client went away: the decoder drops the sequence.
    cancel: Arc<AtomicBool>,
    reply: Sender<ChatReply>,
}

impl ChatJob {
    /// KV-cache positions this job needs.
    fn positions(&self) -> usize {
        self.prompt.len() + self.opts.max_tokens
    }
}

/// The server's counters, shown by `GET /metrics` (Prometheus text format).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Chat completions answered (200).
    pub chat_completions: AtomicU64,
    /// Embeddings requests answered (200).
    pub embeddings: AtomicU64,
    /// Sequences being decoded now.
    pub sequences_decoding: AtomicU64,
    /// Sequences dropped (before or during decoding) because their client went away.
    pub sequences_cancelled: AtomicU64,
    /// Model requests (chat, embeddings) whose client was noticed gone while they waited.
    pub clients_gone: AtomicU64,
    /// Embeddings requests stopped because their client went away.
    pub embeddings_cancelled: AtomicU64,
    /// Requests refused because the server was at its in-flight limits (503).
    pub rejected_busy: AtomicU64,
    /// Requests refused because the body exceeded the size limit (413).
    pub rejected_too_large: AtomicU64,
    /// Model requests admitted and not yet answered, and their body bytes.
    pub in_flight: AtomicU64,
    pub in_flight_bytes: AtomicU64,
}

impl Metrics {
    /// The counters in Prometheus' text format.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 10] = [
            (
                "flag_serve_chat_completions_total",
                "counter",
                "chat completions answered",
                &self.chat_completions,
            ),
            (
                "flag_serve_embeddings_total",
                "counter",
                "embeddings requests answered",
                &self.embeddings,
            ),
            (
                "flag_serve_sequences_decoding",
                "gauge",
                "sequences being decoded",
                &self.sequences_decoding,
            ),
            (
                "flag_serve_sequences_cancelled_total",
                "counter",
                "sequences dropped because their client went away",
                &self.sequences_cancelled,
            ),
            (
                "flag_serve_clients_gone_total",
                "counter",
                "model requests whose client closed the connection before the answer",
                &self.clients_gone,
            ),
            (
                "flag_serve_embeddings_cancelled_total",
                "counter",
                "embeddings requests stopped because their client closed the connection",
                &self.embeddings_cancelled,
            ),
            (
                "flag_serve_rejected_busy_total",
                "counter",
                "requests refused at the in-flight limits (503)",
                &self.rejected_busy,
            ),
            (
                "flag_serve_rejected_too_large_total",
                "counter",
                "requests refused for their body size (413)",
                &self.rejected_too_large,
            ),
            (
                "flag_serve_requests_in_flight",
                "gauge",
                "model requests admitted and not yet answered",
                &self.in_flight,
            ),
            (
                "flag_serve_request_bytes_in_flight",
                "gauge",
                "body bytes of the requests in flight",
                &self.in_flight_bytes,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

struct EmbedJob {
    texts: Vec<String>,
    /// Set when the client went away: the embedder stops before its next batch of texts.
    cancel: Arc<AtomicBool>,
    reply: Sender<EmbedReply>,
}

/// How to run the service.
pub struct ServiceConfig {
    pub engine: Engine,
    /// Name reported for the chat model.
    pub model_id: String,
    /// MiniLM directory (None: the packaged one); loaded on the first embeddings request.
    pub embed_dir: Option<PathBuf>,
    pub device: tch::Device,
    /// Most prompts decoded in one batch.
    pub max_batch: usize,
    /// Most KV-cache positions (rows x (longest prompt + max_tokens)) of one batch; a single
    /// request larger than this still runs, alone.
    pub max_batch_tokens: usize,
    /// The most max_tokens a request may ask for.
    pub max_tokens_cap: usize,
    /// How long the decoder waits for more requests to join a batch.
    pub batch_wait: Duration,
}

/// The API's three operations over the two models; `Sync`, so HTTP threads share it.
pub struct Service {
    tok: LlmTokenizer,
    limits: ChatLimits,
    model_id: String,
    embed_id: String,
    chat: Sender<ChatJob>,
    embed: Sender<EmbedJob>,
    counter: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Service {
    /// Starts the decoder and embedder threads.
    pub fn start(cfg: ServiceConfig) -> std::io::Result<Service> {
        let embed_id = models::minilm_dir(cfg.embed_dir.as_deref())
            .ok()
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
        let tok = cfg.engine.tokenizer().clone();
        let limits = ChatLimits {
            max_tokens_cap: cfg.max_tokens_cap,
            ..ChatLimits::new(&tok, cfg.engine.model().cfg.ctx_len)
        };
        let metrics = Arc::new(Metrics::default());
        let service = Service {
            tok,
            limits,
            model_id: cfg.model_id,
            embed_id,
            chat: chat_tx,
            embed: embed_tx,
            counter: AtomicU64::new(0),
            metrics: Arc::clone(&metrics),
        };
        let batching = Batching {
            max_batch: cfg.max_batch.max(1),
            max_tokens: cfg.max_batch_tokens.max(1),
            wait: cfg.batch_wait,
        };
        let engine = cfg.engine;
        let embed_metrics = Arc::clone(&metrics);
        std::thread::Builder::new()
            .name("flag-serve-decoder".into())
            .spawn(move || decoder_worker(engine, chat_rx, batching, &metrics))?;
        let (dir, device) = (cfg.embed_dir, cfg.device);
        std::thread::Builder::new()
            .name("flag-serve-embedder".into())
            .spawn(move || embed_worker(dir, device, embed_rx, &embed_metrics))?;
        Ok(service)
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn embed_id(&self) -> &str {
        &self.embed_id
    }

    /// What a chat request may ask for.
    pub fn limits(&self) -> &ChatLimits {
        &self.limits
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// GET /v1/models.
    pub fn models(&self) -> Value {
        super::models_list(&[&self.model_id, &self.embed_id])
    }

    /// POST /v1/chat/completions. While the answer is decoded, `client_gone` is asked every
    /// [`CLIENT_PROBE`]; once it says yes the sequence is dropped and the error returned has
    /// status 499 (nginx's "client closed request"; nobody is left to read it).
    pub fn chat(&self, v: &Value, client_gone: &mut dyn FnMut() -> bool) -> ApiResult<Value> {
        let req = super::parse_chat(&self.tok, &self.limits, v)?;
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let job = ChatJob {
            prompt: req.prompt.clone(),
            opts: req.opts.clone(),
            top_n: if req.logprobs { req.top_logprobs } else { 0 },
            cancel: Arc::clone(&cancel),
            reply: tx,
        };
        let stopped = || ApiError::server("the model worker has stopped");
        self.chat.send(job).map_err(|_| stopped())?;
        let reply = self.await_reply(&rx, &cancel, client_gone, stopped)?;
        let (g, top) = reply.map_err(ApiError::server)?;
        if let Some(e) = &g.error {
            return Err(ApiError::server(format!(
                "the constrained decoder failed: {e}"
            )));
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .chat_completions
            .fetch_add(1, Ordering::Relaxed);
        Ok(super::chat_response(
            &self.tok,
            &self.model_id,
            n,
            &req,
            &g,
            &top,
        ))
    }

    /// POST /v1/embeddings. While the texts are embedded, `client_gone` is asked every
    /// [`CLIENT_PROBE`]; once it says yes the embedder stops before its next batch of texts
    /// and the error returned has status 499.
    pub fn embeddings(&self, v: &Value, client_gone: &mut dyn FnMut() -> bool) -> ApiResult<Value> {
        let texts = super::parse_embeddings(v)?;
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stopped = || ApiError::server("the embedding worker has stopped");
        self.embed
            .send(EmbedJob {
                texts,
                cancel: Arc::clone(&cancel),
                reply: tx,
            })
            .map_err(|_| stopped())?;
        let reply = self.await_reply(&rx, &cancel, client_gone, stopped)?;
        let (vecs, n_tokens) = reply.map_err(ApiError::server)?;
        self.metrics.embeddings.fetch_add(1, Ordering::Relaxed);
        Ok(super::embeddings_response(&self.embed_id, vecs, n_tokens))
    }
}

impl Service {
    /// Waits for a worker's reply, asking `client_gone` every [`CLIENT_PROBE`]: once it
    /// says yes, `cancel` is set (the worker drops the job) and the error has status 499
    /// (nginx's "client closed request"; nobody is left to read it).
    fn await_reply<T>(
        &self,
        rx: &Receiver<T>,
        cancel: &AtomicBool,
        client_gone: &mut dyn FnMut() -> bool,
        stopped: impl Fn() -> ApiError,
    ) -> ApiResult<T> {
        loop {
            match rx.recv_timeout(CLIENT_PROBE) {
                Ok(r) => return Ok(r),
                Err(RecvTimeoutError::Disconnected) => return Err(stopped()),
                Err(RecvTimeoutError::Timeout) if client_gone() => {
                    cancel.store(true, Ordering::Relaxed);
                    self.metrics.clients_gone.fetch_add(1, Ordering::Relaxed);
                    return Err(ApiError {
                        status: 499,
                        kind: "client_closed_request",
                        message: "the client closed the connection".into(),
                    });
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// How the decoder forms batches.
struct Batching {
    max_batch: usize,
    /// Most KV-cache positions of one batch.
    max_tokens: usize,
    wait: Duration,
}

/// Owns the decoder. Takes the requests waiting (the first, then whatever arrives within
/// `wait`, up to `max_batch`) and decodes those with equal options together, as many as fit
/// in `max_tokens` cache positions; jobs whose client went away are skipped or dropped.
fn decoder_worker(engine: Engine, rx: Receiver<ChatJob>, b: Batching, metrics: &Metrics) {
    let dropped = |n: usize, when: &str| {
        if n > 0 {
            metrics
                .sequences_cancelled
                .fetch_add(n as u64, Ordering::Relaxed);
            eprintln!("dropped {n} sequence(s) whose client went away ({when})");
        }
    };
    while let Ok(first) = rx.recv() {
        let mut pending = vec![first];
        let deadline = Instant::now() + b.wait;
        while pending.len() < b.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => pending.push(j),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|j| !j.cancel.load(Ordering::Relaxed));
            dropped(before - pending.len(), "before decoding");
            if pending.is_empty() {
                break;
            }
            let head = &pending[0];
            let batchable = head.opts.temperature == 0.0;
            let (opts, top_n) = (head.opts.clone(), head.top_n);
            let mut group = Vec::new();
            let mut rest = Vec::new();
            // Positions of the group so far: rows x (longest prompt + max_tokens).
            let mut longest = 0;
            for j in pending {
                let fits = group.is_empty()
                    || (batchable
                        && j.opts == opts
                        && j.top_n == top_n
                        && (group.len() + 1) * longest.max(j.positions()) <= b.max_tokens);
                if fits {
                    longest = longest.max(j.positions());
                    group.push(j);
                } else {
                    rest.push(j);
                }
            }
            pending = rest;
            let prompts: Vec<Vec<u32>> = group.iter().map(|j| j.prompt.clone()).collect();
            let t0 = Instant::now();
            metrics
                .sequences_decoding
                .store(group.len() as u64, Ordering::Relaxed);
            let result = engine.generate_ids_cancellable(&prompts, &opts, top_n, &|i| {
                group[i].cancel.load(Ordering::Relaxed)
            });
            metrics.sequences_decoding.store(0, Ordering::Relaxed);
            eprintln!(
                "decoded a batch of {}{} ({:.0} ms)",
                prompts.len(),
                if opts.constraint.is_some() {
                    ", constrained"
                } else {
                    ""
                },
                t0.elapsed().as_secs_f64() * 1e3
            );
            match result {
                Ok(outs) => {
                    let mut n_dropped = 0;
                    for (j, out) in group.into_iter().zip(outs) {
                        match out {
                            Some(out) => {
                                let _ = j.reply.send(Ok(out));
                            }
                            None => n_dropped += 1,
                        }
                    }
                    dropped(n_dropped, "while decoding");
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

/// Owns the embedder, loaded on the first request (a missing model fails only those).
fn embed_worker(
    dir: Option<PathBuf>,
    device: tch::Device,
    rx: Receiver<EmbedJob>,
    metrics: &Metrics,
) {
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
        let stop = || job.cancel.load(Ordering::Relaxed);
        let out = (|| -> Result<_, String> {
            let Some(vecs) = m
                .embed_unless(&job.texts, &stop)
                .map_err(|e| e.to_string())?
            else {
                return Ok(None);
            };
            let mut n = 0;
            for t in &job.texts {
                n += m.token_ids(t).map_err(|e| e.to_string())?.len();
            }
            Ok(Some((vecs, n)))
        })();
        match out {
            Ok(None) => {
                metrics.embeddings_cancelled.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "stopped an embeddings request of {} text(s) whose client went away",
                    job.texts.len()
                );
            }
            Ok(Some(r)) => {
                let _ = job.reply.send(Ok(r));
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }
}
