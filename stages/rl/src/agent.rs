//! The double-DQN learner of `TDQN.py`: replay memory, epsilon-greedy with sticky actions,
//! Huber loss on the double-DQN target, Adam with L2, gradient-norm clipping, and a target
//! network copied every `target_update` actions.
use rand::Rng;
use rand::seq::index;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

use crate::config::DdqnConfig;
use crate::features::FeatureMatrix;
use crate::mlp::kernels::Level;
use crate::mlp::{ACTIONS, Adam, Mlp, Workspace};
use crate::net::QNet;

/// One experience. States are not copied: `t` indexes the feature matrix and the next state
/// is always day `t + 1`, so a transition is a few bytes instead of two 117-float vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    pub t: u32,
    pub position: f32,
    /// 0 = SHORT, 1 = LONG.
    pub action: u8,
    pub reward: f32,
    pub next_position: f32,
    pub done: bool,
}

/// Fixed-capacity FIFO memory (the reference's `deque(maxlen=capacity)`).
#[derive(Debug, Clone)]
pub struct Replay {
    capacity: usize,
    items: Vec<Transition>,
    /// Next slot to overwrite once full.
    next: usize,
}

impl Replay {
    pub fn new(capacity: usize) -> Replay {
        Replay {
            capacity,
            items: Vec::with_capacity(capacity.min(1 << 16)),
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn push(&mut self, t: Transition) {
        if self.items.len() < self.capacity {
            self.items.push(t);
        } else {
            self.items[self.next] = t;
            self.next = (self.next + 1) % self.capacity;
        }
    }

    /// `n` distinct transitions (`random.sample`), in sampling order.
    pub fn sample(&self, rng: &mut ChaCha8Rng, n: usize) -> Vec<Transition> {
        index::sample(rng, self.items.len(), n)
            .into_iter()
            .map(|i| self.items[i])
            .collect()
    }
}

/// Where the networks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// [`Mlp`] in plain Rust: the same bytes on every machine, whatever `Level`.
    Cpu(Level),
    /// [`QNet`] on libtorch (a CUDA device): bit-identical on the same kernel path only.
    Torch(Device),
}

impl Backend {
    /// The CPU network at this CPU's best level for `Device::Cpu`, libtorch otherwise.
    pub fn for_device(device: Device) -> Backend {
        match device {
            Device::Cpu => Backend::Cpu(Level::detect()),
            d => Backend::Torch(d),
        }
    }
}

/// Policy and target networks with their optimiser, on one backend.
enum Nets {
    Cpu(Box<CpuNets>),
    Torch(Box<TorchNets>),
}

struct CpuNets {
    policy: Mlp,
    target: Mlp,
    adam: Adam,
    ws: Workspace,
    features: FeatureMatrix,
    /// As [`TorchNets::target_q`], `[2 rows * ACTIONS]`.
    target_q: Option<Vec<f32>>,
    /// Dropout of one step: the states' layers, then the next states' (two forward passes'
    /// order of draws), and the raw draws.
    masks: Vec<Vec<f32>>,
    draws: Vec<u16>,
}

struct TorchNets {
    policy: QNet,
    target: QNet,
    opt: nn::Optimizer,
    /// Feature matrix of the training data, on the device.
    features: Tensor,
    /// The target network's Q-values of every day from both next positions, `[2 rows, 2]`
    /// (row `2 t` short, `2 t + 1` long), filled on the first gradient step after each copy.
    /// A next position is always -1 or 1, and the target network changes only when it is
    /// copied, so one batched pass per copy replaces a 32-row pass per gradient step; in
    /// evaluation mode rows are independent, and the tests pin that the values are the same.
    target_q: Option<Tensor>,
}

/// One sampled batch, as the gradient step needs it.
struct Sampled {
    ts: Vec<i64>,
    pos: Vec<f32>,
    next_pos: Vec<f32>,
    actions: Vec<u8>,
    rewards: Vec<f32>,
    not_done: Vec<f32>,
    /// Row of the target table: `2 (t + 1) + (next position is long)`.
    next_rows: Vec<i64>,
}

/// Policy and target networks, optimiser, replay memory and the run's random generator.
pub struct Agent {
    pub cfg: DdqnConfig,
    pub backend: Backend,
    nets: Nets,
    pub replay: Replay,
    pub rng: ChaCha8Rng,
    /// Actions chosen so far (drives epsilon and the target update, as `self.iterations`).
    pub iterations: u64,
    /// Gradient steps taken.
    pub learn_steps: u64,
    inputs: usize,
}

impl Agent {
    /// An agent on `device`: the CPU network ([`Backend::Cpu`]) for the CPU, libtorch for a
    /// GPU.
    pub fn new(
        cfg: DdqnConfig,
        features: &FeatureMatrix,
        device: Device,
        rng: ChaCha8Rng,
    ) -> Result<Agent, tch::TchError> {
        Agent::on(cfg, features, Backend::for_device(device), rng)
    }

    pub fn on(
        cfg: DdqnConfig,
        features: &FeatureMatrix,
        backend: Backend,
        mut rng: ChaCha8Rng,
    ) -> Result<Agent, tch::TchError> {
        let inputs = features.width + 1;
        let nets = match backend {
            Backend::Cpu(level) => {
                let policy = Mlp::new(&cfg, inputs, level, &mut rng);
                let target = policy.clone();
                let adam = Adam::new(&policy, cfg.learning_rate, cfg.weight_decay);
                let ws = Workspace::new(&policy, cfg.batch_size);
                let layers = if cfg.dropout > 0.0 {
                    2 * cfg.hidden_layers
                } else {
                    0
                };
                let masks = vec![vec![0f32; cfg.batch_size * cfg.hidden]; layers];
                Nets::Cpu(Box::new(CpuNets {
                    policy,
                    target,
                    adam,
                    ws,
                    features: features.clone(),
                    target_q: None,
                    masks,
                    draws: Vec::new(),
                }))
            }
            Backend::Torch(device) => {
                let policy = QNet::new(&cfg, inputs, device, Some(&mut rng));
                let mut target = QNet::new(&cfg, inputs, device, None);
                target.vs.copy(&policy.vs)?;
                let opt = nn::Adam {
                    wd: cfg.weight_decay,
                    ..Default::default()
                }
                .build(&policy.vs, cfg.learning_rate)?;
                let feats = Tensor::from_slice(&features.data)
                    .view([features.rows as i64, features.width as i64])
                    .to_device(device);
                Nets::Torch(Box::new(TorchNets {
                    policy,
                    target,
                    opt,
                    features: feats,
                    target_q: None,
                }))
            }
        };
        Ok(Agent {
            cfg,
            backend,
            nets,
            replay: Replay::new(cfg.replay_capacity),
            rng,
            iterations: 0,
            learn_steps: 0,
            inputs,
        })
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Q-values of the policy network in evaluation mode, `[n][2]`.
    pub fn q_values(&self, ts: &[i64], pos: &[f32]) -> Vec<[f32; 2]> {
        let flat = match &self.nets {
            Nets::Cpu(c) => c.policy.q_values(&c.observations(ts, pos), ts.len()),
            Nets::Torch(t) => t.q_values(ts, pos),
        };
        flat.chunks_exact(2).map(|c| [c[0], c[1]]).collect()
    }

    /// Every policy-network variable by name (PyTorch's layouts), for comparisons.
    pub fn snapshot(&self) -> Vec<(String, Vec<f32>)> {
        match &self.nets {
            Nets::Cpu(c) => c.policy.snapshot(),
            Nets::Torch(t) => t.policy.snapshot(),
        }
    }

    /// Greedy action (ties go to SHORT, action 0).
    pub fn greedy(q: [f32; 2]) -> u8 {
        u8::from(q[1] > q[0])
    }

    /// `chooseActionEpsilonGreedy`: random with probability epsilon; otherwise the previous
    /// action with probability `sticky`, else greedy. Counts the action.
    pub fn act(&mut self, t: usize, position: f32, previous: u8) -> u8 {
        let eps = self.cfg.epsilon_at(self.iterations);
        let action = if self.rng.random::<f64>() > eps {
            if self.rng.random::<f64>() > self.cfg.sticky {
                Agent::greedy(self.q_values(&[t as i64], &[position])[0])
            } else {
                previous
            }
        } else {
            self.rng.random_range(0..2u8)
        };
        self.iterations += 1;
        action
    }

    /// One gradient step on a sampled batch (none until the memory holds a batch).
    /// Returns the Huber loss.
    pub fn learn(&mut self) -> Option<f64> {
        let n = self.cfg.batch_size;
        if self.replay.len() < n {
            return None;
        }
        let batch = self.replay.sample(&mut self.rng, n);
        let s = Sampled {
            ts: batch.iter().map(|b| b.t as i64).collect(),
            pos: batch.iter().map(|b| b.position).collect(),
            next_pos: batch.iter().map(|b| b.next_position).collect(),
            actions: batch.iter().map(|b| b.action).collect(),
            rewards: batch.iter().map(|b| b.reward).collect(),
            not_done: batch
                .iter()
                .map(|b| if b.done { 0.0 } else { 1.0 })
                .collect(),
            next_rows: batch
                .iter()
                .map(|b| 2 * (b.t as i64 + 1) + i64::from(b.next_position > 0.0))
                .collect(),
        };
        let cfg = self.cfg;
        let loss = match &mut self.nets {
            Nets::Cpu(c) => c.learn(&cfg, &s, &mut self.rng),
            Nets::Torch(t) => t.learn(&cfg, &s, &mut self.rng),
        };
        self.learn_steps += 1;
        if self.iterations.is_multiple_of(self.cfg.target_update) {
            match &mut self.nets {
                Nets::Cpu(c) => {
                    c.target.copy_from(&c.policy);
                    c.target_q = None;
                }
                Nets::Torch(t) => {
                    // Same names on both sides by construction, so the copy cannot fail.
                    let _ = t.target.vs.copy(&t.policy.vs);
                    t.target_q = None;
                }
            }
        }
        Some(loss)
    }
}

/// The rows of a target table: every day `t` twice, short (-1) then long (1), so that row
/// `2 t + (position is long)` holds day `t`.
fn every_day_both_positions(days: usize) -> (Vec<i64>, Vec<f32>) {
    let ts = (0..days as i64).flat_map(|t| [t, t]).collect();
    let pos = (0..days).flat_map(|_| [-1.0, 1.0]).collect();
    (ts, pos)
}

impl CpuNets {
    /// Observations `[n, inputs]`: feature row `ts[i]` and position `pos[i]`.
    fn observations(&self, ts: &[i64], pos: &[f32]) -> Vec<f32> {
        let mut x = vec![0f32; ts.len() * (self.features.width + 1)];
        self.features.observations_into(ts, pos, &mut x);
        x
    }

    /// The target network's Q-values of every (day, next position), `[2 rows * ACTIONS]`.
    fn target_table(&self) -> Vec<f32> {
        let (ts, pos) = every_day_both_positions(self.features.rows);
        let x = self.observations(&ts, &pos);
        self.target.q_values(&x, ts.len())
    }

    fn learn(&mut self, cfg: &DdqnConfig, s: &Sampled, rng: &mut ChaCha8Rng) -> f64 {
        let n = s.ts.len();
        // Dropout as two forward passes draw it: the states' layers, then the next states'.
        self.policy
            .fill_dropout_masks(rng, &mut self.draws, &mut self.masks);
        let masks = &self.masks;
        let next_ts: Vec<i64> = s.ts.iter().map(|t| t + 1).collect();
        let (states, next_states) = self
            .ws
            .inputs_mut()
            .split_at_mut(n * (self.features.width + 1));
        self.features.observations_into(&s.ts, &s.pos, states);
        self.features
            .observations_into(&next_ts, &s.next_pos, next_states);
        self.policy.forward_train(&mut self.ws, masks);
        // Double DQN: the policy network (training mode, as the reference) picks the next
        // action, the target network values it.
        let next_a: Vec<usize> = self
            .ws
            .second_q()
            .chunks_exact(ACTIONS)
            .map(|q| usize::from(q[1] > q[0]))
            .collect();
        let gamma = cfg.gamma as f32;
        if self.target_q.is_none() {
            self.target_q = Some(self.target_table());
        }
        let table = self.target_q.as_deref().expect("filled above");
        let q: Vec<f32> = self.ws.first_q().to_vec();
        let dq = self.ws.dq_mut();
        dq.fill(0.0);
        let mut loss = 0f32;
        for i in 0..n {
            let next_q = table[s.next_rows[i] as usize * ACTIONS + next_a[i]];
            let expected = s.rewards[i] + next_q * s.not_done[i] * gamma;
            let a = usize::from(s.actions[i]);
            let d = q[i * ACTIONS + a] - expected;
            // Huber loss with delta 1, mean over the batch.
            loss += if d.abs() < 1.0 {
                0.5 * d * d
            } else {
                d.abs() - 0.5
            };
            dq[i * ACTIONS + a] = d.clamp(-1.0, 1.0) / n as f32;
        }
        self.policy
            .backward(&mut self.ws, &masks[..masks.len() / 2]);
        self.policy
            .clip_and_step(&self.ws, &mut self.adam, cfg.grad_clip);
        f64::from(loss / n as f32)
    }
}

impl TorchNets {
    /// Observations `[n, inputs]` for days `ts` with positions `pos`.
    fn observations(&self, ts: &[i64], pos: &[f32]) -> Tensor {
        let device = self.features.device();
        let idx = Tensor::from_slice(ts).to_device(device);
        let p = Tensor::from_slice(pos)
            .view([pos.len() as i64, 1])
            .to_device(device);
        Tensor::cat(&[self.features.index_select(0, &idx), p], 1)
    }

    /// The policy network's Q-values in evaluation mode, `[n * 2]`.
    fn q_values(&self, ts: &[i64], pos: &[f32]) -> Vec<f32> {
        let q = tch::no_grad(|| {
            self.policy
                .forward(&self.observations(ts, pos), false, None)
        });
        let q = q.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let mut flat = vec![0f32; ts.len() * 2];
        q.view([-1]).copy_data(&mut flat, ts.len() * 2);
        flat
    }

    fn target_table(&mut self) -> &Tensor {
        if self.target_q.is_none() {
            let (ts, pos) = every_day_both_positions(self.features.size()[0] as usize);
            let parts: Vec<Tensor> = tch::no_grad(|| {
                ts.chunks(4096)
                    .zip(pos.chunks(4096))
                    .map(|(t, p)| self.target.forward(&self.observations(t, p), false, None))
                    .collect()
            });
            self.target_q = Some(Tensor::cat(&parts, 0));
        }
        self.target_q.as_ref().expect("filled above")
    }

    fn learn(&mut self, cfg: &DdqnConfig, s: &Sampled, rng: &mut ChaCha8Rng) -> f64 {
        let dev = self.features.device();
        let state = self.observations(&s.ts, &s.pos);
        let next_ts: Vec<i64> = s.ts.iter().map(|t| t + 1).collect();
        let next_state = self.observations(&next_ts, &s.next_pos);
        let actions: Vec<i64> = s.actions.iter().map(|&a| i64::from(a)).collect();
        let actions = Tensor::from_slice(&actions).to_device(dev).unsqueeze(1);
        let q = self
            .policy
            .forward(&state, true, Some(&mut *rng))
            .gather(1, &actions, false)
            .squeeze_dim(1);
        let next_a = tch::no_grad(|| {
            // Double DQN: the policy network picks the next action (in training mode, as the
            // reference), the target network values it.
            self.policy
                .forward(&next_state, true, Some(&mut *rng))
                .argmax(1, true)
        });
        let next_rows = Tensor::from_slice(&s.next_rows).to_device(dev);
        let gamma = cfg.gamma;
        let table = self.target_table();
        let expected = tch::no_grad(|| {
            let next_q = table
                .index_select(0, &next_rows)
                .gather(1, &next_a, false)
                .squeeze_dim(1);
            let r = Tensor::from_slice(&s.rewards).to_device(dev);
            let nd = Tensor::from_slice(&s.not_done).to_device(dev);
            r + next_q * nd * gamma
        });
        let loss = q.huber_loss(&expected, Reduction::Mean, 1.0);
        self.opt.zero_grad();
        loss.backward();
        self.opt.clip_grad_norm(cfg.grad_clip);
        self.opt.step();
        loss.double_value(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn tr(t: u32) -> Transition {
        Transition {
            t,
            position: 0.0,
            action: 0,
            reward: 0.0,
            next_position: 0.0,
            done: false,
        }
    }

    #[test]
    fn replay_is_fifo_with_capacity() {
        let mut r = Replay::new(3);
        for t in 0..5 {
            r.push(tr(t));
        }
        let mut ts: Vec<u32> = r.items.iter().map(|x| x.t).collect();
        ts.sort();
        assert_eq!(ts, vec![2, 3, 4]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let s = r.sample(&mut rng, 3);
        let mut got: Vec<u32> = s.iter().map(|x| x.t).collect();
        got.sort();
        assert_eq!(got, vec![2, 3, 4], "sampling is without replacement");
    }

    #[test]
    fn epsilon_schedule() {
        let c = DdqnConfig::default();
        assert_eq!(c.epsilon_at(0), 1.0);
        assert!((c.epsilon_at(10_000) - (0.01 + 0.99 / std::f64::consts::E)).abs() < 1e-12);
        assert!(c.epsilon_at(1_000_000) < 0.0101);
    }
}
