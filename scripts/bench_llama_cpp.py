#!/usr/bin/env python3
"""Measure llama.cpp (llama-cpp-python) prefill and decode speed on a GGUF.

Run it with the interpreter of the venv made by scripts/llama_cpp_env.sh:

    .venv-llama/bin/python scripts/bench_llama_cpp.py --threads 2 --prefill 512 --decode 128 --reps 5

Same method as machine-facts §C.3 (bench.py), and the same measurement as `kindling bench`:

* prefill: the first N tokens of /usr/share/common-licenses/GPL-3 (llama's tokenizer, no BOS);
  `llm.reset(); llm.eval(tokens)` is timed; 1 warm-up + reps.
* decode: the ChatML pirate-story prompt is evaluated (not timed), then N steps of
  argmax over the last-position logits (llama_get_logits_ith(ctx, -1)) + `llm.eval([tok])`,
  ignoring EOS, are timed; 1 warm-up + reps.

Prints ONE JSON line to stdout:
  {"engine": "llama.cpp", "threads": N, "prefill_tokens": P, "decode_tokens": D,
   "prefill_tok_s": [per rep], "decode_tok_s": [per rep], "other_cores": [per rep]}
`other_cores` holds the prefill repetitions followed by the decode repetitions (2 x reps
values): the CPU time used by *other* processes during each timed region, in cores
(/proc/stat busy time of the whole machine minus this process's own CPU time, divided by
the wall time). Anything above ~0.05 means the measurement was contended; llama.cpp's
spin-waiting threads make it 5-30x slower when another process takes a core.
Diagnostics (load average, decoded text) go to stderr.
"""

import argparse
import ctypes
import json
import os
import sys
import time

import numpy as np

import llama_cpp
from llama_cpp import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "public", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
PREFILL_TEXT = "/usr/share/common-licenses/GPL-3"
DECODE_PROMPT = (
    "<|im_start|>user\nWrite a long story about a pirate who finds a treasure map."
    "<|im_end|>\n<|im_start|>assistant\n"
)
N_CTX = 2048

CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s():
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    assert fields[0] == "cpu"
    v = [int(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu_s():
    t = os.times()
    return t.user + t.system


class Meter:
    """Wall time and other processes' CPU use (in cores) over a timed region."""

    def __enter__(self):
        self.busy0, self.own0 = machine_busy_s(), own_cpu_s()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        other = (machine_busy_s() - self.busy0) - (own_cpu_s() - self.own0)
        self.other_cores = max(0.0, other) / self.wall
        return False


def last_logits(llm, n_vocab):
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))


def bench_prefill(llm, tokens):
    with Meter() as m:
        llm.reset()
        llm.eval(tokens)
    return len(tokens) / m.wall, m.other_cores


def bench_decode(llm, prompt_ids, steps, n_vocab):
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    with Meter() as m:
        for _ in range(steps):
            tok = int(np.argmax(last_logits(llm, n_vocab)))
            out.append(tok)
            llm.eval([tok])
    return steps / m.wall, m.other_cores, out


def main():
    ap = argparse.ArgumentParser(description="llama.cpp prefill/decode benchmark (one JSON line)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens for prefill")
    ap.add_argument("--decode", type=int, default=128, help="greedy decode steps")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (after 1 warm-up)")
    args = ap.parse_args()

    if not os.path.isfile(args.model):
        sys.exit(f"bench_llama_cpp: model not found: {args.model} (run scripts/fetch-model.sh)")
    if args.prefill < 1 or args.decode < 1 or args.reps < 1 or args.threads < 1:
        sys.exit("bench_llama_cpp: --threads, --prefill, --decode and --reps must be >= 1")
    if args.prefill > N_CTX:
        sys.exit(f"bench_llama_cpp: --prefill {args.prefill} exceeds n_ctx {N_CTX}")

    llm = Llama(
        model_path=args.model,
        n_ctx=N_CTX,
        n_batch=512,
        n_ubatch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    with open(PREFILL_TEXT, encoding="utf-8") as f:
        text_ids = llm.tokenize(f.read().encode("utf-8"), add_bos=False, special=False)
    if len(text_ids) < args.prefill:
        sys.exit(f"bench_llama_cpp: {PREFILL_TEXT} has only {len(text_ids)} tokens")
    prefill_ids = text_ids[: args.prefill]

    prompt_ids = llm.tokenize(DECODE_PROMPT.encode("utf-8"), add_bos=False, special=True)
    if len(prompt_ids) + args.decode > N_CTX:
        sys.exit(f"bench_llama_cpp: --decode {args.decode} does not fit in n_ctx {N_CTX}")

    load0 = os.getloadavg()[0]

    bench_prefill(llm, prefill_ids)  # warm-up
    prefill, prefill_other = [], []
    for _ in range(args.reps):
        tps, oc = bench_prefill(llm, prefill_ids)
        prefill.append(tps)
        prefill_other.append(oc)

    _, _, first = bench_decode(llm, prompt_ids, args.decode, n_vocab)  # warm-up
    decode, decode_other = [], []
    for _ in range(args.reps):
        tps, oc, toks = bench_decode(llm, prompt_ids, args.decode, n_vocab)
        decode.append(tps)
        decode_other.append(oc)
        if toks != first:
            print("bench_llama_cpp: warning: greedy decode differs between repetitions",
                  file=sys.stderr)

    text = llm.detokenize(first).decode("utf-8", errors="replace")
    print(f"bench_llama_cpp: llama-cpp-python {llama_cpp.__version__}, {args.threads} threads; "
          f"loadavg {load0:.2f} -> {os.getloadavg()[0]:.2f}; decoded: {text[:80]!r}...",
          file=sys.stderr)

    print(json.dumps({
        "engine": "llama.cpp",
        "threads": args.threads,
        "prefill_tokens": args.prefill,
        "decode_tokens": args.decode,
        "prefill_tok_s": [round(x, 2) for x in prefill],
        "decode_tok_s": [round(x, 2) for x in decode],
        "other_cores": [round(x, 3) for x in prefill_other + decode_other],
    }))


if __name__ == "__main__":
    main()
