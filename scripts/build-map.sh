#!/usr/bin/env bash
# Rebuilds the feature map (public/atlas/map.safetensors, tools/atlas/map.py) from the shipped
# atlas's labels, in a virtualenv of pinned packages kept between runs. Run it after anything
# that changes atlas.json's labels (scripts/build_atlas.sh, kindling-build atlas-labels): the
# engine refuses a map whose atlas_sha256 is not the atlas.json beside it. About 2 minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${KINDLING_CACHE:-$HOME/.cache/kindling}/venv-map"
if ! "$VENV/bin/python" -c "import umap, sklearn, tokenizers, safetensors" 2>/dev/null; then
    echo "== map virtualenv ($VENV)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q umap-learn==0.5.12 scikit-learn==1.9.1 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6 numba==0.68.1 pynndescent==0.7.0
fi
NUMBA_NUM_THREADS=1 exec "$VENV/bin/python" tools/atlas/map.py --atlas public/atlas "$@"
