#!/usr/bin/env python3
"""`just bench`'s last step: one table of every benchmark against its anchor (issue 14 item 5).

Reads the JSON files the benchmarks wrote into DIR (default artifacts/bench/) and writes
DIR/summary.md. A benchmark that did not run this time, or whose file is missing, is listed as
"not run" with the file it needs: the table never shows a number it did not read. Each row
names its source file and when that file was written, so a stale result reads as stale.

Usage: bench-summary.py [DIR]
"""
import json
import os
import sys
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FLAG_BENCH_OUT", "artifacts/bench")
rows = []  # (work, anchor, anchor figure, ours, ratio, goal, met, source)
missing = []


def load(name):
    path = os.path.join(DIR, name)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        missing.append(name)
        return None, None
    except (OSError, ValueError) as e:
        sys.exit(f"bench-summary: {path}: {e}")
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(os.path.getmtime(path)))
    return data, f"{name} ({stamp} UTC)"


def met(ok):
    if ok is None:  # an informational row (a bound), not a goal
        return "-"
    return "yes" if ok else "**no**"


def add(work, anchor, anchor_fig, ours, ratio, goal, ok, src):
    rows.append((work, anchor, anchor_fig, ours, ratio, goal, met(ok), src))


def indicators(name, label):
    d, src = load(name)
    if d is None:
        return
    st, tl, po = d["stage"], d["talib"], d["polars"]
    ts = st["wall_s"]
    add(f"indicators, {label}: wall", "TA-Lib + pyarrow", f"{tl['wall_s']:.2f} s",
        f"{ts:.2f} s", f"{ts / tl['wall_s']:.2f}x time", "<= 1.0x", ts <= tl["wall_s"], src)
    add(f"indicators, {label}: wall", "polars (lazy)", f"{po['wall_s']:.2f} s",
        f"{ts:.2f} s", f"{ts / po['wall_s']:.2f}x time", "<= 1.5x", ts <= 1.5 * po["wall_s"], src)
    decoded = st.get("decoded_input_mib")
    if decoded:
        rss = st["peak_rss_mib"]
        own = st.get("rss_file_backed_mib")
        ours = f"{rss:.0f} MiB" + (f" ({own:.0f} MiB of it the binary's own pages)" if own else "")
        add(f"indicators, {label}: peak RSS", "decoded input", f"{decoded:.0f} MiB",
            ours, f"{rss / decoded:.2f}x", "<= 2.0x", rss <= 2 * decoded, src)
    worst = d["stage_vs_talib"]
    add(f"indicators, {label}: agreement", "TA-Lib", "",
        f"max rel diff {worst['max_rel_diff']:.1e} ({worst['worst_column']}), "
        f"{worst['null_mismatches_total']} NULL mismatches", "", "<= 1e-6, 0",
        worst["max_rel_diff"] <= 1e-6 and worst["null_mismatches_total"] == 0, src)


indicators("indicators.json", "1M rows")
indicators("indicators-10m.json", "10M rows")

d, src = load("ddqn_vs_pytorch.json")
if d:
    o, p = d["ddqn_stage"], d["pytorch_reference"]
    rounds = f", median of {d['rounds']} alternate runs" if d.get("rounds", 1) > 1 else ""
    add(f"DDQN (TDQN config, AAPL, 1 thread, {d.get('backend') or 'libtorch'}{rounds}): episodes/s", "PyTorch, same work step for step",
        f"{p['episodes_per_s']:.4f}", f"{o['episodes_per_s']:.4f}",
        f"{d['ratio_episodes_per_s']:.2f}x", f">= {d['goal_ratio']:.0f}x",
        d["ratio_episodes_per_s"] >= d["goal_ratio"], src)

d, src = load("llm.json")
# Each run is labelled by the format its own JSON records (a run labelled by its position had
# shown the default `gguf` as "dense f32").
LABELS = {"dense": "dense f32", "gguf": "GGUF blocks, the default",
          "gguf-int8": "GGUF blocks, int8 activations (opt-in gguf-int8)"}
for key in ("flag", "flag_gguf", "flag_gguf_int8"):
    if not d or key not in d:
        continue
    ours, ref = d[key], d["llama_cpp"]
    weights = LABELS.get(ours.get("weights"), f"weights {ours.get('weights')!r}")
    by_batch = {r["batch"]: r for r in ours["results"] if not r.get("shared_prefix")}
    single = by_batch.get(1)
    if single:
        r = single["decode_tok_s"] / ref["decode_tok_s"]
        add(f"LLM decode, batch 1 ({weights})", "llama.cpp, same GGUF", f"{ref['decode_tok_s']:.1f} tok/s",
            f"{single['decode_tok_s']:.1f} tok/s", f"{r:.2f}x", ">= 0.8x", r >= 0.8, src)
        r = single["prefill_tok_s"] / ref["prefill_tok_s"]
        add(f"LLM prefill, batch 1 ({weights})", "llama.cpp", f"{ref['prefill_tok_s']:.0f} tok/s",
            f"{single['prefill_tok_s']:.0f} tok/s", f"{r:.2f}x", ">= 0.5x", r >= 0.5, src)
    best = max(by_batch.values(), key=lambda r: r["decode_tok_s"], default=None)
    if best:
        r = best["decode_tok_s"] / ref["decode_tok_s"]
        add(f"LLM batched decode (best: batch {best['batch']}; {weights})", "llama.cpp single stream",
            f"{ref['decode_tok_s']:.1f} tok/s", f"{best['decode_tok_s']:.1f} tok/s",
            f"{r:.2f}x", ">= 2.0x", r >= 2.0, src)
    rss = ours.get("single_stream_peak_rss_mib")
    if rss and ref.get("peak_rss_mib"):
        r = rss / ref["peak_rss_mib"]
        add(f"LLM peak RSS, single stream ({weights})", "llama.cpp", f"{ref['peak_rss_mib']:.0f} MiB",
            f"{rss:.0f} MiB (batches to 32: {ours['peak_rss_mib']:.0f} MiB)", f"{r:.2f}x",
            "<= 2.0x", r <= 2.0, src)

d, src = load("flag_pipeline.json")
if d:
    add("`just run pipelines/flag.yaml`, empty store", "goal", "900 s", f"{d['wall_s']:.0f} s",
        f"{d['wall_s'] / 900:.2f}x goal", "<= 900 s", d["wall_s"] <= 900, src)

d, src = load("noop.json")
if d:
    add("all-cached re-run of flag.yaml (median)", "goal", f"{d['target_s']} s",
        f"{d['median_s']:.3f} s", f"{d['median_s'] / d['target_s']:.2f}x goal",
        f"<= {d['target_s']} s", d["median_s"] <= d["target_s"], src)

out = os.path.join(DIR, "summary.md")
with open(out + ".tmp", "w") as f:
    f.write("# Benchmark summary\n\n")
    f.write(f"Written {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC from the JSON files "
            f"in `{DIR}`; each row names its file and when that file was written.\n\n")
    f.write("| work | anchor | anchor | this project | ratio | goal | met | source |\n")
    f.write("|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        f.write("| " + " | ".join(str(c) for c in r) + " |\n")
    if missing:
        f.write("\nNot run (no file): " + ", ".join(f"`{m}`" for m in missing) + "\n")
os.replace(out + ".tmp", out)
print(open(out).read())
