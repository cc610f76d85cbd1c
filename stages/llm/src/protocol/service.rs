//! The models behind the API on worker threads. The decoder (tch, not `Sync`) lives on one
//! thread that takes requests from a channel and runs those that arrive together (within
//! `batch_wait`, up to `max_batch`) with the same generation options as one batched
//! `generate_ids` call; requests with the same `response_format` batch like any other.
//! Greedy requests are batched whatever their seed; sampled ones run alone, so a (prompt,
//! seed) pair gives the same answer whatever else is being served. The embedder (loaded on
//! first use) has a worker thread of its own.
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ApiError, ApiResult};
use crate::embed::MiniLmEmbedder;
use crate::generate::{Engine, GenerateOptions, Generation, TopLogprobs};
use crate::models;
use crate::tokenizer::LlmTokenizer;

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
    /// How long the decoder waits for more requests to join a batch.
    pub batch_wait: Duration,
}

/// The API's three operations over the two models; `Sync`, so HTTP threads share it.
pub struct Service {
    tok: LlmTokenizer,
    ctx_len: usize,
    model_id: String,
    embed_id: String,
    chat: Sender<ChatJob>,
    embed: Sender<EmbedJob>,
    counter: AtomicU64,
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
        let service = Service {
            tok: cfg.engine.tokenizer().clone(),
            ctx_len: cfg.engine.model().cfg.ctx_len,
            model_id: cfg.model_id,
            embed_id,
            chat: chat_tx,
            embed: embed_tx,
            counter: AtomicU64::new(0),
        };
        let (engine, max_batch, wait) = (cfg.engine, cfg.max_batch.max(1), cfg.batch_wait);
        std::thread::Builder::new()
            .name("flag-serve-decoder".into())
            .spawn(move || decoder_worker(engine, chat_rx, max_batch, wait))?;
        let (dir, device) = (cfg.embed_dir, cfg.device);
        std::thread::Builder::new()
            .name("flag-serve-embedder".into())
            .spawn(move || embed_worker(dir, device, embed_rx))?;
        Ok(service)
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn embed_id(&self) -> &str {
        &self.embed_id
    }

    /// GET /v1/models.
    pub fn models(&self) -> Value {
        super::models_list(&[&self.model_id, &self.embed_id])
    }

    /// POST /v1/chat/completions.
    pub fn chat(&self, v: &Value) -> ApiResult<Value> {
        let req = super::parse_chat(&self.tok, self.ctx_len, v)?;
        let (tx, rx) = mpsc::channel();
        let job = ChatJob {
            prompt: req.prompt.clone(),
            opts: req.opts.clone(),
            top_n: if req.logprobs { req.top_logprobs } else { 0 },
            reply: tx,
        };
        let stopped = || ApiError::server("the model worker has stopped");
        self.chat.send(job).map_err(|_| stopped())?;
        let (g, top) = rx
            .recv()
            .map_err(|_| stopped())?
            .map_err(ApiError::server)?;
        if let Some(e) = &g.error {
            return Err(ApiError::server(format!(
                "the constrained decoder failed: {e}"
            )));
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        Ok(super::chat_response(
            &self.tok,
            &self.model_id,
            n,
            &req,
            &g,
            &top,
        ))
    }

    /// POST /v1/embeddings.
    pub fn embeddings(&self, v: &Value) -> ApiResult<Value> {
        let texts = super::parse_embeddings(v)?;
        let (tx, rx) = mpsc::channel();
        let stopped = || ApiError::server("the embedding worker has stopped");
        self.embed
            .send(EmbedJob { texts, reply: tx })
            .map_err(|_| stopped())?;
        let (vecs, n_tokens) = rx
            .recv()
            .map_err(|_| stopped())?
            .map_err(ApiError::server)?;
        Ok(super::embeddings_response(&self.embed_id, vecs, n_tokens))
    }
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
