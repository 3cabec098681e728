#!/bin/sh
# Side-by-side peer: Janus 1.1.2 (Debian's package, VideoRoom) under the
# same `confab load` fan-out as Confab. Run as root inside a loopback-only
# network namespace, e.g.
#   unshare -n sh -c 'ip link set lo up && benches/janus/run.sh --steps 10,25,50,100'
# Needs `apt-get install --no-install-recommends janus` and a C compiler.
# Janus is pinned to core 0 and the generator to core 1, as for Confab.
set -eu
# Janus sometimes crashes while it shuts down under load: no core files.
ulimit -c 0
cd "$(dirname "$0")/../.."
out=${TMPDIR:-/tmp}/confab-janus
mkdir -p "$out"
# libnice skips loopback interfaces when it gathers candidates, and a
# loopback-only namespace has nothing else: report lo as an ordinary one.
cc -shared -fPIC -O2 -o "$out/lo_shim.so" benches/janus/lo_shim.c -ldl
LD_PRELOAD="$out/lo_shim.so" taskset -c 0 janus -F /etc/janus -L "$out/janus.log" \
    >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    grep -q "WebSockets server started" "$out/janus.log" 2>/dev/null && break
    sleep 0.5
done
target/release/confab load --janus 127.0.0.1:8188 --server-pid "$pid" "$@"
