"""Shardings for the LoRA tree, derived from the frozen weights' own.

A targeted weight ``W`` has one mesh-axis entry per axis (its ``PartitionSpec``) and one role per axis
(`LoraFactors.roles`: ``"s"`` stacked, ``"i"`` input, ``"o"`` output). The factors take the entries of
the axes they share with ``W``, in their own order, and the rank axis gets the user's rule (replicated
by default)::

    W    roles "sio", spec P(None, "fsdp", "tensor")      # a scanned Dense kernel (layers, in, out)
    a    (*S, *I, r)  ->  P(None, "fsdp", None)             # follows W's stacked and input axes
    b    (*S, r, *O)  ->  P(None, None, "tensor")           # follows W's stacked and output axes

so ``x·a`` is computed where ``x·W`` is, the rank-``r`` intermediate is all that crosses devices, and
the specs are made for the factors' shapes (a scanned stack's 4-D spec is never applied to a 2-D factor).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._config import LoraConfig
from ._matmul import LoraFactors
from ._saved import SavedModule
from ._tree import WEIGHT_NAMES, is_array, module_path, nearest

Entry = str | tuple[str, ...] | None  # one PartitionSpec entry: mesh axis name(s) or None
RankRule = Entry | Callable[[str], Entry]
Rules = Any  # Flax logical axis rules: a sequence of (logical name, mesh axis or axes or None)


def _flax_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Flax's boxed-parameter types, if Flax is imported (a tree of them means it is)."""
    boxes: tuple[type, ...] = ()
    variables: tuple[type, ...] = ()
    if "flax" in sys.modules:
        from flax.core import meta

        boxes = (meta.Partitioned,)
        if "flax.nnx" in sys.modules:
            from flax import nnx

            variables = (nnx.Variable,)
    return boxes, variables


def _is_leaf(x: Any) -> bool:
    boxes, variables = _flax_types()
    return x is None or isinstance(x, (PartitionSpec, jax.sharding.Sharding, *boxes, *variables)) or is_array(x)


def _logical(names: tuple[Any, ...], rules: Rules | None) -> tuple[Entry, ...]:
    from flax import linen as nn

    return tuple(nn.logical_to_mesh_axes(names, rules))


def _read(x: Any, rules: Rules | None) -> tuple[tuple[Entry, ...] | None, Mesh | None, str]:
    """``(entries, mesh, what)`` for one leaf of a shardings/params tree; entries None: unreadable."""
    boxes, variables = _flax_types()
    if x is None:
        return (), None, "None (replicated)"
    if isinstance(x, NamedSharding):
        return tuple(x.spec), x.mesh, f"{x.spec}"
    if isinstance(x, jax.sharding.SingleDeviceSharding):
        return (), None, "a single-device sharding"
    if isinstance(x, jax.sharding.Sharding):
        return None, None, f"a {type(x).__name__}"
    if isinstance(x, PartitionSpec):
        return (_logical(tuple(x), rules) if rules is not None else tuple(x)), None, f"{x}"
    if boxes and isinstance(x, boxes):  # nn.Partitioned (mesh names) / nn.LogicallyPartitioned (logical names)
        own_rules = getattr(x, "rules", None)
        if hasattr(x, "rules"):  # LogicallyPartitioned: rules from the argument, the box, or flax's context
            return (
                _logical(tuple(x.names), rules if rules is not None else own_rules),
                x.mesh,
                f"{type(x).__name__}{x.names}",
            )
        return tuple(x.names), x.mesh, f"Partitioned{x.names}"
    if variables and isinstance(x, variables):  # nnx.Variable: sharding metadata, else its value's sharding
        meta = x.get_metadata()
        names = next((meta[k] for k in ("out_sharding", "sharding_names", "sharding") if meta.get(k)), None)
        if names is None:
            return _read(x.get_value() if hasattr(x, "get_value") else x.value, rules)
        own_rules = rules if rules is not None else meta.get("sharding_rules")
        entries = _logical(tuple(names), own_rules) if own_rules is not None else tuple(names)
        return entries, meta.get("mesh"), f"{type(x).__name__}(sharding={tuple(names)})"
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(x, "sharding", None)
        return _read(sharding, rules) if sharding is not None else ((), None, "no sharding (replicated)")
    if is_array(x):
        return (), None, "a host array (replicated)"
    return None, None, f"a {type(x).__name__}"


def _axis_names(entry: Entry) -> tuple[str, ...]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def shardings(
    params_or_shardings: Any,
    lora: Mapping[str, LoraFactors],
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    rank_axis: RankRule = None,
) -> dict[str, LoraFactors]:
    """The shardings of the LoRA tree, derived from those of the frozen weights.

    ``a`` takes ``W``'s stacked- and input-axis entries, ``b`` its stacked- and output-axis entries,
    and the rank axis ``rank_axis`` (replicated by default). The result mirrors ``lora``: each
    `LoraFactors` holds a ``NamedSharding`` (or, with no mesh known, a ``PartitionSpec``) in place of
    ``a`` and ``b``, ready for ``jax.jit(..., in_shardings=..., out_shardings=...)`` and
    ``jax.device_put``.

    Args:
      params_or_shardings: a tree mirroring the params whose leaves are any of: ``NamedSharding``,
        ``PartitionSpec``, sharded ``jax.Array`` or ``jax.ShapeDtypeStruct`` (``jax.eval_shape``
        output with shardings), Flax Linen boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned`` from
        ``nn.with_logical_partitioning``), ``nnx.Variable`` with sharding metadata (an ``nnx.State``),
        or ``None`` (replicated).
      lora: the tree from `jaxlora.init`, or its ``jax.eval_shape`` (only shapes and roles are read).
      mesh: the mesh for the result; defaults to the mesh the leaves carry. Without either, the
        result holds ``PartitionSpec``s (use them under ``jax.set_mesh``).
      rules: Flax logical axis rules, e.g. ``[("embed", "fsdp"), ("mlp", "tensor")]``. Applied to
        logical names: ``nn.LogicallyPartitioned`` boxes (which otherwise use their own rules or
        ``nn.logical_axis_rules``), NNX names, and ``PartitionSpec`` leaves (which without ``rules``
        hold mesh axis names). As in Flax, a name no rule maps is replicated.
      rank_axis: the mesh axis (or axes) for the rank axis of ``a`` and ``b``, or a function of the
        module path returning one; ``None`` (default) replicates it.

    Returns:
      ``{path: LoraFactors(a=sharding, b=sharding, ...)}`` with ``lora``'s keys and static fields.

    Raises:
      ValueError: listing every targeted weight that has no entry in ``params_or_shardings``, whose
        spec has more entries than the weight has axes, whose sharding cannot be read, or whose
        factors would use a mesh axis twice, name an axis the mesh lacks, or not divide evenly.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from jax.sharding import PartitionSpec as P
      >>> params = {"layers": {"mlp": {"kernel": jax.ShapeDtypeStruct((4, 16, 16), jnp.float32)}}}
      >>> def fn(p, x):  # a stack of 4 layers, scanned
      ...     return jax.lax.scan(lambda h, w: (h @ w, None), x, p["layers"]["mlp"]["kernel"])[0]
      >>> lora = jax.eval_shape(lambda k: jaxlora.init(k, params, jaxlora.LoraConfig(rank=2), fn=fn,
      ...     args=(jnp.ones((1, 16)),)), jax.random.key(0))
      >>> lora["layers/mlp"].roles
      'sio'
      >>> specs = {"layers": {"mlp": {"kernel": P(None, "fsdp", "tensor")}}}
      >>> s = jaxlora.shardings(specs, lora)["layers/mlp"]
      >>> s.a, s.b
      (P(None, 'fsdp', None), P(None, None, 'tensor'))
    """
    if not isinstance(lora, Mapping):
        raise TypeError(f"lora must be the dict that jaxlora.init returns, got {type(lora).__name__}.")
    found: dict[str, tuple[Any, ...]] = {}
    meshes: list[Mesh] = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params_or_shardings, is_leaf=_is_leaf)[0]:
        path = module_path(keypath)
        entries, leaf_mesh, what = _read(leaf, rules)
        found[path] = (entries, leaf_mesh, what, jax.tree_util.keystr(keypath))
        if leaf_mesh is not None and all(leaf_mesh is not m and leaf_mesh != m for m in meshes):
            meshes.append(leaf_mesh)
    default_mesh = mesh if mesh is not None else (meshes[0] if len(meshes) == 1 else None)
    out: dict[str, LoraFactors] = {}
    problems: list[str] = []
    for path, f in lora.items():
        if isinstance(f, SavedModule):  # a full copy keeps each leaf's own sharding
            out[path] = _saved_shardings(path, f, found, mesh, default_mesh, problems)
            continue
        if not isinstance(f, LoraFactors):
            problems.append(f"{path!r}: expected LoraFactors, got {type(f).__name__}.")
            continue
        if path not in found:
            problems.append(f"{path!r} has no sharding in params_or_shardings; {nearest(path, found)}.")
            continue
        entries, leaf_mesh, what, where = found[path]
        roles = f.roles
        if entries is None:
            problems.append(
                f"{path!r}: cannot read a sharding from {where} ({what}); give a NamedSharding, a "
                "PartitionSpec, an nn.Partitioned box or an nnx.Variable with sharding metadata."
            )
            continue
        if len(entries) > len(roles):
            problems.append(
                f"{path!r}: the weight has {len(roles)} axes (roles {roles!r}) but its sharding {what} at {where} "
                f"has {len(entries)} entries; pass the shardings of these params (scanned vs. unscanned layers?)."
            )
            continue
        entries = tuple(entries) + (None,) * (len(roles) - len(entries))
        pick = lambda role: [e for e, c in zip(entries, roles) if c == role]  # noqa: E731, B023
        rank = rank_axis(path) if callable(rank_axis) else rank_axis
        specs = {"a": (*pick("s"), *pick("i"), rank), "b": (*pick("s"), rank, *pick("o"))}
        if f.m is not None:  # DoRA's magnitude: W's stacked and output axes
            specs["m"] = (*pick("s"), *pick("o"))
        m = mesh if mesh is not None else (leaf_mesh if leaf_mesh is not None else default_mesh)
        bad = False
        for side, spec in specs.items():
            names = [n for e in spec for n in _axis_names(e)]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                problems.append(
                    f"{path!r}: factor {side} would use mesh axes {twice} twice (spec {PartitionSpec(*spec)}); "
                    "choose a rank_axis that W's sharding does not use."
                )
                bad = True
            if m is None:
                continue
            missing = [n for n in names if n not in m.shape]
            if missing:
                problems.append(
                    f"{path!r}: factor {side} spec {PartitionSpec(*spec)} names {missing}, "
                    f"not axes of the mesh {dict(m.shape)}."
                )
                bad = True
                continue
            shape = getattr(f, side).shape
            for dim, e in zip(shape, spec):
                size = math.prod(m.shape[n] for n in _axis_names(e))
                if dim % size:
                    problems.append(
                        f"{path!r}: factor {side} {tuple(shape)} cannot be split over {e!r} ({size} devices) "
                        f"along an axis of size {dim}; pick a rank divisible by {size} or another rank_axis."
                    )
                    bad = True
        if bad:
            continue
        make = (lambda s: PartitionSpec(*s)) if m is None else (lambda s: NamedSharding(m, PartitionSpec(*s)))  # noqa: E731, B023
        m_spec = make(specs["m"]) if "m" in specs else None
        out[path] = LoraFactors(
            a=make(specs["a"]), b=make(specs["b"]), scale=f.scale, roles=f.roles, dropout=f.dropout, m=m_spec
        )
    if problems:
        raise ValueError("jaxlora.shardings:\n  " + "\n  ".join(problems))
    return out


def _saved_shardings(path: str, f: SavedModule, found: dict, mesh: Mesh | None, default: Mesh | None, problems: list):
    """The shardings of a `SavedModule`'s leaves: those of the params leaves it copies."""
    out = {}
    for rel in f.weights:
        key = f"{path}/{rel}"
        key = key.rsplit("/", 1)[0] if rel.rsplit("/", 1)[-1] in WEIGHT_NAMES else key  # as module_path keys it
        if key not in found or found[key][0] is None:
            problems.append(f"{path!r}: saved module leaf {rel!r} has no readable sharding in params_or_shardings.")
            continue
        entries, leaf_mesh, _, _ = found[key]
        m = mesh if mesh is not None else (leaf_mesh if leaf_mesh is not None else default)
        spec = PartitionSpec(*entries)
        out[rel] = spec if m is None else NamedSharding(m, spec)
    return SavedModule(out)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if is_array(x) else x, tree)


def init_sharded(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    *,
    fn: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
    param_shardings: Any = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    rank_axis: RankRule = None,
) -> dict[str, LoraFactors]:
    """`jaxlora.init`, run inside ``jax.jit`` so that ``a`` and ``b`` are born sharded.

    Each device computes only its own shards of ``a`` (the PRNG is partitionable) and ``b``; no host
    ever holds the whole LoRA tree, and ``params`` is only read for its shapes. Equivalent to::

        abstract = jax.eval_shape(lambda k: jaxlora.init(k, params, config, fn=fn, args=args), key)
        out = jaxlora.shardings(param_shardings, abstract, mesh=mesh, rules=rules, rank_axis=rank_axis)
        lora = jax.jit(lambda k: jaxlora.init(k, params, config, fn=fn, args=args), out_shardings=out)(key)

    Args:
      key, params, config, fn, args: as for `jaxlora.init`.
      param_shardings: what `shardings` reads the weights' shardings from; defaults to ``params``
        itself (sharded arrays, ``jax.ShapeDtypeStruct`` with shardings, Flax boxes, an ``nnx.State``).
      mesh, rules, rank_axis: as for `shardings`; a mesh is needed (given, or carried by the leaves).

    Returns:
      The LoRA tree, equal to ``jaxlora.init(key, params, config, fn=fn, args=args)`` (with
      ``jax_threefry_partitionable``, the default), with ``a`` and ``b`` sharded.

    Raises:
      ValueError: as `shardings`, or when no mesh is known.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(jax.devices()[:1], ("fsdp",))
      >>> kernel = jax.ShapeDtypeStruct((4, 6), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
      >>> params = {"dense": {"kernel": kernel}}
      >>> lora = jaxlora.init_sharded(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> lora["dense"].a.sharding.spec, lora["dense"].b.sharding.spec
      (P('fsdp', None), P(None, None))
    """
    from ._core import init

    abstract_params, abstract_args = _abstract(params), _abstract(args)

    def make(k: jax.Array, p: Any) -> dict[str, LoraFactors]:
        return init(k, p, config, fn=fn, args=abstract_args)

    # DoRA's magnitude is read off W's values: then params enter the jitted init (sharded, never gathered)
    values = params if config.dora else abstract_params
    abstract_lora = jax.eval_shape(make, key, _abstract(values))
    source = params if param_shardings is None else param_shardings
    out = shardings(source, abstract_lora, mesh=mesh, rules=rules, rank_axis=rank_axis)
    loose = [p for p, f in out.items() if not isinstance(f.a, NamedSharding)]
    if loose:
        raise ValueError(
            f"jaxlora.init_sharded: no mesh is known for {loose[:3]} (their shardings are PartitionSpecs); "
            "pass mesh=, or param_shardings holding NamedShardings."
        )
    if not config.dora:
        return jax.jit(partial(make, p=abstract_params), out_shardings=out)(key)
    return jax.jit(make, out_shardings=out)(key, params)
