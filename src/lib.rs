//! The engine behind the `flag` (coordinator) and `flag-worker` binaries.
//!
//! pipeline YAML -> validated DAG (pipeline/) -> cache keys (cache/) -> content-addressed
//! store (store/) -> scheduler (scheduler/) -> worker processes (worker/) -> CLI (cli/).
//!
//! The two binaries share this library; each links only what it calls. `flag` plans, keys,
//! locks and commits through the stage *declarations* ([`flag_core::Stage`]); the work of a
//! stage ([`flag_core::RunStage`], and with it libtorch) is reached only from `flag-worker`.
pub mod cache;
pub mod cli;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod pipeline;
pub mod registry;
pub mod scheduler;
pub mod store;
pub mod worker;

/// An error and its causes on one line, each cause once: most of the engine's errors already
/// say their source in their own text (`reading x: No such file or directory`), and anyhow's
/// `{:#}` would add it again.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}
