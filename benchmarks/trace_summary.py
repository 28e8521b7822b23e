"""Where the device time of a profiled step goes: per-line totals and the top ops of a perfetto trace.

``python -m benchmarks.train_step --profile PREFIX`` writes ``PREFIX_<mode>.trace.json.gz`` (3 steps)
and the compiled HLO beside it; ``python -m benchmarks.trace_summary PREFIX_*.trace.json.gz`` prints,
per trace, the busy time of each device line (the GPU streams, and XLA's "XLA Ops" line, whose
names are the HLO instructions of the HLO file) and the ops that take the most of it, per step.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def kind(name: str) -> str:
    """A coarse class of an op or kernel name."""
    n = name.lower()
    if any(k in n for k in ("cudnn", "flash", "fmha", "sdpa", "custom-call")):
        return "attention/custom-call"
    if any(k in n for k in ("gemm", "cublas", "nvjet", "xmma", "cutlass", "dot", "triton_gemm")):
        return "matmul"
    if any(k in n for k in ("all-", "reduce-scatter", "nccl", "collective")):
        return "collective"
    if any(k in n for k in ("copy", "memcpy", "memset", "transpose")):
        return "copy/transpose"
    if "fusion" in n or "reduce" in n or "loop" in n or "input" in n:
        return "fusion (memory-bound)"
    return "other"


def summarize(path: str, steps: int, top: int) -> dict:
    events = load(path)
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"].get("name", "")
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"].get("name", "")
    device = {pid for pid, name in procs.items() if re.search(r"GPU|TPU|device", name, re.I)}
    lines = collections.defaultdict(lambda: collections.Counter())
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        proc = procs.get(e["pid"], "")
        if device and e["pid"] not in device:  # a CPU trace has host lines only: keep them all
            continue
        line = f"{proc} / {threads.get((e['pid'], e['tid']), e['tid'])}"
        lines[line][e["name"]] += e["dur"]
    out = {}
    for line, ops in sorted(lines.items()):
        total = sum(ops.values()) / steps / 1e3
        by_kind = collections.Counter()
        for name, us in ops.items():
            by_kind[kind(name)] += us / steps / 1e3
        out[line] = {
            "ms_per_step": total,
            "by_kind_ms": dict(by_kind.most_common()),
            "top_ms": [(n, us / steps / 1e3) for n, us in ops.most_common(top)],
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+")
    p.add_argument("--steps", type=int, default=3, help="steps in each trace")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="write the summaries as JSON here")
    a = p.parse_args(argv)
    everything = {}
    for path in a.traces:
        s = everything[path] = summarize(path, a.steps, a.top)
        print(f"\n=== {path}")
        for line, d in s.items():
            if d["ms_per_step"] < 0.05:
                continue
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in d["by_kind_ms"].items())
            print(f"  [{line}] {d['ms_per_step']:.2f} ms/step: {kinds}")
            for name, ms in d["top_ms"][:12] if "XLA Ops" not in line else d["top_ms"]:
                print(f"      {ms:8.3f} ms  {name[:110]}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
