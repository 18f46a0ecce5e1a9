#!/usr/bin/env bash
# The live Neuronpedia smoke test (tests/neuronpedia/live_smoke.py): the provider's steps
# against the real service, what it enforces of Kindling's limit table, and the goodfire SDK
# quickstart through `kindling-server --upstream neuronpedia`. Skipped unless
# NEURONPEDIA_LIVE=1: it needs the internet and spends a few rate-limited calls.
# NEURONPEDIA_API_KEY, when set, reaches the server's upstream calls (never a log).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${NEURONPEDIA_LIVE:-}" != "1" ]; then
    echo "live Neuronpedia smoke test skipped (set NEURONPEDIA_LIVE=1 to run it)"
    exit 0
fi
VENV="${KINDLING_CACHE:-$HOME/.cache/kindling}/venv-sdk"
source scripts/lib/server.sh
LOGS=$(mktemp -d)
trap 'kill ${SERVER_PID:-} 2>/dev/null || true' EXIT
start_server "$LOGS/live.log" --upstream neuronpedia
"$VENV/bin/python" tests/neuronpedia/live_smoke.py
