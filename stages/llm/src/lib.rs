//! Embedded LLM runtime on tch: GGUF reader, byte-level BPE tokenizer, llama decoder with a
//! KV cache and batched generation, scores (logprobs, top-k entropy, perplexity, candidate
//! log-likelihoods), grammar-constrained decoding (llguidance), a trainable policy/value mode,
//! and the MiniLM sentence embedder.

pub mod constrain;
pub mod embed;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod models;
pub mod sampling;
pub mod tokenizer;
pub mod trainable;

pub use error::{LlmError, Result};
