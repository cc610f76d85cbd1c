#!/usr/bin/env bash
# All-cached re-run time of a pipeline (issue 13: the coordinator does not load libtorch), for
# this build's `flag` and, when FLAG_OLD names one, an older binary on its own store. Writes
# $FLAG_BENCH_OUT/noop-<pipeline>.json.
#   bash .ci/bench-noop.sh [pipelines/test-small.yaml]
#   FLAG_OLD=/path/to/old/flag bash .ci/bench-noop.sh pipelines/flag.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
PIPELINE="${1:-pipelines/test-small.yaml}"
FLAG="${FLAG:-$CARGO_TARGET_DIR/release/flag}"
OUT="${FLAG_BENCH_OUT:-$PWD/artifacts/bench}"
mkdir -p "$OUT"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
python3 - "$PIPELINE" "$OUT/noop-$(basename "$PIPELINE" .yaml).json" "$SCRATCH" "$FLAG" "${FLAG_OLD:-}" <<'PY'
import json, os, statistics, subprocess, sys, time
pipeline, out, scratch, new, old = sys.argv[1:6]
def measure(binary, label):
    store = os.path.join(scratch, label)
    env = dict(os.environ, FLAG_STORE=store)
    t = time.perf_counter()
    subprocess.run([binary, "run", pipeline], check=True, capture_output=True, env=env)
    first = time.perf_counter() - t
    times = []
    for _ in range(20):
        t = time.perf_counter()
        r = subprocess.run([binary, "run", pipeline, "--json"], check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t)
    statuses = {json.loads(l)["status"] for l in r.stdout.decode().splitlines() if l.startswith("{") and '"status"' in l}
    start = []
    for _ in range(20):
        t = time.perf_counter()
        subprocess.run([binary, "--version"], check=True, capture_output=True)
        start.append(time.perf_counter() - t)
    return {"binary": binary, "first_run_s": round(first, 3), "runs": len(times),
            "min_s": round(min(times), 4), "median_s": round(statistics.median(times), 4),
            "max_s": round(max(times), 4), "statuses": sorted(statuses),
            "version_median_s": round(statistics.median(start), 4)}
result = {"pipeline": pipeline, "new": measure(new, "new")}
if old:
    result["old"] = measure(old, "old")
    result["speedup_median"] = round(result["old"]["median_s"] / result["new"]["median_s"], 1)
json.dump(result, open(out, "w"), indent=2)
print(json.dumps(result, indent=2))
PY
