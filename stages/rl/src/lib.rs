//! Deep RL trading agents: on the CPU in plain Rust ([`mlp`]), on CUDA through tch.
//!
//! * [`config`]: every hyper-parameter of the TDQN agent, with its source.
//! * [`features`]: the 117-input TDQN observation (window features + position).
//! * [`mlp`]: the Q-network, its training step and Adam on the CPU, with arithmetic fixed by
//!   the source (the same bytes on every machine); [`net`]: the same network on libtorch
//!   (CUDA); [`agent`]: the double-DQN learner over either.
//! * [`train`]: training runs and greedy evaluation in the TDQN environment of
//!   `flag-trading`.
//! * [`stage`]: the `ddqn` stage kind (TDQN, or LLM-guided DDQN when signals are bound).

pub mod agent;
pub mod config;
pub mod data;
pub mod features;
pub mod mlp;
pub mod net;
pub mod stage;
pub mod train;

flag_core::stage_kinds!(stage::Ddqn);
