#!/usr/bin/env bash
# Rebuilds the shipped SAE from nothing but registry packages and the model: the corpus, the
# model-generated chats, the harvest at block $LAYER, training, evaluation and public/sae/.
# Every step resumes where an interrupted run stopped (run this script again), and every
# step prints progress with rate and ETA. On the 2-core reference machine the whole run
# takes about 4-5 hours (see docs/SAE.md); a finished step costs nothing on a rerun.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LAYER="${LAYER:-15}"
EPOCHS="${EPOCHS:-2}"
BUILD=target/release/kindling-build

scripts/fetch-model.sh
cargo build --release -p kindling-cli -p kindling-builders
[ -f data/corpus/manifest.json ] || python3 tools/corpus/build_corpus.py --out data/corpus
[ -f data/corpus/chat-prompts.jsonl ] || python3 tools/corpus/chat_prompts.py --corpus data/corpus --out data/corpus/chat-prompts.jsonl
$BUILD chats
$BUILD harvest --layers "$LAYER" --out data/harvest
$BUILD train --harvest data/harvest --layer "$LAYER" --out "data/sae/l$LAYER" --epochs "$EPOCHS"
$BUILD evaluate --sae "data/sae/l$LAYER/sae.safetensors" --harvest data/harvest --out "data/sae/l$LAYER/eval.json"
$BUILD ship --trained "data/sae/l$LAYER" --eval "data/sae/l$LAYER/eval.json" \
    --layer-comparison docs/sae-layer-comparison.json --out public/sae
