"""Factored ops: a targeted weight reaching ``dot_general``, ``conv_general_dilated`` or ``gather``.

Each rule reads the op's dimension numbers, checks them against the weight's roles and hands
`_matmul.lora_op` the base op and the two factor ops in ``W``'s layout; the LoRA math lives there.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .._matmul import Rows, lora_op, stacked_op
from ._eval import Context, Tagged, UnsupportedError, bind, mismatch, register, untag, view_delta_op, view_norm_op


def _dora(t: Tagged, out_axes: dict[int, int]) -> dict[str, Any]:
    """lora_op's DoRA arguments: ``m``, its norm, and ``to_out`` placing each axis of ``m`` (an axis
    of ``W``) at output position ``out_axes[k]``, size 1 elsewhere. Empty without DoRA."""
    if t.m is None:
        return {}
    m_axes = t.axes("m")

    def to_out(g, ndim):
        order = sorted(m_axes, key=lambda k: out_axes[k])
        g = jnp.transpose(g, [m_axes.index(k) for k in order])
        shape = [1] * ndim
        for k, d in zip(order, g.shape):
            shape[out_axes[k]] = d
        return jnp.reshape(g, shape)

    return dict(magnitude=t.m, norm_op=view_norm_op(t), to_out=to_out)


def _split(eqn, invals, ctx, op: str) -> tuple[Tagged, Any, bool]:
    tagged = [i for i, v in enumerate(invals) if isinstance(v, Tagged)]
    if len(tagged) != 1:
        paths = [invals[i].view.path for i in tagged]
        raise UnsupportedError(f"`{op}` multiplies two LoRA weights {paths} together; target only one of them.")
    i = tagged[0]
    return invals[i], invals[1 - i], i == 1


@register("dot_general")
def _dot_general(eqn, invals, ctx: Context) -> list[Any]:
    t, x, x_is_lhs = _split(eqn, invals, ctx, "dot_general")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    xc, wc = (lc, rc) if x_is_lhs else (rc, lc)
    xb, wb = (lb, rb) if x_is_lhs else (rb, lb)
    wfree = [v for v in range(t.w.ndim) if v not in wc and v not in wb]
    base_args = (lambda x, w: [x, w]) if x_is_lhs else (lambda x, w: [w, x])
    base = lambda x, w: bind(eqn, base_args(x, w))[0]  # noqa: E731
    if ctx.probing:
        ctx.record(t, "dot_general", {**{v: "i" for v in wc}, **{v: "s" for v in wb}, **{v: "o" for v in wfree}})
        return [base(x, t.w)]
    origin, roles = t.view.origin, t.factors.roles
    stacked = [k for k in t.view.present if roles[k] == "s"]
    if sorted(origin[v] for v in wb) != stacked:
        raise mismatch(t, "dot_general", f"with batch axes {tuple(wb)} that are not exactly its stacked axes")
    contracted = sorted(origin[v] for v in wc)
    swapped = False
    if contracted == [k for k in t.view.present if roles[k] == "i"]:
        first, second, first_axes, second_axes = t.a, t.b, t.axes("a"), t.axes("b")
    elif contracted == [k for k in t.view.present if roles[k] == "o"] and t.view.path in ctx.kernels - ctx.gathered:
        raise mismatch(
            t,
            "dot_general",
            f"contracting axes {tuple(wc)}, its output axes: a 'kernel' that fn looks up nowhere before is no tied "
            "embedding's attend, so its factors put A on W's output side. A 2-D kernel stored (out, in) (Hugging "
            "Face's FlaxConv1D) laid out by init without fn gets Flax's (in, out)",
        )
    elif contracted == [k for k in t.view.present if roles[k] == "o"]:  # e.g. a tied embedding's attend
        first, second, first_axes, second_axes, swapped = t.b, t.a, t.axes("b"), t.axes("a"), True
    else:
        raise mismatch(t, "dot_general", f"contracting axes {tuple(wc)}, which mix its input and output axes")
    if swapped and t.m is not None:
        raise UnsupportedError(
            f"DoRA weight {t.view.path!r} is contracted over its output axes (a tied embedding's attend), where "
            "DoRA's per-output magnitude would scale the contracted axis; jaxlora does not support this. Fix: "
            "leave this module out of LoraConfig.targets, or use plain LoRA (use_dora=False) for it."
        )
    nb, nxfree = len(xb), x.ndim - len(xc) - len(xb)
    precision = eqn.params.get("precision")
    first_dims = (
        (tuple(xc), tuple(first_axes.index(origin[v]) for v in wc)),
        (tuple(xb), tuple(first_axes.index(origin[v]) for v in wb)),
    )
    second_dims = (
        ((nb + nxfree,), (second_axes.index("r"),)),
        (tuple(range(nb)), tuple(second_axes.index(origin[v]) for v in wb)),
    )
    rest = [k for k in second_axes if k != "r" and k not in stacked]
    w_out = [nb + nxfree + rest.index(origin[v]) for v in wfree]
    x_out = list(range(nb, nb + nxfree))
    perm = list(range(nb)) + (x_out + w_out if x_is_lhs else w_out + x_out)
    w_pos = [nb + nxfree + i for i in range(len(wfree))] if x_is_lhs else [nb + i for i in range(len(wfree))]
    out_axes = {origin[v]: i for i, v in enumerate(wb)} | {origin[v]: j for v, j in zip(wfree, w_pos)}
    first_out = second_out = None
    out = eqn.params.get("out_sharding")
    if out is not None:  # sharding in types: the base op's output spec, carried to both factored ops
        spec = tuple(out.spec) + (None,) * (len(perm) - len(out.spec))
        second_spec = [None] * len(perm)
        for i, j in enumerate(perm):
            second_spec[j] = spec[i]
        x_free = [spec[i] for i in range(len(perm)) if perm[i] in x_out]
        first_out = NamedSharding(out.mesh, P(*spec[:nb], *x_free, None))
        second_out = NamedSharding(out.mesh, P(*second_spec))
    # a Dense layer: x's last axis against a 2-D (in, out) W, so [W | a] and [W ; b] are one op each
    dense = (out is None and x_is_lhs and not xb and tuple(xc) == (x.ndim - 1,) and tuple(wc) == (0,)
             and t.w.ndim == 2 and tuple(origin) == (0, 1) and roles == "io" and not swapped
             and not ctx.in_remat)  # fmt: skip
    first_op = lambda x, f: lax.dot_general(x, f, first_dims, precision=precision, out_sharding=first_out)  # noqa: E731
    second_op = lambda u, s: jnp.transpose(  # noqa: E731
        lax.dot_general(u, s, second_dims, precision=precision, out_sharding=second_out), perm
    )
    if ctx.stack is not None:  # the rank product's last axis is the rank
        rows = None
        if not xb and out is None:  # rows: x's free axes; the factors as (slots, K, R) and (slots, R, N)
            x_free = [d for d in range(x.ndim) if d not in xc]
            first_k, first_r, second_r = (
                [first_axes.index(origin[v]) for v in wc],
                first_axes.index("r"),
                second_axes.index("r"),
            )

            def groups(f, s, slots):
                a = jnp.transpose(f, [*first_k, first_r])
                a = jnp.moveaxis(a.reshape(-1, slots, a.shape[-1] // slots), 1, 0)
                s = jnp.moveaxis(s, second_r, 0)
                return a, s.reshape(slots, s.shape[0] // slots, -1)

            rest = [d for k, d in enumerate(second.shape) if k != second_r]
            rows = Rows(
                to_rows=lambda x: jnp.transpose(x, [*x_free, *xc]).reshape(  # no -1: a batch may have no rows
                    *[x.shape[d] for d in x_free], math.prod(x.shape[d] for d in xc)
                ),
                groups=groups,
                from_rows=lambda y: jnp.transpose(y.reshape(*y.shape[:-1], *rest), perm),
                precision=precision,
            )
        free = tuple(x.shape[d] for d in range(x.ndim) if d not in xc and d not in xb)
        return [_stacked(t, x, first, second, ctx, base, first_op, second_op, first_axes, second_axes, -1, rows, free)]
    return [lora_op(
        x, t.w, first, second, t.factors.scale,
        base=base,
        first_op=first_op,
        second_op=second_op,
        # not for a tied table's attend: XLA lays out W + ΔW for the transposed contraction, so at B = 0
        # the op would no longer be the base op on the untouched W
        delta_op=None if swapped else view_delta_op(t), side_by_side=dense, dropout_rate=t.factors.dropout,
        dropout_key=ctx.next_key(), path=t.view.path, stored=t.stored, **_dora(t, out_axes),
    )]  # fmt: skip


@register("conv_general_dilated")
def _conv(eqn, invals, ctx: Context) -> list[Any]:
    t, x, kernel_is_rhs = _split(eqn, invals, ctx, "conv_general_dilated")
    p = eqn.params
    base = lambda x, w: bind(eqn, [x, w])[0]  # noqa: E731
    if not kernel_is_rhs:
        return bind(eqn, [untag(t, "the input (not the kernel) of a convolution", ctx), x])
    dn = p["dimension_numbers"]
    out_axis = dn.rhs_spec[0]
    grouped = p["feature_group_count"] != 1 or p["batch_group_count"] != 1
    if ctx.probing:
        if grouped:
            ctx.ops.setdefault(t.view.path, set()).add(
                f"is the kernel of a grouped convolution (feature_group_count={p['feature_group_count']})"
            )
        else:
            ctx.record(t, "conv", {v: ("o" if v == out_axis else "i") for v in range(t.w.ndim)})
        return [base(x, t.w)]
    if grouped:
        raise UnsupportedError(
            f"LoRA weight {t.view.path!r} is the kernel of a grouped convolution (feature_group_count="
            f"{p['feature_group_count']}, batch_group_count={p['batch_group_count']}), which has no rank-r "
            "factorisation; leave this module out of LoraConfig.targets."
        )
    roles = [t.role(v) for v in range(t.w.ndim)]
    if roles[out_axis] != "o" or roles.count("o") != 1 or "s" in roles:
        raise mismatch(t, "conv_general_dilated", f"with output-feature axis {out_axis}")
    a_axes = t.axes("a")
    a_spec = tuple(a_axes.index("r") if v == out_axis else a_axes.index(t.view.origin[v]) for v in dn.rhs_spec)
    a_params = {**p, "dimension_numbers": lax.ConvDimensionNumbers(dn.lhs_spec, a_spec, dn.out_spec)}
    feature = dn.out_spec[1]
    first_op = lambda x, a: bind(eqn, [x, a], a_params)[0]  # noqa: E731
    second_op = lambda u, b: jnp.moveaxis(lax.dot_general(u, b, (((feature,), (0,)), ((), ()))), -1, feature)  # noqa: E731
    if ctx.stack is not None:
        return [_stacked(t, x, t.a, t.b, ctx, base, first_op, second_op, a_axes, t.axes("b"), feature, None, None)]
    return [lora_op(
        x, t.w, t.a, t.b, t.factors.scale,
        base=base,
        first_op=first_op,
        second_op=second_op,
        delta_op=view_delta_op(t), dropout_rate=t.factors.dropout, dropout_key=ctx.next_key(), path=t.view.path,
        stored=t.stored, **_dora(t, {t.view.origin[out_axis]: feature}),
    )]  # fmt: skip


@register("gather")
def _gather(eqn, invals, ctx: Context) -> list[Any]:
    operand, indices = invals
    if not isinstance(operand, Tagged):
        return bind(eqn, [operand, untag(indices, "used as gather indices", ctx)])
    t, p = operand, eqn.params
    dn, sizes = p["dimension_numbers"], p["slice_sizes"]
    base = lambda idx, w: bind(eqn, [w, idx])[0]  # noqa: E731
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    if ctx.probing:
        ctx.record(t, "gather", {v: ("i" if v in indexed else "o") for v in range(t.w.ndim)})
        return [base(indices, t.w)]
    ctx.gathered.add(t.view.path)
    roles = [t.role(v) for v in range(t.w.ndim)]
    o_axis = t.w.ndim - 1
    simple = (
        roles[-1] == "o" and roles.count("o") == 1 and "s" not in roles and list(t.view.origin) == sorted(t.view.origin)
    )
    if not simple or o_axis in indexed or sizes[o_axis] != t.w.shape[o_axis]:
        raise mismatch(t, "gather", "in a way other than a row lookup (embedding-style)")
    a_params = {**p, "slice_sizes": tuple(sizes[:-1]) + (t.a.shape[-1],)}
    out_axis = dn.offset_dims[-1]
    first_op = lambda idx, a: bind(eqn, [a, idx], a_params)[0]  # noqa: E731
    second_op = lambda u, b: jnp.moveaxis(lax.dot_general(u, b, (((out_axis,), (0,)), ((), ()))), -1, out_axis)  # noqa: E731
    if ctx.stack is not None:  # a lookup of one slot's rows: the gather form
        a_params["slice_sizes"] = tuple(sizes[:-1]) + (ctx.stack.rank[t.view.path],)
        return [
            _stacked(t, indices, t.a, t.b, ctx, base, first_op, second_op, t.axes("a"), t.axes("b"), None, None, None)
        ]
    return [lora_op(
        indices, t.w, t.a, t.b, t.factors.scale,
        base=base,
        first_op=first_op,
        second_op=second_op, path=t.view.path,
        **_dora(t, {t.view.origin[o_axis]: out_axis}),
    )]  # fmt: skip


def _stacked(
    t: Tagged,
    x,
    first,
    second,
    ctx: Context,
    base,
    first_op,
    second_op,
    first_axes,
    second_axes,
    t_axis,
    rows: Rows | None,
    free: tuple[int, ...] | None,
):
    """The op for one example of a stack (``adapter_ids``): `_matmul.stacked_op`, never ``W + ΔW``.

    With ids per token (``sel.index`` has the example's token shape), ``free`` (the op's free axes of
    ``x``, in order) must start with those token axes, after the example's own axis of size 1 or
    without it (a model that flattened its rows): that is how the rows are followed.
    """
    sel, path = ctx.stack, t.view.path
    index, scale = sel.index, sel.scale[path]
    if index.ndim:
        tokens = index.shape
        at = next((k for k in (1, 0) if free is not None and free[k : k + len(tokens)] == tokens and all(
            d == 1 for d in free[:k])), None)  # fmt: skip
        flat = free is not None and len(tokens) > 1 and free[:1] == (math.prod(tokens),)
        if rows is None or (at is None and not flat):
            why = ("an op other than a dot_general without batch axes (a Dense-like product)" if rows is None
                   else f"an input whose free axes {free} do not start with the token axes {tokens}")  # fmt: skip
            raise UnsupportedError(
                f"adapter_ids per token ({tokens} per example) cannot be followed to LoRA weight {path!r}: it "
                f"reaches {why}. jaxlora follows each token's id to the rows of a targeted matmul whose input "
                "keeps the token axes in front (batch, seq, ..., features). Fix: pass one id per example "
                "(adapter_ids of shape (batch,)), or leave this module out of the adapters' targets."
            )
        if flat:
            index, scale = index.reshape(-1), scale.reshape(-1)
            at = 0
        pad = lambda v: v.reshape((1,) * at + v.shape + (1,) * (len(free) - at - v.ndim))  # noqa: E731
        index, scale = pad(index), pad(scale)
    return stacked_op(
        x, t.w, first, second, index, scale, sel.slots, sel.examples,
        base=base, first_op=first_op, second_op=second_op, first_axis=first_axes.index("r"),
        second_axis=second_axes.index("r"), t_axis=t_axis, rows=rows, dropout_rate=t.factors.dropout,
        dropout_key=ctx.next_key(), stored=t.stored,
    )  # fmt: skip
