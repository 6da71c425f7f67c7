#!/bin/bash
# Which kernel slab caches an idle connection to the egress grows, against the floor (a bare
# accept-and-hold server): both in a network namespace of their own, N connections from one
# loadgen process, /proc/slabinfo (objects × object size) before and after, per connection.
# Client and server halves are both counted; the client (loadgen) is the same in both runs, so
# the difference between the two tables is the egress's server side (docs/BENCHMARKS.md, "Past
# the open-file limit").
#
#   cargo xtask build                                      # the release binaries
#   bench/scripts/slab-by-cache.sh target/release 9000     # as root
set -euo pipefail
BIN=${1:?usage: slab-by-cache.sh RELEASE_DIR CONNECTIONS}
N=${2:-9000}
. "$(dirname "$0")/netns.sh" bf-slab
snap() { awk 'NR > 2 { print $1, $3 * $4 }' /proc/slabinfo | sort; }

measure() { # ROW
    if [ "$1" = egress ]; then
        printf '[liveness]\nmode = "xdp"\ninterfaces = ["lo"]\n[limits]\nmax_connections_per_ip = 1000000\n' >"$DIR/egress.toml"
        ip netns exec "$NS" "$BIN/egress" --ws 127.0.0.1:8080 --no-wss --admin off --state-dir "$DIR/state" \
            --config "$DIR/egress.toml" >"$DIR/out" 2>"$DIR/err" &
        SERVER=$!
        for _ in $(seq 100); do grep -q "certificate sha256" "$DIR/out" 2>/dev/null && break; sleep 0.1; done
    else
        ip netns exec "$NS" "$BIN/bench" floor --listen 127.0.0.1:8080 >"$DIR/out" 2>"$DIR/err" &
        SERVER=$!
        sleep 1
    fi
    local tcp=()
    [ "$1" = floor ] && tcp=(--tcp-only)
    snap >"$DIR/before"
    # loadgen prints its "ready" line once every connection is up, then holds them.
    exec 3< <(ip netns exec "$NS" "$BIN/loadgen" --target 127.0.0.1:8080 --conns "$N" "${tcp[@]}" \
        --hold-secs 30 --reset-on-exit)
    local load=$!
    read -r ready <&3
    sleep 1
    snap >"$DIR/after"
    echo "$1: $ready"
    join "$DIR/before" "$DIR/after" | awk -v n="$N" '{ d = ($3 - $2) / n; if (d > 2 || d < -2) printf "  %-26s %8.1f B\n", $1, d }' |
        sort -k2 -n -r
    kill "$load" "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=
    exec 3<&-
    while kill -0 "$load" 2>/dev/null; do sleep 0.1; done
    sleep 2
}
measure floor
measure egress
