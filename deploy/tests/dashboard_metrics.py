#!/usr/bin/env python3
"""Check that every metric the dashboard and the alert rules query exists.

Usage:
    dashboard_metrics.py EXPOSITION [FILE ...] [--allow-missing NAME ...]

EXPOSITION is a file of Prometheus exposition text (a scrape of a live egress's
/metrics). FILE arguments are Grafana dashboard JSON files (*.json) and
Prometheus rule files (*.yml / *.yaml); without any, the repository's
deploy/grafana/dashboards/*.json and deploy/prometheus/rules/*.rules.yml are
used.

Every metric name used in a PromQL expression (dashboard targets, annotation and
variable queries, alert and recording rule expressions) is extracted: functions,
label matchers, grouping label lists, ranges, offsets and string literals are
stripped; `_bucket`, `_sum` and `_count` suffixes are accepted when the base
name is exposed; `up` and other series Prometheus makes itself are skipped.
Exits 1, listing them, if any name is not in the exposition. Metrics that only
exist in some modes can be excused with --allow-missing NAME (repeatable).

Needs only the Python standard library (PyYAML is used when installed).
"""

import argparse
import glob
import json
import os
import re
import sys

# Series Prometheus synthesizes itself; never in an exposition.
SYNTHETIC = re.compile(r"^(up|ALERTS|ALERTS_FOR_STATE|scrape_[a-z_]+)$")
SUFFIXES = ("_bucket", "_sum", "_count")

# PromQL words that look like identifiers but are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "start", "end", "inf", "nan", "atan2",
    # aggregation operators (usually followed by "(" or "by", handled anyway)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
    "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def strip_strings(expr):
    """Removes string literals ("...", '...', `...`), keeping the quotes' place."""
    return re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)


def metric_names(expr):
    """Metric names used in one PromQL expression (Grafana variables allowed)."""
    names = set()
    # Grafana's label_values(METRIC_OR_SELECTOR, label) / metrics(regex) /
    # query_result(EXPR): keep only what is PromQL.
    m = re.match(r"^\s*label_values\s*\((.*),\s*" + NAME + r"\s*\)\s*$", expr, re.S)
    if m:
        expr = m.group(1)
    elif re.match(r"^\s*label_values\s*\(\s*" + NAME + r"\s*\)\s*$", expr):
        return names  # label_values(label): no metric
    m = re.match(r"^\s*query_result\s*\((.*)\)\s*$", expr, re.S)
    if m:
        expr = m.group(1)
    if re.match(r"^\s*(metrics|label_names)\s*\(", expr):
        return names

    e = strip_strings(expr)
    # {__name__="x"} / {__name__=~"..."} selectors are not resolved: report them.
    if "__name__" in e:
        raise ValueError("__name__ matchers are not supported: " + expr)
    e = re.sub(r"\{[^{}]*\}", " ", e)              # label matchers
    e = re.sub(r"\[[^\[\]]*\]", " ", e)            # ranges and subqueries
    e = re.sub(r"\$\{[^}]*\}|\$" + NAME, " ", e)   # Grafana variables
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)",
               " ", e)                             # grouping label lists
    e = re.sub(r"\boffset\s+-?[0-9a-zA-Z]+", " ", e)
    e = re.sub(r"@\s*[0-9.]+|@\s*(start|end)\s*\(\s*\)", " ", e)
    # Numbers (incl. 1e3, 0x1f, durations like 5m) must not look like names.
    e = re.sub(r"(?<![a-zA-Z0-9_:])[0-9][0-9a-zA-Z_.]*", " ", e)
    for m in re.finditer(r"(" + NAME + r")(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word in KEYWORDS:
            continue
        names.add(word)
    return names


# --- Collecting expressions ------------------------------------------------

def dashboard_exprs(path):
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    exprs = []

    def panel_walk(panels):
        for p in panels or []:
            for t in p.get("targets") or []:
                if isinstance(t, dict) and t.get("expr"):
                    exprs.append(t["expr"])
            panel_walk(p.get("panels"))

    panel_walk(dash.get("panels"))
    for a in (dash.get("annotations") or {}).get("list") or []:
        if a.get("expr"):
            exprs.append(a["expr"])
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if q:
            exprs.append(q)
    return exprs


def rule_exprs(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        import yaml  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return rule_exprs_fallback(text)
    doc = yaml.safe_load(text) or {}
    return [r["expr"] for g in doc.get("groups") or [] for r in g.get("rules") or []
            if r.get("expr")]


def rule_exprs_fallback(text):
    """`expr:` values from a rule file without a YAML library: plain, quoted and
    block scalars (| and >), which is what rule files use."""
    exprs = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(?:-\s+)?expr:\s*(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        i += 1
        if value[:1] in ("|", ">"):
            block = []
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            exprs.append(" ".join(block))
        else:
            if value[:1] in ('"', "'"):
                value = json.loads(value) if value[0] == '"' else value[1:-1].replace("''", "'")
            exprs.append(value)
    return exprs


def exposed_names(path):
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = re.match(NAME, line)
            if m:
                names.add(m.group(0))
    return names


def base_name(name):
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exposition")
    ap.add_argument("files", nargs="*")
    ap.add_argument("--allow-missing", action="append", default=[], metavar="NAME")
    args = ap.parse_args(argv)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = args.files or sorted(
        glob.glob(os.path.join(root, "grafana", "dashboards", "*.json"))
        + glob.glob(os.path.join(root, "prometheus", "rules", "*.rules.yml")))
    if not files:
        print("no dashboard or rule files found", file=sys.stderr)
        return 2

    exposed = exposed_names(args.exposition)
    if not exposed:
        print(f"{args.exposition}: no samples in the exposition", file=sys.stderr)
        return 2
    exposed_bases = {base_name(n) for n in exposed}

    used = {}  # name -> set of files
    for path in files:
        exprs = dashboard_exprs(path) if path.endswith(".json") else rule_exprs(path)
        if not exprs:
            print(f"{path}: no PromQL expressions found", file=sys.stderr)
            return 2
        for expr in exprs:
            for name in metric_names(expr):
                if SYNTHETIC.match(name):
                    continue
                used.setdefault(name, set()).add(os.path.basename(path))

    allowed = set(args.allow_missing)
    missing = sorted(
        n for n in used
        if n not in exposed and base_name(n) not in exposed_bases and n not in allowed)
    unused = sorted(n for n in exposed_bases
                    if n.startswith("broflake_") and n not in used
                    and n not in {base_name(u) for u in used})
    print(f"{len(used)} metric names used in {len(files)} files; "
          f"{len(exposed)} names in the exposition")
    if unused:
        print("exposed but not used by any dashboard or rule (info): " + ", ".join(unused))
    if missing:
        print("MISSING from the exposition:")
        for n in missing:
            print(f"  {n}  (used in {', '.join(sorted(used[n]))})")
        return 1
    print("ok: every metric used is exposed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
