#!/usr/bin/env bash
# PPO throughput on the CPU configuration of FLAG-Trader (MSFT, paper prompt, top 2 blocks
# trainable, 3 iterations of 40 steps, 2 libtorch threads): environment steps/s, prompt
# tokens/s, ms per rollout and per update, from the stage's own training log.
# Writes $FLAG_BENCH_OUT/ppo_cpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAG="${FLAG:-$CARGO_TARGET_DIR/release/flag}"
OUT="${FLAG_BENCH_OUT:-$PWD/artifacts/bench}"
mkdir -p "$OUT"
STORE="$(mktemp -d)"
trap 'rm -rf "$STORE"' EXIT
start=$(date +%s.%N)
FLAG_STORE="$STORE" "$FLAG" run pipelines/flag-trader.yaml --only flag_stocks \
  --set 'flag_stocks.tickers=[MSFT]' --set flag_stocks.total_timesteps=120 \
  --set flag_stocks.trainable_blocks=2 --set flag_stocks.runs=1 \
  --set flag_stocks.device=cpu --set flag_stocks.threads=2 >/dev/null
end=$(date +%s.%N)
FLAG_STORE="$STORE" "$FLAG" show flag_stocks.timing --pipeline pipelines/flag-trader.yaml --sql \
  "SELECT count(*) AS iterations, avg(steps_per_s) AS steps_per_s, avg(prompt_tokens_per_s) AS prompt_tokens_per_s, avg(rollout_ms) AS rollout_ms, avg(update_ms) AS update_ms FROM t" \
  | tee "$OUT/ppo_cpu.txt"
python3 - "$OUT/ppo_cpu.txt" "$OUT/ppo_cpu.json" "$start" "$end" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
rows = [l for l in text.splitlines() if l.startswith("|") and not set(l) <= set("|-+ ")]
head = [c.strip() for c in rows[0].strip("|").split("|")]
vals = [float(c) for c in rows[1].strip("|").split("|")]
r = dict(zip(head, vals))
r.update({"config": "MSFT, prompts/flag_trader/state.txt, trainable_blocks 2, num_steps 40, 3 iterations, 2 threads, CPU f32",
          "stage_wall_s": round(float(sys.argv[4]) - float(sys.argv[3]), 1)})
json.dump(r, open(sys.argv[2], "w"), indent=2)
print(json.dumps(r, indent=2))
PY
