#!/usr/bin/env bash
# Benchmark kindling against llama.cpp (llama-cpp-python) on the same GGUF.
#
# Usage: scripts/bench.sh [--threads "1 2"] [--reps 5] [--prefill 512] [--decode 128]
#                         [--no-build] [--out results.jsonl]
#
# Steps: fetch the model (scripts/fetch-model.sh), make the llama.cpp venv
# (scripts/llama_cpp_env.sh), build the CLI (cargo build --release -p kindling-cli), then for
# each thread count run, one after the other, `kindling bench ... --json` and
# scripts/bench_llama_cpp.py, then `kindling bench-steer` (what steering costs). The first two
# print one JSON line each
#   {"engine", "threads", "prefill_tokens", "decode_tokens", "prefill_tok_s": [...],
#    "decode_tok_s": [...], "other_cores": [...]}
# and markdown tables of the medians and of issue 19's native rows are printed at the end.
#
# THE MACHINE MUST BE IDLE. llama.cpp's threads spin-wait: on a 2-core machine another process
# using one core makes it 5-30x slower (machine-facts §C.2). Runs whose median other_cores is
# above 0.1 are flagged in the table.
#
# Environment: KINDLING_BIN overrides the kindling binary (default target/release/kindling);
# KINDLING_MODEL overrides the model path (as in fetch-model.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/lib/pause-jobs.sh
pause_background_jobs

THREADS="1 2"
REPS=5
PREFILL=512
DECODE=128
BUILD=1
OUT=""

say() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }
usage() { sed -n '2,20s/^# \{0,1\}//p' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --threads) THREADS="${2:?--threads needs a value}"; shift 2 ;;
        --reps) REPS="${2:?--reps needs a value}"; shift 2 ;;
        --prefill) PREFILL="${2:?--prefill needs a value}"; shift 2 ;;
        --decode) DECODE="${2:?--decode needs a value}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --out) OUT="${2:?--out needs a value}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
for n in $THREADS $REPS $PREFILL $DECODE; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "expected a positive integer, got '$n'"
done
[[ -n "${THREADS// /}" ]] || die "--threads is empty"

MODEL="${KINDLING_MODEL:-$ROOT/public/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
KINDLING="${KINDLING_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/kindling}"
VENV_PY="$ROOT/.venv-llama/bin/python"

say "WARNING: the machine must be idle while this runs (no compiles, browsers or other benchmarks)."
say "         llama.cpp slows down 5-30x when another process takes a core; results with"
say "         other_cores > 0.1 are flagged."
say "$(uptime)"

scripts/fetch-model.sh >&2 || die "could not fetch the model"
scripts/llama_cpp_env.sh >&2 || die "could not set up the llama.cpp venv"
if [[ "$BUILD" == 1 ]]; then
    say "building the CLI: cargo build --release -p kindling-cli"
    cargo build --release -p kindling-cli >&2 || die "cargo build failed"
fi

RESULTS="$(mktemp)"
trap 'rm -f "$RESULTS" "${STEER:-}"; resume_background_jobs' EXIT

# Runs one benchmark command; appends its JSON line (the last stdout line that parses as a
# JSON object) to $RESULTS. Returns non-zero when the command fails or prints no JSON.
run_one() {
    local label="$1"; shift
    say "running ($label): $*"
    local out
    if ! out="$("$@")"; then
        say "FAILED ($label): $*"
        return 1
    fi
    local line
    line="$(printf '%s\n' "$out" | python3 -c '
import json, sys
found = None
for line in sys.stdin:
    line = line.strip()
    try:
        obj = json.loads(line)
    except ValueError:
        continue
    if isinstance(obj, dict):
        found = line
if found is None:
    sys.exit(1)
print(found)
')" || { say "FAILED ($label): no JSON line in its output"; return 1; }
    say "$label: $line"
    printf '%s\n' "$line" >> "$RESULTS"
}

STEER="$(mktemp)"
failed=0
for t in $THREADS; do
    run_one "kindling, threads=$t" "$KINDLING" bench --threads "$t" --prefill "$PREFILL" \
        --decode "$DECODE" --reps "$REPS" --json || failed=1
    run_one "llama.cpp, threads=$t" "$VENV_PY" scripts/bench_llama_cpp.py --model "$MODEL" \
        --threads "$t" --prefill "$PREFILL" --decode "$DECODE" --reps "$REPS" || failed=1
    # Steering overhead: decode with a variant (SAE encode per token, 2 edits, 2 rules) vs without.
    say "running (steering overhead, threads=$t): $KINDLING --threads $t bench-steer --reps $REPS"
    if line="$("$KINDLING" --threads "$t" bench-steer --decode "$DECODE" --reps "$REPS" | grep '^steering adds')"; then
        say "$line"
        printf '%s\t%s\n' "$t" "$(sed -E 's/^steering adds ([-0-9.]+)%.*/\1/' <<<"$line")" >> "$STEER"
    else
        say "FAILED (steering overhead, threads=$t)"; failed=1
    fi
done
say "$(uptime)"

if [[ -n "$OUT" ]]; then
    cp "$RESULTS" "$OUT"
    say "raw results written to $OUT"
fi

python3 - "$RESULTS" "$THREADS" "$PREFILL" "$DECODE" "$REPS" "$STEER" <<'PY'
import json, statistics, sys

path, threads, prefill, decode, reps, steer_path = sys.argv[1:]
threads = [int(t) for t in threads.split()]
runs = {}
with open(path) as f:
    for line in f:
        if line.strip():
            r = json.loads(line)
            runs[(r.get("engine"), int(r.get("threads", -1)))] = r

def med(r, key):
    v = (r or {}).get(key) or []
    return statistics.median(v) if v else None

def fmt(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"

def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"

print()
print(f"Prefill {prefill} tokens, decode {decode} tokens, {reps} repetitions; medians in tok/s; "
      f"ratio = kindling / llama.cpp.")
print()
print("| threads | prefill kindling | prefill llama.cpp | prefill ratio "
      "| decode kindling | decode llama.cpp | decode ratio | other_cores (k / l) |")
print("|---:|---:|---:|---:|---:|---:|---:|---|")
contended = []
for t in threads:
    k, l = runs.get(("kindling", t)), runs.get(("llama.cpp", t))
    pk, pl = med(k, "prefill_tok_s"), med(l, "prefill_tok_s")
    dk, dl = med(k, "decode_tok_s"), med(l, "decode_tok_s")
    ok, ol = med(k, "other_cores"), med(l, "other_cores")
    for name, o in (("kindling", ok), ("llama.cpp", ol)):
        if o is not None and o > 0.1:
            contended.append(f"{name}, threads={t} (median other_cores {o:.2f})")
    print(f"| {t} | {fmt(pk)} | {fmt(pl)} | {ratio(pk, pl)} | {fmt(dk)} | {fmt(dl)} | "
          f"{ratio(dk, dl)} | {fmt(ok, 2)} / {fmt(ol, 2)} |")
print()

# Issue 19's native rows: the figures when the issue was filed (2026-11-30, its "today"
# column), this run's, and the bar.
steer = {}
with open(steer_path) as f:
    for line in f:
        t, pct = line.split()
        steer[int(t)] = float(pct)
filed = {1: "0.84×", 2: "0.87–0.89×"}
print("Issue 19's native rows (this run beside the figures when the issue was filed):")
print()
print("| figure | when filed | this run | bar |")
print("|---|---|---|---|")
for t in threads:
    k, l = runs.get(("kindling", t)), runs.get(("llama.cpp", t))
    r = ratio(med(k, "decode_tok_s"), med(l, "decode_tok_s"))
    print(f"| native decode vs llama.cpp, {t} thread{'s' if t > 1 else ''} | {filed.get(t, '—')} | {r}× | ≥ 1.0× |")
for t in threads:
    if t in steer:
        print(f"| steering overhead (2 edits + 2 rules), {t} thread{'s' if t > 1 else ''} | 7.1% | {steer[t]:.1f}% | ≤ 10% |")
print()
if contended:
    print("**WARNING: the machine was not idle** for: " + "; ".join(contended) + ". "
          "Other processes used CPU during the timed regions; these numbers are not comparable. "
          "Rerun on an idle machine.")
PY

[[ "$failed" == 0 ]] || die "some benchmark runs failed (see above); their cells show n/a"
