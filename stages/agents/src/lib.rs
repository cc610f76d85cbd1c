//! LLM agent stages of the LLM-guided RL method.
//!
//! * [`strategist`]: every `period` trading days per ticker, an anonymised prompt (versions
//!   P0..P4 in `prompts/strategist/`) -> strict JSON strategy -> the daily `llm_signal`
//!   (direction, strength = sqrt(confidence / 3 * certainty), interaction) the LLM-guided
//!   DDQN reads. The signal math and which tokens count: [`signal`].
//! * [`analyst`]: daily news -> 2-5 anonymised factors (`news_factors`), shown by prompt P4.
//! * [`llm_only`]: the signal's direction traded in the TDQN environment.
//! * The model behind them is a `flag_llm::backend::LlmBackend` (embedded engine or an
//!   OpenAI-compatible server, picked by the `backend` param); this crate keeps prompts,
//!   parsing ([`parse`]: model output is untrusted input), signals and stages.

pub mod analyst;
pub mod anon;
pub mod finagent;
pub mod llm_only;
pub mod memory;
pub mod parse;
pub mod prompt;
pub mod runner;
pub mod signal;
pub mod strategist;
pub mod util;

#[cfg(test)]
mod parse_corpus;

use flag_core::Stage;

/// Every stage kind this crate provides.
pub fn stages() -> Vec<Box<dyn Stage>> {
    let mut v: Vec<Box<dyn Stage>> = vec![
        Box::new(strategist::Strategist),
        Box::new(analyst::Analyst),
        Box::new(llm_only::LlmOnly),
    ];
    v.extend(finagent::stages());
    v.extend(memory::stages());
    v
}

/// The stage kinds of this crate with their work, for the worker process.
pub fn runners() -> Vec<Box<dyn flag_core::RunStage>> {
    let mut v: Vec<Box<dyn flag_core::RunStage>> = vec![
        Box::new(strategist::Strategist),
        Box::new(analyst::Analyst),
        Box::new(llm_only::LlmOnly),
    ];
    v.extend(finagent::runners());
    v.extend(memory::runners());
    v
}
