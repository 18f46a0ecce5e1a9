#!/usr/bin/env bash
# The playground's end-to-end tests: builds the app with trunk, serves it with kindling-server
# (which also answers the hosted-mode test), starts Neuronpedia's contract double (for the
# page's Neuronpedia mode) and drives headless Chromium through
# tests/e2e/*.test.mjs. Screenshots of the main views land in target/e2e-artifacts/.
# Needs the release build of kindling-server (scripts/test.sh builds it) and the model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/install-web-tools.sh --browser
scripts/build-app.sh
(cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)

source scripts/lib/server.sh
source scripts/lib/neuronpedia-double.sh
LOGS=$(mktemp -d)
trap 'kill $SERVER_PID ${DOUBLE_PID:-} 2>/dev/null || true' EXIT
start_server "$LOGS/e2e.log"
# The page's Neuronpedia mode calls Neuronpedia's contract double, on another origin.
start_neuronpedia_double "$LOGS/double.log"
export KINDLING_ARTIFACTS="${KINDLING_ARTIFACTS:-$ROOT/target/e2e-artifacts}"
NO_PROXY=127.0.0.1 node --test --test-concurrency=1 tests/e2e/
echo "playground tests passed (screenshots in $KINDLING_ARTIFACTS)"
