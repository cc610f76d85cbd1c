//! Pure sampling helpers of the generation loop: temperature + top-p sampling, the top-k
//! entropy, where a JSON answer closes, and the per-step tensor work of constrained decoding
//! (restricting logits to the allowed tokens, choosing, scoring). Formulas: [`crate::generate`].
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Where the JSON object begun in `prefix` (or in `text`) closes: the byte offset in `text`
/// just after its final `}`, when braces and brackets balance outside strings. None while it
/// is still open, or when the prefix already closed one (nothing to wait for).
pub fn json_object_end(prefix: &str, text: &str) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped, mut opened) = (0usize, false, false, false);
    let chars = prefix
        .char_indices()
        .map(|(i, c)| (None, i, c))
        .chain(text.char_indices().map(|(i, c)| (Some(()), i, c)));
    for (in_text, i, c) in chars {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => {
                depth += 1;
                opened = true;
            }
            '}' | ']' if depth > 0 => {
                depth -= 1;
                if depth == 0 && opened {
                    return in_text.map(|_| i + c.len_utf8());
                }
            }
            _ => {}
        }
    }
    None
}

/// Normalised top-k entropy of one step from its k largest probabilities (see module docs).
pub fn top_k_entropy(top_probs: &[f64]) -> f64 {
    let k = top_probs.len();
    if k == 0 {
        return 0.0;
    }
    let plogp = |p: f64| if p > 0.0 { p * p.ln() } else { 0.0 };
    let mass: f64 = top_probs.iter().sum();
    let r = (1.0 - mass).max(0.0);
    let h = -(top_probs.iter().map(|&p| plogp(p)).sum::<f64>() + plogp(r));
    (h / ((k + 1) as f64).ln()).clamp(0.0, 1.0)
}

/// Samples from softmax(logits / temperature), restricted to the smallest set of most likely
/// tokens whose mass reaches `top_p` (the token that crosses it included, as transformers).
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> usize {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let probs: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - f64::from(max)) / temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    let mut kept = probs.len();
    if top_p < 1.0 {
        order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut cum = 0.0;
        for (n, &i) in order.iter().enumerate() {
            cum += probs[i] / total;
            if cum >= top_p {
                kept = n + 1;
                break;
            }
        }
    }
    let kept_mass: f64 = order[..kept].iter().map(|&i| probs[i]).sum();
    let mut u = rng.random::<f64>() * kept_mass;
    for &i in &order[..kept] {
        u -= probs[i];
        if u <= 0.0 {
            return i;
        }
    }
    order[kept - 1]
}

/// `lp[r, idx[r]]` for every row, on the CPU.
pub(crate) fn gather_cpu(lp: &Tensor, idx: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        &lp.gather(1, idx, false)
            .reshape([-1])
            .to_device(Device::Cpu),
    )?)
}

/// Per-row entropy of log-probabilities `lp` [A, V]: the top-k entropy (k > 0) or the full
/// Shannon entropy normalised by ln(V) (by ln(allowed count) under a mask, whose disallowed
/// entries are -inf and contribute 0).
pub(crate) fn step_entropies(lp: &Tensor, allowed: Option<&Tensor>, k: usize) -> Result<Vec<f32>> {
    let vocab = lp.size()[1];
    if k == 0 {
        let finite = match allowed {
            Some(a) => lp.masked_fill(&a.logical_not(), 0.0),
            None => lp.shallow_clone(),
        };
        let h = (lp.exp() * finite)
            .sum_dim_intlist(-1, false, Kind::Float)
            .neg();
        let norm = match allowed {
            Some(a) => a
                .sum_dim_intlist(-1, false, Kind::Float)
                .clamp_min(2.0)
                .log(),
            None => Tensor::from((vocab as f64).ln()).to_device(lp.device()),
        };
        return Ok(Vec::<f32>::try_from(&(h / norm).to_device(Device::Cpu))?);
    }
    let k = (k as i64).min(vocab);
    let (top, _) = lp.topk(k, -1, true, false);
    let top = Vec::<f32>::try_from(&top.exp().reshape([-1]).to_device(Device::Cpu))?;
    Ok(top
        .chunks(k as usize)
        .map(|c| top_k_entropy(&c.iter().map(|&p| f64::from(p)).collect::<Vec<_>>()) as f32)
        .collect())
}

/// Logits [A, V] restricted to the allowed tokens: every other entry becomes -inf, so neither
/// argmax nor sampling (whose weights are exp(logit)) can pick it.
pub fn restrict(logits: &Tensor, allowed: &Tensor) -> Tensor {
    logits.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
}

/// One token per row of `logits` [A, V]: argmax at temperature 0, else seeded temperature +
/// top-p sampling with row r's generator.
pub fn choose_tokens(
    logits: &Tensor,
    temperature: f64,
    top_p: f64,
    rngs: &mut [&mut ChaCha8Rng],
) -> Result<Vec<i64>> {
    if temperature == 0.0 {
        return Ok(Vec::<i64>::try_from(
            &logits.argmax(-1, false).to_device(Device::Cpu),
        )?);
    }
    let cpu = logits.to_device(Device::Cpu);
    let mut out = Vec::with_capacity(rngs.len());
    for (r, rng) in rngs.iter_mut().enumerate() {
        let row = Vec::<f32>::try_from(&cpu.get(r as i64))?;
        out.push(sample(&row, temperature, top_p, &mut **rng) as i64);
    }
    Ok(out)
}

#[cfg(test)]
mod json_end_tests {
    use super::json_object_end;

    #[test]
    fn finds_the_close_of_the_object_the_prefill_opened() {
        let pre = "{\"direction\": \"";
        assert_eq!(json_object_end(pre, "LONG\", \"confidence\": 2"), None);
        let t = "LONG\", \"f\": {\"a\": 0.5}} trailing";
        assert_eq!(
            json_object_end(pre, t),
            Some(t.find("} trailing").unwrap() + 1)
        );
        // Braces inside strings, escaped quotes included, do not count.
        let t = "LO}NG\", \"e\": \"a \\\" } b\"}";
        assert_eq!(json_object_end(pre, t), Some(t.len()));
        // Without a prefill the object must open in the text; a closed prefix waits for none.
        assert_eq!(json_object_end("", "x {\"a\": [1, {}]} y"), Some(16));
        assert_eq!(json_object_end("{}", "{"), None);
    }
}
