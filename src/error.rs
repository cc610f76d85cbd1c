//! The engine's error type: every variant says where (file:line, stage, input) and why.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A problem in a pipeline file, located at a line.
    #[error("{}:{line}: {message}", file.display())]
    Pipeline {
        file: PathBuf,
        line: usize,
        message: String,
    },
    /// Several validation errors, reported together.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Many(Vec<EngineError>),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store {}: {message}", path.display())]
    Store { path: PathBuf, message: String },
    /// A store on object storage (`s3://bucket/prefix`): the URL names the object.
    #[error("store {url}: {message}")]
    Remote { url: String, message: String },
    #[error("stage '{stage}' ({kind}) failed: {source}")]
    Stage {
        stage: String,
        kind: String,
        #[source]
        source: Box<flag_core::StageError>,
    },
    #[error("{0}")]
    Usage(String),
}

impl EngineError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
