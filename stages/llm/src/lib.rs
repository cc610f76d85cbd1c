//! Embedded LLM runtime on tch: GGUF reader, byte-level BPE tokenizer, llama decoder with a
//! KV cache and batched generation, scores (logprobs, top-k entropy, perplexity, candidate
//! log-likelihoods), grammar-constrained decoding (llguidance), a trainable policy/value mode,
//! the MiniLM sentence embedder, and the one boundary every LLM stage talks through
//! ([`backend`]: embedded engine or an OpenAI-compatible server; [`protocol`]: the server
//! side of that API, behind `flag serve`).

pub mod backend;
pub mod constrain;
pub mod embed;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod models;
pub mod protocol;
pub mod quant;
pub mod sampling;
pub mod tokenizer;
pub mod trainable;

pub use error::{LlmError, Result};
