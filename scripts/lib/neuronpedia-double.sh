# start_neuronpedia_double LOG: starts Neuronpedia's contract double
# (tests/neuronpedia/contract_double.py) on a free 127.0.0.1 port and waits until it listens;
# sets NEURONPEDIA_DOUBLE_URL and DOUBLE_PID. (Sourced by the test scripts; the caller's EXIT
# trap stops it.)
start_neuronpedia_double() {
    local log=$1 port
    python3 "$ROOT/tests/neuronpedia/contract_double.py" --port 0 >"$log" 2>&1 &
    DOUBLE_PID=$!
    for _ in $(seq 1 100); do
        port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$' || true)
        [ -n "$port" ] && break
        kill -0 "$DOUBLE_PID" 2>/dev/null || { cat "$log"; echo "the contract double did not start" >&2; exit 1; }
        sleep 0.1
    done
    export NEURONPEDIA_DOUBLE_URL="http://127.0.0.1:$port"
}
