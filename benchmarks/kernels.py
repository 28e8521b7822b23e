"""The fused LoRA GEMM (`jaxlora._fused`) against the library GEMM and XLA's LoRA forms, per layer shape.

For each Dense shape of a config's training batch (``m`` tokens, ``k → n``), in one process:

  gemm_xla        ``x·W`` through XLA (cuBLAS on a GPU): the yardstick.
  gemm_pallas     the same GEMM as the Pallas kernel, for each tile configuration tried; a fused
                  kernel can only pay where this one is close to ``gemm_xla``.
  fused_pallas    ``x·W + t·b`` in the kernel (the rank-``r`` epilogue), best tiles of ``gemm_pallas``.
  fwd_<form>      the LoRA layer op's value (`jaxlora._matmul.lora_op`) as jaxlora computes it:
                  ``auto`` (its own choice), ``factored`` (``x·W + (x·a)·b``), ``fused``.
  step_<form>     the op's value and its gradients for ``x``, ``a`` and ``b`` (a training step's share).

Each figure is one op's time: ten independent copies run in one jitted call (their own inputs, so
nothing is shared or merged), the median of ``--repeats`` calls divided by ten. Before timing, every
fused form is checked against XLA's within bfloat16's tolerance. Run
``python -m benchmarks.kernels --config A --out results.json``.
"""

from __future__ import annotations

import argparse
import time

COPIES = 10
FORMS = {"auto": (None, None), "factored": (False, False), "fused": (None, True)}  # (_MERGED, _KERNEL)
TILES = [  # (bm, bn, bk), warps, stages
    ((128, 128, 64), 4, 3),
    ((128, 128, 64), 8, 3),
    ((128, 256, 64), 8, 3),
    ((256, 128, 64), 8, 3),
    ((128, 128, 32), 4, 4),
    ((64, 128, 64), 4, 4),
    ((128, 64, 64), 4, 4),
    ((64, 64, 64), 4, 3),
]


def _time(fn, args, repeats: int) -> float:
    """Milliseconds per op: the median of ``repeats`` calls of ``fn`` (``COPIES`` ops each) / ``COPIES``."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3 / COPIES)
    return sorted(times)[len(times) // 2]


def _shapes(cfg) -> list[tuple[str, int, int]]:
    d, kv, ff = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.ff
    out = [("q,o", d, d), ("up", d, ff), ("down", ff, d)]
    if kv != d:
        out.insert(1, ("k,v", d, kv))
    return out


def measure(cfg, rank: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from jaxlora import _fused, _matmul

    m, dtype = cfg.batch * cfg.seq, jnp.dtype(cfg.dtype)
    results = {}
    for name, k, n in _shapes(cfg):
        keys = jax.random.split(jax.random.key(k * 7 + n), 4)
        xs = [jax.random.normal(jax.random.fold_in(keys[0], i), (m, k), dtype) for i in range(COPIES)]
        ws = [jax.random.normal(jax.random.fold_in(keys[1], i), (k, n), dtype) / k**0.5 for i in range(COPIES)]
        a = [jax.random.normal(jax.random.fold_in(keys[2], i), (k, rank), jnp.float32) / k**0.5 for i in range(COPIES)]
        b = [jax.random.normal(jax.random.fold_in(keys[3], i), (rank, n), jnp.float32) for i in range(COPIES)]
        ts = [(x @ f.astype(dtype)) for x, f in zip(xs, a)]
        row = {"k": k, "n": n, "m": m, "rank": rank, "gemm_pallas": {}}
        many = lambda op: jax.jit(lambda *args: [op(*z) for z in zip(*args)])  # noqa: E731
        row["gemm_xla"] = _time(many(lambda x, w: x @ w), (xs, ws), repeats)
        best = None
        for block, warps, stages in TILES:
            if not _fused.covers(m, k, n, rank, block):
                continue
            label = f"{block[0]}x{block[1]}x{block[2]}/w{warps}/s{stages}"
            op = lambda x, w, block=block, warps=warps, stages=stages: _fused.matmul(  # noqa: E731
                x, w, None, None, block=block, warps=warps, stages=stages
            )
            try:
                ms = _time(many(op), (xs, ws), repeats)
            except Exception as e:  # a tile the Triton lowering rejects (shared memory, registers)
                row["gemm_pallas"][label] = f"failed: {type(e).__name__}: {str(e)[:160]}"
                continue
            row["gemm_pallas"][label] = ms
            if best is None or ms < best[0]:
                best = (ms, block, warps, stages)
        if best is None:
            results[name] = row
            continue
        row["best_tiles"] = f"{best[1]}, warps {best[2]}, stages {best[3]}"
        row["gemm_pallas_best_over_xla"] = best[0] / row["gemm_xla"]
        _fused.BLOCK, _fused.WARPS, _fused.STAGES = best[1], best[2], best[3]
        fused = lambda x, w, t, f: _fused.matmul(x, w, t, f)  # noqa: E731
        want = np.asarray(_fused.reference(xs[0], ws[0], ts[0], b[0].astype(dtype)), np.float32)
        got = np.asarray(many(fused)(xs[:1], ws[:1], ts[:1], [f.astype(dtype) for f in b[:1]])[0], np.float32)
        row["fused_max_abs_err"] = float(np.max(np.abs(got - want)))
        row["fused_pallas"] = _time(many(fused), (xs, ws, ts, [f.astype(dtype) for f in b]), repeats)
        row["fused_xla"] = _time(many(_fused.reference), (xs, ws, ts, [f.astype(dtype) for f in b]), repeats)

        def layer(x, w, fa, fb):
            dims = (((1,), (0,)), ((), ()))
            dot = lambda u, v: lax.dot_general(u, v, dims)  # noqa: E731
            dd = lambda u, v: jnp.dot(u, v)  # noqa: E731
            return _matmul.lora_op(x, w, fa, fb, 2.0, base=dot, first_op=dd, second_op=dd, delta_op=dd,
                                   side_by_side=True)  # fmt: skip

        def step(x, w, fa, fb):
            y, pull = jax.vjp(lambda x, fa, fb: layer(x, w, fa, fb), x, fa, fb)
            return y, pull(jnp.ones_like(y))

        for form, (merged, kernel) in FORMS.items():
            _matmul._MERGED, _fused._KERNEL = merged, kernel
            row[f"fwd_{form}"] = _time(many(layer), (xs, ws, a, b), repeats)
            row[f"step_{form}"] = _time(many(step), (xs, ws, a, b), repeats)
        _matmul._MERGED, _fused._KERNEL = None, None
        for form in ("factored", "fused"):
            row[f"fwd_{form}_over_auto"] = row[f"fwd_{form}"] / row["fwd_auto"]
            row[f"step_{form}_over_auto"] = row[f"step_{form}"] / row["step_auto"]
        results[name] = row
        print(f"{name:>6} {m}x{k}->{n}: gemm xla {row['gemm_xla']:.4f} ms, pallas best {best[0]:.4f} "
              f"({row['gemm_pallas_best_over_xla']:.3f}x, {row['best_tiles']}); fused {row['fused_pallas']:.4f} "
              f"vs xla {row['fused_xla']:.4f}; layer fwd auto/factored/fused {row['fwd_auto']:.4f}/"
              f"{row['fwd_factored']:.4f}/{row['fwd_fused']:.4f}; step {row['step_auto']:.4f}/"
              f"{row['step_factored']:.4f}/{row['step_fused']:.4f}", flush=True)  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="A")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--override", default="{}", help="JSON of ModelConfig fields to change")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from . import common, models

    cfg = models.configure(a.config, override=a.override)
    result = {**common.environment(), "benchmark": "kernels", "config_name": a.config, "rank": a.rank,
              "copies_per_call": COPIES, "repeats": a.repeats, "tiles_tried": [str(t) for t in TILES]}  # fmt: skip
    result["shapes"] = measure(cfg, a.rank, a.repeats)
    common.write(result, a.out)
    return result


if __name__ == "__main__":
    main()
