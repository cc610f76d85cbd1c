//! `head_init: action_scores` with the real SmolLM2: on its calibration prompt the starting
//! policy equals the softmax of the whole answers' log-probabilities (`Sell"}`, `Hold"}`,
//! `Buy"}` after the answer prefix), computed here independently with the full model token by
//! token; `action_words` differs from it exactly by the bias; a missing calibration prompt is
//! an error that says what is needed.

use flag_llm::generate::Engine;
use flag_llm::tokenizer::ChatMessage;
use flag_ppo::env::{ACTION_NAMES, Observation};
use flag_ppo::policy::{ANSWER_CLOSE, HeadStart, LlmPolicy, PolicyConfig};
use flag_ppo::prompt::PromptText;
use flag_ppo::train::decide;
use tch::{Device, nn};

const PREFIX: &str = "{\"Action\": \"";

fn config(head_start: HeadStart) -> PolicyConfig {
    PolicyConfig {
        trainable_blocks: 2,
        value_hidden: 16,
        head_start,
        max_prompt_tokens: 512,
        init_seed: 3,
    }
}

fn obs(user: &str) -> Observation {
    Observation {
        prompt: PromptText {
            user: user.into(),
            answer_prefix: PREFIX.into(),
            head: 0,
        },
        mask: vec![true, true, true],
        date: None,
    }
}

/// Softmax over actions of ln p(whole answer | prompt), summed token by token in f64.
fn whole_answer_policy(engine: &Engine, user: &str) -> Vec<f64> {
    let tok = engine.tokenizer();
    let text = tok
        .apply_chat_template(&[ChatMessage::user(user)], true)
        .unwrap();
    let prompt = tok.encode(&format!("{text}{PREFIX}"), true).unwrap();
    let scores: Vec<f64> = ACTION_NAMES
        .iter()
        .map(|w| {
            let whole = tok
                .encode(&format!("{text}{PREFIX}{w}{ANSWER_CLOSE}"), true)
                .unwrap();
            assert!(whole.starts_with(&prompt));
            (prompt.len()..whole.len())
                .map(|k| {
                    let logits = engine.next_token_logits_ids(&whole[..k]).unwrap();
                    let max = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
                    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
                    logits[whole[k] as usize] as f64 - max - z.ln()
                })
                .sum()
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
    scores.iter().map(|s| (s - max).exp() / z).collect()
}

#[test]
fn action_scores_start_is_the_models_whole_answer_preference() {
    let gguf = flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
    let user = "You trade MSFT. It closed at 210.1 after three up days; you hold no shares. \
                Choose Buy, Sell or Hold. Answer as {\"Action\": ...}.";
    let calibration = obs(user);

    let vs = nn::VarStore::new(Device::Cpu);
    let scored = LlmPolicy::load_calibrated(
        &gguf,
        config(HeadStart::ActionScores),
        PREFIX,
        &vs.root(),
        Some(&calibration.prompt),
    )
    .unwrap();
    let (d, _) = decide(&scored, None, &calibration).unwrap();

    let engine = Engine::load(&gguf, Device::Cpu).unwrap();
    let want = whole_answer_policy(&engine, user);
    for (a, (got, want)) in d.probs.iter().zip(&want).enumerate() {
        assert!(
            (got - want).abs() < 1e-4,
            "{}: policy {got} vs whole-answer {want} ({:?} vs {want:?})",
            ACTION_NAMES[a],
            d.probs
        );
    }

    // action_words is the same head without the bias: it differs on the same prompt by
    // exactly the bias (in log space, up to the shared normaliser).
    let vs2 = nn::VarStore::new(Device::Cpu);
    let words =
        LlmPolicy::load(&gguf, config(HeadStart::ActionWords), PREFIX, &vs2.root()).unwrap();
    let (w, _) = decide(&words, None, &calibration).unwrap();
    let bias = tch::no_grad(|| {
        Vec::<f32>::try_from(&scored.net.top().policy_b.to_device(Device::Cpu)).unwrap()
    });
    assert!(bias.iter().all(|b| *b <= 0.0), "log-probs: {bias:?}");
    assert!(
        bias.iter().any(|b| *b < -1e-3),
        "the rest of some answer is not certain: {bias:?}"
    );
    let shift: Vec<f64> = (0..3)
        .map(|a| d.logp[a] - w.logp[a] - bias[a] as f64)
        .collect();
    for s in &shift {
        assert!((s - shift[0]).abs() < 1e-4, "{shift:?}");
    }

    // Without a calibration prompt the start cannot be computed.
    let vs3 = nn::VarStore::new(Device::Cpu);
    let err = LlmPolicy::load(&gguf, config(HeadStart::ActionScores), PREFIX, &vs3.root())
        .err()
        .expect("action_scores without a calibration prompt");
    assert!(err.contains("calibration prompt"), "{err}");
}
