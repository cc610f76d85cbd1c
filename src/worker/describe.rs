//! The coordinator's view of the stage kinds only the worker links (the libtorch ones): their
//! declarations travel as JSON (`flag-worker catalogue`, `flag-worker describe`) and are
//! cached on disk, keyed by the worker binary and everything a declaration may read (params,
//! environment, host), so an all-cached re-run starts no worker at all.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use flag_core::{
    Fingerprint, InputSpec, Numerics, OutputKind, OutputSpec, ParamKind, ParamSpec, Params, Stage,
    StageError, StageResult, StageSpec,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A stage kind's declaration, as the worker sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindDecl {
    pub kind: String,
    pub doc: String,
    pub inputs: Vec<InputDecl>,
    pub outputs: Vec<OutputDecl>,
    pub params: Vec<ParamDecl>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputDecl {
    pub name: String,
    pub schema: Option<String>,
    pub required: bool,
    pub many: bool,
    pub doc: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputDecl {
    pub name: String,
    /// "parquet:<schema>", "file:<ext>" or "dir".
    pub kind: String,
    pub doc: String,
    pub measured: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParamDecl {
    pub name: String,
    pub kind: String,
    /// Empty: required; else the one default (a list, because a default of `null` is not the
    /// same as no default and JSON's `Option` would fold the two).
    pub default: Vec<Value>,
    pub doc: String,
}

/// One stage (kind + params + bound inputs) to describe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Query {
    pub kind: String,
    pub params: BTreeMap<String, Value>,
    pub bound_inputs: Vec<String>,
}

/// A stage error that keeps what locating it needs (the param's name).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDecl {
    pub param: Option<String>,
    pub message: String,
}

impl ErrorDecl {
    pub fn from_error(e: &StageError) -> Self {
        match e {
            StageError::Param { name, message } => ErrorDecl {
                param: Some(name.clone()),
                message: message.clone(),
            },
            other => ErrorDecl {
                param: None,
                message: other.to_string(),
            },
        }
    }
    fn to_error(&self) -> StageError {
        match &self.param {
            Some(name) => StageError::param(name.clone(), self.message.clone()),
            None => StageError::Invalid(self.message.clone()),
        }
    }
}

/// What the coordinator asks of a stage's declaration for given params.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub check: Option<ErrorDecl>,
    pub version: String,
    pub files: Vec<String>,
    pub external: Result<Vec<PathBuf>, ErrorDecl>,
    pub environment: Vec<(String, String)>,
    pub numerics: Numerics,
}

pub fn kind_decl(kind: &str, spec: &StageSpec) -> KindDecl {
    KindDecl {
        kind: kind.to_string(),
        doc: spec.doc.to_string(),
        inputs: spec
            .inputs
            .iter()
            .map(|i| InputDecl {
                name: i.name.into(),
                schema: i.schema.map(str::to_string),
                required: i.required,
                many: i.many,
                doc: i.doc.into(),
            })
            .collect(),
        outputs: spec
            .outputs
            .iter()
            .map(|o| OutputDecl {
                name: o.name.into(),
                kind: match &o.kind {
                    OutputKind::Parquet { schema } => format!("parquet:{schema}"),
                    OutputKind::File { ext } => format!("file:{ext}"),
                    OutputKind::Dir => "dir".into(),
                },
                doc: o.doc.into(),
                measured: o.measured,
            })
            .collect(),
        params: spec
            .params
            .iter()
            .map(|p| ParamDecl {
                name: p.name.into(),
                kind: format!("{:?}", p.kind),
                default: p.default.clone().into_iter().collect(),
                doc: p.doc.into(),
            })
            .collect(),
    }
}

/// The worker's answer for one query (run in the worker).
pub fn answer(imp: &dyn Stage, q: &Query) -> Answer {
    let params = Params::new(q.params.clone());
    let bound: Vec<&str> = q.bound_inputs.iter().map(String::as_str).collect();
    let fp = imp.fingerprint(&params);
    Answer {
        check: imp
            .check_params(&params, &bound)
            .err()
            .map(|e| ErrorDecl::from_error(&e)),
        version: fp.version,
        files: fp.files,
        external: imp
            .external_files(&params)
            .map_err(|e| ErrorDecl::from_error(&e)),
        environment: imp.environment(&params),
        numerics: imp.numerics(&params),
    }
}

// Declarations live as long as the process (a pipeline names a handful of kinds).
fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

fn spec_of(d: &KindDecl) -> StageSpec {
    StageSpec {
        doc: leak(&d.doc),
        inputs: d
            .inputs
            .iter()
            .map(|i| InputSpec {
                name: leak(&i.name),
                schema: i.schema.as_deref().map(leak),
                required: i.required,
                many: i.many,
                doc: leak(&i.doc),
            })
            .collect(),
        outputs: d
            .outputs
            .iter()
            .map(|o| OutputSpec {
                name: leak(&o.name),
                kind: match o.kind.split_once(':') {
                    Some(("parquet", s)) => OutputKind::Parquet { schema: leak(s) },
                    Some(("file", e)) => OutputKind::File { ext: leak(e) },
                    _ => OutputKind::Dir,
                },
                doc: leak(&o.doc),
                measured: o.measured,
            })
            .collect(),
        params: d
            .params
            .iter()
            .map(|p| ParamSpec {
                name: leak(&p.name),
                kind: match p.kind.as_str() {
                    "Str" => ParamKind::Str,
                    "Int" => ParamKind::Int,
                    "Float" => ParamKind::Float,
                    "Bool" => ParamKind::Bool,
                    "Date" => ParamKind::Date,
                    "List" => ParamKind::List,
                    "Path" => ParamKind::Path,
                    _ => ParamKind::Any,
                },
                default: p.default.first().cloned(),
                doc: leak(&p.doc),
            })
            .collect(),
    }
}

/// The worker binary and where its answers are cached.
pub struct WorkerClient {
    binary: PathBuf,
    /// Hash of the binary's path, size, mtime and inode: a rebuilt worker is another worker.
    identity: String,
    cache_dir: Option<PathBuf>,
    /// [`environment_fingerprint`], read once: a process's environment does not change.
    environment: String,
    answers: Mutex<HashMap<String, Arc<Answer>>>,
}

fn hex(parts: &[&[u8]]) -> String {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().to_hex().to_string()
}

/// Environment variables that change between shells without changing what a declaration
/// says; every other variable is part of a cached answer's key.
const VOLATILE_ENV: &[&str] = &[
    "PWD",
    "OLDPWD",
    "SHLVL",
    "_",
    "TERM",
    "COLUMNS",
    "LINES",
    "SSH_TTY",
    "SSH_CLIENT",
    "SSH_CONNECTION",
    "TMUX_PANE",
    "WINDOWID",
];

fn environment_fingerprint() -> String {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .filter(|(k, _)| !VOLATILE_ENV.contains(&k.as_str()))
        .collect();
    vars.sort();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cwd = std::env::current_dir().unwrap_or_default();
    let text =
        serde_json::to_string(&(vars, host.trim(), cwd, flag_core::numerics::cuda_present()))
            .unwrap_or_default();
    hex(&[text.as_bytes()])
}

fn cache_root() -> Option<PathBuf> {
    let base = std::env::var_os("FLAG_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache/flag"))
        })?;
    Some(base.join("declarations"))
}

impl WorkerClient {
    pub fn new(binary: PathBuf) -> WorkerClient {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&binary).ok();
        let id = format!(
            "{}|{}|{}|{}|{}",
            binary.display(),
            meta.as_ref().map_or(0, |m| m.len()),
            meta.as_ref().map_or(0, |m| m.mtime()),
            meta.as_ref().map_or(0, |m| m.mtime_nsec()),
            meta.as_ref().map_or(0, |m| m.ino())
        );
        WorkerClient {
            binary,
            identity: hex(&[id.as_bytes(), env!("CARGO_PKG_VERSION").as_bytes()]),
            cache_dir: cache_root(),
            environment: environment_fingerprint(),
            answers: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, name: &str) -> Option<Vec<u8>> {
        let p = self.cache_dir.as_ref()?.join(name);
        std::fs::read(p).ok()
    }

    /// Writes a cache file atomically (a reader never sees half of one); best effort.
    fn store(&self, name: &str, bytes: &[u8]) {
        let Some(dir) = &self.cache_dir else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, dir.join(name)).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    fn call(&self, command: &str, input: &[u8]) -> Result<Vec<u8>, String> {
        let mut child = Command::new(&self.binary)
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        let mut stdin = child.stdin.take().expect("piped");
        let input = input.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for {}: {e}", self.binary.display()))?;
        let _ = writer.join();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "{} {command} failed ({}): {}",
                self.binary.display(),
                out.status,
                err.trim()
            ));
        }
        Ok(out.stdout)
    }

    /// The declarations of every kind the worker runs that the coordinator does not know.
    pub fn catalogue(&self) -> Result<Vec<KindDecl>, String> {
        let name = format!("catalogue-{}.json", self.identity);
        if let Some(bytes) = self.cached(&name)
            && let Ok(v) = serde_json::from_slice(&bytes)
        {
            return Ok(v);
        }
        let bytes = self.call("catalogue", b"")?;
        let v: Vec<KindDecl> = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the worker's catalogue is not valid: {e}"))?;
        self.store(&name, &bytes);
        Ok(v)
    }

    fn query_id(&self, env: &str, q: &Query) -> String {
        let text = serde_json::to_string(q).unwrap_or_default();
        hex(&[self.identity.as_bytes(), env.as_bytes(), text.as_bytes()])
    }

    /// Answers for these queries: from memory, then the disk cache, then one worker call for
    /// all that are left.
    pub fn answers(&self, queries: &[Query]) -> Result<Vec<Arc<Answer>>, String> {
        let ids: Vec<String> = queries
            .iter()
            .map(|q| self.query_id(&self.environment, q))
            .collect();
        let mut found: Vec<Option<Arc<Answer>>> = Vec::with_capacity(queries.len());
        for id in &ids {
            let mem = self.answers.lock().ok().and_then(|m| m.get(id).cloned());
            let hit = mem.or_else(|| {
                let bytes = self.cached(&format!("answer-{id}.json"))?;
                let a: Answer = serde_json::from_slice(&bytes).ok()?;
                // A path that is gone (a moved model package) asks the worker again.
                if let Ok(files) = &a.external
                    && !files.iter().all(|f| f.exists())
                {
                    return None;
                }
                Some(Arc::new(a))
            });
            found.push(hit);
        }
        let missing: Vec<usize> = (0..queries.len()).filter(|&i| found[i].is_none()).collect();
        if !missing.is_empty() {
            let ask: Vec<&Query> = missing.iter().map(|&i| &queries[i]).collect();
            let input = serde_json::to_vec(&ask).expect("queries serialise");
            let bytes = self.call("describe", &input)?;
            let got: Vec<Answer> = serde_json::from_slice(&bytes)
                .map_err(|e| format!("the worker's answer is not valid: {e}"))?;
            if got.len() != missing.len() {
                return Err(format!(
                    "the worker answered {} of {} queries",
                    got.len(),
                    missing.len()
                ));
            }
            for (&i, a) in missing.iter().zip(got) {
                self.store(
                    &format!("answer-{}.json", ids[i]),
                    &serde_json::to_vec(&a).expect("answer serialises"),
                );
                found[i] = Some(Arc::new(a));
            }
        }
        let out: Vec<Arc<Answer>> = found.into_iter().map(|a| a.expect("filled")).collect();
        if let Ok(mut m) = self.answers.lock() {
            for (id, a) in ids.into_iter().zip(&out) {
                m.insert(id, a.clone());
            }
        }
        Ok(out)
    }
}

/// A stage kind the worker declares: every question is answered by the worker (or its cache).
pub struct RemoteStage {
    kind: &'static str,
    spec: StageSpec,
    client: Arc<WorkerClient>,
}

impl RemoteStage {
    pub fn new(decl: &KindDecl, client: Arc<WorkerClient>) -> RemoteStage {
        RemoteStage {
            kind: leak(&decl.kind),
            spec: spec_of(decl),
            client,
        }
    }

    pub fn query(&self, params: &Params, bound: &[&str]) -> Query {
        Query {
            kind: self.kind.to_string(),
            params: params.0.clone(),
            bound_inputs: bound.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn answer(&self, params: &Params, bound: &[&str]) -> StageResult<Arc<Answer>> {
        self.client
            .answers(&[self.query(params, bound)])
            .map(|mut v| v.remove(0))
            .map_err(StageError::Invalid)
    }

    /// The answer for the declaration questions (bound inputs do not change them).
    fn decl(&self, params: &Params) -> Option<Arc<Answer>> {
        self.answer(params, &[]).ok()
    }
}

impl Stage for RemoteStage {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn spec(&self) -> StageSpec {
        self.spec.clone()
    }

    fn fingerprint(&self, params: &Params) -> Fingerprint {
        match self.decl(params) {
            Some(a) => Fingerprint {
                version: a.version.clone(),
                files: a.files.clone(),
            },
            // An unreachable worker: a version no run has, so nothing reads as cached.
            None => Fingerprint::new("unavailable: the stage worker could not be asked"),
        }
    }

    fn external_files(&self, params: &Params) -> StageResult<Vec<PathBuf>> {
        let a = self.answer(params, &[])?;
        a.external.clone().map_err(|e| e.to_error())
    }

    fn environment(&self, params: &Params) -> Vec<(String, String)> {
        self.decl(params)
            .map(|a| a.environment.clone())
            .unwrap_or_default()
    }

    fn numerics(&self, params: &Params) -> Numerics {
        self.decl(params)
            .map_or(Numerics::KernelPath, |a| a.numerics)
    }

    fn check_params(&self, params: &Params, bound_inputs: &[&str]) -> StageResult<()> {
        match &self.answer(params, bound_inputs)?.check {
            None => Ok(()),
            Some(e) => Err(e.to_error()),
        }
    }
}
