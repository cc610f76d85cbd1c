#!/usr/bin/env python3
"""The FLAG-Trader PPO loop in plain PyTorch, timed, for the side-by-side of
.ci/bench-ppo-gpu.sh: the same weights (a GGUF written by gguf_random.py fill, F32), the same
shapes (SmolLM2-135M, top M blocks trainable, policy head over 3 actions and a value MLP on the
last prompt token) and the same work per iteration as the `ppo` stage (stages/ppo/src/train.rs):

- rollout: num_steps decisions plus the bootstrap one; each runs the frozen bottom once (its
  output is kept), the trainable top and the heads, and the frozen reference copy of the top
  (the KL penalty's pi_0), all without gradients; an action is sampled;
- update: update_epochs passes over the shuffled batch in minibatches of minibatch_size
  (CleanRL slicing: 32 then 8 for a batch of 40), each in grad_accum_steps micro-batches
  whose gradients add up, the full PPO loss (clipped policy and value terms, entropy, KL to
  pi_0), gradient clipping and one Adam step (eps 1e-5).
On CUDA the frozen bottom runs in bf16 and the top under bf16 autocast with f32 master weights
(the stage's choice); on a CPU everything is f32.

Not the same as the stage: the prompts are random token ids of the stage's mean prompt length
(every prompt the same length, so no padding), the rewards are random (timing does not depend
on them), and there is no trading environment or prompt rendering. It uses plain torch ops (the
transformers formulation: RMSNorm in f32, rotate-half RoPE, grouped-query SDPA), not the
transformers package, which the GPU machine does not have.

Prints one JSON object: ms per rollout step, ms per update, prompt tokens/s, peak memory, and
model FLOPs utilisation against --peak-tflops.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gguf_random import parse  # noqa: E402


def load_gguf_f32(path):
    raw = open(path, "rb").read()
    _, meta, tensors, data_start, _ = parse(raw)
    m = {k.decode(): v for k, _, v in meta}
    cfg = {
        "n_layer": m["llama.block_count"],
        "d": m["llama.embedding_length"],
        "n_head": m["llama.attention.head_count"],
        "n_kv": m.get("llama.attention.head_count_kv", m["llama.attention.head_count"]),
        "ffn": m["llama.feed_forward_length"],
        "eps": m["llama.attention.layer_norm_rms_epsilon"],
        "rope_base": m.get("llama.rope.freq_base", 10000.0),
    }
    cfg["hd"] = cfg["d"] // cfg["n_head"]
    out = {}
    for name, dims, t, off in tensors:
        if t != 0:
            sys.exit(f"{path}: tensor {name.decode()} is not F32 (write it with gguf_random.py fill)")
        n = math.prod(dims)
        a = data_start + off
        out[name.decode()] = torch.frombuffer(bytearray(raw[a : a + 4 * n]), dtype=torch.float32).reshape(list(reversed(dims)))
    return cfg, out


def unpermute_qk(w, n_head, hd):
    # llama.cpp's converter interleaves Q/K rows for its RoPE; undo it for rotate-half.
    return w.view(n_head, hd // 2, 2, -1).transpose(1, 2).reshape(n_head * hd, -1)


def rms_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Llama:
    def __init__(self, cfg, t, device, frozen_dtype, trainable_blocks, value_hidden, seed):
        self.cfg = cfg
        c = cfg
        put = lambda x, dt: x.to(device=device, dtype=dt)
        n_frozen = c["n_layer"] - trainable_blocks
        self.embed = put(t["token_embd.weight"], frozen_dtype)
        self.blocks = []
        for i in range(c["n_layer"]):
            dt = frozen_dtype if i < n_frozen else torch.float32
            g = lambda s: t[f"blk.{i}.{s}.weight"]
            wq = unpermute_qk(g("attn_q"), c["n_head"], c["hd"])
            wk = unpermute_qk(g("attn_k"), c["n_kv"], c["hd"])
            b = {
                "attn_norm": put(g("attn_norm"), dt),
                "wqkv": put(torch.cat([wq, wk, g("attn_v")]), dt),
                "wo": put(g("attn_output"), dt),
                "ffn_norm": put(g("ffn_norm"), dt),
                "w_gate_up": put(torch.cat([g("ffn_gate"), g("ffn_up")]), dt),
                "w_down": put(g("ffn_down"), dt),
            }
            if i >= n_frozen:
                for v in b.values():
                    v.requires_grad_(True)
            self.blocks.append(b)
        self.n_frozen = n_frozen
        self.norm = put(t["output_norm.weight"], torch.float32).requires_grad_(True)
        gen = torch.Generator().manual_seed(seed)
        d, hv = c["d"], value_hidden
        self.heads = {
            "policy.weight": (torch.randn(3, d, generator=gen) * 0.01),
            "policy.bias": torch.zeros(3),
            "value.w1": torch.randn(hv, d, generator=gen) / math.sqrt(d),
            "value.b1": torch.zeros(hv),
            "value.w2": torch.randn(1, hv, generator=gen) / math.sqrt(hv),
            "value.b2": torch.zeros(1),
        }
        self.heads = {k: v.to(device).requires_grad_(True) for k, v in self.heads.items()}
        self.device = device

    def trainable(self):
        return [v for b in self.blocks[self.n_frozen :] for v in b.values()] + [self.norm] + list(self.heads.values())

    def snapshot(self):
        """The frozen reference pi_0: a detached copy of the top blocks, norm and heads."""
        return (
            [{k: v.detach().clone() for k, v in b.items()} for b in self.blocks[self.n_frozen :]],
            self.norm.detach().clone(),
            {k: v.detach().clone() for k, v in self.heads.items()},
        )

    def rope(self, T):
        c = self.cfg
        inv = 1.0 / (c["rope_base"] ** (torch.arange(0, c["hd"], 2, device=self.device).float() / c["hd"]))
        f = torch.arange(T, device=self.device).float()[:, None] * inv
        e = torch.cat([f, f], -1)
        return e.cos()[None, None], e.sin()[None, None]

    def block(self, x, w, cos, sin):
        c = self.cfg
        b, T, _ = x.shape
        nh, nkv, hd = c["n_head"], c["n_kv"], c["hd"]
        h = rms_norm(x, w["attn_norm"], c["eps"])
        qkv = h @ w["wqkv"].T
        q = qkv[..., : nh * hd].view(b, T, nh, hd).transpose(1, 2)
        k = qkv[..., nh * hd : (nh + nkv) * hd].view(b, T, nkv, hd).transpose(1, 2)
        v = qkv[..., (nh + nkv) * hd :].view(b, T, nkv, hd).transpose(1, 2)
        q = q * cos.to(q.dtype) + rotate_half(q) * sin.to(q.dtype)
        k = k * cos.to(k.dtype) + rotate_half(k) * sin.to(k.dtype)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(b, T, nh * hd) @ w["wo"].T
        h = rms_norm(x, w["ffn_norm"], c["eps"])
        gu = h @ w["w_gate_up"].T
        f = gu.shape[-1] // 2
        return x + (F.silu(gu[..., :f]) * gu[..., f:]) @ w["w_down"].T

    @torch.no_grad()
    def bottom(self, ids):
        x = self.embed[ids]
        cos, sin = self.rope(ids.shape[1])
        for w in self.blocks[: self.n_frozen]:
            x = self.block(x, w, cos, sin)
        return x

    def top(self, hidden, params=None):
        blocks, norm, heads = params or (self.blocks[self.n_frozen :], self.norm, self.heads)
        cos, sin = self.rope(hidden.shape[1])
        cuda = hidden.is_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            x = hidden
            for w in blocks:
                x = self.block(x, w, cos, sin)
        h = rms_norm(x[:, -1].float(), norm, self.cfg["eps"])
        logits = h @ heads["policy.weight"].T + heads["policy.bias"]
        value = (torch.tanh(h @ heads["value.w1"].T + heads["value.b1"]) @ heads["value.w2"].T + heads["value.b2"]).squeeze(-1)
        return logits.float(), value.float()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(cfg, blocks, T):
    """Forward FLOPs per token of `blocks` decoder blocks at context T (2 per multiply-add:
    projections plus causal attention's QK^T and AV)."""
    d, hd, nh, nkv, ffn = cfg["d"], cfg["hd"], cfg["n_head"], cfg["n_kv"], cfg["ffn"]
    proj = d * (nh + 2 * nkv) * hd + nh * hd * d + 3 * d * ffn
    attn = 2 * nh * hd * T / 2  # QK^T and AV over the causal half
    return 2 * blocks * (proj + attn)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-tokens", type=int, required=True, help="prompt length (the stage's mean)")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--trainable-blocks", type=int, default=6)
    ap.add_argument("--value-hidden", type=int, default=256)
    ap.add_argument("--num-steps", type=int, default=40)
    ap.add_argument("--minibatch-size", type=int, default=32)
    ap.add_argument("--grad-accum-steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak (dense bf16) for MFU")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)
    cfg, t = load_gguf_f32(a.gguf)
    frozen = torch.bfloat16 if dev.type == "cuda" else torch.float32
    m = Llama(cfg, t, dev, frozen, a.trainable_blocks, a.value_hidden, a.seed)
    del t
    params = m.trainable()
    opt = torch.optim.Adam(params, lr=a.lr, eps=1e-5)
    ref = m.snapshot()
    vocab = m.embed.shape[0]
    T, S = a.prompt_tokens, a.num_steps
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for it in range(1, a.iterations + 1):
        for g in opt.param_groups:
            g["lr"] = (1 - (it - 1) / a.iterations) * a.lr
        sync(dev)
        t0 = time.perf_counter()
        hid, acts, old_logp, ref_logp, vals = [], [], [], [], []
        with torch.no_grad():
            for s in range(S + 1):
                ids = torch.randint(0, vocab, (1, T), device=dev)
                h = m.bottom(ids)
                logits, v = m.top(h)
                lp = logits.log_softmax(-1)
                if s == S:
                    break
                rl = m.top(h, ref)[0].log_softmax(-1)
                act = torch.multinomial(lp.exp(), 1).squeeze(1)
                hid.append(h)
                acts.append(act)
                old_logp.append(lp.gather(1, act[:, None]).squeeze(1))
                ref_logp.append(rl)
                vals.append(v)
        sync(dev)
        t1 = time.perf_counter()
        # GAE (gamma 0.95, lambda 0.98) over random rewards, on the host like the stage.
        rew = torch.randn(S).tolist()
        values = torch.cat(vals).float().cpu().tolist() + [v.item()]
        adv, last = [0.0] * S, 0.0
        for i in reversed(range(S)):
            delta = rew[i] + 0.95 * values[i + 1] - values[i]
            last = delta + 0.95 * 0.98 * last
            adv[i] = last
        adv_t = torch.tensor(adv, device=dev)
        ret_t = adv_t + torch.tensor(values[:S], device=dev)
        val_t = torch.tensor(values[:S], device=dev)
        acts_t, old_t, ref_t = torch.cat(acts), torch.cat(old_logp).float(), torch.cat(ref_logp).float()
        order = torch.randperm(S).tolist()
        for start in range(0, S, a.minibatch_size):
            mb = order[start : start + a.minibatch_size]
            mb_adv = adv_t[mb]
            mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            micro = max(1, math.ceil(len(mb) / a.grad_accum_steps))
            opt.zero_grad(set_to_none=True)
            for j in range(0, len(mb), micro):
                idx = mb[j : j + micro]
                h = torch.cat([hid[i] for i in idx])
                logits, v = m.top(h)
                lp = logits.log_softmax(-1)
                new = lp.gather(1, acts_t[idx][:, None]).squeeze(1)
                ratio = (new - old_t[idx]).exp()
                ad = mb_adv[j : j + micro]
                pg = torch.max(-ad * ratio, -ad * ratio.clamp(0.8, 1.2)).mean()
                ov, rt = val_t[idx], ret_t[idx]
                vc = ov + (v - ov).clamp(-0.2, 0.2)
                vl = 0.5 * torch.max((v - rt) ** 2, (vc - rt) ** 2).mean()
                ent = -(lp.exp() * lp).sum(-1).mean()
                kl = (lp.exp() * (lp - ref_t[idx])).sum(-1).mean()
                loss = pg - 0.05 * ent + 0.5 * vl + 0.05 * kl
                (loss * len(idx) / len(mb)).backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
        sync(dev)
        t2 = time.perf_counter()
        rows.append({"iteration": it, "rollout_ms": (t1 - t0) * 1e3, "update_ms": (t2 - t1) * 1e3})
    # The first iteration includes CUDA/cuBLAS warm-up: report the rest when there is a rest.
    steady = rows[1:] if len(rows) > 1 else rows
    roll = sum(r["rollout_ms"] for r in steady) / len(steady)
    upd = sum(r["update_ms"] for r in steady) / len(steady)
    n_top, n_all = a.trainable_blocks, cfg["n_layer"]
    # Per iteration: S+1 full forwards plus S reference top forwards; the update is forward +
    # backward (x3) of the top over every sample once per epoch.
    fl = (S + 1) * T * flops_per_token(cfg, n_all, T) + S * T * flops_per_token(cfg, n_top, T)
    fl += 3 * S * T * flops_per_token(cfg, n_top, T)
    secs = (roll + upd) / 1e3
    out = {
        "impl": "pytorch (plain torch ops)",
        "torch": torch.__version__,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(0)})" if dev.type == "cuda" else ""),
        "prompt_tokens": T,
        "iterations": a.iterations,
        "steady_iterations": len(steady),
        "trainable_blocks": n_top,
        "ms_per_rollout_step": roll / S,
        "rollout_ms": roll,
        "update_ms": upd,
        "steps_per_s": S / secs,
        "prompt_tokens_per_s": (S + 1) * T / (roll / 1e3),
        "model_tflop_per_iteration": fl / 1e12,
        "achieved_tflops": fl / secs / 1e12,
        "mfu": (fl / secs / 1e12) / a.peak_tflops if a.peak_tflops > 0 else None,
        "peak_mem_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
        "per_iteration": rows,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
