#!/usr/bin/env bash
# Checks everything under deploy/ with the real tools:
#   promtool        Prometheus config, alert rules, rule unit tests, dashboard PromQL
#   systemd-analyze unit verification and security exposure; systemd-sysusers
#   kubernetes-validate (PyPI; bundles the Kubernetes JSON schemas, works offline)
#   egress          `check-config` on the example config (when EGRESS_BIN is set)
#   signal          `check-config` on the signaling example config (when SIGNAL_BIN is set)
# plus the repository's own checks (config keys vs egress/src/config.rs and
# signal/src/config.rs, metrics used by the dashboard and rules vs
# egress/src/metrics.rs, sysctl keys).
#
# Usage (as root on Debian 12; installs what is missing, idempotently):
#   deploy/tests/check.sh
#   EGRESS_BIN=target/release/egress SIGNAL_BIN=target/release/signal deploy/tests/check.sh
#
# Environment:
#   EGRESS_BIN          an egress binary: verify the unit against it and run
#                       check-config on the example configs
#   SIGNAL_BIN          a signal binary (the signaling service): the same for
#                       broflake-signal.service, signal.toml and the ConfigMap in
#                       kubernetes/signal.yaml
#   BROFLAKE_CHECK_DIR  cache for the Python validator's virtualenv and the
#                       promtool fallback (default /var/cache/broflake-deploy-check)
#
# Prints one line per check ("ok", "FAIL" with the tool's output indented, or
# "skip" with the reason) and a summary; exits non-zero if any check failed.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEPLOY="$ROOT/deploy"
CACHE="${BROFLAKE_CHECK_DIR:-/var/cache/broflake-deploy-check}"
VENV="$CACHE/venv"
K8S_VALIDATE_VERSION="1.37.0"
# Kubernetes versions the manifests are validated against (oldest supported, newest bundled).
K8S_VERSIONS=(1.29.0 1.37.0)
EGRESS_BIN="${EGRESS_BIN:-}"
SIGNAL_BIN="${SIGNAL_BIN:-}"

WORK=$(mktemp -d)
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

passed=0
failed=0
skipped=0

# check NAME CMD...: runs CMD, prints one line, shows CMD's output on failure.
check() {
    local name=$1
    shift
    local out rc
    out=$("$@" 2>&1)
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "ok   $name"
        passed=$((passed + 1))
    else
        echo "FAIL $name (exit $rc)"
        printf '%s\n' "$out" | sed 's/^/       /'
        failed=$((failed + 1))
    fi
}

skip() {
    echo "skip $1 ($2)"
    skipped=$((skipped + 1))
}

# --- Tools: install only what is missing -------------------------------------

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    # Debian's "prometheus" package ships /usr/bin/promtool. Keep its server from
    # starting during the install (a policy-rc.d only if there is none already).
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
    fi
    apt_install prometheus
    local rc=$?
    [ $created -eq 1 ] && rm -f "$policy"
    [ $rc -eq 0 ] && command -v promtool >/dev/null 2>&1
}

setup_systemd_tools() {
    command -v systemd-analyze >/dev/null 2>&1 && return 0
    apt_install systemd && command -v systemd-analyze >/dev/null 2>&1
}

setup_validator() {
    if [ -x "$VENV/bin/kubernetes-validate" ] &&
        [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null)" = "$K8S_VALIDATE_VERSION" ]; then
        return 0
    fi
    mkdir -p "$CACHE"
    if ! python3 -m venv --clear "$VENV" >/dev/null 2>&1; then
        apt_install python3-venv python3-pip && python3 -m venv --clear "$VENV" || return 1
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        "kubernetes-validate==$K8S_VALIDATE_VERSION" >/dev/null
}

# Tool setup failures are reported as failed checks, not silently skipped.
check "tools: promtool (Debian package prometheus)" setup_promtool
check "tools: systemd-analyze (Debian package systemd)" setup_systemd_tools
check "tools: kubernetes-validate $K8S_VALIDATE_VERSION (PyPI, in $VENV)" setup_validator
PY="$VENV/bin/python"
[ -x "$PY" ] || PY=python3

# --- Prometheus ---------------------------------------------------------------

PROM="$DEPLOY/prometheus"
check "prometheus: promtool check config prometheus.yml (incl. rules and file_sd targets)" \
    promtool check config "$PROM/prometheus.yml"
check "prometheus: promtool check rules broflake-egress.rules.yml" \
    promtool check rules "$PROM/rules/broflake-egress.rules.yml"
check "prometheus: promtool test rules broflake-egress.rules.test.yml" \
    promtool test rules "$PROM/rules/broflake-egress.rules.test.yml"

# Every alert has unit tests, including one where it fires.
alerts_tested() {
    local rules="$PROM/rules/broflake-egress.rules.yml" tests="$PROM/rules/broflake-egress.rules.test.yml"
    "$PY" - "$rules" "$tests" <<'EOF'
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))
tests = yaml.safe_load(open(sys.argv[2]))
alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
fires, silent = set(), set()
for t in tests["tests"]:
    for a in t.get("alert_rule_test") or []:
        (fires if a.get("exp_alerts") else silent).add(a["alertname"])
bad = sorted(alerts - fires)
if bad:
    print("alerts without a firing test case:", ", ".join(bad)); sys.exit(1)
print(f"{len(alerts)} alerts tested; {len(silent & alerts)} also with an explicit silent evaluation")
EOF
}
check "prometheus: every alert has a firing test case" alerts_tested

# --- Grafana --------------------------------------------------------------------

DASH="$DEPLOY/grafana/dashboards/broflake-egress.json"
check "grafana: dashboard is valid JSON" python3 -m json.tool "$DASH"

dashboard_structure() {
    python3 - "$DASH" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
assert d.get("uid") and d.get("title"), "uid and title are required"
ids, n = set(), 0
for p in d["panels"]:
    assert p["id"] not in ids, f"duplicate panel id {p['id']}"
    ids.add(p["id"])
    g = p["gridPos"]
    assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"panel {p['title']!r} is outside the 24-column grid"
    if p["type"] != "row":
        assert p.get("targets"), f"panel {p['title']!r} has no queries"
        n += 1
print(f"{n} panels")
EOF
}
check "grafana: dashboard structure (unique ids, grid, queries)" dashboard_structure

# Every PromQL expression of the dashboard parses: wrap them as recording rules,
# with Grafana's variables replaced, and let promtool parse them.
dashboard_promql() {
    python3 - "$DASH" >"$WORK/dashboard.rules.yml" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", []) if t.get("expr")]
exprs += [a["expr"] for a in d.get("annotations", {}).get("list", []) if a.get("expr")]
subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
         "$job": ".*", "$instance": ".*"}
print("groups:\n  - name: dashboard\n    rules:")
for i, e in enumerate(exprs):
    for k, v in subst.items():
        e = e.replace(k, v)
    assert "$" not in e, f"unknown Grafana variable in {e}"
    print(f"      - record: dashboard:expr{i}")
    print(f"        expr: {json.dumps(e)}")
EOF
    promtool check rules "$WORK/dashboard.rules.yml"
}
check "grafana: every dashboard query is valid PromQL (promtool)" dashboard_promql

provisioning_yaml() {
    "$PY" - "$DEPLOY"/grafana/provisioning/*/*.yml <<'EOF'
import sys, yaml
for f in sys.argv[1:]:
    doc = yaml.safe_load(open(f))
    assert doc.get("apiVersion") == 1, f"{f}: apiVersion 1 expected"
    assert doc.get("datasources") or doc.get("providers"), f"{f}: nothing provisioned"
EOF
}
check "grafana: provisioning files parse" provisioning_yaml

# The dashboard and the rules query only metrics that exist: the names in
# egress/src/metrics.rs plus the planned ones (XDP and fd gauges), fed to
# dashboard_metrics.py as a synthetic exposition.
known_metrics() {
    {
        grep -oE '"broflake_[a-z0-9_]+"' "$ROOT/egress/src/metrics.rs" | tr -d '"'
        printf '%s\n' broflake_xdp_flows broflake_xdp_map_capacity broflake_xdp_expired_total \
            broflake_open_fds broflake_max_fds
    } | sort -u | sed 's/$/ 0/' >"$WORK/known.prom"
    python3 "$DEPLOY/tests/dashboard_metrics.py" "$WORK/known.prom"
}
check "metrics: dashboard and rules query only known metric names" known_metrics

# --- systemd ----------------------------------------------------------------------

UNIT="$DEPLOY/systemd/broflake-egress.service"
SIGNAL_UNIT="$DEPLOY/systemd/broflake-signal.service"
# make_unit_root UNIT_FILE BINARY_NAME BINARY: a copy of the unit whose binary path
# (/usr/local/bin/BINARY_NAME) points into a temporary root that holds BINARY (or
# a stub when BINARY is empty), because verify requires ExecStart's binary to exist.
make_unit_root() {
    local unit=$1 name=$2 bin=$3 r="$WORK/root"
    mkdir -p "$r/usr/local/bin" "$r/unit"
    if [ -n "$bin" ]; then
        cp "$bin" "$r/usr/local/bin/$name"
    else
        printf '#!/bin/sh\nexit 0\n' >"$r/usr/local/bin/$name"
    fi
    chmod 755 "$r/usr/local/bin/$name"
    sed "s#/usr/local/bin/$name#$r/usr/local/bin/$name#g" "$unit" >"$r/unit/$(basename "$unit")"
}
# unit_verify UNIT_FILE BINARY_NAME BINARY
unit_verify() {
    make_unit_root "$@" || return 1
    local name out
    name=$(basename "$1" .service)
    out=$(systemd-analyze verify "$WORK/root/unit/$name.service" 2>&1)
    local rc=$?
    printf '%s\n' "$out"
    # verify exits 0 on some warnings; treat any output about this unit as failure.
    [ $rc -eq 0 ] && ! printf '%s\n' "$out" | grep -q "$name"
}
check "systemd: systemd-analyze verify broflake-egress.service ($([ -n "$EGRESS_BIN" ] && echo "with $EGRESS_BIN" || echo "stub binary"))" \
    unit_verify "$UNIT" egress "$EGRESS_BIN"

# unit_security UNIT_NAME THRESHOLD: exposure 0.0 (locked down) .. 10.0, the
# threshold in tenths. The egress unit scores ~1.9 (fail above 2.5), the
# signaling unit ~1.2 (no capabilities, own user namespace; fail above 1.5).
unit_security() {
    systemd-analyze security --offline=yes --threshold="$2" "$WORK/root/unit/$1.service" |
        tail -n 1
}
check "systemd: systemd-analyze security exposure <= 2.5" unit_security broflake-egress 25

unit_facts() {
    local e=0
    grep -qx 'CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE' "$UNIT" || { echo "CapabilityBoundingSet changed"; e=1; }
    grep -qx 'AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE' "$UNIT" || { echo "AmbientCapabilities changed"; e=1; }
    grep -qx 'LimitNOFILE=1048576' "$UNIT" || { echo "LimitNOFILE changed"; e=1; }
    grep -q '^ExecReload=' "$UNIT" && { echo "ExecReload is not supported by the egress"; e=1; }
    # TimeoutStopSec must exceed the drain grace of the example config + 2 s slack.
    local stop grace
    stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' "$UNIT")
    grace=$(sed -n '/^\[drain\]/,/^\[/s/^grace = "\([0-9]*\)s"$/\1/p' "$DEPLOY/config/egress.toml")
    if [ -z "$stop" ] || [ -z "$grace" ] || [ "$stop" -le $((grace + 5)) ]; then
        echo "TimeoutStopSec ($stop) must exceed [drain] grace ($grace s) + 5 s"
        e=1
    fi
    local tgp
    tgp=$(sed -n 's/^ *terminationGracePeriodSeconds: *\([0-9]*\)$/\1/p' "$DEPLOY/kubernetes/daemonset.yaml")
    if [ -z "$tgp" ] || [ "$tgp" -le $((grace + 5)) ]; then
        echo "terminationGracePeriodSeconds ($tgp) must exceed [drain] grace ($grace s) + 5 s"
        e=1
    fi
    return $e
}
check "systemd: capabilities, fd limit, no reload, stop timeouts above the drain grace" unit_facts

check "systemd: systemd-sysusers --dry-run broflake-egress.sysusers.conf" \
    systemd-sysusers --dry-run "$DEPLOY/systemd/broflake-egress.sysusers.conf"

# The signaling service's unit, the same way.
check "systemd: systemd-analyze verify broflake-signal.service ($([ -n "$SIGNAL_BIN" ] && echo "with $SIGNAL_BIN" || echo "stub binary"))" \
    unit_verify "$SIGNAL_UNIT" signal "$SIGNAL_BIN"
check "systemd: systemd-analyze security exposure <= 1.5 (broflake-signal.service)" \
    unit_security broflake-signal 15

signal_unit_facts() {
    local u="$SIGNAL_UNIT" conf="$DEPLOY/config/signal.toml" e=0
    grep -qx 'CapabilityBoundingSet=' "$u" || { echo "CapabilityBoundingSet= must be empty (no capabilities)"; e=1; }
    grep -qx 'AmbientCapabilities=' "$u" || { echo "AmbientCapabilities= must be empty"; e=1; }
    grep -qE '^SystemCallFilter=.*(bpf|io_uring)' "$u" && { echo "the signaling service needs neither bpf nor io_uring"; e=1; }
    grep -q '^ExecReload=' "$u" && { echo "ExecReload is not supported by the signaling service"; e=1; }
    grep -qx 'KillSignal=SIGTERM' "$u" || { echo "KillSignal=SIGTERM (starts the drain) is missing"; e=1; }
    grep -qx 'ExecStart=/usr/local/bin/signal --config /etc/broflake-signal/signal.toml' "$u" ||
        { echo "ExecStart changed (binary and config path as in the egress layout)"; e=1; }
    # Redis is optional: Wants=, never Requires= or BindsTo=.
    grep -qx 'Wants=redis-server.service' "$u" || { echo "Wants=redis-server.service missing"; e=1; }
    grep -qE '^(Requires|BindsTo|Requisite)=.*redis' "$u" && { echo "Redis must stay optional (Wants=, not Requires=)"; e=1; }
    # TimeoutStopSec must exceed the drain grace of the example config + 5 s.
    local stop grace nofile clients
    stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' "$u")
    grace=$(sed -n '/^\[drain\]/,/^\[/s/^grace = "\([0-9]*\)s"$/\1/p' "$conf")
    if [ -z "$stop" ] || [ -z "$grace" ] || [ "$stop" -le $((grace + 5)) ]; then
        echo "TimeoutStopSec ($stop) must exceed [drain] grace ($grace s) + 5 s"
        e=1
    fi
    # One descriptor per client: LimitNOFILE above [limits] max_clients.
    nofile=$(sed -n 's/^LimitNOFILE=\([0-9]*\)$/\1/p' "$u")
    clients=$(sed -n '/^\[limits\]/,/^\[/s/^max_clients = \([0-9]*\)$/\1/p' "$conf")
    if [ -z "$nofile" ] || [ -z "$clients" ] || [ "$nofile" -le "$clients" ]; then
        echo "LimitNOFILE ($nofile) must exceed [limits] max_clients ($clients)"
        e=1
    fi
    return $e
}
check "systemd: signal unit: no capabilities, Redis optional, stop timeout above the drain grace, fd limit" \
    signal_unit_facts

check "systemd: systemd-sysusers --dry-run broflake-signal.sysusers.conf" \
    systemd-sysusers --dry-run "$DEPLOY/systemd/broflake-signal.sysusers.conf"

# --- sysctl -------------------------------------------------------------------------

sysctl_keys() {
    local f="$DEPLOY/sysctl/90-broflake-egress.conf" e=0 n=0 line key value optional path
    while IFS= read -r line; do
        line="${line%%#*}"
        [[ "$line" =~ ^[[:space:]]*$ ]] && continue
        if [[ ! "$line" =~ ^[[:space:]]*(-?)([a-z0-9_.-]+)[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]]; then
            echo "not 'key = value': $line"
            e=1
            continue
        fi
        optional=${BASH_REMATCH[1]} key=${BASH_REMATCH[2]} value=${BASH_REMATCH[3]}
        n=$((n + 1))
        if [[ ! "$value" =~ ^[0-9]+([[:space:]]+[0-9]+)*$ ]]; then
            echo "$key: value is not numeric: $value"
            e=1
        fi
        path="/proc/sys/${key//.//}"
        if [ -z "$optional" ] && [ ! -e "$path" ]; then
            echo "$key: no such kernel setting on this kernel ($path)"
            e=1
        fi
        if [ -e "$path" ] && [ "$(wc -w <"$path")" -ne "$(wc -w <<<"$value")" ]; then
            echo "$key: the kernel expects $(wc -w <"$path") values, the file gives $(wc -w <<<"$value")"
            e=1
        fi
    done <"$f"
    echo "$n settings"
    return $e
}
check "sysctl: every setting exists on this kernel and is well-formed" sysctl_keys

# --- Configuration -------------------------------------------------------------------

CONFIG="$DEPLOY/config/egress.toml"
check "config: egress.toml documents every key of config.rs, and no unknown key" \
    python3 "$DEPLOY/tests/config_keys.py" "$ROOT/egress/src/config.rs" "$CONFIG"

# The ConfigMap's embedded egress.toml.
extract_configmap_toml() {
    "$PY" - "$DEPLOY/kubernetes/configmap.yaml" >"$WORK/configmap-egress.toml" <<'EOF'
import sys, yaml
print(yaml.safe_load(open(sys.argv[1]))["data"]["egress.toml"], end="")
EOF
}
configmap_keys() {
    extract_configmap_toml &&
        python3 "$DEPLOY/tests/config_keys.py" "$ROOT/egress/src/config.rs" "$WORK/configmap-egress.toml" --subset
}
check "config: kubernetes/configmap.yaml's egress.toml has no unknown key" configmap_keys

if [ -n "$EGRESS_BIN" ]; then
    check "config: $EGRESS_BIN check-config deploy/config/egress.toml" "$EGRESS_BIN" check-config "$CONFIG"
    configmap_check_config() {
        extract_configmap_toml && "$EGRESS_BIN" check-config "$WORK/configmap-egress.toml"
    }
    check "config: $EGRESS_BIN check-config (kubernetes/configmap.yaml's egress.toml)" configmap_check_config
else
    skip "config: egress check-config deploy/config/egress.toml" "EGRESS_BIN not set"
fi

SIGNAL_CONFIG="$DEPLOY/config/signal.toml"
# signal's [[ice_servers]] entries are msg.rs's IceServer.
check "config: signal.toml documents every key of signal/src/config.rs, and no unknown key" \
    python3 "$DEPLOY/tests/config_keys.py" "$ROOT/signal/src/config.rs" "$SIGNAL_CONFIG" \
    --types "$ROOT/signal/src/msg.rs"

# The embedded signal.toml of kubernetes/signal.yaml's ConfigMap.
extract_signal_configmap_toml() {
    "$PY" - "$DEPLOY/kubernetes/signal.yaml" >"$WORK/configmap-signal.toml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "ConfigMap"]
print(next(d["data"]["signal.toml"] for d in docs if "signal.toml" in d.get("data", {})), end="")
EOF
}
signal_configmap_keys() {
    extract_signal_configmap_toml &&
        python3 "$DEPLOY/tests/config_keys.py" "$ROOT/signal/src/config.rs" "$WORK/configmap-signal.toml" \
            --subset --types "$ROOT/signal/src/msg.rs"
}
check "config: kubernetes/signal.yaml's signal.toml has no unknown key" signal_configmap_keys

if [ -n "$SIGNAL_BIN" ]; then
    check "config: $SIGNAL_BIN check-config deploy/config/signal.toml" "$SIGNAL_BIN" check-config "$SIGNAL_CONFIG"
    signal_configmap_check_config() {
        extract_signal_configmap_toml && "$SIGNAL_BIN" check-config "$WORK/configmap-signal.toml"
    }
    check "config: $SIGNAL_BIN check-config (kubernetes/signal.yaml's signal.toml)" signal_configmap_check_config
else
    skip "config: signal check-config deploy/config/signal.toml" "SIGNAL_BIN not set"
fi

# --- Kubernetes ------------------------------------------------------------------------

for v in "${K8S_VERSIONS[@]}"; do
    check "kubernetes: kubernetes-validate --strict -k $v deploy/kubernetes/*.yaml" \
        "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$DEPLOY"/kubernetes/*.yaml
done

k8s_facts() {
    "$PY" - "$DEPLOY/kubernetes/daemonset.yaml" <<'EOF'
import sys, yaml
ds = yaml.safe_load(open(sys.argv[1]))
spec = ds["spec"]["template"]["spec"]
c = spec["containers"][0]
caps = c["securityContext"]["capabilities"]
assert spec.get("hostNetwork") is True, "hostNetwork must be true"
assert spec.get("dnsPolicy") == "ClusterFirstWithHostNet", "dnsPolicy"
assert caps["drop"] == ["ALL"], caps
assert sorted(caps["add"]) == ["BPF", "NET_ADMIN", "NET_BIND_SERVICE"], caps
assert c["livenessProbe"]["httpGet"]["path"] == "/live"
assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
assert not any("bpf" in (v.get("hostPath") or {}).get("path", "") for v in spec.get("volumes", [])), \
    "no /sys/fs/bpf volume: nothing is pinned"
EOF
}
check "kubernetes: hostNetwork, capabilities, probes as documented" k8s_facts

# kubernetes/signal.yaml: replicas sharing one Redis, rolled out without losing
# capacity, draining within the grace period, non-root without capabilities.
signal_k8s_facts() {
    "$PY" - "$DEPLOY/kubernetes/signal.yaml" <<'EOF'
import re, sys, tomllib, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
for d in docs:
    assert d["metadata"].get("namespace") == "broflake", f"{d['kind']}/{d['metadata']['name']}: namespace broflake"
dep = by[("Deployment", "broflake-signal")]
redis = by[("Deployment", "broflake-signal-redis")]
conf = tomllib.loads(by[("ConfigMap", "broflake-signal")]["data"]["signal.toml"])
svc = by[("Service", "broflake-signal")]
rsvc = by[("Service", "broflake-signal-redis")]
pdb = by[("PodDisruptionBudget", "broflake-signal")]

assert dep["spec"]["replicas"] >= 2, "at least two replicas"
st = dep["spec"]["strategy"]
assert st["type"] == "RollingUpdate" and st["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}, st
spec = dep["spec"]["template"]["spec"]
c = spec["containers"][0]
args = c["args"]
assert args[args.index("--replica") + 1] == "$(POD_NAME)", args
assert args[args.index("--admin") + 1] == "0.0.0.0:9091", args
assert args[args.index("--config") + 1] == "/etc/broflake-signal/signal.toml", args
env = {e["name"]: e for e in c["env"]}
assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", env
assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}, c["readinessProbe"]
assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "admin"}, c["livenessProbe"]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
assert ports == {"ws": 8090, "admin": 9091}, ports
assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports, svc["spec"]["ports"]

grace = int(re.fullmatch(r"(\d+)s", conf.get("drain", {}).get("grace", "10s")).group(1))
tgp = spec["terminationGracePeriodSeconds"]
assert tgp > grace + 5, f"terminationGracePeriodSeconds ({tgp}) must exceed [drain] grace ({grace} s) + 5 s"

assert conf["store"]["kind"] == "redis", conf["store"]
m = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", conf["store"]["url"])
assert m and m.group(1) == rsvc["metadata"]["name"], f"store.url must name the Service {rsvc['metadata']['name']}"
assert int(m.group(2)) == rsvc["spec"]["ports"][0]["port"], "store.url port"
assert "replica" not in conf["store"], "store.replica comes from --replica $(POD_NAME): one per pod"

assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"] == dep["spec"]["selector"], pdb["spec"]

for d in (dep, redis):
    ps = d["spec"]["template"]["spec"]
    assert ps["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", d["metadata"]["name"]
    for k in ps["containers"]:
        sc = k["securityContext"]
        assert ps["securityContext"].get("runAsNonRoot") or sc.get("runAsNonRoot"), f"{k['name']}: runAsNonRoot"
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, k["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, f"{k['name']}: drop ALL, add nothing"

assert redis["spec"]["replicas"] == 1 and redis["spec"]["strategy"]["type"] == "Recreate", "one Redis, never two"
rc = redis["spec"]["template"]["spec"]["containers"][0]
ra = rc["args"]
assert ra[ra.index("--save") + 1] == "" and ra[ra.index("--appendonly") + 1] == "no", ra
for probe in ("readinessProbe", "livenessProbe"):
    assert rc[probe]["exec"]["command"][:2] == ["redis-cli", "ping"], probe
print(f"{len(docs)} documents")
EOF
}
check "kubernetes: signal.yaml: replicas, rollout, drain, Redis, security as documented" signal_k8s_facts

# --- Summary ---------------------------------------------------------------------------

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
