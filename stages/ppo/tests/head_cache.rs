//! The policy keeps the frozen pass of a prompt's head (the task text before the state,
//! which depends on the ticker and the legible actions only) and runs only the rest of each
//! prompt: on the real FLAG-Trader template the decisions equal a whole-prompt pass up to
//! rounding, one entry serves every prompt of a head, and a new set of legible actions makes
//! a second entry.

use flag_ppo::env::Observation;
use flag_ppo::policy::{HeadStart, LlmPolicy, PolicyConfig};
use flag_ppo::prompt::{StateTemplate, StateView};
use flag_ppo::train::decide;
use tch::{Device, Kind, nn};

/// One day: closes, cash, shares, the last actions, the legible actions.
type Day<'a> = (&'a [f64], f64, f64, &'a [&'a str], &'a [&'a str]);

#[test]
fn decisions_after_a_kept_head_equal_whole_prompt_decisions() {
    flag_llm::generate::set_threads(2);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let file = root.join("prompts/flag_trader/state.txt");
    let template =
        StateTemplate::parse(&std::fs::read_to_string(&file).unwrap(), "state.txt").unwrap();
    let gguf = flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = PolicyConfig {
        trainable_blocks: 2,
        value_hidden: 16,
        head_start: HeadStart::ActionWords,
        max_prompt_tokens: 1024,
        init_seed: 0,
    };
    let policy = LlmPolicy::load(&gguf, cfg, template.answer_prefix(), &vs.root()).unwrap();
    let days: [Day; 3] = [
        (
            &[310.2, 312.85, 309.1],
            1000.0,
            0.0,
            &["Hold"],
            &["Buy", "Hold"],
        ),
        (
            &[312.85, 309.1, 315.47],
            1000.0,
            0.0,
            &["Hold", "Hold"],
            &["Buy", "Hold"],
        ),
        (
            &[309.1, 315.47, 318.0],
            0.0,
            3.17,
            &["Hold", "Buy"],
            &["Sell", "Hold"],
        ),
    ];
    let mut heads = Vec::new();
    for (i, (closes, cash, shares, last, allowed)) in days.into_iter().enumerate() {
        let prompt = template.render(&StateView {
            ticker: "MSFT",
            closes,
            cash,
            shares,
            total_value: cash + shares * closes[closes.len() - 1],
            last_rewards: &[0.01, -0.002][..last.len()],
            last_net_values: &[1000.0, 1004.1][..last.len()],
            last_actions: last,
            allowed,
        });
        assert!(prompt.head > 0, "the template has a head before its state");
        let (ids, head) = policy.encode_with_head(&prompt).unwrap();
        assert!(
            head > 100 && head < ids.len(),
            "{head} of {} tokens",
            ids.len()
        );
        heads.push(head);
        let mask = vec![allowed.contains(&"Sell"), true, allowed.contains(&"Buy")];
        let obs = Observation {
            prompt,
            mask: mask.clone(),
            date: None,
        };
        let (kept, _) = decide(&policy, None, &obs).unwrap();
        // The whole prompt through the frozen blocks, as before heads were kept.
        let whole = policy.frozen(&ids).unwrap();
        let (logits, value) = tch::no_grad(|| policy.net.head_forward(&whole)).unwrap();
        let logits = Vec::<f64>::try_from(logits.to_kind(Kind::Double).view([-1])).unwrap();
        let allowed_logits: Vec<f64> = (0..3).filter(|&a| mask[a]).map(|a| logits[a]).collect();
        let max = allowed_logits.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = allowed_logits.iter().map(|l| (l - max).exp()).sum();
        for a in (0..3).filter(|&a| mask[a]) {
            let p = (logits[a] - max).exp() / z;
            assert!(
                (kept.probs[a] - p).abs() < 1e-5,
                "day {i} action {a}: {} with the kept head, {p} whole",
                kept.probs[a]
            );
        }
        let v = value.to_kind(Kind::Double).double_value(&[0]);
        assert!(
            (kept.value - v).abs() < 1e-5,
            "day {i}: value {} vs {v}",
            kept.value
        );
        assert_eq!(kept.tokens, ids.len());
        assert_eq!(policy.heads_kept(), if i < 2 { 1 } else { 2 });
    }
    assert_eq!(heads[0], heads[1], "one head for the same legible actions");
}
