#!/usr/bin/env bash
# The server's end-to-end tests: the real goodfire (0.3.5) and openai SDKs run the Ember
# quickstart against kindling-server on 127.0.0.1, then faults and load over raw HTTP.
# Needs the release build of kindling-server (scripts/test.sh builds it) and the model.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# A virtualenv kept between runs (an optimization: a missing one is made again).
VENV="${KINDLING_CACHE:-$HOME/.cache/kindling}/venv-sdk"
if ! "$VENV/bin/python" -c "import goodfire, openai, pytest" 2>/dev/null; then
    echo "== SDK virtualenv ($VENV)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "httpx>=0.27.2,<0.28" "pydantic>=2.9,<3" numpy openai pytest
    "$VENV/bin/pip" install -q --no-deps "goodfire==0.3.5"
fi

source scripts/lib/server.sh
LOGS=$(mktemp -d)
trap 'kill $SERVER_PID ${DOUBLE_PID:-} 2>/dev/null || true' EXIT

echo "== goodfire and openai SDKs against kindling-server"
start_server "$LOGS/sdk.log"
NO_PROXY=127.0.0.1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/sdk/test_goodfire_sdk.py
kill $SERVER_PID; wait $SERVER_PID 2>/dev/null || true

echo "== kindling-server --upstream neuronpedia, against Neuronpedia's contract double"
source scripts/lib/neuronpedia-double.sh
start_neuronpedia_double "$LOGS/double.log"
export NEURONPEDIA_TEST_KEY="np-key-$RANDOM$RANDOM"
printf '%s\n' "$NEURONPEDIA_TEST_KEY" > "$LOGS/np-key"
start_server "$LOGS/upstream.log" --upstream neuronpedia --upstream-url "$NEURONPEDIA_DOUBLE_URL" --upstream-key-file "$LOGS/np-key"
NO_PROXY=127.0.0.1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/sdk/test_neuronpedia_upstream.py
kill $SERVER_PID; wait $SERVER_PID 2>/dev/null || true
# The user's Neuronpedia key reaches the upstream and no log line.
if grep -q "$NEURONPEDIA_TEST_KEY" "$LOGS/upstream.log"; then
    echo "the server's log contains the Neuronpedia key" >&2; exit 1
fi

echo "== kindling-server faults and load"
export KINDLING_API_KEY="faults-key-$RANDOM"
# The key comes from a file, so it is on no command line.
printf 'an-older-key\n%s\n' "$KINDLING_API_KEY" > "$LOGS/keys"
export KINDLING_SERVER_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/kindling-server"
start_server "$LOGS/faults.log" --max-running 2 --max-queued 6 --api-key-file "$LOGS/keys" \
    --cors-origin http://localhost:9999 --header-timeout 2 --max-connections 100
# The last test stops the server with SIGTERM while it generates.
NO_PROXY=127.0.0.1 "$VENV/bin/python" -m pytest -q -s -p no:cacheprovider tests/sdk/test_server_faults.py
wait $SERVER_PID 2>/dev/null || true
grep -q "kindling-server: stopped" "$LOGS/faults.log" || { tail "$LOGS/faults.log"; echo "no graceful shutdown" >&2; exit 1; }
# Request logs carry no prompt text or keys.
if grep -q "Tell me about\|Say hello\|kindling-test\|$KINDLING_API_KEY" "$LOGS"/*.log; then
    echo "server logs contain request text or keys" >&2; exit 1
fi
echo "server tests passed"
