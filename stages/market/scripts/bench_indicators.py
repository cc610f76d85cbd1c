#!/usr/bin/env python3
"""Helper of .ci/bench-indicators.sh: synthetic OHLCV, the TA-Lib and polars anchors, the report.

  gen    --tickers N --days D OUT          synthetic bars in schema ohlcv (sorted, fixed seed)
  talib  IN OUT JSON                       TA-Lib (C) per ticker + pyarrow read/write
  polars IN OUT JSON                       polars lazy, `.over("ticker")` rolling windows
  report --stage J --talib J --polars J --stage-out P --talib-out P --polars-out P OUT

Each anchor times itself from the start of the Parquet read to the end of the Parquet write
(interpreter start and imports excluded, as the stage's time excludes process start) and
records its peak RSS. Both write the column set of schema `indicators` (the stage's output),
NULL where undefined, snappy-compressed like the stage. The TA-Lib anchor computes exactly
the stage's definitions (TA-Lib for SMA/EMA/RSI/MACD/ATR/BBANDS/STOCH, TA-Lib SMA/STDDEV/SUM
for the rolling means, stds and sums); the polars one uses polars' own rolling/ewm
expressions for the same columns (its EMA/RSI/ATR warm-up seeding differs from TA-Lib's:
a speed anchor, not a reference). `report` fails unless the three outputs have the same
rows and columns, and prints the largest stage-vs-TA-Lib difference per column.
"""
import argparse
import json
import resource
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PASS = ["ticker", "date", "open", "high", "low", "close", "volume", "adj_close"]
COLUMNS = [
    "sma_20", "sma_50", "sma_100", "sma_200", "ema_12", "ema_26", "rsi_14",
    "macd", "macd_signal", "macd_hist", "atr_14", "bb_upper", "bb_middle", "bb_lower",
    "kdj_k", "kdj_d", "kdj_j", "zscore_20", "vwap_20", "ret_1d", "ret_5d", "ret_20d",
    "vol_20", "sma_20_slope", "sma_50_slope", "sma_200_slope", "ema_12_slope",
    "ema_26_slope", "rsi_14_slope", "macd_slope", "macd_hist_slope", "kdj_k_slope",
    "rsi_14_z", "macd_z", "macd_hist_z", "atr_14_z", "kdj_j_z", "vol_20_z", "volume_z",
]
FIRST_DAY = 10_959  # 2000-01-03, days since 1970-01-01


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gen(args):
    rng = np.random.default_rng(0x5EEDF1A6)
    t, d = args.tickers, args.days
    sigma = np.repeat(0.01 + 0.02 * rng.random(t), d)
    start = np.repeat(20.0 + 180.0 * rng.random(t), d)
    gap = 0.002 * rng.standard_normal(t * d)
    move = 0.0002 + sigma * rng.standard_normal(t * d)
    steps = (gap + move).reshape(t, d)
    log_close = np.cumsum(steps, axis=1).ravel()
    close = start * np.exp(log_close)
    open_ = close * np.exp(-move)
    high = np.maximum(open_, close) * (1.0 + 0.005 * np.abs(rng.standard_normal(t * d)))
    low = np.minimum(open_, close) * (1.0 - 0.005 * np.abs(rng.standard_normal(t * d)))
    volume = np.round(1.0e6 * np.exp(0.3 * rng.standard_normal(t * d)))
    names = pa.array([f"T{k:05d}" for k in range(t)], pa.string())
    ticker = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(t, dtype=np.int32), d)), names)
    date = pa.array(np.tile(np.arange(FIRST_DAY, FIRST_DAY + d, dtype=np.int32), t), pa.date32())
    f64 = pa.float64()
    schema = pa.schema([
        pa.field("ticker", pa.string(), False), pa.field("date", pa.date32(), False),
        pa.field("open", f64), pa.field("high", f64), pa.field("low", f64),
        pa.field("close", f64, False), pa.field("volume", f64), pa.field("adj_close", f64),
    ])
    table = pa.Table.from_arrays(
        [ticker.cast(pa.string()), date, pa.array(open_), pa.array(high), pa.array(low),
         pa.array(close), pa.array(volume), pa.nulls(t * d, f64)], schema=schema)
    pq.write_table(table, args.out, row_group_size=1 << 20, compression="snappy")
    print(f"generated {t * d} rows ({t} tickers x {d} days) in {args.out}")


def ticker_bounds(table):
    """Start offsets of each ticker's run (input sorted by ticker, date) plus the end."""
    codes = table.column("ticker").combine_chunks().dictionary_encode().indices.to_numpy()
    starts = np.flatnonzero(np.diff(codes)) + 1
    return np.concatenate([[0], starts, [len(codes)]])


def to_arrow(x):
    """Float column with NaN as NULL (the stage writes NULL for undefined values)."""
    return pa.array(x, type=pa.float64(), from_pandas=True)


def talib_anchor(args):
    import talib
    t0 = time.perf_counter()
    table = pq.read_table(args.inp)
    o, h, l, c, v = (table.column(k).to_numpy() for k in ["open", "high", "low", "close", "volume"])
    n = len(c)
    out = {k: np.full(n, np.nan) for k in COLUMNS}
    bounds = ticker_bounds(table)
    s20 = np.sqrt(20.0 / 19.0)

    def shift(x, k):
        r = np.full(len(x), np.nan)
        r[k:] = x[:-k]
        return r

    def z(x):
        m, s = talib.SMA(x, 20), talib.STDDEV(x, 20, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(s != 0, (x - m) / s, np.nan)

    for a, b in zip(bounds[:-1], bounds[1:]):
        oo, hh, ll, cc, vv = o[a:b], h[a:b], l[a:b], c[a:b], v[a:b]
        r = {}
        for p in (20, 50, 100, 200):
            r[f"sma_{p}"] = talib.SMA(cc, p)
        r["ema_12"], r["ema_26"] = talib.EMA(cc, 12), talib.EMA(cc, 26)
        r["rsi_14"] = talib.RSI(cc, 14)
        r["macd"], r["macd_signal"], r["macd_hist"] = talib.MACD(cc, 12, 26, 9)
        r["atr_14"] = talib.ATR(hh, ll, cc, 14)
        r["bb_upper"], r["bb_middle"], r["bb_lower"] = talib.BBANDS(cc, 20, 2.0, 2.0, 0)
        r["kdj_k"], r["kdj_d"] = talib.STOCH(hh, ll, cc, 9, 5, 1, 5, 1)
        r["kdj_j"] = 3.0 * r["kdj_k"] - 2.0 * r["kdj_d"]
        r["zscore_20"] = z(cc)
        with np.errstate(divide="ignore", invalid="ignore"):
            vs = talib.SUM(vv, 20)
            r["vwap_20"] = np.where(vs != 0, talib.SUM((hh + ll + cc) / 3.0 * vv, 20) / vs, np.nan)
            for k in (1, 5, 20):
                r[f"ret_{k}d"] = cc / shift(cc, k) - 1.0
        r["vol_20"] = talib.STDDEV(r["ret_1d"], 20, 1.0) * s20
        for name in ("sma_20", "sma_50", "sma_200", "ema_12", "ema_26"):
            r[f"{name}_slope"] = r[name] / shift(r[name], 1) - 1.0
        for name in ("rsi_14", "macd", "macd_hist", "kdj_k"):
            r[f"{name}_slope"] = r[name] - shift(r[name], 1)
        for name in ("rsi_14", "macd", "macd_hist", "atr_14", "kdj_j", "vol_20"):
            r[f"{name}_z"] = z(r[name])
        r["volume_z"] = z(vv)
        for k in COLUMNS:
            out[k][a:b] = r[k]
    cols = [table.column(k) for k in PASS] + [to_arrow(out[k]) for k in COLUMNS]
    pq.write_table(pa.Table.from_arrays(cols, names=PASS + COLUMNS), args.out, compression="snappy")
    wall = time.perf_counter() - t0
    res = {"tool": "talib+pyarrow", "talib": talib.__version__, "talib_c": talib.__ta_version__.decode() if isinstance(talib.__ta_version__, bytes) else str(talib.__ta_version__),
           "pyarrow": pa.__version__, "numpy": np.__version__, "rows": n, "tickers": len(bounds) - 1,
           "wall_s": wall, "peak_rss_mib": peak_rss_mib()}
    json.dump(res, open(args.json, "w"), indent=2)
    print(json.dumps(res))


def polars_anchor(args):
    import polars as pl
    t0 = time.perf_counter()
    g = "ticker"
    c, h, l, v = pl.col("close"), pl.col("high"), pl.col("low"), pl.col("volume")

    def z(e):
        return (e - e.rolling_mean(20).over(g)) / e.rolling_std(20, ddof=0).over(g)

    prev, delta = pl.col("_prev"), pl.col("_delta")
    tr = pl.max_horizontal(h - l, (h - prev).abs(), (l - prev).abs())
    lf = pl.scan_parquet(args.inp).with_columns(
        c.shift(1).over(g).alias("_prev"), c.diff().over(g).alias("_delta"),
    ).with_columns(
        *(c.rolling_mean(p).over(g).alias(f"sma_{p}") for p in (20, 50, 100, 200)),
        c.ewm_mean(span=12, adjust=False, min_samples=12).over(g).alias("ema_12"),
        c.ewm_mean(span=26, adjust=False, min_samples=26).over(g).alias("ema_26"),
        delta.clip(lower_bound=0).ewm_mean(alpha=1 / 14, adjust=False, min_samples=14).over(g).alias("_up"),
        (-delta).clip(lower_bound=0).ewm_mean(alpha=1 / 14, adjust=False, min_samples=14).over(g).alias("_dn"),
        tr.ewm_mean(alpha=1 / 14, adjust=False, min_samples=14).over(g).alias("atr_14"),
        c.rolling_std(20, ddof=0).over(g).alias("_sd20"),
        h.rolling_max(9).over(g).alias("_hh9"),
        l.rolling_min(9).over(g).alias("_ll9"),
        ((h + l + c) / 3.0 * v).rolling_sum(20).over(g).alias("_pv20"),
        v.rolling_sum(20).over(g).alias("_v20"),
        *((c / c.shift(k).over(g) - 1.0).alias(f"ret_{k}d") for k in (1, 5, 20)),
        z(c).alias("zscore_20"),
        z(v).alias("volume_z"),
    ).with_columns(
        (100.0 * pl.col("_up") / (pl.col("_up") + pl.col("_dn"))).alias("rsi_14"),
        (pl.col("ema_12") - pl.col("ema_26")).alias("macd"),
        (pl.col("sma_20") + 2.0 * pl.col("_sd20")).alias("bb_upper"),
        pl.col("sma_20").alias("bb_middle"),
        (pl.col("sma_20") - 2.0 * pl.col("_sd20")).alias("bb_lower"),
        ((c - pl.col("_ll9")) / (pl.col("_hh9") - pl.col("_ll9")) * 100.0).alias("_fk"),
        (pl.col("_pv20") / pl.col("_v20")).alias("vwap_20"),
        pl.col("ret_1d").rolling_std(20).over(g).alias("vol_20"),
    ).with_columns(
        pl.col("macd").ewm_mean(span=9, adjust=False, min_samples=9).over(g).alias("macd_signal"),
        pl.col("_fk").ewm_mean(span=5, adjust=False, min_samples=5).over(g).alias("kdj_k"),
    ).with_columns(
        (pl.col("macd") - pl.col("macd_signal")).alias("macd_hist"),
        pl.col("kdj_k").ewm_mean(span=5, adjust=False, min_samples=5).over(g).alias("kdj_d"),
    ).with_columns(
        (3.0 * pl.col("kdj_k") - 2.0 * pl.col("kdj_d")).alias("kdj_j"),
        *((pl.col(x) / pl.col(x).shift(1).over(g) - 1.0).alias(f"{x}_slope")
          for x in ("sma_20", "sma_50", "sma_200", "ema_12", "ema_26")),
        *((pl.col(x) - pl.col(x).shift(1).over(g)).alias(f"{x}_slope")
          for x in ("rsi_14", "macd", "macd_hist", "kdj_k")),
    ).with_columns(
        *(z(pl.col(x)).alias(f"{x}_z") for x in ("rsi_14", "macd", "macd_hist", "atr_14", "kdj_j", "vol_20")),
    ).select(PASS + COLUMNS).with_columns(pl.col(COLUMNS).fill_nan(None))
    lf.collect().write_parquet(args.out, compression="snappy")
    wall = time.perf_counter() - t0
    rows = pq.ParquetFile(args.out).metadata.num_rows
    res = {"tool": "polars", "polars": pl.__version__, "rows": rows, "threads": pl.thread_pool_size(),
           "wall_s": wall, "peak_rss_mib": peak_rss_mib()}
    json.dump(res, open(args.json, "w"), indent=2)
    print(json.dumps(res))


def report(args):
    stage, tl, po = (json.load(open(p)) for p in (args.stage, args.talib, args.polars))
    metas = {k: pq.ParquetFile(p) for k, p in
             (("stage", args.stage_out), ("talib", args.talib_out), ("polars", args.polars_out))}
    want = PASS + COLUMNS
    for k, f in metas.items():
        names = f.schema_arrow.names
        if names != want:
            sys.exit(f"bench-indicators: the {k} output's columns differ from schema indicators: {names}")
        if f.metadata.num_rows != stage["rows"]:
            sys.exit(f"bench-indicators: the {k} output has {f.metadata.num_rows} rows, the input {stage['rows']}")
    # Stage vs TA-Lib, column by column: largest |diff| / max(1, |talib|) and NULL mismatches.
    a, b = pq.read_table(args.stage_out), pq.read_table(args.talib_out)
    diffs = {}
    for k in COLUMNS:
        x = a.column(k).to_numpy(zero_copy_only=False).astype(float)
        y = b.column(k).to_numpy(zero_copy_only=False).astype(float)
        nx, ny = np.isnan(x), np.isnan(y)
        both = ~nx & ~ny
        rel = np.abs(x[both] - y[both]) / np.maximum(1.0, np.abs(y[both]))
        diffs[k] = {"max_rel_diff": float(rel.max()) if rel.size else 0.0,
                    "null_mismatches": int((nx != ny).sum())}
    worst = max(diffs, key=lambda k: diffs[k]["max_rel_diff"])
    ts = stage["wall_s"]
    res = {
        "bench": "indicators", "rows": stage["rows"], "input_bytes": stage.get("input_bytes"),
        "repeats": args.repeats,
        "stage": stage, "talib": tl, "polars": po,
        "stage_over_talib": ts / tl["wall_s"], "stage_over_polars": ts / po["wall_s"],
        "stage_vs_talib": {"worst_column": worst, **diffs[worst],
                           "null_mismatches_total": sum(d["null_mismatches"] for d in diffs.values()),
                           "columns": diffs},
    }
    json.dump(res, open(args.out, "w"), indent=2)
    print(f"\nindicators over {stage['rows']:,} rows, Parquet in and out (best of {args.repeats}):")
    print(f"{'tool':<34} {'wall s':>8} {'peak RSS MiB':>13} {'stage / tool':>13}")
    print(f"{'indicators stage (compute_parquet)':<34} {ts:>8.3f} {stage['peak_rss_mib']:>13.0f} {1.0:>13.2f}")
    print(f"{'TA-Lib ' + tl['talib_c'].split()[0] + ' + pyarrow ' + tl['pyarrow']:<34} {tl['wall_s']:>8.3f} {tl['peak_rss_mib']:>13.0f} {ts / tl['wall_s']:>13.2f}")
    print(f"{'polars ' + po['polars'] + ' lazy':<34} {po['wall_s']:>8.3f} {po['peak_rss_mib']:>13.0f} {ts / po['wall_s']:>13.2f}")
    print(f"stage vs TA-Lib: worst column {worst}: max rel diff {diffs[worst]['max_rel_diff']:.3g}; "
          f"NULL mismatches {res['stage_vs_talib']['null_mismatches_total']}")
    print(f"written {args.out}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("gen")
    s.add_argument("--tickers", type=int, default=200)
    s.add_argument("--days", type=int, default=5000)
    s.add_argument("out")
    for name in ("talib", "polars"):
        s = sub.add_parser(name)
        s.add_argument("inp")
        s.add_argument("out")
        s.add_argument("json")
    s = sub.add_parser("report")
    for k in ("stage", "talib", "polars", "stage-out", "talib-out", "polars-out"):
        s.add_argument(f"--{k}", required=True)
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument("out")
    a = p.parse_args()
    {"gen": gen, "talib": talib_anchor, "polars": polars_anchor, "report": report}[a.cmd](a)


if __name__ == "__main__":
    main()
