#!/usr/bin/env bash
# Create the Python environment used for the llama.cpp reference fixture and benchmark:
# a virtualenv at $ROOT/.venv-llama (git-ignored) with llama-cpp-python and numpy.
#
# Idempotent: does nothing when the venv already imports the pinned llama-cpp-python
# and numpy. llama-cpp-python is built from source by pip (there is no Linux wheel on
# PyPI), which takes about 7 minutes on 2 cores and needs a C/C++ compiler; cmake comes
# from PyPI inside pip's build isolation.
#
# The build is native (-march=native) but with Intel AMX turned off (-mno-amx-*): ggml's AMX
# kernels in this version crash with "Illegal instruction" (SIGILL at `tilezero`) on the
# Sapphire-Rapids-class Xeons some project machines have (upstream llama.cpp PR #26954). A
# venv whose build reports AMX_INT8 is treated as broken and rebuilt.
#
# Environment:
#   PYTHON                      interpreter used to create the venv (default: python3)
#   LLAMA_CPP_VENV              venv location (default: $ROOT/.venv-llama)
#   CMAKE_BUILD_PARALLEL_LEVEL  build jobs for the llama.cpp compile (default: 2)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLAMA_CPP_VENV:-$ROOT/.venv-llama}"
PYTHON="${PYTHON:-python3}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

say() { echo "llama_cpp_env: $*"; }
die() { echo "llama_cpp_env: error: $*" >&2; exit 1; }

# Prints the installed version and exits 0 when the venv has what we need.
venv_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" - "$LLAMA_CPP_PYTHON_VERSION" <<'PY' 2>/dev/null
import sys
import numpy  # noqa: F401
import llama_cpp
if llama_cpp.__version__ != sys.argv[1]:
    sys.exit(1)
if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
    sys.exit(2)  # built with AMX: crashes on AMX CPUs (see the header)
print(f"llama-cpp-python {llama_cpp.__version__}, numpy {numpy.__version__}")
PY
}

if have="$(venv_ok)"; then
    say "$VENV already has $have; nothing to do"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3)"
    say "creating virtualenv $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV" \
        || die "could not create the virtualenv $VENV (on Debian: apt-get install python3-venv)"
else
    say "reusing existing virtualenv $VENV"
fi

command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
    || die "no C++ compiler found; llama-cpp-python is built from source (on Debian: apt-get install build-essential)"

PIP_ARGS=()
if "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    say "the installed llama-cpp-python is the wrong version or was built with AMX; rebuilding it"
    PIP_ARGS+=(--force-reinstall)
fi
case "$(uname -m)" in
    x86_64|amd64)
        export CFLAGS="${CFLAGS:+$CFLAGS }-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        export CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        ;;
esac

say "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION and numpy from PyPI"
say "(builds llama.cpp from source with CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL${CXXFLAGS:+, CXXFLAGS=$CXXFLAGS}; about 7 minutes on 2 cores)"
start=$SECONDS
if ! "$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check "${PIP_ARGS[@]}" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" numpy; then
    die "pip failed to install llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (see the output above).
  Common causes: the package registry is unreachable, no C/C++ compiler (apt-get install build-essential),
  or the build ran out of memory (retry with CMAKE_BUILD_PARALLEL_LEVEL=1).
  The virtualenv $VENV was left in place; rerun this script to retry, or delete it to start over."
fi

have="$(venv_ok)" || die "pip reported success but $VENV/bin/python cannot import llama_cpp==$LLAMA_CPP_PYTHON_VERSION and numpy, or the build still has AMX"
say "installed $have into $VENV in $((SECONDS - start)) s"
