"""Fused dequantize-and-multiply (Pallas): ``x·W`` for a `Quantized` ``W`` without forming the float ``W``.

`matmul` reads ``W``'s packed codes and scales tile by tile (NF4: 4-bit codes, a block absmax, the
double-quantized absmax's int8 codes, group steps and mean; int8: codes and per-channel scales),
dequantizes each tile in registers to exactly the values `jaxlora._quantized.dequantize_weight` gives,
and multiplies it on the tensor cores, accumulating in float32; no float copy of ``W`` is written.
``transpose=True`` computes ``g·Wᵀ`` from the same tiles: the activation gradient. The contraction
is split over a grid axis when the output alone gives too few programs (decode: one row), and XLA
sums the float32 partials. It is written for Pallas's Triton lowering, the one whose kernels also run
in Pallas's interpreter on a CPU (the tests) and which ships on every JAX from 0.10 to 0.12; see
docs/design.md.

`dot` is the entry point the rewrite uses (``jaxlora/_trace/_qdot.py``): ``x·W`` with a custom VJP
(``dx`` by the kernel on ``Wᵀ``; a gradient for ``W``'s float leaves only if someone asks, through
the reference). `mode` chooses per call: the kernel on a GPU for shapes it `covers` and at most
`MAX_ROWS` rows, else `reference` (XLA's dequantize-then-matmul). `_MODE` forces ``"kernel"``,
``"interpret"`` (the kernel in Pallas's interpreter) or ``"xla"`` for tests and benchmarks.

Example:
  >>> import jax, jax.numpy as jnp, jaxlora
  >>> w = jax.random.normal(jax.random.key(0), (128, 128))
  >>> q = jaxlora.quantize({"w": w}, "nf4", targets="w")["w"]
  >>> x = jnp.ones((1, 128))
  >>> y = matmul(x, q, interpret=True)  # the kernel, in the interpreter on a CPU
  >>> bool(jnp.allclose(y, reference(x, q), rtol=1e-5, atol=1e-4))
  True
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from ._quantized import DQ_GROUP, NF4, Quantized, dequantize_weight
from ._quantized import layer as layer_of

Array = jax.Array

# None: `mode` decides (the kernel on a GPU where it covers the shapes, else XLA); "kernel",
# "interpret" (the kernel in Pallas's interpreter) or "xla" force one where the kernel covers the shapes.
_MODE: str | None = None
MODES = ("kernel", "interpret", "xla")
# beyond this many rows XLA's dequantize-then-matmul is used: on the H200 the kernel (`TILE_M`...) took
# NF4 at 64 rows in 2.9-3.0 ms against XLA's 8.7, int8 2.1-2.3 against 4.0; at 128 rows it was not
# measured with these settings (benchmarks/results/qdecode_h200_rows.json, _splits_*.json)
MAX_ROWS = 64
# the activation gradient (g·Wᵀ) takes the kernel up to this many rows, XLA's path beyond: on the H200
# the transposed kernel lost 2.8x at 64 rows (qdecode_h200.json), so it never follows MAX_ROWS up
MAX_ROWS_T = 16
GEMV = True  # one row: broadcast products and sums instead of a 16-row tensor-core tile
# how a tile finds NF4's 16 values: "gather" (a table load), "select" (15 compares and selects) or
# "tree" (a binary tree of 8 + 4 + 2 + 1 selects on the code's bits)
LOOKUP = "gather"
LOOKUPS = ("gather", "select", "tree")
REDUCE = "after"  # the one-row path sums its products over the contraction "after" the loop or each "step"
WORDS = False  # load the codes as uint32 words (8 NF4 or 4 int8 columns a word), unpacked by shifts
HINTS = False  # tell Triton each step's offsets are multiples of the tile (`pl.multiple_of`)
# a timing diagnostic, not a product: the codes' integers stand for W (no lookup, no scales), so a
# benchmark can tell the kernel's loads and sums from its dequantization
READ_ONLY = False
WARPS, STAGES = 4, 3
TILE, TILE_T = (128, 128), (128, 128)  # (rows, columns) of W dequantized a step: forward, and for dx
# split the contraction until the grid has about this many programs (one step each at most): in the H200
# sweep 4096 was within 13% of the best of 38 settings for NF4 and int8 at 1 and 16 rows, 512 within 59%
# (benchmarks/results/qdecode_h200_variants.json)
PROGRAMS = 4096
# the forward on 2 to MAX_ROWS rows (tensor-core tiles): its own tile, warps, stages and programs. On the
# H200 (qdecode_h200_splits_*.json, both 8B MLP shapes) (64, 128), 4, 1, 1024 was the fastest of 10 at
# 16 and 64 rows for NF4 and within 8% for int8: NF4 3.32 / 2.93-3.03 ms against 3.74-3.91 / 4.80-4.84
# with the one-row setting, whose split writes float32 partials larger than the codes at these rows
TILE_M, WARPS_M, STAGES_M, PROGRAMS_M = (64, 128), 4, 1, 1024
# the forward on one row (decode) by `_gemv_kernel` (`FOLD`): x and each block's scale folded into one
# coefficient a block, so a code costs a value lookup and one multiply-add; its own tile (NF4's rows and
# columns of W a step, 4 KB of codes: wide, so each row is one contiguous read; int8, a byte a code,
# takes half the rows), warps, stages and programs, and `PREFETCH` steps' loads issued ahead of their use
# (Triton's pipeliner prefetches only what feeds a dot). On the H200 (qdecode_h200_fold*.json) it took the
# probe's NF4 from 2.06-2.45 ms to 1.39-1.77 and int8 from 1.94 to 1.32-1.56 (bf16 1.26-1.39); summing
# each step's rows at once and folding 2-8 rows too were slower (1.6-42 ms; 4.0-6.1 ms at 4 rows against
# the tensor cores' 3.4) and were removed
FOLD = True
GEMV_TILE, GEMV_WARPS, GEMV_STAGES, GEMV_PROGRAMS, PREFETCH = (16, 512), 4, 1, 1024, 1
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def reference(x: Array, q: Quantized, out_dtype: Any = None, precision: Any = None) -> Array:
    """``x·W`` by XLA: ``W`` dequantized in ``x``'s dtype (`dequantize_weight`), then one ``dot``."""
    w = dequantize_weight(q, x.dtype)
    return jnp.dot(x, w, precision=precision, preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)


def _tiles(q: Quantized, transpose: bool, many: bool = False) -> tuple[int, int]:
    """(rows, columns) of ``W`` a step of the kernel dequantizes (`TILE`, `TILE_T` for ``transpose``,
    `TILE_M` for ``many`` rows; at least one NF4 block wide)."""
    bk, bn = TILE_T if transpose else TILE_M if many else TILE
    return (bk, max(bn, q.block_size)) if q.format == "nf4" else (bk, bn)


def covers(q: Quantized, rows: int, dtype: Any, stacked: bool = False) -> str | None:
    """Why the kernel does not cover ``x: (rows, K) · W`` (None: it does). Static shapes only.

    ``stacked``: ``W`` is one layer of ``q``'s stacked axis (`matmul`'s ``layer``), else ``q`` is 2-D."""
    dtype = jnp.dtype(dtype)
    if len(q.outer) != stacked or len(q.inner) != 2:
        return f"W {q.shape} is not 2-D" + (" (or one layer of a stack)" if stacked else "")
    if dtype not in _DTYPES:
        return f"activations of dtype {dtype.name}"
    if rows > MAX_ROWS:
        return f"{rows} rows (> MAX_ROWS={MAX_ROWS}: XLA's dequantize-then-matmul amortises the read)"
    if rows == 0:
        return "no rows (an empty batch: the kernel's row tiles need at least one)"
    k, n = q.inner
    bk, bn = (max(t) for t in zip(_tiles(q, False), _tiles(q, True), _tiles(q, False, many=True)))
    if q.format == "nf4":
        bs = q.block_size
        if bs & (bs - 1) or n % bs:
            return f"NF4 block_size {bs} is not a power of 2 dividing the {n} columns"
    if k % bk or n % bn:
        return f"W {q.inner} is not a multiple of the ({bk}, {bn}) tiles"
    return None


def mode(q: Quantized, rows: int, dtype: Any, stacked: bool = False) -> str:
    """``"kernel"``, ``"interpret"`` or ``"xla"``: how `dot` computes ``x: (rows, K) · W`` (`covers`)."""
    if covers(q, rows, dtype, stacked) is not None:
        return "xla"
    if _MODE is not None:
        return _MODE
    return "kernel" if jax.default_backend() == "gpu" else "xla"


def _rows_block(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _splits(programs: int, reduce: int, chunk: int, limit: int | None = None) -> int:
    """How many programs share the contraction: the largest divisor of its ``reduce // chunk`` steps that
    keeps the grid within ``limit`` (default `PROGRAMS`; any divisor: the 8B's 14,336-row contraction is
    112 = 7·16 steps)."""
    steps, limit = reduce // chunk, limit or PROGRAMS
    return max(d for d in range(1, steps + 1) if steps % d == 0 and (d == 1 or programs * d <= limit))


_SWITCHES = (
    "TILE", "TILE_T", "WARPS", "STAGES", "PROGRAMS", "TILE_M", "WARPS_M", "STAGES_M", "PROGRAMS_M",
    "GEMV_TILE", "GEMV_WARPS", "GEMV_STAGES", "GEMV_PROGRAMS", "PREFETCH",
    "GEMV", "FOLD", "LOOKUP", "REDUCE", "WORDS", "HINTS", "READ_ONLY",
    "MAX_ROWS",
)  # fmt: skip
_DEFAULTS = {name: globals()[name] for name in _SWITCHES}
_FLAGS = {  # a setting's variant flags: the switch each sets (unnamed switches take their defaults)
    "reduce": ("REDUCE", "step"),
    "words": ("WORDS", True),
    "hints": ("HINTS", True),
    "readonly": ("READ_ONLY", True),
    "tile": ("FOLD", False),
    **{f"prefetch{n}": ("PREFETCH", n) for n in (0, 2)},
    **{f"rows{n}": ("MAX_ROWS", n) for n in (16, 32, 64, 128)},
    **{lookup: ("LOOKUP", lookup) for lookup in LOOKUPS},
}


def switches() -> dict[str, Any]:
    """The kernel's switches as they are now (what a benchmark records beside its figures)."""
    return {name: globals()[name] for name in _SWITCHES}


def configure(setting: str) -> dict[str, Any]:
    """Set every switch from a benchmark setting ``"bk,bn,warps,stages,programs[,gemv[,flags]]"``.

    ``TILE``, ``TILE_T``, ``TILE_M`` and ``GEMV_TILE`` become ``(bk, bn)`` and the warps, stages and
    programs of every path (one row, many rows, dx) the setting's; ``gemv`` is 1 or 0 (default 1);
    ``flags`` joins with ``+`` any of ``one`` (the numbers set the one-row kernel's ``GEMV_*`` alone, the
    other paths keep their defaults), ``tile`` (`FOLD` off: one row on the tiled kernel), ``prefetch0``
    or ``prefetch2`` (`PREFETCH`), ``reduce`` (`REDUCE` ``"step"``), ``words`` (`WORDS`), ``hints``
    (`HINTS`), ``rowsN`` (`MAX_ROWS` N: 16, 32, 64 or 128) and one of `LOOKUPS` (default ``gather``), or
    is ``loop`` for none. Switches a setting does not name go back to their defaults, so settings never leak into each
    other; JAX's caches are cleared, since a trace keeps the switches it saw. Returns `switches`. The
    empty string restores the defaults.

    >>> configure("128,128,4,3,4096,1,reduce+words+tree")["LOOKUP"]
    'tree'
    >>> configure("")["REDUCE"]
    'after'
    """
    fields = [f.strip() for f in setting.split(",")] if setting.strip() else []
    problems = []
    if fields and not 5 <= len(fields) <= 7:
        problems.append(f"{len(fields)} fields (expected 5 to 7)")
    nums = []
    for f in fields[:6]:
        try:
            nums.append(int(f))
        except ValueError:
            problems.append(f"{f!r} is not an integer")
    flags = [f for f in fields[6].split("+") if f not in ("", "loop")] if len(fields) == 7 else []
    known = [*_FLAGS, "one"]
    problems += [f"unknown flag {f!r} (expected loop or any of {', '.join(known)})" for f in flags if f not in known]
    if sum(f in LOOKUPS for f in flags) > 1:
        problems.append(f"more than one lookup among {flags}")
    if problems:
        raise ValueError(
            f"jaxlora._qmatmul.configure({setting!r}): " + "; ".join(problems)
            + ". Write bk,bn,warps,stages,programs[,gemv[,flags]], e.g. '128,128,4,3,4096,1,reduce+words'."
        )  # fmt: skip
    values = dict(_DEFAULTS)
    if nums:
        bk, bn, warps, stages, programs, *gemv = nums
        if "one" not in flags:
            values.update(TILE=(bk, bn), TILE_T=(bk, bn), WARPS=warps, STAGES=stages, PROGRAMS=programs)
            values.update(TILE_M=(bk, bn), WARPS_M=warps, STAGES_M=stages, PROGRAMS_M=programs)
        values.update(GEMV_TILE=(bk, bn), GEMV_WARPS=warps, GEMV_STAGES=stages, GEMV_PROGRAMS=programs)
        values["GEMV"] = bool(gemv[0]) if gemv else True
    values.update(_FLAGS[f] for f in flags if f != "one")
    globals().update(values)
    jax.clear_caches()  # the switches are read when a function is traced: a trace made before must not be reused
    return switches()


def matmul(
    x: Array,
    q: Quantized,
    *,
    layer: Array | int | None = None,
    transpose: bool = False,
    out_dtype: Any = None,
    lookup: str | None = None,
    splits: int | None = None,
    interpret: bool | None = None,
    precision: Any = None,
) -> Array:
    """``x·W`` (``x: (m, K)``) or, with ``transpose``, ``x·Wᵀ`` (``x: (m, N)``) for a 2-D ``W: (K, N)``.

    ``W`` is dequantized tile by tile to ``x``'s dtype (the values `dequantize_weight` gives), the
    products accumulate in float32, the result is ``out_dtype`` (default ``x``'s). ``layer`` (an int
    or a traced scalar) makes ``W`` that layer of a stacked ``q``: the kernel reads the layer's codes
    inside the whole stack, so a ``scan`` over layers copies none of them out first (a custom call
    takes whole buffers). ``lookup`` picks how NF4 codes become values (`LOOKUP`), ``splits`` how many
    programs share the contraction (default: enough for about `PROGRAMS`), ``interpret`` runs Pallas's
    interpreter (default: unless on a GPU). ``precision`` is the model's own ``dot_general`` precision,
    given to the tile products: Triton multiplies float32 tiles in TF32 unless it asks for more
    (``HIGHEST``: IEEE float32, as XLA's ``dot`` then computes). `REDUCE`, `WORDS` and `HINTS` are read
    when traced.
    Raises ValueError for shapes `covers` refuses.
    """
    from jax.experimental import pallas as pl

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    lookup = lookup or LOOKUP
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup={lookup!r}: expected one of {LOOKUPS}.")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    m = x.shape[0]
    why = covers(q, min(m, MAX_ROWS), x.dtype, stacked=layer is not None)
    if why is not None or x.ndim != 2 or x.shape[1] != q.inner[1 if transpose else 0]:
        raise ValueError(
            f"the fused dequantize-and-multiply kernel does not cover x {x.shape} against {q!r}"
            f" (transpose={transpose}, layer={'None' if layer is None else 'given'}): {why or 'x does not match W'};"
            " use `reference` (jaxlora.apply falls back to it by itself)."
        )  # fmt: skip
    k, n = q.inner
    if _folded(m, transpose):
        return _gemv(x, q, layer, out_dtype, lookup, splits, interpret)
    bm = 1 if m == 1 and GEMV else _rows_block(m)
    many = bm > 1 and not transpose  # the forward's tensor-core path: its own settings (`TILE_M`...)
    bk, bn = _tiles(q, transpose, many)
    mp = -(-m // bm) * bm
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    out_n = k if transpose else n
    out_tile = bk if transpose else bn
    reduce, chunk = (n, bn) if transpose else (k, bk)
    s = splits or _splits((mp // bm) * (out_n // out_tile), reduce, chunk, PROGRAMS_M if many else PROGRAMS)
    if reduce % (s * chunk):
        raise ValueError(
            f"splits={s} does not divide the contraction of {reduce} into steps of {chunk}; use a divisor."
        )
    part = reduce // s  # the contraction's share of one program
    steps = part // chunk
    # the codes' phases: columns of W that one loaded element holds (a byte: 2 NF4 or 1 int8; a word: 8 or 4)
    words = WORDS and (q.format == "int8" or q.block_size % 8 == 0)
    phases = (8 if words else 2) if q.format == "nf4" else (4 if words else 1)

    # The codes and the block absmax are read from the whole stack (rows layer·K onwards): `_stacked`
    # lays them out as (layers·K, ·) without a copy. The small per-layer scales are sliced out.
    codes, absmax, small, base = _stacked(q, layer)
    if words:  # little-endian: byte b of a word is its bits 8b..8b+7 (XLA's bitcast on every backend)
        codes = lax.bitcast_convert_type(codes.reshape(codes.shape[0], -1, 4), jnp.uint32)
    whole = lambda v: pl.BlockSpec(v.shape, lambda i, j, t: (0,) * v.ndim)  # noqa: E731  (indexed in the kernel)
    names = ["x", "base", "codes"]
    operands = [xp, base, codes]
    specs = [pl.BlockSpec((bm, part), lambda i, j, t: (i, t)), whole(base), whole(codes)]
    f32 = jnp.float32
    if q.format == "int8":
        # one row of scales per phase: scale[p, w] is column phases·w + p's
        names += ["scale"]
        operands += [small.scale.reshape(n // phases, phases).T]
    else:
        more = _nf4_operands(absmax, small)
        names += list(more)
        operands += list(more.values())
    specs += [whole(v) for v in operands[len(specs) :]]
    top = float(jnp.finfo(q.dtype).max)
    kernel = functools.partial(
        _kernel, names=tuple(names), fmt=q.format, double=q.format == "nf4" and q.double_quant, steps=steps,
        tile=(bk, bn), transpose=transpose, part=part, bs=q.block_size, nbr=n // q.block_size,
        dtype=jnp.dtype(x.dtype), top=top, lookup=lookup, gemv=m == 1 and GEMV, phases=phases, words=words,
        reduce_step=REDUCE == "step", hints=HINTS, read_only=READ_ONLY, interpret=interpret, precision=precision,
    )  # fmt: skip
    one = s == 1
    out_shape = jax.ShapeDtypeStruct((mp, out_n) if one else (s, mp, out_n), out_dtype if one else f32)
    out_spec = (
        pl.BlockSpec((bm, out_tile), lambda i, j, t: (i, j))
        if one
        else pl.BlockSpec((None, bm, out_tile), lambda i, j, t: (t, i, j))
    )
    warps, stages = (WARPS_M, STAGES_M) if many else (WARPS, STAGES)
    params = {} if interpret else {"compiler_params": _compiler_params(warps, stages)}
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(mp // bm, out_n // out_tile, s),
        in_specs=specs,
        out_specs=out_spec,
        interpret=interpret,
        **params,
    )(*operands)
    if not one:
        y = y.sum(0).astype(out_dtype)
    return y[:m] if mp != m else y


def _nf4_operands(absmax: Array, small: Quantized) -> dict[str, Array]:
    """NF4's operands beside the codes, by name: the block absmax, with double quantization each group's
    step (padded to a power of 2), and ``consts``: the 16 values, then the absmax mean at 16."""
    f32 = jnp.float32
    consts = np.zeros(32, np.float32)
    consts[:16] = NF4
    out = {"absmax": absmax}
    if small.double_quant:
        groups = small.scale_scale.shape[0]
        out["steps"] = jnp.pad(small.scale_scale.astype(f32), (0, (1 << max(4, (groups - 1).bit_length())) - groups))
        out["consts"] = jnp.asarray(consts).at[16].set(small.scale_mean.reshape(())[()].astype(f32))
    else:
        out["consts"] = jnp.asarray(consts)
    return out


def _fit(size: int, extent: int, least: int) -> int:
    """The largest of ``size``, ``size/2``, ... (at least ``least``) that divides ``extent``."""
    while size > least and extent % size:
        size //= 2
    return size


def _folded(rows: int, transpose: bool) -> bool:
    """Whether `matmul` takes the folded kernel (`_gemv_kernel`): its ``W`` is never rounded to ``x``'s dtype."""
    return FOLD and GEMV and not transpose and rows == 1


def _gemv(x, q, layer, out_dtype, lookup, splits, interpret):
    """`matmul` on one row by `_gemv_kernel`: the program (j, t) sums rows ``t·part ...`` of ``W``'s
    columns ``j·bn ...``, a tile of rows a step; the splits' float32 partials are summed by XLA."""
    from jax.experimental import pallas as pl

    k, n = q.inner
    nf4 = q.format == "nf4"
    bk = _fit(GEMV_TILE[0] if nf4 else max(GEMV_TILE[0] // 2, 1), k, 1)  # int8: the same bytes a step
    bn = _fit(GEMV_TILE[1], n, max(128, q.block_size if nf4 else 1))
    s = splits or _splits(n // bn, k, bk, GEMV_PROGRAMS)
    if k % (s * bk):
        raise ValueError(f"splits={s} does not divide the contraction of {k} into steps of {bk}; use a divisor.")
    part = k // s
    codes, absmax, small, base = _stacked(q, layer)
    if nf4:  # (rows, blocks, bytes of a block): a block's codes share one coefficient by broadcasting
        codes = codes.reshape(codes.shape[0], n // q.block_size, q.block_size // 2)
    f32 = jnp.float32
    names, operands = ["x", "base", "codes"], [x, base, codes]
    if nf4:
        more = _nf4_operands(absmax, small)
        names += list(more)
        operands += list(more.values())
    else:
        names += ["scale"]
        operands += [small.scale.reshape(1, n).astype(f32)]
    whole = lambda v: pl.BlockSpec(v.shape, lambda j, t: (0,) * v.ndim)  # noqa: E731  (indexed in the kernel)
    specs = [pl.BlockSpec((1, part), lambda j, t: (0, t))] + [whole(v) for v in operands[1:]]
    kernel = functools.partial(
        _gemv_kernel, names=tuple(names), nf4=nf4, double=nf4 and q.double_quant, steps=part // bk, tile=(bk, bn),
        part=part, bs=q.block_size, nbr=n // q.block_size, top=float(jnp.finfo(q.dtype).max),
        lookup=lookup, prefetch=PREFETCH, read_only=READ_ONLY,
    )  # fmt: skip
    one = s == 1
    out_shape = jax.ShapeDtypeStruct((1, n) if one else (s, 1, n), out_dtype if one else f32)
    out_spec = (
        pl.BlockSpec((1, bn), lambda j, t: (0, j)) if one else pl.BlockSpec((None, 1, bn), lambda j, t: (t, 0, j))
    )
    params = {} if interpret else {"compiler_params": _compiler_params(GEMV_WARPS, GEMV_STAGES)}
    y = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n // bn, s), in_specs=specs, out_specs=out_spec, interpret=interpret,
        **params,
    )(*operands)  # fmt: skip
    return y if one else y.sum(0).astype(out_dtype)


def _gemv_kernel(*refs, names, nf4, double, steps, tile, part, bs, nbr, top, lookup, prefetch, read_only):
    """``y[c] = Σ_r x[r]·W[r, c]`` with ``W[r, c] = value(code)·absmax[r, c // bs]`` (NF4) or
    ``code·scale[c]`` (int8), computed as ``Σ_r value(code)·(x[r]·absmax)`` and ``scale·Σ_r code·x[r]``:
    per code a lookup and a multiply-add, no rounding of ``W`` to ``x``'s dtype."""
    from jax.experimental import pallas as pl

    ref = dict(zip(names, refs))
    x_ref, o_ref = ref["x"], refs[-1]
    bk, bn = tile
    phases = 2 if nf4 else 1
    width = bn // phases
    f32 = jnp.float32
    j, t = pl.program_id(0), pl.program_id(1)
    col0 = j * bn
    codes0, absmax0 = ref["base"][0], ref["base"][1]

    def load(i):
        """Step ``i``'s loads, as loaded (used only in `fma`, so loads ahead stay in flight until then): the
        codes (int8: (bk, bn); NF4: (bk, bn / bs, bs / 2)), x's (1, bk), and NF4's absmax (bk, bn / bs) with,
        double-quantized, each block's group step."""
        rows = t * part + i * bk  # within the layer's W
        xs = x_ref[:, pl.ds(i * bk, bk)]
        if not nf4:
            return ref["codes"][pl.ds(codes0 + rows, bk), pl.ds(col0, bn)], xs
        codes = ref["codes"][pl.ds(codes0 + rows, bk), pl.ds(col0 // bs, bn // bs), :]
        amax = ref["absmax"][pl.ds(absmax0 + rows, bk), pl.ds(col0 // bs, bn // bs)]
        if not double:
            return codes, xs, amax
        row = rows + lax.broadcasted_iota(jnp.int32, amax.shape, 0)
        blocks = col0 // bs + lax.broadcasted_iota(jnp.int32, amax.shape, 1)
        return codes, xs, amax, ref["steps"][(row * nbr + blocks) // DQ_GROUP]

    def coefficient(xs, amax, step=None):
        """x·absmax (bk, bn / bs, 1), or x (bk, 1) for int8."""
        xs = xs.astype(f32).reshape(bk, 1)
        if amax is None:
            return xs
        amax = amax.astype(f32)
        if step is not None:
            amax = amax * step + ref["consts"][pl.ds(16, 1)].reshape(1, 1)
        # W's values are clipped to its dtype's range: a finite absmax past it is clipped (|value| <= 1)
        amax = jnp.where(jnp.abs(amax) > top, jnp.where(jnp.abs(amax) < jnp.inf, jnp.sign(amax) * top, amax), amax)
        return (xs * amax)[:, :, None]

    def fma(accs, codes, xs, amax=None, step=None):
        coef = coefficient(xs, amax, step)

        if not nf4:
            return (accs[0] + codes.astype(f32) * coef,)
        codes = codes.astype(jnp.int32)
        halves = (codes >> 4, codes & 15)  # the even column in the high nibble
        if read_only:  # the diagnostic: the codes' integers stand for the values (no lookup)
            return tuple(acc + h.astype(f32) * coef for acc, h in zip(accs, halves))
        return tuple(acc + _nf4_value(h, lookup, ref["consts"]) * coef for acc, h in zip(accs, halves))

    accs = tuple(jnp.zeros((bk, bn // bs, bs // 2) if nf4 else (bk, bn), f32) for _ in range(phases))
    if steps == 1:
        accs = fma(accs, *load(0))
    elif prefetch:  # the next `prefetch` steps' loads are issued before this step's arithmetic
        ahead = tuple(load(min(i, steps - 1)) for i in range(prefetch))

        def body(i, carry):
            accs, ahead = carry
            nxt = load(jnp.minimum(i + prefetch, steps - 1))
            return fma(accs, *ahead[0]), ahead[1:] + (nxt,)

        accs = lax.fori_loop(0, steps, body, (accs, ahead))[0]
    else:
        accs = lax.fori_loop(0, steps, lambda i, accs: fma(accs, *load(i)), accs)
    sums = [jnp.sum(acc, axis=0).reshape(1, width) for acc in accs]
    out = _interleave(sums) if nf4 else sums[0] * ref["scale"][:, pl.ds(col0, bn)]
    o_ref[...] = out.astype(o_ref.dtype)


def _nf4_value(idx: Array, lookup: str, consts_ref: Any) -> Array:
    """NF4's value (float32) of each 4-bit code in ``idx`` by ``lookup`` (`LOOKUPS`)."""
    if lookup == "gather":
        return consts_ref[idx]
    if lookup == "tree":
        return _nf4_tree(idx)
    vals = jnp.zeros(idx.shape, jnp.float32)
    for code, v in enumerate(NF4.tolist()):
        vals = jnp.where(idx == code, v, vals)
    return vals


_INDEX_LIMIT = 2**31  # the kernel's offsets are int32: a larger stack is sliced per layer first


def _stacked(q: Quantized, layer: Any) -> tuple[Array, Array | None, Quantized, Array]:
    """``(codes, absmax, small, base)`` for the kernel: the codes as ``(layers·K, N / per byte)`` and
    NF4's block absmax as ``(layers·K, N / block)``, reshaped from the whole stack without a copy (the
    layer's rows start at ``base[0]`` and ``base[1]``); ``small``, the layer's own `Quantized`, whose
    per-layer scales the kernel takes as they are.

    Where the reshape would copy (double quantization pads the absmax codes to whole groups of 256)
    that part is sliced out of the layer; where the stack outgrows int32 offsets, all of it is, as
    ``scan`` would slice it.
    """
    k, n = q.inner
    per = 1 if q.format == "int8" else 2
    zero = jnp.zeros((), jnp.int32)
    small, layers, index = q, 1, zero
    if layer is not None:
        if q.outer[0] * k * (n // per) >= _INDEX_LIMIT:
            return _stacked(layer_of(q, layer), None)
        small, layers, index = layer_of(q, layer), q.outer[0], jnp.asarray(layer, jnp.int32)
    codes = q.codes.reshape(layers * k, n // per)
    if q.format == "int8":
        return codes, None, small, jnp.stack([index * k, zero])
    nbr = n // q.block_size
    if q.scale.shape[-1] == k * nbr:
        return codes, q.scale.reshape(layers * k, nbr), small, jnp.stack([index * k, index * k])
    return codes, small.scale[: k * nbr].reshape(k, nbr), small, jnp.stack([index * k, zero])


def _nf4_tree(idx: Array) -> Array:
    """NF4's value of each 4-bit code by a binary tree of selects on its bits (8 + 4 + 2 + 1)."""
    vals: list[Any] = [float(v) for v in NF4]
    for bit in range(4):
        on = (idx & (1 << bit)) != 0
        vals = [jnp.where(on, hi, lo) for lo, hi in zip(vals[::2], vals[1::2])]
    return jnp.broadcast_to(vals[0], idx.shape).astype(jnp.float32)


def _interleave(tiles: list[Array]) -> Array:
    """``out[:, w·P + p] = tiles[p][:, w]`` for ``P`` (a power of 2) tiles, by 2-way joins (all Triton lowers)."""
    while len(tiles) > 1:
        h = len(tiles) // 2
        tiles = [jnp.stack([tiles[p], tiles[p + h]], axis=-1).reshape(tiles[p].shape[0], -1) for p in range(h)]
    return tiles[0]


def _kernel(
    *refs, names, fmt, double, steps, tile, transpose, part, bs, nbr, dtype, top, lookup, gemv, phases, words,
    reduce_step, hints, read_only, interpret, precision,
):  # fmt: skip
    from jax.experimental import pallas as pl

    ref = dict(zip(names, refs))
    x_ref, o_ref = ref["x"], refs[-1]
    bk, bn = tile
    width = bn // phases  # the columns of W a step gives each phase
    f32 = jnp.float32
    j, t = pl.program_id(1), pl.program_id(2)
    # the program's region of W starts at (row0, col0); the layer's codes at row codes0 of the stack
    row0, col0 = (j * bk, t * part) if transpose else (t * part, j * bn)
    codes0, absmax0 = ref["base"][0], ref["base"][1]

    def at(start, size):
        return pl.ds(pl.multiple_of(start, size) if hints else start, size)

    def weights(r, c):
        """W[r : r + bk, c : c + bn] of the region (offsets within it) in the activations' dtype, as
        its `phases` tiles of (bk, width): tile p holds the columns c + phases·w + p."""
        rows, cols = row0 + r, col0 + c  # within the layer's W
        codes = ref["codes"][at(codes0 + rows, bk), at(cols // phases, width)]  # an element holds `phases` columns
        if read_only:
            return [codes.astype(dtype)] * phases
        if fmt == "int8":
            scale_ref = ref["scale"]
            if words:  # byte p of each word, sign-extended
                ints = [(codes >> (8 * p)).astype(jnp.int32) & 255 for p in range(4)]
                ints = [v - ((v & 128) << 1) for v in ints]
            else:
                ints = [codes]
            return [
                jnp.clip(v.astype(f32) * scale_ref[pl.ds(p, 1), at(cols // phases, width)], -top, top).astype(dtype)
                for p, v in enumerate(ints)
            ]
        consts_ref = ref["consts"]
        amax = ref["absmax"][at(absmax0 + rows, bk), pl.ds(cols // bs, bn // bs)]
        if double:
            row = rows + lax.broadcasted_iota(jnp.int32, amax.shape, 0)
            blocks = cols // bs + lax.broadcasted_iota(jnp.int32, amax.shape, 1)
            step = ref["steps"][(row * nbr + blocks) // DQ_GROUP]
            mean = consts_ref[pl.ds(16, 1)].reshape(1, 1)
            amax = amax.astype(f32) * step + mean
        amax = jnp.broadcast_to(amax[:, :, None], (bk, bn // bs, bs // phases)).reshape(bk, width)

        def value(idx):
            return jnp.clip(_nf4_value(idx, lookup, consts_ref) * amax, -top, top).astype(dtype)

        if not words:
            codes = codes.astype(jnp.int32)
            return [value(codes >> 4), value(codes & 15)]
        # column 8w + p sits in byte p // 2 of word w, the even column in the byte's high nibble
        return [value(((codes >> (8 * (p // 2) + 4 * (1 - p % 2))) & 15).astype(jnp.int32)) for p in range(8)]

    def mul(a, w, contract_w):  # a (rows, c) against w, contracting w's axis contract_w
        if gemv:  # one row: broadcast products, summed over the contraction each step or once after the loop
            a = a.astype(f32).reshape(-1, 1) if contract_w == 0 else a.astype(f32).reshape(1, -1)
            w32 = w.astype(f32)
            if interpret and dtype != f32:  # XLA would fold the casts f32 -> dtype -> f32 away: round explicitly
                info = jnp.finfo(dtype)
                w32 = lax.reduce_precision(w32, exponent_bits=info.nexp, mantissa_bits=info.nmant)
            if not reduce_step:
                return a * w32
            return jnp.sum(a * w32, axis=0, keepdims=True) if contract_w == 0 else jnp.sum(a * w32, axis=1)[None]
        return lax.dot_general(a, w, (((1,), (contract_w,)), ((), ())), precision=precision, preferred_element_type=f32)

    def offset(i, size):
        return pl.multiple_of(i * size, size) if hints and not isinstance(i, int) else i * size

    def body(i, accs):
        if transpose:  # g (bm, bn) · W[:, cols]ᵀ -> (bm, bk), the phases summed into one accumulator
            c = offset(i, bn)
            acc = accs[0]
            for p, w in enumerate(weights(0, c)):
                g = x_ref[:, pl.ds(c + p, width, stride=phases)] if phases > 1 else x_ref[:, pl.ds(c, bn)]
                acc = acc + mul(g, w, 1)
            return (acc,)
        r = offset(i, bk)
        xs = x_ref[:, pl.ds(r, bk)]
        return tuple(acc + mul(xs, w, 0) for acc, w in zip(accs, weights(r, 0)))

    m = o_ref.shape[0]
    if gemv and not reduce_step:
        shape = (bk, width)
    else:
        shape = (m, bk) if transpose else (m, width)
    accs = tuple(jnp.zeros(shape, f32) for _ in range(1 if transpose else phases))
    accs = body(0, accs) if steps == 1 else lax.fori_loop(0, steps, body, accs)
    if transpose:
        out = accs[0]
        out = jnp.sum(out, axis=1).reshape(1, bk) if gemv and not reduce_step else out
    else:
        if gemv and not reduce_step:
            accs = tuple(jnp.sum(acc, axis=0).reshape(1, width) for acc in accs)
        out = _interleave(list(accs))
    o_ref[...] = out.astype(o_ref.dtype)


def _compiler_params(warps: int, stages: int):
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=warps, num_stages=stages)


def dot(
    x: Array, q: Quantized, out_dtype: Any = None, layer: Array | int | None = None, precision: Any = None
) -> Array:
    """``x·W`` for ``x: (..., K)`` and a 2-D quantized ``W: (K, N)`` (or layer ``layer`` of a stacked
    ``q``), by the kernel where `mode` picks it; ``precision`` is the model's ``dot_general``'s (`matmul`).

    Differentiable in ``x`` (``dx = g·Wᵀ``, by the same kernel) and, only when asked, in ``W``'s
    float leaves (through `reference`); the frozen base costs no gradient otherwise.
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    rows = math.prod(x.shape[:-1])
    how = mode(q, rows, x.dtype, stacked=layer is not None)
    if how == "xla":
        return reference(x, q if layer is None else layer_of(q, layer), out_dtype, precision)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    index = None if layer is None else jnp.asarray(layer, jnp.int32)
    y = _dot(x.reshape(rows, x.shape[-1]), leaves, index, treedef, out_dtype, how == "interpret", precision)
    return y.reshape(*x.shape[:-1], q.inner[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _dot(x, leaves, layer, treedef, out_dtype, interpret, precision):
    q = jax.tree_util.tree_unflatten(treedef, leaves)
    return matmul(x, q, layer=layer, out_dtype=out_dtype, interpret=interpret, precision=precision)


def _dot_fwd(x, leaves, layer, treedef, out_dtype, interpret, precision):
    need_w = any(p.perturbed for p in leaves)
    x, leaves = x.value, [p.value for p in leaves]
    layer = None if layer is None else layer.value
    q = jax.tree_util.tree_unflatten(treedef, leaves)
    y = matmul(x, q, layer=layer, out_dtype=out_dtype, interpret=interpret, precision=precision)
    return y, (x, leaves, layer, need_w)


def _dot_bwd(treedef, out_dtype, interpret, precision, res, g):
    x, leaves, layer, need_w = res
    if isinstance(g, SymbolicZero):
        return None, [None] * len(leaves), None
    q = jax.tree_util.tree_unflatten(treedef, leaves)
    if g.shape[0] <= MAX_ROWS_T:
        dx = matmul(
            g.astype(x.dtype), q, layer=layer, transpose=True, out_dtype=x.dtype, interpret=interpret,
            precision=precision,
        )  # fmt: skip
    else:  # XLA's path: W dequantized in x's dtype, then g·Wᵀ
        w = dequantize_weight(q if layer is None else layer_of(q, layer), x.dtype)
        dx = lax.dot_general(
            g.astype(x.dtype), w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        ).astype(x.dtype)
    dleaves = [None] * len(leaves)
    if need_w:  # someone differentiates the quantized leaves themselves: XLA's path, exactly
        floats = [i for i, v in enumerate(leaves) if jnp.issubdtype(v.dtype, jnp.floating)]

        def f(*fl):
            full = list(leaves)
            for i, v in zip(floats, fl):
                full[i] = v
            w = jax.tree_util.tree_unflatten(treedef, full)
            return reference(x, w if layer is None else layer_of(w, layer), out_dtype, precision)

        grads = jax.vjp(f, *(leaves[i] for i in floats))[1](g.astype(out_dtype))
        for i, d in zip(floats, grads):
            dleaves[i] = d
    return dx, dleaves, None


_dot.defvjp(_dot_fwd, _dot_bwd, symbolic_zeros=True)
