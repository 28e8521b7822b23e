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

Array = jax.Array

# None: `mode` decides (the kernel on a GPU where it covers the shapes, else XLA); "kernel",
# "interpret" (the kernel in Pallas's interpreter) or "xla" force one where the kernel covers the shapes.
_MODE: str | None = None
MODES = ("kernel", "interpret", "xla")
# beyond this many rows XLA's dequantize-then-matmul is used: on the H200 the kernel won at 1, 8 and 16
# rows, and at 64 (tiles of 128) it lost (benchmarks/results/qdecode_h200.json)
MAX_ROWS = 16
GEMV = True  # one row: broadcast products and sums instead of a 16-row tensor-core tile
# how a tile finds NF4's 16 values: "gather" (a table load), "select" (15 compares and selects) or
# "tree" (a binary tree of 8 + 4 + 2 + 1 selects on the code's bits)
LOOKUP = "gather"
LOOKUPS = ("gather", "select", "tree")
REDUCE = "after"  # the one-row path sums its products over the contraction "after" the loop or each "step"
WORDS = False  # load the codes as uint32 words (8 NF4 or 4 int8 columns a word), unpacked by shifts
HINTS = False  # tell Triton each step's offsets are multiples of the tile (`pl.multiple_of`)
WARPS, STAGES = 4, 3
TILE, TILE_T = (128, 128), (128, 128)  # (rows, columns) of W dequantized a step: forward, and for dx
PROGRAMS = 512  # split the contraction until the grid has about this many programs (steps == 1 at most)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def reference(x: Array, q: Quantized, out_dtype: Any = None) -> Array:
    """``x·W`` by XLA: ``W`` dequantized in ``x``'s dtype (`dequantize_weight`), then one ``dot``."""
    w = dequantize_weight(q, x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)


def _tiles(q: Quantized, transpose: bool) -> tuple[int, int]:
    """(rows, columns) of ``W`` a step of the kernel dequantizes (`TILE`; at least one NF4 block wide)."""
    bk, bn = TILE_T if transpose else TILE
    return (bk, max(bn, q.block_size)) if q.format == "nf4" else (bk, bn)


def covers(q: Quantized, rows: int, dtype: Any) -> str | None:
    """Why the kernel does not cover ``x: (rows, K) · W`` (None: it does). Static shapes only."""
    dtype = jnp.dtype(dtype)
    if q.outer or len(q.inner) != 2:
        return f"W {q.shape} is not 2-D"
    if dtype not in _DTYPES:
        return f"activations of dtype {dtype.name}"
    if rows > MAX_ROWS:
        return f"{rows} rows (> MAX_ROWS={MAX_ROWS}: XLA's dequantize-then-matmul amortises the read)"
    k, n = q.inner
    bk, bn = (max(a, b) for a, b in zip(_tiles(q, False), _tiles(q, True)))
    if q.format == "nf4":
        bs = q.block_size
        if bs & (bs - 1) or n % bs:
            return f"NF4 block_size {bs} is not a power of 2 dividing the {n} columns"
    if k % bk or n % bn:
        return f"W {q.inner} is not a multiple of the ({bk}, {bn}) tiles"
    return None


def mode(q: Quantized, rows: int, dtype: Any) -> str:
    """``"kernel"``, ``"interpret"`` or ``"xla"``: how `dot` computes ``x: (rows, K) · W``."""
    if covers(q, rows, dtype) is not None:
        return "xla"
    if _MODE is not None:
        return _MODE
    return "kernel" if jax.default_backend() == "gpu" else "xla"


def _rows_block(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _splits(programs: int, reduce: int, chunk: int) -> int:
    s = 1
    while programs * s * 2 <= PROGRAMS and reduce % (s * 2 * chunk) == 0:
        s *= 2
    return s


_SWITCHES = ("TILE", "TILE_T", "WARPS", "STAGES", "PROGRAMS", "GEMV", "LOOKUP", "REDUCE", "WORDS", "HINTS")
_DEFAULTS = {name: globals()[name] for name in _SWITCHES}
_FLAGS = {  # a setting's variant flags: the switch each sets (unnamed switches take their defaults)
    "reduce": ("REDUCE", "step"),
    "words": ("WORDS", True),
    "hints": ("HINTS", True),
    **{lookup: ("LOOKUP", lookup) for lookup in LOOKUPS},
}


def switches() -> dict[str, Any]:
    """The kernel's switches as they are now (what a benchmark records beside its figures)."""
    return {name: globals()[name] for name in _SWITCHES}


def configure(setting: str) -> dict[str, Any]:
    """Set every switch from a benchmark setting ``"bk,bn,warps,stages,programs[,gemv[,flags]]"``.

    ``TILE`` and ``TILE_T`` become ``(bk, bn)``; ``gemv`` is 1 or 0 (default 1); ``flags`` joins with
    ``+`` any of ``reduce`` (`REDUCE` ``"step"``), ``words`` (`WORDS`), ``hints`` (`HINTS`) and one of
    `LOOKUPS` (default ``gather``), or is ``loop`` for none. Switches a setting does not name go back
    to their defaults, so settings never leak into each other. Returns `switches`. The empty string
    restores the defaults.

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
    problems += [f"unknown flag {f!r} (expected loop or any of {', '.join(_FLAGS)})" for f in flags if f not in _FLAGS]
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
        values.update(TILE=(bk, bn), TILE_T=(bk, bn), WARPS=warps, STAGES=stages, PROGRAMS=programs)
        values["GEMV"] = bool(gemv[0]) if gemv else True
    values.update(_FLAGS[f] for f in flags)
    globals().update(values)
    return switches()


def matmul(
    x: Array,
    q: Quantized,
    *,
    transpose: bool = False,
    out_dtype: Any = None,
    lookup: str | None = None,
    splits: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """``x·W`` (``x: (m, K)``) or, with ``transpose``, ``x·Wᵀ`` (``x: (m, N)``) for a 2-D ``W: (K, N)``.

    ``W`` is dequantized tile by tile to ``x``'s dtype (the values `dequantize_weight` gives), the
    products accumulate in float32, the result is ``out_dtype`` (default ``x``'s). ``lookup`` picks
    how NF4 codes become values (`LOOKUP`), ``splits`` how many programs share the contraction
    (default: enough for about `PROGRAMS`), ``interpret`` runs Pallas's interpreter (default: unless
    on a GPU). `REDUCE`, `WORDS` and `HINTS` are read when traced. Raises ValueError for shapes
    `covers` refuses.
    """
    from jax.experimental import pallas as pl

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    lookup = lookup or LOOKUP
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup={lookup!r}: expected one of {LOOKUPS}.")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    m = x.shape[0]
    why = covers(q, min(m, MAX_ROWS), x.dtype)
    if why is not None or x.ndim != 2 or x.shape[1] != q.inner[1 if transpose else 0]:
        raise ValueError(
            f"the fused dequantize-and-multiply kernel does not cover x {x.shape} against {q!r}"
            f" (transpose={transpose}): {why or 'x does not match W'}; use `reference` (jaxlora.apply falls back"
            " to it by itself)."
        )
    k, n = q.inner
    bk, bn = _tiles(q, transpose)
    bm = 1 if m == 1 and GEMV else _rows_block(m)
    mp = -(-m // bm) * bm
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    out_n = k if transpose else n
    out_tile = bk if transpose else bn
    reduce, chunk = (n, bn) if transpose else (k, bk)
    s = splits or _splits((mp // bm) * (out_n // out_tile), reduce, chunk)
    if reduce % (s * chunk):
        raise ValueError(
            f"splits={s} does not divide the contraction of {reduce} into steps of {chunk}; use a divisor."
        )
    part = reduce // s  # the contraction's share of one program
    steps = part // chunk
    # W's region a program reads: forward (part rows, bn columns) at (split, j); transposed (bk, part) at (j, split)
    region = (bk, part) if transpose else (part, bn)
    at = (lambda i, j, t: (j, t)) if transpose else (lambda i, j, t: (t, j))
    # the codes' phases: columns of W that one loaded element holds (a byte: 2 NF4 or 1 int8; a word: 8 or 4)
    words = WORDS and (q.format == "int8" or q.block_size % 8 == 0)
    phases = (8 if words else 2) if q.format == "nf4" else (4 if words else 1)

    operands, specs = [xp], [pl.BlockSpec((bm, part), lambda i, j, t: (i, t))]
    f32 = jnp.float32
    per = 1 if q.format == "int8" else 2  # W's columns a stored byte holds
    codes = q.codes.reshape(k, n // per)
    if words:  # little-endian: byte b of a word is its bits 8b..8b+7 (XLA's bitcast on every backend)
        codes = lax.bitcast_convert_type(codes.reshape(k, n // per // 4, 4), jnp.uint32)
    operands += [codes]
    specs += [pl.BlockSpec((region[0], region[1] // phases), at)]
    if q.format == "int8":
        # one row of scales per phase: scale[p, w] is column phases·w + p's
        operands += [q.scale.reshape(n // phases, phases).T]
        specs += [pl.BlockSpec((phases, region[1] // phases), lambda i, j, t: (0, at(i, j, t)[1]))]
    else:
        bs, nbr = q.block_size, n // q.block_size
        absmax = q.scale[: k * nbr].reshape(k, nbr)
        operands += [absmax]
        specs += [pl.BlockSpec((region[0], region[1] // bs), at)]
        consts = np.zeros(32, np.float32)
        consts[:16] = NF4
        consts = jnp.asarray(consts)
        if q.double_quant:
            consts = consts.at[16].set(q.scale_mean.reshape(())[()].astype(f32))
            groups = q.scale_scale.shape[0]
            padded = 1 << max(4, (groups - 1).bit_length())
            operands += [jnp.pad(q.scale_scale.astype(f32), (0, padded - groups))]
            specs += [pl.BlockSpec((padded,), lambda i, j, t: (0,))]
        operands += [consts]
        specs += [pl.BlockSpec((32,), lambda i, j, t: (0,))]
    top = float(jnp.finfo(q.dtype).max)
    kernel = functools.partial(
        _kernel, fmt=q.format, double=q.format == "nf4" and q.double_quant, steps=steps, tile=(bk, bn),
        transpose=transpose, part=part, bs=q.block_size, nbr=n // q.block_size, dtype=jnp.dtype(x.dtype), top=top,
        lookup=lookup, gemv=m == 1 and GEMV, phases=phases, words=words, reduce_step=REDUCE == "step",
        hints=HINTS, interpret=interpret,
    )  # fmt: skip
    one = s == 1
    out_shape = jax.ShapeDtypeStruct((mp, out_n) if one else (s, mp, out_n), out_dtype if one else f32)
    out_spec = (
        pl.BlockSpec((bm, out_tile), lambda i, j, t: (i, j))
        if one
        else pl.BlockSpec((None, bm, out_tile), lambda i, j, t: (t, i, j))
    )
    params = {} if interpret else {"compiler_params": _compiler_params(WARPS, STAGES)}
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
    *refs, fmt, double, steps, tile, transpose, part, bs, nbr, dtype, top, lookup, gemv, phases, words,
    reduce_step, hints, interpret,
):  # fmt: skip
    from jax.experimental import pallas as pl

    x_ref, o_ref = refs[0], refs[-1]
    bk, bn = tile
    width = bn // phases  # the columns of W a step gives each phase
    f32 = jnp.float32
    j, t = pl.program_id(1), pl.program_id(2)
    # the program's region of W starts at (row0, col0)
    row0, col0 = (j * bk, t * part) if transpose else (t * part, j * bn)

    def weights(r, c):
        """W[r : r + bk, c : c + bn] of the region (local offsets) in the activations' dtype, as its
        `phases` tiles of (bk, width): tile p holds the columns c + phases·w + p."""
        codes = refs[1][pl.ds(r, bk), pl.ds(c // phases, width)]  # an element holds `phases` columns
        if fmt == "int8":
            scale_ref = refs[2]
            if words:  # byte p of each word, sign-extended
                cols = [(codes >> (8 * p)).astype(jnp.int32) & 255 for p in range(4)]
                cols = [v - ((v & 128) << 1) for v in cols]
            else:
                cols = [codes]
            return [
                jnp.clip(v.astype(f32) * scale_ref[pl.ds(p, 1), pl.ds(c // phases, width)], -top, top).astype(dtype)
                for p, v in enumerate(cols)
            ]
        absmax_ref, consts_ref = refs[2], refs[-2]
        amax = absmax_ref[pl.ds(r, bk), pl.ds(c // bs, bn // bs)]
        if double:
            ss_ref = refs[3]
            rows = row0 + r + lax.broadcasted_iota(jnp.int32, amax.shape, 0)
            blocks = (col0 + c) // bs + lax.broadcasted_iota(jnp.int32, amax.shape, 1)
            step = ss_ref[(rows * nbr + blocks) // DQ_GROUP]
            mean = consts_ref[pl.ds(16, 1)].reshape(1, 1)
            amax = amax.astype(f32) * step + mean
        amax = jnp.broadcast_to(amax[:, :, None], (bk, bn // bs, bs // phases)).reshape(bk, width)

        def value(idx):
            if lookup == "gather":
                vals = consts_ref[idx]
            elif lookup == "tree":
                vals = _nf4_tree(idx)
            else:
                vals = jnp.zeros(idx.shape, f32)
                for code, v in enumerate(NF4.tolist()):
                    vals = jnp.where(idx == code, v, vals)
            return jnp.clip(vals * amax, -top, top).astype(dtype)

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
        return lax.dot_general(a, w, (((1,), (contract_w,)), ((), ())), preferred_element_type=f32)

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


def dot(x: Array, q: Quantized, out_dtype: Any = None) -> Array:
    """``x·W`` for ``x: (..., K)`` and a 2-D quantized ``W: (K, N)``, by the kernel where `mode` picks it.

    Differentiable in ``x`` (``dx = g·Wᵀ``, by the same kernel) and, only when asked, in ``W``'s
    float leaves (through `reference`); the frozen base costs no gradient otherwise.
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    rows = math.prod(x.shape[:-1])
    how = mode(q, rows, x.dtype)
    if how == "xla":
        return reference(x, q, out_dtype)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    y = _dot(x.reshape(rows, x.shape[-1]), leaves, treedef, out_dtype, how == "interpret")
    return y.reshape(*x.shape[:-1], q.inner[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dot(x, leaves, treedef, out_dtype, interpret):
    q = jax.tree_util.tree_unflatten(treedef, leaves)
    return matmul(x, q, out_dtype=out_dtype, interpret=interpret)


def _dot_fwd(x, leaves, treedef, out_dtype, interpret):
    need_w = any(p.perturbed for p in leaves)
    x, leaves = x.value, [p.value for p in leaves]
    q = jax.tree_util.tree_unflatten(treedef, leaves)
    return matmul(x, q, out_dtype=out_dtype, interpret=interpret), (x, leaves, need_w)


def _dot_bwd(treedef, out_dtype, interpret, res, g):
    x, leaves, need_w = res
    if isinstance(g, SymbolicZero):
        return None, [None] * len(leaves)
    q = jax.tree_util.tree_unflatten(treedef, leaves)
    dx = matmul(g.astype(x.dtype), q, transpose=True, out_dtype=x.dtype, interpret=interpret)
    dleaves = [None] * len(leaves)
    if need_w:  # someone differentiates the quantized leaves themselves: XLA's path, exactly
        floats = [i for i, v in enumerate(leaves) if jnp.issubdtype(v.dtype, jnp.floating)]

        def f(*fl):
            full = list(leaves)
            for i, v in zip(floats, fl):
                full[i] = v
            return reference(x, jax.tree_util.tree_unflatten(treedef, full), out_dtype)

        grads = jax.vjp(f, *(leaves[i] for i in floats))[1](g.astype(out_dtype))
        for i, d in zip(floats, grads):
            dleaves[i] = d
    return dx, dleaves


_dot.defvjp(_dot_fwd, _dot_bwd, symbolic_zeros=True)
