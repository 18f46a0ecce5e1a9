#!/usr/bin/env bash
# Rebuilds the feature atlas (public/atlas/) of the shipped SAE: the static embedder
# distilled from all-MiniLM-L6-v2, then per-latent statistics, contexts, logit effects,
# labels and label quality on the harvest's held-out text. Run scripts/build_sae.sh first
# (it leaves the corpus and the harvest in data/). Every step resumes where an interrupted
# run stopped and prints progress with rate and ETA; on the 2-core reference machine the
# whole run takes about 1.5 hours (see docs/ATLAS.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUILD=target/release/kindling-build

scripts/fetch-model.sh
scripts/fetch-minilm.sh
cargo build --release -p kindling-builders
[ -f data/harvest/harvest.json ] || { echo "build_atlas: no data/harvest; run scripts/build_sae.sh first" >&2; exit 1; }
$BUILD embedder --out public/atlas/embedder.safetensors
$BUILD atlas --sae-dir public/sae --harvest data/harvest --out public/atlas
$BUILD search-eval --queries tools/atlas/search-queries.json --out public/atlas/search-eval.json
