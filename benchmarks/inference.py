"""Jitted inference (a forward pass to logits) with LoRA unmerged against merged, and merge throughput.

Modes, each in its own process:
  merged    the plain model on ``jaxlora.merge(params, lora)`` (merged once, outside the timing).
  unmerged  ``jaxlora.apply(model.apply, params, lora, tokens)``: the factored path.
  unmerged_factored  the same with the transient ``W + ΔW`` form switched off: ``x·W + (x·A)·B``.
  unmerged_fused  the same with every Dense layer on the fused Pallas GEMM (`jaxlora._fused`, a GPU).
  merge     ``jax.jit(jaxlora.merge)`` on the whole model (B random, so nothing folds away).
  merge_donated  the same with ``donate_argnums=0`` (the weights updated in place).
  copy      one copy of the same targeted weights, jitted: the memory-bandwidth yardstick for merge.

Run ``python -m benchmarks.inference --config A``; it prints a table and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

MODES = ("merged", "unmerged", "unmerged_factored", "unmerged_fused", "merge", "merge_donated", "copy")


def _worker(a: argparse.Namespace) -> dict:
    """One mode, timed; jaxlora's private switches that an ablation flips are restored afterwards."""
    from . import common

    with common.switches_restored():
        return _measure(a)


def _measure(a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxlora

    from . import common, models

    cfg = dataclasses.replace(models.CONFIGS[a.config], remat=False, scan=a.scan, **json.loads(a.override))
    tokens = models.tokens_for(cfg)
    model = models.Decoder(cfg)
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    targets = tuple(a.targets.split(",")) if a.targets else models.targets(cfg)
    lora_cfg = jaxlora.LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=targets, dtype=a.lora_dtype)
    lora = jaxlora.init(jax.random.key(1), params, lora_cfg, fn=model.apply, args=(tokens,))
    lora = {
        k: dataclasses.replace(f, b=0.01 * jax.random.normal(jax.random.key(i), f.b.shape, f.b.dtype))
        for i, (k, f) in enumerate(lora.items())
    }  # a trained adapter: B is not zero
    t0 = time.perf_counter()
    state: list = [None]
    if a.mode == "merged":
        merged = jax.jit(jaxlora.merge)(params, lora)
        fwd = jax.jit(model.apply)
        run = lambda: state.__setitem__(0, fwd(merged, tokens))  # noqa: E731
    elif a.mode in ("unmerged", "unmerged_factored", "unmerged_fused"):
        from jaxlora import _fused, _matmul

        _matmul._MERGED = False if a.mode == "unmerged_factored" else None
        _fused._KERNEL = True if a.mode == "unmerged_fused" else None
        fwd = jax.jit(lambda p, l, t: jaxlora.apply(model.apply, p, l, t))
        run = lambda: state.__setitem__(0, fwd(params, lora, tokens))  # noqa: E731
    elif a.mode == "merge":
        merge = jax.jit(jaxlora.merge)
        run = lambda: state.__setitem__(0, merge(params, lora))  # noqa: E731
    elif a.mode == "merge_donated":
        merge = jax.jit(jaxlora.merge, donate_argnums=0)
        state[0] = params
        run = lambda: state.__setitem__(0, merge(state[0], lora))  # noqa: E731
    elif a.mode == "copy":
        leaves = [leaf for path, leaf in _targeted(params, lora)]
        copy = jax.jit(lambda ws: [jnp.copy(w) for w in ws])
        run = lambda: state.__setitem__(0, copy(leaves))  # noqa: E731
    else:
        raise ValueError(f"unknown mode {a.mode!r}; expected one of {MODES}")

    def blocking():
        run()
        jax.block_until_ready(state[0])

    blocking()
    compile_s = time.perf_counter() - t0
    for _ in range(a.warmup):
        blocking()
    common.sync_point()
    ms = models.timeit(blocking, a.steps, 1)
    piped = models.timeit_pipelined(run, lambda: jax.block_until_ready(state[0]), a.steps, 4)
    out = {"mode": a.mode, "median_ms": models.median(ms), "min_ms": min(ms), "step_ms": [round(x, 3) for x in ms]}
    out["pipelined_ms"] = models.median(piped)
    out.update(peak_bytes=models.peak_bytes(), compile_s=round(compile_s, 1))
    if a.mode in ("merge", "merge_donated", "copy"):
        nbytes = sum(leaf.size * leaf.dtype.itemsize for _, leaf in _targeted(params, lora))
        out["weight_bytes"] = nbytes
        out["gb_per_s_read_plus_write"] = 2 * nbytes / (out["median_ms"] / 1e3) / 1e9
    return out


def _targeted(params, lora):
    from jaxlora._tree import weights

    ws = weights(params)
    return [(path, ws[path].leaf) for path in lora]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="A")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mode", default="merged")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="", help="comma-separated LoRA targets (default: every projection)")
    p.add_argument("--lora-dtype", default="float32", help="dtype of A and B")
    p.add_argument("--scan", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--override", default="{}")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=None)
    p.add_argument("--parallel", action="store_true", help="compile all modes at once, then time them one by one")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a)), flush=True)
        return {}

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # this process only reads the device name
    from . import common, models

    cfg = dataclasses.replace(models.CONFIGS[a.config], remat=False, scan=a.scan, **json.loads(a.override))
    flags = ["--config", a.config, "--rank", str(a.rank), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    flags += ["--targets", a.targets, "--lora-dtype", a.lora_dtype]
    flags += ["--override", a.override] + (["--scan"] if a.scan else [])
    result = {
        **common.environment(),
        "benchmark": "inference",
        "config_name": a.config,
        "config": dataclasses.asdict(cfg),
        "lora": {
            "rank": a.rank,
            "dtype": a.lora_dtype,
            "targets": a.targets.split(",") if a.targets else list(models.targets(cfg)),
        },
        "modes": {},
    }
    jobs = {mode: ["--mode", mode, *flags] for mode in a.modes.split(",")}
    result["modes"] = common.run_workers("benchmarks.inference", jobs, a.timeout, a.parallel)
    m = result["modes"]
    ok = lambda k: "median_ms" in m.get(k, {})  # noqa: E731
    for k in ("unmerged", "unmerged_factored", "unmerged_fused"):
        if ok("merged") and ok(k):
            result[f"{k}_over_merged"] = m[k]["median_ms"] / m["merged"]["median_ms"]
            result[f"{k}_over_merged_pipelined"] = m[k]["pipelined_ms"] / m["merged"]["pipelined_ms"]
    for k in ("merge", "merge_donated"):
        if ok(k) and ok("copy"):
            result[f"{k}_over_copy"] = m[k]["median_ms"] / m["copy"]["median_ms"]
    print(
        f"\n{result['device']}  config {a.config}{' scan' if a.scan else ''}  "
        f"batch {cfg.batch}x{cfg.seq}  rank {a.rank}"
    )
    print(f"{'mode':<18} {'ms':>9} {'pipelined':>9} {'peak memory':>12}")
    for mode, r in m.items():
        if "error" in r:
            print(f"{mode:<18} failed: {r['error'][:200]}")
        else:
            print(f"{mode:<18} {r['median_ms']:>9.3f} {r['pipelined_ms']:>9.3f} {common.gb(r['peak_bytes']):>12}")
    for k in sorted(k for k in result if "_over_" in k):
        if k in result:
            print(f"{k}: {result[k]:.3f}")
    common.write(result, a.out)
    return result


if __name__ == "__main__":
    main()
