"""Control flow and calls: a targeted weight entering nested ``jit``, custom-derivative calls, ``remat``,
``optimization_barrier``, ``scan``, ``cond``, ``while`` or ``shard_map``.

The tagged value is carried into the inner jaxpr, which the same evaluator runs; a scan over a
stacked weight slices ``a`` and ``b`` with it, and an inner call that hands a tagged weight back
unchanged returns the tagged input itself (`forward`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from ._eval import (
    KEEPS_LAZY,
    Context,
    Lazy,
    Tagged,
    UnsupportedError,
    closed,
    evaluate,
    forward,
    mismatch,
    realize,
    register,
    untag,
)
from ._views import factor_specs

_INLINE = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
_REMAT = ("remat2", "checkpoint", "remat")
KEEPS_LAZY.update((*_INLINE, *_REMAT, "optimization_barrier", "scan", "cond", "while"))


@register(*_INLINE)
def _inline(eqn, invals, ctx: Context):
    jaxpr, consts = closed(eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr"))
    forwards: dict[int, int] = {}
    return forward(evaluate(jaxpr, consts, invals, ctx, range(len(invals)), forwards), forwards, invals)


@register(*_REMAT)
def _remat(eqn, invals, ctx: Context):
    jaxpr, consts = closed(eqn.params["jaxpr"])
    forwards: dict[int, int] = {}
    body = lambda *args: evaluate(jaxpr, consts, args, ctx, range(len(invals)), forwards)  # noqa: E731
    policy, prevent_cse = eqn.params.get("policy"), eqn.params.get("prevent_cse", True)
    outer, ctx.in_remat = ctx.in_remat, True
    try:
        outs = jax.checkpoint(body, policy=policy, prevent_cse=prevent_cse)(*invals)
    finally:
        ctx.in_remat = outer
    return forward(outs, forwards, invals)


@register("optimization_barrier")
def _barrier(eqn, invals, ctx: Context):
    """An identity that orders computation: keep the factors inside it too."""
    return list(lax.optimization_barrier(list(invals)))


def _slice_leading(t: Tagged, ctx: Context) -> Tagged:
    """The tagged weight of one scan step: axis 0 of the view sliced away."""
    k = t.view.origin[0]
    if ctx.probing:
        for j in t.view.weight_axes(k):
            ctx.usage.setdefault(t.view.path, {}).setdefault(j, "s")
    else:
        _check_leading(t)
    view = dataclasses.replace(t.view, present=tuple(j for j in t.view.present if j != k), origin=t.view.origin[1:])
    return Tagged(t.w, t.a, t.b, view, t.factors, t.m)


def _check_leading(t: Tagged) -> None:
    """Raise unless the view's axis 0 is the weight's leading stacked axis (where ``a`` and ``b`` scan too)."""
    k = t.view.origin[0]
    if t.factors.roles[k] != "s" or k != min(j for j in t.view.present if t.factors.roles[j] == "s"):
        raise mismatch(t, "scan", f"scanning over its axis {k}, which is not its leading stacked axis")


def scan_counts(eqn) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation.

    Older JAX names them in the params; newer JAX does not, so they are read off the avals: consts
    and carries have the same shape outside and inside the body, scanned operands and stacked
    outputs gain a leading ``length`` axis, and each group comes in the order consts, carry, xs.
    """
    p = eqn.params
    if "num_consts" in p and "num_carry" in p:
        return p["num_consts"], p["num_carry"]
    inner = closed(p["jaxpr"])[0]
    same = lambda outer, body: [tuple(o.aval.shape) == tuple(i.aval.shape) for o, i in zip(outer, body)]  # noqa: E731
    prefix = lambda flags: next((i for i, f in enumerate(flags) if not f), len(flags))  # noqa: E731
    ncarry = prefix(same(eqn.outvars, inner.outvars))
    return prefix(same(eqn.invars, inner.invars)) - ncarry, ncarry


@register("scan")
def _scan(eqn, invals, ctx: Context):
    p = eqn.params
    nconsts, ncarry = scan_counts(eqn)
    consts, init, xs = invals[:nconsts], invals[nconsts : nconsts + ncarry], invals[nconsts + ncarry :]
    init = [untag(v, "carried through a loop", ctx) for v in init]
    # a quantized stacked weight stays whole, each step getting its layer (`Lazy.scan_layer`: the
    # fused kernel reads the layer's codes in place); one without a stacked axis is dequantized
    xs = [v if _scannable(v) else realize(v) for v in xs]
    for v in xs:
        if isinstance(v, Tagged) and not ctx.probing:
            _check_leading(v)
    stacks = {n: _lazy(v) for n, v in enumerate(xs) if _lazy(v) is not None}
    xs = [_with_w(v, None) if n in stacks else v for n, v in enumerate(xs)]
    steps = jnp.arange(p["length"], dtype=jnp.int32) if stacks else None
    jaxpr, jconsts = closed(p["jaxpr"])
    outer_key = ctx.next_key()
    keys = None if outer_key is None else jax.random.split(outer_key, p["length"])

    def body(carry, step):
        x, key, index = step
        saved, ctx.dropout_key = ctx.dropout_key, key
        x = [_slice_leading(v, ctx) if isinstance(v, Tagged) else v for v in x]
        x = [_with_w(v, stacks[n].scan_layer(index)) if n in stacks else v for n, v in enumerate(x)]
        try:
            # A step handing back its own slice of a stacked weight (nnx.scan returns the layer
            # state): the stacked output is that weight itself. Carried outputs are never forwarded.
            args = [*consts, *carry, *x]
            step: dict[int, int] = {}
            outs = evaluate(jaxpr, jconsts, args, ctx, range(nconsts + ncarry, len(invals)), step)
            forwards.update({i: j for i, j in step.items() if i >= ncarry})
            for i in (i for i in step if i < ncarry):
                outs[i] = untag(args[step[i]], "carried through a loop", ctx)
        finally:
            ctx.dropout_key = saved
        return outs[:ncarry], outs[ncarry:]

    forwards: dict[int, int] = {}
    carry, ys = lax.scan(body, init, (xs, keys, steps), length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return forward([*carry, *ys], forwards, invals)


def _scannable(v) -> bool:
    w = v.w if isinstance(v, Tagged) else v
    return not isinstance(w, Lazy) or w.scannable()


def _lazy(v) -> Lazy | None:
    w = v.w if isinstance(v, Tagged) else v
    return w if isinstance(w, Lazy) else None


def _with_w(v, w):
    """``v`` with its weight ``w``: ``v`` is a bare weight or a `Tagged` one."""
    return Tagged(w, v.a, v.b, v.view, v.factors, v.m) if isinstance(v, Tagged) else w


@register("cond")
def _cond(eqn, invals, ctx: Context):
    index, ops = invals[0], invals[1:]
    # An output that every branch forwards from the same tagged operand is that operand.
    per_branch: list[dict[int, int]] = [{} for _ in eqn.params["branches"]]
    branches = [
        lambda *ops, b=b, f=f: evaluate(*closed(b), ops, ctx, range(len(ops)), f)
        for b, f in zip(eqn.params["branches"], per_branch)
    ]
    outs = lax.switch(index, branches, *ops)
    for i in set().union(*per_branch):
        if len({f.get(i) for f in per_branch}) != 1 and not ctx.probing:
            j = next(f[i] for f in per_branch if i in f)
            raise UnsupportedError(
                f"LoRA weight {ops[j].view.path!r} is returned unchanged by only some branches of a `cond`; "
                "return it from every branch or from none (or leave this module out of LoraConfig.targets)."
            )
    return forward(outs, per_branch[0], ops)


@register("while")
def _while(eqn, invals, ctx: Context):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    init = [untag(v, "carried through a loop", ctx) for v in init]
    cj, bj = closed(p["cond_jaxpr"]), closed(p["body_jaxpr"])
    cond = lambda carry: evaluate(*cj, [*cconsts, *carry], ctx)[0]  # noqa: E731
    body = lambda carry: evaluate(*bj, [*bconsts, *carry], ctx)  # noqa: E731
    return lax.while_loop(cond, body, init)


@register("shard_map")
def _shard_map(eqn, invals, ctx: Context):
    """A tagged weight entering ``shard_map``: its factors enter too, split like ``W``'s axes."""
    p = eqn.params
    jaxpr, consts = closed(p["jaxpr"])
    flat, specs, slots = [], [], []
    for v, spec in zip(invals, p["in_specs"]):
        if isinstance(v, Tagged):
            if v.factors is None:  # probing: no factors
                flat.append(v.w), specs.append(spec), slots.append((v, 1))
                continue
            a_spec, b_spec, m_spec = factor_specs(v, spec)
            flat += [v.w, v.a, v.b] + ([] if v.m is None else [v.m])
            specs += [spec, a_spec, b_spec] + ([] if v.m is None else [m_spec])
            slots.append((v, 3 if v.m is None else 4))
        else:
            flat.append(v), specs.append(spec), slots.append((None, 1))

    def body(*local):
        vals, i = [], 0
        for t, n in slots:
            if t is None:
                vals.append(local[i])
            else:
                a, b = (local[i + 1], local[i + 2]) if n >= 3 else (None, None)
                vals.append(Tagged(local[i], a, b, t.view, t.factors, local[i + 3] if n == 4 else None))
            i += n
        return evaluate(jaxpr, consts, vals, ctx)

    mapped = jax.shard_map(
        body,
        mesh=p["mesh"],
        in_specs=tuple(specs),
        out_specs=list(p["out_specs"]),
        check_vma=p.get("check_vma", True),
        axis_names=set(p.get("newly_manual_axes", p["mesh"].axis_names)),
    )
    return jax.jit(mapped)(*flat)  # traced even when called eagerly: eager shard_map refuses custom_vjp
