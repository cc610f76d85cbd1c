#!/usr/bin/env bash
# Indicators vs TA-Lib and polars, in one run, on the same synthetic Parquet (issue 14 goal 1).
#
# Generates synthetic OHLCV in schema ohlcv (200 tickers x 5,000 days = 1M rows; set
# FLAG_BENCH_INDICATORS_ROWS=10M for 2,000 tickers = 10M rows), then times, best of
# FLAG_BENCH_REPEATS (default 2), each reading that Parquet and writing the same column set:
#   (a) the `indicators` stage's code path (compute_parquet via `cargo bench --bench indicators`),
#   (b) TA-Lib (C, PyPI wheel) per ticker + pyarrow read/write,
#   (c) polars, lazy, `.over("ticker")` rolling windows.
# The anchors live in their own venv ($FLAG_CACHE/bench-venv, pinned versions, created on
# first use). Writes $FLAG_BENCH_OUT/indicators.json (indicators-10m.json at 10M rows; default
# artifacts/bench/) and prints a table. Any tool that cannot run fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR="${FLAG_BENCH_OUT:-$ROOT/artifacts/bench}"
CACHE="${FLAG_CACHE:-$HOME/.cache/flag}"
VENV="$CACHE/bench-venv"
HELPER="$ROOT/stages/market/scripts/bench_indicators.py"
REPEATS="${FLAG_BENCH_REPEATS:-2}"
case "${FLAG_BENCH_INDICATORS_ROWS:-1M}" in
  1M) TICKERS=200 RESULT=indicators.json ;;
  10M) TICKERS=2000 RESULT=indicators-10m.json ;;
  *) echo "bench-indicators: FLAG_BENCH_INDICATORS_ROWS must be 1M or 10M" >&2; exit 2 ;;
esac
DAYS=5000

PINS=("TA-Lib==0.6.8" "numpy==2.3.4" "pyarrow==21.0.0" "polars==1.34.0")
if ! "$VENV/bin/python" -c 'import talib, polars, pyarrow, numpy' 2>/dev/null; then
  echo "== creating $VENV (${PINS[*]})"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "${PINS[@]}"
fi
PY="$VENV/bin/python"
"$PY" -c 'import talib, polars, pyarrow, numpy' || {
  echo "bench-indicators: the anchors (TA-Lib, polars, pyarrow) cannot be imported from $VENV" >&2
  exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/flag-bench-indicators.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT_DIR"

echo "== synthetic bars: $TICKERS tickers x $DAYS days"
"$PY" "$HELPER" gen --tickers "$TICKERS" --days "$DAYS" "$WORK/bars.parquet"

echo "== building the indicators bench"
cargo bench --workspace --bench indicators --no-run 2>&1 | tail -n 2

best() { # best <json...>: the one with the smallest wall_s
  "$PY" - "$@" <<'PY'
import json, sys
print(min(sys.argv[1:], key=lambda p: json.load(open(p))["wall_s"]))
PY
}

stage_runs=() talib_runs=() polars_runs=()
for i in $(seq 1 "$REPEATS"); do
  echo "== run $i/$REPEATS: indicators stage"
  FLAG_BENCH_INPUT="$WORK/bars.parquet" FLAG_BENCH_OUTPUT="$WORK/stage.parquet" \
    FLAG_BENCH_JSON="$WORK/stage.$i.json" \
    cargo bench --workspace --bench indicators 2>&1 | grep -E '"wall_s"|error|panicked' || true
  [ -s "$WORK/stage.$i.json" ] || { echo "bench-indicators: the indicators stage did not run" >&2; exit 1; }
  stage_runs+=("$WORK/stage.$i.json")
  echo "== run $i/$REPEATS: TA-Lib + pyarrow"
  "$PY" "$HELPER" talib "$WORK/bars.parquet" "$WORK/talib.parquet" "$WORK/talib.$i.json"
  talib_runs+=("$WORK/talib.$i.json")
  echo "== run $i/$REPEATS: polars"
  "$PY" "$HELPER" polars "$WORK/bars.parquet" "$WORK/polars.parquet" "$WORK/polars.$i.json"
  polars_runs+=("$WORK/polars.$i.json")
done

"$PY" "$HELPER" report --repeats "$REPEATS" \
  --stage "$(best "${stage_runs[@]}")" --talib "$(best "${talib_runs[@]}")" \
  --polars "$(best "${polars_runs[@]}")" \
  --stage-out "$WORK/stage.parquet" --talib-out "$WORK/talib.parquet" \
  --polars-out "$WORK/polars.parquet" "$OUT_DIR/$RESULT"
