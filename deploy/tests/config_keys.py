#!/usr/bin/env python3
"""Compare an example egress.toml with the configuration schema in egress/src/config.rs.

Usage:
    config_keys.py CONFIG_RS TOML [--subset]

Reads the `Config` struct and the section structs it names from config.rs, and:
  * fails on any section or key in TOML that the schema does not have (the
    egress rejects unknown keys);
  * without --subset, fails on any schema key that TOML neither sets nor shows
    commented out (`#key = ...`) in its section: the example must document
    every key;
  * checks value shapes the egress would reject: durations are humantime
    strings ("30s"), enum keys take one of the enum's kebab-case variants.

It does not replace `egress check-config` (which runs the real validation); it
works without a build and catches drift between the example and the schema.
Standard library only (Python >= 3.11 for tomllib).
"""

import re
import sys
import tomllib


def parse_schema(rs):
    """{section: {key: rust_type}}, {enum: [variants]} and which fields are durations."""
    structs = {}
    durations = set()
    for m in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", rs, re.S):
        name, body = m.group(1), m.group(2)
        fields = {}
        pending_duration = False
        for line in body.splitlines():
            line = line.strip()
            if "humantime_serde" in line:
                pending_duration = True
                continue
            f = re.match(r"pub (\w+):\s*(.+?),?$", line)
            if f:
                fields[f.group(1)] = f.group(2)
                if pending_duration:
                    durations.add((name, f.group(1)))
                pending_duration = False
        structs[name] = fields
    enums = {}
    for m in re.finditer(r"pub enum (\w+)\s*\{(.*?)\n\}", rs, re.S):
        variants = re.findall(r"^\s*(\w+),", m.group(2), re.M)
        enums[m.group(1)] = [re.sub(r"(?<!^)([A-Z])", r"-\1", v).lower() for v in variants]
    if "Config" not in structs:
        raise SystemExit("config.rs: no `pub struct Config` found")
    sections = {}
    for sec, ty in structs["Config"].items():
        if ty not in structs:
            raise SystemExit(f"config.rs: section {sec} has unknown type {ty}")
        sections[sec] = (ty, structs[ty])
    return sections, enums, durations


def commented_keys(text):
    """{section: set(keys)} of `#key = value` lines, by the section they sit in."""
    out = {}
    section = None
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"^\[(\w+)\]$", s)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^#\s?(\w+)\s*=", s)
        if m and section:
            out.setdefault(section, set()).add(m.group(1))
    return out


DURATION = re.compile(r"^\s*(\d+\s*(ns|us|µs|ms|s|sec|secs|m|min|mins|h|hr|hrs|d|days|w|weeks)\s*)+$")


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    rs_path, toml_path = argv[0], argv[1]
    subset = "--subset" in argv[2:]
    rs = open(rs_path, encoding="utf-8").read()
    text = open(toml_path, encoding="utf-8").read()
    sections, enums, durations = parse_schema(rs)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        print(f"{toml_path}: not valid TOML: {e}")
        return 1
    shown = commented_keys(text)
    errors = []
    for sec, table in doc.items():
        if sec not in sections:
            errors.append(f"unknown section [{sec}]")
            continue
        if not isinstance(table, dict):
            errors.append(f"{sec} must be a table")
            continue
        struct, fields = sections[sec]
        for key, value in table.items():
            if key not in fields:
                errors.append(f"unknown key {sec}.{key}")
                continue
            ty = fields[key]
            if (struct, key) in durations:
                if not isinstance(value, str) or not DURATION.match(value):
                    errors.append(f"{sec}.{key} = {value!r}: not a duration like \"30s\"")
            elif ty in enums and value not in enums[ty]:
                errors.append(f"{sec}.{key} = {value!r}: not one of {enums[ty]}")
    if not subset:
        for sec, (_, fields) in sections.items():
            for key in fields:
                if key not in doc.get(sec, {}) and key not in shown.get(sec, set()):
                    errors.append(f"{sec}.{key} is not documented (neither set nor shown commented out)")
    for e in errors:
        print(f"{toml_path}: {e}")
    if errors:
        return 1
    n = sum(len(f) for _, f in sections.values())
    print(f"{toml_path}: matches the schema ({len(sections)} sections, {n} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
