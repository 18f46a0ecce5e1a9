#!/usr/bin/env bash
# Builds the playground into dist/ with trunk (release, offline). Serve dist/ with public/
# beside it (kindling-server does both), or copy public/{models,sae,atlas} next to dist/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/install-web-tools.sh
export PATH="${KINDLING_CACHE:-$HOME/.cache/kindling}/tools/bin:$PATH"
trunk build --release
