use std::path::PathBuf;

pub type StageResult<T> = Result<T, StageError>;

/// Errors a stage reports. Each variant carries the context a user needs to act on it:
/// the file, the line/row and the field, or the param, or the input.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Bad data in an input file: names file, 1-based line (or row) and field.
    #[error("{}:{line}: column '{column}': {message}", file.display())]
    Data {
        file: PathBuf,
        line: u64,
        column: String,
        message: String,
    },
    /// A problem with a whole file (missing, empty, wrong header).
    #[error("{}: {message}", file.display())]
    File { file: PathBuf, message: String },
    /// A param has the wrong type or an invalid value.
    #[error("param '{name}': {message}")]
    Param { name: String, message: String },
    /// An input artifact is missing or does not match its schema.
    #[error("input '{input}': {message}")]
    Input { input: String, message: String },
    /// An output does not match its schema, or could not be written.
    #[error("output '{output}': {message}")]
    Output { output: String, message: String },
    /// Untrusted model output or another invalid value met during processing.
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("{context}: {source}")]
    Parquet {
        context: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// Errors from heavier libraries (DataFusion, tch) wrapped with context by the stage.
    #[error("{context}: {message}")]
    External { context: String, message: String },
}

impl StageError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StageError::Io {
            context: context.into(),
            source,
        }
    }
    pub fn external(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        StageError::External {
            context: context.into(),
            message: err.to_string(),
        }
    }
    pub fn param(name: impl Into<String>, message: impl Into<String>) -> Self {
        StageError::Param {
            name: name.into(),
            message: message.into(),
        }
    }
    pub fn data(
        file: impl Into<PathBuf>,
        line: u64,
        column: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        StageError::Data {
            file: file.into(),
            line,
            column: column.into(),
            message: message.into(),
        }
    }
    pub fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        StageError::File {
            file: file.into(),
            message: message.into(),
        }
    }
}
