//! Trainable mode on CPU: a few Adam steps on the top 2 blocks (plus heads) lower a policy +
//! value loss, the frozen bottom blocks and embedding stay bit-identical, the trainable blocks
//! do move, and only trainable tensors are in the VarStore.

use flag_llm::trainable::{FrozenHidden, HeadInit, PolicyShape, TrainablePolicy};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

#[test]
fn adam_on_top_two_blocks_lowers_loss_and_keeps_frozen_weights() {
    flag_llm::generate::set_threads(1);
    tch::manual_seed(0);
    let path = flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
    let vs = nn::VarStore::new(Device::Cpu);
    let shape = PolicyShape {
        trainable_blocks: 2,
        n_actions: 3,
        value_hidden: 64,
        head_init: HeadInit::Random,
        seed: 0,
    };
    let policy = TrainablePolicy::new(path.as_path(), &shape, &vs.root()).unwrap();
    assert_eq!(policy.frozen_blocks().len(), 28);
    assert_eq!(policy.trainable_blocks().len(), 2);

    // The VarStore holds the 2 blocks (6 tensors each), the final norm, the policy head (w, b)
    // and the value MLP (w1, b1, w2, b2).
    let vars = vs.variables();
    assert_eq!(vars.len(), 2 * 6 + 1 + 2 + 4, "{:?}", vars.keys());
    assert!(
        vars.keys()
            .all(|k| !k.contains("block0.") && !k.contains("embed"))
    );

    let frozen_before: Vec<Tensor> = policy
        .frozen_blocks()
        .iter()
        .flat_map(|b| {
            [
                b.wqkv.to_dense().copy(),
                b.w_down.to_dense().copy(),
                b.attn_norm.copy(),
            ]
        })
        .chain([policy.frozen_embedding().copy()])
        .collect();
    let top_before = policy.trainable_blocks()[1].w_gate_up.to_dense().copy();

    // Two left-padded prompts (mask 0 = padding) with target actions and returns.
    let ids = Tensor::from_slice(&[2i64, 2, 19556, 905, 28, 6403, 1980, 253, 655, 28]).view([2, 5]);
    let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 5]);
    let target_action = Tensor::from_slice(&[2i64, 0]);
    let target_value = Tensor::from_slice(&[1.0f32, -1.0]);

    let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
    let mut losses = Vec::new();
    for _ in 0..6 {
        let (logits, value) = policy.forward(&ids, &mask).unwrap();
        assert_eq!(logits.size(), [2, 3]);
        assert_eq!(value.size(), [2]);
        let loss = logits.cross_entropy_for_logits(&target_action)
            + (value - &target_value).square().mean(Kind::Float);
        losses.push(loss.double_value(&[]));
        opt.backward_step(&loss);
    }
    eprintln!("losses: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]),
        "loss not decreasing: {losses:?}"
    );
    assert!(losses[5] < losses[0] * 0.5, "loss did not drop: {losses:?}");

    let frozen_after: Vec<Tensor> = policy
        .frozen_blocks()
        .iter()
        .flat_map(|b| {
            [
                b.wqkv.to_dense(),
                b.w_down.to_dense(),
                b.attn_norm.shallow_clone(),
            ]
        })
        .chain([policy.frozen_embedding().shallow_clone()])
        .collect();
    for (i, (a, b)) in frozen_before.iter().zip(&frozen_after).enumerate() {
        assert!(a.equal(b), "frozen tensor {i} changed");
        assert!(!b.requires_grad());
    }
    let top_after = &policy.trainable_blocks()[1].w_gate_up.to_dense();
    assert!(!top_before.equal(top_after), "trainable block did not move");

    // Padding on the right gives the same reading as the same prompt padded on the left.
    let (l_left, v_left) = policy
        .forward(&ids.narrow(0, 0, 1), &mask.narrow(0, 0, 1))
        .unwrap();
    let ids_r = Tensor::from_slice(&[19556i64, 905, 28, 2, 2]).view([1, 5]);
    let mask_r = Tensor::from_slice(&[1i64, 1, 1, 0, 0]).view([1, 5]);
    let (l_right, v_right) = policy.forward(&ids_r, &mask_r).unwrap();
    assert!(
        l_left.allclose(&l_right, 1e-4, 1e-4, false),
        "{l_left} vs {l_right}"
    );
    assert!(v_left.allclose(&v_right, 1e-4, 1e-4, false));

    // The cached path (frozen rows computed one by one, then left-padded into a batch) gives
    // what the full forward of the padded batch gives.
    let rows: Vec<FrozenHidden> = (0..2)
        .map(|i| {
            let fh = policy
                .frozen_forward(&ids.narrow(0, i, 1), &mask.narrow(0, i, 1))
                .unwrap();
            fh.row(0)
        })
        .collect();
    let batch = FrozenHidden::left_pad(&rows.iter().collect::<Vec<_>>()).unwrap();
    let (l_cached, v_cached) = policy.head_forward(&batch).unwrap();
    let (l_full, v_full) = policy.forward(&ids, &mask).unwrap();
    assert!(l_cached.allclose(&l_full, 1e-4, 1e-4, false));
    assert!(v_cached.allclose(&v_full, 1e-4, 1e-4, false));

    // Bad inputs are errors.
    assert!(policy.forward(&ids, &mask.narrow(1, 0, 4)).is_err());
    let bad = Tensor::from_slice(&[49152i64]).view([1, 1]);
    assert!(
        policy
            .forward(&bad, &Tensor::ones([1, 1], (Kind::Int64, Device::Cpu)))
            .is_err()
    );
}

/// With the head initialised from the tied embedding rows of three tokens, the starting
/// logits are the model's own next-token logits of those tokens.
#[test]
fn token_row_head_starts_at_the_models_own_logits() {
    flag_llm::generate::set_threads(1);
    let path = flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
    let engine = flag_llm::generate::Engine::load(&path, Device::Cpu).unwrap();
    let ids: Vec<i64> = engine
        .tokenizer()
        .encode("The market is up today. {\"Action\": \"", false)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let n = ids.len() as i64;
    let ids = Tensor::from_slice(&ids).view([1, n]);
    let mask = Tensor::ones([1, n], (Kind::Int64, Device::Cpu));
    let words = [67u32, 41606, 35334]; // "S"(ell), "Hold", "Buy"
    let hidden = engine
        .model()
        .forward(&ids, &mask.ne(0))
        .unwrap()
        .narrow(1, n - 1, 1)
        .squeeze_dim(1);
    let all = engine.model().logits(&hidden);
    let want = all.index_select(1, &Tensor::from_slice(&words.map(i64::from)));
    let vs = nn::VarStore::new(Device::Cpu);
    let shape = PolicyShape {
        trainable_blocks: 3,
        n_actions: 3,
        value_hidden: 16,
        head_init: HeadInit::TokenRows(words.to_vec()),
        seed: 0,
    };
    let policy = TrainablePolicy::new(engine, &shape, &vs.root()).unwrap();
    let (logits, value) = policy.forward(&ids, &mask).unwrap();
    assert!(
        logits.allclose(&want, 1e-4, 1e-3, false),
        "{logits} vs {want}"
    );
    assert_eq!(value.double_value(&[0]), 0.0, "the value head starts at 0");

    let dup = PolicyShape {
        head_init: HeadInit::TokenRows(vec![5, 5, 6]),
        ..shape
    };
    let model = flag_llm::llama::LlamaModel::load(&path, Device::Cpu, Kind::Float).unwrap();
    let err = TrainablePolicy::new(model, &dup, &nn::VarStore::new(Device::Cpu).root())
        .unwrap_err()
        .to_string();
    assert!(err.contains("distinct"), "{err}");
}

/// A prompt run after its head's cached keys and values (a PPO prompt's task text) gives the
/// whole prompt's frozen output and heads up to rounding, for two prompts that share the
/// head; the head's entry does not depend on which prompt built it.
#[test]
fn a_prompt_after_its_cached_head_matches_the_whole_prompt() {
    flag_llm::generate::set_threads(2);
    let path = flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
    let engine = flag_llm::generate::Engine::load(&path, Device::Cpu).unwrap();
    let head = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                Hugging Face<|im_end|>\n<|im_start|>user\nYou are a trading agent that manages \
                a portfolio of cash and shares of MSFT. Each trading day you take one action.\n\
                Legible actions today: \"Buy\", \"Hold\".\n\nThe state as JSON.\n";
    let prompts = [
        "{\"closes\":[301.25,303.5,299.87],\"cash\":100000.0,\"shares\":0.0}",
        "{\"closes\":[288.1,290.42,291.0,287.65],\"cash\":512.3,\"shares\":331.25}",
    ]
    .map(|state| {
        let text = format!(
            "{head}{state}\n\nAnswer with the action only.<|im_end|>\n<|im_start|>assistant\n\
             {{\"Action\": \""
        );
        let ids: Vec<i64> = engine
            .tokenizer()
            .encode(&text, true)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        ids
    });
    let shared = prompts[0]
        .iter()
        .zip(&prompts[1])
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared > 60, "the prompts share {shared} tokens");
    let words = [67u32, 41606, 35334];
    let vs = nn::VarStore::new(Device::Cpu);
    let shape = PolicyShape {
        trainable_blocks: 2,
        n_actions: 3,
        value_hidden: 16,
        head_init: HeadInit::TokenRows(words.to_vec()),
        seed: 0,
    };
    let policy = TrainablePolicy::new(engine, &shape, &vs.root()).unwrap();
    let prefix = policy.frozen_prefix(&prompts[1][..shared]).unwrap();
    let again = policy.frozen_prefix(&prompts[0][..shared]).unwrap();
    for ids in &prompts {
        let n = ids.len() as i64;
        let whole = policy
            .frozen_forward(
                &Tensor::from_slice(ids).view([1, n]),
                &Tensor::ones([1, n], (Kind::Int64, Device::Cpu)),
            )
            .unwrap();
        let after = policy
            .frozen_forward_after(&prefix, &ids[shared..])
            .unwrap();
        assert_eq!(after.hidden.size(), whole.hidden.size());
        assert_eq!(after.valid.sum(Kind::Int64).int64_value(&[]), n);
        let diff = (&after.hidden - &whole.hidden)
            .abs()
            .max()
            .double_value(&[]);
        eprintln!("{n} tokens, {shared} cached: largest |diff| {diff:e}");
        // Element by element: a few of SmolLM2's hidden values run to ~2.5e4.
        assert!(
            after.hidden.allclose(&whole.hidden, 1e-4, 1e-3, false),
            "hidden states differ by up to {diff}"
        );
        let (lw, vw) = policy.head_forward(&whole).unwrap();
        let (la, va) = policy.head_forward(&after).unwrap();
        assert!(la.allclose(&lw, 1e-4, 1e-4, false), "{la} vs {lw}");
        assert!(va.allclose(&vw, 1e-4, 1e-4, false), "{va} vs {vw}");
        // The same head from another prompt: the same entry, bit for bit.
        let other = policy.frozen_forward_after(&again, &ids[shared..]).unwrap();
        assert!(other.hidden.equal(&after.hidden));
    }
    let err = policy
        .frozen_forward_after(&prefix, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("after its cached head"), "{err}");
}
