//! Helpers for end-to-end tests: they drive the real `flag` binary on real data.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared real data: FLAG_DATA_DIR, else ../shared/data beside the repo.
pub fn data_dir() -> PathBuf {
    std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/data"))
        .canonicalize()
        .expect("the shared data directory (set FLAG_DATA_DIR)")
}

pub fn flag_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flag"))
}

/// A `flag` command with its store in `store`, the project root at `root`, and the shared
/// data dir set.
pub fn flag(root: &Path, store: &Path) -> Command {
    let mut c = Command::new(flag_bin());
    c.current_dir(root)
        .env("FLAG_STORE", store)
        .env("FLAG_ROOT", root)
        .env_remove("FLAG_DATA_DIR");
    c
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn flag");
    assert!(
        out.status.success(),
        "flag failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Parses `--json` output: stage -> record.
pub fn records(out: &Output) -> BTreeMap<String, serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json record");
            (v["stage"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

pub fn statuses(out: &Output) -> BTreeMap<String, String> {
    records(out)
        .into_iter()
        .map(|(k, v)| (k, v["status"].as_str().unwrap().to_string()))
        .collect()
}

/// stage -> output -> content hash.
pub fn output_hashes(out: &Output) -> BTreeMap<String, BTreeMap<String, String>> {
    records(out)
        .into_iter()
        .map(|(k, v)| {
            let outs = v["outputs"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(n, r)| (n.clone(), r["hash"].as_str().unwrap().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            (k, outs)
        })
        .collect()
}

/// A listing of the durable parts of a store (manifests, objects, refs) with file sizes
/// and hashes, to prove a failed run changed nothing.
pub fn snapshot(store: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for sub in ["manifests", "objects", "refs"] {
        let d = store.join(sub);
        if !d.exists() {
            continue;
        }
        let mut stack = vec![d];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let bytes = std::fs::read(&p).unwrap();
                    out.insert(
                        p.strip_prefix(store).unwrap().display().to_string(),
                        blake3::hash(&bytes).to_hex().to_string(),
                    );
                }
            }
        }
    }
    out
}

/// Copies the files a pipeline needs (pipelines/, SQL, prompts, schemas) into a temp root,
/// so a test can edit them without touching the repo.
pub fn copy_project(dest: &Path) {
    for d in ["pipelines", "stages/market/sql", "prompts"] {
        let src = repo_root().join(d);
        if src.exists() {
            copy_dir(&src, &dest.join(d));
        }
    }
}

pub fn copy_dir(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        let t = dest.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A copy of the project whose store already holds a run of `pipelines/test-small.yaml` up to
/// one stage, so a test's "the store is unchanged" means something.
pub struct ProjectStore {
    root: tempfile::TempDir,
}

impl ProjectStore {
    /// Runs test-small.yaml `--only until` (and its upstream) into the store.
    pub fn new(until: &str) -> ProjectStore {
        let root = tempfile::tempdir().unwrap();
        copy_project(root.path());
        let f = ProjectStore { root };
        let mut c = flag(f.root(), &f.store());
        c.args(["run", "pipelines/test-small.yaml", "--only", until, "--set"])
            .arg(format!("data_dir={}", data_dir().display()));
        run_ok(&mut c);
        f
    }
    pub fn root(&self) -> &Path {
        self.root.path()
    }
    pub fn store(&self) -> PathBuf {
        self.root.path().join("store")
    }
}
