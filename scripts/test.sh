#!/usr/bin/env bash
# Runs Confab's whole test suite on this machine:
#   1. formatting and lints (cargo fmt --check, clippy -D warnings);
#   2. one build of the server and of every test binary;
#   3. the Rust unit and integration tests (real server, real sockets,
#      webrtc-rs clients), the browser tests (Playwright + Chromium) and the
#      interoperability test with aiortc (an independent Python WebRTC
#      stack), all inside a private network namespace that has only
#      loopback, so that no test media ever leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings

echo "== build"
cargo build --locked --bins --tests

# Root gets a plain network namespace; other users map themselves to root
# in a user namespace first.
if [ "$(id -u)" -eq 0 ]; then ns=(unshare -n); else ns=(unshare -rn); fi

if cargo nextest --version >/dev/null 2>&1; then
  rust_tests="cargo nextest run --locked --no-fail-fast"
else
  rust_tests="cargo test --locked --no-fail-fast"
fi

echo "== tests (loopback-only network namespace)"
CARGO_NET_OFFLINE=true "${ns[@]}" sh -c "ip link set lo up && $rust_tests && node --test tests/browser/ && .venv-interop/bin/python tests/interop/aiortc_sfu.py"
