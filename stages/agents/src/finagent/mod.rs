//! FinAgent (Zhang et al., KDD 2024) as pipeline stages.
//!
//! Per trading day and asset the method makes five LLM calls; here they are split by what
//! they depend on, so the cache shares everything that does not read the agent's own
//! decisions across ablations:
//!
//! | module | stage | depends on decisions |
//! |---|---|---|
//! | latest market intelligence (M) | `finagent_intel` | no |
//! | diversified retrieval | `memory_search` (crate module `memory`) | no |
//! | past market intelligence (M) | `finagent_past_intel` | no |
//! | low-level reflection (L) | `finagent_low_reflection` | no |
//! | high-level reflection (H) + decision (D) + environment | `finagent` | yes |
//!
//! Every answer is one JSON object whose form the embedded decoder enforces (the schemas in
//! `prompts/finagent/`, with per-prompt list lengths pinned: [`module`]), parsed and
//! range-checked again ([`answer`]); a failure after the bounded retries is a recorded row.
//!
//! Choices where the paper and the authors' code disagree or are silent:
//! * **News timing.** The released code keys news by calendar date, so after-close news
//!   enters that day's decision (look-ahead). Here a module sees the items whose
//!   `trading_date` is the decision day: the ingest already moved after-close and weekend
//!   items to the next trading day. Memory at day t is the items with trading_date < t.
//! * **Which news.** At most `max_items` per day, the latest published (freshest at the
//!   decision), shown in publication order; deterministic.
//! * **Charts.** A text-only model gets the Kline and trading charts as tables of the same
//!   series plus facts read off them ([`text`]); nothing after the decision day enters.
pub mod agent;
pub mod agent_config;
pub mod agent_state;
pub mod agent_tables;
pub mod agent_text;
pub mod answer;
pub mod chart_png;
pub mod config;
pub mod data;
pub mod intel;
pub mod memory_view;
pub mod module;
pub mod reflect;
pub mod text;
pub mod tools;
pub mod usage;

flag_core::stage_kinds!(
    intel::LatestIntel,
    intel::PastIntel,
    reflect::LowLevelReflection,
    agent::FinAgentStage
);
