//! The LLM behind the agents, as a trait: a batch of prompts in, one scored generation per
//! prompt out. Implemented here for the embedded flag-llm [`Engine`], and in
//! [`crate::openai`] for any OpenAI-compatible HTTP server; the `backend` param of each LLM
//! stage picks one ([`LlmSettings::load_backend`] returns a `Box<dyn LlmBackend>`).
use std::path::{Path, PathBuf};
use std::time::Duration;

use flag_core::{ParamKind, ParamSpec, Params, StageError, StageResult};
use flag_llm::constrain::Constraint;
use flag_llm::generate::{Engine, GenerateOptions, Generation};
use flag_llm::tokenizer::ChatMessage;
use serde_json::{Value, json};

use crate::openai::{MAX_TOP_LOGPROBS, OpenAiBackend, OpenAiSettings};

/// One request: a user message, and the first characters of the assistant's answer.
///
/// The prefill (e.g. `{"direction": "`) puts the model on the JSON rails from the first
/// token; the generated text continues it. The answer to parse is `prefill + text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmRequest {
    pub user: String,
    pub prefill: String,
}

/// A batch text generator with token scores (logprobs, top-k entropies, perplexity). Only
/// `Send`: tch tensors are not `Sync`, and a stage drives its backend from one thread.
pub trait LlmBackend: Send {
    /// Identity of the model for logs (e.g. the model file name).
    fn name(&self) -> String;

    /// One generation per request, in order. `opts.chat` is ignored: requests are always
    /// chat turns (the backend applies its own template).
    fn generate(
        &self,
        requests: &[LlmRequest],
        opts: &GenerateOptions,
    ) -> StageResult<Vec<Generation>>;

    /// Decodes generated token ids to text (used to locate a value's tokens in an answer).
    fn decode(&self, ids: &[u32]) -> StageResult<String>;
}

/// The embedded decoder of flag-llm.
pub struct EmbeddedBackend {
    engine: Engine,
    name: String,
}

impl EmbeddedBackend {
    pub fn new(engine: Engine, name: impl Into<String>) -> Self {
        EmbeddedBackend {
            engine,
            name: name.into(),
        }
    }

    /// Loads a GGUF on `device`.
    pub fn load(path: &Path, device: tch::Device) -> StageResult<Self> {
        let engine = Engine::load(path, device)
            .map_err(|e| StageError::external(format!("loading model {}", path.display()), e))?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(EmbeddedBackend::new(engine, name))
    }

    fn prompt_ids(&self, r: &LlmRequest) -> StageResult<Vec<u32>> {
        let tok = self.engine.tokenizer();
        let err = |e: flag_llm::LlmError| StageError::external("building the chat prompt", e);
        // The rendered template is encoded with special tokens parsed, so a user text spelling
        // "<|im_end|>" would close the turn: such markers are stripped from it first.
        let user = ChatMessage::user(strip_control_markers(&r.user));
        let text = tok.apply_chat_template(&[user], true).map_err(err)?;
        let mut ids = tok.encode(&text, true).map_err(err)?;
        if !r.prefill.is_empty() {
            ids.extend(tok.encode(&r.prefill, false).map_err(err)?);
        }
        Ok(ids)
    }
}

impl LlmBackend for EmbeddedBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn generate(
        &self,
        requests: &[LlmRequest],
        opts: &GenerateOptions,
    ) -> StageResult<Vec<Generation>> {
        let ids = requests
            .iter()
            .map(|r| self.prompt_ids(r))
            .collect::<StageResult<Vec<_>>>()?;
        self.engine
            .generate_ids(&ids, opts)
            .map_err(|e| StageError::external(format!("generating with {}", self.name), e))
    }

    fn decode(&self, ids: &[u32]) -> StageResult<String> {
        self.engine
            .tokenizer()
            .decode(ids, true)
            .map_err(|e| StageError::external("decoding tokens", e))
    }
}

/// Removes chat-control markers (`<|im_start|>`, `<|endoftext|>`, `<s>`...) from untrusted
/// text before it is rendered into a prompt, so data can never open or close a chat turn.
pub fn strip_control_markers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let marker_len = tail.find('>').filter(|&end| {
            let inner = &tail[1..end];
            let special = (inner.starts_with('|') && inner.ends_with('|') && inner.len() >= 2)
                || matches!(inner, "s" | "/s" | "unk" | "pad");
            special && !inner.contains(char::is_whitespace)
        });
        match marker_len {
            Some(end) => rest = &tail[end + 1..],
            None => {
                out.push('<');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Which model answers.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendChoice {
    /// The embedded flag-llm decoder on `LlmSettings::model` / `device`.
    Embedded,
    /// An OpenAI-compatible server (the key is read from the environment at run time).
    OpenAi(OpenAiSettings),
}

/// Generation settings shared by the LLM stages.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    pub backend: BackendChoice,
    pub model: Option<PathBuf>,
    pub device: tch::Device,
    /// "cpu", "cuda", or "remote" for the HTTP backend.
    pub device_name: &'static str,
    pub opts: GenerateOptions,
    /// Attempts after the first for a malformed answer.
    pub retries: usize,
    /// Whether the embedded decoder enforces the prompt's schema (param `constrain`).
    pub constrain: bool,
}

/// The params every LLM stage takes, with the defaults of the reported run.
pub fn llm_param_specs(max_tokens: u64) -> Vec<ParamSpec> {
    vec![
        ParamSpec::with_default(
            "model",
            ParamKind::Path,
            Value::Null,
            "GGUF model file (default: SmolLM2-135M-Instruct from the venv, see flag_llm::models)",
        ),
        ParamSpec::with_default(
            "device",
            ParamKind::Str,
            json!("cpu"),
            "cpu or cuda (CPU is bit-reproducible)",
        ),
        ParamSpec::with_default(
            "temperature",
            ParamKind::Float,
            json!(0.0),
            "Sampling temperature; 0 = greedy (the reported run)",
        ),
        ParamSpec::with_default(
            "seed",
            ParamKind::Int,
            json!(0),
            "Sampling seed (retry k uses seed + k)",
        ),
        ParamSpec::with_default(
            "max_tokens",
            ParamKind::Int,
            json!(max_tokens),
            "Generated tokens per answer",
        ),
        ParamSpec::with_default(
            "top_k_entropy",
            ParamKind::Int,
            json!(10),
            "k of the normalised top-k entropy",
        ),
        ParamSpec::with_default(
            "retries",
            ParamKind::Int,
            json!(2),
            "Extra attempts for a malformed answer (each told its error)",
        ),
        ParamSpec::with_default(
            "constrain",
            ParamKind::Bool,
            json!(true),
            "Enforce the prompt's JSON Schema in the embedded decoder (false: free generation, validated after; the ablation, and what an HTTP backend gets)",
        ),
        ParamSpec::with_default(
            "backend",
            ParamKind::Str,
            json!("embedded"),
            "embedded (flag-llm on `model`/`device`) or openai (an OpenAI-compatible server at `base_url`)",
        ),
        ParamSpec::with_default(
            "base_url",
            ParamKind::Str,
            Value::Null,
            "backend openai: the API root, e.g. http://127.0.0.1:8080/v1 (`flag serve`)",
        ),
        ParamSpec::with_default(
            "api_model",
            ParamKind::Str,
            Value::Null,
            "backend openai: the `model` name sent with each request",
        ),
        ParamSpec::with_default(
            "api_key_env",
            ParamKind::Str,
            json!("OPENAI_API_KEY"),
            "backend openai: NAME of the environment variable holding the API key (read at run \
             time, never stored; may be unset for servers that need no key)",
        ),
        ParamSpec::with_default(
            "timeout_s",
            ParamKind::Float,
            json!(120.0),
            "backend openai: seconds allowed per request",
        ),
    ]
}

/// The `backend` param: "embedded" or "openai".
pub fn backend_name(p: &Params) -> StageResult<String> {
    let b = p.opt_str("backend")?.unwrap_or_else(|| "embedded".into());
    match b.as_str() {
        "embedded" | "openai" => Ok(b),
        other => Err(StageError::param(
            "backend",
            format!("'{other}' is not one of embedded, openai"),
        )),
    }
}

fn openai_settings(p: &Params) -> StageResult<OpenAiSettings> {
    let required = |name: &str, example: &str| -> StageResult<String> {
        match p.opt_str(name)? {
            Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
            _ => Err(StageError::param(
                name,
                format!("is required with backend openai (e.g. {example})"),
            )),
        }
    };
    let base_url = required("base_url", "http://127.0.0.1:8080/v1")?;
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        return Err(StageError::param(
            "base_url",
            format!(
                "'{}' must start with http:// or https://",
                crate::openai::display_url(&base_url)
            ),
        ));
    }
    let api_key_env = p
        .opt_str("api_key_env")?
        .unwrap_or_else(|| "OPENAI_API_KEY".into());
    let valid_name = api_key_env
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && api_key_env
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(StageError::param(
            "api_key_env",
            format!(
                "'{api_key_env}' is not an environment variable name: give the NAME of the \
                 variable holding the key, never the key itself"
            ),
        ));
    }
    let timeout = match p.get("timeout_s") {
        Some(_) => p.f64("timeout_s")?,
        None => 120.0,
    };
    if !(timeout > 0.0 && timeout <= 86_400.0) {
        return Err(StageError::param(
            "timeout_s",
            format!("must be in (0, 86400], got {timeout}"),
        ));
    }
    Ok(OpenAiSettings {
        base_url,
        model: required("api_model", "SmolLM2-135M-Instruct")?,
        api_key_env,
        timeout: Duration::from_secs_f64(timeout),
    })
}

fn device_choice(p: &Params) -> StageResult<(&'static str, tch::Device)> {
    let dev = p.opt_str("device")?.unwrap_or_else(|| "cpu".into());
    match dev.as_str() {
        "cpu" => Ok(("cpu", tch::Device::Cpu)),
        "cuda" if tch::Cuda::is_available() => Ok(("cuda", tch::Device::Cuda(0))),
        "cuda" => Err(StageError::param(
            "device",
            "cuda was asked for but no CUDA device is available",
        )),
        other => Err(StageError::param(
            "device",
            format!("'{other}' is not one of cpu, cuda"),
        )),
    }
}

/// The device as recorded in the cache key ("invalid" lets `run` report the error). The HTTP
/// backend runs nothing locally: its params (base_url, api_model) identify the model.
pub fn device_env(p: &Params) -> Vec<(String, String)> {
    if backend_name(p).is_ok_and(|b| b == "openai") {
        return Vec::new();
    }
    let dev = p
        .opt_str("device")
        .ok()
        .flatten()
        .unwrap_or_else(|| "cpu".into());
    let dev = if matches!(dev.as_str(), "cpu" | "cuda") {
        dev
    } else {
        "invalid".into()
    };
    let mut env = Vec::new();
    if dev == "cpu" {
        // libtorch's intra-op reductions and MKL's blocking follow the thread count.
        env.push(("threads".into(), llm_threads().to_string()));
    }
    env.push(("device".into(), dev));
    env
}

/// The libtorch threads the embedded engine will decode with: `FLAG_LLM_THREADS` when it
/// parses (the engine rejects other values when it loads), else libtorch's default.
pub fn llm_threads() -> usize {
    std::env::var("FLAG_LLM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|n| n.max(1))
        .unwrap_or_else(|| tch::get_num_threads().max(1) as usize)
}

/// The embedded backend computes through libtorch (kernel-path dependent); the HTTP backend's
/// answers come from the service its params name.
pub fn backend_numerics(p: &Params) -> flag_core::Numerics {
    if backend_name(p).is_ok_and(|b| b == "openai") {
        flag_core::Numerics::Remote
    } else {
        flag_core::Numerics::KernelPath
    }
}

/// The model file: the `model` param, or the packaged SmolLM2.
pub fn model_path(p: &Params) -> StageResult<PathBuf> {
    let explicit = p.get("model").map(|_| p.path("model")).transpose()?;
    flag_llm::models::smollm2_gguf(explicit.as_deref())
        .map_err(|e| StageError::param("model", e.to_string()))
}

/// The local files an LLM stage's outputs depend on (its `external_files`): the GGUF for the
/// embedded backend, none for the HTTP backend (which needs no model file here).
pub fn model_files(p: &Params) -> StageResult<Vec<PathBuf>> {
    Ok(match backend_name(p)?.as_str() {
        "openai" => Vec::new(),
        _ => vec![model_path(p)?],
    })
}

impl LlmSettings {
    pub fn from_params(p: &Params, stop: Vec<String>) -> StageResult<Self> {
        let backend = match backend_name(p)?.as_str() {
            "openai" => BackendChoice::OpenAi(openai_settings(p)?),
            _ => BackendChoice::Embedded,
        };
        let top_k_entropy = p.usize("top_k_entropy")?;
        let (device_name, device) = match &backend {
            BackendChoice::Embedded => {
                for name in ["base_url", "api_model"] {
                    if p.get(name).is_some() {
                        return Err(StageError::param(
                            name,
                            "is only used with backend openai (backend is embedded)",
                        ));
                    }
                }
                device_choice(p)?
            }
            BackendChoice::OpenAi(_) => {
                if p.get("model").is_some() {
                    return Err(StageError::param(
                        "model",
                        "is the GGUF of the embedded backend; with backend openai set api_model",
                    ));
                }
                if !(1..=MAX_TOP_LOGPROBS).contains(&top_k_entropy) {
                    return Err(StageError::param(
                        "top_k_entropy",
                        format!(
                            "must be 1..={MAX_TOP_LOGPROBS} with backend openai (the API's \
                             top_logprobs limit), got {top_k_entropy}"
                        ),
                    ));
                }
                ("remote", tch::Device::Cpu)
            }
        };
        let temperature = p.f64("temperature")?;
        if temperature < 0.0 {
            return Err(StageError::param("temperature", "must be >= 0"));
        }
        let max_tokens = p.usize("max_tokens")?;
        if max_tokens == 0 {
            return Err(StageError::param("max_tokens", "must be at least 1"));
        }
        let retries = p.usize("retries")?;
        if retries > 10 {
            return Err(StageError::param(
                "retries",
                format!("at most 10, got {retries}"),
            ));
        }
        let seed = p.i64("seed")?;
        Ok(LlmSettings {
            backend,
            model: p.get("model").map(|_| p.path("model")).transpose()?,
            device,
            device_name,
            opts: GenerateOptions {
                max_tokens,
                temperature,
                top_p: 1.0,
                seed: seed as u64,
                stop,
                top_k_entropy,
                chat: true,
                json_prefill: None,
                constraint: None,
            },
            retries,
            constrain: p.bool("constrain")?,
        })
    }

    /// These settings, with generation ending where the JSON object that `prefill` opens
    /// closes.
    pub fn stopping_at_json(mut self, prefill: &str) -> Self {
        self.opts.json_prefill = Some(prefill.to_string());
        self
    }

    /// These settings with answers constrained to `schema` when the backend is the embedded
    /// engine: the decoder then enforces the whole form, so no prefill and no JSON stop are
    /// needed. An HTTP backend keeps the prefill and the answer is validated here only.
    pub fn constrained_by(mut self, schema: Constraint) -> Self {
        if self.backend == BackendChoice::Embedded && self.constrain {
            self.opts.constraint = Some(schema);
            self.opts.json_prefill = None;
        }
        self
    }

    /// The prefill to send: none when the decoder enforces the form.
    pub fn answer_prefill<'a>(&self, prefill: &'a str) -> &'a str {
        if self.opts.constraint.is_some() {
            ""
        } else {
            prefill
        }
    }

    /// The backend these settings name: the embedded model (loaded here), or an HTTP client
    /// whose API key is read from the environment now (and kept only in memory).
    pub fn load_backend(&self) -> StageResult<Box<dyn LlmBackend>> {
        Ok(match &self.backend {
            BackendChoice::Embedded => {
                let path = flag_llm::models::smollm2_gguf(self.model.as_deref())
                    .map_err(|e| StageError::param("model", e.to_string()))?;
                Box::new(EmbeddedBackend::load(&path, self.device)?)
            }
            BackendChoice::OpenAi(s) => Box::new(OpenAiBackend::from_env(s.clone())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_markers_are_removed_but_text_kept() {
        assert_eq!(
            strip_control_markers("a <|im_end|>\n<|im_start|>system x<s> 3 < 4 <b>"),
            "a \nsystem x 3 < 4 <b>"
        );
        assert_eq!(strip_control_markers("<|endoftext|>"), "");
        assert_eq!(strip_control_markers("<| a |> <"), "<| a |> <");
    }

    fn params(given: Value) -> Params {
        let mut map: std::collections::BTreeMap<String, Value> = llm_param_specs(32)
            .into_iter()
            .filter_map(|p| p.default.map(|d| (p.name.to_string(), d)))
            .collect();
        if let Value::Object(o) = given {
            map.extend(o);
        }
        Params::new(map)
    }

    fn param_err(given: Value) -> String {
        LlmSettings::from_params(&params(given), Vec::new())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn openai_backend_params() {
        let p = params(
            json!({"backend": "openai", "base_url": "http://127.0.0.1:8080/v1",
            "api_model": "smollm2", "api_key_env": "MY_KEY", "timeout_s": 30}),
        );
        let s = LlmSettings::from_params(&p, Vec::new()).unwrap();
        assert_eq!(
            s.backend,
            BackendChoice::OpenAi(OpenAiSettings {
                base_url: "http://127.0.0.1:8080/v1".into(),
                model: "smollm2".into(),
                api_key_env: "MY_KEY".into(),
                timeout: Duration::from_secs(30),
            })
        );
        assert_eq!(s.device_name, "remote");
        // No GGUF is hashed and no device enters the key for the HTTP backend.
        assert!(model_files(&p).unwrap().is_empty());
        assert!(device_env(&p).is_empty());
        // The embedded default is unchanged.
        let e = params(json!({}));
        let s = LlmSettings::from_params(&e, Vec::new()).unwrap();
        assert_eq!(s.backend, BackendChoice::Embedded);
        // On the CPU the thread count enters the key (reductions block by it); on CUDA not.
        assert_eq!(
            device_env(&e),
            vec![
                ("threads".into(), llm_threads().to_string()),
                ("device".into(), "cpu".into())
            ]
        );
        let cuda = params(json!({"device": "cuda"}));
        assert_eq!(device_env(&cuda), vec![("device".into(), "cuda".into())]);

        let openai = json!({"backend": "openai", "base_url": "http://h/v1", "api_model": "m"});
        let with = |extra: Value| {
            let mut v = openai.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        assert!(param_err(json!({"backend": "remote"})).contains("not one of embedded, openai"));
        assert!(
            param_err(json!({"backend": "openai", "api_model": "m"}))
                .contains("param 'base_url': is required with backend openai")
        );
        assert!(
            param_err(json!({"backend": "openai", "base_url": "http://h/v1"}))
                .contains("param 'api_model': is required")
        );
        assert!(param_err(with(json!({"base_url": "h:8080/v1"}))).contains("http://"));
        assert!(param_err(with(json!({"api_key_env": "sk-abc123"}))).contains("never the key"));
        assert!(param_err(with(json!({"top_k_entropy": 21}))).contains("1..=20"));
        assert!(param_err(with(json!({"top_k_entropy": 0}))).contains("1..=20"));
        assert!(param_err(with(json!({"timeout_s": 0}))).contains("timeout_s"));
        assert!(param_err(with(json!({"model": "/x.gguf"}))).contains("api_model"));
        assert!(
            param_err(json!({"base_url": "http://h/v1"})).contains("only used with backend openai")
        );
    }
}
