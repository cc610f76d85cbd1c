//! Trading environments, rule-based baselines and performance metrics, in plain Rust.
//!
//! * [`env`]: the TDQN (Théate & Ernst 2021) and FinAgent (Zhang et al. 2024) environments.
//! * [`strategy`]: the baseline rules; [`backtest`]: running them, and the train-split grid
//!   search of the moving-average windows.
//! * [`metrics`]: FinAgent's metrics; the formulas are documented there only.
//! * [`finagent_tools`]: FinAgent's four rule-strategy tools and their records.
//! * [`stages`]: the `baselines`, `metrics` and `finagent_tools` stage kinds.

pub mod backtest;
pub mod env;
pub mod finagent_tools;
pub mod metrics;
pub mod series;
pub mod stages;
pub mod strategy;

flag_core::stage_kinds!(
    stages::baselines::Baselines,
    stages::metrics::MetricsStage,
    stages::finagent_tools::FinAgentTools
);
