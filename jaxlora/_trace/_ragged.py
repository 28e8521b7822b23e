"""Expert weights: a targeted weight reaching ``ragged_dot_general`` (``lax.ragged_dot``).

A mixture-of-experts layer sorts its tokens by expert and multiplies each group of rows by its
expert's matrix: ``ragged_dot(x (m, in), W (experts, in, out), group_sizes (experts,))``. The
expert axis of ``W`` (the op's ``rhs_group_dimensions``) takes the stacked role ``s``, so each expert
gets its own factor pair, ``a (experts, in, r)`` and ``b (experts, r, out)``, and the LoRA term is
``ragged_dot(ragged_dot(x, a, g), b, g)``: the rank-``r`` rows of each group stay in that group.

The other mode, a ragged axis that is contracted (``lhs_ragged_dimensions`` in the contracting
dims; the weight gradient of a ``ragged_dot``), gives one output per group from a weight with no
group axis: the LoRA term is ``ragged(x, a)`` (per group, rank ``r``) times ``b``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from .._matmul import lora_op
from ._eval import (
    PER_EXAMPLE_RULES,
    Context,
    Tagged,
    UnsupportedError,
    bind,
    mismatch,
    register,
    untag,
    untag_all,
    view_delta_op,
)


def _ragged_dims(lc, rc, lr, rg):
    """``RaggedDotDimensionNumbers`` with no batch axes."""
    return lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=((tuple(lc), tuple(rc)), ((), ())),
        lhs_ragged_dimensions=tuple(lr),
        rhs_group_dimensions=tuple(rg),
    )


PER_EXAMPLE_RULES.add("ragged_dot_general")  # refused under adapter_ids even where no LoRA weight reaches it


@register("ragged_dot_general")
def _ragged_dot(eqn, invals, ctx: Context) -> list[Any]:
    if len(invals) != 3:  # a group_offset operand (expert-parallel shards): not factored
        return untag_all(eqn, invals, ctx)
    if ctx.stack is not None:  # before anything binds: JAX's own error would name neither cause nor fix
        raise UnsupportedError(
            "a mixed-adapter batch (adapter_ids) runs the model once per example under jax.vmap, and JAX cannot "
            "vmap `ragged_dot` with a weight shared by all examples (its batching rule needs every operand "
            "batched: NotImplementedError 'ragged_dot vmap over any dim but 0', in jax 0.10 to 0.12), so a "
            "model with ragged_dot experts has no mixed-adapter batches in jaxlora yet. Fix: apply one adapter "
            "at a time (jaxlora.apply without adapter_ids, or jaxlora.merge it), grouping requests by adapter."
        )
    x, t, sizes = invals
    if not isinstance(t, Tagged) or isinstance(sizes, Tagged):
        what = "the ragged (token) operand" if isinstance(x, Tagged) else "group sizes"
        return bind(eqn, [untag(v, f"{what} of `ragged_dot`", ctx) for v in invals])
    p = eqn.params
    dn = p["ragged_dot_dimension_numbers"]
    (xc, wc), (xb, wb) = dn.dot_dimension_numbers
    groups, ragged = tuple(dn.rhs_group_dimensions), tuple(dn.lhs_ragged_dimensions)
    base = lambda x, w: bind(eqn, [x, w, sizes])[0]  # noqa: E731
    wfree = [v for v in range(t.w.ndim) if v not in wc and v not in groups]
    if ctx.probing:
        if xb or wb:
            ctx.ops.setdefault(t.view.path, set()).add("used by `ragged_dot_general` with batch axes")
        else:
            ctx.record(t, "ragged_dot", {**{v: "i" for v in wc}, **{v: "s" for v in groups}, **{v: "o" for v in wfree}})
            ctx.experts.setdefault(t.view.path, set()).update(
                k for v in groups for k in t.view.weight_axes(t.view.origin[v])
            )
        return [base(x, t.w)]
    if xb or wb:
        raise UnsupportedError(
            f"LoRA weight {t.view.path!r} is used by `ragged_dot_general` with batch axes {tuple(wb)}, which "
            "jaxlora does not factor; use lax.ragged_dot on 2-D tokens (vmap over the batch), or leave this "
            "module out of LoraConfig.targets."
        )
    if t.m is not None:
        raise UnsupportedError(
            f"LoRA weight {t.view.path!r} has a DoRA magnitude but is used by `ragged_dot`, where each row "
            "belongs to another expert's output: jaxlora has no DoRA for expert weights. Fix: set "
            "LoraConfig(dora=False) or leave the expert weights out of LoraConfig.targets."
        )
    origin, roles = t.view.origin, t.factors.roles
    present = lambda role: [k for k in t.view.present if roles[k] == role]  # noqa: E731
    if sorted(origin[v] for v in groups) != present("s"):
        raise mismatch(t, "ragged_dot", f"with group axes {groups} that are not exactly its stacked (expert) axes")
    if sorted(origin[v] for v in wc) != present("i"):
        raise mismatch(t, "ragged_dot", f"contracting axes {tuple(wc)} that are not exactly its input axes")
    a_axes, b_axes = t.axes("a"), t.axes("b")
    nxfree = x.ndim - len(xc)
    o_order = [k for k in b_axes if k != "r" and roles[k] == "o"]  # b's output axes, in b's order
    if groups:  # tokens sorted by expert: each group of rows meets its own expert's factors
        (row,) = ragged
        t_row = sorted(set(range(x.ndim)) - set(xc)).index(row)
        first_dims = _ragged_dims(
            xc, [a_axes.index(origin[v]) for v in wc], ragged, [a_axes.index(origin[v]) for v in groups]
        )
        second_dims = _ragged_dims([nxfree], [b_axes.index("r")], [t_row], [b_axes.index(origin[v]) for v in groups])
        perm = list(range(nxfree)) + [nxfree + o_order.index(origin[v]) for v in wfree]
        second_op = lambda u, b: jnp.transpose(  # noqa: E731
            lax.ragged_dot_general(u, b, sizes, second_dims, precision=p["precision"]), perm
        )
    else:  # the ragged axis is contracted: one output per group, from a weight with no group axis
        first_dims = _ragged_dims(xc, [a_axes.index(origin[v]) for v in wc], ragged, [])
        perm = list(range(1 + nxfree)) + [1 + nxfree + o_order.index(origin[v]) for v in wfree]
        second_op = lambda u, b: jnp.transpose(  # noqa: E731
            lax.dot_general(u, b, (((u.ndim - 1,), (b_axes.index("r"),)), ((), ())), precision=p["precision"]), perm
        )
    return [lora_op(
        x, t.w, t.a, t.b, t.factors.scale,
        base=base,
        first_op=lambda x, a: lax.ragged_dot_general(x, a, sizes, first_dims, precision=p["precision"]),
        second_op=second_op,
        delta_op=view_delta_op(t), dropout_rate=t.factors.dropout, dropout_key=ctx.next_key(), path=t.view.path,
        stored=t.stored,
    )]  # fmt: skip
