#!/usr/bin/env bash
# DDQN, TDQN configuration, real AAPL (2012-2017 train, 2018-2019 test), one thread: the `ddqn`
# agent (stages/rl/benches/ddqn.rs) next to a PyTorch script doing the same work step for step
# the way the TDQN authors' code does (stages/rl/scripts/ddqn_reference.py: pandas environment,
# per-step features in Python, deque replay, same network/optimiser/target updates, per-episode
# greedy evaluation on both splits). Both train on the same episode lengths: the reference
# replays the step counts our run drew. Writes $FLAG_BENCH_OUT/ddqn_vs_pytorch.json.
#   EPISODES (default 5), SEED (default 0), FLAG_DATA_DIR (default ../shared/data).
# The reference runs in $FLAG_CACHE/bench-venv (pandas, numpy) with torch taken from the project
# venv's site-packages; pandas is installed there from PyPI when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLAG_BENCH_OUT="${FLAG_BENCH_OUT:-$PWD/artifacts/bench}"
FLAG_CACHE="${FLAG_CACHE:-$HOME/.cache/flag}"
DATA="${FLAG_DATA_DIR:-$PWD/../shared/data}"
EPISODES="${EPISODES:-5}"
SEED="${SEED:-0}"
mkdir -p "$FLAG_BENCH_OUT"
TRAIN="$DATA/tdqn/AAPL_2012-1-1_2018-1-1.csv"
TEST="$DATA/tdqn/AAPL_2018-1-1_2020-1-1.csv"
for f in "$TRAIN" "$TEST"; do [ -f "$f" ] || { echo "missing data file $f" >&2; exit 1; }; done

PROJ_PY="$FLAG_CACHE/venv/bin/python"
TORCH_SITE="$("$PROJ_PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null)" \
  || { echo "torch not importable from $PROJ_PY" >&2; exit 1; }
BENCH_VENV="$FLAG_CACHE/bench-venv"
[ -x "$BENCH_VENV/bin/python" ] || python3 -m venv "$BENCH_VENV"
"$BENCH_VENV/bin/python" -c 'import pandas, numpy' 2>/dev/null \
  || "$BENCH_VENV/bin/pip" install -q pandas numpy \
  || { echo "cannot install pandas/numpy into $BENCH_VENV" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "== ddqn stage agent: $EPISODES episodes, seed $SEED, 1 thread"
FLAG_BENCH_OUT="$WORK" FLAG_BENCH_EPISODES="$EPISODES" FLAG_BENCH_SEED="$SEED" FLAG_DATA_DIR="$DATA" \
  cargo bench --workspace --bench ddqn >"$WORK/cargo.log" 2>&1 \
  || { tail -n 30 "$WORK/cargo.log" >&2; exit 1; }
cp "$WORK/ddqn.json" "$FLAG_BENCH_OUT/ddqn.json"
STEPS="$(python3 -c 'import json,sys; print(",".join(str(p["steps"]) for p in json.load(open(sys.argv[1]))["per_episode"]))' "$WORK/ddqn.json")"
echo "   episode lengths: $STEPS"

echo "== PyTorch reference, same episode lengths, 1 thread"
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$BENCH_VENV/bin/python" stages/rl/scripts/ddqn_reference.py \
  --train "$TRAIN" --test "$TEST" --steps "$STEPS" --seed "$SEED" \
  --torch-site="$TORCH_SITE" --out "$WORK/reference.json" >/dev/null

python3 - "$WORK/ddqn.json" "$WORK/reference.json" "$FLAG_BENCH_OUT/ddqn_vs_pytorch.json" <<'PY'
import json, platform, sys
ours, ref = (json.load(open(p)) for p in sys.argv[1:3])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
def side(r, train_s, eval_s):
    return {"episodes": r["episodes"], "env_steps": r["env_steps"], "gradient_steps": r["gradient_steps"],
            "train_s": round(train_s, 3), "eval_s": round(eval_s, 3),
            "steps_per_s": round(r["env_steps"] / train_s, 2),
            "episodes_per_s": round(r["episodes"] / (train_s + eval_s), 4)}
o = side(ours, ours["train_s"], ours["eval_s"])
p = side(ref, ref["train_s"], ref["eval_s"])
res = {
    "bench": "ddqn_vs_pytorch", "ticker": "AAPL", "config": "TDQN (117 inputs, 4x512, batch 32, Adam, target every 1000)",
    "cpu": cpu, "threads": 1, "seed": ours.get("seed"),
    "episode_steps": [e["steps"] for e in ours["per_episode"]],
    "ddqn_stage": o,
    "pytorch_reference": dict(p, torch=ref["torch"], pandas=ref["pandas"], numpy=ref["numpy"]),
    "ratio_episodes_per_s": round(o["episodes_per_s"] / p["episodes_per_s"], 2),
    "ratio_train_steps_per_s": round(o["steps_per_s"] / p["steps_per_s"], 2),
    "goal_ratio": 10.0,
    "backend": ours.get("backend"),
}
json.dump(res, open(sys.argv[3], "w"), indent=2)
print(json.dumps(res, indent=2))
PY
