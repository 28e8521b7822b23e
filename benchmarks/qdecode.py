"""The fused dequantize-and-multiply kernel (`jaxlora._qmatmul`) against XLA on the probe's products (issue 25).

``L`` stacked ``(D, F)`` weights (default the 8B MLP shape, 32 × 4096 × 14336), one ``x (B, D) · W[l]``
per layer in a ``lax.scan`` (as ``benchmarks/nf4_fusion_probe.py``), for each batch ``B``:

* ``bf16``: the float weight, XLA's dot (run with ``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`` for
  cuBLAS, the fast skinny GEMM);
* ``int8_xla`` / ``nf4_xla`` / ``nf4nodq_xla``: jaxlora's quantized weights, dequantized then multiplied
  by XLA (`_qmatmul.reference`, what `jaxlora.apply` ran before the kernel);
* ``int8_kernel`` / ``nf4_kernel`` / ``nf4nodq_kernel``: the kernel (``nf4`` has double quantization),
  reading each layer's codes inside the stack as `jaxlora.apply` does; ``*_kernel_sliced``: the kernel
  on the scan's slice of the stack, which XLA copies out for the custom call;
  ``nf4_kernel_select``: NF4's lookup as 15 selects instead of a table load;
* ``nf4_dx_kernel`` / ``nf4_dx_xla``: the activation gradient ``g·Wᵀ`` (``g: (B, F)``);
* diagnostics, not products: ``*_kernel_read_only``, the kernel with the codes' integers standing for
  ``W`` (`_qmatmul.READ_ONLY`: its loads and sums without the dequantization); ``*_codes_xla``, XLA
  summing every code once (the stored layout's read ceiling);
* ``*_reduce_xla``: the product as XLA's multiply-and-sum over the contraction, the dequantization fused
  into the reduction's input (no dot, no float ``W`` in memory).

Each figure is printed with its bytes floor (the stored bytes at the copy bandwidth measured in the
same run), effective TB/s (stored bytes / time) and its error against the XLA form on the same
quantized weight (``rel_err``, max |Δ| / max |y|).

``--sweep`` / ``--sweep-preset h200`` (or ``fold``: the one-row kernel's) first time the kernel's settings
(``"bk,bn,warps,stages,programs,gemv,flags"``, `jaxlora._qmatmul.configure`: the variants ``one``,
``prefetchN``, ``tile``, ``reduce``, ``words``, ``tree``/``select``, ``hints``) on NF4 and int8 at each
of ``--sweep-batches``, each with its error against XLA's product;
it chooses the correct one fastest for NF4 at the first batch (the main table then runs with it),
reports the fastest for each format and batch, and prints ``{"chosen": setting}`` (also the JSON's
``sweep.chosen``, for ``benchmarks.qlora --qmatmul``). Usage::

    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false PYTHONPATH=. python -m benchmarks.qdecode --out r.json
    python -m benchmarks.qdecode --shape 2,256,256 --batches 1 --sweep 128,128,4,3,4096,1,reduce --copy-mib 8
    ... --modes nf4_kernel nf4_kernel_sliced --profile /tmp/q
    python -m benchmarks.trace_summary /tmp/q_*.trace.json.gz   # where each mode's time goes
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
from benchmarks import common
from jaxlora import _qmatmul
from jaxlora._quantized import dequantize_weight


def bench(f, *args, n: int = 20) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def copy_bandwidth(mib: int = 2048) -> float:
    """GB/s of a device copy of ``mib`` MiB read and as many written."""
    x = jnp.ones((mib << 18,), jnp.float32)
    return 2 * x.nbytes / bench(jax.jit(lambda x: x + 1), x) / 1e6


# `--sweep-preset h200`: settings "bk,bn,warps,stages,programs,gemv,flags" (`jaxlora._qmatmul.configure`)
PRESETS = {
    "h200": [
        "128,128,4,3,512,1,loop", "64,128,4,3,512,1,loop",  # the first default (PROGRAMS 512) and its runner-up
        # A, split: the contraction split until each program takes one step (no loop)
        "128,128,4,3,4096,1,loop", "64,128,4,3,4096,1,loop", "32,128,4,1,4096,1,loop", "128,128,4,3,2048,1,loop",
        "128,256,8,3,4096,1,loop",
        # B, reduce: the one-row path sums each step into a (1, width) accumulator
        "128,128,4,3,512,1,reduce", "64,128,4,3,512,1,reduce", "64,256,4,3,512,1,reduce", "32,256,4,3,1024,1,reduce",
        "128,128,4,3,4096,1,reduce", "64,128,2,3,1024,1,reduce", "32,128,1,4,512,1,reduce",
        "256,128,8,3,1024,1,reduce",
        # C, words: uint32 loads of the codes, unpacked by shifts (8 NF4 / 4 int8 column phases)
        "128,128,4,3,512,1,words", "64,128,4,3,512,1,words", "128,128,4,3,4096,1,words", "64,256,4,3,1024,1,words",
        "128,128,4,3,512,1,reduce+words", "64,256,4,3,512,1,reduce+words", "32,256,4,2,1024,1,reduce+words",
        "128,256,8,3,2048,1,reduce+words", "64,128,4,3,4096,1,reduce+words", "64,256,4,4,512,1,reduce+words+hints",
        "128,128,4,3,512,1,words+hints",
        # NF4's lookup as a tree of selects on the code's bits
        "128,128,4,3,512,1,tree", "64,128,4,3,512,1,reduce+tree", "64,256,4,3,512,1,reduce+words+tree",
        "128,128,4,3,4096,1,words+tree",
        # warps and stages around reduce+words
        "64,128,8,3,512,1,reduce+words", "64,128,2,2,512,1,reduce+words", "64,128,1,1,512,1,reduce+words",
        "128,128,8,4,1024,1,words",
        # tensor-core tiles for one row too; small and large tiles
        "64,128,4,3,512,0,loop", "64,128,4,3,512,0,words", "32,64,4,3,1024,1,loop", "256,256,8,3,512,1,reduce+words",
    ],
    # the one-row kernel with x and the block scales folded (`_qmatmul.FOLD`; "one": the numbers set its
    # GEMV_* alone): wide tiles, loads ahead (prefetch), warps, programs; the tiled path it replaced first
    "fold": [
        "128,128,4,3,4096,1,tile",
        "16,512,4,1,1024,1,one", "16,512,4,1,1024,1,one+prefetch0", "16,512,4,1,1024,1,one+prefetch2",
        "8,512,4,1,1024,1,one", "32,512,8,1,1024,1,one", "16,1024,8,1,1024,1,one", "8,1024,4,1,1024,1,one",
        "16,256,4,1,1024,1,one", "32,256,4,1,1024,1,one", "64,256,4,1,1024,1,one+prefetch0",
        "16,512,4,1,512,1,one", "16,512,4,1,2048,1,one", "16,512,4,1,4096,1,one", "16,512,8,1,1024,1,one",
        "16,512,2,1,1024,1,one", "16,512,4,3,1024,1,one", "16,512,4,1,1024,1,one+tree",
        "16,512,4,1,1024,1,one+readonly",
    ],
}  # fmt: skip
WRONG = 2e-2  # a row whose error against XLA's product exceeds this (bf16 outputs: ~4e-3) is never chosen


def sweep(settings: list[str], quant: dict, layer, batches: list[int], budget: float) -> dict:
    """Time NF4 and int8 at each of ``batches`` under each setting, with each product's error against
    XLA's (``rel_err``: max |Δ| / max |y|); choose the correct setting fastest for NF4 at the first batch,
    report the fastest for each format and batch, and leave the choice set. Settings past ``budget``
    seconds are recorded as skipped."""
    refs = {}
    for fmt in ("nf4", "int8"):
        for B in batches:
            x = jax.random.normal(jax.random.key(1), (B, quant[fmt].shape[1]), jnp.bfloat16)
            refs[fmt, B] = x, np.asarray(jax.jit(layer(fmt, "xla"))(x, quant[fmt]).astype(jnp.float32))
    rows, start = [], time.perf_counter()
    for setting in settings:
        row = {"setting": setting}
        rows.append(row)
        if time.perf_counter() - start > budget:
            row["skipped"] = f"the sweep's budget of {budget:.0f} s was spent"
            continue
        try:
            _qmatmul.configure(setting)
        except ValueError as e:
            row["error"] = str(e)
            continue
        for (fmt, B), (x, ref) in refs.items():
            try:
                g = jax.jit(layer(fmt, "kernel")).lower(x, quant[fmt]).compile()
                y = np.asarray(g(x, quant[fmt]).astype(jnp.float32))
                row[f"{fmt}_b{B}_ms"] = round(bench(g, x, quant[fmt], n=10), 3)
                row[f"{fmt}_b{B}_err"] = float(np.abs(y - ref).max() / (np.abs(ref).max() + 1e-30))
            except Exception as e:  # noqa: BLE001  (a setting that does not compile is recorded)
                row[f"{fmt}_b{B}_ms"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
    best = {}
    for fmt, B in refs:
        ok = [r for r in rows if isinstance(r.get(f"{fmt}_b{B}_ms"), float) and r[f"{fmt}_b{B}_err"] <= WRONG]
        if ok:
            r = min(ok, key=lambda r: r[f"{fmt}_b{B}_ms"])
            best[f"{fmt}_b{B}"] = {"setting": r["setting"], "ms": r[f"{fmt}_b{B}_ms"]}
    chosen = best.get(f"nf4_b{batches[0]}", {}).get("setting", "")
    _qmatmul.configure(chosen)  # "": the defaults
    out = {"rows": rows, "best": best, "chosen": chosen, "wrong_above": WRONG,
           "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    print(json.dumps({"best": best}), flush=True)
    print(json.dumps({"chosen": chosen}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="32,4096,14336", help="L,D,F")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 64])
    p.add_argument("--modes", nargs="+", default=None)
    p.add_argument("--programs", type=int, nargs="*", default=[], help="also time nf4_kernel with these PROGRAMS")
    p.add_argument(
        "--sweep",
        nargs="*",
        default=[],
        help="kernel settings bk,bn,warps,stages,programs[,gemv[,flags]] (jaxlora._qmatmul.configure) to try first",
    )
    p.add_argument("--sweep-preset", choices=sorted(PRESETS), default=None, help="a ready list of --sweep settings")
    p.add_argument("--sweep-batches", type=int, nargs="+", default=[1, 16], help="the first one chooses")
    p.add_argument("--sweep-budget", type=float, default=150, help="seconds; later settings are skipped")
    p.add_argument("--qmatmul", default="", help="a setting for the main table (after a sweep: its choice)")
    p.add_argument("--copy-mib", type=int, default=2048, help="MiB copied to measure the bandwidth")
    p.add_argument("--profile", default=None, help="3 calls traced and the HLO, at PREFIX_<mode>_b<B>")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    L, D, F = (int(v) for v in args.shape.split(","))
    interpret = jax.default_backend() != "gpu"  # a CPU smoke run: the kernel in the interpreter

    W = (jax.random.normal(jax.random.key(0), (L, D, F), jnp.float32) * 0.02).astype(jnp.bfloat16)
    quant = {
        "int8": jaxlora.quantize({"w": W}, "int8", targets="w")["w"],
        "nf4": jaxlora.quantize({"w": W}, "nf4", targets="w")["w"],
        "nf4nodq": jaxlora.quantize({"w": W}, "nf4", targets="w", double_quant=False)["w"],
    }

    def scan(body, xs):
        return jax.lax.scan(lambda c, w: (c, body(w)), 0, xs)[1].sum(0)

    def layer(fmt, how, transpose=False, lookup=None, programs=None, sliced=False, read_only=False):
        """One product per layer: XLA's on the scan's slice, or the kernel reading each layer inside the
        stack (``layer=i``, as `jaxlora.apply` runs it) or, ``sliced``, on the slice (the copy it costs)."""

        def run(x, q):
            def one(q, i=None):
                if how == "xla":
                    w = dequantize_weight(q, x.dtype)
                    return jnp.dot(x, w.T if transpose else w, preferred_element_type=jnp.float32).astype(x.dtype)
                old = _qmatmul.PROGRAMS, _qmatmul.READ_ONLY
                _qmatmul.PROGRAMS, _qmatmul.READ_ONLY = programs or old[0], read_only or old[1]
                try:
                    return _qmatmul.matmul(x, q, layer=i, transpose=transpose, lookup=lookup, interpret=interpret)
                finally:
                    _qmatmul.PROGRAMS, _qmatmul.READ_ONLY = old

            if how == "xla" or sliced:
                return scan(one, q)
            return scan(lambda i: one(q, i), jnp.arange(q.shape[0], dtype=jnp.int32))

        return run

    def reduce_xla(x, q):
        """x·W as XLA's multiply-and-sum over the contraction (no dot): the dequantization fuses into the
        reduction's input, so the float W is never written. On the H200 it lost to the kernel 2.5-12x at
        1-16 rows (benchmarks/results/qdecode_h200_summed.json), so the library does not offer it."""

        def one(w):
            w = dequantize_weight(w, jnp.float32)
            if x.dtype != jnp.float32:  # W rounded to x's dtype, as XLA's path multiplies it
                info = jnp.finfo(x.dtype)
                w = jax.lax.reduce_precision(w, exponent_bits=info.nexp, mantissa_bits=info.nmant)
            return jnp.sum(x.astype(jnp.float32)[:, :, None] * w[None], axis=1).astype(x.dtype)

        return scan(one, q)

    def codes_read(x, q):  # XLA reading every code once (a sum), the bytes' ceiling for this layout
        return scan(lambda c: jnp.sum(c.astype(jnp.int32)).astype(x.dtype).reshape(1, 1), q.codes)

    modes = {"bf16": (lambda x, w: scan(lambda w: x @ w, w), W, W.nbytes, "bf16", False)}
    for fmt in ("int8", "nf4", "nf4nodq"):
        q = quant[fmt]
        modes[f"{fmt}_xla"] = (layer(fmt, "xla"), q, q.nbytes, "bf16", False)
        modes[f"{fmt}_kernel"] = (layer(fmt, "kernel"), q, q.nbytes, f"{fmt}_xla", False)
        if fmt != "nf4nodq":
            modes[f"{fmt}_kernel_sliced"] = (layer(fmt, "kernel", sliced=True), q, q.nbytes, f"{fmt}_xla", False)
            modes[f"{fmt}_kernel_read_only"] = (layer(fmt, "kernel", read_only=True), q, q.nbytes, None, False)
        modes[f"{fmt}_codes_xla"] = (codes_read, q, q.nbytes, None, False)
        modes[f"{fmt}_reduce_xla"] = (reduce_xla, q, q.nbytes, f"{fmt}_xla", False)
    q = quant["nf4"]
    modes["nf4_kernel_select"] = (layer("nf4", "kernel", lookup="select"), q, q.nbytes, "nf4_xla", False)
    for n in args.programs:
        modes[f"nf4_kernel_p{n}"] = (layer("nf4", "kernel", programs=n), q, q.nbytes, "nf4_xla", False)
    modes["nf4_dx_xla"] = (layer("nf4", "xla", transpose=True), q, q.nbytes, None, True)
    modes["nf4_dx_kernel"] = (layer("nf4", "kernel", transpose=True), q, q.nbytes, "nf4_dx_xla", True)
    wanted = args.modes or list(modes)

    bw = copy_bandwidth(args.copy_mib)
    _qmatmul.configure(args.qmatmul)
    settings = args.sweep + PRESETS.get(args.sweep_preset, [])
    tuned = sweep(settings, quant, layer, args.sweep_batches, args.sweep_budget) if settings else None
    res = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "shape": [L, D, F],
        "copy_GBps": round(bw, 1),
        "qmatmul": _qmatmul.switches(),
        "qmatmul_setting": tuned["chosen"] if tuned else args.qmatmul,
        "sweep": tuned,
        "results": [],
    }  # fmt: skip
    for B in args.batches:
        outs = {}
        for name in wanted:
            f, w, nbytes, against, transpose = modes[name]
            x = jax.random.normal(jax.random.key(1), (B, F if transpose else D), jnp.bfloat16)
            t0 = time.perf_counter()
            try:
                g = jax.jit(f).lower(x, w).compile()  # every array an argument: no captured constants
                compile_s = time.perf_counter() - t0
                y = np.asarray(g(x, w).astype(jnp.float32))
                ms = bench(g, x, w)
                if args.profile:  # where the time goes: `python -m benchmarks.trace_summary PREFIX_*.trace.json.gz`
                    prefix = f"{args.profile}_{name}_b{B}"
                    with open(prefix + ".hlo.txt", "w") as fh:
                        fh.write(g.as_text())
                    common.profile(lambda g=g, x=x, w=w: jax.block_until_ready(g(x, w)), prefix)
            except Exception as e:  # noqa: BLE001  (a failing mode is recorded, the others still run)
                row = {"mode": name, "batch": B, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                res["results"].append(row)
                print(json.dumps(row), flush=True)
                continue
            outs[name] = y
            ref = outs.get(against)
            err = None if ref is None else float(np.abs(y - ref).max() / (np.abs(ref).max() + 1e-30))
            floor = nbytes / bw / 1e6
            row = {
                "mode": name,
                "batch": B,
                "ms": round(ms, 3),
                "floor_ms": round(floor, 3),
                "x_floor": round(ms / floor, 2),
                "TBps": round(nbytes / ms / 1e9, 3),
                "vs_bf16": None,
                "rel_err": err,
                "against": against,
                "compile_s": round(compile_s, 1),
            }
            res["results"].append(row)
        bf = next((r["ms"] for r in res["results"] if r.get("mode") == "bf16" and r["batch"] == B), None)
        for r in res["results"]:
            if r["batch"] == B and "ms" in r and bf:
                r["vs_bf16"] = round(bf / r["ms"], 2)  # > 1: faster than bf16
                print(json.dumps(r), flush=True)
    print(json.dumps({k: v for k, v in res.items() if k != "results"}))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
