//! The PPO terms against values computed by hand (the formulas in `flag_ppo::loss`, worked
//! in float64 outside this code). Inputs are f64 tensors of a few elements, so the results do
//! not depend on the CPU's kernel path at these tolerances.
use flag_ppo::loss::*;
use tch::{Kind, Tensor};

fn t(v: &[f64]) -> Tensor {
    Tensor::from_slice(v)
}

fn t2(rows: &[[f64; 3]]) -> Tensor {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, 3])
}

fn mask(rows: &[[bool; 3]]) -> Tensor {
    let flat: Vec<bool> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, 3])
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
}

fn vec(x: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&x.to_kind(Kind::Double).reshape([-1])).unwrap()
}

#[test]
fn gae_cuts_the_bootstrap_at_episode_starts() {
    // State 2 starts a new episode: step 1's advantage is its own TD error only.
    let (adv, ret) = gae(
        &[1.0, 0.0, -1.0, 2.0],
        &[0.5, 0.2, -0.3, 0.1],
        &[false, false, true, false],
        0.4,
        false,
        0.95,
        0.98,
    );
    for (a, b) in adv.iter().zip([0.5038, -0.2, 1.51768, 2.28]) {
        close(*a, b);
    }
    for (a, b) in ret.iter().zip([1.0038, 0.0, 1.21768, 2.38]) {
        close(*a, b);
    }
    // A terminal state after the last step: no bootstrap from next_value.
    let (adv, _) = gae(&[1.0], &[0.25], &[false], 100.0, true, 0.95, 0.98);
    close(adv[0], 0.75);
}

#[test]
fn masked_distribution_and_entropy() {
    let m = mask(&[[true, true, true], [false, true, true]]);
    let lp = masked_log_softmax(&t2(&[[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]), &m);
    let got = vec(&lp);
    let want = [
        -2.4076059644443806,
        -1.4076059644443804,
        -0.4076059644443804,
        f64::NEG_INFINITY,
        -3.048587351573742,
        -0.04858735157374196,
    ];
    for (a, b) in got.iter().zip(want) {
        if b.is_infinite() {
            assert_eq!(*a, b);
        } else {
            close(*a, b);
        }
    }
    let ent = vec(&masked_entropy(&lp, &m));
    close(ent[0], 0.8323955818399389);
    close(ent[1], 0.1908649711064423);
    assert!(
        ent.iter().all(|e| e.is_finite()),
        "a masked action must add 0, not NaN"
    );
}

#[test]
fn clipped_surrogate_and_its_diagnostics() {
    let p = clipped_policy_loss(
        &t(&[-0.5, -1.0, -0.2]),
        &t(&[-0.7, -0.9, -0.6]),
        &t(&[1.0, -2.0, 0.5]),
        0.2,
    );
    close(p.loss.double_value(&[]), 0.0032249453573064413);
    close(p.approx_kl, 0.03935495794579996);
    // Ratios 1.221, 0.905, 1.492: two outside [0.8, 1.2].
    close(p.clip_fraction, 2.0 / 3.0);
}

#[test]
fn value_loss_clipped_and_not() {
    let (new_v, old_v, ret) = (
        t(&[0.5, 1.5, -0.2]),
        t(&[0.4, 1.0, 0.0]),
        t(&[1.0, 2.0, -0.5]),
    );
    close(
        value_loss(&new_v, &old_v, &ret, None).double_value(&[]),
        0.09833333333333333,
    );
    // The second value moved 0.5 from its old estimate: clipped to 1.2, a larger error.
    close(
        value_loss(&new_v, &old_v, &ret, Some(0.2)).double_value(&[]),
        0.16333333333333336,
    );
}

#[test]
fn kl_penalty_to_the_initial_policy() {
    let m = mask(&[[true, true, true], [false, true, true]]);
    let lp = masked_log_softmax(&t2(&[[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]), &m);
    let reference = masked_log_softmax(&t2(&[[3.0, 2.0, 1.0], [0.0, 0.0, 1.0]]), &m);
    close(
        kl_to_reference(&lp, &reference, &m).double_value(&[]),
        0.660121677399115,
    );
    close(kl_to_reference(&lp, &lp, &m).double_value(&[]), 0.0);
}

#[test]
fn advantage_normalisation_and_explained_variance() {
    let n = vec(&normalize_advantages(&t(&[1.0, 2.0, 3.0, 4.0])));
    for (a, b) in n.iter().zip([
        -1.1618949948622252,
        -0.38729833162074173,
        0.38729833162074173,
        1.1618949948622252,
    ]) {
        close(*a, b);
    }
    close(
        explained_variance(&[1.0, 2.0, 2.5, 5.0], &[1.5, 2.0, 3.0, 4.0]),
        0.5932203389830508,
    );
    assert!(explained_variance(&[1.0, 2.0], &[3.0, 3.0]).is_nan());
}

#[test]
fn gradients_flow_through_the_policy_loss() {
    let logits = t2(&[[0.1, 0.2, 0.3], [0.0, 0.5, -0.5]]).set_requires_grad(true);
    let m = mask(&[[true, true, true], [true, false, true]]);
    let lp = masked_log_softmax(&logits, &m);
    let taken = lp
        .gather(1, &Tensor::from_slice(&[2i64, 0]).unsqueeze(1), false)
        .squeeze();
    let old = taken.detach();
    let p = clipped_policy_loss(&taken, &old, &t(&[1.0, -1.0]), 0.2);
    p.loss.backward();
    let g = vec(&logits.grad());
    // At ratio 1 the loss is -mean(A * ratio): d/dlogit = -A/2 (onehot - pi) per row, and a
    // masked action gets no gradient.
    assert_eq!(g[4], 0.0);
    assert!(g[2] < 0.0 && g[3] > 0.0, "{g:?}");
}
