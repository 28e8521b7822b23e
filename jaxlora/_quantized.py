"""The `Quantized` pytree node: a frozen weight stored as codes and scales (see `_quant` for the codecs).

A quantized weight keeps ``W``'s leading *outer* axis (the stacked-layer axis of a scanned model,
``W.ndim >= 3``) outside its blocks, so ``W[i]`` (a ``scan`` step) is the same codes and scales
sliced at ``i``; the blocks run over the rest of each slice, flattened in row-major order:

* ``"nf4"`` (bitsandbytes' layout): ``codes`` uint8 ``(*outer, n // 2)``, two 4-bit indices into
  `_quant.NF4` a byte (the first element in the high nibble); one absmax per block of ``block_size``
  (64) elements. With ``double_quant`` the absmax values, minus their mean, are 8-bit quantized in
  groups of 256 with one float32 scale each: ``scale`` int8 ``(*outer, groups * 256)``,
  ``scale_scale`` float32 ``(*outer, groups)``, ``scale_mean`` float32 ``(*outer, 1)``; the block's
  absmax is ``scale · scale_scale + scale_mean`` (rounded up when coded, so never below the true one);
  4 + 8/64 + 32/(64·256) = 4.127 bits a parameter. Without it, ``scale`` is float32 ``(*outer, n / 64)``.
* ``"int8"`` (weight-only): ``codes`` int8 of ``W``'s shape; ``scale`` float32, one per output
  channel (``W``'s last axis, Flax's ``(in, out)`` layout) and outer index.

Kept apart from the codecs so that `_tree` (which treats a `Quantized` weight as one leaf) need not
import `_quant`, which uses `_tree`'s module paths.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


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
