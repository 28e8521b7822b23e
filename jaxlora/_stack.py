"""Many adapters on one base: `LoraStack`, `stack`, `unstack`, `stack_set`, and mixed-adapter `apply`.

A stack holds ``n`` adapters' factors side by side on the rank axis: for a module with factors
``a: (*S, *I, r)`` and ``b: (*S, r, *O)``, the stack has::

    a: (*S, *I, n, R)     b: (*S, n, R, *O)     # R: the slot rank (the largest rank, or rank=)

each adapter zero-padded to ``R`` (exact: padded columns of ``a`` and rows of ``b`` add zero). The
adapter axis sits next to the rank axis, not in front, so that the rewrite sees the stack as one
LoRA of rank ``n·R`` in ``W``'s own layout: scans over stacked layers, views of ``W`` and sharding
specs carry it as they carry any factor. Each adapter's scale and rank are data (``(n,)`` arrays per
module; 0 where an adapter does not adapt a module), so swapping in an adapter with another alpha
or rank recompiles nothing.

``apply(fn, params, stack, *args, adapter_ids=ids)`` maps the rewritten ``fn`` over the examples
with ``jax.vmap``: ``fn`` sees each example as a batch of one (its example axis kept, of size 1), and
each targeted op computes that example's own adapter (see `_matmul.stacked_op` for the forms).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._matmul import LoraFactors

Lora = dict[str, LoraFactors]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraStack:
    """``n`` named adapters of one base, padded to a common slot rank: a pytree.

    Attributes:
      a: ``{path: (*S, *I, n, R)}``: every adapter's ``a``, the adapter axis before the rank axis.
      b: ``{path: (*S, n, R, *O)}``: every adapter's ``b``.
      scale: ``{path: (n,) float32}``: each adapter's scale for the module (0 where it has none).
      rank: ``{path: (n,) float32}``: each adapter's own rank (0 where it has none), for `unstack`.
      names: the adapters' names; ``adapter_ids`` index into them. Static.
      roles: ``{path: roles}`` of each module's ``W`` (as in `LoraFactors`). Static.
      dropout: ``{path: rate}``: LoRA dropout of each module. Static.

    ``scale`` and ``rank`` are data, not trainable: `jaxlora.apply` reads them through
    ``stop_gradient``, and ``jaxlora.mask(stack)`` is False on them (train with ``optax.masked``).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 6))}
      >>> one = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> two = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=3, alpha=6))
      >>> s = jaxlora.stack({"one": one, "two": two})
      >>> s.names, s.a["w"].shape, s.b["w"].shape, s.scale["w"].tolist()
      (('one', 'two'), (4, 2, 3), (2, 3, 6), [1.0, 2.0])
    """

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    scale: dict[str, jax.Array]
    rank: dict[str, jax.Array]
    names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    roles: tuple[tuple[str, str], ...] = dataclasses.field(metadata=dict(static=True))
    dropout: tuple[tuple[str, float], ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def slots(self) -> int:
        """The number of adapters ``n``."""
        return len(self.names)

    @property
    def paths(self) -> tuple[str, ...]:
        """The module paths, in order."""
        return tuple(p for p, _ in self.roles)

    def slot_rank(self, path: str) -> int:
        """The slot rank ``R`` of module ``path``."""
        return self.a[path].shape[-1]

    def factors(self, path: str) -> LoraFactors:
        """Module ``path`` as one `LoraFactors` of rank ``n·R`` (scale 1), the layout the rewrite sees."""
        a, b, roles = self.a[path], self.b[path], dict(self.roles)[path]
        ns = roles.count("s")
        a = a.reshape(*a.shape[:-2], a.shape[-2] * a.shape[-1])
        b = b.reshape(*b.shape[:ns], b.shape[ns] * b.shape[ns + 1], *b.shape[ns + 2 :])
        return LoraFactors(a=a, b=b, scale=1.0, roles=roles, dropout=dict(self.dropout)[path])


def _check_lora(name: str, lora: Any) -> list[str]:
    from ._saved import SavedModule

    if isinstance(lora, Mapping) and (saved := sorted(p for p, f in lora.items() if isinstance(f, SavedModule))):
        return [  # a full copy of a module per adapter is a different model per example, not a LoRA term
            f"adapter {name!r}: saved modules (modules_to_save) {saved} cannot be stacked: each is a full copy "
            "of the module; stack the factors alone ({p: f for p, f in lora.items() if isinstance(f, "
            "jaxlora.LoraFactors)}) and serve the saved modules' model separately"
        ]
    if not isinstance(lora, Mapping) or not all(isinstance(f, LoraFactors) for f in lora.values()):
        return [
            f"adapter {name!r}: expected the dict of LoraFactors that jaxlora.init returns, got {type(lora).__name__}"
        ]
    dora = sorted(p for p, f in lora.items() if f.m is not None)
    if dora:  # the magnitude rescales the whole output, base included: no per-example form here yet
        return [f"adapter {name!r}: DoRA modules {dora} cannot be stacked; merge them or serve them one at a time"]
    return []


def stack(
    adapters: Mapping[str, Mapping[str, LoraFactors]], *, rank: int | None = None, dtype: Any = None
) -> LoraStack:
    """Stack named adapters of one base into a `LoraStack` (ranks, scales and targets may differ).

    Args:
      adapters: ``{name: lora}``, each a tree from `jaxlora.init` (or a checkpoint) for the same base.
        A module some adapters do not adapt is zero (scale 0) for them.
      rank: the slot rank ``R`` of every module (default: the largest rank of each module); a server
        reserves room for larger adapters with it.
      dtype: the factors' dtype (default: the adapters' common dtype).

    Returns:
      The stack; its ``names`` are the keys of ``adapters``, in order.

    Raises:
      ValueError: for no adapters, a rank above ``rank``, or adapters that disagree on a module's
        weight layout or dropout (naming the module and the adapters).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 6)), "v": jnp.ones((6, 6))}
      >>> one = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, targets="w"))
      >>> two = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=1))
      >>> s = jaxlora.stack({"one": one, "two": two}, rank=4)
      >>> s.paths, s.a["v"].shape, s.rank["v"].tolist()
      (('w', 'v'), (6, 2, 4), [0.0, 1.0])
    """
    names = tuple(adapters)
    problems = [p for n in names for p in _check_lora(n, adapters[n])]
    if not names:
        problems.append("no adapters given: pass {name: lora, ...}")
    if problems:
        raise ValueError("jaxlora.stack:\n  " + "\n  ".join(problems))
    paths = list(dict.fromkeys(p for n in names for p in adapters[n]))
    roles, dropout, shapes = {}, {}, {}
    for path in paths:
        have = {n: adapters[n][path] for n in names if path in adapters[n]}
        layouts = {
            n: (f.roles, tuple(f.a.shape[:-1]), tuple(f.b.shape[f.roles.count("s") + 1 :])) for n, f in have.items()
        }
        if len(set(layouts.values())) > 1:
            problems.append(f"{path!r}: the adapters were made for different weights: {layouts}")
            continue
        rates = {n: f.dropout for n, f in have.items()}
        if len(set(rates.values())) > 1:
            problems.append(f"{path!r}: the adapters' LoRA dropout rates differ ({rates}); give them one rate")
        r = max(f.rank for f in have.values())
        if rank is not None and r > rank:
            big = sorted(n for n, f in have.items() if f.rank > rank)
            problems.append(f"{path!r}: adapters {big} have rank {r} > rank={rank}; pass rank={r} or more")
        roles[path], dropout[path] = next(iter(layouts.values()))[0], next(iter(rates.values()))
        shapes[path] = (next(iter(layouts.values())), rank or r)
    if problems:
        raise ValueError("jaxlora.stack cannot stack these adapters:\n  " + "\n  ".join(problems))
    dt = dtype or jnp.result_type(*[f.a.dtype for lora in adapters.values() for f in lora.values()])
    a, b, scale, ranks = {}, {}, {}, {}
    for path in paths:
        (path_roles, i_shape, o_shape), R = shapes[path]
        ns = path_roles.count("s")
        cols_a, cols_b, sc, rk = [], [], [], []
        for n in names:
            f = adapters[n].get(path)
            fa = jnp.zeros((*i_shape, R), dt) if f is None else _pad(f.a.astype(dt), -1, R)
            fb = jnp.zeros((*i_shape[:ns], R, *o_shape), dt) if f is None else _pad(f.b.astype(dt), ns, R)
            cols_a.append(fa), cols_b.append(fb)
            sc.append(0.0 if f is None else f.scale), rk.append(0 if f is None else f.rank)
        a[path] = jnp.stack(cols_a, axis=-2)
        b[path] = jnp.stack(cols_b, axis=ns)
        scale[path] = jnp.asarray(sc, jnp.float32)
        ranks[path] = jnp.asarray(rk, jnp.float32)
    return LoraStack(a, b, scale, ranks, names, tuple(roles.items()), tuple(dropout.items()))


def _pad(f: jax.Array, axis: int, size: int) -> jax.Array:
    axis = axis % f.ndim
    widths = [(0, 0)] * f.ndim
    widths[axis] = (0, size - f.shape[axis])
    return jnp.pad(f, widths)


def _slot(stk: LoraStack, name: str | int) -> int:
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if not -stk.slots <= name < stk.slots:
            raise ValueError(f"slot {name} is out of range for a stack of {stk.slots} adapters {list(stk.names)}.")
        return int(name) % stk.slots
    if name not in stk.names:
        close = difflib.get_close_matches(str(name), stk.names, n=3)
        raise ValueError(
            f"no adapter {name!r} in the stack (it holds {list(stk.names)}"
            + (f"; did you mean {close}?" if close else "")
            + "); stack_set only replaces an adapter: to add one, re-stack with jaxlora.stack."
        )
    return stk.names.index(name)


def unstack(stk: LoraStack) -> dict[str, Lora]:
    """Each adapter of the stack at its own rank: ``{name: lora}``, the inverse of `stack`.

    The factors are those that went in, bit for bit (in the stack's dtype); each module an adapter
    does not adapt is left out; scales come back as the float32 values the computation uses.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 6))}
      >>> one = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> back = jaxlora.unstack(jaxlora.stack({"one": one}, rank=8))
      >>> back["one"]["w"].a.shape, bool((back["one"]["w"].a == one["w"].a).all())
      ((4, 2), True)
    """
    out: dict[str, Lora] = {n: {} for n in stk.names}
    roles, dropout = dict(stk.roles), dict(stk.dropout)
    for path in stk.paths:
        ns = roles[path].count("s")
        ranks, scales = np.asarray(stk.rank[path]), np.asarray(stk.scale[path])
        for j, n in enumerate(stk.names):
            r = int(ranks[j])
            if r == 0:
                continue
            a = stk.a[path][..., j, :r]
            b = jax.lax.index_in_dim(stk.b[path], j, ns, keepdims=False)
            b = jax.lax.slice_in_dim(b, 0, r, axis=ns)
            out[n][path] = LoraFactors(a=a, b=b, scale=float(scales[j]), roles=roles[path], dropout=dropout[path])
    return out


def stack_set(stk: LoraStack, name: str | int, lora: Mapping[str, LoraFactors]) -> LoraStack:
    """The stack with adapter ``name`` (or slot index) replaced by ``lora``: pure, shapes unchanged.

    A smaller rank is zero-padded into the slot; a module ``lora`` does not adapt becomes zero for
    this adapter. The stack's shapes do not change, so nothing that takes it recompiles; under
    ``jax.jit(jaxlora.stack_set, static_argnums=1, donate_argnums=0)`` it writes in place.

    Raises:
      ValueError: for an unknown name, a module the stack lacks, a rank above the slot rank (re-stack
        with ``jaxlora.stack(..., rank=)``), or factors made for another weight layout.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 6))}
      >>> one = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> new = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=1, alpha=3))
      >>> s = jaxlora.stack_set(jaxlora.stack({"one": one, "two": one}), "two", new)
      >>> s.rank["w"].tolist(), s.scale["w"].tolist()
      ([2.0, 1.0], [1.0, 3.0])
    """
    j = _slot(stk, name)
    problems = _check_lora(str(name), lora)
    if problems:
        raise ValueError("jaxlora.stack_set:\n  " + "\n  ".join(problems))
    roles = dict(stk.roles)
    for path, f in lora.items():
        if path not in roles:
            problems.append(
                f"{path!r}: the stack has no such module (it has {list(roles)}); re-stack with jaxlora.stack"
            )
            continue
        R, ns = stk.slot_rank(path), roles[path].count("s")
        want_i, want_o = stk.a[path].shape[:-2], stk.b[path].shape[ns + 2 :]
        if f.roles != roles[path] or tuple(f.a.shape[:-1]) != want_i or tuple(f.b.shape[ns + 1 :]) != want_o:
            problems.append(
                f"{path!r}: factors a {tuple(f.a.shape)}, b {tuple(f.b.shape)} (roles {f.roles!r}) do not fit the "
                f"stack's slot a {(*want_i, R)}, b {(*want_i[:ns], R, *want_o)} (roles {roles[path]!r})"
            )
        elif f.rank > R:
            problems.append(
                f"{path!r}: rank {f.rank} exceeds the slot rank {R}; re-stack with jaxlora.stack(..., rank={f.rank}) "
                "to make room"
            )
        elif f.dropout != dict(stk.dropout)[path]:
            problems.append(f"{path!r}: LoRA dropout {f.dropout} differs from the stack's {dict(stk.dropout)[path]}")
    if problems:
        raise ValueError(f"jaxlora.stack_set cannot write adapter {name!r}:\n  " + "\n  ".join(problems))
    a, b, scale, rank = dict(stk.a), dict(stk.b), dict(stk.scale), dict(stk.rank)
    for path in stk.paths:
        R, ns = stk.slot_rank(path), roles[path].count("s")
        f = lora.get(path)
        if f is None:
            fa, fb = jnp.zeros_like(a[path][..., 0, :]), jnp.zeros_like(jax.lax.index_in_dim(b[path], 0, ns, False))
            s, r = 0.0, 0
        else:
            fa, fb, s, r = (
                _pad(f.a.astype(a[path].dtype), -1, R),
                _pad(f.b.astype(b[path].dtype), ns, R),
                f.scale,
                f.rank,
            )
        a[path] = a[path].at[..., j, :].set(fa)
        b[path] = b[path].at[(slice(None),) * ns + (j,)].set(fb)
        scale[path] = scale[path].at[j].set(s)
        rank[path] = rank[path].at[j].set(r)
    return dataclasses.replace(stk, a=a, b=b, scale=scale, rank=rank)


# --------------------------------------------------------------------------- apply with adapter_ids


def _example_axes(args: tuple[Any, ...], kwargs: dict[str, Any], axes: Any, n: int) -> tuple[Any, Any]:
    """The example axis of each array leaf of ``(args, kwargs)`` (None: shared by every example)."""
    from ._tree import is_array

    def default(x):
        return 0 if is_array(x) and np.ndim(x) > 0 else None

    if axes is None:
        arg_axes = jax.tree.map(default, args)
    else:
        if not isinstance(axes, tuple) or len(axes) != len(args):
            raise ValueError(
                f"example_axes must be a tuple with one entry (an int, None, or a pytree of them) per positional "
                f"argument of fn after params ({len(args)}), got {axes!r}."
            )
        arg_axes = tuple(
            jax.tree.map(lambda x, ax=ax: ax if is_array(x) and np.ndim(x) > 0 else None, arg)
            if ax is None or isinstance(ax, int)
            else ax
            for arg, ax in zip(args, axes)
        )
    kw_axes = jax.tree.map(default, kwargs)
    problems = []
    for where, tree, tree_axes in (("args", args, arg_axes), ("kwargs", kwargs, kw_axes)):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        flat_axes = jax.tree_util.tree_structure(tree).flatten_up_to(tree_axes)
        for (kp, x), ax in zip(leaves, flat_axes):
            if ax is None or not is_array(x):
                continue
            shape = np.shape(x)
            if not -len(shape) <= ax < len(shape) or shape[ax] != n:
                problems.append(f"{where}{jax.tree_util.keystr(kp)}: shape {shape}, example axis {ax}")
    if not problems:
        norm = lambda ax, x: None if ax is None else ax % np.ndim(x)  # noqa: E731
        none = lambda x: x is None  # noqa: E731
        return jax.tree.map(norm, arg_axes, args, is_leaf=none), jax.tree.map(norm, kw_axes, kwargs, is_leaf=none)
    raise ValueError(
        f"adapter_ids has {n} entries, one per example, but these arguments have no example axis of size {n}:\n  "
        + "\n  ".join(problems)
        + "\nFix: pass example_axes=(...) naming each argument's example axis, or None for an argument that "
        "every example shares (such as positions)."
    )


def _ids(adapter_ids: Any, stk: LoraStack) -> jax.Array:
    dtype = getattr(adapter_ids, "dtype", None)
    if dtype is None:
        adapter_ids = jnp.asarray(adapter_ids)
        dtype = adapter_ids.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"adapter_ids must be integers (an index into stack.names, -1 for none), got dtype {dtype}.")
    if np.ndim(adapter_ids) != 1:
        raise ValueError(
            f"adapter_ids must be 1-D, one id per example, got shape {np.shape(adapter_ids)}; "
            "for a batch of shape (batch, seq) pass one id per row."
        )
    return adapter_ids


def _squeeze(axes: Any, shapes: Any, out: Any) -> Any:
    """Each output leaf of the ``vmap`` without the size-1 example axis that ``fn`` saw (``shapes``: the
    leaves' shapes in ``fn``; ``axes``: a prefix of ``out``). ``vmap`` put the examples next to that
    axis (before it for a negative axis), so dropping it is a reshape. (A squeeze inside the ``vmap``
    would move the examples to the front and back: two transposes of a whole KV cache a step.)"""
    full = jax.tree.map(lambda ax, sub: jax.tree.map(lambda _: ax, sub), axes, out, is_leaf=lambda x: x is None)

    def one(ax, shape, y):
        if ax is None or len(shape) == 0 or shape[ax] != 1:
            return y
        return jnp.squeeze(y, ax + 1 if ax >= 0 else ax + len(shape))

    return jax.tree.map(one, full, shapes, out, is_leaf=lambda x: x is None)


def apply_stack(
    fn, params, stk: LoraStack, args, kwargs, *, adapter_ids, example_axes, example_out_axes, dropout_key, unsupported
):
    """`jaxlora.apply` with a stack: ``fn`` mapped over the examples, each with its adapter's factors."""
    from . import _core, _trace

    ids = _ids(adapter_ids, stk)
    n = ids.shape[0]
    targets = _core._fit(params, {p: stk.factors(p) for p in stk.paths})
    arg_axes, kw_axes = _example_axes(args, kwargs, example_axes, n)
    keep = lambda ax, x: x if ax is None else jnp.expand_dims(x, ax + 1)  # noqa: E731
    args = jax.tree.map(keep, arg_axes, args, is_leaf=lambda x: x is None)
    kwargs = jax.tree.map(keep, kw_axes, kwargs, is_leaf=lambda x: x is None)
    keys = None if dropout_key is None else jax.random.split(dropout_key, n)
    factors = {p: stk.factors(p) for p in stk.paths}
    scales = {p: jax.lax.stop_gradient(stk.scale[p]) for p in stk.paths}
    ranks = {p: stk.slot_rank(p) for p in stk.paths}
    tagged = {targets[p].index: (p, f) for p, f in factors.items()}

    def one(args, kwargs, i, key):
        slot = jnp.maximum(i, 0)
        hot = jnp.arange(stk.slots) == i  # no gather: a sharded id needs no collective (id -1 hits nothing)
        scale = {p: jnp.sum(jnp.where(hot, s, 0.0)) for p, s in scales.items()}
        select = _trace.Selection(slot, scale, ranks, stk.slots, n)
        ctx = _trace.Context(fallback=unsupported, dropout_key=key, stack=select)
        out = _trace.run(fn, params, args, kwargs, tagged, ctx)
        shapes.append(jax.tree.map(np.shape, out))  # static, read once the vmap has traced `one`
        return out

    shapes: list[Any] = []
    in_axes = (arg_axes, kw_axes, 0, None if keys is None else 0)
    out = jax.vmap(one, in_axes=in_axes, out_axes=example_out_axes)(args, kwargs, ids, keys)
    return _squeeze(example_out_axes, shapes[-1], out)
