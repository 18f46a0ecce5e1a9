#!/usr/bin/env python3
"""Regenerate tests/fixtures/llama_cpp_reference.json from llama.cpp (llama-cpp-python).

Run it with the interpreter of the venv made by scripts/llama_cpp_env.sh:

    scripts/llama_cpp_env.sh
    .venv-llama/bin/python scripts/llama_cpp_reference.py

Method (docs: machine-facts §B.1): Llama(n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2,
logits_all=True); ids = llm.tokenize(prompt, add_bos=False, special=True); llm.reset();
llm.eval(ids); the logits are llm.scores (one row per prompt position). Greedy decoding takes
the argmax of the raw logits and feeds each token back with llm.eval([t]), for 20 steps.
The tokenizer spot checks use special=False, add_bos=False.

Logits are rounded to 4 decimals. The output is deterministic for a given llama-cpp-python
build (it is bit-identical with 1 and 2 threads).

OMP_WAIT_POLICY defaults to PASSIVE here: llama.cpp's spin-waiting OpenMP threads make it
30-70x slower when another process is busy on a 2-core machine (measured: 97-226 s instead of
3 s during a cargo build), and the passive policy does not change the results.
"""

import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before libgomp is loaded

import numpy as np  # noqa: E402

import llama_cpp  # noqa: E402
from llama_cpp import Llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "public", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "llama_cpp_reference.json")
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GREEDY_STEPS = 20
TOP_K = 5

PROMPTS = [
    # A: bare ChatML prompt, no system message.
    ("A", "<|im_start|>user\nHi, how are you?<|im_end|>\n<|im_start|>assistant\n"),
    # B: what the GGUF's chat template renders for the same user message (it inserts a
    # default system message when the first message is not a system message).
    (
        "B",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi, how are you?<|im_end|>\n<|im_start|>assistant\n",
    ),
    # C: plain text, no special tokens.
    ("C", "The capital of France is"),
]

TOKENIZER_TEXTS = [
    "Hello world",
    " Hello world",
    "Hello, how are you doing today?",
    "I'm 42 years old!!",
    "naïve café — 東京",
    "    indented\n\tcode()",
    "12345678",
]


def r4(x):
    return round(float(x), 4)


def topk(row, k=TOP_K):
    """[[id, logit], ...] for the k largest logits, largest first (ties: lower id first)."""
    idx = np.argsort(-row, kind="stable")[:k]
    return [[int(i), r4(row[i])] for i in idx]


def top1_top2_margin(row):
    a, b = np.partition(row, -2)[-2:]
    return float(max(a, b) - min(a, b))


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_prompt(llm, name, text):
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    n = len(ids)
    llm.reset()
    llm.eval(ids)
    # llm.scores is preallocated with n_ctx rows; the first n hold the prompt logits.
    logits = np.array(llm.scores[:n], dtype=np.float32)
    last = logits[-1].astype(np.float64)

    greedy, margins = [], []
    row = logits[-1]
    for _ in range(GREEDY_STEPS):
        t = int(np.argmax(row))
        greedy.append(t)
        margins.append(r4(top1_top2_margin(row)))
        llm.eval([t])
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)

    return {
        "name": name,
        "text": text,
        "ids": [int(i) for i in ids],
        "top5": topk(logits[-1]),
        "last_logits_mean": r4(last.mean()),
        "last_logits_std": r4(last.std()),
        "top5_per_position": [topk(r) for r in logits],
        "argmax_per_position": [int(np.argmax(r)) for r in logits],
        "greedy": greedy,
        "greedy_margins": margins,
        "greedy_text": llm.detokenize(greedy).decode("utf-8", errors="replace"),
    }


def dumps(obj, indent=0):
    """JSON with objects indented and lists kept on one line (lists of lists: one row per line)."""
    pad = "  " * indent
    if isinstance(obj, dict):
        items = [f'{pad}  {json.dumps(k)}: {dumps(v, indent + 1).lstrip()}' for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        return pad + "[\n" + ",\n".join(dumps(v, indent + 1) for v in obj) + "\n" + pad + "]"
    if isinstance(obj, list) and obj and isinstance(obj[0], list) and isinstance(obj[0][0], list):
        rows = [pad + "  " + json.dumps(v, ensure_ascii=False) for v in obj]
        return pad + "[\n" + ",\n".join(rows) + "\n" + pad + "]"
    return pad + json.dumps(obj, ensure_ascii=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file (default: %(default)s)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="fixture to write (default: %(default)s)")
    args = ap.parse_args()

    if not os.path.isfile(args.model):
        sys.exit(f"llama_cpp_reference: model not found: {args.model} (run scripts/fetch-model.sh)")
    sha = sha256_of(args.model)
    if sha != EXPECTED_SHA256:
        print(f"llama_cpp_reference: warning: model sha256 {sha} != expected {EXPECTED_SHA256}",
              file=sys.stderr)

    llm = Llama(
        model_path=args.model,
        n_ctx=512,
        n_batch=512,
        n_ubatch=512,
        n_threads=2,
        logits_all=True,
        verbose=False,
    )

    fixture = {
        "generator": f"scripts/llama_cpp_reference.py with llama-cpp-python {llama_cpp.__version__}",
        "model_sha256": sha,
        "prompts": [run_prompt(llm, name, text) for name, text in PROMPTS],
        "tokenizer": [
            {"text": t,
             "ids": [int(i) for i in llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)]}
            for t in TOKENIZER_TEXTS
        ],
    }

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(fixture) + "\n")
    os.replace(tmp, args.out)

    for p in fixture["prompts"]:
        top = ", ".join(f"{i}:{v}" for i, v in p["top5"])
        print(f"{p['name']}: {len(p['ids'])} tokens; top5 {top}; greedy {p['greedy_text']!r}")
    print(f"wrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
