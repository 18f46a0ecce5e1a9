#!/usr/bin/env bash
# Installs what building and testing the playground needs, where it is missing:
# trunk 0.21.14 and wasm-bindgen-cli (the version in Cargo.lock) from crates.io into
# $KINDLING_CACHE/tools, the wasm32 target, and (with --browser) Debian's chromium.
# Trunk never downloads anything itself (Trunk.toml: offline), so this is the only way in.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="${KINDLING_CACHE:-$HOME/.cache/kindling}/tools"
TRUNK_VERSION=0.21.14
BINDGEN_VERSION=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)

rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || rustup target add wasm32-unknown-unknown

if [ "$("$TOOLS/bin/trunk" --version 2>/dev/null)" != "trunk $TRUNK_VERSION" ]; then
    echo "== installing trunk $TRUNK_VERSION (a few minutes, once)"
    # 0.22 needs a newer rustc than this toolchain's.
    cargo install --quiet --locked trunk --version "$TRUNK_VERSION" --root "$TOOLS"
fi
if [ "$("$TOOLS/bin/wasm-bindgen" --version 2>/dev/null)" != "wasm-bindgen $BINDGEN_VERSION" ]; then
    echo "== installing wasm-bindgen-cli $BINDGEN_VERSION (a few minutes, once)"
    # Not --locked: its lock file pins a webpki-roots release the registry no longer serves.
    cargo install --quiet --force wasm-bindgen-cli --version "$BINDGEN_VERSION" --root "$TOOLS"
fi

if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null; then
    echo "== installing chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends chromium >/dev/null \
        || (apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null)
fi
echo "web tools ready in $TOOLS/bin"
