//! Llama-architecture decoder in tch: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied
//! embeddings, a preallocated KV cache, and batched prefill/decode with left padding.
//!
//! Weights come from a GGUF file, dequantised to f32 and cast to the requested kind (f32 on
//! CPU, bf16 on CUDA). llama.cpp's converter permutes the rows of Q and K for its interleaved
//! RoPE; they are permuted back at load so RoPE here is the transformers "rotate half" form
//! and every intermediate matches the reference implementation. Q/K/V and gate/up are fused
//! into one matrix each (fewer, larger matmuls per step).
//!
//! Padding: each row of a batch carries a validity mask (false = left padding). Positions
//! count only valid tokens (row `b`'s first real token is at position 0, as transformers
//! computes them from the attention mask), keys that are padding are masked out, and a pad
//! query attends to itself only so its softmax is never empty (its output is never read).
//! Padding may also sit in the middle of a row: with prefix caching (generate/prefix.rs) a
//! row is [shared prefix][left padding][own suffix]; the same masks and positions apply.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;
use crate::quant::{self, QMatrix};

mod rope;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub ctx_len: usize,
    pub rope_base: f64,
    pub eps: f64,
}

impl LlamaConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.meta_str("general.architecture")?;
        if arch != "llama" {
            return Err(LlmError::Metadata {
                key: "general.architecture".into(),
                message: format!("'{arch}' is not supported (only 'llama')"),
            });
        }
        let u = |k: &str| g.meta_u64(&format!("llama.{k}")).map(|v| v as usize);
        let d_model = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let n_kv_head = g
            .metadata("llama.attention.head_count_kv")
            .map_or(Ok(n_head as u64), |_| {
                g.meta_u64("llama.attention.head_count_kv")
            })? as usize;
        let vocab = match g.metadata("llama.vocab_size") {
            Some(_) => u("vocab_size")?,
            None => g
                .metadata("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(<[_]>::len)
                .ok_or_else(|| LlmError::Metadata {
                    key: "llama.vocab_size".into(),
                    message: "missing, and no tokenizer.ggml.tokens to count".into(),
                })?,
        };
        let cfg = LlamaConfig {
            n_layer: u("block_count")?,
            d_model,
            n_head,
            n_kv_head,
            head_dim: d_model.checked_div(n_head).unwrap_or(0),
            ffn: u("feed_forward_length")?,
            vocab,
            ctx_len: u("context_length")?,
            rope_base: g
                .metadata("llama.rope.freq_base")
                .map_or(Ok(10000.0), |_| g.meta_f64("llama.rope.freq_base"))?,
            eps: g.meta_f64("llama.attention.layer_norm_rms_epsilon")?,
        };
        if cfg.n_head == 0
            || cfg.n_kv_head == 0
            || !cfg.n_head.is_multiple_of(cfg.n_kv_head)
            || !cfg.d_model.is_multiple_of(cfg.n_head)
            || !cfg.head_dim.is_multiple_of(2)
        {
            return Err(LlmError::Metadata {
                key: "llama.attention.head_count".into(),
                message: format!(
                    "inconsistent heads: d_model {}, {} query heads, {} kv heads",
                    cfg.d_model, cfg.n_head, cfg.n_kv_head
                ),
            });
        }
        Ok(cfg)
    }

    fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

/// Weights of one transformer block (shapes as torch `linear` weights: [out, in]).
#[derive(Debug)]
pub struct Block {
    pub attn_norm: Tensor,
    /// Q, K, V stacked: [(n_head + 2 n_kv_head) * head_dim, d_model].
    pub wqkv: Weight,
    pub wo: Weight,
    pub ffn_norm: Tensor,
    /// gate and up stacked: [2 ffn, d_model].
    pub w_gate_up: Weight,
    pub w_down: Weight,
}

/// How the projection matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Expanded to the model kind (f32 on CPU, bf16 on CUDA); what training needs.
    Dense,
    /// CPU only: block-quantised matrices stay in their GGUF blocks ([`quant`](crate::quant)),
    /// expanded row by row inside the product; other tensors (norms) stay dense.
    GgufBlocks,
    /// CPU only, opt-in: the same blocks, and decode's activations rounded to 8 bits per block
    /// of 32 so each block's products are an exact integer dot (llama.cpp's arithmetic;
    /// `quant::int8`). Faster than `GgufBlocks`; its logits differ from f32's by the rounding.
    GgufInt8,
}

impl WeightFormat {
    /// The name used in settings and cache keys.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Dense => "dense",
            WeightFormat::GgufBlocks => "gguf",
            WeightFormat::GgufInt8 => "gguf-int8",
        }
    }

    /// Whether the projections stay GGUF blocks (CPU, f32 activations around them).
    pub fn is_blocks(self) -> bool {
        self != WeightFormat::Dense
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "dense" | "f32" => Ok(WeightFormat::Dense),
            "gguf" => Ok(WeightFormat::GgufBlocks),
            "gguf-int8" => Ok(WeightFormat::GgufInt8),
            other => Err(LlmError::Invalid(format!(
                "weight format '{other}' is not one of: gguf (blocks as stored), gguf-int8 \
                 (blocks, decode activations rounded to 8 bits), dense"
            ))),
        }
    }
}

/// A projection matrix [out, in]: a dense tensor or GGUF blocks with the pool that multiplies
/// them.
pub enum Weight {
    Dense(Tensor),
    Blocks {
        matrix: std::sync::Arc<QMatrix>,
        acts: quant::Activations,
        pool: Option<std::sync::Arc<quant::Team>>,
    },
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Weight::Dense(t) => write!(f, "Dense({:?} {:?})", t.size(), t.kind()),
            Weight::Blocks { matrix, .. } => write!(f, "Blocks({matrix:?})"),
        }
    }
}

impl Weight {
    /// `x @ W.T`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        match self {
            Weight::Dense(w) => x.linear::<Tensor>(w, None),
            Weight::Blocks { matrix, acts, pool } => {
                quant::linear(matrix, x, *acts, pool.as_deref())
            }
        }
    }

    /// The matrix as a dense tensor: the tensor itself (shallow), or the blocks expanded to
    /// f32 (a new tensor).
    pub fn to_dense(&self) -> Tensor {
        match self {
            Weight::Dense(w) => w.shallow_clone(),
            Weight::Blocks { matrix, .. } => matrix.to_dense(),
        }
    }

    /// Bytes the weight holds in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(w) => w.numel() * w.kind().elt_size_in_bytes(),
            Weight::Blocks { matrix, .. } => matrix.bytes(),
        }
    }
}

/// Per-call attention inputs shared by all blocks.
pub struct AttnInputs {
    /// [B, 1, T, head_dim] RoPE tables for each row's positions.
    pub cos: Tensor,
    pub sin: Tensor,
    /// [B, 1, T, L] bool (true = may attend), or None for a plain causal/complete mask.
    pub mask: Option<Tensor>,
    /// With no mask: causal over the T new tokens (prefill from an empty cache).
    pub is_causal: bool,
}

/// RMSNorm exactly as transformers computes it: in f32, scaled by the weight in the model kind.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    // f32 activations (the CPU's) skip the two conversions: the same values, two fewer
    // dispatches (a decode step runs ~60 norms).
    if x.kind() == Kind::Float {
        let var = x.square().mean_dim(-1, true, Kind::Float);
        return w * (x * (var + eps).rsqrt());
    }
    let xf = x.to_kind(Kind::Float);
    let var = xf.square().mean_dim(-1, true, Kind::Float);
    w * (xf * (var + eps).rsqrt()).to_kind(x.kind())
}

impl Block {
    /// One block. `kv` is this layer's cache (k, v: [B, n_kv, cap, hd]) and `start` the cache
    /// length before this call; without a cache, attention covers the T new tokens only.
    pub fn forward(
        &self,
        cfg: &LlamaConfig,
        x: &Tensor,
        att: &AttnInputs,
        kv: Option<(&Tensor, &Tensor)>,
        start: i64,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden is [B, T, D]");
        let (nh, nkv, hd) = (cfg.n_head as i64, cfg.n_kv_head as i64, cfg.head_dim as i64);
        let h = rms_norm(x, &self.attn_norm, cfg.eps);
        let qkv = self.wqkv.apply(&h);
        let heads = rope::Heads { b, t, nh, nkv, hd };
        let (q, k) = rope::rope_qk(&qkv, &att.cos, &att.sin, heads);
        let v = qkv
            .narrow(-1, (nh + nkv) * hd, nkv * hd)
            .view([b, t, nkv, hd])
            .transpose(1, 2);
        let (k_all, v_all) = match kv {
            Some((kc, vc)) => {
                kc.narrow(2, start, t).copy_(&k);
                vc.narrow(2, start, t).copy_(&v);
                (kc.narrow(2, 0, start + t), vc.narrow(2, 0, start + t))
            }
            None => (k, v),
        };
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k_all,
            &v_all,
            att.mask.as_ref(),
            0.0,
            att.mask.is_none() && att.is_causal,
            None::<f64>,
            true,
        );
        let a = a.transpose(1, 2).reshape([b, t, nh * hd]);
        let x = x + self.wo.apply(&a);
        let h = rms_norm(&x, &self.ffn_norm, cfg.eps);
        let gu = self.w_gate_up.apply(&h);
        let f = cfg.ffn as i64;
        let act = gu.narrow(-1, 0, f).silu() * gu.narrow(-1, f, f);
        x + self.w_down.apply(&act)
    }
}

/// Preallocated KV cache for a batch: per layer k, v of [B, n_kv, capacity, head_dim].
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// [B, capacity] bool: which cached positions are real tokens (not left padding).
    key_valid: Tensor,
    /// [B] i64: next RoPE position of each row.
    next_pos: Tensor,
    len: i64,
    capacity: i64,
    batch: i64,
}

impl KvCache {
    /// A cache of no layers and no positions: for tests of code that only moves caches.
    #[cfg(test)]
    pub(crate) fn empty_for_tests() -> KvCache {
        KvCache {
            k: Vec::new(),
            v: Vec::new(),
            key_valid: Tensor::zeros([1, 0], (Kind::Bool, Device::Cpu)),
            next_pos: Tensor::zeros([1], (Kind::Int64, Device::Cpu)),
            len: 0,
            capacity: 0,
            batch: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    pub fn batch(&self) -> usize {
        self.batch as usize
    }

    /// Keeps only the rows in `rows` (e.g. drop finished sequences from a decode batch).
    pub fn retain_rows(&mut self, rows: &[i64]) {
        let idx = Tensor::from_slice(rows).to_device(self.key_valid.device());
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(0, &idx);
        }
        self.key_valid = self.key_valid.index_select(0, &idx);
        self.next_pos = self.next_pos.index_select(0, &idx);
        self.batch = rows.len() as i64;
    }
}

pub struct LlamaModel {
    pub cfg: LlamaConfig,
    pub embed: Weight,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    /// None when the output projection is tied to the embedding.
    pub lm_head: Option<Weight>,
    /// [ctx_len, head_dim] f32 RoPE tables (cat(freqs, freqs), as transformers builds them).
    cos: Tensor,
    sin: Tensor,
    device: Device,
    kind: Kind,
    format: WeightFormat,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("cfg", &self.cfg)
            .field("device", &self.device)
            .field("kind", &self.kind)
            .field("weights", &self.format)
            .finish()
    }
}

fn load_tensor(g: &GgufFile, name: &str, shape: &[usize]) -> Result<Tensor> {
    let data = g.dequantize_shaped(name, shape)?;
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_slice(&data).view(dims.as_slice()))
}

/// The order of GGUF rows that undoes llama.cpp's Q/K permutation (for its interleaved RoPE):
/// GGUF row h*hd + 2i + j holds the weights of transformers row h*hd + j*hd/2 + i. One order
/// for both formats: dense rows are picked with it, block rows moved by it.
fn unpermute_order(n_head: usize, head_dim: usize) -> Vec<usize> {
    let mut order = Vec::with_capacity(n_head * head_dim);
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..head_dim / 2 {
                order.push(h * head_dim + 2 * i + j);
            }
        }
    }
    order
}

/// One part of a (possibly fused) projection: GGUF name, [rows, cols], and for Q/K the head
/// count whose row permutation is undone.
struct Part {
    name: String,
    rows: usize,
    cols: usize,
    unpermute: Option<(usize, usize)>,
}

fn part(name: String, rows: usize, cols: usize, unpermute: Option<(usize, usize)>) -> Part {
    Part {
        name,
        rows,
        cols,
        unpermute,
    }
}

/// Loads the rows-stacked projection of `parts` in `format`: blocks when every part is a
/// block type (and the format asks for blocks), otherwise dense in the model kind.
fn load_weight(
    g: &GgufFile,
    parts: &[Part],
    format: WeightFormat,
    pool: &Option<std::sync::Arc<quant::Team>>,
    put: &dyn Fn(Tensor) -> Tensor,
) -> Result<Weight> {
    if format.is_blocks() {
        let mut mats = Vec::with_capacity(parts.len());
        for p in parts {
            match QMatrix::from_gguf(g, &p.name, p.rows, p.cols)? {
                Some(m) => mats.push(match p.unpermute {
                    Some((heads, hd)) => m.permute_rows(&unpermute_order(heads, hd)),
                    None => m,
                }),
                None => break,
            }
        }
        if mats.len() == parts.len() {
            let matrix = if mats.len() == 1 {
                mats.pop().expect("one part")
            } else {
                QMatrix::stack(mats)?
            };
            return Ok(Weight::Blocks {
                matrix: std::sync::Arc::new(matrix),
                acts: if format == WeightFormat::GgufInt8 {
                    quant::Activations::Int8
                } else {
                    quant::Activations::F32
                },
                pool: pool.clone(),
            });
        }
    }
    let mut dense = Vec::with_capacity(parts.len());
    for p in parts {
        let t = load_tensor(g, &p.name, &[p.rows, p.cols])?;
        dense.push(match p.unpermute {
            Some((heads, hd)) => {
                let order: Vec<i64> = unpermute_order(heads, hd)
                    .into_iter()
                    .map(|r| r as i64)
                    .collect();
                t.index_select(0, &Tensor::from_slice(&order))
            }
            None => t,
        });
    }
    let t = if dense.len() == 1 {
        dense.pop().expect("one part")
    } else {
        Tensor::cat(&dense, 0)
    };
    Ok(Weight::Dense(put(t)))
}

impl LlamaModel {
    pub fn load(path: impl AsRef<Path>, device: Device, kind: Kind) -> Result<Self> {
        let g = GgufFile::open(path)?;
        Self::from_gguf(&g, device, kind)
    }

    /// Dense weights in `kind` on `device`.
    pub fn from_gguf(g: &GgufFile, device: Device, kind: Kind) -> Result<Self> {
        Self::from_gguf_with(g, device, kind, WeightFormat::Dense)
    }

    /// Weights in `format`; `GgufBlocks` needs the CPU and f32 (the kind of every activation).
    /// The blocks' products run on a pool of libtorch's current thread count.
    pub fn from_gguf_with(
        g: &GgufFile,
        device: Device,
        kind: Kind,
        format: WeightFormat,
    ) -> Result<Self> {
        if !matches!(
            kind,
            Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
        ) {
            return Err(LlmError::Invalid(format!(
                "model kind {kind:?} is not a float kind"
            )));
        }
        if format.is_blocks() && (device != Device::Cpu || kind != Kind::Float) {
            return Err(LlmError::Invalid(format!(
                "GGUF block weights compute on the CPU in f32, not {kind:?} on {device:?}"
            )));
        }
        let cfg = LlamaConfig::from_gguf(g)?;
        let _guard = tch::no_grad_guard();
        let (d, v) = (cfg.d_model, cfg.vocab);
        let put = |t: Tensor| t.to_device(device).to_kind(kind);
        let pool = if format.is_blocks() {
            quant::kernel_pool(tch::get_num_threads().max(1) as usize)?
        } else {
            None
        };
        let w = |parts: &[Part]| load_weight(g, parts, format, &pool, &put);
        let embed = w(&[part("token_embd.weight".into(), v, d, None)])?;
        let lm_head = match g.tensor_info("output.weight") {
            Some(_) => Some(w(&[part("output.weight".into(), v, d, None)])?),
            None => None,
        };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let hd = cfg.head_dim;
            blocks.push(Block {
                attn_norm: put(load_tensor(g, &n("attn_norm"), &[d])?),
                wqkv: w(&[
                    part(n("attn_q"), cfg.q_dim(), d, Some((cfg.n_head, hd))),
                    part(n("attn_k"), cfg.kv_dim(), d, Some((cfg.n_kv_head, hd))),
                    part(n("attn_v"), cfg.kv_dim(), d, None),
                ])?,
                wo: w(&[part(n("attn_output"), d, cfg.q_dim(), None)])?,
                ffn_norm: put(load_tensor(g, &n("ffn_norm"), &[d])?),
                w_gate_up: w(&[
                    part(n("ffn_gate"), cfg.ffn, d, None),
                    part(n("ffn_up"), cfg.ffn, d, None),
                ])?,
                w_down: w(&[part(n("ffn_down"), d, cfg.ffn, None)])?,
            });
        }
        let norm = put(load_tensor(g, "output_norm.weight", &[d])?);
        let (cos, sin) = rope_tables(&cfg, device);
        Ok(LlamaModel {
            embed,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
            device,
            kind,
            format,
            cfg,
        })
    }

    pub fn weight_format(&self) -> WeightFormat {
        self.format
    }

    /// Bytes held by the weights (projections, embedding, norms).
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                t(&b.attn_norm)
                    + t(&b.ffn_norm)
                    + b.wqkv.bytes()
                    + b.wo.bytes()
                    + b.w_gate_up.bytes()
                    + b.w_down.bytes()
            })
            .sum();
        blocks + self.embed.bytes() + self.lm_head.as_ref().map_or(0, Weight::bytes) + t(&self.norm)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// An empty cache for `batch` rows and up to `capacity` positions.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        if capacity > self.cfg.ctx_len {
            return Err(LlmError::Invalid(format!(
                "{capacity} positions exceed the model context of {}",
                self.cfg.ctx_len
            )));
        }
        let shape = [
            batch as i64,
            self.cfg.n_kv_head as i64,
            capacity as i64,
            self.cfg.head_dim as i64,
        ];
        let opts = (self.kind, self.device);
        Ok(KvCache {
            k: (0..self.cfg.n_layer)
                .map(|_| Tensor::zeros(shape, opts))
                .collect(),
            v: (0..self.cfg.n_layer)
                .map(|_| Tensor::zeros(shape, opts))
                .collect(),
            key_valid: Tensor::zeros([batch as i64, capacity as i64], (Kind::Bool, self.device)),
            next_pos: Tensor::zeros([batch as i64], (Kind::Int64, self.device)),
            len: 0,
            capacity: capacity as i64,
            batch: batch as i64,
        })
    }

    /// A cache for `batch` rows and up to `capacity` positions whose first `len` positions
    /// hold, in every row, the first `len` positions of the one-row cache `prefix` (its keys,
    /// values and validity; the RoPE position of each row continues after the prefix's valid
    /// tokens). Prefix caching: a prompt head shared by a batch is run once and broadcast.
    pub fn new_cache_with_prefix(
        &self,
        prefix: &KvCache,
        len: usize,
        batch: usize,
        capacity: usize,
    ) -> Result<KvCache> {
        if prefix.batch != 1 || len > prefix.len() || len > capacity {
            return Err(LlmError::Invalid(format!(
                "a prefix of {len} positions cannot come from a cache of {} rows x {} positions \
                 into one of {capacity} positions",
                prefix.batch,
                prefix.len()
            )));
        }
        let mut c = self.new_cache(batch, capacity)?;
        let l = len as i64;
        for (dst, src) in
            c.k.iter_mut()
                .chain(c.v.iter_mut())
                .zip(prefix.k.iter().chain(prefix.v.iter()))
        {
            dst.narrow(2, 0, l).copy_(&src.narrow(2, 0, l));
        }
        let valid = prefix.key_valid.narrow(1, 0, l);
        c.key_valid.narrow(1, 0, l).copy_(&valid);
        let n = valid
            .to_kind(Kind::Int64)
            .sum_dim_intlist(1, false, Kind::Int64);
        c.next_pos.copy_(&n);
        c.len = l;
        Ok(c)
    }

    /// Bytes one cached position takes over all layers (keys and values).
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.cfg.n_layer * self.cfg.kv_dim() * self.kind.elt_size_in_bytes()
    }

    /// Token embeddings of ids [B, T] (i64).
    pub fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        let (b, t) = ids.size2().expect("ids are [B, T]");
        let flat = ids.reshape([-1]);
        let rows = match &self.embed {
            Weight::Dense(e) => e.index_select(0, &flat),
            Weight::Blocks { matrix, .. } => {
                let ids =
                    Vec::<i64>::try_from(&flat.to_device(Device::Cpu)).expect("token ids are i64");
                matrix
                    .gather_rows(&ids)
                    .expect("token ids within the vocabulary")
            }
        };
        rows.view([b, t, self.cfg.d_model as i64])
    }

    /// RoPE tables for positions [B, T] -> ([B, 1, T, hd], same) in the model kind.
    pub fn rope(&self, pos: &Tensor) -> (Tensor, Tensor) {
        let (b, t) = pos.size2().expect("positions are [B, T]");
        let hd = self.cfg.head_dim as i64;
        let flat = pos.reshape([-1]);
        let pick = |tab: &Tensor| {
            tab.index_select(0, &flat)
                .view([b, 1, t, hd])
                .to_kind(self.kind)
        };
        (pick(&self.cos), pick(&self.sin))
    }

    /// Attention inputs for T new tokens with validity `valid` [B, T] when `start` tokens are
    /// already cached with validity `past_valid` [B, start] (None when start = 0).
    /// Returns the inputs and the positions [B, T].
    pub fn attn_inputs(
        &self,
        valid: &Tensor,
        past_valid: Option<&Tensor>,
        first_pos: &Tensor,
    ) -> (AttnInputs, Tensor) {
        let (_, t) = valid.size2().expect("valid is [B, T]");
        let pos = (first_pos.unsqueeze(1) + valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1)
            .clamp_min(0);
        let (cos, sin) = self.rope(&pos);
        let start = past_valid.map_or(0, |p| p.size()[1]);
        let all_set = |m: &Tensor| m.all().int64_value(&[]) != 0;
        let all_valid = all_set(valid) && past_valid.is_none_or(all_set);
        let mask = if all_valid && (start == 0 || t == 1) {
            // No padding: SDPA's own causal mask (prefill) or no mask at all (one new token
            // sees every cached key), which lets it take its fastest kernels.
            None
        } else {
            let l = start + t;
            let dev = valid.device();
            let keys = match past_valid {
                Some(p) => Tensor::cat(&[p, valid], 1),
                None => valid.shallow_clone(),
            };
            let qpos = Tensor::arange_start(start, l, (Kind::Int64, dev)).unsqueeze(1);
            let kpos = Tensor::arange(l, (Kind::Int64, dev)).unsqueeze(0);
            let causal = kpos.le_tensor(&qpos);
            let diag = kpos.eq_tensor(&qpos);
            let m = keys
                .unsqueeze(1)
                .logical_and(&causal.unsqueeze(0))
                .logical_or(&diag.unsqueeze(0));
            Some(m.unsqueeze(1))
        };
        (
            AttnInputs {
                cos,
                sin,
                mask,
                is_causal: start == 0 && t > 1,
            },
            pos,
        )
    }

    /// Runs T new tokens of every row through the model, appending them to `cache`.
    /// `ids` [B, T] i64, `valid` [B, T] bool (false = left padding). Returns the final-normed
    /// hidden states [B, T, d_model].
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        valid: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = ids.size2()?;
        if b != cache.batch || valid.size() != [b, t] {
            return Err(LlmError::Invalid(format!(
                "batch of {b}x{t} ids / {:?} mask does not fit a cache of {} rows",
                valid.size(),
                cache.batch
            )));
        }
        if cache.len + t > cache.capacity {
            return Err(LlmError::Invalid(format!(
                "cache full: {} + {t} tokens exceed its capacity {}",
                cache.len, cache.capacity
            )));
        }
        let start = cache.len;
        let past = (start > 0).then(|| cache.key_valid.narrow(1, 0, start));
        let (att, _) = self.attn_inputs(valid, past.as_ref(), &cache.next_pos);
        cache.key_valid.narrow(1, start, t).copy_(valid);
        cache.next_pos += valid
            .to_kind(Kind::Int64)
            .sum_dim_intlist(1, false, Kind::Int64);
        let mut x = self.embed_tokens(ids);
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&self.cfg, &x, &att, Some((&cache.k[i], &cache.v[i])), start);
        }
        cache.len += t;
        Ok(rms_norm(&x, &self.norm, self.cfg.eps))
    }

    /// Full forward without a cache: hidden states [B, T, d_model] after the final norm.
    pub fn forward(&self, ids: &Tensor, valid: &Tensor) -> Result<Tensor> {
        let (b, _) = ids.size2()?;
        let first = Tensor::zeros([b], (Kind::Int64, self.device));
        let (att, _) = self.attn_inputs(valid, None, &first);
        let mut x = self.embed_tokens(ids);
        for blk in &self.blocks {
            x = blk.forward(&self.cfg, &x, &att, None, 0);
        }
        Ok(rms_norm(&x, &self.norm, self.cfg.eps))
    }

    /// Output logits in f32 for hidden states [..., d_model].
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let w = self.lm_head.as_ref().unwrap_or(&self.embed);
        w.apply(hidden).to_kind(Kind::Float)
    }
}

/// cos/sin of position * inv_freq, computed in f32 like transformers' LlamaRotaryEmbedding.
fn rope_tables(cfg: &LlamaConfig, device: Device) -> (Tensor, Tensor) {
    let hd = cfg.head_dim as i64;
    let exps = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float)
        / hd as f64;
    let inv_freq = (Tensor::from(cfg.rope_base as f32).pow(&exps)).reciprocal();
    let pos = Tensor::arange(cfg.ctx_len as i64, (Kind::Float, Device::Cpu));
    let freqs = pos.unsqueeze(1).matmul(&inv_freq.unsqueeze(0));
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos().to_device(device), emb.sin().to_device(device))
}
