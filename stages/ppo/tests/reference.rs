//! One PPO update on the real SmolLM2 (top 2 blocks trainable, four left-padded prompts of
//! different lengths, masks, clipped ratios) equals a PyTorch computation of the same update
//! (`reference_ppo.py`, run with the project venv's torch on the inputs this test writes):
//! loss terms within 1e-5 relative, the gradient norm within 1e-4, the action probabilities
//! after one clipped Adam step within 1e-5.

use std::path::PathBuf;
use std::process::Command;

use flag_llm::trainable::FrozenHidden;
use flag_ppo::loss::masked_log_softmax;
use flag_ppo::policy::{HeadStart, LlmPolicy, PolicyConfig};
use flag_ppo::prompt::PromptText;
use flag_ppo::train::{MicroBatch, PpoConfig, clip_gradients, ppo_loss};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

fn python() -> PathBuf {
    let cache = std::env::var_os("FLAG_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/flag"));
    let p = cache.join("venv/bin/python");
    if p.exists() {
        return p;
    }
    std::env::var_os("VIRTUAL_ENV")
        .map(|v| PathBuf::from(v).join("bin/python"))
        .expect("the project venv (bash .ci/setup) with torch")
}

fn f32s(v: &[f64]) -> Tensor {
    Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<_>>())
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn one_update_matches_pytorch() {
    flag_llm::generate::set_threads(2);
    tch::manual_seed(11);
    let gguf = flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg_p = PolicyConfig {
        trainable_blocks: 2,
        value_hidden: 32,
        head_start: HeadStart::ActionWords,
        max_prompt_tokens: 256,
        init_seed: 11,
    };
    let policy = LlmPolicy::load(&gguf, cfg_p, "{\"Action\": \"", &vs.root()).unwrap();
    // The value MLP's output layer starts at 0; give it weights so its gradients flow.
    tch::no_grad(|| {
        let mut w2 = policy.net.top().value_w2.shallow_clone();
        w2.copy_(&(Tensor::randn([1, 32], (Kind::Float, Device::Cpu)) * 0.1));
    });

    let texts = [
        "MSFT closed at 210.1. Decide.",
        "JNJ fell for three days in a row and closed at 147.5; you hold shares. Decide now.",
        "Buy?",
        "HON: closes 170, 171, 169, 175, 180. Cash 1000. What do you do today?",
    ];
    let rows: Vec<FrozenHidden> = texts
        .iter()
        .map(|t| {
            let ids = policy
                .encode(&PromptText {
                    user: t.to_string(),
                    answer_prefix: "{\"Action\": \"".into(),
                    head: 0,
                })
                .unwrap();
            policy.frozen(&ids).unwrap()
        })
        .collect();
    let lens: Vec<i64> = rows.iter().map(|r| r.hidden.size()[1]).collect();
    assert!(
        lens.windows(2).all(|w| w[0] != w[1]),
        "lengths differ: {lens:?}"
    );
    let batch = FrozenHidden::left_pad(&rows.iter().collect::<Vec<_>>()).unwrap();

    let mask = Tensor::from_slice(&[
        false, true, true, true, true, false, true, true, true, false, true, true,
    ])
    .view([4, 3]);
    let actions = Tensor::from_slice(&[2i64, 0, 1, 2]);
    let (logits0, values0) = tch::no_grad(|| policy.net.head_forward(&batch).unwrap());
    let logp0 = masked_log_softmax(&logits0, &mask);
    let taken = logp0.gather(1, &actions.unsqueeze(1), false).squeeze_dim(1);
    // Ratios away from 1 (two of them outside the clip range) and returns away from values.
    let old_logp = &taken + f32s(&[0.35, -0.3, 0.05, -0.01]);
    let old_values = &values0 + f32s(&[0.1, -0.3, 0.02, 0.25]);
    let returns = f32s(&[0.8, -0.5, 0.1, 1.2]);
    let advantages = f32s(&[1.1, -0.7, 0.3, -0.9]);
    let ref_logp = masked_log_softmax(&(&logits0 + f32s(&[0.2, -0.1, 0.4]).view([1, 3])), &mask);
    let ppo = PpoConfig::default();
    let lr = 5e-4;

    // The inputs, for the reference.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let mut named: Vec<(String, Tensor)> = vec![
        ("hidden".into(), batch.hidden.copy()),
        ("valid".into(), batch.valid.to_kind(Kind::Float)),
        ("mask".into(), mask.to_kind(Kind::Float)),
        ("actions".into(), actions.copy()),
        ("old_logp".into(), old_logp.copy()),
        ("old_values".into(), old_values.copy()),
        ("returns".into(), returns.copy()),
        ("advantages".into(), advantages.copy()),
        ("ref_logp".into(), ref_logp.copy()),
    ];
    let c = policy.net.config();
    for (k, v) in [
        ("n_head", c.n_head as f64),
        ("n_kv_head", c.n_kv_head as f64),
        ("head_dim", c.head_dim as f64),
        ("eps", c.eps),
        ("rope_base", c.rope_base),
        ("clip_coef", ppo.clip_coef),
        ("ent_coef", ppo.ent_coef),
        ("vf_coef", ppo.vf_coef),
        ("kl_coef", ppo.kl_coef),
        ("max_grad_norm", ppo.max_grad_norm),
        ("lr", lr),
    ] {
        named.push((format!("scalar.{k}"), Tensor::from_slice(&[v])));
    }
    for (k, v) in vs.variables() {
        named.push((k, v.detach().copy()));
    }
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&refs, &input).unwrap();
    let output = dir.path().join("out.safetensors");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference_ppo.py");
    let st = Command::new(python())
        .arg(&script)
        .arg(&input)
        .arg(&output)
        .env("PYTHONWARNINGS", "ignore")
        .status()
        .unwrap();
    assert!(st.success(), "{} failed", script.display());
    let want: std::collections::BTreeMap<String, Tensor> = Tensor::read_safetensors(&output)
        .unwrap()
        .into_iter()
        .collect();
    let scalar = |k: &str| want[k].double_value(&[]);

    // The same update here.
    let mb = MicroBatch {
        frozen: batch,
        mask: mask.shallow_clone(),
        actions,
        old_logp,
        old_values,
        returns,
        advantages,
        ref_logp,
    };
    let mut opt = nn::Adam {
        eps: 1e-5,
        ..Default::default()
    }
    .build(&vs, lr)
    .unwrap();
    opt.zero_grad();
    let terms = ppo_loss(&policy, &ppo, &mb).unwrap();
    terms.loss.backward();
    let grad_norm = clip_gradients(&vs.trainable_variables(), ppo.max_grad_norm);
    opt.step();
    for (name, got) in [
        ("policy_loss", &terms.policy),
        ("value_loss", &terms.value),
        ("entropy", &terms.entropy),
        ("kl_ref", &terms.kl_ref),
        ("loss", &terms.loss),
    ] {
        let (g, w) = (got.double_value(&[]), scalar(name));
        eprintln!("{name}: rust {g:.9} torch {w:.9}");
        assert!(rel(g, w) < 1e-5, "{name}: {g} vs {w}");
    }
    assert!(terms.clip_fraction > 0.0, "the fixture exercises clipping");
    eprintln!(
        "grad_norm: rust {grad_norm:.9} torch {:.9}",
        scalar("grad_norm")
    );
    assert!(
        grad_norm > ppo.max_grad_norm,
        "the fixture exercises gradient clipping"
    );
    assert!(rel(grad_norm, scalar("grad_norm")) < 1e-4);
    let (logits1, _) = tch::no_grad(|| policy.net.head_forward(&mb.frozen).unwrap());
    let probs = masked_log_softmax(&logits1, &mask)
        .exp()
        .to_kind(Kind::Double);
    let diff = (&probs - &want["probs"]).abs().max().double_value(&[]);
    eprintln!("probs after the step: max |diff| {diff:e}\n{probs}");
    assert!(diff < 1e-5, "updated probabilities differ by {diff}");
    let moved = (&probs
        - masked_log_softmax(&logits0, &mask)
            .exp()
            .to_kind(Kind::Double))
    .abs()
    .max()
    .double_value(&[]);
    assert!(moved > 1e-3, "the step changed the policy ({moved})");
}
