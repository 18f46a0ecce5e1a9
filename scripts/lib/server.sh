# wait_listening LOG PID WHAT: waits until the process PID writes "listening on
# http://127.0.0.1:PORT" to LOG, and prints PORT; exits with LOG shown if the process ends
# first. (Sourced by the test scripts.)
wait_listening() {
    local log=$1 pid=$2 what=$3 port
    for _ in $(seq 1 600); do
        port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$' || true)
        [ -n "$port" ] && { echo "$port"; return 0; }
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "$what did not start" >&2; exit 1; }
        sleep 0.2
    done
    echo "$what did not start listening" >&2
    exit 1
}

# start_server LOG [ARGS...]: starts the release kindling-server on a free 127.0.0.1 port and
# waits until it listens; sets KINDLING_URL and SERVER_PID.
start_server() {
    local log=$1 port; shift
    "${CARGO_TARGET_DIR:-$ROOT/target}/release/kindling-server" --port 0 "$@" 2>"$log" &
    SERVER_PID=$!
    port=$(wait_listening "$log" "$SERVER_PID" kindling-server)
    export KINDLING_URL="http://127.0.0.1:$port" KINDLING_PID=$SERVER_PID
}
