#!/usr/bin/env bash
# Store commits to S3-compatible storage: objects/s and MB/s of committing the artifact set of
# pipelines/flag.yaml into a bucket on moto and on SeaweedFS (loopback, .ci/s3/up.sh), through
# the store's own commit path (`flag bench-store --push-from`: conditional PUT per object, then
# the manifest), twice: into an empty prefix, then again (everything already there).
# The artifact set: FLAG_BENCH_S3_ONLY (default: flag.yaml's stages that need no LLM: market
# data, indicators, baselines, DDQN, FinAgent's news and MiniLM embeddings); set it empty for
# the whole pipeline (long on a CPU). Output: $FLAG_BENCH_OUT/s3.json.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAG_CACHE="${FLAG_CACHE:-$HOME/.cache/flag}"
FLAG="${CARGO_TARGET_DIR:-$FLAG_CACHE/target}/release/flag"
OUT="${FLAG_BENCH_OUT:-$PWD/artifacts/bench}"
LOCAL="${FLAG_BENCH_S3_LOCAL:-$FLAG_CACHE/bench-s3/store}"
ONLY="${FLAG_BENCH_S3_ONLY-ohlcv indicators baselines_tdqn baselines_finagent rl_only flag_bars flag_buy_and_hold fa_bars fa_news fa_items fa_buy_and_hold}"
mkdir -p "$OUT" "$(dirname "$LOCAL")"

args=()
for s in $ONLY; do args+=(--only "$s"); done
echo "== the artifact set: pipelines/flag.yaml ${ONLY:+(--only $ONLY)} into $LOCAL" >&2
"$FLAG" --store "$LOCAL" run pipelines/flag.yaml "${args[@]}" >&2

env_file="$(mktemp)"
trap 'rm -f "$env_file"' EXIT
bash .ci/s3/up.sh both >"$env_file"
# shellcheck disable=SC1090
source "$env_file"
results=()
for server in moto seaweedfs; do
  var="FLAG_S3_$(echo "$server" | tr a-z A-Z)_ENDPOINT"
  prefix="bench-$(date +%s%N)"
  echo "== commit to $server (${!var}), s3://$FLAG_S3_BUCKET/$prefix" >&2
  res="$OUT/s3-$server.json"
  AWS_ENDPOINT_URL="${!var}" FLAG_STORE_CACHE="$(mktemp -d)" \
    "$FLAG" --store "s3://$FLAG_S3_BUCKET/$prefix" bench-store --push-from "$LOCAL" >"$res"
  results+=("$server=$res")
done
python3 - "$OUT/s3.json" "${results[@]}" <<'PY'
import json, os, sys
out = {"cpus": os.cpu_count(), "servers": {}}
for arg in sys.argv[2:]:
    name, path = arg.split("=", 1)
    out["servers"][name] = json.load(open(path))
    os.remove(path)
json.dump(out, open(sys.argv[1], "w"), indent=2)
for name, r in out["servers"].items():
    for p in r["passes"]:
        print(f"{name:9} {p['pass']:8} {p['runs']:3} runs {p['objects']:4} objects "
              f"{p['bytes']/1e6:8.1f} MB {p['seconds']:7.2f} s  {p['objects_per_s']:7.1f} obj/s "
              f"{p['mb_per_s']:7.1f} MB/s")
PY
