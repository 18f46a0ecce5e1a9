#!/usr/bin/env bash
# Runs every test: the engine on the real model (CPU and wgpu via Mesa lavapipe), the CLI,
# the server driven by the real goodfire and openai SDKs, the playground end to end in headless
# Chromium (which builds the engine for wasm32 with both backends, in the two worker builds),
# and the corpus builder's text cleaning.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "== cargo fmt --check"
# Formatting first: it fails in a second, before the long builds.
cargo fmt --all --check || { echo "formatting differs: run cargo fmt --all" >&2; exit 1; }

echo "== cargo clippy -D warnings, cargo doc -D warnings"
# Lints are [workspace.lints] in Cargo.toml. The page is linted for wasm32, where its UI
# lives; its workers need burn for wasm32 and are checked by the e2e build instead.
cargo clippy --release --workspace --all-targets -- -D warnings
cargo clippy -p kindling-app --target wasm32-unknown-unknown --lib --bin kindling-app -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --release --workspace --no-deps

scripts/fetch-model.sh
scripts/fetch-minilm.sh

echo "== cargo test (release: burn is unusably slow unoptimised)"
# Tests share one model load per binary; two threads keep wgpu's lavapipe and the CPU
# backend from fighting over the machine's cores.
cargo test --release --workspace -- --test-threads=2

echo "== the quantized kernels and fused block loops in wasm (simd128), under node"
# The page's CPU path runs the wasm SIMD kernels, which no native test reaches: the same
# equality tests run here in wasm32, through wasm-bindgen-test-runner (installed with trunk);
# only the tests marked `wasm_bindgen_test` run there.
scripts/install-web-tools.sh
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER="${KINDLING_CACHE:-$HOME/.cache/kindling}/tools/bin/wasm-bindgen-test-runner" \
    cargo test --release --target wasm32-unknown-unknown -p kindling-engine --no-default-features --features cpu --lib

echo "== kindling-server with the goodfire and openai SDKs"
# The workspace's feature set, as cargo test built it: no second build of burn.
cargo build --release --workspace
scripts/test-server.sh

echo "== the playground in headless Chromium (model in the page's worker, and hosted mode)"
scripts/test-e2e.sh

echo "== Neuronpedia's contract double: it rejects what the real service rejects"
(cd tests/neuronpedia && python3 -m unittest -q test_contract_double)
# Needs the internet: runs only with NEURONPEDIA_LIVE=1, else says it is skipped.
scripts/neuronpedia-live-smoke.sh

echo "== corpus builder unit tests"
(cd tools/corpus && python3 -m unittest -q test_build_corpus test_chat_prompts)

echo "all tests passed"
