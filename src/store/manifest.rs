//! The record of one stage run. Written last, atomically: its presence means "complete".
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name inside the output (e.g. `bars.parquet`, `charts/equity_AAPL.svg`).
    pub name: String,
    /// blake3 of the bytes, hex.
    pub hash: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputRecord {
    /// parquet | file | dir
    pub kind: String,
    /// Content hash of the output: the file's hash, or a hash over (name, hash) of a dir.
    pub hash: String,
    pub files: Vec<FileEntry>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rows: Option<u64>,
    /// (column, Arrow type) for Parquet outputs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub schema: Option<Vec<(String, String)>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub pipeline: String,
    pub stage: String,
    pub kind: String,
    /// Everything the key was computed from (see cache::KeyParts).
    pub parts: serde_json::Value,
    pub outputs: BTreeMap<String, OutputRecord>,
    pub seconds: f64,
    pub created: String,
    /// Store-relative path of the run's log.
    pub log: String,
    /// The machine and kernel path that computed the outputs (CPU, ATen dispatch level, MKL
    /// path, libtorch, device, threads) and the stage's numerics class. Recorded for every
    /// run; keyed only for kernel-path stages (see `parts.env`). Empty in older manifests.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compute: BTreeMap<String, String>,
}
