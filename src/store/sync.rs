//! A store on object storage and its local copy: what is pulled, what is pushed, and when.
//!
//! The bucket is the store of record; the local copy (under `$FLAG_STORE_CACHE`, by default
//! `$FLAG_CACHE/stores/<hash of endpoint and URL>`) is where stages read and write files, and is
//! a cache: deleting it loses nothing.
//! - `lookup(key)` reads the bucket's manifest; when it is there, the objects it names are
//!   downloaded into the local copy (each hashed while it streams, and refused if its hash is
//!   not its name) before the manifest is written locally, so a local manifest always has its
//!   objects. A run committed locally but missing in the bucket (collected there, or its push
//!   cut short) is pushed when this run holds the lease.
//! - `write_manifest` pushes the objects (conditional create), then the log, then the manifest
//!   (conditional create); `set_ref` swaps the ref with `If-Match`. A push cut short leaves
//!   objects that no manifest names yet (invisible, collected by `flag gc`), never a manifest
//!   without its objects.
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::remote::{Created, Remote, S3Url};
use super::{
    FileEntry, MARKER, Manifest, ManifestRead, STORE_FORMAT, Store, check_manifest, io,
    marker_format, marker_text, sync_dir, write_atomic,
};
use crate::error::{EngineError, Result};

/// `manifests/ab/<key>.json`
pub fn manifest_rel(key: &str) -> String {
    format!("manifests/{}/{key}.json", &key[..2])
}

/// `objects/ab/<hash>[.ext]`
pub fn object_rel(f: &FileEntry) -> String {
    let ext = Path::new(&f.name)
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    format!("objects/{}/{}{ext}", &f.hash[..2], f.hash)
}

/// The local copy of a store on object storage: `$FLAG_STORE_CACHE`, else
/// `$FLAG_CACHE/stores`, else `~/.cache/flag/stores`; one folder per endpoint and URL.
pub fn local_copy_dir(url: &S3Url) -> PathBuf {
    let base = std::env::var_os("FLAG_STORE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("FLAG_CACHE").map(|c| PathBuf::from(c).join("stores")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".cache/flag/stores")
        });
    // The endpoint is part of the name (two servers may both have a bucket `data`); it is an
    // address, not a credential.
    let endpoint = super::remote::env_endpoint().unwrap_or_default();
    let id = blake3::hash(format!("{endpoint}\n{}", url.as_url()).as_bytes()).to_hex();
    let readable: String = format!("{}-{}", url.bucket, url.prefix.replace('/', "-"))
        .chars()
        .take(40)
        .collect();
    base.join(format!("{}-{}", readable.trim_end_matches('-'), &id[..16]))
}

/// Sets a ref (or `refs/LAST`) in the bucket with a compare-and-swap on its ETag. Refs are
/// written under the lease, so a lost swap means another writer changed the ref since it was
/// read (or this run's own write landed though its answer was lost): read again, and fail
/// unless it now says what this run wrote.
pub fn swap_ref(r: &Remote, rel: &str, value: &str) -> Result<()> {
    let current = r.get_small(rel)?;
    if current
        .as_ref()
        .is_some_and(|c| c.bytes == value.as_bytes())
    {
        return Ok(());
    }
    if r.swap(rel, value.as_bytes().to_vec(), current.map(|c| c.version))?
        .is_some()
    {
        return Ok(());
    }
    match r.get_small(rel)? {
        Some(c) if c.bytes == value.as_bytes() => Ok(()),
        _ => Err(EngineError::Remote {
            url: r.url_of(rel),
            message: "another writer changed this ref while this run held the store's lease \
                      (was the lease lost?); the ref was not updated"
                .into(),
        }),
    }
}

/// Every (pipeline, stage, key) ref in the bucket.
pub fn remote_refs(r: &Remote) -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    for (rel, _) in r.list("refs/")? {
        let parts: Vec<&str> = rel.split('/').collect();
        if let ["refs", pipeline, stage] = parts[..]
            && let Some(f) = r.get_small(&rel)?
        {
            out.push((
                pipeline.to_string(),
                stage.to_string(),
                String::from_utf8_lossy(&f.bytes).trim().to_string(),
            ));
        }
    }
    out.sort();
    Ok(out)
}

impl Store {
    /// Opens the store at `url` (creating it when `create` and the prefix is empty) and its
    /// local copy. A prefix holding other objects and no marker is refused, as a non-store
    /// folder is.
    pub fn open_remote(url: &S3Url, create: bool) -> Result<Store> {
        let r = Arc::new(Remote::connect(url)?);
        let check_marker = |bytes: &[u8]| -> Result<()> {
            match marker_format(&String::from_utf8_lossy(bytes)) {
                Some(STORE_FORMAT) => Ok(()),
                Some(other) => Err(EngineError::Remote {
                    url: url.as_url(),
                    message: format!(
                        "a store of format {other}; this flag reads format {STORE_FORMAT}"
                    ),
                }),
                None => Err(EngineError::Remote {
                    url: r.url_of(MARKER),
                    message: "not a flag store marker".into(),
                }),
            }
        };
        let marker = match r.get_small(MARKER)? {
            Some(f) => Some(f),
            None if !create => {
                return Err(EngineError::Remote {
                    url: url.as_url(),
                    message: "no store here yet: run a pipeline first (flag run PIPELINE)".into(),
                });
            }
            // An empty prefix becomes a store; one with objects only if another coordinator
            // made it a store since the first read (read again before refusing).
            None if r.is_empty()? => match r.create(MARKER, marker_text().into_bytes())? {
                Created::New(_) => None,
                Created::Existed => r.get_small(MARKER)?,
            },
            None => match r.get_small(MARKER)? {
                Some(f) => Some(f),
                None => {
                    return Err(EngineError::Remote {
                        url: url.as_url(),
                        message: format!(
                            "not a flag store: the prefix holds objects and no '{MARKER}'. \
                             A store deletes objects under its objects/ and logs/, so flag \
                             uses only an empty prefix or one it created; choose another \
                             --store"
                        ),
                    });
                }
            },
        };
        if let Some(f) = marker {
            check_marker(&f.bytes)?;
        }
        let local = Store::open(&local_copy_dir(url))?;
        Ok(Store {
            root: local.root,
            remote: Some(r),
            lease: Mutex::new(None),
        })
    }

    /// Where an object is: its URL on object storage, its path in a local store.
    pub fn object_location(&self, f: &FileEntry) -> String {
        match &self.remote {
            Some(r) => r.url_of(&object_rel(f)),
            None => {
                let p = self.object_path(f);
                fs::canonicalize(&p).unwrap_or(p).display().to_string()
            }
        }
    }

    /// Brings the bucket's run `key` into the local copy (see the module doc), or pushes a
    /// local-only run when this run holds the lease. False: the bucket has no such run (and the
    /// local copy, if it has one, must not answer for it).
    pub(super) fn sync_run(&self, r: &Remote, key: &str) -> Result<bool> {
        let rel = manifest_rel(key);
        let local = self.manifest_path(key);
        match r.get_small(&rel)? {
            Some(f) => {
                let m = match check_manifest(&f.bytes, &key[..2], &format!("{key}.json")) {
                    ManifestRead::Ok(m) => m,
                    ManifestRead::Damaged { problems, .. } => {
                        return Err(EngineError::Remote {
                            url: r.url_of(&rel),
                            message: format!(
                                "damaged manifest: {}. `flag verify` reports and drops it; \
                                 `flag run --force` recomputes the stage",
                                problems.join("; ")
                            ),
                        });
                    }
                };
                self.pull_objects(r, &m)?;
                if fs::read(&local).ok().as_deref() != Some(&f.bytes[..]) {
                    write_atomic(&local, &f.bytes)?;
                }
                Ok(true)
            }
            None => {
                // Not deleted otherwise: a run on this machine may be committing it right now
                // (its local manifest is written before its push).
                if self.holds_lease()
                    && let Ok(bytes) = fs::read(&local)
                    && let ManifestRead::Ok(m) =
                        check_manifest(&bytes, &key[..2], &format!("{key}.json"))
                    && m.outputs
                        .values()
                        .flat_map(|o| &o.files)
                        .all(|f| self.object_path(f).is_file())
                {
                    self.push_run(self, &m, &bytes)?;
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// Downloads the objects of `m` that the local copy lacks, each checked against its hash.
    pub fn pull_objects(&self, r: &Remote, m: &Manifest) -> Result<()> {
        let missing: Vec<&FileEntry> = m
            .outputs
            .values()
            .flat_map(|o| &o.files)
            .filter(|f| !self.object_path(f).is_file())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let scratch = self.staging_dir(&format!("pull-{}", &m.key[..7]))?;
        let result = (|| {
            for f in missing {
                let dest = self.object_path(f);
                if dest.is_file() {
                    continue; // an output repeated in another
                }
                let rel = object_rel(f);
                let tmp = scratch.join(&f.hash);
                match r.download(&rel, &tmp, f.bytes)? {
                    None => {
                        return Err(EngineError::Remote {
                            url: r.url_of(&rel),
                            message: format!(
                                "missing, though manifest {} names it; `flag verify` drops \
                                 that run and the next run recomputes it",
                                r.url_of(&manifest_rel(&m.key))
                            ),
                        });
                    }
                    Some(h) if h != f.hash => {
                        return Err(EngineError::Remote {
                            url: r.url_of(&rel),
                            message: format!(
                                "corrupted (content hash {}, expected {}); `flag verify` \
                                 drops it and the runs that name it",
                                super::short(&h),
                                super::short(&f.hash)
                            ),
                        });
                    }
                    Some(_) => {}
                }
                let parent = dest.parent().unwrap();
                io(fs::create_dir_all(parent), || {
                    format!("creating {}", parent.display())
                })?;
                io(
                    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)),
                    || format!("making {} read-only", tmp.display()),
                )?;
                io(fs::rename(&tmp, &dest), || {
                    format!("storing {}", dest.display())
                })?;
                sync_dir(parent)?;
            }
            Ok(())
        })();
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    /// Commits a run of another (local) store into this one's bucket exactly as a run here
    /// commits: the path `flag bench-store --push-from` measures. Returns the objects and bytes
    /// sent.
    pub fn push_run_from(&self, from: &Store, m: &Manifest) -> Result<(usize, u64)> {
        let local = from.manifest_path(&m.key);
        let bytes = io(fs::read(&local), || format!("reading {}", local.display()))?;
        self.push_run(from, m, &bytes)
    }

    /// Pushes a committed run whose files are in `from` (this store's local copy, or another
    /// store's folder): objects, log, manifest (see the module doc). `bytes`: the manifest as
    /// written there. Returns the objects and bytes sent.
    pub(super) fn push_run(
        &self,
        from: &Store,
        m: &Manifest,
        bytes: &[u8],
    ) -> Result<(usize, u64)> {
        let r = self.remote.as_ref().ok_or_else(|| EngineError::Store {
            path: self.root.clone(),
            message: "not a store on object storage".into(),
        })?;
        let (mut sent, mut sent_bytes) = (0, 0);
        let mut seen = std::collections::BTreeSet::new();
        for f in m.outputs.values().flat_map(|o| &o.files) {
            if seen.insert(&f.hash) {
                r.upload(&object_rel(f), &from.object_path(f), f.bytes, &f.hash)?;
                sent += 1;
                sent_bytes += f.bytes;
            }
        }
        // The log: what a user on another machine reads when asking why a run did this.
        if let Ok(log) = fs::read(from.log_path(&m.key)) {
            r.put(&format!("logs/{}.log", m.key), log)?;
        }
        let rel = manifest_rel(&m.key);
        let local = self.manifest_path(&m.key);
        // Uploads may take long: the lease must still be held (with a margin) when the
        // manifest makes the run visible.
        self.ensure_lease()?;
        if r.create(&rel, bytes.to_vec())? == Created::Existed {
            // Another coordinator committed this key first: the bucket's manifest stands, and
            // it must describe the same outputs (a stage is a function of its key).
            let theirs = r.get_small(&rel)?.map(|f| f.bytes).unwrap_or_default();
            if theirs != bytes {
                match check_manifest(&theirs, &m.key[..2], &format!("{}.json", m.key)) {
                    ManifestRead::Ok(other) if other.outputs == m.outputs => {
                        write_atomic(&local, &theirs)?;
                    }
                    ManifestRead::Ok(_) => {
                        return Err(EngineError::Remote {
                            url: r.url_of(&rel),
                            message: "another coordinator committed this key with different \
                                      outputs (a stage that is not deterministic?); the \
                                      bucket's run stands, this one was not recorded"
                                .into(),
                        });
                    }
                    ManifestRead::Damaged { problems, .. } => {
                        return Err(EngineError::Remote {
                            url: r.url_of(&rel),
                            message: format!(
                                "damaged manifest in the bucket: {}; `flag verify` drops it",
                                problems.join("; ")
                            ),
                        });
                    }
                }
            }
        }
        Ok((sent, sent_bytes))
    }
}
