# Sourced by the scripts beside it: a network namespace (loopback up) and a scratch directory of
# their own, removed on exit together with the server whose pid the script keeps in $SERVER.
#
#   . "$(dirname "$0")/netns.sh" PREFIX      # sets NS, DIR, SERVER
NS=$1-$$
DIR=$(mktemp -d)
SERVER=
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
