//! `flag llm`: the embedded LLM runtime from the command line, for users and for checks.
//! Every subcommand prints plain text, or one JSON object with `--json`.
//!
//!   flag llm tokenize --text T                        -> {"ids":[...]}
//!   flag llm logits --prompt-file F --top K           -> {"ids","logits","logprobs"}
//!   flag llm generate --prompt-file F --max-tokens N [--chat] [--temperature T --seed S]
//!                                                     -> {"text","ids","logprobs","entropy","perplexity"}
//!   flag llm embed --text T [--text T2 ...]           -> {"embeddings":[[...]]}
//!   flag llm bench                                    -> prefill/decode tokens/s, load, RSS

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use flag_llm::constrain::Constraint;
use flag_llm::embed::MiniLmEmbedder;
use flag_llm::generate::{Engine, GenerateOptions};
use flag_llm::models;
use serde_json::json;

mod bench;

#[derive(Args, Debug)]
pub struct LlmArgs {
    #[command(subcommand)]
    pub command: LlmCommand,
}

#[derive(Subcommand, Debug)]
pub enum LlmCommand {
    /// Token ids of a text (special tokens such as <|im_start|> are recognised)
    Tokenize(TokenizeArgs),
    /// Top-K next-token logits after the raw prompt text
    Logits(LogitsArgs),
    /// Generate a continuation (greedy by default) with per-token logprobs and entropy
    Generate(GenerateArgs),
    /// MiniLM sentence embeddings (L2-normalised, 384 dims)
    Embed(EmbedArgs),
    /// Prefill and decode throughput at batch 1, 8 and 32, load time, peak memory
    Bench(bench::BenchArgs),
}

/// Options every `flag llm` subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
    /// Model path: a GGUF (SmolLM2 commands) or a MiniLM directory (embed)
    /// [default: from the project venv; env FLAG_SMOLLM2_GGUF / FLAG_MINILM_DIR]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// cpu, cuda or cuda:N (CUDA runs the decoder in bf16)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Intra-op CPU threads [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Common {
    /// Applies --threads and parses --device.
    pub fn setup(&self) -> anyhow::Result<tch::Device> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        tch::set_num_threads(threads as i32);
        parse_device(&self.device)
    }

    pub fn gguf(&self) -> anyhow::Result<PathBuf> {
        Ok(models::smollm2_gguf(self.model.as_deref())?)
    }
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Text to tokenize
    #[arg(long)]
    pub text: String,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// File holding the raw prompt (used byte for byte; no chat template, no BOS)
    #[arg(long)]
    pub prompt_file: PathBuf,
    /// How many of the most likely next tokens to print
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// File holding the prompt (the user message with --chat)
    #[arg(long)]
    pub prompt_file: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Wrap the prompt as a user message in the GGUF's chat template
    #[arg(long)]
    pub chat: bool,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this string appears (repeatable); EOS always stops
    #[arg(long)]
    pub stop: Vec<String>,
    /// k of the top-k entropy reported per token
    #[arg(long, default_value_t = 10)]
    pub entropy_k: usize,
    /// Constrain the answer: a JSON Schema (.json), a Lark grammar (.lark) or a regex (.regex)
    #[arg(long, value_name = "FILE")]
    pub schema: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Text to embed (repeatable; embedded as one batch)
    #[arg(long, required = true)]
    pub text: Vec<String>,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: LlmArgs) -> anyhow::Result<()> {
    match args.command {
        LlmCommand::Tokenize(a) => tokenize(a),
        LlmCommand::Logits(a) => logits(a),
        LlmCommand::Generate(a) => generate(a),
        LlmCommand::Embed(a) => embed(a),
        LlmCommand::Bench(a) => bench::run(a),
    }
}

pub fn parse_device(s: &str) -> anyhow::Result<tch::Device> {
    flag_llm::backend::parse_device(s).map_err(|m| anyhow::anyhow!("--device {m}"))
}

fn read_prompt(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading prompt file {}", path.display()))
}

fn load_engine(common: &Common) -> anyhow::Result<Engine> {
    let device = common.setup()?;
    let path = common.gguf()?;
    Engine::load(&path, device).with_context(|| format!("loading {}", path.display()))
}

fn print_json(v: &serde_json::Value) {
    println!("{v}");
}

fn tokenize(a: TokenizeArgs) -> anyhow::Result<()> {
    a.common.setup()?;
    let path = a.common.gguf()?;
    let gguf = flag_llm::gguf::GgufFile::open(&path)?;
    let tok = flag_llm::tokenizer::LlmTokenizer::from_gguf(&gguf)?;
    let ids = tok.encode(&a.text, true)?;
    if a.common.json {
        print_json(&json!({ "ids": ids }));
    } else {
        for id in &ids {
            println!("{id}\t{:?}", tok.decode(&[*id], false)?);
        }
    }
    Ok(())
}

fn logits(a: LogitsArgs) -> anyhow::Result<()> {
    if a.top == 0 {
        bail!("--top must be at least 1");
    }
    let prompt = read_prompt(&a.prompt_file)?;
    let engine = load_engine(&a.common)?;
    let logits = engine.next_token_logits(&prompt)?;
    let top = top_k(&logits, a.top);
    let lse = log_sum_exp(&logits);
    let ids: Vec<usize> = top.iter().map(|&(i, _)| i).collect();
    let vals: Vec<f32> = top.iter().map(|&(_, v)| v).collect();
    let logprobs: Vec<f64> = vals.iter().map(|&v| f64::from(v) - lse).collect();
    if a.common.json {
        print_json(&json!({ "ids": ids, "logits": vals, "logprobs": logprobs }));
    } else {
        let tok = engine.tokenizer();
        for ((id, v), lp) in ids.iter().zip(&vals).zip(&logprobs) {
            let piece = tok.decode(&[*id as u32], false)?;
            println!("{id:>6}  {v:>10.4}  {lp:>9.4}  {piece:?}");
        }
    }
    Ok(())
}

/// Indices and values of the k largest entries, largest first (ties: lower id first).
pub fn top_k(v: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<(usize, f32)> = v.iter().copied().enumerate().collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx.truncate(k);
    idx
}

pub fn log_sum_exp(v: &[f32]) -> f64 {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + v
        .iter()
        .map(|&x| (f64::from(x) - m).exp())
        .sum::<f64>()
        .ln()
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if a.temperature < 0.0 || !(0.0..=1.0).contains(&a.top_p) || a.top_p == 0.0 {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    let prompt = read_prompt(&a.prompt_file)?;
    let constraint = a.schema.as_deref().map(Constraint::from_file).transpose()?;
    let engine = load_engine(&a.common)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop: a.stop.clone(),
        top_k_entropy: a.entropy_k,
        chat: a.chat,
        json_prefill: None,
        constraint,
    };
    let g = engine
        .generate(std::slice::from_ref(&prompt), &opts)?
        .into_iter()
        .next()
        .context("the engine returned no generation")?;
    if a.common.json {
        print_json(&json!({
            "text": g.text,
            "ids": g.ids,
            "logprobs": g.logprobs,
            "entropy": g.entropy,
            "perplexity": g.perplexity,
            "entropies": g.entropies,
            "finish_reason": g.finish_reason.as_str(),
            // What the grammar allowed: restricted logprobs/entropies, allowed counts and the
            // alternatives at steps with few of them (null without --schema).
            "constrained": g.constrained,
            "error": g.error,
        }));
    } else {
        println!("{}", g.text);
        eprintln!(
            "[{} tokens, perplexity {:.3}, mean top-{} entropy {:.4}, finish {}]",
            g.ids.len(),
            g.perplexity,
            a.entropy_k,
            g.entropy,
            g.finish_reason.as_str()
        );
        if let Some(e) = &g.error {
            eprintln!("[constraint error: {e}]");
        }
    }
    Ok(())
}

fn embed(a: EmbedArgs) -> anyhow::Result<()> {
    let device = a.common.setup()?;
    let dir = models::minilm_dir(a.common.model.as_deref())?;
    let emb =
        MiniLmEmbedder::load(&dir, device).with_context(|| format!("loading {}", dir.display()))?;
    let vecs = emb.embed(&a.text)?;
    if a.common.json {
        print_json(&json!({ "embeddings": vecs }));
    } else {
        for (t, v) in a.text.iter().zip(&vecs) {
            let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:.5}")).collect();
            println!("{t:?}: [{}, ...] ({} dims)", head.join(", "), v.len());
        }
    }
    Ok(())
}
