//! The settings every LLM stage shares (params, device, backend choice) and how they turn
//! into a backend.
use std::path::PathBuf;
use std::time::Duration;

use flag_core::{ParamKind, ParamSpec, Params, StageError, StageResult};
use serde_json::{Value, json};

use super::openai::{MAX_TOP_LOGPROBS, OpenAiBackend, OpenAiSettings};
use super::{EmbeddedBackend, LlmBackend};
use crate::constrain::Constraint;
use crate::generate::GenerateOptions;

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
            "Constrain answers to the prompt's JSON Schema: enforced by the embedded decoder, sent as response_format to an HTTP backend and checked locally (false: free generation after a JSON prefill, parsed after; the ablation)",
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
                super::openai::display_url(&base_url)
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

/// A device name as users write it: `cpu`, `cuda` or `cuda:N` (checked against the CUDA
/// devices libtorch sees).
pub fn parse_device(s: &str) -> Result<tch::Device, String> {
    let cuda = |i: usize| {
        if !tch::Cuda::is_available() {
            return Err(format!(
                "{s}: no CUDA device is available to libtorch on this machine"
            ));
        }
        let n = tch::Cuda::device_count() as usize;
        if i >= n {
            return Err(format!("{s}: only {n} CUDA device(s)"));
        }
        Ok(tch::Device::Cuda(i))
    };
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(format!("'{s}' is not one of cpu, cuda, cuda:N")),
        },
    }
}

/// The `device` param of an LLM stage: cpu or cuda (the stage's key records which). Only the
/// name is checked here: this runs when the coordinator loads a pipeline, which may be on
/// another machine than the one the stage runs on; [`ensure_device`] checks the device where
/// the model is loaded.
fn device_choice(p: &Params) -> StageResult<(&'static str, tch::Device)> {
    let dev = p.opt_str("device")?.unwrap_or_else(|| "cpu".into());
    match dev.as_str() {
        "cpu" => Ok(("cpu", tch::Device::Cpu)),
        "cuda" => Ok(("cuda", tch::Device::Cuda(0))),
        other => Err(StageError::param(
            "device",
            format!("'{other}' is not one of cpu, cuda"),
        )),
    }
}

/// Fails, naming the param, when `device` is a CUDA device libtorch cannot use here.
pub fn ensure_device(device: tch::Device) -> StageResult<()> {
    match device {
        tch::Device::Cuda(i) => parse_device(&format!("cuda:{i}"))
            .map(|_| ())
            .map_err(|m| StageError::param("device", m)),
        _ => Ok(()),
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
        // Block weights (the default) sum their products in another order than dense f32
        // ones. Dense adds nothing, so keys made when dense was the only format still match
        // with FLAG_LLM_WEIGHTS=dense.
        let weights = crate::generate::cpu_weights_by_env()
            .map_or("invalid", crate::llama::WeightFormat::name);
        if weights != "dense" {
            env.push(("weights".into(), weights.into()));
            // Their prefill multiplies with flag-kernels' fixed-order product (MKL's before).
            env.push(("prefill_gemm".into(), "flag-kernels".into()));
        }
    }
    env.push(("device".into(), dev));
    // A batch's shared head run once changes the summation order of its keys and values.
    let prefix = if crate::generate::prefix_cache_by_env() {
        "on"
    } else {
        "off"
    };
    env.push(("prefix_cache".into(), prefix.into()));
    if let Some(store) = prefix_store_key(crate::generate::prefix_store_by_env()) {
        env.push(("prefix_store".into(), store.into()));
    }
    env
}

/// The key entry for the heads kept across calls: none for `off` and `exact` (`exact` reuses
/// only the bits a call computes itself, so both give the same bytes and keys made before the
/// setting existed still match); `any` makes numbers depend on earlier calls.
fn prefix_store_key(
    mode: std::result::Result<crate::generate::PrefixStore, String>,
) -> Option<&'static str> {
    match mode {
        Ok(crate::generate::PrefixStore::Any) => Some("any"),
        Ok(_) => None,
        Err(_) => Some("invalid"),
    }
}

/// The libtorch threads the embedded engine will decode with: `FLAG_LLM_THREADS` when it
/// parses (the engine rejects other values when it loads), else libtorch's default.
pub fn llm_threads() -> usize {
    std::env::var("FLAG_LLM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|n| n.max(1))
        .unwrap_or_else(flag_core::numerics::default_threads)
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
    crate::models::smollm2_gguf(explicit.as_deref())
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

    /// These settings with answers constrained to `schema` (param `constrain`): the embedded
    /// decoder enforces the whole form, an HTTP backend sends it as `response_format` and
    /// checks each answer; either way no prefill and no JSON stop are needed.
    pub fn constrained_by(mut self, schema: Constraint) -> Self {
        if self.constrain {
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
                let path = crate::models::smollm2_gguf(self.model.as_deref())
                    .map_err(|e| StageError::param("model", e.to_string()))?;
                ensure_device(self.device)?;
                Box::new(EmbeddedBackend::load(&path, self.device)?)
            }
            BackendChoice::OpenAi(s) => Box::new(OpenAiBackend::from_env(s.clone())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn only_partial_head_reuse_enters_the_key() {
        use crate::generate::PrefixStore;
        assert_eq!(prefix_store_key(Ok(PrefixStore::Off)), None);
        assert_eq!(prefix_store_key(Ok(PrefixStore::Exact)), None);
        assert_eq!(prefix_store_key(Ok(PrefixStore::Any)), Some("any"));
        assert_eq!(prefix_store_key(Err("bad".into())), Some("invalid"));
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
        // Prefix caching changes the summation order on both.
        let prefix = if crate::generate::prefix_cache_by_env() {
            "on"
        } else {
            "off"
        };
        let mut cpu = vec![("threads".into(), llm_threads().to_string())];
        let weights = crate::generate::cpu_weights_by_env().unwrap();
        if weights != crate::llama::WeightFormat::Dense {
            cpu.push(("weights".into(), weights.name().into()));
            cpu.push(("prefill_gemm".into(), "flag-kernels".into()));
        }
        cpu.extend([
            ("device".into(), "cpu".into()),
            ("prefix_cache".into(), prefix.into()),
        ]);
        assert_eq!(device_env(&e), cpu);
        let cuda = params(json!({"device": "cuda"}));
        assert_eq!(
            device_env(&cuda),
            vec![
                ("device".into(), "cuda".into()),
                ("prefix_cache".into(), prefix.into())
            ]
        );

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
