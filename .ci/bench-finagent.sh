#!/usr/bin/env bash
# FinAgent on the CPU: agent days per minute per module and in total, from the stage times of
# pipelines/flag.yaml's FinAgent path (MSFT, real news, real SmolLM2 and MiniLM) run from an
# empty store over FLAG_BENCH_FINAGENT_DAYS test days (default the path's own window). Writes
# $FLAG_BENCH_OUT/finagent.json.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAG="${FLAG:-$CARGO_TARGET_DIR/release/flag}"
OUT="${FLAG_BENCH_OUT:-$PWD/artifacts/bench}"
mkdir -p "$OUT"
python3 - "$FLAG" "$OUT/finagent.json" <<'PY'
import json, os, subprocess, sys, tempfile, time
flag, out = sys.argv[1], sys.argv[2]
args = [flag, "run", "pipelines/flag.yaml", "--only", "finagent", "--json", "--jobs", "1"]
end = os.environ.get("FLAG_BENCH_FINAGENT_END")
if end:
    args += ["--set", f"fa_test_end={end}"]
with tempfile.TemporaryDirectory() as store:
    t = time.perf_counter()
    r = subprocess.run(args, check=True, capture_output=True, text=True,
                       env=dict(os.environ, FLAG_STORE=store))
    wall = time.perf_counter() - t
    recs = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    secs = {v["stage"]: v.get("seconds") or 0.0 for v in recs}
    rows = {v["stage"]: {k: o.get("rows") for k, o in (v.get("outputs") or {}).items()} for v in recs}
days = rows["finagent"]["decisions"]
modules = {"market intelligence (latest)": "fa_intel", "retrieval": "fa_hits",
           "market intelligence (past)": "fa_past", "low-level reflection": "fa_low",
           "high-level reflection + decision": "finagent", "news embedding (memory)": "fa_items"}
per = {m: {"seconds": round(secs[s], 1), "days_per_minute": round(days / secs[s] * 60, 2) if secs[s] else None}
       for m, s in modules.items()}
agent = sum(secs[s] for m, s in modules.items() if s != "fa_items")
res = {"pipeline": "pipelines/flag.yaml (FinAgent path, MSFT)", "days": days,
       "memory_items": rows["fa_items"]["items"], "modules": per,
       "agent_days_per_minute": round(days / agent * 60, 2), "wall_s": round(wall, 1),
       "threads": os.environ.get("FLAG_LLM_THREADS", "default")}
json.dump(res, open(out, "w"), indent=2)
print(json.dumps(res, indent=2))
PY
