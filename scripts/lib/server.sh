# start_server LOG [ARGS...]: starts the release kindling-server on a free 127.0.0.1 port and
# waits until it listens; sets KINDLING_URL and SERVER_PID. (Sourced by the test scripts.)
start_server() {
    local log=$1 port; shift
    "${CARGO_TARGET_DIR:-$ROOT/target}/release/kindling-server" --port 0 "$@" 2>"$log" &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$' || true)
        [ -n "$port" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$log"; echo "kindling-server did not start" >&2; exit 1; }
        sleep 0.2
    done
    export KINDLING_URL="http://127.0.0.1:$port" KINDLING_PID=$SERVER_PID
}
