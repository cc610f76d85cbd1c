#!/usr/bin/env bash
# Strategist throughput: generations and decisions per minute with one ticker (batch 1) vs
# the six TDQN tickers decided together (batch 6), each with answers constrained to the
# prompt's schema (the default) and free (constrain=false: the behaviour before constrained
# decoding, a JSON prefill and up to 2 retries), on the real model and data, through the
# real binary (`flag run --only strategist`), each in a fresh store.
# Writes $FLAG_BENCH_OUT/strategist.json.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAG="${FLAG:-$CARGO_TARGET_DIR/release/flag}"
OUT="${FLAG_BENCH_OUT:-$PWD/artifacts/bench}"
mkdir -p "$OUT"
python3 - "$FLAG" "$OUT/strategist.json" <<'PY'
import json, os, subprocess, sys, tempfile, time
flag, out = sys.argv[1], sys.argv[2]
window = ["--set", "train_start=2019-01-01", "--set", "train_end=2019-06-30",
          "--set", "test_start=2019-07-01", "--set", "test_end=2019-12-31"]
results = []
settings = [(b, t, c) for c in ("true", "false")
            for b, t in [("batch 1", "[AAPL]"), ("batch 6", "[AAPL, AMZN, GOOGL, FB, MSFT, TSLA]")]]
for label, tickers, constrain in settings:
    with tempfile.TemporaryDirectory() as tmp:
        # The store is a folder of its own: flag refuses a non-empty folder it did not create.
        store = os.path.join(tmp, "store")
        env = dict(os.environ, FLAG_STORE=store, FLAG_ROOT=os.getcwd())
        # The pipeline's own strategist params, plus the constrain switch for this setting.
        pipeline = os.path.join(tmp, "bench.yaml")
        text = open("pipelines/guided.yaml").read().replace(
            "      top_k_entropy: 5\n", f"      top_k_entropy: 5\n      constrain: {constrain}\n", 1)
        open(pipeline, "w").write(text)
        base = [flag, "run", pipeline, "--set", f"tickers={tickers}", *window]
        subprocess.run(base + ["--only", "indicators"], check=True, capture_output=True, env=env)
        t = time.perf_counter()
        r = subprocess.run(base + ["--only", "strategist", "--json"], check=True,
                           capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        q = subprocess.run([flag, "show", "strategist.signals", "--pipeline", pipeline, "--sql",
                            "select count(*) as decisions, sum(attempts) as generations, "
                            "sum(case when failed then 1 else 0 end) as failed from "
                            "(select distinct ticker, decision_date, attempts, failed from t)"],
                           check=True, capture_output=True, text=True, env=env).stdout
        nums = [int(x) for x in q.replace("|", " ").split() if x.isdigit()]
        decisions, generations, failed = nums[-3:]
        results.append({"setting": label, "constrain": constrain == "true",
                        "tickers": tickers, "decisions": decisions,
                        "generations": generations, "failed": failed, "wall_s": round(wall, 2),
                        "generations_per_min": round(generations / wall * 60, 2),
                        "decisions_per_min": round(decisions / wall * 60, 2)})
        print(json.dumps(results[-1]))
json.dump({"bench": "strategist", "device": "cpu", "results": results}, open(out, "w"), indent=2)
PY
