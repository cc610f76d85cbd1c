//! What a stage declares about itself: inputs, outputs, params, and its fingerprint.
use std::path::PathBuf;

use serde_json::Value;

use crate::context::StageContext;
use crate::error::StageResult;
use crate::numerics::Numerics;
use crate::params::Params;

/// A stage kind, as named by `uses:` in a pipeline file.
pub trait Stage: Send + Sync {
    /// The `uses:` name, e.g. `ingest_ohlcv`.
    fn kind(&self) -> &'static str;

    /// Inputs, outputs and params. The engine validates pipelines against it before running.
    fn spec(&self) -> StageSpec;

    /// The implementation's identity: its crate version plus every SQL, prompt or template
    /// file it uses (which may depend on params, e.g. a prompt version). Changing any of them
    /// changes the cache key.
    fn fingerprint(&self, params: &Params) -> Fingerprint;

    /// Files outside the store that the outputs depend on (raw data, model files), resolved
    /// from params. Their contents (not their paths) go into the cache key.
    fn external_files(&self, _params: &Params) -> StageResult<Vec<PathBuf>> {
        Ok(Vec::new())
    }

    /// Environment facts that change results (e.g. "cuda" vs "cpu"). Part of the cache key.
    fn environment(&self, _params: &Params) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Whether the outputs' bytes depend on the float kernels that computed them (see
    /// [`Numerics`]). A `KernelPath` stage gets the kernel path in its cache key.
    fn numerics(&self, _params: &Params) -> Numerics {
        Numerics::Portable
    }

    /// Checks the param values (ranges, choices, combinations) with the same parser `run`
    /// uses, without reading inputs or files: the engine calls it when it loads a pipeline, so
    /// a bad value fails with its file:line before any stage runs. `bound_inputs` names the
    /// inputs the pipeline binds.
    fn check_params(&self, _params: &Params, _bound_inputs: &[&str]) -> StageResult<()> {
        Ok(())
    }
}

/// The work of a stage kind. Split from [`Stage`] so that the coordinator, which only plans,
/// keys and commits, never links the code that runs stages (and with it libtorch): only the
/// worker binary (`flag-worker`) builds the lists of [`RunStage`]s.
pub trait RunStage: Stage {
    /// Does the work: reads inputs and writes every declared output through `ctx`.
    /// Runs in a worker process; a stage may start its own runtime or threads inside.
    fn run(&self, ctx: &mut StageContext) -> StageResult<()>;
}

/// Declares a crate's stage kinds once and generates both lists: `stages()` (declarations
/// only, for the coordinator) and `runners()` (with the work, for the worker).
#[macro_export]
macro_rules! stage_kinds {
    ($($stage:expr),* $(,)?) => {
        /// The stage kinds of this crate: declarations (spec, params, key parts) only.
        pub fn stages() -> Vec<Box<dyn $crate::Stage>> {
            vec![$(Box::new($stage)),*]
        }
        /// The stage kinds of this crate with their work, for the worker process.
        pub fn runners() -> Vec<Box<dyn $crate::RunStage>> {
            vec![$(Box::new($stage)),*]
        }
    };
}

#[derive(Debug, Clone, Default)]
pub struct StageSpec {
    pub doc: &'static str,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
    pub params: Vec<ParamSpec>,
}

#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: &'static str,
    /// Schema every file of the bound output must have (None: any, e.g. a report input).
    pub schema: Option<&'static str>,
    pub required: bool,
    /// Accepts a list of upstream outputs (e.g. all metrics tables for a report).
    pub many: bool,
    pub doc: &'static str,
}

impl InputSpec {
    pub fn one(name: &'static str, schema: &'static str, doc: &'static str) -> Self {
        InputSpec {
            name,
            schema: Some(schema),
            required: true,
            many: false,
            doc,
        }
    }
    pub fn many(name: &'static str, schema: &'static str, doc: &'static str) -> Self {
        InputSpec {
            many: true,
            ..InputSpec::one(name, schema, doc)
        }
    }
    pub fn optional(mut self) -> Self {
        self.required = false;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputKind {
    /// One Parquet file in the named schema.
    Parquet { schema: &'static str },
    /// A single file with this extension (e.g. "json", "md").
    File { ext: &'static str },
    /// A directory of files (e.g. a report with charts).
    Dir,
}

#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub name: &'static str,
    pub kind: OutputKind,
    pub doc: &'static str,
    /// A measurement of the run itself (wall-clock time, throughput), not a function of the
    /// key: stored and cached like any output, but `verify --recompute` and reproducibility
    /// checks report it without comparing its bytes.
    pub measured: bool,
}

impl OutputSpec {
    pub fn parquet(name: &'static str, schema: &'static str, doc: &'static str) -> Self {
        OutputSpec {
            name,
            kind: OutputKind::Parquet { schema },
            doc,
            measured: false,
        }
    }
    /// A Parquet output that records measurements of the run (see [`OutputSpec::measured`]).
    pub fn measured_parquet(name: &'static str, schema: &'static str, doc: &'static str) -> Self {
        OutputSpec {
            measured: true,
            ..OutputSpec::parquet(name, schema, doc)
        }
    }
    pub fn dir(name: &'static str, doc: &'static str) -> Self {
        OutputSpec {
            name,
            kind: OutputKind::Dir,
            doc,
            measured: false,
        }
    }
    pub fn file(name: &'static str, ext: &'static str, doc: &'static str) -> Self {
        OutputSpec {
            name,
            kind: OutputKind::File { ext },
            doc,
            measured: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Str,
    Int,
    Float,
    Bool,
    Date,
    /// A list (of strings, numbers...).
    List,
    /// Any JSON/YAML structure.
    Any,
    /// A filesystem path outside the store: its *contents* go into the key, not the string,
    /// so the same data at another path is a cache hit.
    Path,
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    /// None: required.
    pub default: Option<Value>,
    pub doc: &'static str,
}

impl ParamSpec {
    pub fn required(name: &'static str, kind: ParamKind, doc: &'static str) -> Self {
        ParamSpec {
            name,
            kind,
            default: None,
            doc,
        }
    }
    pub fn with_default(
        name: &'static str,
        kind: ParamKind,
        default: Value,
        doc: &'static str,
    ) -> Self {
        ParamSpec {
            name,
            kind,
            default: Some(default),
            doc,
        }
    }
}

/// What defines a stage implementation.
///
/// SQL, prompt and template files are read at run time from the project root (so a user
/// editing `prompts/...` or a `.sql` file reruns exactly the stages using it, without a
/// rebuild). The engine reads each file once, hashes its bytes into the key, and hands the
/// same bytes to the stage through [`StageContext::resource`].
#[derive(Debug, Clone, Default)]
pub struct Fingerprint {
    /// Usually `concat!(env!("CARGO_PKG_NAME"), "@", env!("CARGO_PKG_VERSION"))` plus a
    /// stage-local revision bumped when behaviour changes.
    pub version: String,
    /// Root-relative paths of every SQL/prompt/template file the stage reads.
    pub files: Vec<String>,
}

impl Fingerprint {
    pub fn new(version: impl Into<String>) -> Self {
        Fingerprint {
            version: version.into(),
            files: Vec::new(),
        }
    }
    pub fn file(mut self, root_relative_path: impl Into<String>) -> Self {
        self.files.push(root_relative_path.into());
        self
    }
}
