"""What XLA fuses into a skinny GEMM when the weight is dequantized in the dot's operand (issue 25, step 1).

Decode-shaped products on the 8B MLP shape: ``L`` stacked ``(D, F)`` weights, one ``x (B, D) @ W[l]`` per
layer in a ``lax.scan``, the same structure as ``shared/probes/qdecode_probe.py``. Each mode writes the
dequantization inside the scan body, so XLA may fuse it into the GEMM's operand (a Triton GEMM fusion) or
materialise the float weight first; the time says which. Modes:

* ``bf16``: the float weight (reference; its bytes floor is ``2·L·D·F``).
* ``int8``: int8 codes, per-column scale applied after the dot (``x @ codes.astype(bf16) * s``).
* ``nf4_take``: jaxlora's NF4 layout and dequantization (a table lookup by gather), as `jaxlora.apply`
  runs it today.
* ``nf4_select``: the same codes and layout, the lookup written as a 16-way select (elementwise).
* ``nf4_split``: a layout for fusion: the high nibbles hold rows ``[0, D/2)``, the low nibbles rows
  ``[D/2, D)``, so each half dequantizes elementwise from one ``(D/2, F)`` code array; two dots summed.
* ``nf4_split_bf16``: as ``nf4_split`` with the absmax multiply in bfloat16 (no float32 temporaries).

Each figure is printed beside its bytes floor at the copy bandwidth measured in the same run. Run it once
per XLA flag setting (``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`` routes dots to cuBLAS, which
cannot fuse an operand's dequantization). Usage::

    PYTHONPATH=. python -m benchmarks.nf4_fusion_probe --batches 1 8 64 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlora
from jaxlora._quantized import NF4, dequantize_weight


def bench(f, *args, n: int = 20) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def copy_bandwidth() -> float:
    """GB/s of a device copy of 4 GiB (read + write), the bytes floor's denominator."""
    x = jnp.ones((1 << 29,), jnp.float32)
    f = jax.jit(lambda x: x + 1)
    ms = bench(f, x)
    return 2 * x.nbytes / ms / 1e6


def select16(idx: jax.Array, dtype) -> jax.Array:
    """``NF4[idx]`` as a chain of selects (elementwise, fusable), in ``dtype``."""
    out = jnp.zeros(idx.shape, dtype)
    for k, v in enumerate(NF4.tolist()):
        out = jnp.where(idx == k, jnp.asarray(v, dtype), out)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="32,4096,14336", help="L,D,F")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--modes", nargs="+", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    L, D, F = (int(v) for v in args.shape.split(","))
    block = 64

    W = (jax.random.normal(jax.random.key(0), (L, D, F), jnp.float32) * 0.02).astype(jnp.bfloat16)
    h = D // 2
    wanted = args.modes or ["bf16", "int8", "nf4_take", "nf4_select", "nf4_split", "nf4_split_bf16"]

    def scan(body, xs):
        return jax.lax.scan(lambda c, w: (c, body(w)), 0, xs)[1].sum(0)

    def deq_split(codes, am, dtype):
        hi, lo = codes >> 4, codes & 15
        am = am.astype(dtype)

        def half(i, a):
            v = select16(i, dtype).reshape(h, F // block, block) * a[..., None]
            return v.reshape(h, F)

        return half(hi, am[:h]), half(lo, am[h:])

    def split_layout():
        """Rows [0, D/2) in the high nibble, rows [D/2, D) in the low; absmax per 64 along F (one layer at a time)."""

        def one(w):
            wf = w.astype(jnp.float32).reshape(D, F // block, block)
            amax = jnp.max(jnp.abs(wf), axis=-1)
            normed = wf / jnp.where(amax == 0, 1, amax)[..., None]
            mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
            idx = jnp.searchsorted(mids, normed.reshape(-1), side="right").astype(jnp.uint8).reshape(D, F)
            return (idx[:h] << 4) | idx[h:], amax

        return jax.jit(lambda W: jax.lax.map(one, W))(W)

    modes, nbytes = {}, {}
    if "bf16" in wanted:
        modes["bf16"] = (lambda x, W: scan(lambda w: x @ w, W), (W,))
        nbytes["bf16"] = W.nbytes
    if "int8" in wanted:
        s8 = jnp.max(jnp.abs(W.astype(jnp.float32)), axis=1, keepdims=True) / 127
        c8 = jnp.clip(jnp.round(W.astype(jnp.float32) / s8), -127, 127).astype(jnp.int8)
        modes["int8"] = (
            lambda x, *cs: scan(lambda cs: (x @ cs[0].astype(jnp.bfloat16)) * cs[1][0].astype(jnp.bfloat16), cs),
            (c8, s8),
        )
        nbytes["int8"] = c8.nbytes + s8.nbytes
    if {"nf4_take", "nf4_select"} & set(wanted):
        q = jaxlora.quantize({"w": W}, "nf4", targets=["w"], double_quant=False)["w"]  # absmax float32 per block
        modes["nf4_take"] = (
            lambda x, *cs: scan(
                lambda cs: (
                    x @ dequantize_weight(jaxlora.Quantized(cs[0], cs[1], format="nf4", inner=(D, F), dtype=W.dtype))
                ),
                cs,
            ),
            (q.codes, q.scale),
        )
        modes["nf4_select"] = (
            lambda x, *cs: scan(
                lambda cs: (
                    x
                    @ (
                        select16(jnp.stack([cs[0] >> 4, cs[0] & 15], -1).reshape(-1, block), jnp.float32)
                        * cs[1][:, None]
                    )
                    .reshape(D, F)
                    .astype(jnp.bfloat16)
                ),
                cs,
            ),
            (q.codes, q.scale),
        )
        nbytes["nf4_take"] = nbytes["nf4_select"] = q.codes.nbytes + q.scale.nbytes
    if {"nf4_split", "nf4_split_bf16"} & set(wanted):
        split_codes, split_amax = split_layout()
        modes["nf4_split"] = (
            lambda x, *cs: scan(
                lambda cs: sum(
                    xi @ wi.astype(jnp.bfloat16)
                    for xi, wi in zip((x[:, :h], x[:, h:]), deq_split(cs[0], cs[1], jnp.float32))
                ),
                cs,
            ),
            (split_codes, split_amax),
        )
        amax16 = split_amax.astype(jnp.bfloat16)
        modes["nf4_split_bf16"] = (
            lambda x, *cs: scan(
                lambda cs: sum(xi @ wi for xi, wi in zip((x[:, :h], x[:, h:]), deq_split(cs[0], cs[1], jnp.bfloat16))),
                cs,
            ),
            (split_codes, amax16),
        )
        nbytes["nf4_split"] = split_codes.nbytes + split_amax.nbytes
        nbytes["nf4_split_bf16"] = split_codes.nbytes + amax16.nbytes
    bw = copy_bandwidth()
    res = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "shape": [L, D, F],
        "copy_GBps": round(bw, 1),
        "results": [],
    }
    ref = {}
    for B in args.batches:
        x = jax.random.normal(jax.random.key(1), (B, D), jnp.bfloat16)
        for name, (f, arrays) in modes.items():
            if name not in wanted:
                continue
            t0 = time.perf_counter()
            g = jax.jit(f).lower(x, *arrays).compile()  # every array an argument: no captured constants
            compile_s = time.perf_counter() - t0
            y = np.asarray(g(x, *arrays).astype(jnp.float32))
            if name == "bf16":
                ref[B] = y
            err = float(np.abs(y - ref[B]).max() / (np.abs(ref[B]).max() + 1e-30)) if B in ref else None
            ms = bench(g, x, *arrays)
            floor = nbytes[name] / bw / 1e6
            row = {
                "mode": name,
                "batch": B,
                "ms": round(ms, 3),
                "floor_ms": round(floor, 3),
                "x_floor": round(ms / floor, 2),
                "GBps": round(nbytes[name] / ms / 1e6, 1),
                "rel_err_vs_bf16": err,
                "compile_s": round(compile_s, 1),
            }
            res["results"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({k: v for k, v in res.items() if k != "results"}))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
