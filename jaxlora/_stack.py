"""Many adapters on one base: `LoraStack`, `stack`, `unstack`, `stack_set`, and mixed-adapter `apply`.

A stack holds ``n`` adapters' factors side by side on the rank axis: for a module with factors
``a: (*S, *I, r)`` and ``b: (*S, r, *O)``, the stack has::

    a: (*S, *I, n, R)     b: (*S, n, R, *O)     # R: the slot rank (the largest rank, or rank=)

each adapter zero-padded to ``R`` (exact: padded columns of ``a`` and rows of ``b`` add zero). The
adapter axis sits next to the rank axis, not in front, so that the rewrite sees the stack as one
LoRA of rank ``n·R`` in ``W``'s own layout: scans over stacked layers, views of ``W`` and sharding
specs carry it as they carry any factor. The factors are the stack's only leaves: each adapter's
scale and rank are static metadata (`PerAdapter`), exact and out of every optimizer's reach, and
carried by gradients so that ``unstack(jax.grad(loss)(stack))`` is each adapter's own gradient.
``stack(..., fold_scales=True)`` folds each scale into ``b`` so that swapping in an adapter of any
alpha or rank recompiles nothing.

``apply(fn, params, stack, *args, adapter_ids=ids)`` maps the rewritten ``fn`` over the examples
with ``jax.vmap``: ``fn`` sees each example as a batch of one (its example axis kept, of size 1), and
each targeted op computes that example's own adapter (see `_matmul.stacked_op` for the forms).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _trace
from ._matmul import LoraFactors
from ._saved import SavedModule
from ._tree import Weight, is_array

Lora = dict[str, LoraFactors]


class PerAdapter(Mapping[str, tuple]):
    """``{module path: one value per adapter}``: a stack's scales or ranks, read-only static metadata.

    It is part of the stack's pytree structure, which ``jax.jit`` hashes and compares on every call.
    Equal values are one object (interned: made once, while any holder lives) with its hash computed
    once, so the comparison is an identity check and a stack of 1,024 adapters costs no more per
    call than one of two.

    ``kind`` (``float`` for scales, ``int`` for ranks) converts every value, and is part of the
    identity: ranks ``(1,)`` are never the scales ``(1.0,)``, although ``1 == 1.0``.

    Example:
      >>> from jaxlora._stack import PerAdapter
      >>> ranks = PerAdapter({"w": (2, 3)}, int)
      >>> ranks["w"], ranks is PerAdapter({"w": [2.0, 3]}, int), ranks == PerAdapter({"w": (2, 3)}, float)
      ((2, 3), True, False)
    """

    __slots__ = ("_items", "_kind", "_hash", "__weakref__")
    _interned: weakref.WeakValueDictionary[tuple, PerAdapter] = weakref.WeakValueDictionary()
    _items: dict[str, tuple]
    _kind: type
    _hash: int

    def __new__(cls, items: Mapping[str, Any], kind: type) -> PerAdapter:
        key = (kind, tuple((p, tuple(map(kind, v))) for p, v in items.items()))
        self = cls._interned.get(key)  # hashes the values: once per construction, never per jit call
        if self is None:
            self = super().__new__(cls)
            self._kind, self._items, self._hash = kind, dict(key[1]), hash(key)
            cls._interned[key] = self
        return self

    def __getitem__(self, path: str) -> tuple:
        return self._items[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, PerAdapter):
            return NotImplemented
        # the same values in another order (interning goes by order)
        return self._hash == other._hash and self._kind is other._kind and self._items == other._items

    def __repr__(self) -> str:
        return f"PerAdapter({self._items!r}, {self._kind.__name__})"

    def __reduce__(self) -> tuple:
        return PerAdapter, (self._items, self._kind)

    def written(self, slot: int, values: Mapping[str, Any]) -> PerAdapter:
        """These values with ``values[path]`` in ``slot`` of each path: ``self`` if nothing changes."""
        changed = {p: (*v[:slot], values[p], *v[slot + 1 :]) for p, v in self._items.items() if v[slot] != values[p]}
        return PerAdapter({**self._items, **changed}, self._kind) if changed else self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraStack:
    """``n`` named adapters of one base, padded to a common slot rank: a pytree whose leaves are ``a`` and ``b``.

    Attributes:
      a: ``{path: (*S, *I, n, R)}``: every adapter's ``a``, the adapter axis before the rank axis.
      b: ``{path: (*S, n, R, *O)}``: every adapter's ``b``.
      scale: ``{path: (s_0, ..., s_n-1)}``: each adapter's scale for the module (0.0 where it has
        none; 1.0 everywhere in a folded stack). Static (`PerAdapter`).
      rank: ``{path: (r_0, ..., r_n-1)}``: each adapter's own rank (0 where it has none; ``R``
        everywhere in a folded stack), for `unstack`. Static.
      names: the adapters' names; ``adapter_ids`` index into them. Static.
      roles: ``{path: roles}`` of each module's ``W`` (as in `LoraFactors`). Static.
      dropout: ``{path: rate}``: LoRA dropout of each module. Static.
      folded: whether each adapter's scale is folded into its ``b`` (``stack(..., fold_scales=True)``). Static.

    Scales and ranks are static, as a `LoraFactors`' scale is: no optimizer (weight decay, any
    ``optax`` chain) can change them, and a gradient (itself a `LoraStack`) carries them, so
    ``unstack(jax.grad(loss)(stack))`` gives each adapter's gradient at its own rank. Writing an
    adapter with another scale or rank into an unfolded stack changes them, so ``jit`` traces
    again; a folded stack's never change.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 6))}
      >>> one = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> two = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=3, alpha=6))
      >>> s = jaxlora.stack({"one": one, "two": two})
      >>> s.names, s.a["w"].shape, s.b["w"].shape, s.scale["w"], s.rank["w"]
      (('one', 'two'), (4, 2, 3), (2, 3, 6), (1.0, 2.0), (2, 3))
      >>> len(jax.tree.leaves(s))  # a and b only
      2
    """

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    scale: PerAdapter = dataclasses.field(metadata=dict(static=True))
    rank: PerAdapter = dataclasses.field(metadata=dict(static=True))
    names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    roles: tuple[tuple[str, str], ...] = dataclasses.field(metadata=dict(static=True))
    dropout: tuple[tuple[str, float], ...] = dataclasses.field(metadata=dict(static=True))
    folded: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __post_init__(self):  # plain dicts or sequences in (a hand-built stack): stored as PerAdapter
        for field in ("scale", "rank"):
            value = getattr(self, field)
            if not isinstance(value, PerAdapter):
                object.__setattr__(self, field, PerAdapter(value, float if field == "scale" else int))

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
    return [
        f"adapter {name!r}: {p!r} has scale {f.scale!r}; a stacked scale must be a finite number"
        for p, f in lora.items()
        if not isinstance(f.scale, (int, float, np.number)) or not math.isfinite(f.scale)
    ]


def stack(
    adapters: Mapping[str, Mapping[str, LoraFactors]],
    *,
    rank: int | None = None,
    dtype: Any = None,
    fold_scales: bool = False,
) -> LoraStack:
    """Stack named adapters of one base into a `LoraStack` (ranks, scales and targets may differ).

    Args:
      adapters: ``{name: lora}``, each a tree from `jaxlora.init` (or a checkpoint) for the same base.
        A module some adapters do not adapt is zero (scale 0) for them.
      rank: the slot rank ``R`` of every module (default: the largest rank of each module); a server
        reserves room for larger adapters with it.
      dtype: the factors' dtype (default: the adapters' common dtype).
      fold_scales: store ``scale·b`` in place of ``b`` (vLLM's layout), every slot with scale 1.0
        and rank ``R``: the static metadata then never changes, so `stack_set` can write an adapter
        of any alpha and rank without a retrace. Outputs equal the unfolded stack's up to rounding
        of ``scale·b`` in ``dtype``; `unstack` returns equivalent adapters of scale 1.0 and rank
        ``R`` (not the same factors), a module an adapter lacks as zeros. Training a folded stack
        is not training the adapters alone: the optimizer sees ``scale·b``, another parameterization
        (use an unfolded stack to train).

    Returns:
      The stack; its ``names`` are the keys of ``adapters``, in order.

    Raises:
      ValueError: for no adapters, a rank above ``rank``, a scale that is not finite, or adapters
        that disagree on a module's weight layout or dropout (naming the module and the adapters).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 6)), "v": jnp.ones((6, 6))}
      >>> one = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, targets="w"))
      >>> two = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=1))
      >>> s = jaxlora.stack({"one": one, "two": two}, rank=4)
      >>> s.paths, s.a["v"].shape, s.rank["v"], s.scale["v"]
      (('w', 'v'), (6, 2, 4), (0, 1), (0.0, 1.0))
      >>> f = jaxlora.stack({"one": one, "two": two}, rank=4, fold_scales=True)
      >>> f.rank["v"], f.scale["v"]
      ((4, 4), (1.0, 1.0))
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
        cols_a, cols_b = [], []
        for n in names:
            f = adapters[n].get(path)
            fa = jnp.zeros((*i_shape, R), dt) if f is None else _pad(f.a.astype(dt), -1, R)
            fb = jnp.zeros((*i_shape[:ns], R, *o_shape), dt) if f is None else _pad(_b(f, dt, fold_scales), ns, R)
            cols_a.append(fa), cols_b.append(fb)
        a[path] = jnp.stack(cols_a, axis=-2)
        b[path] = jnp.stack(cols_b, axis=ns)
        held = [adapters[n].get(path) for n in names]
        scale[path] = [1.0 if fold_scales else 0.0 if f is None else float(f.scale) for f in held]
        ranks[path] = [R if fold_scales else 0 if f is None else f.rank for f in held]
    meta = PerAdapter(scale, float), PerAdapter(ranks, int)
    return LoraStack(a, b, *meta, names, tuple(roles.items()), tuple(dropout.items()), folded=fold_scales)


def _b(f: LoraFactors, dtype: Any, fold: bool) -> jax.Array:
    """``f.b`` in ``dtype``, times ``f.scale`` (rounded once, from at least float32) when folding."""
    if not fold:
        return f.b.astype(dtype)
    return (f.b.astype(jnp.promote_types(f.b.dtype, jnp.float32)) * f.scale).astype(dtype)


def _pad(f: jax.Array, axis: int, size: int) -> jax.Array:
    axis = axis % f.ndim
    widths = [(0, 0)] * f.ndim
    widths[axis] = (0, size - f.shape[axis])
    return jnp.pad(f, widths)


def _slot(stk: LoraStack, name: str | int) -> int:
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if name < 0:  # -1 would write the last slot while adapter id -1 means the base alone
            raise ValueError(
                f"slot {name}: negative slots are refused (adapter id -1 means no adapter); "
                f"pass a name or a slot in [0, {stk.slots}) of {list(stk.names)}."
            )
        if name >= stk.slots:
            raise ValueError(f"slot {name} is out of range for a stack of {stk.slots} adapters {list(stk.names)}.")
        return int(name)
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

    The factors and scales are those that went in, bit for bit (in the stack's dtype); each module
    an adapter does not adapt is left out. Of a folded stack (``fold_scales=True``): equivalent
    adapters, not the same ones: scale 1.0, rank ``R``, ``b`` times the scale, zeros for a module
    an adapter lacks. Works under ``jit`` (ranks are static), so ``unstack(jax.grad(loss)(stack))``
    is each adapter's gradient.

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
        ranks, scales = stk.rank[path], stk.scale[path]
        for j, n in enumerate(stk.names):
            r = ranks[j]
            if r == 0:
                continue
            a = stk.a[path][..., j, :r]
            b = jax.lax.index_in_dim(stk.b[path], j, ns, keepdims=False)
            b = jax.lax.slice_in_dim(b, 0, r, axis=ns)
            out[n][path] = LoraFactors(a=a, b=b, scale=scales[j], roles=roles[path], dropout=dropout[path])
    return out


def stack_set(stk: LoraStack, name: str | int, lora: Mapping[str, LoraFactors]) -> LoraStack:
    """The stack with adapter ``name`` (or slot index) replaced by ``lora``: pure, shapes unchanged.

    A smaller rank is zero-padded into the slot; a module ``lora`` does not adapt becomes zero for
    this adapter. The slot takes ``lora``'s scales and ranks exactly. Where they equal the slot's
    old ones the stack's structure is unchanged and nothing that takes it recompiles; where they
    differ its static metadata changes and each ``jit`` that takes the stack traces once more. A
    folded stack (``stack(..., fold_scales=True)``) folds ``lora``'s scales into ``b`` and never
    changes its structure: the hot-swap path for adapters of any alpha and rank. Under
    ``jax.jit(jaxlora.stack_set, static_argnums=1, donate_argnums=0)`` it writes in place.

    Raises:
      ValueError: for an unknown name, a negative slot (adapter id -1 means no adapter), a module
        the stack lacks, a rank above the slot rank (re-stack with ``jaxlora.stack(..., rank=)``), a
        scale that is not finite, or factors made for another weight layout.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 6))}
      >>> one = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> new = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=1, alpha=3))
      >>> s = jaxlora.stack_set(jaxlora.stack({"one": one, "two": one}), "two", new)
      >>> s.rank["w"], s.scale["w"]
      ((2, 1), (1.0, 3.0))
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
    a, b = dict(stk.a), dict(stk.b)
    for path in stk.paths:
        R, ns = stk.slot_rank(path), roles[path].count("s")
        f = lora.get(path)
        if f is None:
            fa, fb = jnp.zeros_like(a[path][..., 0, :]), jnp.zeros_like(jax.lax.index_in_dim(b[path], 0, ns, False))
        else:
            fa, fb = _pad(f.a.astype(a[path].dtype), -1, R), _pad(_b(f, b[path].dtype, stk.folded), ns, R)
        a[path] = a[path].at[..., j, :].set(fa)
        b[path] = b[path].at[(slice(None),) * ns + (j,)].set(fb)
    if stk.folded:  # every slot scale 1.0 and rank R: the structure never changes
        return dataclasses.replace(stk, a=a, b=b)
    scale = stk.scale.written(j, {p: float(lora[p].scale) if p in lora else 0.0 for p in stk.paths})
    rank = stk.rank.written(j, {p: lora[p].rank if p in lora else 0 for p in stk.paths})
    return dataclasses.replace(stk, a=a, b=b, scale=scale, rank=rank)


# --------------------------------------------------------------------------- apply with adapter_ids


def _example_axes(args: tuple[Any, ...], kwargs: dict[str, Any], axes: Any, n: int) -> tuple[Any, Any]:
    """The example axis of each array leaf of ``(args, kwargs)`` (None: shared by every example)."""

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
    if np.ndim(adapter_ids) < 1:
        raise ValueError(
            f"adapter_ids must be one id per example (shape (batch,)) or per token (the token axes' shape, "
            f"such as (batch, seq)), got shape {np.shape(adapter_ids)}."
        )
    if jnp.dtype(dtype).itemsize < 4:  # int8 ids cannot be compared with 1,024 slots; int32 holds them all
        adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
    known = _concrete(adapter_ids)  # eager, or numpy under jit; traced ids give NaN rows (apply_stack)
    if known is not None:
        bad = sorted({int(i) for i in known.ravel() if not -1 <= i < stk.slots})
        if bad:
            raise ValueError(
                f"adapter_ids {bad} are out of range for a stack of {stk.slots} adapters: each id must be in "
                f"[-1, {stk.slots}) (an index into stack.names {list(stk.names)[:8]}"
                + ("..." if stk.slots > 8 else "")
                + ", or -1 for the base alone)."
            )
    return adapter_ids


def _concrete(x: Any) -> np.ndarray | None:
    """``x``'s values, or None for traced values (or an array other processes hold parts of)."""
    try:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


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
    fn,
    params,
    stk: LoraStack,
    targets: Mapping[str, Weight],
    args,
    kwargs,
    *,
    adapter_ids,
    example_axes,
    example_out_axes,
    dropout_key,
    unsupported,
):
    """`jaxlora.apply` with a stack: ``fn`` mapped over the examples, each with its adapter's factors.

    ``targets``: ``jaxlora._core._fit(params, {p: stk.factors(p) ...})``, the targeted weights (the
    caller, `jaxlora.apply`, fits them: this module never calls back into ``_core``).
    """
    ids = _ids(adapter_ids, stk)
    n, signed = ids.shape[0], jnp.issubdtype(ids.dtype, jnp.signedinteger)
    arg_axes, kw_axes = _example_axes(args, kwargs, example_axes, n)
    keep = lambda ax, x: x if ax is None else jnp.expand_dims(x, ax + 1)  # noqa: E731
    args = jax.tree.map(keep, arg_axes, args, is_leaf=lambda x: x is None)
    kwargs = jax.tree.map(keep, kw_axes, kwargs, is_leaf=lambda x: x is None)
    keys = None if dropout_key is None else jax.random.split(dropout_key, n)
    factors = {p: stk.factors(p) for p in stk.paths}
    ranks = {p: stk.slot_rank(p) for p in stk.paths}
    tagged = {targets[p].index: (p, f) for p, f in factors.items()}

    def one(args, kwargs, i, key):
        slot = jnp.clip(i, 0, stk.slots - 1)  # in range, so that an unknown id's NaN scale reaches its output
        hot = jnp.arange(stk.slots).reshape((1,) * i.ndim + (-1,)) == i[..., None]  # no gather: a sharded id
        # needs no collective (id -1 hits nothing); per token, one row of `hot` per token
        known = (i < stk.slots) & ((i >= -1) if signed else True)  # an unknown id (traced, not caught by _ids): NaN
        by_values: dict[tuple, jax.Array] = {}  # modules whose adapters have the same scales share one
        for values in stk.scale.values():
            if values not in by_values:
                if len(set(values)) == 1:  # a folded stack, or one alpha/rank for all: no constant
                    s = jnp.where(i >= 0, values[0], 0.0)
                else:  # the scales are static: one (n,) constant of the program
                    s = jnp.sum(jnp.where(hot, np.asarray(values, np.float32), 0.0), axis=-1)
                by_values[values] = jnp.where(known, s, jnp.nan)
        scale = {p: by_values[stk.scale[p]] for p in stk.paths}
        select = _trace.Selection(slot, scale, ranks, stk.slots, n)
        ctx = _trace.Context(fallback=unsupported, dropout_key=key, stack=select)
        out = _trace.run(fn, params, args, kwargs, tagged, ctx)
        shapes.append(jax.tree.map(np.shape, out))  # static, read once the vmap has traced `one`
        return out

    shapes: list[Any] = []
    in_axes = (arg_axes, kw_axes, 0, None if keys is None else 0)
    out = jax.vmap(one, in_axes=in_axes, out_axes=example_out_axes)(args, kwargs, ids, keys)
    return _squeeze(example_out_axes, shapes[-1], out)
