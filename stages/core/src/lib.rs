//! The contract between the `flag` engine and the stages.
//!
//! A stage author implements [`Stage`]: it declares its inputs, outputs and params in a
//! [`StageSpec`], names the bytes that define its behaviour in a [`Fingerprint`], and does its
//! work in [`Stage::run`] through a [`StageContext`]. The engine owns hashing, caching, staging
//! directories, locking and progress; a stage never touches the store itself.

pub mod context;
pub mod error;
pub mod numerics;
pub mod params;
pub mod parquet_io;
pub mod schema;
pub mod spec;

pub use context::{InputArtifact, ProgressFn, StageContext};
pub use error::{StageError, StageResult};
pub use numerics::Numerics;
pub use params::Params;
pub use schema::{ColumnType, Schema, SchemaRegistry};
pub use spec::{
    Fingerprint, InputSpec, OutputKind, OutputSpec, ParamKind, ParamSpec, RunStage, Stage,
    StageSpec,
};

/// Re-exported so stage crates use the exact arrow the engine writes with.
pub use arrow;
pub use parquet;
