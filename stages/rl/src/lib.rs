//! Deep RL trading agents on tch.
//!
//! * [`config`]: every hyper-parameter of the TDQN agent, with its source.
//! * [`features`]: the 117-input TDQN observation (window features + position).
//! * [`net`], [`agent`]: the Q-network and the double-DQN learner.
//! * [`train`]: training runs and greedy evaluation in the TDQN environment of
//!   `flag-trading`.
//! * [`stage`]: the `ddqn` stage kind (TDQN, or LLM-guided DDQN when signals are bound).

pub mod adam;
pub mod agent;
pub mod config;
pub mod data;
pub mod features;
pub mod net;
pub mod stage;
pub mod train;

flag_core::stage_kinds!(stage::Ddqn);
