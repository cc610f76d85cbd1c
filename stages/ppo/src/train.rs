//! The PPO loop (CleanRL's single-environment PPO, as FLAG-Trader builds on it) with the
//! paper's Table 3 settings as defaults.
//!
//! Per iteration: a rollout of `num_steps` steps (each prompt runs the frozen bottom once;
//! its output is kept, so the update runs only the trainable top), GAE, then `update_epochs`
//! passes over the shuffled batch in minibatches of `minibatch_size`. Each minibatch is
//! processed in `grad_accum_steps` micro-batches whose gradients add up (each weighted by
//! its share of the minibatch), then clipped to `max_grad_norm` and applied by one Adam step.
//!
//! Choices the paper leaves open, and why:
//! - Batch = num_steps = 40 and minibatch_size = 32 gives, per epoch, one minibatch of 32
//!   and one of 8 (CleanRL's `range(0, batch, minibatch)` slicing): every sample is used
//!   once per epoch. With 8 accumulation steps a 32-minibatch runs as 8 micro-batches of 4.
//! - Iterations = total_timesteps / num_steps, rounded down (CleanRL): 13,860 / 40 = 346.
//! - Advantages are normalised per minibatch (CleanRL), before the micro-batch split.
//! - The KL penalty (kl_coef) is KL(pi || pi_0) over the allowed actions to the policy at
//!   the start of training (a frozen copy of the initial top blocks and heads), added to the
//!   loss; target_kl (None in the paper) stops an iteration's epochs early when set.
//! - Adam with eps 1e-5 (CleanRL); the learning rate anneals linearly to 0 over the
//!   iterations (lr_i = (1 - (i - 1) / iterations) lr).
//! - The transformer blocks and the freshly initialised heads share one Adam; param
//!   `backbone_lr_scale` (default 1: the paper) lets the blocks learn slower. Measured here
//!   on the CPU with the real model: at 5e-4 on the blocks one Adam step moved a bandit
//!   policy so far (approx KL 0.39 in the first iteration) that it turned deterministic and
//!   stopped learning, and a supervised probe on the same prompts diverged, while 5e-5
//!   learned; see the issue note for the numbers.
//! - Actions are sampled from the masked policy with a ChaCha8 stream seeded by `seed`
//!   (exact probabilities in f64), so a CPU run is reproducible bit for bit.

use std::time::Instant;

use flag_llm::trainable::{FrozenHidden, TopStack};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig};

use crate::env::{FlagMarketEnv, Observation, PathDay, PromptEnv};
use crate::loss::{
    clipped_policy_loss, explained_variance, gae, kl_to_reference, masked_entropy,
    masked_log_softmax, normalize_advantages, value_loss,
};
use crate::policy::LlmPolicy;

/// PPO settings (defaults: FLAG-Trader Table 3).
#[derive(Debug, Clone, PartialEq)]
pub struct PpoConfig {
    pub total_timesteps: usize,
    pub num_steps: usize,
    pub learning_rate: f64,
    /// The trainable transformer blocks learn at learning_rate x this (the heads at
    /// learning_rate).
    pub backbone_lr_scale: f64,
    pub anneal_lr: bool,
    pub gamma: f64,
    pub gae_lambda: f64,
    pub update_epochs: usize,
    pub norm_adv: bool,
    pub clip_coef: f64,
    pub clip_vloss: bool,
    pub ent_coef: f64,
    pub vf_coef: f64,
    pub kl_coef: f64,
    pub max_grad_norm: f64,
    pub target_kl: Option<f64>,
    pub minibatch_size: usize,
    pub grad_accum_steps: usize,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            total_timesteps: 13_860,
            num_steps: 40,
            learning_rate: 5e-4,
            backbone_lr_scale: 1.0,
            anneal_lr: true,
            gamma: 0.95,
            gae_lambda: 0.98,
            update_epochs: 1,
            norm_adv: true,
            clip_coef: 0.2,
            clip_vloss: true,
            ent_coef: 0.05,
            vf_coef: 0.5,
            kl_coef: 0.05,
            max_grad_norm: 0.5,
            target_kl: None,
            minibatch_size: 32,
            grad_accum_steps: 8,
        }
    }
}

impl PpoConfig {
    pub fn iterations(&self) -> usize {
        self.total_timesteps / self.num_steps.max(1)
    }

    /// The first invalid setting, as (name, why).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let pos = |name: &'static str, v: usize| {
            if v == 0 {
                Err((name, "must be at least 1".to_string()))
            } else {
                Ok(())
            }
        };
        pos("num_steps", self.num_steps)?;
        pos("update_epochs", self.update_epochs)?;
        pos("minibatch_size", self.minibatch_size)?;
        pos("grad_accum_steps", self.grad_accum_steps)?;
        if self.total_timesteps < self.num_steps {
            return Err((
                "total_timesteps",
                format!("must be at least num_steps ({})", self.num_steps),
            ));
        }
        let unit = |name: &'static str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err((name, format!("must be in [0, 1], got {v}")))
            }
        };
        unit("gamma", self.gamma)?;
        unit("gae_lambda", self.gae_lambda)?;
        let nonneg = |name: &'static str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err((name, format!("must be a finite number >= 0, got {v}")))
            }
        };
        nonneg("clip_coef", self.clip_coef)?;
        nonneg("ent_coef", self.ent_coef)?;
        nonneg("vf_coef", self.vf_coef)?;
        nonneg("kl_coef", self.kl_coef)?;
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 {
            return Err(("learning_rate", "must be > 0".into()));
        }
        if !self.backbone_lr_scale.is_finite() || self.backbone_lr_scale < 0.0 {
            return Err(("backbone_lr_scale", "must be a finite number >= 0".into()));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            return Err(("max_grad_norm", "must be > 0".into()));
        }
        Ok(())
    }
}

/// One rollout step, as the per-decision table shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub iteration: usize,
    pub global_step: usize,
    pub date: Option<i32>,
    pub probs: Vec<f64>,
    pub action: usize,
    pub value: f64,
    pub reward: f64,
    pub done: bool,
}

/// One iteration's diagnostics (means over its minibatches, weighted by size).
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateLog {
    pub iteration: usize,
    pub global_step: usize,
    pub learning_rate: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub entropy: f64,
    pub kl_ref: f64,
    pub approx_kl: f64,
    pub clip_fraction: f64,
    pub explained_variance: f64,
    /// Gradient norm before clipping (mean over the iteration's optimizer steps).
    pub grad_norm: f64,
    pub mean_reward: f64,
    /// Sum of rewards of the episodes that ended in this rollout (None if none ended).
    pub episode_return: Option<f64>,
    pub rollout_ms: f64,
    pub update_ms: f64,
    pub steps_per_s: f64,
    pub prompt_tokens_per_s: f64,
}

pub struct TrainOutput {
    pub log: Vec<UpdateLog>,
    pub steps: Vec<StepRecord>,
}

/// What the rollout keeps of one step.
struct Stored {
    frozen: FrozenHidden,
    mask: Vec<bool>,
    action: usize,
    logp: f64,
    value: f64,
    ref_logp: Vec<f64>,
    reward: f64,
    /// This step's state starts an episode.
    starts: bool,
}

fn mask_tensor(masks: &[&[bool]], dev: Device) -> Tensor {
    let flat: Vec<bool> = masks.iter().flat_map(|m| m.iter().copied()).collect();
    let n = masks.first().map_or(0, |m| m.len()) as i64;
    Tensor::from_slice(&flat)
        .view([masks.len() as i64, n])
        .to_device(dev)
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(
        t.to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )
    .unwrap_or_default()
}

/// Samples an index from probabilities that sum to ~1 (masked entries are exactly 0).
pub fn sample(probs: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let u: f64 = rng.random::<f64>() * probs.iter().sum::<f64>();
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last = i;
            acc += p;
            if u < acc {
                return i;
            }
        }
    }
    last
}

/// The index of the largest probability among allowed actions (ties: the lowest index).
pub fn greedy(probs: &[f64], mask: &[bool]) -> usize {
    let mut best = None::<(usize, f64)>;
    for (i, (&p, &ok)) in probs.iter().zip(mask).enumerate() {
        if ok && best.is_none_or(|(_, b)| p > b) {
            best = Some((i, p));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// One decision of the current policy: (frozen output, action probabilities, value,
/// reference log-probabilities).
pub struct Decision {
    pub frozen: FrozenHidden,
    pub probs: Vec<f64>,
    pub logp: Vec<f64>,
    pub value: f64,
    pub tokens: usize,
}

/// Evaluates the policy (and optionally a reference top) on one observation, without grad.
pub fn decide(
    policy: &LlmPolicy,
    reference: Option<&TopStack>,
    obs: &Observation,
) -> Result<(Decision, Option<Vec<f64>>), String> {
    let (ids, head) = policy.encode_with_head(&obs.prompt)?;
    if obs.mask.len() != 3 || !obs.mask.iter().any(|&m| m) {
        return Err(format!("the action mask {:?} allows nothing", obs.mask));
    }
    let frozen = policy.frozen_with_head(&ids, head)?;
    let dev = policy.device();
    let mask = mask_tensor(&[&obs.mask], dev);
    tch::no_grad(|| {
        let (logits, value) = policy
            .net
            .head_forward(&frozen)
            .map_err(|e| e.to_string())?;
        let logp = masked_log_softmax(&logits.to_kind(Kind::Double), &mask);
        let ref_logp = match reference {
            Some(top) => {
                let (l, _) = policy
                    .net
                    .head_forward_with(top, &frozen)
                    .map_err(|e| e.to_string())?;
                Some(to_vec(&masked_log_softmax(&l.to_kind(Kind::Double), &mask)))
            }
            None => None,
        };
        let probs = to_vec(&logp.exp());
        Ok((
            Decision {
                frozen,
                probs,
                logp: to_vec(&logp),
                value: value.to_kind(Kind::Double).double_value(&[0]),
                tokens: ids.len(),
            },
            ref_logp,
        ))
    })
}

/// One micro-batch of the update: the cached frozen outputs (left-padded) and what the
/// rollout recorded, on the policy's device. `advantages` are already normalised.
pub struct MicroBatch {
    pub frozen: FrozenHidden,
    /// [n, 3] bool, true = allowed.
    pub mask: Tensor,
    /// [n] i64.
    pub actions: Tensor,
    pub old_logp: Tensor,
    pub old_values: Tensor,
    pub returns: Tensor,
    pub advantages: Tensor,
    /// [n, 3] log-probabilities of the initial policy (-inf where masked).
    pub ref_logp: Tensor,
}

/// The loss of one micro-batch and its terms.
pub struct LossTerms {
    /// pg - ent_coef * entropy + vf_coef * value + kl_coef * kl_ref.
    pub loss: Tensor,
    pub policy: Tensor,
    pub value: Tensor,
    pub entropy: Tensor,
    pub kl_ref: Tensor,
    pub approx_kl: f64,
    pub clip_fraction: f64,
}

/// PPO's loss on one micro-batch (the trainable top runs; the frozen part is cached).
pub fn ppo_loss(policy: &LlmPolicy, cfg: &PpoConfig, mb: &MicroBatch) -> Result<LossTerms, String> {
    let (logits, new_v) = policy
        .net
        .head_forward(&mb.frozen)
        .map_err(|e| e.to_string())?;
    let logp_all = masked_log_softmax(&logits, &mb.mask);
    let new_logp = logp_all
        .gather(1, &mb.actions.unsqueeze(1), false)
        .squeeze_dim(1);
    let pg = clipped_policy_loss(&new_logp, &mb.old_logp, &mb.advantages, cfg.clip_coef);
    let value = value_loss(
        &new_v,
        &mb.old_values,
        &mb.returns,
        cfg.clip_vloss.then_some(cfg.clip_coef),
    );
    let entropy = masked_entropy(&logp_all, &mb.mask).mean(Kind::Float);
    let kl_ref = kl_to_reference(&logp_all, &mb.ref_logp, &mb.mask);
    let loss = &pg.loss - cfg.ent_coef * &entropy + cfg.vf_coef * &value + cfg.kl_coef * &kl_ref;
    Ok(LossTerms {
        loss,
        policy: pg.loss,
        value,
        entropy,
        kl_ref,
        approx_kl: pg.approx_kl,
        clip_fraction: pg.clip_fraction,
    })
}

/// Global L2 norm of the gradients of `vars`; scales them to `max_norm` when larger (as
/// torch's clip_grad_norm_). Returns the norm before clipping.
pub fn clip_gradients(vars: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let mut sq = 0.0;
        for v in vars {
            let g = v.grad();
            if g.defined() {
                sq += g
                    .to_kind(Kind::Double)
                    .square()
                    .sum(Kind::Double)
                    .double_value(&[]);
            }
        }
        let norm = sq.sqrt();
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for v in vars {
                let mut g = v.grad();
                if g.defined() {
                    let _ = g.f_mul_(&Tensor::from(coef).to_kind(g.kind()).to_device(g.device()));
                }
            }
        }
        norm
    })
}

/// Trains `policy` (its trainable tensors are `vs`'s variables) on `env`.
/// `progress(iteration, iterations)` is called after each iteration.
pub fn train(
    policy: &LlmPolicy,
    vs: &nn::VarStore,
    env: &mut dyn PromptEnv,
    cfg: &PpoConfig,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TrainOutput, String> {
    cfg.validate().map_err(|(n, m)| format!("{n}: {m}"))?;
    let dev = policy.device();
    let reference = policy.net.top().detached_copy();
    let vars = vs.trainable_variables();
    let mut opt = nn::Adam {
        eps: 1e-5,
        ..Default::default()
    }
    .build(vs, cfg.learning_rate)
    .map_err(|e| e.to_string())?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let iterations = cfg.iterations();
    let mut log = Vec::with_capacity(iterations);
    let mut records = Vec::with_capacity(iterations * cfg.num_steps);
    let mut obs = env.reset()?;
    let mut starts = true;
    let mut global_step = 0usize;
    let mut episode_return = 0.0;
    for iteration in 1..=iterations {
        let lr = if cfg.anneal_lr {
            (1.0 - (iteration - 1) as f64 / iterations as f64) * cfg.learning_rate
        } else {
            cfg.learning_rate
        };
        opt.set_lr_group(flag_llm::trainable::HEAD_GROUP, lr);
        opt.set_lr_group(0, lr * cfg.backbone_lr_scale);

        // Rollout.
        let t0 = Instant::now();
        let mut buf: Vec<Stored> = Vec::with_capacity(cfg.num_steps);
        let mut tokens = 0usize;
        let mut ended: Vec<f64> = Vec::new();
        for _ in 0..cfg.num_steps {
            let (d, ref_logp) = decide(policy, Some(&reference), &obs)?;
            tokens += d.tokens;
            let action = sample(&d.probs, &mut rng);
            let tr = env.step(action)?;
            global_step += 1;
            episode_return += tr.reward;
            if tr.done {
                ended.push(episode_return);
                episode_return = 0.0;
            }
            records.push(StepRecord {
                iteration,
                global_step,
                date: obs.date,
                probs: d.probs.clone(),
                action,
                value: d.value,
                reward: tr.reward,
                done: tr.done,
            });
            buf.push(Stored {
                frozen: d.frozen,
                mask: obs.mask.clone(),
                action,
                logp: d.logp[action],
                value: d.value,
                ref_logp: ref_logp.unwrap_or_default(),
                reward: tr.reward,
                starts,
            });
            starts = tr.done;
            obs = tr.next;
        }
        let (next_d, _) = decide(policy, None, &obs)?;
        let rollout_s = t0.elapsed().as_secs_f64();

        let rewards: Vec<f64> = buf.iter().map(|s| s.reward).collect();
        let values: Vec<f64> = buf.iter().map(|s| s.value).collect();
        let dones: Vec<bool> = buf.iter().map(|s| s.starts).collect();
        let (adv, returns) = gae(
            &rewards,
            &values,
            &dones,
            next_d.value,
            starts,
            cfg.gamma,
            cfg.gae_lambda,
        );

        // Update.
        let t1 = Instant::now();
        let n = buf.len();
        let mut sums = [0.0f64; 6]; // pg, v, ent, kl_ref, approx_kl, clipfrac (sample-weighted)
        let mut weight = 0.0;
        let mut grad_norms = Vec::new();
        'epochs: for _ in 0..cfg.update_epochs {
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = rng.random_range(0..=i);
                order.swap(i, j);
            }
            let mut epoch_kl = 0.0;
            let mut epoch_w = 0.0;
            for mb in order.chunks(cfg.minibatch_size) {
                let mb_adv = Tensor::from_slice(&mb.iter().map(|&i| adv[i]).collect::<Vec<_>>())
                    .to_device(dev);
                let mb_adv = if cfg.norm_adv && mb.len() > 1 {
                    normalize_advantages(&mb_adv)
                } else {
                    mb_adv
                };
                let micro = mb.len().div_ceil(cfg.grad_accum_steps);
                opt.zero_grad();
                for (c, chunk) in mb.chunks(micro).enumerate() {
                    let share = chunk.len() as f64 / mb.len() as f64;
                    let rows: Vec<&FrozenHidden> = chunk.iter().map(|&i| &buf[i].frozen).collect();
                    let batch = FrozenHidden::left_pad(&rows).map_err(|e| e.to_string())?;
                    let masks: Vec<&[bool]> =
                        chunk.iter().map(|&i| buf[i].mask.as_slice()).collect();
                    let col = |f: &dyn Fn(&Stored) -> f64| {
                        Tensor::from_slice(
                            &chunk.iter().map(|&i| f(&buf[i]) as f32).collect::<Vec<_>>(),
                        )
                        .to_device(dev)
                    };
                    let ref_flat: Vec<f32> = chunk
                        .iter()
                        .flat_map(|&i| buf[i].ref_logp.iter().map(|&x| x as f32))
                        .collect();
                    let off = (c * micro) as i64;
                    let micro_batch = MicroBatch {
                        frozen: batch,
                        mask: mask_tensor(&masks, dev),
                        actions: Tensor::from_slice(
                            &chunk
                                .iter()
                                .map(|&i| buf[i].action as i64)
                                .collect::<Vec<_>>(),
                        )
                        .to_device(dev),
                        old_logp: col(&|s| s.logp),
                        old_values: col(&|s| s.value),
                        returns: Tensor::from_slice(
                            &chunk.iter().map(|&i| returns[i] as f32).collect::<Vec<_>>(),
                        )
                        .to_device(dev),
                        advantages: mb_adv
                            .narrow(0, off, chunk.len() as i64)
                            .to_kind(Kind::Float),
                        ref_logp: Tensor::from_slice(&ref_flat)
                            .view([chunk.len() as i64, 3])
                            .to_device(dev),
                    };
                    let terms = ppo_loss(policy, cfg, &micro_batch)?;
                    let (pg, v_loss, entropy, kl, loss) = (
                        &terms.policy,
                        &terms.value,
                        &terms.entropy,
                        &terms.kl_ref,
                        &terms.loss,
                    );
                    (loss * share).backward();
                    let pg_loss = pg;
                    let w = chunk.len() as f64;
                    for (k, x) in [
                        pg_loss.double_value(&[]),
                        v_loss.double_value(&[]),
                        entropy.double_value(&[]),
                        kl.double_value(&[]),
                        terms.approx_kl,
                        terms.clip_fraction,
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        sums[k] += x * w;
                    }
                    weight += w;
                    epoch_kl += terms.approx_kl * w;
                    epoch_w += w;
                }
                grad_norms.push(clip_gradients(&vars, cfg.max_grad_norm));
                opt.step();
            }
            if let Some(target) = cfg.target_kl
                && epoch_kl / epoch_w > target
            {
                break 'epochs;
            }
        }
        let update_s = t1.elapsed().as_secs_f64();
        let mean = |k: usize| sums[k] / weight.max(1.0);
        log.push(UpdateLog {
            iteration,
            global_step,
            learning_rate: lr,
            policy_loss: mean(0),
            value_loss: mean(1),
            entropy: mean(2),
            kl_ref: mean(3),
            approx_kl: mean(4),
            clip_fraction: mean(5),
            explained_variance: explained_variance(&values, &returns),
            grad_norm: grad_norms.iter().sum::<f64>() / grad_norms.len().max(1) as f64,
            mean_reward: rewards.iter().sum::<f64>() / n as f64,
            episode_return: (!ended.is_empty())
                .then(|| ended.iter().sum::<f64>() / ended.len() as f64),
            rollout_ms: rollout_s * 1e3,
            update_ms: update_s * 1e3,
            steps_per_s: n as f64 / (rollout_s + update_s),
            prompt_tokens_per_s: tokens as f64 / rollout_s,
        });
        progress(iteration, iterations);
    }
    Ok(TrainOutput {
        log,
        steps: records,
    })
}

/// One day of a greedy evaluation path.
#[derive(Debug, Clone)]
pub struct EvalDay {
    pub day: PathDay,
    pub probs: Vec<f64>,
    pub value: f64,
}

/// Runs the greedy policy (argmax over the allowed actions) over the whole range of `env`
/// from fresh capital; the last day trades without a reward.
pub fn greedy_path(policy: &LlmPolicy, env: &mut FlagMarketEnv) -> Result<Vec<EvalDay>, String> {
    let mut out = Vec::new();
    let mut obs = env.reset()?;
    loop {
        let (d, _) = decide(policy, None, &obs)?;
        let action = greedy(&d.probs, &obs.mask);
        let last = env.at_last_day();
        let day = if last {
            env.finish(action)?
        } else {
            env.step_path(action)?
        };
        out.push(EvalDay {
            day,
            probs: d.probs,
            value: d.value,
        });
        if last {
            return Ok(out);
        }
        obs = env.observe();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_defaults_and_validation() {
        let c = PpoConfig::default();
        assert_eq!(c.iterations(), 346);
        assert!(c.validate().is_ok());
        let bad = PpoConfig {
            gamma: 1.5,
            ..c.clone()
        };
        assert_eq!(bad.validate().unwrap_err().0, "gamma");
        let bad = PpoConfig {
            total_timesteps: 10,
            ..c
        };
        assert_eq!(bad.validate().unwrap_err().0, "total_timesteps");
    }

    #[test]
    fn sampling_never_picks_a_masked_action_and_greedy_respects_the_mask() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let probs = [0.0, 0.25, 0.75];
        let mut counts = [0; 3];
        for _ in 0..4000 {
            counts[sample(&probs, &mut rng)] += 1;
        }
        assert_eq!(counts[0], 0);
        assert!((2800..3200).contains(&counts[2]), "{counts:?}");
        assert_eq!(greedy(&[0.9, 0.05, 0.05], &[false, true, true]), 1);
        assert_eq!(greedy(&[0.2, 0.3, 0.5], &[true, true, true]), 2);
    }
}
