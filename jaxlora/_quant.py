"""`quantize`: which weights of a tree become `Quantized` (NF4 or int8), and the tree-wide helpers.

The format, its codecs (`encode`, `dequantize_weight`) and the node live in `_quantized`, the lower
room that `_core`, `_tree` and the trace use; this module adds the selection, which may trace ``fn``
(`_core`) to find the weights that feed a matmul. `quantize` refuses non-finite weights; inside
`jaxlora.apply` each use of a quantized weight is dequantized where it is used
(``jaxlora/_trace/_quantized.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._config import matches
from ._core import _probe, linear_weights
from ._quantized import (
    DQ_GROUP,
    FORMATS,
    Quantized,
    _outer_count,
    dequantize_weight,
    encode,
    is_quantized,
)
from ._tree import _names, module_path, weights

DEFAULT_TARGETS = (".*",)  # every floating leaf of >= 2 axes named kernel or weight...
DEFAULT_EXCLUDE = ("lm_head", "head", "logits_dense")  # ...but the output head (bitsandbytes keeps lm_head in
# full precision; MaxText names it decoder/logits_dense)
_MATRIX_NAMES = ("kernel", "weight")  # embedding tables (nn.Embed's "embedding") stay in full precision


def _leaves_with_paths(params: Any):
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
    fn: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
) -> Any:
    """``params`` with each targeted weight replaced by a `Quantized` one (the rest unchanged).

    Given ``fn`` (``fn(params, *args)``, such as ``model.apply``; traced abstractly, nothing computed),
    the weights quantized by default are exactly those that feed a matmul in ``fn``, as
    ``"all-linear"`` takes them: whatever their leaf names (an Einsum's ``w``, ``gating_einsum``),
    leaving in full precision the lookup tables (a tied embedding too), the output head (a weight
    whose matmul alone gives ``fn``'s output over the vocabulary, ``logits_dense`` as ``lm_head``),
    norm scales (stacked ``(layers, d)`` ones too) and biases; the trace also tells whether a weight's
    first axis is a stacked-layer axis (a scanned layer's ``(layers, in, out)``) or not (a
    DenseGeneral's ``(in, heads, head_dim)``), which sets the blocks' layout.
    Without ``fn``, every floating leaf of two or more axes named ``kernel`` or ``weight`` is quantized
    and a weight of three or more axes counts as stacked;
    embedding tables and modules matching ``exclude`` (the output head ``lm_head``/``head``/``logits_dense``, as
    bitsandbytes leaves it) stay in full precision, as do biases and norm scales. ``targets`` and
    ``exclude`` are regexes over module paths, as in `LoraConfig`; a weight they name explicitly is
    quantized whatever its leaf name. Each weight is encoded on its device by a jitted function
    (stacked layers one at a time, so float32 temporaries are one layer's), and ``donate=True``
    deletes each float array once its quantized copy exists, so a model never needs its float and
    quantized copies whole at once. (A jit donation would not help: the codes are smaller than ``W``,
    so XLA cannot reuse its buffer.) Tied weights (leaves holding one buffer) are quantized once and
    stay tied; a buffer is deleted only once no leaf still to be quantized or left in float holds it.

    Weights holding a NaN or inf are refused, all named in one error, before anything is encoded or
    deleted. Under a trace (``jax.jit``, ``jax.eval_shape``) values cannot be checked: a NF4 block
    (with double quantization, its group of 256 blocks) or int8 channel holding one dequantizes to
    NaN instead. A ``jax.ShapeDtypeStruct`` leaf gives a `Quantized` of ``ShapeDtypeStruct``s
    (a restore target).

    Args:
      params: a params pytree (Linen variables, ``nnx.State``, any pytree of arrays).
      format: ``"nf4"`` (4-bit NormalFloat, bitsandbytes' layout) or ``"int8"`` (per output channel).
      block_size: NF4 elements per absmax (64, as bitsandbytes); must divide each weight's slice.
      double_quant: NF4's double quantization of the absmax values (4.127 instead of 4.5 bits).
      targets, exclude: regexes over module paths, as in `LoraConfig`.
      donate: delete each float weight (``jax.Array.delete``) once it is quantized.
      fn, args: optional: a function ``fn(params, *args)`` that uses the weights (``args`` may be
        ``jax.ShapeDtypeStruct``); see above. A restore target must be made with the same ``fn``.

    Returns:
      The same tree with `Quantized` leaves.

    Raises:
      ValueError: an unknown format, a block size that does not divide a weight, a weight holding a
        NaN or inf, a tree already quantized, a target that is not floating or matches nothing, or a
        default selection that quantizes nothing.

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
    linear, roles = _traced(fn, params, args) if fn is not None else (None, {})
    chosen, problems, stacked = [], [], {}
    for i, (path, _, leaf) in enumerate(leaves):
        if not hasattr(leaf, "shape") or not any(matches(p, path) for p in targets):
            continue
        if any(matches(p, path) for p in exclude):
            continue
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        if not explicit and linear is not None and linear.get(path, "-"):
            continue  # traced: only the weights that feed a matmul ("all-linear"'s choice)
        if not explicit and (len(leaf.shape) < 2 or not floating or linear is None and not _is_matrix(leaves[i][1])):
            continue
        if not floating:
            problems.append(f"{path!r}: dtype {leaf.dtype} is not floating; only float weights can be quantized.")
            continue
        if len(leaf.shape) < 2:
            continue  # biases and norm scales stay in full precision even when a pattern names them
        k = stacked[i] = int(roles[path][0] == "s") if path in roles else _outer_count(leaf.shape)
        n = math.prod(leaf.shape[k:])
        if format == "nf4" and n % block_size:
            slice_ = "one layer of the stack" if k else "the whole weight"
            problems.append(
                f"{path!r}: a slice must hold a multiple of block_size={block_size} elements ({n} elements a "
                f"slice here: {slice_}, shape {tuple(leaf.shape)}); pick a block_size that divides {n}, or keep "
                f"this weight in float with exclude={re.escape(path)!r}."
            )
            continue
        chosen.append(i)
    if explicit:
        unmatched = [p for p in targets if not any(matches(p, path) for path, _, _ in leaves)]
        problems += [f"target {p!r} matches no leaf of params." for p in unmatched]
    elif not chosen and not problems:
        problems.append(_nothing_chosen(leaves, linear, exclude))
    if not problems:
        problems = _non_finite([(leaves[i][0], leaves[i][2]) for i in chosen])
    if problems:
        raise ValueError("jaxlora.quantize:\n  " + "\n  ".join(problems))
    out = [leaf for _, _, leaf in leaves]
    users: dict[Any, set[int]] = {}  # each buffer -> the leaves holding it (tied weights share one)
    for i, leaf in enumerate(out if donate else ()):
        for b in _buffers(leaf):
            users.setdefault(b, set()).add(i)
    done: dict[int, Quantized] = {}  # id of a float array -> its quantized copy, so tied weights stay tied
    finished: set[int] = set()
    for i in chosen:
        w = out[i]
        finished.add(i)
        if id(w) not in done:
            run = _encoder(format, block_size, double_quant, stacked[i])
            done[id(w)] = jax.eval_shape(run, w) if isinstance(w, jax.ShapeDtypeStruct) else run(jnp.asarray(w))
        out[i] = done[id(w)]
        if not donate:
            continue
        later = {j for b in _buffers(w) for j in users[b]} - finished
        if not later and _concrete(w):
            w.delete()  # its quantized copy exists and no other leaf holds it: free it before the next weight
    return jax.tree_util.tree_unflatten(treedef, out)


_ALL_FINITE = jax.jit(lambda w: jnp.all(jnp.isfinite(w)))


_TRACER = getattr(jax.core, "Tracer", ())


def _concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, _TRACER)


def _non_finite(named: list[tuple[str, Any]]) -> list[str]:
    """A line for each weight holding a NaN or inf (concrete ones; under a trace `encode` marks them)."""
    concrete = [(path, w) for path, w in named if _concrete(w) or isinstance(w, np.ndarray)]
    flags = [(path, w, _ALL_FINITE(w)) for path, w in concrete]  # dispatched together, read after
    return [
        f"{path!r}: {int(jnp.sum(~jnp.isfinite(w)))} of {w.size} values are NaN or inf; quantize finite weights."
        for path, w, ok in flags
        if not bool(ok)
    ]


def _buffers(x: Any) -> set:
    """The device buffers behind a concrete array (``(device id, address)``; empty for anything else)."""
    if not _concrete(x) or x.is_deleted():
        return set()
    return {(s.device.id, s.data.unsafe_buffer_pointer()) for s in x.addressable_shards}


def _is_matrix(keypath) -> bool:
    return _names(keypath)[-1] in _MATRIX_NAMES


_ENCODERS: dict[tuple, Callable] = {}


def _encoder(format: str, block_size: int, double_quant: bool, stacked: int) -> Callable:
    key = (format, block_size, double_quant, stacked)
    if key not in _ENCODERS:
        _ENCODERS[key] = jax.jit(
            lambda w: encode(w, format, block_size=block_size, double_quant=double_quant, stacked=stacked)
        )
    return _ENCODERS[key]


def _traced(fn: Callable[..., Any], params: Any, args: tuple[Any, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """What a probe of ``fn`` tells about each weight: `_core.linear_weights` (path -> why it is left
    out, ``""`` if quantized) and the roles of the weights whose every axis it saw used."""
    candidates = weights(params)
    ctx = _probe(fn, params, args, candidates)
    linear = linear_weights(ctx, {p: tuple(w.leaf.shape) for p, w in candidates.items()})
    roles = {
        p: "".join(ctx.usage[p][k] for k in range(len(w.leaf.shape)))
        for p, w in candidates.items()
        if len(ctx.usage.get(p, {})) == len(w.leaf.shape)
    }
    return linear, roles


def _nothing_chosen(leaves: list, linear: dict[str, str] | None, exclude: tuple[str, ...]) -> str:
    """The error line for a default selection that quantizes nothing."""
    arrays = [(path, leaf) for path, _, leaf in leaves if hasattr(leaf, "shape") and len(leaf.shape) >= 2]
    shown = [f"{path} {tuple(leaf.shape)}" for path, leaf in arrays[:6]] + (["..."] if len(arrays) > 6 else [])
    if linear is None:
        return (
            f"the default selection (leaves of >= 2 axes named {_MATRIX_NAMES}, not matching exclude={exclude}) "
            f"quantizes nothing in params, whose weights are {shown or 'none'}. Pass fn= (and args=) so the trace "
            "finds the weights that feed a matmul, whatever their names: jaxlora.quantize(params, fmt, "
            "fn=model.apply, args=(x,)); or name them: targets=[...]."
        )
    left = [f"{p} ({why})" for p, why in linear.items() if why]
    return (
        f"fn feeds no matmul with a weight of params that is not left out (left out: {left or 'none'}; "
        f"exclude={exclude}); params' weights are {shown or 'none'}. Check that fn uses params, or name the "
        "weights to quantize: targets=[...]."
    )


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
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            module = name.replace(".", "/")
            skip = any(matches(p, module.rsplit("/", 1)[0]) for p in exclude) or "embed" in name
            if t.ndim >= 2 and np.issubdtype(t.dtype, np.floating) and not skip:
                one = {name: t}  # validated as quantize does, errors naming the tensor
                kw = dict(block_size=block_size, double_quant=double_quant, targets=re.escape(name), exclude=())
                out[name] = quantize(one, format, **kw)[name]
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
