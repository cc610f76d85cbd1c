#!/usr/bin/env bash
# FinAgent memory benchmark: all-MiniLM-L6-v2 embedding throughput (real news texts, CPU,
# 2 libtorch threads) and exact-search latency per query at 10k, 100k and 1M memory items
# (random 384-dim unit vectors, one thread). Writes $FLAG_BENCH_OUT/retrieval.json (default
# $FLAG_CACHE/bench/, outside the repository) and prints it.
#
#   bash .ci/bench-retrieval.sh
#   FLAG_BENCH_RETRIEVAL_SIZES=10000,100000 bash .ci/bench-retrieval.sh   # skip the 1M case
set -euo pipefail
cd "$(dirname "$0")/.."

FLAG_CACHE="${FLAG_CACHE:-$HOME/.cache/flag}"
export FLAG_CACHE
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FLAG_CACHE/target}"
export LIBTORCH_USE_PYTORCH=1
export VIRTUAL_ENV="${VIRTUAL_ENV:-$FLAG_CACHE/venv}"
export PATH="$FLAG_CACHE/venv/bin:$PATH"
export FLAG_BENCH_OUT="${FLAG_BENCH_OUT:-$FLAG_CACHE/bench}"
mkdir -p "$FLAG_BENCH_OUT"

# --workspace: the same features (and so the same build) as `just test`.
cargo test --release --workspace -p flag-agents --test memory_bench -- \
  --ignored --nocapture --test-threads=1 bench_memory
echo "wrote $FLAG_BENCH_OUT/retrieval.json"
