//! The PPO terms of FLAG-Trader's update, in CleanRL's formulation (the paper builds on it):
//!
//! - GAE(gamma, lambda) over one rollout, with episode ends cutting the bootstrap:
//!   delta_t = r_t + gamma V(s_{t+1}) (1 - done_{t+1}) - V(s_t),
//!   A_t = delta_t + gamma lambda (1 - done_{t+1}) A_{t+1}, return_t = A_t + V(s_t).
//!   `done_{t+1}` says s_{t+1} starts a new episode (so V(s_{t+1}) belongs to another one).
//! - A masked categorical policy over the actions {Sell, Hold, Buy}: invalid actions get
//!   probability 0 (log-softmax over the allowed logits only); the entropy sums over allowed
//!   actions.
//! - Clipped surrogate: L = mean(max(-A r, -A clip(r, 1 - c, 1 + c))), r = exp(logp - logp_old),
//!   with the diagnostics approx KL = mean((r - 1) - ln r) and the clip fraction
//!   mean(|r - 1| > c).
//! - Clipped value loss (clip_vloss): 0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c)
//!   - R)^2)); without clipping 0.5 mean((V - R)^2).
//! - KL penalty to the initial policy (kl_coef): mean over states of
//!   sum_a pi(a|s) (ln pi(a|s) - ln pi_ref(a|s)) over the allowed actions, KL(pi || pi_ref).
//! - Advantage normalisation (norm_adv): (A - mean) / (std + 1e-8), std with Bessel's
//!   correction (torch's default, as CleanRL).
use tch::{Kind, Tensor};

/// Advantages and returns of one rollout (`dones[t]`: state t starts a new episode;
/// `next_value`/`next_done`: the state after the last step).
pub fn gae(
    rewards: &[f64],
    values: &[f64],
    dones: &[bool],
    next_value: f64,
    next_done: bool,
    gamma: f64,
    lambda: f64,
) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    assert!(
        values.len() == n && dones.len() == n,
        "gae: rewards, values and dones must have one entry per step"
    );
    let mut adv = vec![0.0; n];
    let mut last = 0.0;
    for t in (0..n).rev() {
        let (next_v, next_d) = if t + 1 == n {
            (next_value, next_done)
        } else {
            (values[t + 1], dones[t + 1])
        };
        let nonterminal = if next_d { 0.0 } else { 1.0 };
        let delta = rewards[t] + gamma * next_v * nonterminal - values[t];
        last = delta + gamma * lambda * nonterminal * last;
        adv[t] = last;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// ln pi(a|s) over the actions, [batch, actions]: a log-softmax over the allowed logits
/// (`mask` true = allowed); disallowed actions get -inf. Every row must allow one action.
pub fn masked_log_softmax(logits: &Tensor, mask: &Tensor) -> Tensor {
    let neg_inf = Tensor::full_like(logits, f64::NEG_INFINITY);
    logits
        .where_self(mask, &neg_inf)
        .log_softmax(-1, logits.kind())
}

/// `logp` with its disallowed (-inf) entries set to 0, so products with them and their
/// gradients stay finite (-inf * 0 would be NaN and poison every logit's gradient).
fn finite_logp(logp: &Tensor, mask: &Tensor) -> Tensor {
    logp.where_self(mask, &logp.zeros_like())
}

/// Entropy of each row's masked distribution, [batch] (0 ln 0 = 0 for disallowed actions).
pub fn masked_entropy(logp: &Tensor, mask: &Tensor) -> Tensor {
    let plogp = logp.exp() * finite_logp(logp, mask);
    -plogp.sum_dim_intlist(-1, false, logp.kind())
}

/// The clipped surrogate loss and its diagnostics (approx KL, clip fraction).
pub struct PolicyLoss {
    pub loss: Tensor,
    pub approx_kl: f64,
    pub clip_fraction: f64,
}

/// `new_logp`, `old_logp`: ln pi of the taken actions [batch]; `adv`: advantages [batch].
pub fn clipped_policy_loss(
    new_logp: &Tensor,
    old_logp: &Tensor,
    adv: &Tensor,
    clip: f64,
) -> PolicyLoss {
    let log_ratio = new_logp - old_logp;
    let ratio = log_ratio.exp();
    let unclipped = -adv * &ratio;
    let clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip);
    let loss = unclipped
        .maximum(&clipped)
        .mean(Kind::Double)
        .to_kind(new_logp.kind());
    let (approx_kl, clip_fraction) = tch::no_grad(|| {
        let kl = ((&ratio - 1.0) - &log_ratio)
            .mean(Kind::Double)
            .double_value(&[]);
        let frac = (&ratio - 1.0)
            .abs()
            .gt(clip)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]);
        (kl, frac)
    });
    PolicyLoss {
        loss,
        approx_kl,
        clip_fraction,
    }
}

/// Value loss; `clip` = Some(c) for clip_vloss.
pub fn value_loss(new_v: &Tensor, old_v: &Tensor, returns: &Tensor, clip: Option<f64>) -> Tensor {
    let unclipped = (new_v - returns).square();
    let per = match clip {
        Some(c) => {
            let v_clipped = old_v + (new_v - old_v).clamp(-c, c);
            unclipped.maximum(&(v_clipped - returns).square())
        }
        None => unclipped,
    };
    (per.mean(Kind::Double) * 0.5).to_kind(new_v.kind())
}

/// KL(pi || pi_ref) per state over the allowed actions, averaged over the batch.
pub fn kl_to_reference(logp: &Tensor, ref_logp: &Tensor, mask: &Tensor) -> Tensor {
    let terms = logp.exp() * (finite_logp(logp, mask) - finite_logp(ref_logp, mask));
    terms
        .sum_dim_intlist(-1, false, Kind::Double)
        .mean(Kind::Double)
        .to_kind(logp.kind())
}

/// (A - mean) / (std + 1e-8), std with Bessel's correction.
pub fn normalize_advantages(adv: &Tensor) -> Tensor {
    (adv - adv.mean(adv.kind())) / (adv.std(true) + 1e-8)
}

/// 1 - Var(R - V) / Var(R) (NaN when the returns do not vary), population variances.
pub fn explained_variance(values: &[f64], returns: &[f64]) -> f64 {
    let var = |x: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = x.collect();
        let m = v.iter().sum::<f64>() / v.len() as f64;
        v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / v.len() as f64
    };
    let var_r = var(&mut returns.iter().copied());
    if var_r == 0.0 || returns.is_empty() {
        return f64::NAN;
    }
    let var_diff = var(&mut returns.iter().zip(values).map(|(r, v)| r - v));
    1.0 - var_diff / var_r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disallowed action's -inf log-probability must not turn the gradients into NaN.
    #[test]
    fn masked_terms_have_finite_gradients() {
        let logits = Tensor::from_slice(&[0.3f32, -1.2, 0.5, 2.0, 0.1, -0.4])
            .view([2, 3])
            .set_requires_grad(true);
        let mask = Tensor::from_slice(&[false, true, true, true, true, false]).view([2, 3]);
        let reference = masked_log_softmax(&logits.detach().ones_like(), &mask);
        let logp = masked_log_softmax(&logits, &mask);
        let loss = masked_entropy(&logp, &mask).mean(Kind::Float)
            + kl_to_reference(&logp, &reference, &mask);
        loss.backward();
        let g = logits.grad();
        assert!(g.isfinite().all().int64_value(&[]) != 0, "{g}");
        // Disallowed logits get no gradient; allowed ones do.
        assert_eq!(g.double_value(&[0, 0]), 0.0);
        assert_eq!(g.double_value(&[1, 2]), 0.0);
        assert!(g.double_value(&[0, 1]).abs() > 0.0);
    }
}
