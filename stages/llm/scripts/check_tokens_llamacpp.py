#!/usr/bin/env python3
"""Cross-check the tokenizer fixture against llama.cpp, the GGUF format's own implementation.

transformers ignores `tokenizer.ggml.pre = "smollm"` (see make_reference.py); llama.cpp honours
it. This script tokenizes every fixture text with llama-cpp-python (vocab only, no weights) and
fails if any result differs from the fixture's `ids`. With --write it records the outcome in the
fixture's meta (`llama_cpp_check`). Run with the llama.cpp venv that .ci/bench-llm.sh builds.
"""

from __future__ import annotations

import argparse
import json
import sys

import llama_cpp
from llama_cpp import Llama


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    llm = Llama(model_path=args.gguf, vocab_only=True, verbose=False)
    with open(args.fixture, encoding="utf-8") as f:
        fx = json.load(f)
    bad = []
    for case in fx["cases"]:
        ids = llm.tokenize(case["text"].encode("utf-8"), add_bos=False, special=True)
        if ids != case["ids"]:
            bad.append(f"{case['name']}: llama.cpp {ids} != fixture {case['ids']}")
    for line in bad:
        print(line, file=sys.stderr)
    n = len(fx["cases"])
    print(f"llama.cpp tokenizer: {n - len(bad)}/{n} fixture cases identical")
    if args.write and not bad:
        fx["meta"]["llama_cpp_check"] = (
            f"llama-cpp-python {llama_cpp.__version__}: all {n} `ids` identical "
            "(scripts/check_tokens_llamacpp.py)"
        )
        with open(args.fixture, "w", encoding="utf-8") as f:
            json.dump(fx, f, ensure_ascii=False, indent=1)
            f.write("\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
