//! The store on S3-compatible object storage (`--store s3://bucket/prefix`), through
//! `object_store`'s `aws` backend.
//!
//! The remote holds the same layout as a local store (`flag-store`, `objects/`, `manifests/`,
//! `refs/`, `logs/`) under its prefix, plus the lease object `lock`. A coordinator works in a
//! local copy of it (see `Store::open_remote`): stages read and write local files as always, and
//! the store pulls a manifest's objects before it serves a cached run and pushes objects, then
//! the manifest, then the ref when it commits one. What makes that safe between machines:
//! - objects and manifests are created with a conditional PUT (`If-None-Match: *`): a second
//!   writer of the same key never replaces the first, and an existing object of the same
//!   name and size is success (its name is its content's hash);
//! - refs are swapped with `If-Match: <etag>`, so an update based on a stale read fails and is
//!   retried instead of lost;
//! - one PUT is atomic on S3: an upload cut short (client or server killed) leaves no object,
//!   and a manifest is only written once all its objects are there, so nothing partial is
//!   ever visible;
//! - the lease in `lease.rs` takes the place of the local file lock.
//!
//! Endpoint, region and credentials come from the standard `AWS_*` environment variables
//! (`AmazonS3Builder::from_env`). They are never written anywhere: errors name URLs only.

use std::future::Future;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientConfigKey, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion, WriteMultipart,
};

use crate::error::{EngineError, Result};

/// Objects up to this size go up in one conditional PUT; larger ones in a multipart upload
/// (parts are invisible until it completes).
const SINGLE_PUT_MAX: u64 = 64 << 20;
/// Objects larger than this are looked for (HEAD) before they are sent.
const HEAD_FIRST_MIN: u64 = 1 << 20;
/// Bytes read from a local file per multipart part, and per chunk when hashing.
const PART: usize = 8 << 20;
/// The most a manifest, ref or marker read from the bucket may be: it is parsed, and the
/// bucket is not trusted to be bounded.
pub const SMALL_MAX: u64 = 16 << 20;

/// `s3://bucket/prefix` split and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Without leading or trailing '/'; may be empty (the bucket's root).
    pub prefix: String,
}

impl S3Url {
    /// Parses `s3://bucket[/prefix]`; None when `s` is not an s3 URL at all.
    pub fn parse(s: &str) -> Option<std::result::Result<S3Url, String>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Some(Err(format!(
                "'{s}': the bucket name must be 3 to 63 lowercase letters, digits, '-' or '.'"
            )));
        }
        for seg in prefix.split('/').filter(|_| !prefix.is_empty()) {
            let ok = !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Some(Err(format!(
                    "'{s}': each part of the prefix must be letters, digits, '-', '_' or '.' \
                     (not '.' or '..', no empty parts)"
                )));
            }
        }
        Some(Ok(S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        }))
    }

    pub fn as_url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// What a create-if-absent PUT found.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    /// Written by this call; its ETag.
    New(Option<String>),
    /// Something was already there (not replaced).
    Existed,
}

/// A small object read whole, with its version for a later conditional update.
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub version: UpdateVersion,
}

pub struct Remote {
    pub url: S3Url,
    store: Arc<AmazonS3>,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the builder's configuration: it holds the credentials.
        write!(f, "Remote({})", self.url.as_url())
    }
}

/// The endpoint the `AWS_*` environment names, in object_store's order of precedence.
pub fn env_endpoint() -> Option<String> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Remote {
    /// Connects to the bucket of `url` with the `AWS_*` environment. Nothing is sent yet.
    pub fn connect(url: &S3Url) -> Result<Remote> {
        Remote::connect_with(url, &[])
    }

    /// Like `connect`, with settings given over the environment's, named as object_store's
    /// `AmazonS3ConfigKey` parses them (`aws_endpoint`, `aws_access_key_id`, ...).
    pub fn connect_with(url: &S3Url, settings: &[(&str, &str)]) -> Result<Remote> {
        let err = |message: String| EngineError::Remote {
            url: url.as_url(),
            message,
        };
        // A dead endpoint fails in seconds, not after object_store's default 3 minutes of
        // retries; FLAG_S3_RETRY_SECS widens it for a slow link.
        let retry = RetryConfig {
            max_retries: 4,
            retry_timeout: Duration::from_secs(env_secs("FLAG_S3_RETRY_SECS", 20)),
            ..Default::default()
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_retry(retry)
            // Through config keys: `with_client_options` would replace the client options
            // `from_env` set (AWS_ALLOW_HTTP among them).
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                "5s",
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}s", env_secs("FLAG_S3_TIMEOUT_SECS", 300)),
            );
        for (k, v) in settings {
            let key: AmazonS3ConfigKey =
                k.parse().map_err(|e| err(format!("setting '{k}': {e}")))?;
            builder = builder.with_config(key, *v);
        }
        // Loopback and private endpoints speak plain http; the builder refuses it unless told.
        let endpoint = settings
            .iter()
            .find(|(k, _)| k.contains("endpoint"))
            .map(|(_, v)| v.to_string())
            .or_else(env_endpoint);
        if endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
            && std::env::var("AWS_ALLOW_HTTP").is_err()
        {
            builder = builder.with_allow_http(true);
        }
        let store = builder.build().map_err(|e| {
            err(format!(
                "cannot configure the S3 client ({e}); set AWS_ENDPOINT_URL, AWS_REGION, \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ))
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("flag-s3")
            .enable_all()
            .build()
            .map_err(|e| EngineError::io("starting the S3 client's runtime", e))?;
        Ok(Remote {
            url: url.clone(),
            store: Arc::new(store),
            runtime,
        })
    }

    /// The object store and the URL DataFusion registers it under (`s3://bucket`).
    pub fn object_store(&self) -> (String, Arc<dyn ObjectStore>) {
        (format!("s3://{}", self.url.bucket), self.store.clone())
    }

    /// Path of `rel` (a store-relative name such as `objects/ab/ab….parquet`) in the bucket.
    fn path(&self, rel: &str) -> ObjPath {
        if self.url.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.url.prefix))
        }
    }

    /// The URL of `rel`, for messages and `flag path`.
    pub fn url_of(&self, rel: &str) -> String {
        format!("s3://{}/{}", self.url.bucket, self.path(rel))
    }

    fn error(&self, rel: &str, what: &str, e: impl std::fmt::Display) -> EngineError {
        EngineError::Remote {
            url: self.url_of(rel),
            message: format!("{what}: {e}"),
        }
    }

    /// Runs a request to completion from sync code, which may itself be on a tokio worker
    /// (the scheduler's blocking tasks): a scoped thread blocks on the client's own runtime.
    fn block<T: Send>(&self, f: impl Future<Output = T> + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| self.runtime.block_on(f))
                .join()
                .expect("S3 request thread panicked")
        })
    }

    /// Reads a small object whole (manifests, refs, the marker, the lease); None when absent.
    pub fn get_small(&self, rel: &str) -> Result<Option<Fetched>> {
        let path = self.path(rel);
        self.block(async {
            let got = match self.store.get_opts(&path, GetOptions::default()).await {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.error(rel, "reading", e)),
            };
            if got.meta.size > SMALL_MAX {
                return Err(self.error(
                    rel,
                    "reading",
                    format!(
                        "{} bytes, more than the {} a manifest, ref or marker may have",
                        got.meta.size, SMALL_MAX
                    ),
                ));
            }
            let version = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            let bytes = got
                .bytes()
                .await
                .map_err(|e| self.error(rel, "reading", e))?;
            Ok(Some(Fetched {
                bytes: bytes.to_vec(),
                version,
            }))
        })
    }

    /// Creates `rel` unless something is there already.
    pub fn create(&self, rel: &str, bytes: Vec<u8>) -> Result<Created> {
        let path = self.path(rel);
        self.block(async {
            match self
                .store
                .put_opts(&path, PutPayload::from(bytes), PutMode::Create.into())
                .await
            {
                Ok(r) => Ok(Created::New(r.e_tag)),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::Existed),
                // Some servers answer a lost create race with 412 rather than "exists".
                Err(object_store::Error::Precondition { .. }) => Ok(Created::Existed),
                Err(e) => Err(self.error(rel, "creating", e)),
            }
        })
    }

    /// Replaces `rel` only if it is still at `version` (or creates it when `version` is None
    /// and nothing is there). Ok(None): someone else changed it first.
    pub fn swap(
        &self,
        rel: &str,
        bytes: Vec<u8>,
        version: Option<UpdateVersion>,
    ) -> Result<Option<UpdateVersion>> {
        let path = self.path(rel);
        let mode = match version {
            Some(v) => PutMode::Update(v),
            None => PutMode::Create,
        };
        self.block(async {
            match self
                .store
                .put_opts(&path, PutPayload::from(bytes), PutOptions::from(mode))
                .await
            {
                Ok(r) => Ok(Some(r.into())),
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::NotFound { .. },
                ) => Ok(None),
                Err(e) => Err(self.error(rel, "updating", e)),
            }
        })
    }

    /// Writes `rel` unconditionally (logs: not content-addressed, last writer wins).
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path(rel);
        self.block(async {
            self.store
                .put(&path, PutPayload::from(bytes))
                .await
                .map(|_| ())
                .map_err(|e| self.error(rel, "writing", e))
        })
    }

    /// The size of `rel`, None when absent.
    pub fn size(&self, rel: &str) -> Result<Option<u64>> {
        let path = self.path(rel);
        self.block(async {
            match self.store.head(&path).await {
                Ok(m) => Ok(Some(m.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.error(rel, "reading", e)),
            }
        })
    }

    pub fn delete(&self, rel: &str) -> Result<()> {
        let path = self.path(rel);
        self.block(async {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.error(rel, "deleting", e)),
            }
        })
    }

    /// Every object under `rel_prefix` (a folder such as `manifests/`): (store-relative
    /// name, size), sorted.
    pub fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>> {
        Ok(self
            .list_meta(rel_prefix)?
            .into_iter()
            .map(|(rel, size, _)| (rel, size))
            .collect())
    }

    /// `rel` as the bucket's listing names it: object_store escapes some characters of a path
    /// segment (`~` becomes `%7E`), and the listing returns the escaped form.
    pub fn listed_name(&self, rel: &str) -> String {
        ObjPath::from(rel).to_string()
    }

    /// Like `list`, with each object's age in seconds: this machine's clock minus the
    /// server's last-modified time (callers leave room for skew between the two).
    pub fn list_meta(&self, rel_prefix: &str) -> Result<Vec<(String, u64, i64)>> {
        let prefix = self.path(rel_prefix.trim_end_matches('/'));
        let base = if self.url.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.url.prefix)
        };
        let mut out = self.block(async {
            let mut stream = self.store.list(Some(&prefix));
            let mut out = Vec::new();
            while let Some(item) = stream.next().await {
                let m = item.map_err(|e| self.error(rel_prefix, "listing", e))?;
                let full = m.location.to_string();
                if let Some(rel) = full.strip_prefix(&base) {
                    let age = (chrono::Utc::now() - m.last_modified).num_seconds();
                    out.push((rel.to_string(), m.size, age));
                }
            }
            Ok::<_, EngineError>(out)
        })?;
        out.sort();
        Ok(out)
    }

    /// Is anything stored under the prefix at all?
    pub fn is_empty(&self) -> Result<bool> {
        let prefix = (!self.url.prefix.is_empty()).then(|| ObjPath::from(self.url.prefix.as_str()));
        self.block(async {
            let mut stream = self.store.list(prefix.as_ref());
            match stream.next().await {
                None => Ok(true),
                Some(Ok(_)) => Ok(false),
                Some(Err(e)) => Err(self.error("", "listing", e)),
            }
        })
    }

    /// Uploads the local file `src` (of `size` bytes) as `rel` unless an object of that name
    /// is there. The name is the content's hash, so an existing object of the same size is the
    /// same object; one of another size is reported (the bucket was written by something else).
    ///
    /// The file is hashed as it is read and must hash to `hash` (the name): a local copy
    /// damaged on disk is never published under its old name.
    pub fn upload(&self, rel: &str, src: &Path, size: u64, hash: &str) -> Result<()> {
        let path = self.path(rel);
        let damaged = |actual: &str| {
            self.error(
                rel,
                "uploading",
                format!(
                    "the local file {} hashes to {}, not to its name {}: the local copy is \
                     damaged (delete it; the run is recomputed)",
                    src.display(),
                    &actual[..12],
                    &hash[..hash.len().min(12)]
                ),
            )
        };
        let existing = |found: u64| -> Result<()> {
            if found == size {
                Ok(())
            } else {
                Err(self.error(
                    rel,
                    "uploading",
                    format!(
                        "an object of {found} bytes is stored under this content hash, \
                         not {size}: the bucket holds a damaged object (`flag verify` \
                         drops it)"
                    ),
                ))
            }
        };
        // A large object is looked for first: a conditional PUT sends its whole body before
        // the server can say it is there already (moto: a second commit of 17.5 MB took as
        // long as the first).
        if size > HEAD_FIRST_MIN
            && let Some(found) = self.size(rel)?
        {
            return existing(found);
        }
        if size <= SINGLE_PUT_MAX {
            let bytes = std::fs::read(src)
                .map_err(|e| EngineError::io(format!("reading {}", src.display()), e))?;
            let actual = blake3::hash(&bytes).to_hex().to_string();
            if actual != hash {
                return Err(damaged(&actual));
            }
            return match self.create(rel, bytes)? {
                Created::New(_) => Ok(()),
                Created::Existed => match self.size(rel)? {
                    Some(found) => existing(found),
                    None => Err(self.error(rel, "uploading", "refused as existing, yet absent")),
                },
            };
        }
        // Multipart: invisible until complete; a racing writer of the same name writes the
        // same bytes.
        let mut file = std::fs::File::open(src)
            .map_err(|e| EngineError::io(format!("reading {}", src.display()), e))?;
        self.block(async {
            let upload = self
                .store
                .put_multipart(&path)
                .await
                .map_err(|e| self.error(rel, "uploading", e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buf = vec![0u8; PART];
            let mut hasher = blake3::Hasher::new();
            // Every way out but a finished upload aborts it: parts of an upload never
            // completed are invisible to listings (so to `flag gc`) but stored.
            let failure = loop {
                let n = match file.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) => break EngineError::io(format!("reading {}", src.display()), e),
                };
                if n == 0 {
                    let actual = hasher.finalize().to_hex().to_string();
                    if actual != hash {
                        break damaged(&actual);
                    }
                    return writer
                        .finish()
                        .await
                        .map(|_| ())
                        .map_err(|e| self.error(rel, "uploading", e));
                }
                hasher.update(&buf[..n]);
                if let Err(e) = writer.wait_for_capacity(4).await {
                    break self.error(rel, "uploading", e);
                }
                writer.write(&buf[..n]);
            };
            let _ = writer.abort().await;
            Err(failure)
        })
    }

    /// Streams `rel` into the new local file `dest` while hashing it. Ok(None) when the object
    /// is absent; Ok(Some(hash)) of what was written.
    /// More than `max_bytes` is refused (a bucket object is untrusted: it must not fill the
    /// disk before its hash is known to be wrong).
    pub fn download(&self, rel: &str, dest: &Path, max_bytes: u64) -> Result<Option<String>> {
        let mut file = None;
        let mut written = 0u64;
        let hash = self.stream_hashed(rel, "downloading", |chunk| {
            written += chunk.len() as u64;
            if written > max_bytes {
                return Err(self.error(
                    rel,
                    "downloading",
                    format!("more than the {max_bytes} bytes its manifest records"),
                ));
            }
            let f = match &mut file {
                Some(f) => f,
                None => file.insert(
                    std::fs::File::create(dest)
                        .map_err(|e| EngineError::io(format!("creating {}", dest.display()), e))?,
                ),
            };
            f.write_all(chunk)
                .map_err(|e| EngineError::io(format!("writing {}", dest.display()), e))
        })?;
        if hash.is_some() {
            let f = match file {
                Some(f) => f,
                // An empty object: no chunk came.
                None => std::fs::File::create(dest)
                    .map_err(|e| EngineError::io(format!("creating {}", dest.display()), e))?,
            };
            f.sync_all()
                .map_err(|e| EngineError::io(format!("syncing {}", dest.display()), e))?;
        }
        Ok(hash)
    }

    /// The blake3 of `rel`'s bytes, streamed (verify); None when absent.
    pub fn hash(&self, rel: &str) -> Result<Option<String>> {
        self.stream_hashed(rel, "reading", |_| Ok(()))
    }

    /// Streams `rel`, hashing it and handing each chunk to `each`; None when absent.
    fn stream_hashed(
        &self,
        rel: &str,
        what: &str,
        mut each: impl FnMut(&[u8]) -> Result<()> + Send,
    ) -> Result<Option<String>> {
        let path = self.path(rel);
        self.block(async {
            let got = match self.store.get(&path).await {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.error(rel, what, e)),
            };
            let mut hasher = blake3::Hasher::new();
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.error(rel, what, e))?;
                hasher.update(&chunk);
                each(&chunk)?;
            }
            Ok(Some(hasher.finalize().to_hex().to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_refused() {
        assert_eq!(S3Url::parse("/tmp/x"), None);
        let u = S3Url::parse("s3://flag-test/team/a/").unwrap().unwrap();
        assert_eq!(u.bucket, "flag-test");
        assert_eq!(u.prefix, "team/a");
        assert_eq!(u.as_url(), "s3://flag-test/team/a");
        let root = S3Url::parse("s3://flag-test").unwrap().unwrap();
        assert_eq!(root.prefix, "");
        for bad in [
            "s3://",
            "s3://ab",
            "s3://Upper/x",
            "s3://flag-test/../x",
            "s3://flag-test/a//b",
            "s3://flag-test/a/./b",
            "s3://flag-test/a b",
        ] {
            assert!(S3Url::parse(bad).unwrap().is_err(), "{bad} accepted");
        }
    }
}
