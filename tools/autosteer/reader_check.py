#!/usr/bin/env python3
"""The reader check of docs/STEERING.md: does the judge's pass/fail match what a reader sees?

  reader_check.py sample REPORT BLIND.json [--seed N] [--n 20]
      draws N of AutoSteer's steered replies at random from REPORT (kindling-build
      autosteer-eval) and writes them without any verdict, for a reader;
  reader_check.py merge REPORT BLIND.json READ.json OUT.json
      READ.json holds the reader's calls ({"n", "expresses": clear|weak|no,
      "coherent": yes|degraded|no, "steered_ok": bool, "note"}); OUT gets every item with
      the judge's verdict beside the reader's, and the agreement counts.
"""
import json
import random
import sys


def drawn(report, seed, n):
    items = []
    for c in report["concepts"]:
        for r in c["autosteer"]["replies"]:
            if c["autosteer"]["edits"]:
                items.append({"concept": c["request"], "prompt": r["prompt"], "seed": r["seed"], "text": r["text"],
                              "judge_pass": c["autosteer"]["pass"]})
    random.Random(seed).shuffle(items)
    return [dict(item, n=k) for k, item in enumerate(items[:n])]


def main():
    mode, report = sys.argv[1], json.load(open(sys.argv[2]))
    if mode == "sample":
        seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 20261208
        n = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv else 20
        blind = [{k: v for k, v in item.items() if k != "judge_pass"} for item in drawn(report, seed, n)]
        json.dump({"seed": seed, "items": blind}, open(sys.argv[3], "w"), indent=1)
    elif mode == "merge":
        blind = json.load(open(sys.argv[3]))
        reads = {r["n"]: r for r in json.load(open(sys.argv[4]))}
        items = drawn(report, blind["seed"], len(blind["items"]))
        agree = 0
        for item in items:
            item["reader"] = reads[item["n"]]
            agree += item["reader"]["steered_ok"] == item["judge_pass"]
        out = {
            "about": f"{len(items)} of AutoSteer's steered replies drawn at random (seed {blind['seed']}) from "
                     "docs/autosteer-eval.json; a reader (a helper, not shown the judge) marked each: expresses the "
                     "concept (clear/weak/no), coherent (yes/degraded/no), steered_ok. judge_pass is the evaluation's "
                     "verdict for that concept (pooled over all its replies).",
            "agree": agree,
            "reader_ok_judge_fail": sum(i["reader"]["steered_ok"] and not i["judge_pass"] for i in items),
            "reader_no_judge_pass": sum(not i["reader"]["steered_ok"] and i["judge_pass"] for i in items),
            "items": items,
        }
        json.dump(out, open(sys.argv[5], "w"), indent=1)
        print(f"agree {agree} of {len(items)}; reader ok / judge fail {out['reader_ok_judge_fail']}; "
              f"reader no / judge pass {out['reader_no_judge_pass']}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
