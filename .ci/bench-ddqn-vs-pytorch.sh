#!/usr/bin/env bash
# DDQN, TDQN configuration, real AAPL (2012-2017 train, 2018-2019 test), one thread: the `ddqn`
# agent (stages/rl/benches/ddqn.rs) next to a PyTorch script doing the same work step for step
# the way the TDQN authors' code does (stages/rl/scripts/ddqn_reference.py: pandas environment,
# per-step features in Python, deque replay, same network/optimiser/target updates, per-episode
# greedy evaluation on both splits). Both train on the same episode lengths: the reference
# replays the step counts our run drew. Writes $FLAG_BENCH_OUT/ddqn_vs_pytorch.json.
#   EPISODES (default 5), SEED (default 0), ROUNDS (default 3: each side runs that often,
#   alternately, and is judged by its median run), FLAG_DATA_DIR (default ../shared/data).
# The reference runs in $FLAG_CACHE/bench-venv (pandas, numpy) with torch taken from the project
# venv's site-packages; pandas is installed there from PyPI when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLAG_BENCH_OUT="${FLAG_BENCH_OUT:-$PWD/artifacts/bench}"
FLAG_CACHE="${FLAG_CACHE:-$HOME/.cache/flag}"
DATA="${FLAG_DATA_DIR:-$PWD/../shared/data}"
EPISODES="${EPISODES:-5}"
SEED="${SEED:-0}"
ROUNDS="${ROUNDS:-3}"
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
# Both sides run ROUNDS times, alternately, so that a slow spell of the machine (its speed
# varies by ~10% over minutes) falls on both; each side is judged by its median run.
echo "== building the ddqn bench"
cargo bench --workspace --bench ddqn --no-run >"$WORK/cargo.log" 2>&1 \
  || { tail -n 30 "$WORK/cargo.log" >&2; exit 1; }
STEPS=""
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r/$ROUNDS: ddqn stage agent, $EPISODES episodes, seed $SEED, 1 thread"
  FLAG_BENCH_OUT="$WORK/ours$r" FLAG_BENCH_EPISODES="$EPISODES" FLAG_BENCH_SEED="$SEED" FLAG_DATA_DIR="$DATA" \
    cargo bench --workspace --bench ddqn >"$WORK/cargo.log" 2>&1 \
    || { tail -n 30 "$WORK/cargo.log" >&2; exit 1; }
  if [ -z "$STEPS" ]; then
    STEPS="$(python3 -c 'import json,sys; print(",".join(str(p["steps"]) for p in json.load(open(sys.argv[1]))["per_episode"]))' "$WORK/ours$r/ddqn.json")"
    echo "   episode lengths: $STEPS"
  fi
  echo "== round $r/$ROUNDS: PyTorch reference, same episode lengths, 1 thread"
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$BENCH_VENV/bin/python" stages/rl/scripts/ddqn_reference.py \
    --train "$TRAIN" --test "$TEST" --steps "$STEPS" --seed "$SEED" \
    --torch-site="$TORCH_SITE" --out "$WORK/reference$r.json" >/dev/null
done

python3 - "$WORK" "$ROUNDS" "$FLAG_BENCH_OUT" <<'PY'
import json, platform, statistics, sys
work, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ours_runs = [json.load(open(f"{work}/ours{r}/ddqn.json")) for r in range(1, rounds + 1)]
ref_runs = [json.load(open(f"{work}/reference{r}.json")) for r in range(1, rounds + 1)]
for a in ours_runs[1:]:
    assert [e["steps"] for e in a["per_episode"]] == [e["steps"] for e in ours_runs[0]["per_episode"]], \
        "the ddqn bench drew other episode lengths in another round"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
def median_run(runs):
    # The run whose train+eval time is the median (the lower one of the middle two when even).
    ranked = sorted(runs, key=lambda r: r["train_s"] + r["eval_s"])
    return ranked[(len(ranked) - 1) // 2]
def side(r):
    return {"episodes": r["episodes"], "env_steps": r["env_steps"], "gradient_steps": r["gradient_steps"],
            "train_s": round(r["train_s"], 3), "eval_s": round(r["eval_s"], 3),
            "steps_per_s": round(r["env_steps"] / r["train_s"], 2),
            "episodes_per_s": round(r["episodes"] / (r["train_s"] + r["eval_s"]), 4)}
ours, ref = median_run(ours_runs), median_run(ref_runs)
o, p = side(ours), side(ref)
per_round = [round(side(a)["episodes_per_s"] / side(b)["episodes_per_s"], 2) for a, b in zip(ours_runs, ref_runs)]
res = {
    "bench": "ddqn_vs_pytorch", "ticker": "AAPL", "config": "TDQN (117 inputs, 4x512, batch 32, Adam, target every 1000)",
    "cpu": cpu, "threads": 1, "seed": ours.get("seed"), "rounds": rounds,
    "episode_steps": [e["steps"] for e in ours["per_episode"]],
    "ddqn_stage": dict(o, runs_s=[round(r["train_s"] + r["eval_s"], 3) for r in ours_runs]),
    "pytorch_reference": dict(p, torch=ref["torch"], pandas=ref["pandas"], numpy=ref["numpy"],
                              runs_s=[round(r["train_s"] + r["eval_s"], 3) for r in ref_runs]),
    "ratio_episodes_per_s": round(o["episodes_per_s"] / p["episodes_per_s"], 2),
    "ratio_train_steps_per_s": round(o["steps_per_s"] / p["steps_per_s"], 2),
    "ratio_episodes_per_s_by_round": per_round,
    "goal_ratio": 10.0,
    "backend": ours.get("backend"),
}
cp = json.dumps(ours, indent=2)
open(f"{out}/ddqn.json", "w").write(cp)
json.dump(res, open(f"{out}/ddqn_vs_pytorch.json", "w"), indent=2)
print(json.dumps(res, indent=2))
PY
