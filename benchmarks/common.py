"""What the benchmark scripts share: running each mode in its own process, and the result file."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM, the MFU denominator the issue names


def environment() -> dict[str, Any]:
    import flax
    import jax
    import jaxlib
    import optax

    dev = jax.devices()[0]
    return {
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _parse(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-8:]
        errs = [ln for ln in tail if "Error" in ln or "RESOURCE_EXHAUSTED" in ln] or tail
        return {"error": " | ".join(errs)[-600:]}
    return json.loads(lines[-1])


def run_workers(
    module: str,
    jobs: dict[str, list[str]],
    timeout: float,
    parallel: bool,
    *,
    budget: float | None = None,
    on_result: Callable[[dict[str, dict[str, Any]]], None] | None = None,
    envs: dict[str, dict[str, str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``python -m module --worker *args`` for each job, each in a fresh process (its own peak memory).

    With ``parallel``, all processes compile at once (compilation and autotuning dominate a run), then
    each in turn is told to time its steps while the others wait idle, so timings never overlap.
    The last JSON line a worker prints is its result. One run in turn (not ``parallel``) gets at most
    ``timeout`` seconds and the whole series at most ``budget``: a job past its limit is recorded as
    ``{"error": "timeout", ...}`` with the end of its stderr, one that the budget leaves no time for
    as ``{"error": "skipped", ...}``, and ``on_result(results so far)`` is called after each job, so a
    caller can write what it has before a later job hangs. ``envs[name]`` adds variables to the
    environment of job ``name`` alone (``XLA_FLAGS``, which XLA reads once, as the backend starts).
    """
    env = dict(os.environ)
    if not parallel:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
        out: dict[str, dict[str, Any]] = {}
        start = time.time()
        for name, args in jobs.items():
            spare = float("inf") if budget is None else budget - (time.time() - start)
            left = min(timeout, spare)
            if spare < 5:
                out[name] = {"error": "skipped", "reason": f"the budget of {budget:.0f} s was spent"}
            else:
                try:
                    p = subprocess.run([sys.executable, "-m", module, "--worker", *args], capture_output=True,
                                       text=True, timeout=left, env={**env, **(envs or {}).get(name, {})})  # fmt: skip
                    out[name] = _parse(p.returncode, p.stdout, p.stderr)
                except subprocess.TimeoutExpired as e:
                    err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
                    out[name] = {"error": "timeout", "timeout_s": round(left), "stderr_tail": err[-600:]}
            r = out[name]
            said = f"{r['median_ms']:.3f} ms" if "median_ms" in r else r.get("error")
            if "compile_s" in r:
                said += f", compile {r['compile_s']} s"
            print(f"  {name}: {said}", flush=True)
            if on_result is not None:
                on_result(out)
        return out
    sync = tempfile.mkdtemp(prefix="bench_sync_")
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    procs = {}
    for i, (name, args) in enumerate(jobs.items()):
        penv = {**env, **(envs or {}).get(name, {}), "BENCH_SYNC": os.path.join(sync, str(i))}
        procs[name] = subprocess.Popen([sys.executable, "-m", module, "--worker", *args], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=penv)  # fmt: skip
    deadline = time.time() + timeout
    ready = lambda i: os.path.exists(os.path.join(sync, f"{i}.ready"))  # noqa: E731
    while time.time() < deadline and not all(ready(i) or p.poll() is not None for i, p in enumerate(procs.values())):
        time.sleep(0.5)
    out = {}
    for i, (name, p) in enumerate(procs.items()):
        if ready(i) and p.poll() is None:
            open(os.path.join(sync, f"{i}.go"), "w").close()
        try:
            stdout, stderr = p.communicate(timeout=max(10.0, deadline - time.time()))
            out[name] = _parse(p.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            out[name] = {"error": "timeout", "timeout_s": round(timeout)}
        print(f"  {name}: {out[name].get('median_ms', out[name].get('error'))}", flush=True)
    return out


@contextlib.contextmanager
def switches_restored() -> Iterator[None]:
    """Restore jaxlora's private switches (the ablations' forms of the LoRA op) on exit."""
    from jaxlora import _fused, _matmul

    saved = _matmul._MERGED, _matmul._SIDE_BY_SIDE, _matmul.factored, _matmul._STACK_FORM, _fused._KERNEL
    try:
        yield
    finally:
        _matmul._MERGED, _matmul._SIDE_BY_SIDE, _matmul.factored, _matmul._STACK_FORM, _fused._KERNEL = saved


def profile(blocking: Callable[[], Any], prefix: str, steps: int = 3) -> None:
    """A perfetto trace of ``steps`` calls of ``blocking`` at ``prefix.trace.json.gz`` (read it with
    ``python -m benchmarks.trace_summary``)."""
    import glob
    import shutil

    import jax

    with jax.profiler.trace(prefix + "_raw", create_perfetto_trace=True):
        for _ in range(steps):
            blocking()
    for g in glob.glob(prefix + "_raw/**/*perfetto*", recursive=True):
        shutil.copy(g, prefix + ".trace." + os.path.basename(g).split(".", 1)[1])
    shutil.rmtree(prefix + "_raw")


def sync_point() -> None:
    """In a worker: say it is compiled and warm, then wait for its turn to time (see `run_workers`)."""
    base = os.environ.get("BENCH_SYNC")
    if not base:
        return
    open(base + ".ready", "w").close()
    while not os.path.exists(base + ".go"):
        time.sleep(0.05)


def write(result: dict[str, Any], path: str | None, quiet: bool = False) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1, sort_keys=False)
        if not quiet:
            print(f"wrote {path}")


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "peak_memory_in_bytes")  # fmt: skip


def memory_analysis(compiled: Any) -> dict[str, int] | None:
    """The byte counts of ``compiled.memory_analysis()`` (a ``jax.stages.Compiled``) that this backend
    reports, or None where it reports none. Arguments include donated buffers, which ``alias`` counts
    again: what the program needs beyond its arguments is about ``output - alias + temp``. On the CPU
    (jaxlib 0.10.2) ``peak_memory_in_bytes`` leaves the temps out: it is ``argument + output - alias``."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    found = {f: getattr(stats, f, None) for f in MEMORY_FIELDS}
    return {f: int(v) for f, v in found.items() if v is not None}


def gb(b: int | None) -> str:
    return "-" if b is None else f"{b / 1e9:.2f} GB"


def rounded(v: float | None) -> str:
    """A ratio to three decimals, or "-" where it was not measured."""
    return "-" if v is None else f"{v:.3f}"


def add_ratios(modes: dict[str, dict[str, Any]], reference: str, names: Any = None) -> None:
    """Add ``ratio_to_<reference>`` (median step), ``pipelined_ratio_to_<reference>``,
    ``memory_ratio_to_<reference>`` (peak bytes) and ``compile_ratio_to_<reference>`` (``compile_s``)
    to each mode of ``names`` (default: all), in place."""
    ref = modes.get(reference, {})
    for name in modes if names is None else names:
        r = modes.get(name, {})
        if r.get("compile_s") is not None and ref.get("compile_s"):
            r[f"compile_ratio_to_{reference}"] = r["compile_s"] / ref["compile_s"]
        if "median_ms" in r and "median_ms" in ref:
            r[f"ratio_to_{reference}"] = r["median_ms"] / ref["median_ms"]
            r[f"pipelined_ratio_to_{reference}"] = r["pipelined_ms"] / ref["pipelined_ms"]
            if r.get("peak_bytes") and ref.get("peak_bytes"):
                r[f"memory_ratio_to_{reference}"] = r["peak_bytes"] / ref["peak_bytes"]


def print_steps(modes: dict[str, dict[str, Any]], reference: str = "full") -> None:
    """A table of each mode's median and pipelined step and peak memory, with the ratios to ``reference``."""
    print(f"{'mode':<14} {'step ms':>9} {'ratio':>6} {'pipelined':>9} {'ratio':>6} {'peak memory':>12} {'ratio':>6}")
    for mode, r in modes.items():
        if "error" in r:
            print(f"{mode:<14} failed: {r['error'][:200]}")
            continue
        print(f"{mode:<14} {r['median_ms']:>9.2f} {rounded(r.get(f'ratio_to_{reference}')):>6} "
              f"{r['pipelined_ms']:>9.2f} {rounded(r.get(f'pipelined_ratio_to_{reference}')):>6} "
              f"{gb(r['peak_bytes']):>12} {rounded(r.get(f'memory_ratio_to_{reference}')):>6}")  # fmt: skip
