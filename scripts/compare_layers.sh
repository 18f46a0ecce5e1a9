#!/usr/bin/env bash
# The layer comparison of docs/SAE.md: harvest a small budget at several candidate blocks in
# one pass, train the same small SAE on each, evaluate on held-out windows, and write a table
# (data/layer-comparison/comparison.json). Every step resumes if interrupted.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LAYERS="${LAYERS:-12,15,18,20}"
ROWS="${ROWS:-200000}"
MANIFEST="${MANIFEST:-data/corpus/manifest.json}"
OUT="${OUT:-data/layer-comparison}"
BUILD=target/release/kindling-build

cargo build --release -p kindling-builders
$BUILD harvest --manifest "$MANIFEST" --out "$OUT/harvest" --layers "$LAYERS" --max-tokens "$ROWS" --heldout-every 10
for layer in ${LAYERS//,/ }; do
    dir="$OUT/l$layer"
    if [ ! -f "$dir/eval.json" ]; then
        $BUILD train --harvest "$OUT/harvest" --layer "$layer" --out "$dir" \
            --batch 1024 --epochs 3 --lr 8e-4 --dead-after-tokens 100000
        $BUILD evaluate --sae "$dir/sae.safetensors" --harvest "$OUT/harvest" --out "$dir/eval.json" \
            --ce-windows 12 --examples 12
    fi
done
python3 - "$OUT" "$LAYERS" <<'PY'
import json, sys
out, layers = sys.argv[1], [int(l) for l in sys.argv[2].split(",")]
rows = []
for layer in layers:
    e = json.load(open(f"{out}/l{layer}/eval.json"))
    t = json.load(open(f"{out}/l{layer}/train.json"))
    rows.append({"layer": layer, **e["metrics"], "ce_clean": e["details"]["ce_clean"], "ce_sae": e["details"]["ce_sae"],
                 "ce_zero_ablated": e["details"]["ce_zero_ablated"], "heldout_tokens": e["details"]["heldout_tokens"],
                 "train_rows": t["rows"], "examples": e["examples"]})
json.dump({"rows_per_layer": rows[0]["train_rows"], "layers": rows}, open(f"{out}/comparison.json", "w"), indent=1)
print(f"{'layer':>5} {'FVU':>7} {'L0':>5} {'dead':>6} {'CE rec':>7} {'KL':>7}")
for r in rows:
    print(f"{r['layer']:>5} {r['fvu']:7.4f} {r['l0']:5.1f} {100*r['dead_fraction']:5.1f}% {100*r['ce_loss_recovered']:6.1f}% {r['kl']:7.4f}")
PY
