//! Pipeline files: YAML -> validated, interpolated stages in dependency order.
//!
//! Everything is checked before anything runs; each error names the file, the line and the
//! stage. See `validate.rs` for the rules.

mod interpolate;
mod locate;
pub mod resources;
mod validate;
mod yaml;

pub use validate::check_name;
pub use yaml::read_file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flag_core::{Params, Stage};

use crate::error::Result;
use crate::registry::Registry;

/// `stage.output`, as bound to a stage input.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutputRef {
    pub stage: String,
    pub output: String,
}

impl std::fmt::Display for OutputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.stage, self.output)
    }
}

/// One stage of a validated pipeline.
pub struct PipelineStage {
    pub name: String,
    pub kind: String,
    pub imp: Arc<dyn Stage>,
    /// Interpolated params with defaults filled in; relative Path params resolved against the
    /// project root.
    pub params: Params,
    /// Input name -> bound outputs (one, or several for a `many` input).
    pub inputs: BTreeMap<String, Vec<OutputRef>>,
    /// Output name -> path under `<store>/out/` where the latest result is published.
    pub publish: BTreeMap<String, String>,
    /// What the stage asks of a cluster node (Slurm executor only; not keyed).
    pub resources: resources::Resources,
    pub line: usize,
}

pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    /// Directory that relative paths, SQL and prompt files are resolved against.
    pub root: PathBuf,
    /// In dependency order (a stage comes after all stages it reads from).
    pub stages: Vec<PipelineStage>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&PipelineStage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Indices of stages that `name` reads from, directly or not.
    pub fn upstream(&self, name: &str) -> Vec<usize> {
        let mut out = Vec::new();
        let mut todo = vec![name.to_string()];
        while let Some(n) = todo.pop() {
            if let Some(s) = self.stage(&n) {
                for r in s.inputs.values().flatten() {
                    if let Some(i) = self.stages.iter().position(|x| x.name == r.stage)
                        && !out.contains(&i)
                    {
                        out.push(i);
                        todo.push(r.stage.clone());
                    }
                }
            }
        }
        out
    }

    /// Indices of stages that read from `name`, directly or not.
    pub fn downstream(&self, name: &str) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        let mut frontier = vec![name.to_string()];
        while let Some(n) = frontier.pop() {
            for (i, s) in self.stages.iter().enumerate() {
                if !out.contains(&i) && s.inputs.values().flatten().any(|r| r.stage == n) {
                    out.push(i);
                    frontier.push(s.name.clone());
                }
            }
        }
        out
    }
}

/// Project root for a pipeline file: the parent of its `pipelines/` directory, else its own
/// directory.
pub fn default_root(file: &Path) -> PathBuf {
    let dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    if dir.file_name().is_some_and(|n| n == "pipelines") {
        dir.parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                }
            })
            .unwrap_or(dir)
    } else {
        dir
    }
}

/// Reads, interpolates and validates a pipeline file. `overrides` are `--set key=value`
/// (a pipeline param, or `stage.param` for one stage).
pub fn load(
    file: &Path,
    root: Option<&Path>,
    overrides: &[String],
    registry: &Registry,
) -> Result<Pipeline> {
    let text = yaml::read_file(file)?;
    load_text(file, &text, root, overrides, registry)
}

/// `load` of a pipeline file's text (`file` names it in errors and gives the default root).
pub fn load_text(
    file: &Path,
    text: &str,
    root: Option<&Path>,
    overrides: &[String],
    registry: &Registry,
) -> Result<Pipeline> {
    let text = yaml::strip_bom(text);
    yaml::check_size_and_depth(file, text)?;
    let root = root
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_root(file));
    validate::validate(file, text, root, overrides, registry)
}
