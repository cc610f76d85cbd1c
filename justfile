# flag: LLM + RL trading research pipelines.  `just run pipelines/flag.yaml`, `just test`.
set shell := ["bash", "-euo", "pipefail", "-c"]

cache := env_var_or_default("FLAG_CACHE", env_var("HOME") / ".cache/flag")
export FLAG_CACHE := cache
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", cache / "target")
# tch links the libtorch of the pip-installed torch in the project venv.
export LIBTORCH_USE_PYTORCH := "1"
export VIRTUAL_ENV := cache / "venv"
export PATH := cache / "venv/bin" + ":" + env_var("PATH")
export CARGO_TERM_PROGRESS_WHEN := "never"

flag := CARGO_TARGET_DIR / "release/flag"

# Install what is missing (venv with torch, model packages, just); idempotent.
setup:
    bash .ci/setup

# Build the `flag` and `flag-worker` binaries. Same cargo invocation as the tests (workspace-wide
# feature unification, release profile), so `just run` and `just test` share one build of
# datafusion; `cargo test` alone does not build `flag-worker`, a binary of another package.
build: setup
    cargo test --release --workspace --no-run
    cargo build --release --workspace --bins

# Run a pipeline: `just run pipelines/flag.yaml --set data_dir=/path/to/data`
run PIPELINE *ARGS: build
    {{flag}} run {{PIPELINE}} {{ARGS}}

# Any flag subcommand: `just flag show indicators.table --limit 5`
flag *ARGS: build
    {{flag}} {{ARGS}}

# The whole test suite (unit + end-to-end with the real binary, data and models).
test: build
    cargo test --release --workspace --no-fail-fast

lint: setup
    cargo fmt --all -- --check
    cargo clippy --release --workspace --all-targets -- -D warnings

# Benchmarks; results are written to artifacts/bench/*.json and printed.
bench: build
    bash .ci/bench

# Fuzz the pipeline loader, ingest formats and answer parsers for SECS seconds in all
# (`just fuzz 600`; `just fuzz 60 pipeline,answers` for some targets). The seed is printed;
# FLAG_FUZZ_SEED=<seed> FLAG_FUZZ_ITERS=<n> replays a run, FLAG_FUZZ_REPLAY=<file> one saved
# input. Findings are written under artifacts/fuzz/<target>/.
fuzz SECS="120" TARGETS="": setup
    FLAG_FUZZ_SECS={{SECS}} FLAG_FUZZ_TARGETS="{{TARGETS}}" cargo test --release --workspace --lib fuzz::tests::fuzz_long -- --ignored --exact --nocapture
