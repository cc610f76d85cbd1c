//! FLAG-Trader (Xiong et al., 2025): PPO fine-tuning of a small LLM as the trading policy.
//!
//! - [`loss`]: the PPO terms on tch tensors and the advantage estimate.
//! - [`prompt`]: the state prompt (paper Fig. 3) rendered from `prompts/flag_trader/`.
//! - [`env`]: the [`env::PromptEnv`] seam (text observation + action mask -> reward) and the
//!   FLAG-Trader market environment over daily closes.
//! - [`policy`]: SmolLM2 with a frozen bottom and trainable top as an actor-critic over the
//!   three actions ([`flag_llm::trainable`]), prompts tokenised with the chat template.
//! - [`train`]: the PPO loop with the paper's Table 3 settings; [`checkpoint`]: the trained
//!   tensors and the config that names the base model.
//! - [`stage`]: the `ppo` pipeline stage; [`eval_stage`]: `ppo_eval`, which trades a
//!   checkpoint artifact (an input edge) over another period.
//!
//! The crate keeps datafusion out: the stage reads and writes through flag-core.

pub mod checkpoint;
pub mod env;
pub mod eval_stage;
pub mod loss;
pub mod outputs;
pub mod policy;
pub mod prompt;
pub mod settings;
pub mod stage;
pub mod train;

flag_core::stage_kinds!(stage::Ppo, eval_stage::PpoEval);
