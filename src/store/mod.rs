//! The content-addressed store under `artifacts/`:
//!
//! ```text
//! objects/ab/abcdef….parquet   immutable files, named by the blake3 of their bytes
//! manifests/ab/<key>.json      one per stage run: outputs, hashes, schema, rows, timings
//! refs/<pipeline>/<stage>      the key of the latest run of a stage in a pipeline
//! logs/<key>.log               per-stage-run logs
//! out/<pipeline>/<stage>/…     symlinks to the latest outputs, for duckdb/pandas users
//! tmp/                         staging directories of runs in progress
//! flag-store                   the marker: "flag store\nformat <STORE_FORMAT>"
//! ```
//!
//! A folder is used as a store only when it is new or empty (the marker is then written), has
//! the marker, or is a store made before the marker existed (the store's folders and lock file
//! and nothing else; it gets the marker). Everything else is refused: gc and the staging
//! cleanup delete files, and only ever files named the way the store names its own.
//!
//! A run writes its outputs into `tmp/`, then `commit` hashes and fsyncs each file, renames it
//! into `objects/`, and writes the manifest last (temp file, fsync, rename). A manifest is
//! therefore only ever visible for complete outputs, and nothing is deleted on the way.

pub mod diff;
mod lease;
mod lock;
mod manifest;
pub mod remote;
pub mod sync;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use lock::StoreLock;
use manifest::{DIGEST_FIELD, dir_hash};
pub use manifest::{FileEntry, Manifest, OutputRecord};

use crate::error::{EngineError, Result};

/// Bumped when the layout or the key encoding changes; part of every key.
pub const STORE_FORMAT: u32 = 1;

pub struct Store {
    /// The store's folder; for a store on object storage, the local copy it works in.
    pub root: PathBuf,
    /// The bucket of `--store s3://…`, the store of record (see `remote.rs`, `sync.rs`).
    remote: Option<Arc<remote::Remote>>,
    /// Whether this run still holds the bucket's lease (set by `lock`).
    lease: Mutex<Option<lease::LeaseCheck>>,
}

/// A stored object whose bytes no longer match its name.
#[derive(Debug, Clone)]
pub struct Corruption {
    pub path: PathBuf,
    pub expected: String,
    /// None when the object is missing.
    pub actual: Option<String>,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.actual {
            Some(a) => write!(
                f,
                "{} is corrupted (content hash {}, expected {})",
                self.path.display(),
                short(a),
                short(&self.expected)
            ),
            None => write!(f, "{} is missing", self.path.display()),
        }
    }
}

pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

pub fn hash_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut h = blake3::Hasher::new();
    let mut f =
        File::open(path).map_err(|e| EngineError::io(format!("reading {}", path.display()), e))?;
    // Read in bounded chunks, each hashed on all cores: memory stays at one chunk whatever the
    // file's size (a mapping of the whole file would count every page of it as resident).
    let len = f.metadata().map(|m| m.len()).unwrap_or(HASH_CHUNK as u64);
    let mut buf = vec![0u8; (len as usize).saturating_add(1).min(HASH_CHUNK)];
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(EngineError::io(format!("hashing {}", path.display()), e)),
            }
        }
        if n == 0 {
            break;
        }
        if n >= 1 << 20 {
            h.update_rayon(&buf[..n]);
        } else {
            h.update(&buf[..n]);
        }
        if n < buf.len() {
            break;
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Bytes read and hashed at a time by [`hash_file`].
const HASH_CHUNK: usize = 16 << 20;

fn io<T>(r: std::io::Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| EngineError::io(what(), e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    io(File::open(dir).and_then(|d| d.sync_all()), || {
        format!("syncing {}", dir.display())
    })
}

/// Writes `bytes` to `path` so that readers see the old file or the whole new one. The temp
/// file beside the target (`.<name>.<pid>.<n>.tmp`) is removed when the write fails (a full
/// disk); one left by a killed run is removed by `gc` (see `clean_write_temps`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("path has a parent");
    io(fs::create_dir_all(dir), || {
        format!("creating {}", dir.display())
    })?;
    static N: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = io(File::create(&tmp), || format!("creating {}", tmp.display()))?;
        io(f.write_all(bytes), || format!("writing {}", tmp.display()))?;
        io(f.sync_all(), || format!("syncing {}", tmp.display()))?;
        drop(f);
        io(fs::rename(&tmp, path), || {
            format!("renaming into {}", path.display())
        })
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

/// A temp file of `write_atomic`: `.<name>.<pid>.<n>.tmp`.
fn is_write_temp(file: &str) -> bool {
    let Some(inner) = file.strip_prefix('.').and_then(|f| f.strip_suffix(".tmp")) else {
        return false;
    };
    let mut parts = inner.rsplitn(3, '.');
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(n), Some(pid), Some(name))
            if !name.is_empty()
                && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
    )
}

/// Files of a staged output: (relative name, absolute path), sorted by name.
fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let mut entries: Vec<_> = io(fs::read_dir(dir), || format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, base, out)?;
        } else {
            let rel = p
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, p));
        }
    }
    Ok(())
}

/// The file that makes a folder a store, written when the store is created: the engine
/// deletes files under `tmp/`, `objects/` and `logs/`, so it never does that in a folder it
/// cannot recognise as its own.
pub const MARKER: &str = "flag-store";

/// A running stage's log, inside its staging directory (output names never start with '.').
const RUN_LOG: &str = ".flag-run.log";

/// The folders of a store.
const LAYOUT: &[&str] = &["objects", "manifests", "refs", "logs", "out", "tmp"];

/// What the project keeps in its default store folder `artifacts/` beside the store
/// (`just bench` writes `artifacts/bench/`); the store never deletes there.
const BESIDE: &[&str] = &["bench"];

/// The format a marker's text names, if it is a marker.
fn marker_format(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("format "))
        .and_then(|v| v.trim().parse::<u32>().ok())
}

fn marker_text() -> String {
    format!("flag store\nformat {STORE_FORMAT}\n")
}

fn not_a_store(root: &Path, why: String) -> EngineError {
    EngineError::Store {
        path: root.to_path_buf(),
        message: format!(
            "not a flag store: {why}. A store deletes files under its tmp/, objects/ and logs/, \
             so flag uses only an empty or new folder, or one it created (it has a '{MARKER}' \
             file); choose another --store"
        ),
    }
}

/// What a folder is, as far as the store is concerned.
enum Found {
    /// Missing, or an empty folder: a new store may be made here.
    Nothing,
    /// A store: it has the marker, of this format.
    Store,
    /// A store made before the marker existed: the store's layout and nothing else.
    Unmarked,
}

/// Is `n` lowercase hex of length `len` (or any length when `len` is 0)?
pub(crate) fn is_hex(n: &str, len: usize) -> bool {
    (len == 0 || n.len() == len)
        && !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An object the store wrote: `objects/<2 hex>/<64 hex>[.ext]`, the name starting with its
/// folder's two characters.
pub fn is_object_name(dir: &str, file: &str) -> bool {
    let hash = file.split_once('.').map_or(file, |(h, _)| h);
    is_hex(dir, 2) && is_hex(hash, 64) && hash.starts_with(dir)
}

/// The key of a log the store wrote: `logs/<64 hex key>.log`, or Slurm's own output of that
/// run's batch job, `logs/<64 hex key>.slurm.log`, each also as `<key>.failed.*` (a failed
/// run's, kept beside a complete run's); None for any other file.
pub fn log_key(file: &str) -> Option<&str> {
    let stem = file.strip_suffix(".log")?;
    let stem = stem.strip_suffix(".slurm").unwrap_or(stem);
    let key = stem.strip_suffix(".failed").unwrap_or(stem);
    is_hex(key, 64).then_some(key)
}

/// A staging folder the store made: `tmp/<first 12 characters of a key>.<pid>.<n>` (see
/// `staging_dir`; recompute's keys start with `recompute-`).
fn is_staging_name(name: &str) -> bool {
    let mut parts = name.split('.');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(k), Some(pid), Some(n), None)
            if !k.is_empty() && k.len() <= 12
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
                && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    )
}

fn inspect(root: &Path) -> Result<Found> {
    let marker = root.join(MARKER);
    if marker.is_file() {
        let text = io(fs::read_to_string(&marker), || {
            format!("reading {}", marker.display())
        })?;
        return match marker_format(&text) {
            Some(STORE_FORMAT) => Ok(Found::Store),
            Some(other) => Err(EngineError::Store {
                path: root.to_path_buf(),
                message: format!(
                    "a store of format {other}; this flag reads format {STORE_FORMAT}"
                ),
            }),
            None => Err(not_a_store(
                root,
                format!("{} is not a store marker", marker.display()),
            )),
        };
    }
    if !root.exists() {
        return Ok(Found::Nothing);
    }
    if !root.is_dir() {
        return Err(not_a_store(root, "it is not a folder".into()));
    }
    let mut names = Vec::new();
    for e in io(fs::read_dir(root), || format!("listing {}", root.display()))? {
        let e = io(e, || format!("listing {}", root.display()))?;
        names.push(e.file_name().to_string_lossy().to_string());
    }
    if names.is_empty() {
        return Ok(Found::Nothing);
    }
    // Migration of stores made before the marker: the store's own folders (objects/,
    // manifests/ and refs/ at least) and its lock file, and nothing else.
    let foreign: Vec<&String> = names
        .iter()
        .filter(|n| {
            let ours = LAYOUT.contains(&n.as_str())
                || BESIDE.contains(&n.as_str())
                || n.as_str() == ".lock"
                // A marker being written by `write_atomic` when a run was killed.
                || (n.starts_with(&format!(".{MARKER}.")) && n.ends_with(".tmp"));
            !ours
        })
        .collect();
    let missing: Vec<&str> = ["objects", "manifests", "refs"]
        .into_iter()
        .filter(|d| !root.join(d).is_dir())
        .collect();
    let has_layout = missing.is_empty();
    if foreign.is_empty() && has_layout {
        return Ok(Found::Unmarked);
    }
    if foreign.is_empty() && !names.iter().any(|n| LAYOUT.contains(&n.as_str())) {
        // Only a lock file or a half-written marker: a store whose creation was cut short.
        return Ok(Found::Nothing);
    }
    let mut shown: Vec<String> = foreign.iter().take(3).map(|n| format!("'{n}'")).collect();
    if foreign.len() > 3 {
        shown.push(format!("and {} more", foreign.len() - 3));
    }
    Err(not_a_store(
        root,
        if foreign.is_empty() {
            format!(
                "the folder is not empty, has no '{MARKER}' file and lacks the store's {}",
                missing
                    .iter()
                    .map(|d| format!("{d}/"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "the folder is not empty and has no '{MARKER}' file (it holds {})",
                shown.join(", ")
            )
        },
    ))
}

impl Store {
    /// Opens the store at `root`, creating it in a new or empty folder. A non-empty folder
    /// that is not a store is refused, before anything is written or deleted there.
    pub fn open(root: &Path) -> Result<Store> {
        if !matches!(inspect(root)?, Found::Store) {
            // The marker first: a run killed right after it leaves a store, not a folder
            // of unknown folders.
            write_atomic(&root.join(MARKER), marker_text().as_bytes())?;
        }
        for d in LAYOUT {
            let p = root.join(d);
            io(fs::create_dir_all(&p), || {
                format!("creating store directory {}", p.display())
            })?;
        }
        Ok(Store::local(root))
    }

    fn local(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
            remote: None,
            lease: Mutex::new(None),
        }
    }

    /// Opens an existing store without creating anything (read-only commands, and gc), except
    /// the marker of a store made before markers existed (when the folder is writable).
    pub fn existing(root: &Path) -> Result<Store> {
        match inspect(root)? {
            Found::Nothing => {
                return Err(EngineError::Store {
                    path: root.to_path_buf(),
                    message: "no store here yet: run a pipeline first (flag run PIPELINE)".into(),
                });
            }
            Found::Unmarked => {
                let _ = write_atomic(&root.join(MARKER), marker_text().as_bytes());
            }
            Found::Store => {}
        }
        if !root.join("manifests").is_dir() {
            return Err(EngineError::Store {
                path: root.to_path_buf(),
                message: "no store here yet: run a pipeline first (flag run PIPELINE)".into(),
            });
        }
        Ok(Store::local(root))
    }

    /// The bucket, for a store on object storage.
    pub fn remote(&self) -> Option<&remote::Remote> {
        self.remote.as_deref()
    }

    /// Where the store is, for messages: its folder or its URL.
    pub fn location(&self) -> String {
        match &self.remote {
            Some(r) => r.url.as_url(),
            None => self.root.display().to_string(),
        }
    }

    /// One writer per store: the file lock of the local folder and, for a store on object
    /// storage, the bucket's lease.
    pub fn lock(&self, wait: bool, on_wait: impl Fn(&str)) -> Result<StoreLock> {
        let mut lock = StoreLock::acquire(&self.root, wait, &on_wait)?;
        if let Some(r) = &self.remote {
            let lease = lease::Lease::acquire(r.clone(), lock::holder_text(), wait, &on_wait)?;
            *self.lease.lock().unwrap() = Some(lease.check());
            lock.lease = Some(lease);
        }
        Ok(lock)
    }

    /// Whether this run took the bucket's lease and still holds it.
    fn holds_lease(&self) -> bool {
        match &*self.lease.lock().unwrap() {
            Some(check) => check.ensure_held().is_ok(),
            None => false,
        }
    }

    /// Gives the bucket's lease back at once (Ctrl-C); nothing for a local store, whose file
    /// lock the OS drops with the process.
    pub fn release_lease(&self) {
        if let Some(check) = &*self.lease.lock().unwrap() {
            check.release();
        }
    }

    /// For a store on object storage: fails unless this run holds the bucket's lease.
    pub fn ensure_lease(&self) -> Result<()> {
        match &*self.lease.lock().unwrap() {
            Some(check) => check.ensure_held(),
            None => Ok(()),
        }
    }

    pub fn object_path(&self, f: &FileEntry) -> PathBuf {
        self.root.join(sync::object_rel(f))
    }

    /// Target of a link at `link` (relative to the store root) to `f`'s object, relative to
    /// the link's directory: it resolves whatever the store path was given as (a relative
    /// `./artifacts` made absolute-looking targets dangle) and survives moving the store.
    fn link_target(&self, f: &FileEntry, link: &Path) -> PathBuf {
        let depth = link.parent().map_or(0, |p| p.components().count());
        let mut t = PathBuf::new();
        for _ in 0..depth {
            t.push("..");
        }
        let object = self.object_path(f);
        t.join(object.strip_prefix(&self.root).unwrap_or(&object))
    }

    fn manifest_path(&self, key: &str) -> PathBuf {
        self.root.join(sync::manifest_rel(key))
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.root.join("logs").join(format!("{key}.log"))
    }

    /// Where a failed run's log is kept while a complete run with the same key is stored
    /// (a failed `--force` rerun): `logs/<key>.failed.log`, so the kept run's log stays.
    pub fn failed_log_path(&self, key: &str) -> PathBuf {
        self.root.join("logs").join(format!("{key}.failed.log"))
    }

    /// The log a stage run writes while it runs: a new file inside its own staging
    /// directory. Nothing the run writes goes through a path that was there before it (a
    /// symlink planted at `logs/<key>.log` is never followed); `keep_run_log` moves it into
    /// `logs/` when the run ends. None if the file cannot be made.
    pub fn new_run_log(&self, staging: &Path) -> Option<PathBuf> {
        let p = staging.join(RUN_LOG);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .ok()
            .map(|_| p)
    }

    /// Moves a run's log (and Slurm's output of its batch job, if any) from its staging
    /// directory into `logs/` and returns where it went: `logs/<key>.log`, or, when the run
    /// failed while a complete run with this key is stored, `logs/<key>.failed.log`. A rename
    /// replaces whatever entry is at the destination (a symlink included) without writing
    /// through it.
    pub fn keep_run_log(&self, staging: &Path, key: &str, failed: bool) -> PathBuf {
        let keep_stored = failed && self.manifest_path(key).exists();
        let dest = if keep_stored {
            self.failed_log_path(key)
        } else {
            self.log_path(key)
        };
        let run_log = staging.join(RUN_LOG);
        for (from, to) in [
            (
                run_log.with_extension("slurm.log"),
                dest.with_extension("slurm.log"),
            ),
            (run_log, dest.clone()),
        ] {
            if from.is_file() {
                let _ = fs::rename(&from, &to);
            }
        }
        dest
    }

    /// The manifest for a key, if a complete run with that key was committed. A manifest that
    /// is there but damaged (unparsable, edited, stored under another key, or naming tables
    /// that are not its outputs') is an error naming its file: it must never read as a
    /// complete run.
    pub fn lookup(&self, key: &str) -> Result<Option<Manifest>> {
        if !is_hex(key, 64) {
            return Ok(None);
        }
        if let Some(r) = &self.remote
            && !self.sync_run(r, key)?
        {
            return Ok(None);
        }
        let p = self.manifest_path(key);
        let read = match self.read_manifest(&p) {
            // Its objects' tables too (footers only; their bytes are hashed by `verify`).
            Ok(ManifestRead::Ok(m)) => match self.check_objects(&m) {
                problems if problems.is_empty() => Ok(ManifestRead::Ok(m)),
                problems => Ok(ManifestRead::Damaged {
                    manifest: Some(m),
                    problems,
                }),
            },
            other => other,
        };
        match read {
            Ok(ManifestRead::Ok(m)) => Ok(Some(m)),
            Ok(ManifestRead::Damaged { problems, .. }) => Err(EngineError::Store {
                path: self.root.clone(),
                message: format!(
                    "damaged manifest {}: {}. `flag verify` reports and drops it; \
                     `flag run --force` recomputes the stage",
                    p.display(),
                    problems.join("; ")
                ),
            }),
            Err(EngineError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The manifest of `key` without its objects (for explaining why a stage reruns): on
    /// object storage it is read from the bucket and nothing is downloaded.
    pub fn peek(&self, key: &str) -> Option<Manifest> {
        if !is_hex(key, 64) {
            return None;
        }
        let read = match &self.remote {
            Some(r) => {
                let f = r.get_small(&sync::manifest_rel(key)).ok()??;
                check_manifest(&f.bytes, &key[..2], &format!("{key}.json"))
            }
            None => self.read_manifest(&self.manifest_path(key)).ok()?,
        };
        match read {
            ManifestRead::Ok(m) => Some(m),
            ManifestRead::Damaged { .. } => None,
        }
    }

    /// Reads and checks one manifest file: it parses, its digest matches its contents, it is
    /// stored under its own key, its key is the hash of its key parts, and its outputs are
    /// consistent (each output's hash is its files' hash; names stay inside the output).
    /// Objects are not read here (see `verify` and `check_objects`).
    pub fn read_manifest(&self, path: &Path) -> Result<ManifestRead> {
        let bytes = io(fs::read(path), || format!("reading {}", path.display()))?;
        let stem = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let dir = path
            .parent()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        Ok(check_manifest(&bytes, &dir, &stem))
    }
}

/// The checks of `Store::read_manifest` on a manifest's bytes, stored as `<dir>/<stem>`.
pub fn check_manifest(bytes: &[u8], dir: &str, stem: &str) -> ManifestRead {
    {
        let damaged = |manifest: Option<Manifest>, problems: Vec<String>| ManifestRead::Damaged {
            manifest,
            problems,
        };
        let value: serde_json::Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => return damaged(None, vec![format!("not valid JSON ({e})")]),
        };
        let mut problems = Vec::new();
        match value.get(DIGEST_FIELD) {
            // Every manifest flag writes has one; without it an edit (say, outputs pointed at
            // another intact object of the same schema) would go unseen.
            None => problems.push(format!(
                "it has no '{DIGEST_FIELD}' (flag writes one into every manifest; it was edited)"
            )),
            Some(serde_json::Value::String(d)) if *d != manifest::digest(&value) => {
                problems.push(
                    "its contents do not match its digest (it was changed after it was written)"
                        .to_string(),
                );
            }
            Some(serde_json::Value::String(_)) => {}
            Some(_) => problems.push("its digest is not a string".into()),
        }
        let m: Manifest = match serde_json::from_value(value) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("not a manifest ({e})"));
                return damaged(None, problems);
            }
        };
        if !is_hex(&m.key, 64) {
            problems.push(format!("its key '{}' is not a key", m.key.escape_debug()));
        } else if stem != format!("{}.json", m.key) || dir != &m.key[..2] {
            problems.push(format!(
                "it records key {} but is stored as {dir}/{stem}",
                short(&m.key)
            ));
        }
        match serde_json::from_value::<crate::cache::KeyParts>(m.parts.clone()) {
            Ok(parts) => {
                let k = parts.key();
                if k != m.key {
                    problems.push(format!(
                        "its key parts hash to {}, not to its key {}",
                        short(&k),
                        short(&m.key)
                    ));
                }
                if parts.kind != m.kind {
                    problems.push(format!(
                        "it records kind '{}' but its key parts say '{}'",
                        m.kind, parts.kind
                    ));
                }
            }
            Err(e) => problems.push(format!("its key parts do not parse ({e})")),
        }
        for (name, out) in &m.outputs {
            problems.extend(
                check_output(out)
                    .into_iter()
                    .map(|p| format!("output '{name}': {p}")),
            );
        }
        if problems.is_empty() {
            ManifestRead::Ok(m)
        } else {
            damaged(Some(m), problems)
        }
    }
}

impl Store {
    /// Every file under `manifests/`, except `write_atomic`'s temp files: (path, named the
    /// way the store names manifests).
    pub fn manifest_files(&self) -> Result<Vec<(PathBuf, bool)>> {
        let mut out = Vec::new();
        let dir = self.root.join("manifests");
        for sub in io(fs::read_dir(&dir), || format!("listing {}", dir.display()))?.flatten() {
            let sub_name = sub.file_name().to_string_lossy().to_string();
            if !sub.path().is_dir() {
                out.push((sub.path(), false));
                continue;
            }
            for f in io(fs::read_dir(sub.path()), || {
                format!("listing {}", sub.path().display())
            })?
            .flatten()
            {
                let name = f.file_name().to_string_lossy().to_string();
                if is_write_temp(&name) {
                    continue;
                }
                let ours = name
                    .strip_suffix(".json")
                    .is_some_and(|k| is_hex(k, 64) && k.starts_with(&sub_name))
                    && is_hex(&sub_name, 2)
                    && f.path().is_file();
                out.push((f.path(), ours));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a manifest file (verify's repair: the stage is recomputed by the next run).
    pub fn drop_manifest(&self, path: &Path) -> Result<()> {
        io(fs::remove_file(path), || {
            format!("removing {}", path.display())
        })
    }

    /// Checks that each Parquet object a manifest names is the table its output records: the
    /// footer's columns and types and row count equal the manifest's, and the columns match the
    /// schema the stage declared for that output (found by the schema hash in its key parts;
    /// skipped when this build has no schema of that hash). Objects that are missing or
    /// unreadable are left to `verify`'s hash check.
    pub fn check_objects(&self, m: &Manifest) -> Vec<String> {
        let declared: BTreeMap<String, String> = m
            .parts
            .get("schemas")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .unwrap_or_default();
        let registry = flag_core::SchemaRegistry::global();
        let mut problems = Vec::new();
        for (name, out) in &m.outputs {
            if out.kind != "parquet" || out.files.len() != 1 || !is_hex(&out.files[0].hash, 64) {
                continue;
            }
            let path = self.object_path(&out.files[0]);
            if !path.is_file() {
                continue;
            }
            let Ok((rows, schema, arrow)) = parquet_footer(&path) else {
                continue;
            };
            let obj = format!("output '{name}': object {}", path.display());
            if out.rows != Some(rows) {
                problems.push(format!(
                    "{obj} has {rows} rows, the manifest records {}",
                    out.rows.map_or("none".into(), |r| r.to_string())
                ));
            }
            if let Some(d) = columns_differ(&schema, out.schema.as_deref().unwrap_or_default()) {
                problems.push(format!("{obj} {d}"));
            }
            if let Some(hash) = declared.get(name)
                && let Some(s) = registry.names().find_map(|n| {
                    let s = registry.get(n).ok()?;
                    (blake3::hash(s.source.as_bytes()).to_hex().as_str() == hash).then_some(s)
                })
                && let Err(e) = s.check(&arrow, &obj)
            {
                problems.push(format!("{e} (declared schema '{}')", s.name));
            }
        }
        problems
    }

    /// Re-hashes every object of a manifest.
    pub fn verify(&self, m: &Manifest) -> Result<Vec<Corruption>> {
        let mut bad = Vec::new();
        for out in m.outputs.values() {
            for f in &out.files {
                let p = self.object_path(f);
                if !p.exists() {
                    bad.push(Corruption {
                        path: p,
                        expected: f.hash.clone(),
                        actual: None,
                    });
                    continue;
                }
                let actual = hash_file(&p)?;
                if actual != f.hash {
                    bad.push(Corruption {
                        path: p,
                        expected: f.hash.clone(),
                        actual: Some(actual),
                    });
                }
            }
        }
        Ok(bad)
    }

    /// Drops corrupted objects and the manifest that trusted them, so the next lookup misses
    /// and the stage is recomputed. Other manifests sharing an object are re-verified on read.
    pub fn invalidate(&self, m: &Manifest, bad: &[Corruption]) -> Result<()> {
        for c in bad {
            if c.path.exists() {
                io(fs::remove_file(&c.path), || {
                    format!("removing {}", c.path.display())
                })?;
            }
        }
        let p = self.manifest_path(&m.key);
        if p.exists() {
            io(fs::remove_file(&p), || format!("removing {}", p.display()))?;
        }
        Ok(())
    }

    /// A fresh staging directory for one stage run.
    pub fn staging_dir(&self, key: &str) -> Result<PathBuf> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = self.root.join("tmp").join(format!(
            "{}.{}.{}",
            short(key),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        io(fs::create_dir_all(&p), || {
            format!("creating {}", p.display())
        })?;
        Ok(p)
    }

    /// Removes staging directories left by runs that died (called under the lock).
    pub fn clean_tmp(&self) -> Result<usize> {
        let dir = self.root.join("tmp");
        let mut n = 0;
        for e in io(fs::read_dir(&dir), || format!("listing {}", dir.display()))?.flatten() {
            // Only what `staging_dir` made.
            if !is_staging_name(&e.file_name().to_string_lossy()) {
                continue;
            }
            let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            n += 1;
        }
        Ok(n)
    }

    /// Moves one staged output's files into `objects/` and describes them.
    pub fn commit_output(
        &self,
        staging: &Path,
        name: &str,
        kind: &flag_core::OutputKind,
    ) -> Result<OutputRecord> {
        use flag_core::OutputKind;
        let (files, kind_name) = match kind {
            OutputKind::Parquet { .. } | OutputKind::File { .. } => {
                let ext = match kind {
                    OutputKind::Parquet { .. } => "parquet",
                    OutputKind::File { ext } => ext,
                    OutputKind::Dir => unreachable!(),
                };
                let fname = format!("{name}.{ext}");
                let p = staging.join(&fname);
                if !p.is_file() {
                    return Err(EngineError::Store {
                        path: p,
                        message: format!("the stage did not write its output '{name}'"),
                    });
                }
                let kn = if matches!(kind, OutputKind::Parquet { .. }) {
                    "parquet"
                } else {
                    "file"
                };
                (vec![(fname, p)], kn)
            }
            OutputKind::Dir => {
                let d = staging.join(name);
                if !d.is_dir() {
                    return Err(EngineError::Store {
                        path: d,
                        message: format!("the stage did not write its output directory '{name}'"),
                    });
                }
                let mut files = Vec::new();
                walk(&d, &d, &mut files)?;
                (files, "dir")
            }
        };
        let mut entries = Vec::new();
        let mut touched_dirs = Vec::new();
        for (rel, path) in files {
            // The stage may not have synced what it wrote; the object must be durable before
            // a manifest can point at it.
            io(File::open(&path).and_then(|f| f.sync_all()), || {
                format!("syncing {}", path.display())
            })?;
            let hash = hash_file(&path)?;
            let bytes = io(fs::metadata(&path), || {
                format!("reading {}", path.display())
            })?
            .len();
            let entry = FileEntry {
                name: rel,
                hash,
                bytes,
            };
            let dest = self.object_path(&entry);
            let parent = dest.parent().unwrap().to_path_buf();
            io(fs::create_dir_all(&parent), || {
                format!("creating {}", parent.display())
            })?;
            if dest.exists() {
                // Same bytes already stored (an identical rerun, or another output).
                let _ = fs::remove_file(&path);
            } else {
                // Objects are immutable: read-only on disk, so a tool writing into the store by
                // mistake (a `COPY ... TO`, an editor) is refused. Removing one (gc, verify)
                // needs only the folder's write permission.
                io(
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)),
                    || format!("making {} read-only", path.display()),
                )?;
                io(fs::rename(&path, &dest), || {
                    format!("storing {}", dest.display())
                })?;
                if !touched_dirs.contains(&parent) {
                    touched_dirs.push(parent);
                }
            }
            entries.push(entry);
        }
        for d in touched_dirs {
            sync_dir(&d)?;
        }
        let hash = if kind_name == "dir" {
            dir_hash(&entries)
        } else {
            entries[0].hash.clone()
        };
        let (rows, schema) = if kind_name == "parquet" {
            let (rows, schema) = parquet_summary(&self.object_path(&entries[0]))?;
            (Some(rows), Some(schema))
        } else {
            (None, None)
        };
        Ok(OutputRecord {
            kind: kind_name.to_string(),
            hash,
            files: entries,
            rows,
            schema,
        })
    }

    /// Writes a manifest; from this moment the run is visible as complete.
    /// On object storage, the objects, the log and then the manifest go up before this returns
    /// (see `sync.rs`).
    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let bytes = manifest::to_file_bytes(m);
        write_atomic(&self.manifest_path(&m.key), &bytes)?;
        if self.remote.is_some() {
            self.ensure_lease()?;
            self.push_run(self, m, &bytes)?;
        }
        Ok(())
    }

    pub fn set_ref(&self, pipeline: &str, stage: &str, key: &str) -> Result<()> {
        write_atomic(
            &self.root.join("refs").join(pipeline).join(stage),
            key.as_bytes(),
        )?;
        write_atomic(&self.root.join("refs").join("LAST"), pipeline.as_bytes())?;
        if let Some(r) = &self.remote {
            self.ensure_lease()?;
            sync::swap_ref(r, &format!("refs/{pipeline}/{stage}"), key)?;
            sync::swap_ref(r, "refs/LAST", pipeline)?;
        }
        Ok(())
    }

    /// The key of the latest run of `stage` in `pipeline`, if any (on object storage, as the
    /// bucket has it).
    pub fn get_ref(&self, pipeline: &str, stage: &str) -> Result<Option<String>> {
        let text = match &self.remote {
            Some(r) => r
                .get_small(&format!("refs/{pipeline}/{stage}"))?
                .map(|f| String::from_utf8_lossy(&f.bytes).to_string()),
            None => fs::read_to_string(self.root.join("refs").join(pipeline).join(stage)).ok(),
        };
        Ok(text
            .map(|s| s.trim().to_string())
            // A key is a blake3 hex digest; anything else would make a path of its text.
            .filter(|k| is_hex(k, 64)))
    }

    pub fn last_pipeline(&self) -> Result<Option<String>> {
        let text = match &self.remote {
            Some(r) => r
                .get_small("refs/LAST")?
                .map(|f| String::from_utf8_lossy(&f.bytes).to_string()),
            None => fs::read_to_string(self.root.join("refs").join("LAST")).ok(),
        };
        Ok(text.map(|s| s.trim().to_string()))
    }

    /// Every (pipeline, stage, key) ref.
    pub fn refs(&self) -> Result<Vec<(String, String, String)>> {
        if let Some(r) = &self.remote {
            return sync::remote_refs(r);
        }
        let mut out = Vec::new();
        let dir = self.root.join("refs");
        for p in io(fs::read_dir(&dir), || format!("listing {}", dir.display()))?.flatten() {
            if !p.path().is_dir() {
                continue;
            }
            for s in io(fs::read_dir(p.path()), || {
                format!("listing {}", p.path().display())
            })?
            .flatten()
            {
                let name = s.file_name().to_string_lossy().to_string();
                if name.starts_with('.') {
                    continue;
                }
                if let Ok(k) = fs::read_to_string(s.path()) {
                    out.push((
                        p.file_name().to_string_lossy().to_string(),
                        name,
                        k.trim().to_string(),
                    ));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every committed manifest that reads intact (see `read_manifest`; `flag verify` reports
    /// the others).
    pub fn manifests(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for (p, ours) in self.manifest_files()? {
            if ours && let ManifestRead::Ok(m) = self.read_manifest(&p)? {
                out.push(m);
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes the temp files `write_atomic` leaves beside a manifest, a ref or the marker
    /// when it is killed (a failed write removes its own). Called under the lock, when no
    /// write is in flight. Returns how many were removed.
    pub fn clean_write_temps(&self, dry_run: bool) -> Result<usize> {
        let mut dirs = vec![self.root.clone(), self.root.join("refs")];
        for top in ["manifests", "refs"] {
            let d = self.root.join(top);
            for e in io(fs::read_dir(&d), || format!("listing {}", d.display()))?.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        let mut n = 0;
        for d in dirs {
            for e in io(fs::read_dir(&d), || format!("listing {}", d.display()))?.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file())
                    && is_write_temp(&e.file_name().to_string_lossy())
                {
                    if !dry_run {
                        io(fs::remove_file(e.path()), || {
                            format!("removing {}", e.path().display())
                        })?;
                    }
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Makes (or finds) every folder from the store's root down to `dest`'s parent, as a real
    /// folder: one that is a symlink or a file is refused, naming it, because publishing
    /// through it would create and replace files outside the store.
    fn real_dirs_to(&self, dest: &Path) -> Result<PathBuf> {
        let parent = dest.parent().unwrap_or(&self.root);
        let rel = parent.strip_prefix(&self.root).unwrap_or(parent);
        let mut at = self.root.clone();
        for c in rel.components() {
            at.push(c);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(m) => {
                    return Err(EngineError::Store {
                        path: at.clone(),
                        message: format!(
                            "is a {} where the store keeps a folder of published outputs; \
                             flag does not publish through it (it could replace files \
                             outside the store): remove it and run again",
                            if m.file_type().is_symlink() {
                                "symlink"
                            } else {
                                "file"
                            }
                        ),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    io(
                        fs::create_dir(&at).or_else(|e| {
                            // Made meanwhile by another stage of this run.
                            if e.kind() == std::io::ErrorKind::AlreadyExists
                                && fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir())
                            {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        }),
                        || format!("creating {}", at.display()),
                    )?;
                }
                Err(e) => return Err(EngineError::io(format!("reading {}", at.display()), e)),
            }
        }
        Ok(parent.to_path_buf())
    }

    /// Points `out/<path>` at the latest outputs (symlinks into objects/).
    pub fn publish(&self, m: &Manifest, paths: &BTreeMap<String, String>) -> Result<()> {
        for (name, rel) in paths {
            let Some(out) = m.outputs.get(name) else {
                continue;
            };
            let dest = self.root.join("out").join(rel);
            let parent = self.real_dirs_to(&dest)?;
            if out.kind == "dir" {
                let tmp = parent.join(format!(
                    ".{}.{}.tmp",
                    dest.file_name().unwrap().to_string_lossy(),
                    std::process::id()
                ));
                let _ = fs::remove_dir_all(&tmp);
                for f in &out.files {
                    let link = tmp.join(&f.name);
                    io(fs::create_dir_all(link.parent().unwrap()), || {
                        format!("creating {}", tmp.display())
                    })?;
                    let at = Path::new("out").join(rel).join(&f.name);
                    io(
                        std::os::unix::fs::symlink(self.link_target(f, &at), &link),
                        || format!("linking {}", link.display()),
                    )?;
                }
                if dest.exists() || dest.symlink_metadata().is_ok() {
                    let _ = fs::remove_dir_all(&dest).or_else(|_| fs::remove_file(&dest));
                }
                io(fs::rename(&tmp, &dest), || {
                    format!("publishing {}", dest.display())
                })?;
            } else {
                let tmp = parent.join(format!(
                    ".{}.{}.tmp",
                    dest.file_name().unwrap().to_string_lossy(),
                    std::process::id()
                ));
                let _ = fs::remove_file(&tmp);
                let at = Path::new("out").join(rel);
                io(
                    std::os::unix::fs::symlink(self.link_target(&out.files[0], &at), &tmp),
                    || format!("linking {}", tmp.display()),
                )?;
                io(fs::rename(&tmp, &dest), || {
                    format!("publishing {}", dest.display())
                })?;
            }
        }
        Ok(())
    }
}

/// What a manifest file holds.
pub enum ManifestRead {
    Ok(Manifest),
    /// Unparsable (`manifest` None), or parsed but inconsistent; each problem in words.
    Damaged {
        manifest: Option<Manifest>,
        problems: Vec<String>,
    },
}

/// How a table's (column, type) list differs from the one a manifest records, in words.
fn columns_differ(got: &[(String, String)], recorded: &[(String, String)]) -> Option<String> {
    if got == recorded {
        return None;
    }
    let show = |c: Option<&(String, String)>| {
        c.map_or("nothing".to_string(), |(n, t)| format!("'{n}' ({t})"))
    };
    let i = got
        .iter()
        .zip(recorded)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(recorded.len()));
    Some(format!(
        "has {} columns, the manifest records {}; column {} is {}, the manifest records {}",
        got.len(),
        recorded.len(),
        i + 1,
        show(got.get(i)),
        show(recorded.get(i))
    ))
}

/// The problems of one output record on its own (without reading objects).
fn check_output(out: &OutputRecord) -> Vec<String> {
    let mut problems = Vec::new();
    for f in &out.files {
        if !is_hex(&f.hash, 64) {
            problems.push(format!(
                "file '{}': '{}' is not a content hash",
                f.name.escape_debug(),
                f.hash.escape_debug()
            ));
        }
        let path = Path::new(&f.name);
        if f.name.is_empty()
            || path.is_absolute()
            || !path
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            problems.push(format!(
                "file name '{}' is not a relative path inside the output",
                f.name.escape_debug()
            ));
        }
    }
    match out.kind.as_str() {
        "parquet" | "file" => {
            if out.files.len() != 1 {
                problems.push(format!(
                    "a {} output has {} files, not 1",
                    out.kind,
                    out.files.len()
                ));
            } else if out.hash != out.files[0].hash {
                problems.push(format!(
                    "its hash {} is not its file's hash {}",
                    short(&out.hash),
                    short(&out.files[0].hash)
                ));
            }
            if out.kind == "parquet" && (out.rows.is_none() || out.schema.is_none()) {
                problems.push("a parquet output without rows and schema".into());
            }
        }
        "dir" => {
            let h = dir_hash(&out.files);
            if out.hash != h {
                problems.push(format!(
                    "its hash {} is not the hash of its files' names and hashes ({})",
                    short(&out.hash),
                    short(&h)
                ));
            }
        }
        other => problems.push(format!("unknown output kind '{}'", other.escape_debug())),
    }
    problems
}

/// A Parquet footer's row count, (column, type) list and Arrow schema.
type Footer = (
    u64,
    Vec<(String, String)>,
    flag_core::arrow::datatypes::SchemaRef,
);

/// Row count, (column, type) list and Arrow schema of a Parquet file, from its footer.
fn parquet_footer(path: &Path) -> Result<Footer> {
    use flag_core::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let f = io(File::open(path), || format!("reading {}", path.display()))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| EngineError::Store {
        path: path.to_path_buf(),
        message: format!("not a readable Parquet file: {e}"),
    })?;
    let rows = b.metadata().file_metadata().num_rows() as u64;
    let schema = b
        .schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().to_string()))
        .collect();
    Ok((rows, schema, b.schema().clone()))
}

/// Row count and (column, type) list of a Parquet file, from its footer.
fn parquet_summary(path: &Path) -> Result<(u64, Vec<(String, String)>)> {
    parquet_footer(path).map(|(rows, schema, _)| (rows, schema))
}
