# start_neuronpedia_double LOG: starts Neuronpedia's contract double
# (tests/neuronpedia/contract_double.py) on a free 127.0.0.1 port and waits until it listens;
# sets NEURONPEDIA_DOUBLE_URL and DOUBLE_PID. (Sourced after scripts/lib/server.sh by the
# test scripts; the caller's EXIT trap stops it.)
start_neuronpedia_double() {
    local log=$1 port
    python3 "$ROOT/tests/neuronpedia/contract_double.py" --port 0 >"$log" 2>&1 &
    DOUBLE_PID=$!
    port=$(wait_listening "$log" "$DOUBLE_PID" "the contract double")
    export NEURONPEDIA_DOUBLE_URL="http://127.0.0.1:$port"
}
