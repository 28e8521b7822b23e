"""What each mode's compiled train step holds in memory, read from XLA's buffer-assignment dumps.

``python -m benchmarks.train_step --config tiny --modes full,lora --buffers /tmp/buf`` compiles each
mode with ``XLA_FLAGS=--xla_dump_to=/tmp/buf/<mode>``; then

    python -m benchmarks.buffers /tmp/buf/full /tmp/buf/lora [--top 15] [--json out.json]

prints, for the module with the most bytes in each directory (the step): its allocation bytes by kind,
the values live at its peak grouped by shape, dtype and origin (argument or computed, with the HLO ops
that make them), and the groups each later directory keeps at its peak beyond the first's. It reads
``*buffer-assignment.txt`` and the ``*live-range.txt`` beside it (or its peak section inside the first;
without one, the temp buffers stand in), and the optimised HLO ``*.txt`` for each value's op.
"""

from __future__ import annotations

import argparse
import collections
import glob
import itertools
import json
import os
import pathlib
import re

ALLOCATION = re.compile(r"^allocation \d+: .*?size (\d+)(?:, )?(.*):\s*$")
VALUE = re.compile(r"^\s*value: <\d+ ([^ {]+)(\{[^}]*\})? @\d+> \(size=(\d+),offset=\d+\): (.*)$")
PEAK = re.compile(r"^\s*([^ {]+)(\{[^}]*\}): (\d+) bytes")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([^ =]+) = .*?\s([a-z][\w-]*)\(%?([^ ,)]*)")
OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
KINDS = ("parameter", "output", "constant", "thread-local", "preallocated-temp")  # else "other"
TEMP = ("thread-local", "preallocated-temp", "other")


def _text(path: str) -> str:
    return pathlib.Path(path).read_text() if os.path.exists(path) else ""


def shape(s: str) -> str:
    """A value's shape without its layout.

    >>> shape("(f32[64,256]{1,0}, /*index=1*/s32[]{:S(1)})")
    '(f32[64,256], s32[])'
    """
    return re.sub(r"\{[^{}]*\}|/\*index=\d+\*/", "", s).strip()


def _source(ops: dict, name: str) -> str:
    """The jax op that made instruction ``name``; for one without metadata (a copy), what it reads."""
    _, src, arg = ops.get(name, ("?", "", ""))
    return src or (f"of {ops[arg][1] if arg in ops and ops[arg][1] else arg}" if arg else "")


def parse(path: str) -> dict:
    """One module's dump: ``{"module", "totals" (bytes by allocation kind), "peak" (values live there)}``."""
    prefix = path[: -len("-buffer-assignment.txt")]
    text = _text(path) + "\n" + _text(prefix + "-live-range.txt")
    ops = {}  # instruction name -> (opcode, the jax op_name in its metadata, its first operand)
    for line in _text(prefix + ".txt").splitlines():
        if m := INSTRUCTION.match(line):
            src = OP_NAME.search(line)
            ops[m[1]] = (m[2], src[1].replace("\\'", "'") if src else "", m[3])
    totals, values, kind = collections.Counter(), {}, "other"
    for line in text.splitlines():
        if m := ALLOCATION.match(line):
            attrs = re.sub(r"\|[^|]*\|", "", m[2])
            kind = next((k for k in KINDS if k in attrs), "other")
            totals[kind] += int(m[1])
            totals["maybe-live-out"] += int(m[1]) * ("maybe-live-out" in attrs)
            totals["total"] += int(m[1])
        elif m := VALUE.match(line):
            values.setdefault((m[1], m[2] or "{}"), (int(m[3]), shape(m[4]), kind))
    lines = text.splitlines()
    at = next((i for i, ln in enumerate(lines) if ln.strip().startswith("Live ranges at") and "(peak)" in ln), None)
    if at is not None:
        live = [((m[1], m[2]), int(m[3])) for m in itertools.takewhile(bool, map(PEAK.match, lines[at + 1 :]))]
    else:  # no peak section: the values in temp allocations
        live = [(key, size) for key, (size, _, k) in values.items() if k in TEMP]
    peak = [{"name": name + index, "bytes": size, "shape": values.get((name, index), (0, "?"))[1],
             "op": ops.get(name, ("?",))[0], "source": _source(ops, name)} for (name, index), size in live]  # fmt: skip
    return {"module": os.path.basename(prefix), "totals": dict(totals), "peak": peak}


def read(directory: str) -> dict:
    """The dump of the module in ``directory`` whose allocations add up to the most bytes (the step)."""
    files = glob.glob(os.path.join(directory, "*buffer-assignment.txt"))
    if not files:
        raise FileNotFoundError(f"no *buffer-assignment.txt in {directory!r}: make the dumps with "
                                "python -m benchmarks.train_step --buffers DIR, then pass DIR/<mode>")  # fmt: skip
    return max(map(parse, files), key=lambda m: m["totals"].get("total", 0))


def groups(peak: list[dict]) -> list[dict]:
    """The peak's values by shape and dtype, and whether the step takes them as arguments or computes
    them, most bytes first; each group lists its values largest first."""
    by = collections.defaultdict(list)
    for v in peak:
        by[v["shape"], "argument" if v["op"] == "parameter" else "computed"].append(v)
    out = [{"shape": s, "origin": o, "count": len(vs), "bytes": sum(v["bytes"] for v in vs),
            "ops": dict(collections.Counter(v["op"] for v in vs).most_common()),
            "values": sorted(vs, key=lambda v: -v["bytes"])} for (s, o), vs in by.items()]  # fmt: skip
    return sorted(out, key=lambda g: (-g["bytes"], g["shape"], g["origin"]))


def kept(first: list[dict], second: list[dict]) -> list[dict]:
    """The groups the second peak holds more bytes of than the first, the largest difference first."""
    a, b = ({(g["shape"], g["origin"]): g for g in gs} for gs in (first, second))
    out = [{"shape": k[0], "origin": k[1], "count_first": a.get(k, {}).get("count", 0),
            "bytes_first": a.get(k, {}).get("bytes", 0), "count_second": g["count"], "bytes_second": g["bytes"]}
           for k, g in b.items()]  # fmt: skip
    out = [{**d, "extra_bytes": d["bytes_second"] - d["bytes_first"]} for d in out]
    return sorted((d for d in out if d["extra_bytes"] > 0), key=lambda d: (-d["extra_bytes"], d["shape"], d["origin"]))


def _row(g: dict) -> str:
    """A group in a line: what made its values and the largest of them."""
    v = g["values"][0]
    what = v["source"] if v["op"] == "parameter" else f"{v['op']} {v['source']}"
    made = ", ".join(f"{n} {op}" for op, n in g["ops"].items())
    return f"{g['shape'][:28]:<28} {g['origin']:<8} {made[:34]:<34} {v['name']} ({what[-60:]})"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="one dump directory per mode, the reference first")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    result = {}
    for d in a.dirs:
        m, name = read(d), os.path.basename(os.path.normpath(d))
        r = result[name] = {"module": m["module"], "totals": m["totals"], "groups": groups(m["peak"]),
                            "peak_bytes": sum(v["bytes"] for v in m["peak"])}  # fmt: skip
        totals = ", ".join(f"{k} {v:,}" for k, v in m["totals"].items())
        print(f"\n{name}: {m['module']}, allocation bytes by kind:\n  {totals}")
        print(f"  live at the peak: {r['peak_bytes']:,} bytes in {len(m['peak'])} values, by shape:")
        for g in r["groups"][: a.top]:
            print(f"  {g['bytes']:>11,} {g['count']:>4} x {_row(g)}")
    first, *later = result
    for name in later:
        diff = result[f"kept_by_{name}_not_{first}"] = kept(result[first]["groups"], result[name]["groups"])
        ours = {(g["shape"], g["origin"]): g for g in result[name]["groups"]}
        print(f"\nkept at the peak by {name} beyond {first}: {sum(d['extra_bytes'] for d in diff):,} bytes\n"
              f"  {'extra bytes':>11} {first:>6} {name:>6}")  # fmt: skip
        for d in diff[: a.top]:
            row = _row(ours[d["shape"], d["origin"]])
            print(f"  {d['extra_bytes']:>11,} {d['count_first']:>6} {d['count_second']:>6} {row}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
