//! [`Mlp`] against libtorch's autograd and optimiser ([`crate::net::QNet`], `nn::Adam`) on
//! the TDQN network, and its levels against each other.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Reduction, Tensor};

use super::kernels::Level;
use super::{ACTIONS, Adam, Mlp, Workspace};
use crate::config::DdqnConfig;
use crate::net::QNet;

const INPUTS: usize = 117;

fn inputs(rng: &mut ChaCha8Rng, rows: usize) -> Vec<f32> {
    (0..rows * INPUTS)
        .map(|_| rng.random::<f32>() * 4.0 - 2.0)
        .collect()
}

fn tensor(v: &[f32], rows: usize, cols: usize) -> Tensor {
    Tensor::from_slice(v).view([rows as i64, cols as i64])
}

fn values(t: &Tensor) -> Vec<f32> {
    let flat = t.to_kind(Kind::Float).contiguous().view([-1]);
    let n = flat.numel();
    let mut v = vec![0f32; n];
    flat.copy_data(&mut v, n);
    v
}

/// Largest |a - b| over the largest |b|.
fn relative(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale.max(f32::MIN_POSITIVE)
}

/// One TDQN gradient step on both implementations from the same initial draws, inputs and
/// dropout: Q-values, running statistics, every gradient and the parameters after Adam.
#[test]
fn one_training_step_matches_libtorch() {
    tch::set_num_threads(1);
    let cfg = DdqnConfig::default();
    let n = cfg.batch_size;
    let torch = QNet::new(
        &cfg,
        INPUTS,
        Device::Cpu,
        Some(&mut ChaCha8Rng::seed_from_u64(3)),
    );
    let mut ours = Mlp::new(
        &cfg,
        INPUTS,
        Level::detect(),
        &mut ChaCha8Rng::seed_from_u64(3),
    );
    let before = ours.snapshot();
    let torch_before = torch.snapshot();
    assert_eq!(before.len(), torch_before.len());
    for ((na, a), (nb, b)) in before.iter().zip(&torch_before) {
        assert_eq!(na, nb);
        assert_eq!(a, b, "{na}: the same initial draws");
    }

    let mut data = ChaCha8Rng::seed_from_u64(4);
    let (state, next) = (inputs(&mut data, n), inputs(&mut data, n));
    let actions: Vec<i64> = (0..n).map(|i| (i % 3 == 0) as i64).collect();
    // Targets spread so that some errors are inside the Huber loss's quadratic zone and
    // some outside.
    let expected: Vec<f32> = (0..n).map(|_| data.random::<f32>() * 6.0 - 3.0).collect();

    // libtorch: the agent's two training-mode passes, drawing dropout from its own copy.
    let mut rng_t = ChaCha8Rng::seed_from_u64(5);
    let q_all = torch.forward(&tensor(&state, n, INPUTS), true, Some(&mut rng_t));
    let q_next = tch::no_grad(|| torch.forward(&tensor(&next, n, INPUTS), true, Some(&mut rng_t)));
    let q = q_all
        .gather(1, &Tensor::from_slice(&actions).unsqueeze(1), false)
        .squeeze_dim(1);
    let loss = q.huber_loss(&Tensor::from_slice(&expected), Reduction::Mean, 1.0);
    let mut opt = tch::nn::Adam {
        wd: cfg.weight_decay,
        ..Default::default()
    }
    .build(&torch.vs, cfg.learning_rate)
    .unwrap();
    opt.zero_grad();
    loss.backward();
    let mut torch_grads: Vec<(String, Vec<f32>)> = Vec::new();
    let mut named: Vec<(String, Tensor)> = torch.vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in &named {
        if t.requires_grad() {
            torch_grads.push((name.clone(), values(&t.grad())));
        }
    }

    // Ours.
    let mut rng_o = ChaCha8Rng::seed_from_u64(5);
    let mut masks = ours.dropout_masks(&mut rng_o, n);
    masks.extend(ours.dropout_masks(&mut rng_o, n));
    let mut ws = Workspace::new(&ours, n);
    ws.inputs_mut()
        .copy_from_slice(&[state.clone(), next.clone()].concat());
    ours.forward_train(&mut ws, &masks);
    assert!(
        relative(ws.first_q(), &values(&q_all)) < 1e-5,
        "Q of the states"
    );
    assert!(
        relative(ws.second_q(), &values(&q_next)) < 1e-5,
        "Q of the next states"
    );
    let q_ours = ws.first_q().to_vec();
    let dq = ws.dq_mut();
    dq.fill(0.0);
    for i in 0..n {
        let a = actions[i] as usize;
        let d = q_ours[i * ACTIONS + a] - expected[i];
        dq[i * ACTIONS + a] = d.clamp(-1.0, 1.0) / n as f32;
    }
    ours.backward(&mut ws, &masks[..cfg.hidden_layers]);
    let grads = ours.named(&ws.grad);
    let mut checked = 0;
    for (name, g) in &grads {
        let Some((_, tg)) = torch_grads.iter().find(|(tn, _)| tn == name) else {
            continue;
        };
        checked += 1;
        if name.starts_with("fc") && name.ends_with("_bias") {
            // Before BatchNorm this gradient is zero but for rounding, in both: bound it by
            // the layer's weight gradient instead.
            let w = &grads
                .iter()
                .find(|(n2, _)| *n2 == name.replace("bias", "weight"))
                .unwrap()
                .1;
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = g.iter().chain(tg).fold(0f32, |m, x| m.max(x.abs()));
            assert!(worst < 1e-4 * scale, "{name}: {worst} against {scale}");
        } else {
            let r = relative(g, tg);
            assert!(
                r < 1e-4,
                "gradient of {name} differs by {r} of its largest value"
            );
        }
    }
    assert_eq!(
        checked,
        4 * cfg.hidden_layers + 2,
        "every trainable tensor compared"
    );
    let norm = ours
        .named(&ws.grad)
        .iter()
        .flat_map(|(_, g)| g.iter())
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        (ws.squared_norm.sqrt() - norm).abs() < 1e-5 * norm,
        "clipping norm"
    );

    // Running statistics after both passes.
    let after_forward = ours.snapshot();
    let torch_after = torch.snapshot();
    for ((name, a), (_, b)) in after_forward.iter().zip(&torch_after) {
        if name.contains("running") {
            assert!(relative(a, b) < 1e-5, "{name}");
        }
    }

    // Clip and Adam: the first step moves each parameter by about the learning rate, in the
    // direction of its gradient's sign; where a gradient is rounding noise (the biases
    // before BatchNorm) the two sides may move opposite ways.
    opt.clip_grad_norm(cfg.grad_clip);
    opt.step();
    let mut adam = Adam::new(&ours, cfg.learning_rate, cfg.weight_decay);
    ours.clip_and_step(&ws, &mut adam, cfg.grad_clip);
    let lr = cfg.learning_rate as f32;
    for ((name, a), (_, b)) in ours.snapshot().iter().zip(&torch.snapshot()) {
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        if name.starts_with("fc") && name.ends_with("_bias") {
            assert!(worst <= 2.0 * lr * 1.001, "{name}: {worst}");
        } else if !name.contains("running") {
            let off = a
                .iter()
                .zip(b)
                .filter(|(x, y)| (*x - *y).abs() > 0.05 * lr)
                .count();
            assert!(
                off * 1000 <= a.len(),
                "{name}: {off} of {} values moved differently (worst {worst})",
                a.len()
            );
        }
    }
}

/// The optimiser alone: fed libtorch's own gradients, our pass equals `nn::Adam` to a few
/// units in the last place over several steps (PyTorch divides by sqrt(bias correction);
/// we multiply by its reciprocal).
#[test]
fn adam_matches_libtorch_adam_on_the_same_gradients() {
    tch::set_num_threads(1);
    let cfg = DdqnConfig {
        hidden: 40,
        hidden_layers: 2,
        ..DdqnConfig::default()
    };
    let mut ours = Mlp::new(&cfg, 9, Level::detect(), &mut ChaCha8Rng::seed_from_u64(1));
    let n = ours.params.len();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let p = vs.root().var_copy("p", &Tensor::from_slice(&ours.params));
    let mut opt = tch::nn::Adam {
        wd: cfg.weight_decay,
        ..Default::default()
    }
    .build(&vs, 1e-2)
    .unwrap();
    let mut adam = Adam::new(&ours, 1e-2, cfg.weight_decay);
    let mut ws = Workspace::new(&ours, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for step in 0..6 {
        let g: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() - 0.5) * 1e-2).collect();
        opt.zero_grad();
        (&p * Tensor::from_slice(&g)).sum(Kind::Float).backward();
        opt.step();
        ws.grad.copy_from_slice(&g);
        // A norm below the bound: no clipping on either side.
        ws.squared_norm = 0.0;
        ours.clip_and_step(&ws, &mut adam, 1.0);
        let want = values(&p);
        let worst = ours
            .params
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "step {step}: relative difference {worst}");
    }
}

/// A few gradient steps and an evaluation pass give the same bits at every level this CPU
/// runs (AVX-512, AVX2 + FMA, plain code), on shapes with tile edges everywhere.
#[test]
fn every_level_gives_the_same_bits() {
    let cfg = DdqnConfig {
        hidden: 48,
        hidden_layers: 2,
        batch_size: 13,
        ..DdqnConfig::default()
    };
    let run = |level: Level| {
        let mut net = Mlp::new(&cfg, INPUTS, level, &mut ChaCha8Rng::seed_from_u64(9));
        let mut ws = Workspace::new(&net, cfg.batch_size);
        let mut adam = Adam::new(&net, 1e-3, cfg.weight_decay);
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        for _ in 0..3 {
            let x = inputs(&mut rng, 2 * cfg.batch_size);
            ws.inputs_mut().copy_from_slice(&x);
            let mut masks = net.dropout_masks(&mut rng, cfg.batch_size);
            masks.extend(net.dropout_masks(&mut rng, cfg.batch_size));
            net.forward_train(&mut ws, &masks);
            let q = ws.first_q().to_vec();
            for (d, q) in ws.dq_mut().iter_mut().zip(q) {
                *d = (q - 0.5).clamp(-1.0, 1.0) / 13.0;
            }
            net.backward(&mut ws, &masks[..cfg.hidden_layers]);
            net.clip_and_step(&ws, &mut adam, 0.5);
        }
        let eval = net.q_values(&inputs(&mut rng, 300), 300);
        let bits: Vec<u32> = net
            .snapshot()
            .iter()
            .flat_map(|(_, v)| v.iter())
            .chain(&eval)
            .map(|x| x.to_bits())
            .collect();
        bits
    };
    let levels = Level::all_here();
    let first = run(levels[0]);
    for level in &levels[1..] {
        assert!(
            first == run(*level),
            "{} differs from {}",
            level.name(),
            levels[0].name()
        );
    }
}
