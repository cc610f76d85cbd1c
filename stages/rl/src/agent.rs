//! The double-DQN learner of `TDQN.py`: replay memory, epsilon-greedy with sticky actions,
//! Huber loss on the double-DQN target, Adam with L2, gradient-norm clipping, and a target
//! network copied every `target_update` actions.
use rand::Rng;
use rand::seq::index;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

use crate::adam::FusedAdam;
use crate::config::DdqnConfig;
use crate::features::FeatureMatrix;
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

/// Adam: fused on x86 CPUs (libtorch's arithmetic in two passes, see [`FusedAdam`]),
/// libtorch's elsewhere.
enum Optimiser {
    Torch(nn::Optimizer),
    Fused(FusedAdam),
}

impl Optimiser {
    fn zero_grad(&mut self) {
        match self {
            Optimiser::Torch(o) => o.zero_grad(),
            Optimiser::Fused(o) => o.zero_grad(),
        }
    }

    fn clip_grad_norm(&self, max: f64) {
        match self {
            Optimiser::Torch(o) => o.clip_grad_norm(max),
            Optimiser::Fused(o) => o.clip_grad_norm(max),
        }
    }

    fn step(&mut self) {
        match self {
            Optimiser::Torch(o) => o.step(),
            Optimiser::Fused(o) => o.step(),
        }
    }
}

/// Policy and target networks, optimiser, replay memory and the run's random generator.
pub struct Agent {
    pub cfg: DdqnConfig,
    pub device: Device,
    pub policy: QNet,
    target: QNet,
    opt: Optimiser,
    pub replay: Replay,
    pub rng: ChaCha8Rng,
    /// Actions chosen so far (drives epsilon and the target update, as `self.iterations`).
    pub iterations: u64,
    /// Gradient steps taken.
    pub learn_steps: u64,
    /// Feature matrix of the training data, on the device.
    features: Tensor,
    inputs: usize,
    /// The target network's Q-values of every day from both next positions, `[2 rows, 2]`
    /// (row `2 t` short, `2 t + 1` long), filled on the first gradient step after each copy.
    /// A next position is always -1 or 1, and the target network changes only when it is
    /// copied, so one batched pass per copy replaces a 32-row pass per gradient step; in
    /// evaluation mode rows are independent, and the tests pin that the values are the same.
    target_q: Option<Tensor>,
}

impl Agent {
    pub fn new(
        cfg: DdqnConfig,
        features: &FeatureMatrix,
        device: Device,
        mut rng: ChaCha8Rng,
    ) -> Result<Agent, tch::TchError> {
        let inputs = features.width + 1;
        let policy = QNet::new(&cfg, inputs, device, Some(&mut rng));
        let mut target = QNet::new(&cfg, inputs, device, None);
        target.vs.copy(&policy.vs)?;
        let fused = match device {
            Device::Cpu => FusedAdam::for_this_cpu(
                policy.vs.trainable_variables(),
                cfg.learning_rate,
                cfg.weight_decay,
            ),
            _ => None,
        };
        let opt = match fused {
            Some(adam) => Optimiser::Fused(adam.map_err(tch::TchError::Kind)?),
            None => Optimiser::Torch(
                nn::Adam {
                    wd: cfg.weight_decay,
                    ..Default::default()
                }
                .build(&policy.vs, cfg.learning_rate)?,
            ),
        };
        let feats = Tensor::from_slice(&features.data)
            .view([features.rows as i64, features.width as i64])
            .to_device(device);
        Ok(Agent {
            cfg,
            device,
            policy,
            target,
            opt,
            replay: Replay::new(cfg.replay_capacity),
            rng,
            iterations: 0,
            learn_steps: 0,
            features: feats,
            inputs,
            target_q: None,
        })
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Observations `[n, inputs]` for days `ts` with positions `pos`.
    fn observations(&self, ts: &[i64], pos: &[f32]) -> Tensor {
        let idx = Tensor::from_slice(ts).to_device(self.device);
        let p = Tensor::from_slice(pos)
            .view([pos.len() as i64, 1])
            .to_device(self.device);
        Tensor::cat(&[self.features.index_select(0, &idx), p], 1)
    }

    /// Q-values of the policy network in evaluation mode, `[n][2]`.
    pub fn q_values(&self, ts: &[i64], pos: &[f32]) -> Vec<[f32; 2]> {
        let q = tch::no_grad(|| {
            self.policy
                .forward(&self.observations(ts, pos), false, None)
        });
        let q = q.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let mut flat = vec![0f32; ts.len() * 2];
        q.view([-1]).copy_data(&mut flat, ts.len() * 2);
        flat.chunks_exact(2).map(|c| [c[0], c[1]]).collect()
    }

    /// The target network's Q-values of every (day, next position), `[2 rows, 2]`.
    fn target_table(&mut self) -> &Tensor {
        if self.target_q.is_none() {
            let rows = self.features.size()[0];
            let ts: Vec<i64> = (0..rows).flat_map(|t| [t, t]).collect();
            let pos: Vec<f32> = (0..rows).flat_map(|_| [-1.0, 1.0]).collect();
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
        let ts: Vec<i64> = batch.iter().map(|b| b.t as i64).collect();
        let next_ts: Vec<i64> = batch.iter().map(|b| b.t as i64 + 1).collect();
        let pos: Vec<f32> = batch.iter().map(|b| b.position).collect();
        let next_pos: Vec<f32> = batch.iter().map(|b| b.next_position).collect();
        let actions: Vec<i64> = batch.iter().map(|b| b.action as i64).collect();
        let rewards: Vec<f32> = batch.iter().map(|b| b.reward).collect();
        let not_done: Vec<f32> = batch
            .iter()
            .map(|b| if b.done { 0.0 } else { 1.0 })
            .collect();
        let dev = self.device;
        let state = self.observations(&ts, &pos);
        let next_state = self.observations(&next_ts, &next_pos);
        let next_rows: Vec<i64> = batch
            .iter()
            .map(|b| 2 * (b.t as i64 + 1) + i64::from(b.next_position > 0.0))
            .collect();
        let actions = Tensor::from_slice(&actions).to_device(dev).unsqueeze(1);
        let q = self
            .policy
            .forward(&state, true, Some(&mut self.rng))
            .gather(1, &actions, false)
            .squeeze_dim(1);
        let next_a = tch::no_grad(|| {
            // Double DQN: the policy network picks the next action (in training mode, as the
            // reference), the target network values it.
            self.policy
                .forward(&next_state, true, Some(&mut self.rng))
                .argmax(1, true)
        });
        let next_rows = Tensor::from_slice(&next_rows).to_device(dev);
        let gamma = self.cfg.gamma;
        let table = self.target_table();
        let expected = tch::no_grad(|| {
            let next_q = table
                .index_select(0, &next_rows)
                .gather(1, &next_a, false)
                .squeeze_dim(1);
            let r = Tensor::from_slice(&rewards).to_device(dev);
            let nd = Tensor::from_slice(&not_done).to_device(dev);
            r + next_q * nd * gamma
        });
        let loss = q.huber_loss(&expected, Reduction::Mean, 1.0);
        self.opt.zero_grad();
        loss.backward();
        self.opt.clip_grad_norm(self.cfg.grad_clip);
        self.opt.step();
        self.learn_steps += 1;
        if self.iterations.is_multiple_of(self.cfg.target_update) {
            // Same names on both sides by construction, so the copy cannot fail.
            let _ = self.target.vs.copy(&self.policy.vs);
            self.target_q = None;
        }
        Some(loss.double_value(&[]))
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
