#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: Debian's
# Chromium (browser tests), iproute2 (the loopback-only network namespace),
# coturn (its turnutils_uclient is the independent TURN client of
# tests/it/turn.rs), the npm packages in package-lock.json, and the Python
# packages of the aiortc interoperability test (tests/interop/requirements.txt,
# into the git-ignored virtualenv .venv-interop/). Idempotent: a second run
# installs nothing.
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

# The aiortc interoperability test: a virtualenv with the pinned packages,
# made anew only when tests/interop/requirements.txt changes. Python >= 3.10
# ($CONFAB_PYTHON, else the first one found).
venv=.venv-interop
requirements=tests/interop/requirements.txt
python_ok() {
  "$1" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1
}
if ! { [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/requirements.installed"; }; then
  python=
  for candidate in ${CONFAB_PYTHON:-} python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      python=$candidate
      break
    fi
  done
  if [ -z "$python" ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "install-test-deps: need Python >= 3.10 with venv; run as root or: sudo apt-get install -y python3 python3-venv" >&2
      exit 1
    fi
    echo "install-test-deps: apt-get install python3 python3-venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    python=python3
  fi
  echo "install-test-deps: $venv ($("$python" --version 2>&1)): pip install -r $requirements"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.installed"
fi
