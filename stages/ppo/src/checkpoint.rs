//! A trained policy as an artifact: `<name>.safetensors` holds exactly the trainable tensors
//! (the top blocks, the final norm, the policy head and the value MLP, f32) and
//! `<name>.json` the config that rebuilds the policy around them, including the blake3 hash
//! of the base GGUF (the frozen part is never copied: loading checks the hash instead) and of
//! the prompt template the policy was trained with.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, nn};

use crate::policy::{HeadStart, LlmPolicy, PolicyConfig};

pub const FORMAT: &str = "flag-ppo-checkpoint/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    pub format: String,
    pub base_model_file: String,
    pub base_model_blake3: String,
    pub n_layer: usize,
    pub trainable_blocks: usize,
    pub value_hidden: usize,
    pub head_init: String,
    pub max_prompt_tokens: usize,
    pub action_names: Vec<String>,
    pub action_tokens: Vec<u32>,
    pub prompt_file: String,
    pub prompt_blake3: String,
    pub answer_prefix: String,
    pub window: usize,
    pub history: usize,
    pub ticker: String,
    pub run: usize,
    pub seed: u64,
    /// Names of the stored tensors, sorted.
    pub tensors: Vec<String>,
    /// blake3 of `<name>.safetensors`: in the store, objects are named by their hash, so
    /// this is how a downstream stage finds the weights that belong to this config.
    #[serde(default)]
    pub weights_blake3: String,
}

impl CheckpointConfig {
    pub fn policy_config(&self) -> Result<PolicyConfig, String> {
        Ok(PolicyConfig {
            trainable_blocks: self.trainable_blocks,
            value_hidden: self.value_hidden,
            head_start: match HeadStart::parse(&self.head_init) {
                // The heads come from the checkpoint: the calibration is not needed to rebuild.
                Some(HeadStart::ActionScores) => HeadStart::ActionWords,
                Some(h) => h,
                None => return Err(format!("unknown head_init '{}'", self.head_init)),
            },
            max_prompt_tokens: self.max_prompt_tokens,
            init_seed: self.seed,
        })
    }
}

/// blake3 of a file, hex.
pub fn file_blake3(path: &Path) -> Result<String, String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

/// The two files of checkpoint `name` in `dir`.
pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.safetensors")),
        dir.join(format!("{name}.json")),
    )
}

/// Writes the trainable tensors of `vs` and `cfg` (its `tensors` filled in here).
pub fn save(
    dir: &Path,
    name: &str,
    vs: &nn::VarStore,
    mut cfg: CheckpointConfig,
) -> Result<(), String> {
    let (weights, config) = paths(dir, name);
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    cfg.tensors = names;
    vs.save(&weights)
        .map_err(|e| format!("{}: {e}", weights.display()))?;
    cfg.weights_blake3 = file_blake3(&weights)?;
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| e.to_string())?;
    std::fs::write(&config, text + "\n").map_err(|e| format!("{}: {e}", config.display()))
}

/// Reads the config of checkpoint `name` in `dir`.
pub fn read_config(dir: &Path, name: &str) -> Result<CheckpointConfig, String> {
    read_config_file(&paths(dir, name).1)
}

/// Reads a checkpoint config file.
pub fn read_config_file(config: &Path) -> Result<CheckpointConfig, String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let cfg: CheckpointConfig =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", config.display()))?;
    if cfg.format != FORMAT {
        return Err(format!(
            "{}: format '{}' is not {FORMAT}",
            config.display(),
            cfg.format
        ));
    }
    Ok(cfg)
}

/// Rebuilds the policy of checkpoint `name` in `dir` (see [`load_files`]).
pub fn load(
    dir: &Path,
    name: &str,
    gguf: &Path,
    device: Device,
) -> Result<(LlmPolicy, nn::VarStore, CheckpointConfig), String> {
    let (weights, config) = paths(dir, name);
    load_files(&config, &weights, gguf, &file_blake3(gguf)?, device)
}

/// Rebuilds a checkpoint's policy on `device` around the base GGUF `gguf` (whose blake3,
/// `gguf_blake3`, the caller computed once), which must be the one it was trained from; the
/// weights must hash to what the config names.
pub fn load_files(
    config: &Path,
    weights: &Path,
    gguf: &Path,
    gguf_blake3: &str,
    device: Device,
) -> Result<(LlmPolicy, nn::VarStore, CheckpointConfig), String> {
    let cfg = read_config_file(config)?;
    let hash = gguf_blake3;
    if hash != cfg.base_model_blake3 {
        return Err(format!(
            "{}: the checkpoint was trained on a base model with blake3 {}, but {} hashes to {hash}",
            config.display(),
            cfg.base_model_blake3,
            gguf.display()
        ));
    }
    let mut vs = nn::VarStore::new(device);
    let policy = LlmPolicy::load(gguf, cfg.policy_config()?, &cfg.answer_prefix, &vs.root())?;
    if policy.net.n_layer() != cfg.n_layer {
        return Err(format!(
            "the base model has {} layers, the checkpoint {}",
            policy.net.n_layer(),
            cfg.n_layer
        ));
    }
    let mut have: Vec<String> = vs.variables().into_keys().collect();
    have.sort();
    if have != cfg.tensors {
        return Err(format!(
            "{}: its tensors {:?} do not match the policy's {:?}",
            config.display(),
            cfg.tensors,
            have
        ));
    }
    let got = file_blake3(weights)?;
    if !cfg.weights_blake3.is_empty() && got != cfg.weights_blake3 {
        return Err(format!(
            "{}: blake3 {got} is not the {} its config names",
            weights.display(),
            cfg.weights_blake3
        ));
    }
    vs.load(weights)
        .map_err(|e| format!("{}: {e}", weights.display()))?;
    Ok((policy, vs, cfg))
}
