"""The `Quantized` pytree node and its codecs: a frozen weight stored as codes and scales.

A quantized weight keeps ``W``'s leading *outer* axis (the stacked-layer axis of a scanned model,
``W.ndim >= 3``) outside its blocks, so ``W[i]`` (a ``scan`` step) is the same codes and scales
sliced at ``i``; the blocks run over the rest of each slice, flattened in row-major order:

* ``"nf4"`` (bitsandbytes' layout): ``codes`` uint8 ``(*outer, n // 2)``, two 4-bit indices into
  `NF4` a byte (the first element in the high nibble); one absmax per block of ``block_size``
  (64) elements. With ``double_quant`` the absmax values, minus their mean, are 8-bit quantized in
  groups of 256 with one float32 scale each: ``scale`` int8 ``(*outer, groups * 256)``,
  ``scale_scale`` float32 ``(*outer, groups)``, ``scale_mean`` float32 ``(*outer, 1)``; the block's
  absmax is ``scale · scale_scale + scale_mean`` (rounded up when coded, so never below the true one);
  4 + 8/64 + 32/(64·256) = 4.127 bits a parameter. Without it, ``scale`` is float32 ``(*outer, n / 64)``.
* ``"int8"`` (weight-only): ``codes`` int8 of ``W``'s shape; ``scale`` float32, one per output
  channel (``W``'s last axis, Flax's ``(in, out)`` layout) and outer index.

Each codec is written for the full float range: blocks holding values near float32's maximum code
and decode without overflow, magnitudes below float32's smallest normal (``2**-126``) code as zero,
and a decoded weight is clipped to its dtype's range. `encode`, which runs under a trace, cannot raise
on values: it makes the block (NF4), the group of 256 blocks (NF4 with double quantization) or the
channel (int8) holding a NaN or inf decode to NaN.

The lowest room of quantization: it imports nothing of jaxlora, so `_tree`, `_core` and the trace
use it, and `_quant` (the selection, which traces through `_core`) sits above them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("nf4", "int8")
DQ_GROUP = 256  # absmax values per double-quantization group (bitsandbytes' nested blocksize)

# bitsandbytes' NF4 code values (functional.py, get_4bit_type("nf4")): normal quantiles scaled to [-1, 1].
NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)  # fmt: skip
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2


@jax.tree_util.register_pytree_node_class
class Quantized:
    """A quantized frozen weight: a pytree node whose leaves are its codes and scales.

    Attributes:
      codes: the packed codes (see the module docstring for each format's layout).
      scale: per-block absmax (NF4; int8-coded under double quantization) or per-channel scales (int8).
      scale_scale, scale_mean: the double quantization's float32 group scales and mean, or None.
      format: ``"nf4"`` or ``"int8"``; static.
      inner: the shape of one outer slice of ``W`` (``W.shape[1:]`` if stacked, else ``W.shape``); static.
      dtype: ``W``'s dtype, which `dequantize` restores; static.
      block_size: NF4's block size; static.

    ``shape``, ``dtype``, ``ndim`` and ``size`` are those of the float weight, so shape-reading code
    (``jaxlora.init``, ``summary``) treats it as ``W``; ``nbytes`` counts the stored leaves.

    Example:
      >>> import jax.numpy as jnp, jaxlora
      >>> q = jaxlora.quantize({"kernel": jnp.ones((64, 128))}, "nf4")["kernel"]
      >>> q.shape, q.codes.shape, q.codes.dtype
      ((64, 128), (4096,), dtype('uint8'))
    """

    def __init__(self, codes, scale, scale_scale=None, scale_mean=None, *, format, inner, dtype, block_size=64):
        self.codes, self.scale, self.scale_scale, self.scale_mean = codes, scale, scale_scale, scale_mean
        self.format, self.inner, self.dtype, self.block_size = format, tuple(inner), jnp.dtype(dtype), block_size

    def tree_flatten(self):
        aux = (self.format, self.inner, self.dtype, self.block_size)
        return (self.codes, self.scale, self.scale_scale, self.scale_mean), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        fmt, inner, dtype, block = aux
        return cls(*children, format=fmt, inner=inner, dtype=dtype, block_size=block)

    @property
    def outer(self) -> tuple[int, ...]:
        """The outer (stacked) axes kept outside the blocks: ``()`` or ``(layers,)``."""
        n = self.codes.ndim - (1 if self.format == "nf4" else len(self.inner))
        return tuple(self.codes.shape[:n])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.outer + self.inner

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.scale_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored leaves (codes and every scale)."""
        leaves = (self.codes, self.scale, self.scale_scale, self.scale_mean)
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves if x is not None)

    def describe(self) -> dict[str, Any]:
        """How it was quantized, for checkpoint fingerprints: ``{"format", "block_size", "double_quant"}``."""
        if self.format == "int8":
            return {"format": "int8"}
        return {"format": self.format, "block_size": self.block_size, "double_quant": self.double_quant}

    def __repr__(self) -> str:
        extra = f", block_size={self.block_size}, double_quant={self.double_quant}" if self.format == "nf4" else ""
        shape = self.shape if hasattr(self.codes, "ndim") else f"outer+{self.inner}"
        return f"Quantized({self.format}, shape={shape}, dtype={self.dtype.name}{extra})"


def is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def _outer_count(shape: Sequence[int]) -> int:
    return 1 if len(shape) >= 3 else 0


_TINY = float(np.finfo(np.float32).tiny)  # smaller magnitudes code as 0 (CPUs flush them to 0 anyway)
_INT8_TOP = np.float32(np.finfo(np.float32).max / 127)  # the largest int8 scale whose code 127 stays finite
with np.errstate(over="ignore"):
    while not np.isfinite(_INT8_TOP * np.float32(127)):
        _INT8_TOP = np.nextafter(_INT8_TOP, np.float32(0))


def _finite_part(x: jax.Array, axes, keepdims: bool) -> tuple[jax.Array, jax.Array]:
    """``x`` with non-finite and subnormal values zeroed, and whether each slice over ``axes`` was finite."""
    ok = jnp.isfinite(x)
    return jnp.where(ok & (jnp.abs(x) >= _TINY), x, 0.0), jnp.all(ok, axis=axes, keepdims=keepdims)


def _pow2(k: jax.Array) -> jax.Array:
    """``2.0**k`` in float32, exactly, for integers ``k`` in [-126, 127]."""
    return jax.lax.bitcast_convert_type((k.astype(jnp.int32) + 127) << 23, jnp.float32)


def _divide(x: jax.Array, v: jax.Array) -> jax.Array:
    """``x / v`` for ``v`` anywhere in float32's normal range (``x`` where ``v`` is 0).

    Computed as ``x · 2**-e / m`` (``v = m · 2**e``, exact steps) because XLA rewrites a division by
    a broadcast value into a product with its reciprocal, which underflows to 0 for ``v > 2**126``.
    """
    m, e = jnp.frexp(v)
    half = e // 2
    return x * _pow2(-half) * _pow2(half - e) / jnp.where(m > 0, m, 1)


def _nested(absmax: jax.Array, finite: jax.Array) -> tuple:
    """Double quantization of a slice's block absmax values: int8 codes of ``absmax - mean`` per group
    of `DQ_GROUP`, rounded *up*, so the recovered absmax ``code·step + mean`` (computed as
    `dequantize_weight` does) is never below the true one and exceeds it by less than one ``step``.
    (Only near float32's maximum, where that would overflow, is it rounded down instead.)

    Returns the int8 codes, the group steps (NaN for a group holding a non-finite block), the mean and
    the recovered absmax of each block.
    """
    nb = absmax.shape[-1]
    pad = -(-nb // DQ_GROUP) * DQ_GROUP - nb
    top = jnp.max(absmax)
    mean = (jnp.mean(_divide(absmax, top)) * top).reshape(1, 1)  # scaled first: a sum near float32's max overflows
    padded = jnp.pad(absmax, (0, pad), constant_values=mean[0, 0]).reshape(-1, DQ_GROUP)
    centred = padded - mean
    step = jnp.max(jnp.abs(centred), axis=-1, keepdims=True) / 127
    step = jnp.where(step >= _TINY, step, 0.0)  # a subnormal step: every absmax of the group is the mean
    q = jnp.where(step > 0, jnp.clip(jnp.ceil(_divide(centred, step)), -127, 127), 0.0)
    recover = lambda q: q * step + mean  # noqa: E731  (dequantize_weight's arithmetic)
    q = q + ((recover(q) < padded) & (q < 127))  # float rounding left it below: one step up
    q = q - (~jnp.isfinite(recover(q)) & (q > -127))  # above float32's max: one step down (codes clamp)
    bad = ~jnp.all(jnp.pad(finite, (0, pad), constant_values=True).reshape(-1, DQ_GROUP), axis=-1)
    rec = recover(q).reshape(-1)[:nb]
    return q.astype(jnp.int8).reshape(-1), jnp.where(bad, jnp.nan, step[:, 0]), mean.reshape(1), rec


def _nf4_encode(w: jax.Array, block: int, double_quant: bool) -> tuple:
    x, finite = _finite_part(w.astype(jnp.float32).reshape(-1, block), -1, False)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    if double_quant:
        scale, step, mean, absmax = _nested(absmax, finite)
    else:
        scale, step, mean = jnp.where(finite, absmax, jnp.nan), None, None
    normed = _divide(x, absmax[:, None])  # coded against the absmax that decoding uses
    idx = jnp.sum(normed[..., None] > jnp.asarray(_NF4_MIDPOINTS)[None, None], axis=-1).astype(jnp.uint8).reshape(-1)
    return (idx[0::2] << 4) | idx[1::2], scale, step, mean


def _int8_encode(w: jax.Array) -> tuple:
    axes = tuple(range(w.ndim - 1))
    x, finite = _finite_part(w.astype(jnp.float32), axes, True)
    scale = jnp.minimum(jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127, _INT8_TOP)
    scale = jnp.where(scale >= _TINY, scale, 0.0)  # a channel whose values are all below 127·2**-126 codes as 0
    codes = jnp.clip(jnp.round(_divide(x, scale)), -127, 127).astype(jnp.int8)
    return codes, jnp.where(finite, scale, jnp.nan), None, None


def encode(
    w: jax.Array, format: str = "nf4", *, block_size: int = 64, double_quant: bool = True, stacked: int | None = None
) -> Quantized:
    """Quantize one weight (traceable: call it inside ``jax.jit``, ``lax.map`` or a layer loop).

    Checks no values: `quantize` validates. A block, double-quantization group or channel holding a
    NaN or inf decodes to NaN. A stacked weight is encoded one layer at a time (``lax.map``), so only
    one layer's float32 temporaries exist at once. ``stacked`` (0 or 1) says whether axis 0 is a
    stacked-layer axis; None: when ``w`` has three or more axes (`quantize` asks the trace when given ``fn``).
    """
    k = _outer_count(w.shape) if stacked is None else stacked
    if k not in (0, 1) or k > w.ndim - 1:
        raise ValueError(f"stacked must be 0 or 1 (and less than w.ndim={w.ndim}), got {stacked!r}.")
    if format == "nf4":
        fn = lambda v: _nf4_encode(v, block_size, double_quant)  # noqa: E731
    else:
        fn = _int8_encode
    leaves = jax.lax.map(fn, w) if k else fn(w)
    return Quantized(*leaves, format=format, inner=w.shape[k:], dtype=w.dtype, block_size=block_size)


def layer(q: Quantized, i: Any) -> Quantized:
    """Layer ``i`` of a stacked ``q`` (its outer axis indexed away, ``i`` may be traced): what
    ``lax.scan`` hands each step when it slices ``q``."""
    if not q.outer:
        raise ValueError(f"{q!r} has no stacked axis to index.")
    return jax.tree_util.tree_map(lambda v: jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False), q)


def dequantize_weight(q: Quantized, dtype: Any = None) -> jax.Array:
    """The float weight of ``q`` in ``dtype`` (default: its own), computed in float32."""
    dtype = jnp.dtype(dtype or q.dtype)
    outer = q.outer
    top = float(jnp.finfo(q.dtype).max)  # a recovered absmax may exceed the largest value of W's dtype
    if q.format == "int8":
        return jnp.clip(q.codes.astype(jnp.float32) * q.scale, -top, top).astype(dtype)
    hi, lo = q.codes >> 4, q.codes & 15
    idx = jnp.stack([hi, lo], axis=-1).reshape(*outer, -1, q.block_size)
    absmax = q.scale
    if q.double_quant:
        groups = q.scale_scale.shape[-1]
        absmax = q.scale.reshape(*outer, groups, DQ_GROUP).astype(jnp.float32) * q.scale_scale[..., None]
        absmax = absmax.reshape(*outer, -1)[..., : idx.shape[-2]] + q.scale_mean
    values = jnp.clip(jnp.asarray(NF4)[idx.astype(jnp.int32)] * absmax[..., None], -top, top)
    return values.reshape(q.shape).astype(dtype)


def nbytes(params: Any) -> int:
    """Bytes of ``params`` as stored: quantized leaves by their codes and scales, the rest as they are."""
    total = 0
    for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized):
        if is_quantized(x):
            total += x.nbytes
        elif hasattr(x, "shape") and hasattr(x, "dtype"):
            total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return total
