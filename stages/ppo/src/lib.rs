//! FLAG-Trader (Xiong et al., 2025): PPO fine-tuning of a small LLM as the trading policy.
//!
//! This crate keeps datafusion out (the stage reads and writes through flag-core's Parquet
//! helpers). So far it holds [`loss`], the PPO terms on tch tensors and the advantage
//! estimate, each checked against hand-computed values; the environment, the policy over
//! `flag_llm::trainable` and the `ppo` stage come next (issue "FLAG-Trader end to end").

pub mod loss;
