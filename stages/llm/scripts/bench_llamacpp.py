#!/usr/bin/env python3
"""llama.cpp (via llama-cpp-python) on the same GGUF, measured the way `flag llm bench` measures
our runtime: prefill of a prompt of exactly P tokens, then N greedy decode steps, single stream
(llama.cpp's high-level API decodes one sequence at a time), CPU, a fixed thread count.

Prints one JSON object. Used by .ci/bench-llm.sh; needs only llama_cpp and numpy.

    python bench_llamacpp.py --gguf M.gguf --prompt-file P.txt --prompt-tokens 128 \
        --decode-tokens 32 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np
from llama_cpp import Llama, __version__ as llama_cpp_version


def last_logits(llm: Llama) -> np.ndarray:
    # Without logits_all, llama-cpp-python no longer copies logits into llm.scores; the
    # context's output buffer holds the one requested row (the batch's last token).
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    llm = Llama(
        model_path=args.gguf,
        n_ctx=max(512, args.prompt_tokens + args.decode_tokens + 8),
        n_batch=512,
        n_ubatch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        use_mmap=True,
        verbose=False,
    )
    load_s = time.perf_counter() - t0

    text = open(args.prompt_file, encoding="utf-8").read()
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    while len(ids) < args.prompt_tokens:  # same rule as the Rust bench: repeat, then cut
        ids = ids + ids
    ids = ids[: args.prompt_tokens]

    prefill, decode, last_text = [], [], ""
    for r in range(args.repeats + 1):  # first round warms caches and is discarded
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        t_prefill = time.perf_counter() - t
        out = []
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            nxt = int(np.argmax(last_logits(llm)))
            out.append(nxt)
            llm.eval([nxt])
        t_decode = time.perf_counter() - t
        if r > 0:
            prefill.append(args.prompt_tokens / t_prefill)
            decode.append(args.decode_tokens / t_decode)
        last_text = llm.detokenize(out).decode("utf-8", errors="replace")

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "llama_cpp_python": llama_cpp_version,
                "gguf": os.path.basename(args.gguf),
                "threads": args.threads,
                "prompt_tokens": args.prompt_tokens,
                "decode_tokens": args.decode_tokens,
                "repeats": args.repeats,
                "load_s": round(load_s, 4),
                "batch": 1,
                "prefill_tok_s": round(statistics.median(prefill), 2),
                "decode_tok_s": round(statistics.median(decode), 2),
                "prefill_tok_s_all": [round(x, 2) for x in prefill],
                "decode_tok_s_all": [round(x, 2) for x in decode],
                "peak_rss_mib": round(rss_kib / 1024, 1),
                "greedy_text": last_text,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
