#!/bin/bash
# The XDP flow map's kernel memory (its `memlock` in /proc/PID/fdinfo), for an egress on embedded
# defaults in a network namespace of its own, at start and with N handshaked connections held by
# loadgen (docs/BENCHMARKS.md, "the flow map no longer preallocated").
#
#   cargo xtask build                # the release binaries, loadgen included
#   bench/scripts/xdp-map-memory.sh target/release/egress 10000      # as root
set -euo pipefail
BIN=${1:?usage: xdp-map-memory.sh EGRESS_BIN CONNECTIONS}
N=${2:-10000}
LOADGEN=${LOADGEN:-target/release/loadgen}
. "$(dirname "$0")/netns.sh" bf-mapmem
ip netns exec "$NS" "$BIN" --ws 127.0.0.1:8080 --no-wss --admin off --state-dir "$DIR/state" \
    >"$DIR/out" 2>"$DIR/err" &
SERVER=$!
for _ in $(seq 100); do grep -q "certificate sha256" "$DIR/out" 2>/dev/null && break; sleep 0.1; done
PID=$(pgrep -P "$SERVER" -x egress || echo "$SERVER")

# The hash map (type 1) with the most entries is the flow map.
show() {
    local best=0 line=""
    for f in /proc/"$PID"/fdinfo/*; do
        grep -q "^map_type:[[:space:]]*1$" "$f" 2>/dev/null || continue
        local n
        n=$(awk '/^max_entries:/ {print $2}' "$f")
        if [ "$n" -gt "$best" ]; then
            best=$n
            line="max_entries $n, flags $(awk '/^map_flags:/ {print $2}' "$f"), memlock $(awk '/^memlock:/ {print $2}' "$f") B"
        fi
    done
    echo "$1: $line"
}
show "at start"
ip netns exec "$NS" "$LOADGEN" --target 127.0.0.1:8080 --conns "$N" --ping-ms 1000 --hold-secs 5 >"$DIR/lg" 2>&1 &
LG=$!
for _ in $(seq 300); do grep -q '"ready"' "$DIR/lg" 2>/dev/null && break; sleep 0.1; done
show "with $N connections"
wait "$LG"
