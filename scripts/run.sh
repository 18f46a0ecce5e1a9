#!/usr/bin/env bash
# Fetches the model if needed, builds the CLI, and chats: scripts/run.sh ["your message"]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/fetch-model.sh
cargo build --release -p kindling-cli
exec target/release/kindling chat "${1:-Hi! What can you do?}" "${@:2}"
