//! The content-addressed store under `artifacts/`:
//!
//! ```text
//! objects/ab/abcdef….parquet   immutable files, named by the blake3 of their bytes
//! manifests/ab/<key>.json      one per stage run: outputs, hashes, schema, rows, timings
//! refs/<pipeline>/<stage>      the key of the latest run of a stage in a pipeline
//! logs/<key>.log               per-stage-run logs
//! out/<pipeline>/<stage>/…     symlinks to the latest outputs, for duckdb/pandas users
//! tmp/                         staging directories of runs in progress
//! ```
//!
//! A run writes its outputs into `tmp/`, then `commit` hashes and fsyncs each file, renames it
//! into `objects/`, and writes the manifest last (temp file, fsync, rename). A manifest is
//! therefore only ever visible for complete outputs, and nothing is deleted on the way.

pub mod diff;
mod lock;
mod manifest;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use lock::StoreLock;
pub use manifest::{FileEntry, Manifest, OutputRecord};

use crate::error::{EngineError, Result};

/// Bumped when the layout or the key encoding changes; part of every key.
pub const STORE_FORMAT: u32 = 1;

pub struct Store {
    pub root: PathBuf,
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
    let mut h = blake3::Hasher::new();
    let meta = fs::metadata(path)
        .map_err(|e| EngineError::io(format!("reading {}", path.display()), e))?;
    // Small files: plain read (mmap setup costs more than it saves).
    if meta.len() < 1 << 20 {
        let bytes = fs::read(path)
            .map_err(|e| EngineError::io(format!("reading {}", path.display()), e))?;
        h.update(&bytes);
    } else {
        h.update_mmap_rayon(path)
            .map_err(|e| EngineError::io(format!("hashing {}", path.display()), e))?;
    }
    Ok(h.finalize().to_hex().to_string())
}

fn io<T>(r: std::io::Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| EngineError::io(what(), e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    io(File::open(dir).and_then(|d| d.sync_all()), || {
        format!("syncing {}", dir.display())
    })
}

/// Writes `bytes` to `path` so that readers see the old file or the whole new one.
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
    {
        let mut f = io(File::create(&tmp), || format!("creating {}", tmp.display()))?;
        io(f.write_all(bytes), || format!("writing {}", tmp.display()))?;
        io(f.sync_all(), || format!("syncing {}", tmp.display()))?;
    }
    io(fs::rename(&tmp, path), || {
        format!("renaming into {}", path.display())
    })?;
    sync_dir(dir)
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

impl Store {
    pub fn open(root: &Path) -> Result<Store> {
        for d in ["objects", "manifests", "refs", "logs", "out", "tmp"] {
            let p = root.join(d);
            io(fs::create_dir_all(&p), || {
                format!("creating store directory {}", p.display())
            })?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// Opens an existing store without creating anything (read-only commands).
    pub fn existing(root: &Path) -> Result<Store> {
        if !root.join("manifests").is_dir() {
            return Err(EngineError::Store {
                path: root.to_path_buf(),
                message: "no store here yet: run a pipeline first (flag run PIPELINE)".into(),
            });
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn lock(&self, wait: bool, on_wait: impl Fn(&str)) -> Result<StoreLock> {
        StoreLock::acquire(&self.root, wait, on_wait)
    }

    pub fn object_path(&self, f: &FileEntry) -> PathBuf {
        let ext = Path::new(&f.name)
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        self.root
            .join("objects")
            .join(&f.hash[..2])
            .join(format!("{}{ext}", f.hash))
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
        self.root
            .join("manifests")
            .join(&key[..2])
            .join(format!("{key}.json"))
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.root.join("logs").join(format!("{key}.log"))
    }

    /// The manifest for a key, if a complete run with that key was committed.
    pub fn lookup(&self, key: &str) -> Result<Option<Manifest>> {
        let p = self.manifest_path(key);
        match fs::read(&p) {
            Ok(bytes) => match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) if m.key == key => Ok(Some(m)),
                // An unreadable manifest is treated as absent (and replaced by the rerun).
                _ => Ok(None),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EngineError::io(format!("reading {}", p.display()), e)),
        }
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
            let mut h = blake3::Hasher::new();
            for e in &entries {
                h.update(e.name.as_bytes());
                h.update(b"\0");
                h.update(e.hash.as_bytes());
                h.update(b"\n");
            }
            h.finalize().to_hex().to_string()
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
    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(m).expect("manifest serialises");
        write_atomic(&self.manifest_path(&m.key), &bytes)
    }

    pub fn set_ref(&self, pipeline: &str, stage: &str, key: &str) -> Result<()> {
        write_atomic(
            &self.root.join("refs").join(pipeline).join(stage),
            key.as_bytes(),
        )?;
        write_atomic(&self.root.join("refs").join("LAST"), pipeline.as_bytes())
    }

    pub fn get_ref(&self, pipeline: &str, stage: &str) -> Option<String> {
        fs::read_to_string(self.root.join("refs").join(pipeline).join(stage))
            .ok()
            .map(|s| s.trim().to_string())
    }

    pub fn last_pipeline(&self) -> Option<String> {
        fs::read_to_string(self.root.join("refs").join("LAST"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Every (pipeline, stage, key) ref.
    pub fn refs(&self) -> Result<Vec<(String, String, String)>> {
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

    /// Every committed manifest.
    pub fn manifests(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        let dir = self.root.join("manifests");
        for sub in io(fs::read_dir(&dir), || format!("listing {}", dir.display()))?.flatten() {
            for f in io(fs::read_dir(sub.path()), || {
                format!("listing {}", sub.path().display())
            })?
            .flatten()
            {
                let p = f.path();
                if p.extension().is_some_and(|e| e == "json")
                    && let Ok(bytes) = fs::read(&p)
                    && let Ok(m) = serde_json::from_slice::<Manifest>(&bytes)
                {
                    out.push(m);
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Points `out/<path>` at the latest outputs (symlinks into objects/).
    pub fn publish(&self, m: &Manifest, paths: &BTreeMap<String, String>) -> Result<()> {
        for (name, rel) in paths {
            let Some(out) = m.outputs.get(name) else {
                continue;
            };
            let dest = self.root.join("out").join(rel);
            let parent = dest.parent().unwrap().to_path_buf();
            io(fs::create_dir_all(&parent), || {
                format!("creating {}", parent.display())
            })?;
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

/// Row count and (column, type) list of a Parquet file, from its footer.
fn parquet_summary(path: &Path) -> Result<(u64, Vec<(String, String)>)> {
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
    Ok((rows, schema))
}
