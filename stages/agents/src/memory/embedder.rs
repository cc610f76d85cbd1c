//! The sentence embedder of the memory stages, picked by params like the LLM stages' backend:
//! `backend: embedded` runs all-MiniLM-L6-v2 in process ([`MiniLmEmbedder`], no GGUF is
//! loaded), `backend: openai` posts to `{base_url}/embeddings` (model `all-MiniLM-L6-v2`, what
//! `flag serve` serves) through [`flag_llm::backend::openai::OpenAiBackend`]. The backend
//! params (`backend`, `device`, `base_url`, `api_key_env`, `timeout_s`) are validated by
//! [`LlmSettings::from_params`], so their messages are the LLM stages' own.
use std::collections::BTreeMap;
use std::path::PathBuf;

use flag_core::{ParamKind, ParamSpec, Params, StageError, StageResult};
use flag_llm::backend::{BackendChoice, LlmBackend, LlmSettings, backend_name, llm_param_specs};
use flag_llm::embed::MiniLmEmbedder;
use flag_llm::models;
use serde_json::{Value, json};

/// The embedding width of all-MiniLM-L6-v2.
pub const MINILM_DIM: usize = 384;

/// Params shared by the stages that embed text.
pub fn embed_param_specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::with_default(
            "backend",
            ParamKind::Str,
            json!("embedded"),
            "embedded (all-MiniLM-L6-v2 in process on `device`) or openai (POST {base_url}/embeddings, model all-MiniLM-L6-v2)",
        ),
        ParamSpec::with_default(
            "device",
            ParamKind::Str,
            json!("cpu"),
            "backend embedded: cpu or cuda (CPU is bit-reproducible)",
        ),
        ParamSpec::with_default(
            "embed_model",
            ParamKind::Path,
            Value::Null,
            "backend embedded: MiniLM directory (model.safetensors, tokenizer.json; default: the packaged all-MiniLM-L6-v2, or $FLAG_MINILM_DIR)",
        ),
        ParamSpec::with_default(
            "base_url",
            ParamKind::Str,
            Value::Null,
            "backend openai: the API root, e.g. http://127.0.0.1:8080/v1 (`flag serve`)",
        ),
        ParamSpec::with_default(
            "api_key_env",
            ParamKind::Str,
            json!("OPENAI_API_KEY"),
            "backend openai: NAME of the environment variable holding the API key (read at run time, never stored)",
        ),
        ParamSpec::with_default(
            "timeout_s",
            ParamKind::Float,
            json!(120.0),
            "backend openai: seconds allowed per request",
        ),
    ]
}

/// Where embeddings come from, from the params of [`embed_param_specs`].
#[derive(Debug, Clone)]
pub struct EmbedSettings {
    pub backend: BackendChoice,
    pub device: tch::Device,
    /// "cpu", "cuda", or "remote".
    pub device_name: &'static str,
    /// The `embed_model` param (None: the packaged MiniLM).
    pub model: Option<PathBuf>,
}

impl EmbedSettings {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        // The LLM settings validate the backend params; generation params keep defaults.
        let mut map: BTreeMap<String, Value> = llm_param_specs(1)
            .into_iter()
            .filter_map(|s| s.default.map(|d| (s.name.to_string(), d)))
            .collect();
        for name in ["backend", "device", "base_url", "api_key_env", "timeout_s"] {
            if let Some(v) = p.get(name) {
                map.insert(name.into(), v.clone());
            }
        }
        let openai = backend_name(p)? == "openai";
        if openai {
            map.insert("api_model".into(), json!(models::MINILM.name));
            if p.get("embed_model").is_some() {
                return Err(StageError::param(
                    "embed_model",
                    "is the MiniLM of the embedded backend; backend openai embeds on the server",
                ));
            }
        }
        let s = LlmSettings::from_params(&Params::new(map), Vec::new())?;
        Ok(EmbedSettings {
            backend: s.backend,
            device: s.device,
            device_name: s.device_name,
            model: p
                .get("embed_model")
                .map(|_| p.path("embed_model"))
                .transpose()?,
        })
    }

    /// Loads the embedder (the model for `embedded`, an HTTP client for `openai`).
    pub fn load(&self) -> StageResult<Embedder> {
        match &self.backend {
            BackendChoice::Embedded => {
                if !self.device.is_cuda() {
                    // As the embedded LLM engine: FLAG_LLM_THREADS sets libtorch's threads
                    // (and the cache key records them, see `device_env`).
                    if let Ok(v) = std::env::var("FLAG_LLM_THREADS") {
                        let n: usize = v.trim().parse().map_err(|_| {
                            StageError::Invalid(format!(
                                "FLAG_LLM_THREADS='{v}' is not a thread count"
                            ))
                        })?;
                        flag_llm::generate::set_threads(n);
                    }
                }
                let dir = models::minilm_dir(self.model.as_deref())
                    .map_err(|e| StageError::param("embed_model", e.to_string()))?;
                flag_llm::backend::ensure_device(self.device)?;
                let m = MiniLmEmbedder::load(&dir, self.device)
                    .map_err(|e| StageError::external(format!("loading {}", dir.display()), e))?;
                Ok(Embedder::Local {
                    name: format!("{} ({})", models::MINILM.name, dir.display()),
                    model: Box::new(m),
                })
            }
            BackendChoice::OpenAi(s) => Ok(Embedder::Remote(Box::new(
                flag_llm::backend::openai::OpenAiBackend::from_env(s.clone())?,
            ))),
        }
    }
}

/// The local files embeddings depend on (a stage's `external_files`): the MiniLM weights,
/// tokenizer and configs for the embedded backend; none for openai.
pub fn embed_model_files(p: &Params) -> StageResult<Vec<PathBuf>> {
    if backend_name(p)? == "openai" {
        return Ok(Vec::new());
    }
    let explicit = p
        .get("embed_model")
        .map(|_| p.path("embed_model"))
        .transpose()?;
    let dir = models::minilm_dir(explicit.as_deref())
        .map_err(|e| StageError::param("embed_model", e.to_string()))?;
    Ok([
        "model.safetensors",
        "tokenizer.json",
        "config.json",
        "sentence_bert_config.json",
    ]
    .iter()
    .map(|f| dir.join(f))
    .filter(|f| f.is_file())
    .collect())
}

/// A loaded embedder.
pub enum Embedder {
    Local {
        name: String,
        model: Box<MiniLmEmbedder>,
    },
    Remote(Box<dyn LlmBackend>),
}

impl Embedder {
    pub fn name(&self) -> String {
        match self {
            Embedder::Local { name, .. } => name.clone(),
            Embedder::Remote(b) => b.name(),
        }
    }

    /// The width every vector must have: the model's for the local MiniLM, 384 (MiniLM's)
    /// for a server, which is asked for all-MiniLM-L6-v2.
    pub fn dim(&self) -> usize {
        match self {
            Embedder::Local { model, .. } => model.dim(),
            Embedder::Remote(_) => MINILM_DIM,
        }
    }

    /// One unit vector per text, in order; a vector of another width, or with a non-finite
    /// value, is an error naming the text's position.
    pub fn embed(&self, texts: &[String]) -> StageResult<Vec<Vec<f32>>> {
        let out = match self {
            Embedder::Local { model, .. } => model
                .embed(texts)
                .map_err(|e| StageError::external("embedding", e))?,
            Embedder::Remote(b) => b.embed(texts)?,
        };
        if out.len() != texts.len() {
            return Err(StageError::Invalid(format!(
                "{}: {} embeddings for {} texts",
                self.name(),
                out.len(),
                texts.len()
            )));
        }
        let dim = self.dim();
        for (i, v) in out.iter().enumerate() {
            if v.len() != dim {
                return Err(StageError::Invalid(format!(
                    "{}: the embedding of text {} ({:?}) has {} values, expected {dim}",
                    self.name(),
                    i + 1,
                    crate::memory::excerpt(&texts[i]),
                    v.len()
                )));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(StageError::Invalid(format!(
                    "{}: the embedding of text {} ({:?}) has a non-finite value",
                    self.name(),
                    i + 1,
                    crate::memory::excerpt(&texts[i])
                )));
            }
        }
        Ok(out)
    }
}

/// Embeds `texts` in batches of `batch_size`, shortest texts first (by characters, then
/// position), and returns the vectors in the texts' order. A batch is padded to its longest
/// text, so grouping similar lengths saves most of the padding work; the order is a pure
/// function of the texts, so the vectors are as reproducible as the embedder.
pub fn embed_by_length(
    embedder: &Embedder,
    texts: &[String],
    batch_size: usize,
    unit: &str,
    progress: &dyn Fn(u64, u64, &str),
) -> StageResult<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| (texts[i].chars().count(), i));
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
    let total = texts.len() as u64;
    for (n, chunk) in order.chunks(batch_size.max(1)).enumerate() {
        progress((n * batch_size) as u64, total, unit);
        let batch: Vec<String> = chunk.iter().map(|&i| texts[i].clone()).collect();
        for (&i, v) in chunk.iter().zip(embedder.embed(&batch)?) {
            out[i] = v;
        }
    }
    progress(total, total, unit);
    Ok(out)
}
