#!/usr/bin/env bash
# Fetches the model if needed, builds the playground and the server, and serves both on
# http://127.0.0.1:${PORT:-8080} (the page runs the model itself; the server also offers the
# hosted Ember API). Ctrl-C stops it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/fetch-model.sh
scripts/build-app.sh
cargo build --release -p kindling-server
echo "== open http://127.0.0.1:${PORT:-8080}/"
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/kindling-server" --host 127.0.0.1 --port "${PORT:-8080}" "$@"
