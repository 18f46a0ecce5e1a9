#!/usr/bin/env python3
"""Prints docs/autosteer-eval.json (kindling-build autosteer-eval) as the Markdown table of
docs/STEERING.md: per concept, AutoSteer's edits, its word rates (greedy and sampled) against
the base model's, and the ceiling's pick beside it; then the counts by kind."""
import json
import sys
from collections import Counter

report = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "docs/autosteer-eval.json"))
print("| concept | kind | AutoSteer | words/100 greedy: base → steered | sampled | distinct-2 | perplexity × base | pass | ceiling's pick | greedy / sampled | pass |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
passed, ceiling, either, kinds = 0, 0, 0, Counter()
for c in report["concepts"]:
    a, ce, b = c["autosteer"], c.get("ceiling") or {}, c["base"]
    ratio = max(a["t0"]["perplexity"] / b["t0"]["perplexity"], a["t07"]["perplexity"] / b["t07"]["perplexity"])
    distinct = min(a["t0"]["distinct_2"], a["t07"]["distinct_2"])
    ce_rates = f'{ce["t0"]["words_per_100"]:.1f} / {ce["t07"]["words_per_100"]:.1f}' if ce else "—"
    print(
        f'| {c["request"]} | {c["kind"]} | {"; ".join(a["edits"]) or "(none)"} '
        f'| {b["t0"]["words_per_100"]:.1f} → {a["t0"]["words_per_100"]:.1f} '
        f'| {b["t07"]["words_per_100"]:.1f} → {a["t07"]["words_per_100"]:.1f} '
        f'| {distinct:.2f} | {ratio:.1f} | {"yes" if a["pass"] else "no"} '
        f'| {"; ".join(ce.get("edits", [])) or "—"} | {ce_rates} | {"yes" if ce.get("pass") else "no"} |'
    )
    passed += a["pass"]
    ceiling += bool(ce.get("pass"))
    either += a["pass"] or bool(ce.get("pass"))
    kinds[(c["kind"], a["pass"])] += 1
n = len(report["concepts"])
print(f"\nAutoSteer passes {passed} of {n}; the ceiling {ceiling}; either {either}.")
seconds = sorted(c["autosteer"]["seconds"] for c in report["concepts"])
print(f"AutoSteer's time in the run: median {seconds[len(seconds) // 2]:.0f} s (machine shared with the run's other work).")
for kind in sorted({k for k, _ in kinds}):
    print(f"  {kind}: {kinds[(kind, True)]} of {kinds[(kind, True)] + kinds[(kind, False)]} pass")
