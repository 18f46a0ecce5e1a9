#!/usr/bin/env bash
# Benchmarks the playground in headless Chromium against wllama (llama.cpp in wasm, npm
# @wllama/wllama) on the same GGUF: page load to first token (cold and cached), prefill and
# decode on one thread. Prints medians and ratios; details in target/bench/browser.json.
#
# Usage: scripts/bench-browser.sh [--runs 3] [--tokens 64]   (run it on an otherwise idle machine)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/lib/pause-jobs.sh
pause_background_jobs
scripts/fetch-model.sh
scripts/install-web-tools.sh --browser
scripts/build-app.sh
(cd tools/bench-browser && npm ci --no-audit --no-fund --loglevel=error)
node tools/bench-browser/bench.mjs "$@"
