#!/usr/bin/env python3
"""Compare an example configuration with its schema: egress.toml with
egress/src/config.rs, signal.toml with signal/src/config.rs.

Usage:
    config_keys.py CONFIG_RS TOML [--subset] [--types RS]...

Reads the `Config` struct and the section structs it names from config.rs, and:
  * fails on any section or key in TOML that the schema does not have (the
    services reject unknown keys);
  * without --subset, fails on any schema key that TOML neither sets nor shows
    commented out (`#key = ...`) in its section: the example must document
    every key;
  * checks value shapes the service would reject: durations are humantime
    strings ("30s"), enum keys take one of the enum's kebab-case variants.

A section of type `Vec<T>` is an array of tables (`[[name]]`, shown commented
out as `#[[name]]`); T may be defined in another file given with --types (e.g.
signal's `IceServer` in signal/src/msg.rs). Keys of its entries are checked like
a section's, although a service may ignore unknown keys there.

It does not replace `egress check-config` / `signal check-config` (which run the
real validation); it works without a build and catches drift between the example
and the schema. Standard library only (Python >= 3.11 for tomllib).
"""

import re
import sys
import tomllib


def parse_schema(rs, extra=()):
    """{section: (struct, {key: rust_type}, is_array)}, {enum: [variants]} and which
    fields are durations. `extra`: more Rust sources whose structs sections may name."""
    structs = {}
    durations = set()
    for m in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", "\n".join([*extra, rs]), re.S):
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
    for m in re.finditer(r"pub enum (\w+)\s*\{(.*?)\n\}", "\n".join([*extra, rs]), re.S):
        variants = re.findall(r"^\s*(\w+),", m.group(2), re.M)
        enums[m.group(1)] = [re.sub(r"(?<!^)([A-Z])", r"-\1", v).lower() for v in variants]
    if "Config" not in structs:
        raise SystemExit("config.rs: no `pub struct Config` found")
    sections = {}
    for sec, ty in structs["Config"].items():
        array = re.fullmatch(r"Vec<(\w+)>", ty)
        if array:
            ty = array.group(1)
        if ty not in structs:
            raise SystemExit(f"config.rs: section {sec} has unknown type {ty} (defined elsewhere? pass --types)")
        sections[sec] = (ty, structs[ty], bool(array))
    return sections, enums, durations


def commented_keys(text):
    """{section: set(keys)} of `#key = value` lines, by the section they sit in. An
    array of tables shown only commented out (`#[[name]]`) is a section with no keys."""
    out = {}
    section = None
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"^\[(\w+)\]$", s) or re.match(r"^#?\s?\[\[(\w+)\]\]$", s)
        if m:
            section = m.group(1)
            if s.startswith("#"):
                out.setdefault(section, set())
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
    subset, types, rest = False, [], argv[2:]
    while rest:
        if rest[0] == "--subset":
            subset, rest = True, rest[1:]
        elif rest[0] == "--types" and len(rest) > 1:
            types.append(open(rest[1], encoding="utf-8").read())
            rest = rest[2:]
        else:
            print(__doc__)
            return 2
    rs = open(rs_path, encoding="utf-8").read()
    text = open(toml_path, encoding="utf-8").read()
    sections, enums, durations = parse_schema(rs, types)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        print(f"{toml_path}: not valid TOML: {e}")
        return 1
    shown = commented_keys(text)
    errors = []
    for sec, value in doc.items():
        if sec not in sections:
            errors.append(f"unknown section [{sec}]")
            continue
        struct, fields, array = sections[sec]
        if array:
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                errors.append(f"{sec} must be an array of tables ([[{sec}]])")
                continue
            tables = value
        elif not isinstance(value, dict):
            errors.append(f"{sec} must be a table")
            continue
        else:
            tables = [value]
        for key, value in ((k, v) for t in tables for k, v in t.items()):
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
        for sec, (_, fields, array) in sections.items():
            if array and sec not in doc and sec not in shown:
                errors.append(f"[[{sec}]] is not documented (neither set nor shown commented out)")
                continue
            tables = doc.get(sec, []) if array else [doc.get(sec, {})]
            for key in fields:
                if not any(key in t for t in tables if isinstance(t, dict)) and key not in shown.get(sec, set()):
                    errors.append(f"{sec}.{key} is not documented (neither set nor shown commented out)")
    for e in errors:
        print(f"{toml_path}: {e}")
    if errors:
        return 1
    n = sum(len(f) for _, f, _ in sections.values())
    print(f"{toml_path}: matches the schema ({len(sections)} sections, {n} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
