//! One typed error for the whole LLM runtime. Every variant says where the problem is (file,
//! tensor, metadata key, token) so a user can act on it without a backtrace.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, LlmError>;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid GGUF (bad magic, truncated, inconsistent table).
    #[error("{}: invalid GGUF at byte {offset}: {message}", path.display())]
    Gguf {
        path: PathBuf,
        offset: u64,
        message: String,
    },
    /// A tensor type this reader does not dequantise.
    #[error(
        "tensor '{tensor}': unsupported GGML type {ggml_type} ({name}); supported: F32, F16, Q4_0, Q4_1, Q8_0"
    )]
    UnsupportedType {
        tensor: String,
        ggml_type: u32,
        name: &'static str,
    },
    #[error("tensor '{0}' not found in the model file")]
    MissingTensor(String),
    #[error("tensor '{tensor}': expected shape {expected:?}, found {found:?}")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("metadata key '{key}': {message}")]
    Metadata { key: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A model file could not be located; the message lists every place searched.
    #[error("{model} not found. Searched:\n{searched}\n{hint}")]
    ModelNotFound {
        model: String,
        searched: String,
        hint: String,
    },
    #[error("safetensors: {0}")]
    Safetensors(String),
}

impl LlmError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LlmError::Io {
            path: path.into(),
            source,
        }
    }
}
