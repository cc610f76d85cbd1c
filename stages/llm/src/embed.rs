//! all-MiniLM-L6-v2 sentence embeddings in tch: a BERT encoder (embeddings + 6 post-norm
//! layers) followed by mean pooling over real tokens and L2 normalisation, i.e. what
//! sentence-transformers' `encode(normalize_embeddings=True)` returns (384 dims).
//!
//! Weights come from `model.safetensors` (memory-mapped, copied once into tensors) and the
//! word pieces from `tokenizer.json`. Batches are right-padded with an attention mask; padded
//! keys get a large negative bias, so a text embeds the same alone or in a batch.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::{LlmError, Result};

/// Texts per forward pass: bounds activation memory for long inputs.
const BATCH: usize = 32;

/// Hyper-parameters read from config.json (BERT names), defaults are MiniLM-L6's.
#[derive(Debug, Clone, serde::Deserialize)]
struct BertConfig {
    #[serde(default = "d_heads")]
    num_attention_heads: i64,
    #[serde(default = "d_eps")]
    layer_norm_eps: f64,
}
fn d_heads() -> i64 {
    12
}
fn d_eps() -> f64 {
    1e-12
}

struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.w, Some(&self.b))
    }
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    up: Linear,
    down: Linear,
    out_norm: Norm,
}

/// The MiniLM sentence embedder.
pub struct MiniLmEmbedder {
    tokenizer: Tokenizer,
    word: Tensor,
    pos: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
    heads: i64,
    hidden: i64,
    eps: f64,
    max_len: usize,
    device: Device,
}

impl MiniLmEmbedder {
    /// Load from a sentence-transformers model directory (model.safetensors, tokenizer.json,
    /// optional config.json and sentence_bert_config.json).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let cfg: BertConfig = read_json_or(&dir.join("config.json"), || BertConfig {
            num_attention_heads: d_heads(),
            layer_norm_eps: d_eps(),
        })?;
        let max_seq: SbertConfig =
            read_json_or(&dir.join("sentence_bert_config.json"), || SbertConfig {
                max_seq_length: 256,
            })?;

        let st_path = dir.join("model.safetensors");
        let mmap = map_file(&st_path)?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| LlmError::Safetensors(format!("{}: {e}", st_path.display())))?;
        let w = Weights {
            st: &st,
            path: &st_path,
            device,
        };

        let word = w.get("embeddings.word_embeddings.weight", None)?;
        let (vocab, hidden) = match word.size()[..] {
            [v, h] => (v, h),
            _ => unreachable!("rank checked by Weights::get"),
        };
        if cfg.num_attention_heads <= 0 || hidden % cfg.num_attention_heads != 0 {
            return Err(LlmError::Invalid(format!(
                "{}: hidden size {hidden} is not divisible by num_attention_heads {}",
                dir.join("config.json").display(),
                cfg.num_attention_heads
            )));
        }
        let pos = w.get("embeddings.position_embeddings.weight", Some(&[-1, hidden]))?;
        let token_type = w.get(
            "embeddings.token_type_embeddings.weight",
            Some(&[-1, hidden]),
        )?;
        let emb_norm = w.norm("embeddings.LayerNorm", hidden)?;

        let n_layers = (0..)
            .take_while(|i| {
                st.tensor(&format!("encoder.layer.{i}.attention.self.query.weight"))
                    .is_ok()
            })
            .count();
        if n_layers == 0 {
            return Err(LlmError::MissingTensor(format!(
                "encoder.layer.0.attention.self.query.weight (in {})",
                st_path.display()
            )));
        }
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = format!("encoder.layer.{i}");
            let inter = w
                .get(
                    &format!("{p}.intermediate.dense.weight"),
                    Some(&[-1, hidden]),
                )?
                .size()[0];
            layers.push(Layer {
                q: w.linear(&format!("{p}.attention.self.query"), hidden, hidden)?,
                k: w.linear(&format!("{p}.attention.self.key"), hidden, hidden)?,
                v: w.linear(&format!("{p}.attention.self.value"), hidden, hidden)?,
                attn_out: w.linear(&format!("{p}.attention.output.dense"), hidden, hidden)?,
                attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), hidden)?,
                up: w.linear(&format!("{p}.intermediate.dense"), inter, hidden)?,
                down: w.linear(&format!("{p}.output.dense"), hidden, inter)?,
                out_norm: w.norm(&format!("{p}.output.LayerNorm"), hidden)?,
            });
        }

        let max_len = max_seq.max_seq_length.min(pos.size()[0] as usize);
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), max_len, vocab)?;
        Ok(Self {
            tokenizer,
            word,
            pos,
            token_type,
            emb_norm,
            layers,
            heads: cfg.num_attention_heads,
            hidden,
            eps: cfg.layer_norm_eps,
            max_len,
            device,
        })
    }

    /// Embedding width (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.hidden as usize
    }

    /// Longest input in word pieces (incl. [CLS]/[SEP]); longer texts are truncated.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Word-piece ids of one text, as the model sees it (truncated, no padding).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut tk = self.tokenizer.clone();
        tk.with_padding(None);
        let enc = tk
            .encode(text, true)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// L2-normalised embeddings, one per text, in input order.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        Ok(self.embed_unless(texts, &|| false)?.expect("never stopped"))
    }

    /// [`embed`](Self::embed), asking `stop` before each batch of texts: None once it says
    /// yes (a server's client went away), so a long request stops within one batch.
    pub fn embed_unless(
        &self,
        texts: &[String],
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<Vec<Vec<f32>>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(BATCH) {
            if stop() {
                return Ok(None);
            }
            let encs = self
                .tokenizer
                .encode_batch(chunk.to_vec(), true)
                .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
            let b = encs.len() as i64;
            let t = encs.first().map_or(0, |e| e.len()) as i64;
            let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<i64> {
                encs.iter()
                    .flat_map(|e| f(e).iter().map(|&x| x as i64))
                    .collect()
            };
            let ids = Tensor::from_slice(&flat(&|e| e.get_ids()))
                .view([b, t])
                .to(self.device);
            let types = Tensor::from_slice(&flat(&|e| e.get_type_ids()))
                .view([b, t])
                .to(self.device);
            let mask = Tensor::from_slice(&flat(&|e| e.get_attention_mask()))
                .view([b, t])
                .to_kind(Kind::Float)
                .to(self.device);
            let emb = tch::no_grad(|| self.forward(&ids, &types, &mask));
            let emb = emb.to(Device::Cpu).contiguous();
            let v = Vec::<f32>::try_from(emb.view([-1])).map_err(LlmError::Torch)?;
            out.extend(v.chunks(self.hidden as usize).map(<[f32]>::to_vec));
        }
        Ok(Some(out))
    }

    /// [b, t] ids/type ids and a 0/1 mask -> [b, hidden] unit vectors.
    fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let positions = Tensor::arange(t, (Kind::Int64, self.device));
        let x = ids.embedding_like(&self.word)
            + positions.embedding_like(&self.pos).unsqueeze(0)
            + types.embedding_like(&self.token_type);
        let mut x = self.layer_norm(&x, &self.emb_norm);
        // Additive key mask: 0 for real tokens, a large negative for padding (as HF does with
        // the dtype minimum), broadcast over heads and query positions.
        let bias = ((mask.ones_like() - mask) * f64::from(f32::MIN)).view([b, 1, 1, t]);
        let hd = self.hidden / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let split = |y: Tensor| y.view([b, t, self.heads, hd]).transpose(1, 2);
            let (q, k, v) = (
                split(l.q.forward(&x)),
                split(l.k.forward(&x)),
                split(l.v.forward(&x)),
            );
            let att = (q.matmul(&k.transpose(-2, -1)) * scale + &bias).softmax(-1, Kind::Float);
            let ctx = att
                .matmul(&v)
                .transpose(1, 2)
                .contiguous()
                .view([b, t, self.hidden]);
            x = self.layer_norm(&(l.attn_out.forward(&ctx) + &x), &l.attn_norm);
            let h = l.down.forward(&l.up.forward(&x).gelu("none"));
            x = self.layer_norm(&(h + &x), &l.out_norm);
        }
        // Mean over real tokens only, then unit length (sentence-transformers' clamps).
        let m = mask.unsqueeze(-1);
        let summed = (x * &m).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
        let count = m
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            .clamp_min(1e-9);
        let mean = summed / count;
        let norm = mean
            .norm_scalaropt_dim(2, [1i64].as_slice(), true)
            .clamp_min(1e-12);
        mean / norm
    }

    fn layer_norm(&self, x: &Tensor, n: &Norm) -> Tensor {
        x.layer_norm(
            [self.hidden].as_slice(),
            Some(&n.w),
            Some(&n.b),
            self.eps,
            false,
        )
    }
}

trait EmbeddingLike {
    fn embedding_like(&self, table: &Tensor) -> Tensor;
}
impl EmbeddingLike for Tensor {
    fn embedding_like(&self, table: &Tensor) -> Tensor {
        Tensor::embedding(table, self, -1, false, false)
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
struct SbertConfig {
    max_seq_length: usize,
}

fn read_json_or<T: serde::de::DeserializeOwned>(
    path: &Path,
    default: impl FnOnce() -> T,
) -> Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            LlmError::Invalid(format!(
                "{}: line {}, column {}: {e}",
                path.display(),
                e.line(),
                e.column()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(default()),
        Err(e) => Err(LlmError::io(path, e)),
    }
}

/// The tokenizer as sentence-transformers drives it: truncate to `max_len` word pieces
/// (incl. [CLS]/[SEP]), pad a batch to its longest member with [PAD] and a 0 mask.
fn load_tokenizer(path: &Path, max_len: usize, vocab: i64) -> Result<Tokenizer> {
    let mut tk = Tokenizer::from_file(path)
        .map_err(|e| LlmError::Tokenizer(format!("{}: {e}", path.display())))?;
    if tk.get_vocab_size(true) as i64 > vocab {
        return Err(LlmError::Tokenizer(format!(
            "{}: vocabulary of {} tokens does not fit the {vocab}-row embedding table",
            path.display(),
            tk.get_vocab_size(true)
        )));
    }
    tk.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| LlmError::Tokenizer(format!("{}: {e}", path.display())))?;
    let pad = tk.get_padding().cloned().unwrap_or_default();
    tk.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        ..pad
    }));
    Ok(tk)
}

/// Read-only map of the weights file.
#[allow(unsafe_code)]
fn map_file(path: &PathBuf) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| LlmError::io(path, e))?;
    // SAFETY: the map is read-only and we never modify the file; the bytes are copied into
    // tensors before the map is dropped. A concurrent external truncation is the usual mmap
    // caveat, accepted for a model file installed by `just setup`.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| LlmError::io(path, e))
}

/// Typed, shape-checked access to the safetensors tensors.
struct Weights<'a> {
    st: &'a SafeTensors<'a>,
    path: &'a Path,
    device: Device,
}

impl Weights<'_> {
    /// Tensor `name` as f32 on the device; `shape` entries of -1 match any size.
    fn get(&self, name: &str, shape: Option<&[i64]>) -> Result<Tensor> {
        let view = self
            .st
            .tensor(name)
            .map_err(|_| LlmError::MissingTensor(format!("{name} (in {})", self.path.display())))?;
        let dims: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let expect_rank = shape.map_or(2, <[i64]>::len);
        let ok = dims.len() == expect_rank
            && shape.is_none_or(|s| s.iter().zip(&dims).all(|(e, d)| *e < 0 || e == d));
        if !ok {
            return Err(LlmError::Shape {
                tensor: name.to_string(),
                expected: shape
                    .unwrap_or(&[-1, -1])
                    .iter()
                    .map(|&d| d.max(0) as usize)
                    .collect(),
                found: view.shape().to_vec(),
            });
        }
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            other => {
                return Err(LlmError::Safetensors(format!(
                    "{}: tensor '{name}' has dtype {other:?}; supported: F32, F16, BF16",
                    self.path.display()
                )));
            }
        };
        let t = Tensor::f_from_data_size(view.data(), &dims, kind)?;
        Ok(t.to_kind(Kind::Float).to(self.device))
    }

    fn linear(&self, prefix: &str, out: i64, inp: i64) -> Result<Linear> {
        Ok(Linear {
            w: self.get(&format!("{prefix}.weight"), Some(&[out, inp]))?,
            b: self.get(&format!("{prefix}.bias"), Some(&[out]))?,
        })
    }

    fn norm(&self, prefix: &str, dim: i64) -> Result<Norm> {
        Ok(Norm {
            w: self.get(&format!("{prefix}.weight"), Some(&[dim]))?,
            b: self.get(&format!("{prefix}.bias"), Some(&[dim]))?,
        })
    }
}
