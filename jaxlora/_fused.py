"""A fused LoRA GEMM (Pallas): ``x·W + t·b`` in one kernel, the rank-``r`` product as its epilogue.

LoRAFusion's split (arXiv 2510.00206): with ``t = x·a`` formed first (a small product), the forward
``y = x·W + t·b`` and the input gradient ``dx = g·Wᵀ + dt·aᵀ`` are each one GEMM whose output tile
adds a rank-``r`` product before it is written, so ``W`` is read as it is (no ``W + ΔW``, no ``ΔW``)
and the LoRA term costs no extra pass over the output. `matmul` is that kernel, written with Pallas
for its Triton lowering on a GPU; `reference` is the same math in XLA, the fallback everywhere else.

`chosen` decides, from static shapes and the backend only, whether `jaxlora._matmul` uses the kernel:
never on a CPU or TPU, never for shapes the tiles do not cover, and on a GPU only where it measured
faster in a whole step. On an H200 it did not (docs/design.md gives the figures), so XLA is the default.

Example:
  >>> import jax.numpy as jnp
  >>> x, w = jnp.ones((32, 32)), jnp.ones((32, 32))
  >>> t, b = jnp.ones((32, 16)), jnp.ones((16, 32))
  >>> float(matmul(x, w, t, b, block=(16, 16, 16))[0, 0])  # 32 + 16, in the interpreter on a CPU
  48.0
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# The tiles `matmul` uses unless told: (rows of x, columns of W, the contracted step), warps, stages.
BLOCK = (128, 128, 64)
WARPS, STAGES = 8, 3
# None: choose by `chosen`'s rule; True/False force the kernel on (where it covers the shapes) or off.
_KERNEL: bool | None = None


def reference(x: Array, w: Array, t: Array, b: Array, *, transpose_w: bool = False) -> Array:
    """``x·W + t·b`` (``x·Wᵀ + t·b`` with ``transpose_w``) in XLA, accumulated in float32."""
    dims = (((1,), (1 if transpose_w else 0,)), ((), ()))
    y = lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
    return (y + jnp.dot(t, b, preferred_element_type=jnp.float32)).astype(x.dtype)


def covers(m: int, k: int, n: int, r: int, block: tuple[int, int, int] | None = None) -> bool:
    """Whether the tiles (default `BLOCK`) divide ``x: (m, k)``, ``W: (k, n)`` and a rank ``r`` the kernel can use."""
    bm, bn, bk = block or BLOCK
    return m % bm == 0 and n % bn == 0 and k % bk == 0 and r % 16 == 0 and 16 <= r <= 128


def chosen(x: Array, w: Array, rank: int) -> bool:
    """Whether `jaxlora._matmul` uses the kernel for ``x: (..., k)`` against a 2-D ``w: (k, n)``.

    Only on a GPU, for 16-bit floating ``x`` and ``w`` of one dtype, shapes `covers` both ways (the
    forward and ``dx``), and where it pays (`_PAYS`). On an H200 each layer alone was 11-16 % faster
    fused (``benchmarks/kernels.py``), but config A's training step was 1.9 % slower (XLA merges the
    products that share an input, which a custom call cannot join), so `_PAYS` is False: XLA's forms.
    `_KERNEL` True or False forces the kernel on (where it fits) or off.
    """
    m = x.size // x.shape[-1]
    fits = (
        x.dtype == w.dtype
        and x.dtype in (jnp.bfloat16, jnp.float16)
        and w.ndim == 2
        and covers(m, w.shape[0], w.shape[1], rank)
        and covers(m, w.shape[1], w.shape[0], rank)  # the backward pass's dx = g·Wᵀ + dt·aᵀ
    )
    if _KERNEL is not None:
        return _KERNEL and fits
    return fits and jax.default_backend() == "gpu" and _PAYS


_PAYS = False  # measured: benchmarks/results/kernels_A_h200.json and train_A_fused_h200.json (see `chosen`)


def matmul(
    x: Array,
    w: Array,
    t: Array | None,
    b: Array | None,
    *,
    transpose_w: bool = False,
    block: tuple[int, int, int] | None = None,
    warps: int | None = None,
    stages: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """``x·W + t·b`` in one Pallas kernel: ``x: (m, k)``, ``W: (k, n)`` (``(n, k)`` with ``transpose_w``),
    ``t: (m, r)``, ``b: (r, n)``; accumulated in float32, returned in ``x``'s dtype.

    Each program computes one ``(bm, bn)`` tile of the output: the ``k / bk`` steps of ``x·W``, then
    ``t·b`` for the same rows and columns, added before the tile is written (``t`` and ``b`` None: the
    plain GEMM, which ``benchmarks/kernels.py`` holds against the library's). ``block``, ``warps`` and
    ``stages`` default to `BLOCK`, `WARPS` and `STAGES`; ``interpret`` (default: unless on a GPU) runs
    the kernel in Pallas's interpreter, as the CPU tests do. The shapes must satisfy `covers`.
    """
    from jax.experimental import pallas as pl

    block, warps, stages = block or BLOCK, warps or WARPS, stages or STAGES
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    m, k = x.shape
    n = w.shape[0] if transpose_w else w.shape[1]
    r = 16 if t is None else t.shape[1]
    bm, bn, bk = block
    if not covers(m, k, n, r, block):
        raise ValueError(
            f"the fused LoRA kernel's tiles {block} do not divide x {x.shape}, W {w.shape} with rank {r}; "
            "use `reference` (jaxlora falls back to it by itself) or tiles that divide the shapes"
        )
    w_spec = (
        pl.BlockSpec(block_shape=(bn, k), index_map=lambda i, j: (j, 0))
        if transpose_w
        else pl.BlockSpec(block_shape=(k, bn), index_map=lambda i, j: (0, j))
    )
    specs = [pl.BlockSpec(block_shape=(bm, k), index_map=lambda i, j: (i, 0)), w_spec]
    operands = [x, w]
    if t is not None:
        specs += [
            pl.BlockSpec(block_shape=(bm, r), index_map=lambda i, j: (i, 0)),
            pl.BlockSpec(block_shape=(r, bn), index_map=lambda i, j: (0, j)),
        ]
        operands += [t.astype(x.dtype), b.astype(x.dtype)]
    kernel = functools.partial(_tile, steps=k // bk, bk=bk, transpose_w=transpose_w, epilogue=t is not None)
    params = {} if interpret else {"compiler_params": _compiler_params(warps, stages)}
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(m // bm, n // bn),
        in_specs=specs,
        out_specs=pl.BlockSpec(block_shape=(bm, bn), index_map=lambda i, j: (i, j)),
        interpret=interpret,
        **params,
    )(*operands)


def _tile(*refs, steps: int, bk: int, transpose_w: bool, epilogue: bool):
    from jax.experimental import pallas as pl

    x_ref, w_ref, *rank_refs, o_ref = refs
    f32 = jnp.float32

    def step(s, acc):
        xs = x_ref[:, pl.ds(s * bk, bk)]
        if transpose_w:  # W is (n, k): contract both on their second axis
            ws = w_ref[:, pl.ds(s * bk, bk)]
            return acc + lax.dot_general(xs, ws, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        return acc + jnp.dot(xs, w_ref[pl.ds(s * bk, bk), :], preferred_element_type=f32)

    acc = lax.fori_loop(0, steps, step, jnp.zeros(o_ref.shape, f32))
    if epilogue:
        t_ref, b_ref = rank_refs
        acc = acc + jnp.dot(t_ref[...], b_ref[...], preferred_element_type=f32)
    o_ref[...] = acc.astype(o_ref.dtype)


def _compiler_params(warps: int, stages: int):
    """The Triton lowering's parameters (``CompilerParams``; ``TritonCompilerParams`` before JAX 0.7)."""
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=warps, num_stages=stages)
