//! Every number of the TDQN / DDQN agent, in one place.
use tch::Device;

/// Hyper-parameters of the TDQN agent.
///
/// Defaults are those of Théate & Ernst (2021), "An application of deep reinforcement
/// learning to algorithmic trading", Expert Systems with Applications 173, Table 3 / §4, as
/// set in the authors' public code (`TDQN.py` global variables and `tradingSimulator.py`:
/// `gamma = 0.4`, `learningRate = 0.0001`, `targetNetworkUpdate = 1000`,
/// `learningUpdatePeriod = 1`, `capacity = 100000`, `batchSize = 32`,
/// `numberOfNeurons = 512`, `dropout = 0.2`, `epsilonStart = 1.0`, `epsilonEnd = 0.01`,
/// `epsilonDecay = 10000`, `alpha = 0.1` (sticky actions), `filterOrder = 5`,
/// `gradientClipping = 1`, `rewardClipping = 1`, `L2Factor = 0.000001`, `stateLength = 30`,
/// `numberOfEpisodes = 50`, `money = 100000`, `transactionCosts = 0.1 / 100`), which the
/// LLM-guided RL paper's public code reuses unchanged for its DDQN baseline and its
/// LLM-guided DDQN (the latter only appends the LLM features to the observation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdqnConfig {
    /// Days in the observation window (`stateLength`). A window of `w` days gives `w - 1`
    /// values of each of the 4 features, so 4 (w - 1) + 1 (position) = 117 inputs for 30.
    pub window: usize,
    /// Width of the hidden layers (`numberOfNeurons`).
    pub hidden: usize,
    /// Number of hidden layers (Linear + BatchNorm + LeakyReLU + Dropout); with the output
    /// layer the network has `hidden_layers + 1` = 5 linear layers.
    pub hidden_layers: usize,
    pub dropout: f64,
    /// Negative slope of LeakyReLU (PyTorch's default, as `F.leaky_relu`).
    pub leaky_slope: f64,
    pub batch_norm_eps: f64,
    pub batch_norm_momentum: f64,
    /// Discount factor.
    pub gamma: f64,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Adam weight decay (L2 added to the gradient, PyTorch `Adam(weight_decay=...)`).
    pub weight_decay: f64,
    /// Copy the policy network into the target network every this many actions.
    pub target_update: u64,
    /// One gradient step every this many environment steps.
    pub learning_update_period: u64,
    pub replay_capacity: usize,
    pub batch_size: usize,
    pub epsilon_start: f64,
    pub epsilon_end: f64,
    /// `epsilon(i) = end + (start - end) exp(-i / decay)`, `i` = actions taken so far.
    pub epsilon_decay: f64,
    /// Probability of repeating the previous action when exploiting (sticky actions).
    pub sticky: f64,
    /// Rewards are clipped to `[-reward_clip, reward_clip]`.
    pub reward_clip: f64,
    /// Max global L2 norm of the gradient.
    pub grad_clip: f64,
    pub episodes: usize,
    /// Low-pass filter (causal moving average) order of the data augmentation; 1 disables it.
    pub filter_order: usize,
    pub initial_capital: f64,
    /// Proportional transaction cost (0.001 = 0.1 %).
    pub cost: f64,
    /// TDQN short-exposure price move ε of the environment.
    pub short_epsilon: f64,
}

impl Default for DdqnConfig {
    fn default() -> Self {
        DdqnConfig {
            window: 30,
            hidden: 512,
            hidden_layers: 4,
            dropout: 0.2,
            leaky_slope: 0.01,
            batch_norm_eps: 1e-5,
            batch_norm_momentum: 0.1,
            gamma: 0.4,
            learning_rate: 1e-4,
            weight_decay: 1e-6,
            target_update: 1_000,
            learning_update_period: 1,
            replay_capacity: 100_000,
            batch_size: 32,
            epsilon_start: 1.0,
            epsilon_end: 0.01,
            epsilon_decay: 10_000.0,
            sticky: 0.1,
            reward_clip: 1.0,
            grad_clip: 1.0,
            episodes: 50,
            filter_order: 5,
            initial_capital: 100_000.0,
            cost: 0.001,
            short_epsilon: 0.1,
        }
    }
}

impl DdqnConfig {
    /// Values of each market feature in the window: returns need the previous close.
    pub fn per_feature(&self) -> usize {
        self.window - 1
    }

    /// Market part of the observation: 4 features x (window - 1) days.
    pub fn market_inputs(&self) -> usize {
        4 * self.per_feature()
    }

    /// Observation size: market features, then `extra` per-day features, then the position.
    pub fn observation_size(&self, extra: usize) -> usize {
        self.market_inputs() + extra + 1
    }

    /// Exploration rate after `iteration` actions.
    pub fn epsilon_at(&self, iteration: u64) -> f64 {
        self.epsilon_end
            + (self.epsilon_start - self.epsilon_end)
                * (-(iteration as f64) / self.epsilon_decay).exp()
    }

    /// Rejects values the training loop cannot run with.
    pub fn validate(&self) -> Result<(), String> {
        if self.window < 2 {
            return Err(format!("window must be >= 2, got {}", self.window));
        }
        if self.hidden == 0 || self.hidden_layers == 0 {
            return Err("the network needs at least one hidden layer of width >= 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if self.batch_size == 0 || self.replay_capacity < self.batch_size {
            return Err("batch_size must be >= 1 and <= replay_capacity".into());
        }
        if self.target_update == 0 || self.learning_update_period == 0 {
            return Err("target_update and learning_update_period must be >= 1".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(format!(
                "learning_rate must be a positive number, got {}",
                self.learning_rate
            ));
        }
        if self.filter_order == 0 {
            return Err("filter_order must be >= 1 (1 = no filter)".into());
        }
        if self.initial_capital <= 0.0 || !(0.0..1.0).contains(&self.cost) {
            return Err("initial_capital must be > 0 and cost in [0, 1)".into());
        }
        Ok(())
    }
}

/// Where the networks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// `cpu`, `cuda`, or `auto` (cuda when available).
    pub fn parse(s: &str) -> Option<DeviceChoice> {
        match s {
            "cpu" => Some(DeviceChoice::Cpu),
            "cuda" => Some(DeviceChoice::Cuda),
            "auto" => Some(if flag_core::numerics::cuda_present() {
                DeviceChoice::Cuda
            } else {
                DeviceChoice::Cpu
            }),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        }
    }

    pub fn device(self) -> Device {
        match self {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda => Device::Cuda(0),
        }
    }
}
