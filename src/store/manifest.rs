//! The record of one stage run. Written last, atomically: its presence means "complete".
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name inside the output (e.g. `bars.parquet`, `charts/equity_AAPL.svg`).
    pub name: String,
    /// blake3 of the bytes, hex.
    pub hash: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// The field a manifest file carries besides the [`Manifest`] itself: the blake3 of the
/// manifest's canonical JSON (every other field, object keys sorted, no whitespace). It seals
/// the outputs to the key the manifest is stored under: a manifest edited afterwards (say, an
/// output pointed at another intact object) no longer matches it. It detects damage and
/// careless edits, not forgery: anyone who can write the store can recompute it.
/// Every manifest must have one: one without it is damaged (an edit that deleted the line).
pub const DIGEST_FIELD: &str = "digest";

/// The digest of a manifest's JSON value, without its `digest` field.
pub fn digest(v: &serde_json::Value) -> String {
    // Removed before sorting: with serde_json's `preserve_order` (on in this build) a map's
    // `remove` moves its last entry into the hole.
    let mut v = v.clone();
    if let serde_json::Value::Object(m) = &mut v {
        m.remove(DIGEST_FIELD);
    }
    let v = crate::cache::sorted_keys(&v);
    let bytes = serde_json::to_vec(&v).expect("a JSON value serialises");
    blake3::hash(&bytes).to_hex().to_string()
}

/// The bytes of a manifest file: the manifest's JSON with its digest.
pub fn to_file_bytes(m: &Manifest) -> Vec<u8> {
    let mut v = serde_json::to_value(m).expect("manifest serialises");
    let d = digest(&v);
    if let serde_json::Value::Object(o) = &mut v {
        o.insert(DIGEST_FIELD.into(), serde_json::Value::String(d));
    }
    serde_json::to_vec_pretty(&v).expect("manifest serialises")
}

/// The content hash of a `dir` output: over (name, hash) of its files, in order.
pub fn dir_hash(files: &[FileEntry]) -> String {
    let mut h = blake3::Hasher::new();
    for e in files {
        h.update(e.name.as_bytes());
        h.update(b"\0");
        h.update(e.hash.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}
