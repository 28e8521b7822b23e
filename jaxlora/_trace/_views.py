"""Views of ``W``: casts, transposes, slices, splits, squeezes, reshapes and reshards of a targeted weight.

Each keeps ``a`` and ``b`` in step with the view: ``ΔW[s, i, o]`` restricted to a box is the product
of the restricted factors, and a reshape that splits or merges axes of one role re-bases the factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ._eval import VIEWS, Context, Tagged, View, bind, mismatch, register, untag, untag_all

_PASS_THROUGH = ("convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint", "stop_gradient")
# a lazy (quantized) weight's view stays lazy through these, so its matmul keeps the stored form (`_eval.Viewed`)
VIEWS.update((*_PASS_THROUGH, "transpose", "slice", "dynamic_slice", "split", "squeeze", "reshape", "reshard"))


@register(*_PASS_THROUGH)
def _pass_through(eqn, invals, ctx: Context) -> list[Any]:
    if len(invals) != 1:
        return untag_all(eqn, invals, ctx)
    (t,) = invals
    return [t.replace(w=bind(eqn, [t.w])[0])]


@register("transpose")
def _transpose(eqn, invals, ctx: Context) -> list[Any]:
    (t,) = invals
    perm = eqn.params["permutation"]
    return [t.replace(w=bind(eqn, [t.w])[0], origin=tuple(t.view.origin[p] for p in perm))]


def _factor_axis(t: Tagged, side: str, v: int) -> int | None:
    """Where view axis ``v`` of ``t.w`` sits in factor ``side`` ("a" or "b"), or None if not there."""
    axes = t.axes(side)
    k = t.view.origin[v]
    return axes.index(k) if k in axes else None


@register("slice", "dynamic_slice")
def _slice(eqn, invals, ctx: Context) -> list[Any]:
    """``W[...]`` by ``slice``/``dynamic_slice``: slice ``a`` and ``b`` along the same axes."""
    if not isinstance(invals[0], Tagged):  # a tagged weight used as an index
        return untag_all(eqn, invals, ctx)
    t, starts = invals[0], [untag(v, "used as a slice index", ctx) for v in invals[1:]]
    w = bind(eqn, [t.w, *starts])[0]
    if ctx.probing:
        return [t.replace(w=w)]
    p, a, b, m = eqn.params, t.a, t.b, t.m
    for v in range(t.w.ndim):
        if eqn.primitive.name == "slice":
            start, limit = p["start_indices"][v], p["limit_indices"][v]
            stride = (p["strides"] or (1,) * t.w.ndim)[v]
            if (start, limit, stride) == (0, t.w.shape[v], 1):
                continue
            cut = lambda f, i, s=start, e=limit, k=stride: lax.slice_in_dim(f, s, e, k, axis=i)  # noqa: E731
        else:
            size = p["slice_sizes"][v]
            if size == t.w.shape[v]:
                continue
            cut = lambda f, i, s=starts[v], n=size: lax.dynamic_slice_in_dim(f, s, n, axis=i)  # noqa: E731
        ia, ib, im = _factor_axis(t, "a", v), _factor_axis(t, "b", v), _factor_axis(t, "m", v)
        a = a if ia is None else cut(a, ia)
        b = b if ib is None else cut(b, ib)
        m = m if im is None or m is None else cut(m, im)
    return [Tagged(w, a, b, t.view, t.factors, m)]


@register("split")
def _split_axis(eqn, invals, ctx: Context) -> list[Tagged]:
    """``jnp.split(W, ...)`` (a fused QKV kernel): each piece slices ``a`` or ``b`` alike."""
    (t,) = invals
    outs, axis = bind(eqn, [t.w]), eqn.params["axis"] % t.w.ndim
    if ctx.probing:
        return [t.replace(w=w) for w in outs]
    ia, ib, im = _factor_axis(t, "a", axis), _factor_axis(t, "b", axis), _factor_axis(t, "m", axis)
    pieces, start = [], 0
    for w in outs:
        size = w.shape[axis]
        cut = lambda f, i, start=start, size=size: f if i is None else lax.slice_in_dim(f, start, start + size, axis=i)  # noqa: E731
        m = None if t.m is None else cut(t.m, im)
        pieces.append(Tagged(w, cut(t.a, ia), cut(t.b, ib), t.view, t.factors, m))
        start += size
    return pieces


@register("squeeze")
def _squeeze(eqn, invals, ctx: Context) -> list[Tagged]:
    """Drop size-1 axes (``W[i]`` of a stacked weight): the same axes leave ``a`` and ``b``."""
    (t,) = invals
    dims = sorted(d % t.w.ndim for d in eqn.params["dimensions"])
    w = bind(eqn, [t.w])[0]
    gone = [t.view.origin[v] for v in dims]
    if ctx.probing:  # an axis of W indexed away (W[i]) is a stacked-layer axis unless another use says otherwise
        kept = {j for v, k in enumerate(t.view.origin) if v not in dims for j in t.view.weight_axes(k)}
        for j in {j for k in gone for j in t.view.weight_axes(k)} - kept:
            ctx.usage.setdefault(t.view.path, {}).setdefault(j, "s")
    a, b, m = t.a, t.b, t.m
    if not ctx.probing:
        a = jnp.squeeze(a, tuple(i for v in dims if (i := _factor_axis(t, "a", v)) is not None))
        b = jnp.squeeze(b, tuple(i for v in dims if (i := _factor_axis(t, "b", v)) is not None))
        if m is not None:
            m = jnp.squeeze(m, tuple(i for v in dims if (i := _factor_axis(t, "m", v)) is not None))
    origin = tuple(k for v, k in enumerate(t.view.origin) if v not in dims)
    view = dataclasses.replace(t.view, present=tuple(k for k in t.view.present if k not in gone), origin=origin)
    return [Tagged(w, a, b, view, t.factors, m)]


def _reshape_groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split a reshape into runs of old axes and new axes with equal sizes; None if it reorders data."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        go, gn, po, pn = [], [], 1, 1
        if i < len(old):
            go, po, i = [i], old[i], i + 1
        if j < len(new):
            gn, pn, j = [j], new[j], j + 1
        while po != pn:
            if po < pn and i < len(old):
                go, po, i = [*go, i], po * old[i], i + 1
            elif pn < po and j < len(new):
                gn, pn, j = [*gn, j], pn * new[j], j + 1
            else:
                return None
        if (not go or not gn) and groups:  # trailing size-1 axes join the group before them
            groups[-1] = (groups[-1][0] + go, groups[-1][1] + gn)
        elif not go or not gn:
            return None
        else:
            groups.append((go, gn))
    return groups


@register("reshape")
def _reshape(eqn, invals, ctx: Context) -> list[Any]:
    """A reshape that splits or merges axes of one role (``kernel.reshape(d, heads * hd)``).

    The factors are re-laid out in the reshaped weight's axis order and reshaped alike, so the
    reshaped view becomes the new reference layout.
    """
    if len(invals) != 1 or eqn.params.get("dimensions") is not None:
        return untag_all(eqn, invals, ctx)
    (t,) = invals
    new = tuple(eqn.params["new_sizes"])
    groups = _reshape_groups(t.w.shape, new)
    if groups is not None and any(len(go) > 1 and len(gn) > 1 for go, gn in groups):
        groups = None  # regroups axes ((4, 6) -> (6, 4)) rather than splitting or merging them
    if groups is None:
        return bind(eqn, [untag(t, f"reshaped from {t.w.shape} to {new} (not a split or merge of axes)", ctx)])
    w = bind(eqn, [t.w])[0]
    merged_of = lambda v: t.view.weight_axes(t.view.origin[v])  # noqa: E731
    merged = [()] * len(new)
    for go, gn in groups:
        for j in gn:
            merged[j] = tuple(sorted({k for v in go for k in merged_of(v)}))
    view = View(t.view.path, tuple(range(len(new))), tuple(range(len(new))), tuple(merged))
    if ctx.probing:
        if any(len(go) > 1 for go, _ in groups):  # merged axes must turn out to share a role
            ctx.ops.setdefault(t.view.path, set()).add(f"reshape {tuple(t.w.shape)} -> {new}")
        return [Tagged(w, None, None, view, None)]
    roles = [""] * len(new)
    for go, gn in groups:
        found = "".join(t.role(v) for v in go)
        if len(set(found)) != 1:
            raise mismatch(t, "reshape", f"{t.w.shape} -> {new}, merging axes of different roles ({found!r})")
        for j in gn:
            roles[j] = found[0]
    view_roles = [t.role(v) for v in range(t.w.ndim)]

    def relayout(f: jax.Array, side: str, role: str) -> jax.Array:
        axes = t.axes(side)
        stacked = [axes.index(t.view.origin[v]) for v in range(t.w.ndim) if view_roles[v] == "s"]
        own = [axes.index(t.view.origin[v]) for v in range(t.w.ndim) if view_roles[v] == role]
        s_new = [new[j] for j in range(len(new)) if roles[j] == "s"]
        own_new = [new[j] for j in range(len(new)) if roles[j] == role]
        if side == "m":  # DoRA's magnitude: stacked and output axes, no rank
            return jnp.reshape(jnp.transpose(f, [*stacked, *own]), [*s_new, *own_new])
        rank_axis = axes.index("r")
        if side == "a":
            return jnp.reshape(jnp.transpose(f, [*stacked, *own, rank_axis]), [*s_new, *own_new, f.shape[rank_axis]])
        return jnp.reshape(jnp.transpose(f, [*stacked, rank_axis, *own]), [*s_new, f.shape[rank_axis], *own_new])

    a, b = relayout(t.a, "a", "i"), relayout(t.b, "b", "o")
    m = None if t.m is None else relayout(t.m, "m", "o")
    return [Tagged(w, a, b, view, dataclasses.replace(t.factors, roles="".join(roles)), m)]


def factor_specs(t: Tagged, spec: Sequence[Any]) -> tuple[P, P, P]:
    """Specs of ``t``'s factors (``a``, ``b``, DoRA's ``m``) for a view of ``W`` sharded as ``spec``: each
    factor axis takes the entry of the ``W`` axis it shares, the rank axis is replicated (as in
    `jaxlora.shardings`)."""
    spec = tuple(spec) + (None,) * (len(t.view.origin) - len(spec))
    by_axis = {k: spec[v] for v, k in enumerate(t.view.origin)}
    return tuple(P(*(None if k == "r" else by_axis[k] for k in t.axes(side))) for side in ("a", "b", "m"))  # type: ignore[return-value]


@register("reshard")
def _reshard(eqn, invals, ctx: Context) -> list[Tagged]:
    """Explicit sharding: the factors move with ``W`` (their specs follow ``W``'s roles)."""
    (t,) = invals
    w, dst = bind(eqn, [t.w])[0], eqn.params["dst_sharding"]
    if t.factors is None:
        return [t.replace(w=w)]
    a_spec, b_spec, m_spec = factor_specs(t, dst.spec)
    mesh = dst.mesh
    a = jax.sharding.reshard(t.a, NamedSharding(mesh, a_spec))
    b = jax.sharding.reshard(t.b, NamedSharding(mesh, b_spec))
    m = None if t.m is None else jax.sharding.reshard(t.m, NamedSharding(mesh, m_spec))
    return [Tagged(w, a, b, t.view, t.factors, m)]
