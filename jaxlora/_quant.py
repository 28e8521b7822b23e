"""Quantized frozen bases (QLoRA): the `Quantized` pytree node, the NF4 and int8 codecs.

A quantized weight keeps ``W``'s leading *outer* axis (the stacked-layer axis of a scanned model,
``W.ndim >= 3``) outside its blocks, so ``W[i]`` (a ``scan`` step) is the same codes and scales
sliced at ``i``; the blocks run over the rest of each slice, flattened in row-major order:

* ``"nf4"`` (bitsandbytes' layout): ``codes`` uint8 ``(*outer, n // 2)``, two 4-bit indices into
  `NF4` a byte (the first element in the high nibble); one absmax per block of ``block_size``
  (64) elements. With ``double_quant`` the absmax values, minus their mean, are 8-bit quantized in
  groups of 256 with one float32 scale each: ``scale`` int8 ``(*outer, groups * 256)``,
  ``scale_scale`` float32 ``(*outer, groups)``, ``scale_mean`` float32 ``(*outer, 1)``;
  4 + 8/64 + 32/(64·256) = 4.127 bits a parameter. Without it, ``scale`` is float32 ``(*outer, n / 64)``.
* ``"int8"`` (weight-only): ``codes`` int8 of ``W``'s shape; ``scale`` float32, one per output
  channel (``W``'s last axis, Flax's ``(in, out)`` layout) and outer index.

`dequantize` gives ``codes``·``scale`` in ``W``'s dtype; inside `jaxlora.apply` each use of a quantized
weight is dequantized where it is used (``jaxlora/_trace/_quantized.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._config import matches

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

DEFAULT_TARGETS = (".*",)  # every floating leaf of >= 2 axes named kernel or weight...
DEFAULT_EXCLUDE = ("lm_head", "head")  # ...but the output head (bitsandbytes keeps lm_head in full precision)
_MATRIX_NAMES = ("kernel", "weight")  # embedding tables (nn.Embed's "embedding") stay in full precision


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


def _nf4_encode(w: jax.Array, k: int, block: int, double_quant: bool) -> tuple:
    outer = w.shape[:k]
    x = w.astype(jnp.float32).reshape(*outer, -1, block)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    normed = x / jnp.where(absmax == 0, 1, absmax)[..., None]
    mids = jnp.asarray(_NF4_MIDPOINTS).reshape((1,) * normed.ndim + (-1,))
    idx = jnp.sum(normed[..., None] > mids, axis=-1).astype(jnp.uint8)
    idx = idx.reshape(*outer, -1)
    codes = (idx[..., 0::2] << 4) | idx[..., 1::2]
    if not double_quant:
        return codes, absmax, None, None
    mean = jnp.mean(absmax, axis=-1, keepdims=True)
    nb = absmax.shape[-1]
    groups = -(-nb // DQ_GROUP)
    centred = jnp.pad(absmax - mean, [(0, 0)] * k + [(0, groups * DQ_GROUP - nb)]).reshape(*outer, groups, DQ_GROUP)
    s2 = jnp.max(jnp.abs(centred), axis=-1) / 127
    q = jnp.round(centred / jnp.where(s2 == 0, 1, s2)[..., None]).astype(jnp.int8)
    return codes, q.reshape(*outer, -1), s2, mean


def _int8_encode(w: jax.Array, k: int) -> tuple:
    x = w.astype(jnp.float32)
    axes = tuple(range(k, w.ndim - 1))
    scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127
    codes = jnp.clip(jnp.round(x / jnp.where(scale == 0, 1, scale)), -127, 127).astype(jnp.int8)
    return codes, scale, None, None


def encode(w: jax.Array, format: str = "nf4", *, block_size: int = 64, double_quant: bool = True) -> Quantized:
    """Quantize one weight (traceable: call it inside ``jax.jit``, ``lax.map`` or a layer loop).

    Checks nothing: `quantize` validates. A stacked weight (``ndim >= 3``) is encoded one layer at a
    time (``lax.map``), so only one layer's float32 temporaries exist at once.
    """
    k = _outer_count(w.shape)
    if format == "nf4":
        fn = lambda v, k: _nf4_encode(v, k, block_size, double_quant)  # noqa: E731
    else:
        fn = _int8_encode
    if k:
        leaves = jax.lax.map(lambda v: fn(v, 0), w)
    else:
        leaves = fn(w, 0)
    return Quantized(*leaves, format=format, inner=w.shape[k:], dtype=w.dtype, block_size=block_size)


def dequantize_weight(q: Quantized, dtype: Any = None) -> jax.Array:
    """The float weight of ``q`` in ``dtype`` (default: its own), computed in float32."""
    dtype = jnp.dtype(dtype or q.dtype)
    outer = q.outer
    if q.format == "int8":
        return (q.codes.astype(jnp.float32) * q.scale).astype(dtype)
    hi, lo = q.codes >> 4, q.codes & 15
    idx = jnp.stack([hi, lo], axis=-1).reshape(*outer, -1, q.block_size)
    absmax = q.scale
    if q.double_quant:
        groups = q.scale_scale.shape[-1]
        absmax = q.scale.reshape(*outer, groups, DQ_GROUP).astype(jnp.float32) * q.scale_scale[..., None]
        absmax = absmax.reshape(*outer, -1)[..., : idx.shape[-2]] + q.scale_mean
    values = jnp.asarray(NF4)[idx.astype(jnp.int32)] * absmax[..., None]
    return values.reshape(q.shape).astype(dtype)


def _leaves_with_paths(params: Any):
    from ._tree import module_path

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    return [(module_path(kp), kp, leaf) for kp, leaf in flat], treedef


def quantize(
    params: Any,
    format: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = True,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
    exclude: str | Sequence[str] = DEFAULT_EXCLUDE,
    donate: bool = False,
) -> Any:
    """``params`` with each targeted weight replaced by a `Quantized` one (the rest unchanged).

    By default every floating leaf of two or more axes named ``kernel`` or ``weight`` is quantized;
    embedding tables and modules matching ``exclude`` (the output head ``lm_head``/``head``, as
    bitsandbytes leaves it) stay in full precision, as do biases and norm scales. ``targets`` and
    ``exclude`` are regexes over module paths, as in `LoraConfig`; a weight they name explicitly is
    quantized whatever its leaf name. Each weight is encoded on its device by a jitted function
    (stacked layers one at a time, so float32 temporaries are one layer's), and ``donate=True``
    deletes each float array once its quantized copy exists, so a model never needs its float and
    quantized copies whole at once. (A jit donation would not help: the codes are smaller than ``W``,
    so XLA cannot reuse its buffer.)

    Args:
      params: a params pytree (Linen variables, ``nnx.State``, any pytree of arrays).
      format: ``"nf4"`` (4-bit NormalFloat, bitsandbytes' layout) or ``"int8"`` (per output channel).
      block_size: NF4 elements per absmax (64, as bitsandbytes); must divide each weight's slice.
      double_quant: NF4's double quantization of the absmax values (4.127 instead of 4.5 bits).
      targets, exclude: regexes over module paths, as in `LoraConfig`.
      donate: delete each float weight (``jax.Array.delete``) once it is quantized.

    Returns:
      The same tree with `Quantized` leaves.

    Raises:
      ValueError: an unknown format, a block size that does not divide a weight, a tree already
        quantized, or a target matching nothing. TypeError: a target that is not floating.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 64)), "bias": jnp.zeros(64)}}
      >>> q = jaxlora.quantize(params, "nf4")
      >>> q["dense"]["kernel"], q["dense"]["bias"].dtype
      (Quantized(nf4, shape=(64, 64), dtype=float32, block_size=64, double_quant=True), dtype('float32'))
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown quantization format {format!r}; use one of {FORMATS}.")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even integer, got {block_size!r}.")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    leaves, treedef = _leaves_with_paths(params)
    already = [path for path, _, leaf in leaves if is_quantized(leaf)]
    if already:
        raise ValueError(
            f"params are already quantized ({len(already)} weights, e.g. {already[0]!r}); quantize the float "
            "params once (jaxlora.dequantize(qparams) gives them back)."
        )
    explicit = targets != DEFAULT_TARGETS
    chosen, problems = [], []
    for i, (path, _, leaf) in enumerate(leaves):
        if not hasattr(leaf, "shape") or not any(matches(p, path) for p in targets):
            continue
        if any(matches(p, path) for p in exclude):
            continue
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        name = path.rsplit("/", 1)[-1]
        if not explicit and (len(leaf.shape) < 2 or not floating or not _is_matrix(leaves[i][1])):
            continue
        if not floating:
            problems.append(f"{path!r}: dtype {leaf.dtype} is not floating; only float weights can be quantized.")
            continue
        if len(leaf.shape) < 2:
            continue  # biases and norm scales stay in full precision even when a pattern names them
        k = _outer_count(leaf.shape)
        n = math.prod(leaf.shape[k:])
        if format == "nf4" and n % block_size:
            problems.append(
                f"{path!r}: {n} elements a slice (shape {tuple(leaf.shape)}) is not a multiple of block_size="
                f"{block_size}; pick a block size that divides it or exclude {name!r}."
            )
            continue
        chosen.append(i)
    if explicit:
        unmatched = [p for p in targets if not any(matches(p, path) for path, _, _ in leaves)]
        problems += [f"target {p!r} matches no leaf of params." for p in unmatched]
    if problems:
        raise ValueError("jaxlora.quantize:\n  " + "\n  ".join(problems))
    out = [leaf for _, _, leaf in leaves]
    run = _encoder(format, block_size, double_quant)
    for i in chosen:
        w = out[i]
        out[i] = run(jnp.asarray(w))
        if donate and isinstance(w, jax.Array) and not isinstance(w, getattr(jax.core, "Tracer", ())):
            w.delete()  # its quantized copy exists: free the float buffer before the next weight
    return jax.tree_util.tree_unflatten(treedef, out)


def _is_matrix(keypath) -> bool:
    from ._tree import _names

    return _names(keypath)[-1] in _MATRIX_NAMES


_ENCODERS: dict[tuple, Callable] = {}


def _encoder(format: str, block_size: int, double_quant: bool) -> Callable:
    key = (format, block_size, double_quant)
    if key not in _ENCODERS:
        _ENCODERS[key] = jax.jit(lambda w: encode(w, format, block_size=block_size, double_quant=double_quant))
    return _ENCODERS[key]


def dequantize(params: Any, dtype: Any = None) -> Any:
    """``params`` with every `Quantized` weight turned back into a float array (``dtype``: its own).

    Example:
      >>> import jax, jaxlora
      >>> w = jax.random.normal(jax.random.key(0), (64, 64))
      >>> back = jaxlora.dequantize(jaxlora.quantize({"kernel": w}, "int8"))["kernel"]
      >>> bool(abs(back - w).max() < abs(w).max() / 127)
      True
    """
    return jax.tree_util.tree_map(
        lambda x: dequantize_weight(x, dtype) if is_quantized(x) else x, params, is_leaf=is_quantized
    )


def quantize_file(
    path: str, format: str = "nf4", *, block_size: int = 64, double_quant: bool = True, exclude=DEFAULT_EXCLUDE
) -> dict[str, Any]:
    """Quantize the tensors of a safetensors file, one tensor at a time (each read, quantized, freed).

    Returns a flat dict from tensor name to `Quantized` (float tensors of >= 2 axes whose name does
    not match ``exclude``) or array (the rest, e.g. biases, norms, embeddings named ``*embed*``).

    Example:
      >>> import numpy as np, safetensors.numpy, tempfile, os, jaxlora
      >>> f = os.path.join(tempfile.mkdtemp(), "m.safetensors")
      >>> safetensors.numpy.save_file({"fc.weight": np.ones((8, 64), np.float32)}, f)
      >>> jaxlora.quantize_file(f, "nf4")["fc.weight"].shape
      (8, 64)
    """
    from safetensors import safe_open

    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    out: dict[str, Any] = {}
    run = _encoder(format, block_size, double_quant)
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            module = name.replace(".", "/")
            skip = any(matches(p, module.rsplit("/", 1)[0]) for p in exclude) or "embed" in name
            if t.ndim >= 2 and np.issubdtype(t.dtype, np.floating) and not skip:
                quantize({"w": t}, format, block_size=block_size, double_quant=double_quant)  # validates
                out[name] = run(jnp.asarray(t))
            else:
                out[name] = jnp.asarray(t)
            del t
    return out


def bits_per_parameter(params: Any) -> float:
    """Stored bits a parameter of the quantized weights of ``params`` (NF4 with double quant: ~4.127).

    Example:
      >>> import jax.numpy as jnp, jaxlora
      >>> q = jaxlora.quantize({"kernel": jnp.ones((1024, 1024))}, "nf4")
      >>> round(jaxlora.bits_per_parameter(q), 3)
      4.127
    """
    qs = [x for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized) if is_quantized(x)]
    size = sum(q.size for q in qs)
    return 8 * sum(q.nbytes for q in qs) / size if size else float("nan")


def nbytes(params: Any) -> int:
    """Bytes of ``params`` as stored: quantized leaves by their codes and scales, the rest as they are."""
    total = 0
    for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized):
        if is_quantized(x):
            total += x.nbytes
        elif hasattr(x, "shape") and hasattr(x, "dtype"):
            total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return total


def _devices(mesh, entry) -> int | None:
    """Devices a spec entry splits over (None without a mesh)."""
    if mesh is None:
        return None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[n] for n in names)


def quantized_shardings(qparams: Any, params_shardings: Any) -> Any:
    """Shardings for a quantized tree: each `Quantized` weight's codes and scales follow ``W``'s spec.

    ``params_shardings`` mirrors the float params with a ``NamedSharding`` or ``PartitionSpec`` per
    leaf (or None). A quantized weight's outer (stacked) axis takes ``W``'s entry for axis 0; its
    flattened blocks take the entry of ``W``'s first inner axis when the other inner axes are
    unsharded and every device's share holds whole blocks (and whole double-quantization groups),
    else they are replicated. int8 codes take ``W``'s spec, its scales the outer and last entries.
    Other leaves keep their sharding.

    Returns:
      A tree mirroring ``qparams`` (each `Quantized` holding shardings in place of its arrays).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from jax.sharding import PartitionSpec as P
      >>> q = jaxlora.quantize({"kernel": jnp.ones((4, 256, 128))}, "nf4")
      >>> s = jaxlora.quantized_shardings(q, {"kernel": P(None, "fsdp", "tensor")})["kernel"]
      >>> s.codes, s.scale
      (P(None, None), P(None, None))
      >>> s = jaxlora.quantized_shardings(q, {"kernel": P("layers", "fsdp")})["kernel"]
      >>> s.codes, s.scale_mean
      (P('layers', 'fsdp'), P('layers', None))
    """
    from jax.sharding import NamedSharding, PartitionSpec

    q_leaves, treedef = jax.tree_util.tree_flatten(qparams, is_leaf=is_quantized)
    is_spec = lambda x: x is None or isinstance(x, (PartitionSpec, jax.sharding.Sharding))  # noqa: E731
    s_leaves = jax.tree_util.tree_leaves(params_shardings, is_leaf=is_spec)
    if len(s_leaves) != len(q_leaves):
        raise ValueError(
            f"params_shardings has {len(s_leaves)} leaves but qparams {len(q_leaves)} weights; pass the "
            "shardings of the float params that were quantized (one per weight)."
        )
    out = []
    for q, s in zip(q_leaves, s_leaves):
        if not is_quantized(q):
            out.append(s)
            continue
        mesh = s.mesh if isinstance(s, NamedSharding) else None
        spec = tuple(s.spec) if isinstance(s, NamedSharding) else tuple(s) if isinstance(s, PartitionSpec) else ()
        spec = spec + (None,) * (q.ndim - len(spec))
        k = len(q.outer)
        size = lambda e, m=mesh: _devices(m, e)  # noqa: E731
        o = spec[:k]
        if q.format == "int8":
            specs = (spec, (*o, *([None] * (len(q.inner) - 1)), spec[-1]), None, None)
        else:
            e = spec[k] if all(x is None for x in spec[k + 1 :]) else None
            n, nb = math.prod(q.inner), math.prod(q.inner) // q.block_size
            d = size(e)
            whole = d is not None and e is not None and nb % d == 0
            if q.double_quant:
                whole = whole and nb % DQ_GROUP == 0 and (nb // DQ_GROUP) % d == 0
            if mesh is None and e is not None:  # no mesh to count devices: shard only where nothing can break
                whole = q.double_quant and nb % DQ_GROUP == 0 or not q.double_quant
            f = e if whole and n % 2 == 0 else None
            specs = ((*o, f), (*o, f), (*o, f) if q.double_quant else None, (*o, None) if q.double_quant else None)
        make = (
            (lambda p: PartitionSpec(*p)) if mesh is None else (lambda p, m=mesh: NamedSharding(m, PartitionSpec(*p)))
        )  # noqa: E731
        out.append(
            Quantized(
                *(None if p is None else make(p) for p in specs),
                format=q.format,
                inner=q.inner,
                dtype=q.dtype,
                block_size=q.block_size,
            )  # fmt: skip
        )
    return jax.tree_util.tree_unflatten(treedef, out)
