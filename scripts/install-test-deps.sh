#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: Debian's
# Chromium (browser tests), iproute2 (the loopback-only network namespace),
# coturn (its turnutils_uclient is the independent TURN client of
# tests/it/turn.rs) and the npm packages in package-lock.json. Idempotent: a
# second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v turnutils_uclient >/dev/null 2>&1 || missing+=(coturn)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: need ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "install-test-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "install-test-deps: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi
