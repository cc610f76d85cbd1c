"""PyTorch reference for one FLAG-Trader PPO update (stages/ppo/tests/reference.rs runs it).

Reads the update's inputs from a safetensors file written by the Rust test (the frozen
bottom's hidden states of four left-padded prompts, the trainable top's weights, the rollout
records and the settings), recomputes the trainable top of the llama decoder, the policy and
value heads and the PPO loss terms with plain torch ops (the transformers formulation: RMSNorm
in f32, rotate-half RoPE with positions counted over real tokens, grouped-query attention),
backpropagates, clips the gradient norm, takes one Adam step and evaluates the updated action
probabilities. Writes the results as safetensors. Needs only torch (no numpy, no safetensors
package: the format is parsed by hand).
"""
import json
import struct
import sys

import torch
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "BOOL": torch.bool, "U8": torch.uint8}


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = DTYPES[info["dtype"]]
        t = torch.frombuffer(bytearray(body[a:b]), dtype=dt) if b > a else torch.empty(0, dtype=dt)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def write_safetensors(path, tensors):
    header, chunks, off = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().to(torch.float64).reshape(t.shape).contiguous()
        flat = t.reshape(-1)
        data = bytes(flat.view(torch.uint8).tolist()) if t.numel() else b""
        header[name] = {"dtype": "F64", "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        chunks.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def rms_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def main(inp, outp):
    t = read_safetensors(inp)
    s = {k[len("scalar.") :]: float(v.item()) for k, v in t.items() if k.startswith("scalar.")}
    nh, nkv, hd = int(s["n_head"]), int(s["n_kv_head"]), int(s["head_dim"])
    eps, base = s["eps"], s["rope_base"]
    hidden, valid = t["hidden"], t["valid"].bool()
    b, T, _ = hidden.shape
    blocks = sorted({k.split(".")[0] for k in t if k.startswith("block")}, key=lambda k: int(k[5:]))
    params = {k: t[k].clone().requires_grad_(True) for k in t if k.startswith(("block", "final_norm", "policy.", "value."))}

    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    inv_freq = 1.0 / (torch.tensor(base, dtype=torch.float32) ** (torch.arange(0, hd, 2).float() / hd))
    freqs = pos.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    ar = torch.arange(T)
    causal = ar[None, :] <= ar[:, None]
    diag = ar[None, :] == ar[:, None]
    mask = (valid[:, None, :] & causal[None]) | diag[None]
    mask = mask[:, None]

    def forward(p):
        x = hidden
        for blk in blocks:
            w = lambda n: p[f"{blk}.{n}"]
            h = rms_norm(x, w("attn_norm"), eps)
            qkv = h @ w("wqkv").T
            q = qkv[..., : nh * hd].view(b, T, nh, hd).transpose(1, 2)
            k = qkv[..., nh * hd : (nh + nkv) * hd].view(b, T, nkv, hd).transpose(1, 2)
            v = qkv[..., (nh + nkv) * hd :].view(b, T, nkv, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            x = x + a.transpose(1, 2).reshape(b, T, nh * hd) @ w("wo").T
            h = rms_norm(x, w("ffn_norm"), eps)
            gu = h @ w("w_gate_up").T
            f = gu.shape[-1] // 2
            x = x + (F.silu(gu[..., :f]) * gu[..., f:]) @ w("w_down").T
        x = rms_norm(x, p["final_norm"], eps)
        last = (valid.long() * ar[None]).argmax(-1)
        h = x[torch.arange(b), last].float()
        logits = h @ p["policy.weight"].T + p["policy.bias"]
        value = (torch.tanh(h @ p["value.w1"].T + p["value.b1"]) @ p["value.w2"].T + p["value.b2"]).squeeze(-1)
        return logits, value

    amask = t["mask"].bool()
    logits, value = forward(params)
    logp = logits.masked_fill(~amask, float("-inf")).log_softmax(-1)
    finite = lambda lp: lp.masked_fill(~amask, 0.0)
    new_logp = logp.gather(1, t["actions"].long()[:, None]).squeeze(1)
    ratio = (new_logp - t["old_logp"]).exp()
    adv, c = t["advantages"], s["clip_coef"]
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - c, 1 + c)).double().mean().float()
    old_v, ret = t["old_values"], t["returns"]
    v_clip = old_v + (value - old_v).clamp(-c, c)
    vloss = (torch.max((value - ret) ** 2, (v_clip - ret) ** 2).double().mean() * 0.5).float()
    ent = (-(logp.exp() * finite(logp)).sum(-1)).mean()
    kl = (logp.exp() * (finite(logp) - finite(t["ref_logp"]))).sum(-1, dtype=torch.float64).mean().float()
    loss = pg - s["ent_coef"] * ent + s["vf_coef"] * vloss + s["kl_coef"] * kl
    loss.backward()
    names = sorted(params)
    grad_norm = torch.sqrt(sum(params[n].grad.double().pow(2).sum() for n in names))
    torch.nn.utils.clip_grad_norm_([params[n] for n in names], s["max_grad_norm"])
    opt = torch.optim.Adam([params[n] for n in names], lr=s["lr"], eps=1e-5)
    opt.step()
    with torch.no_grad():
        logits2, value2 = forward(params)
        probs = logits2.masked_fill(~amask, float("-inf")).softmax(-1)
    write_safetensors(outp, {
        "policy_loss": pg, "value_loss": vloss, "entropy": ent, "kl_ref": kl, "loss": loss,
        "grad_norm": grad_norm, "probs": probs, "values": value2,
    })


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
