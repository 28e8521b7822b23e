"""LoRA for any JAX function, by re-running its jaxpr with targeted weights tagged.

``fn(params, *args)`` is traced once to a jaxpr (``jax.make_jaxpr``; public API). The jaxpr is then
evaluated equation by equation on the caller's values, except that each targeted weight travels as
a `Tagged` value: ``W`` as the model sees it (after its own casts and transposes) with its LoRA
factors beside it. When a tagged weight reaches a ``dot_general``, convolution or lookup, the
equation is replaced by `_matmul.lora_op`; through nested ``jit``, ``remat``, ``scan``, ``cond``,
``while`` and custom derivative rules the tagged value is carried into the inner jaxpr. Every other
equation is bound unchanged, so the result is the user's own computation plus the LoRA branches.

The same evaluator *probes* a function: with no factors, it records how each weight's axes are used
(contracted, produced, stacked), which is how `jaxlora.init` learns a weight's layout.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Jaxpr, Literal
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ._matmul import LoraFactors, lora_op

FALLBACKS = ("error", "merge")
_PASS_THROUGH = {"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint", "stop_gradient"}
_INLINE = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
_REMAT = {"remat2", "checkpoint", "remat"}


@dataclasses.dataclass(frozen=True)
class View:
    """How the array a function sees relates to the original weight ``W``.

    ``origin[v]`` is the axis of ``W`` that the view's axis ``v`` is; ``present`` lists ``W``'s axes
    not yet sliced away by a scan over stacked layers. After a ``reshape`` the axes are re-based: the
    factors are laid out for the reshaped weight, and ``merged[k]`` lists the axes of the original
    ``W`` that the new axis ``k`` stands for (``None``: each axis stands for itself).
    """

    path: str
    present: tuple[int, ...]
    origin: tuple[int, ...]
    merged: tuple[tuple[int, ...], ...] | None = None

    def weight_axes(self, k: int) -> tuple[int, ...]:
        """The axes of the original ``W`` behind axis ``k`` of the (re-based) layout."""
        return (k,) if self.merged is None else self.merged[k]


@jax.tree_util.register_pytree_node_class
class Tagged:
    """A targeted weight inside the traced function: its view ``w`` and the factors (None when probing)."""

    def __init__(self, w, a, b, view: View, factors: LoraFactors | None):
        self.w, self.a, self.b, self.view, self.factors = w, a, b, view, factors

    def tree_flatten(self):
        return (self.w, self.a, self.b), (self.view, self.factors)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def replace(self, w=None, **view_changes) -> Tagged:
        view = dataclasses.replace(self.view, **view_changes) if view_changes else self.view
        return Tagged(self.w if w is None else w, self.a, self.b, view, self.factors)

    def role(self, axis: int) -> str:
        return self.factors.roles[self.view.origin[axis]]

    def axes(self, side: str) -> list:
        """The axes of factor ``side`` ("a" or "b") as original-axis numbers, with "r" for the rank."""
        roles, present = self.factors.roles, self.view.present
        group = lambda role: [k for k in present if roles[k] == role]  # noqa: E731
        return group("s") + group("i") + ["r"] if side == "a" else group("s") + ["r"] + group("o")


class UnsupportedError(ValueError):
    """A targeted weight reached an operation that jaxlora cannot factor."""


@dataclasses.dataclass
class Context:
    """State of one evaluation: probe records, or the dropout key and the fallback policy."""

    probing: bool = False
    in_remat: bool = False  # inside jax.checkpoint, where the one-read [W | a] op measured slower
    fallback: str = "error"
    dropout_key: jax.Array | None = None
    usage: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict)
    ops: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    sites: int = 0

    def record(self, t: Tagged, op: str, roles: dict[int, str]) -> None:
        self.ops.setdefault(t.view.path, set()).add(op)
        seen = self.usage.setdefault(t.view.path, {})
        for axis, role in roles.items():
            for k in t.view.weight_axes(t.view.origin[axis]):
                seen.setdefault(k, role)

    def next_key(self) -> jax.Array | None:
        self.sites += 1
        return None if self.dropout_key is None else jax.random.fold_in(self.dropout_key, self.sites)


# --------------------------------------------------------------------------- evaluation


def _bind(eqn, invals: Sequence[Any], params: dict[str, Any] | None = None) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params if params is None else params)
    subfuns: Sequence[Any] = ()
    if isinstance(params, tuple):  # older JAX returns (subfuns, params)
        subfuns, params = params
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    if manager is not None:
        with manager:
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(
    jaxpr: Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    ctx: Context,
    forwardable: Sequence[int] = (),
    forwards: dict[int, int] | None = None,
) -> list[Any]:
    """Evaluate ``jaxpr`` on ``args``, where some values may be `Tagged` weights.

    A tagged output that is the tagged input ``args[j]`` itself (for ``j`` in ``forwardable``)
    comes back as its plain ``w``, a placeholder, and ``forwards[i] = j`` records it: the caller
    puts the tagged input back in its place (`_forward`). A call that hands its weights back
    untouched (``nnx.remat`` and ``nnx.scan`` return the module's state) thus returns the tagged
    weight, not a weight without its LoRA branch. Any other tagged output is untagged (an error, or
    the merged weight).
    """
    env: dict[Any, Any] = {}
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(v, Tagged) for v in invals):
            outs = _rule(eqn, invals, ctx)
        else:
            outs = _bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs):
            env[var] = val
    outs = []
    for i, v in enumerate(jaxpr.outvars):
        val = read(v)
        j = next((j for j in forwardable if args[j] is val), None) if isinstance(val, Tagged) else None
        if j is not None and forwards is not None:
            forwards[i] = j
            outs.append(val.w)
        else:
            outs.append(_untag(val, "returned by the function", ctx))
    return outs


def _forward(outs: Sequence[Any], forwards: dict[int, int], invals: Sequence[Any]) -> list[Any]:
    """``outs`` with each output that forwards a tagged input replaced by that input."""
    return [invals[forwards[i]] if i in forwards else o for i, o in enumerate(outs)]


def _closed(j) -> tuple[Jaxpr, Sequence[Any]]:
    return (j.jaxpr, j.consts) if hasattr(j, "consts") else (j, ())


def _untag(value: Any, where: str, ctx: Context) -> Any:
    """A plain array for ``value``: the merged weight under the "merge" fallback, else an error."""
    if not isinstance(value, Tagged):
        return value
    if ctx.probing:
        ctx.ops.setdefault(value.view.path, set()).add(f"is {where}")
        return value.w
    if ctx.fallback == "merge":
        return value.w + _delta_view(value).astype(value.w.dtype)
    raise UnsupportedError(
        f"LoRA weight {value.view.path!r} is {where}, which jaxlora cannot compute in factored form "
        "(it only factors dot_general, conv_general_dilated and gather). Fix: leave this module out of "
        'LoraConfig.targets, or pass unsupported="merge" to jaxlora.apply to use W + scale·B·A for this '
        "use (it materialises the merged weight)."
    )


def _delta_view(t: Tagged, a=None, b=None, scale=None, accumulate=jnp.float32) -> jax.Array:
    """ΔW for the current view of ``t`` (its remaining axes, in view order), from ``t``'s factors or ``a, b``."""
    roles = "".join(t.factors.roles[k] for k in t.view.present)
    from ._matmul import delta  # local: the one ΔW formula

    a, b = (t.a, t.b) if a is None else (a, b)
    scale = t.factors.scale if scale is None else scale
    d = delta(dataclasses.replace(t.factors, a=a, b=b, roles=roles, scale=scale), accumulate=accumulate)
    return jnp.transpose(d, [t.view.present.index(k) for k in t.view.origin])


def _delta_op(t: Tagged):
    """lora_op's ``delta_op``: unscaled ΔW of the view from (first = a, second = b), in their dtype."""
    return lambda first, second: _delta_view(t, first, second, 1.0, None)


def _rule(eqn, invals: list[Any], ctx: Context) -> list[Any]:
    name = eqn.primitive.name
    if name in _PASS_THROUGH and len(invals) == 1:
        (t,) = invals
        return [t.replace(w=_bind(eqn, [t.w])[0])]
    if name == "transpose":
        (t,) = invals
        perm = eqn.params["permutation"]
        return [t.replace(w=_bind(eqn, [t.w])[0], origin=tuple(t.view.origin[p] for p in perm))]
    if name in ("slice", "dynamic_slice") and isinstance(invals[0], Tagged):
        return [_slice(eqn, invals, ctx)]
    if name == "split":
        return _split_axis(eqn, invals[0], ctx)
    if name == "squeeze":
        return [_squeeze(eqn, invals[0], ctx)]
    if name == "reshape" and len(invals) == 1 and eqn.params.get("dimensions") is None:
        return [_reshape(eqn, invals[0], ctx)]
    if name == "reshard":  # explicit sharding: move the factors with W (their specs follow W's roles)
        (t,) = invals
        return [_reshard(t, _bind(eqn, [t.w])[0], eqn.params["dst_sharding"])]
    if name == "shard_map":
        return _shard_map(eqn, invals, ctx)
    if name == "dot_general":
        return [_dot_general(eqn, invals, ctx)]
    if name == "conv_general_dilated":
        return [_conv(eqn, invals, ctx)]
    if name == "gather":
        return [_gather(eqn, invals, ctx)]
    if name in _INLINE:
        jaxpr, consts = _closed(eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr"))
        forwards: dict[int, int] = {}
        return _forward(evaluate(jaxpr, consts, invals, ctx, range(len(invals)), forwards), forwards, invals)
    if name in _REMAT:
        jaxpr, consts = _closed(eqn.params["jaxpr"])
        forwards = {}
        body = lambda *args: evaluate(jaxpr, consts, args, ctx, range(len(invals)), forwards)  # noqa: E731
        policy, prevent_cse = eqn.params.get("policy"), eqn.params.get("prevent_cse", True)
        outer, ctx.in_remat = ctx.in_remat, True
        try:
            outs = jax.checkpoint(body, policy=policy, prevent_cse=prevent_cse)(*invals)
        finally:
            ctx.in_remat = outer
        return _forward(outs, forwards, invals)
    if name == "optimization_barrier":  # an identity that orders computation: keep the factors inside it too
        return list(lax.optimization_barrier(list(invals)))
    if name == "scan":
        return _scan(eqn, invals, ctx)
    if name == "cond":
        return _cond(eqn, invals, ctx)
    if name == "while":
        return _while(eqn, invals, ctx)
    plain = [_untag(v, f"used by `{name}`", ctx) for v in invals]
    return _bind(eqn, plain)


# --------------------------------------------------------------------------- views of the weight


def _factor_axis(t: Tagged, side: str, v: int) -> int | None:
    """Where view axis ``v`` of ``t.w`` sits in factor ``side`` ("a" or "b"), or None if not there."""
    axes = t.axes(side)
    k = t.view.origin[v]
    return axes.index(k) if k in axes else None


def _slice(eqn, invals, ctx: Context) -> Tagged:
    """``W[...]`` by ``slice``/``dynamic_slice``: slice ``a`` and ``b`` along the same axes."""
    t, starts = invals[0], [_untag(v, "used as a slice index", ctx) for v in invals[1:]]
    w = _bind(eqn, [t.w, *starts])[0]
    if ctx.probing:
        return t.replace(w=w)
    p, a, b = eqn.params, t.a, t.b
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
        ia, ib = _factor_axis(t, "a", v), _factor_axis(t, "b", v)
        a = a if ia is None else cut(a, ia)
        b = b if ib is None else cut(b, ib)
    return Tagged(w, a, b, t.view, t.factors)


def _split_axis(eqn, t: Tagged, ctx: Context) -> list[Tagged]:
    """``jnp.split(W, ...)`` (a fused QKV kernel): each piece slices ``a`` or ``b`` alike."""
    outs, axis = _bind(eqn, [t.w]), eqn.params["axis"] % t.w.ndim
    if ctx.probing:
        return [t.replace(w=w) for w in outs]
    ia, ib = _factor_axis(t, "a", axis), _factor_axis(t, "b", axis)
    pieces, start = [], 0
    for w in outs:
        size = w.shape[axis]
        cut = lambda f, i, start=start, size=size: f if i is None else lax.slice_in_dim(f, start, start + size, axis=i)  # noqa: E731
        pieces.append(Tagged(w, cut(t.a, ia), cut(t.b, ib), t.view, t.factors))
        start += size
    return pieces


def _squeeze(eqn, t: Tagged, ctx: Context) -> Tagged:
    """Drop size-1 axes (``W[i]`` of a stacked weight): the same axes leave ``a`` and ``b``."""
    dims = sorted(d % t.w.ndim for d in eqn.params["dimensions"])
    w = _bind(eqn, [t.w])[0]
    gone = [t.view.origin[v] for v in dims]
    if ctx.probing:  # an axis of W indexed away (W[i]) is a stacked-layer axis unless another use says otherwise
        kept = {j for v, k in enumerate(t.view.origin) if v not in dims for j in t.view.weight_axes(k)}
        for j in {j for k in gone for j in t.view.weight_axes(k)} - kept:
            ctx.usage.setdefault(t.view.path, {}).setdefault(j, "s")
    a, b = t.a, t.b
    if not ctx.probing:
        a = jnp.squeeze(a, tuple(i for v in dims if (i := _factor_axis(t, "a", v)) is not None))
        b = jnp.squeeze(b, tuple(i for v in dims if (i := _factor_axis(t, "b", v)) is not None))
    origin = tuple(k for v, k in enumerate(t.view.origin) if v not in dims)
    view = dataclasses.replace(t.view, present=tuple(k for k in t.view.present if k not in gone), origin=origin)
    return Tagged(w, a, b, view, t.factors)


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


def _reshape(eqn, t: Tagged, ctx: Context) -> Tagged:
    """A reshape that splits or merges axes of one role (``kernel.reshape(d, heads * hd)``).

    The factors are re-laid out in the reshaped weight's axis order and reshaped alike, so the
    reshaped view becomes the new reference layout.
    """
    new = tuple(eqn.params["new_sizes"])
    groups = _reshape_groups(t.w.shape, new)
    if groups is not None and any(len(go) > 1 and len(gn) > 1 for go, gn in groups):
        groups = None  # regroups axes ((4, 6) -> (6, 4)) rather than splitting or merging them
    if groups is None:
        return _bind(eqn, [_untag(t, f"reshaped from {t.w.shape} to {new} (not a split or merge of axes)", ctx)])[0]
    w = _bind(eqn, [t.w])[0]
    merged_of = lambda v: t.view.weight_axes(t.view.origin[v])  # noqa: E731
    merged = [()] * len(new)
    for go, gn in groups:
        for j in gn:
            merged[j] = tuple(sorted({k for v in go for k in merged_of(v)}))
    view = View(t.view.path, tuple(range(len(new))), tuple(range(len(new))), tuple(merged))
    if ctx.probing:
        if any(len(go) > 1 for go, _ in groups):  # merged axes must turn out to share a role
            ctx.ops.setdefault(t.view.path, set()).add(f"reshape {tuple(t.w.shape)} -> {new}")
        return Tagged(w, None, None, view, None)
    roles = [""] * len(new)
    for go, gn in groups:
        found = "".join(t.role(v) for v in go)
        if len(set(found)) != 1:
            raise _mismatch(t, "reshape", f"{t.w.shape} -> {new}, merging axes of different roles ({found!r})")
        for j in gn:
            roles[j] = found[0]
    view_roles = [t.role(v) for v in range(t.w.ndim)]

    def relayout(f: jax.Array, side: str, role: str) -> jax.Array:
        axes, rank_axis = t.axes(side), t.axes(side).index("r")
        stacked = [axes.index(t.view.origin[v]) for v in range(t.w.ndim) if view_roles[v] == "s"]
        own = [axes.index(t.view.origin[v]) for v in range(t.w.ndim) if view_roles[v] == role]
        s_new = [new[j] for j in range(len(new)) if roles[j] == "s"]
        own_new = [new[j] for j in range(len(new)) if roles[j] == role]
        if side == "a":
            return jnp.reshape(jnp.transpose(f, [*stacked, *own, rank_axis]), [*s_new, *own_new, f.shape[rank_axis]])
        return jnp.reshape(jnp.transpose(f, [*stacked, rank_axis, *own]), [*s_new, f.shape[rank_axis], *own_new])

    a, b = relayout(t.a, "a", "i"), relayout(t.b, "b", "o")
    return Tagged(w, a, b, view, dataclasses.replace(t.factors, roles="".join(roles)))


# --------------------------------------------------------------------------- factored ops


def _split(eqn, invals, ctx, op: str) -> tuple[Tagged, Any, bool]:
    tagged = [i for i, v in enumerate(invals) if isinstance(v, Tagged)]
    if len(tagged) != 1:
        paths = [invals[i].view.path for i in tagged]
        raise UnsupportedError(f"`{op}` multiplies two LoRA weights {paths} together; target only one of them.")
    i = tagged[0]
    return invals[i], invals[1 - i], i == 1


def _mismatch(t: Tagged, op: str, what: str) -> UnsupportedError:
    return UnsupportedError(
        f"LoRA weight {t.view.path!r} (roles {t.factors.roles!r}: i=input, o=output, s=stacked) is used by "
        f"`{op}` {what}. Its factors were made for another use: build them with "
        "jaxlora.init(key, params, config, fn=<this function>, args=<its inputs>) so init traces this use."
    )


def _dot_general(eqn, invals, ctx: Context):
    t, x, x_is_lhs = _split(eqn, invals, ctx, "dot_general")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    xc, wc = (lc, rc) if x_is_lhs else (rc, lc)
    xb, wb = (lb, rb) if x_is_lhs else (rb, lb)
    wfree = [v for v in range(t.w.ndim) if v not in wc and v not in wb]
    base_args = (lambda x, w: [x, w]) if x_is_lhs else (lambda x, w: [w, x])
    base = lambda x, w: _bind(eqn, base_args(x, w))[0]  # noqa: E731
    if ctx.probing:
        ctx.record(t, "dot_general", {**{v: "i" for v in wc}, **{v: "s" for v in wb}, **{v: "o" for v in wfree}})
        return base(x, t.w)
    origin, roles = t.view.origin, t.factors.roles
    stacked = [k for k in t.view.present if roles[k] == "s"]
    if sorted(origin[v] for v in wb) != stacked:
        raise _mismatch(t, "dot_general", f"with batch axes {tuple(wb)} that are not exactly its stacked axes")
    contracted = sorted(origin[v] for v in wc)
    swapped = False
    if contracted == [k for k in t.view.present if roles[k] == "i"]:
        first, second, first_axes, second_axes = t.a, t.b, t.axes("a"), t.axes("b")
    elif contracted == [k for k in t.view.present if roles[k] == "o"]:  # e.g. a tied embedding's attend
        first, second, first_axes, second_axes, swapped = t.b, t.a, t.axes("b"), t.axes("a"), True
    else:
        raise _mismatch(t, "dot_general", f"contracting axes {tuple(wc)}, which mix its input and output axes")
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
    return lora_op(
        x, t.w, first, second, t.factors.scale,
        base=base,
        first_op=lambda x, f: lax.dot_general(x, f, first_dims, precision=precision, out_sharding=first_out),
        second_op=lambda u, s: jnp.transpose(
            lax.dot_general(u, s, second_dims, precision=precision, out_sharding=second_out), perm
        ),
        # not for a tied table's attend: XLA lays out W + ΔW for the transposed contraction and rounds
        # differently, so B = 0 would no longer give exactly the base logits
        delta_op=None if swapped else _delta_op(t), side_by_side=dense, dropout_rate=t.factors.dropout,
        dropout_key=ctx.next_key(),
    )  # fmt: skip


def _conv(eqn, invals, ctx: Context):
    t, x, kernel_is_rhs = _split(eqn, invals, ctx, "conv_general_dilated")
    p = eqn.params
    base = lambda x, w: _bind(eqn, [x, w])[0]  # noqa: E731
    if not kernel_is_rhs:
        return _bind(eqn, [_untag(t, "the input (not the kernel) of a convolution", ctx), x])[0]
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
        return base(x, t.w)
    if grouped:
        raise UnsupportedError(
            f"LoRA weight {t.view.path!r} is the kernel of a grouped convolution (feature_group_count="
            f"{p['feature_group_count']}, batch_group_count={p['batch_group_count']}), which has no rank-r "
            "factorisation; leave this module out of LoraConfig.targets."
        )
    roles = [t.role(v) for v in range(t.w.ndim)]
    if roles[out_axis] != "o" or roles.count("o") != 1 or "s" in roles:
        raise _mismatch(t, "conv_general_dilated", f"with output-feature axis {out_axis}")
    a_axes = t.axes("a")
    a_spec = tuple(a_axes.index("r") if v == out_axis else a_axes.index(t.view.origin[v]) for v in dn.rhs_spec)
    a_params = {**p, "dimension_numbers": lax.ConvDimensionNumbers(dn.lhs_spec, a_spec, dn.out_spec)}
    feature = dn.out_spec[1]
    return lora_op(
        x, t.w, t.a, t.b, t.factors.scale,
        base=base,
        first_op=lambda x, a: _bind(eqn, [x, a], a_params)[0],
        second_op=lambda u, b: jnp.moveaxis(lax.dot_general(u, b, (((feature,), (0,)), ((), ()))), -1, feature),
        delta_op=_delta_op(t), dropout_rate=t.factors.dropout, dropout_key=ctx.next_key(),
    )  # fmt: skip


def _gather(eqn, invals, ctx: Context):
    operand, indices = invals
    if not isinstance(operand, Tagged):
        return _bind(eqn, [operand, _untag(indices, "used as gather indices", ctx)])[0]
    t, p = operand, eqn.params
    dn, sizes = p["dimension_numbers"], p["slice_sizes"]
    base = lambda idx, w: _bind(eqn, [w, idx])[0]  # noqa: E731
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    if ctx.probing:
        ctx.record(t, "gather", {v: ("i" if v in indexed else "o") for v in range(t.w.ndim)})
        return base(indices, t.w)
    roles = [t.role(v) for v in range(t.w.ndim)]
    o_axis = t.w.ndim - 1
    simple = (
        roles[-1] == "o" and roles.count("o") == 1 and "s" not in roles and list(t.view.origin) == sorted(t.view.origin)
    )
    if not simple or o_axis in indexed or sizes[o_axis] != t.w.shape[o_axis]:
        raise _mismatch(t, "gather", "in a way other than a row lookup (embedding-style)")
    a_params = {**p, "slice_sizes": tuple(sizes[:-1]) + (t.a.shape[-1],)}
    out_axis = dn.offset_dims[-1]
    return lora_op(
        indices, t.w, t.a, t.b, t.factors.scale,
        base=base,
        first_op=lambda idx, a: _bind(eqn, [a, idx], a_params)[0],
        second_op=lambda u, b: jnp.moveaxis(lax.dot_general(u, b, (((out_axis,), (0,)), ((), ()))), -1, out_axis),
    )  # fmt: skip


# --------------------------------------------------------------------------- sharding


def _factor_specs(t: Tagged, spec: Sequence[Any]) -> tuple[P, P]:
    """Specs of ``t``'s factors for a view of ``W`` sharded as ``spec``: each factor axis takes the
    entry of the ``W`` axis it shares, the rank axis is replicated (as in `jaxlora.shardings`)."""
    spec = tuple(spec) + (None,) * (len(t.view.origin) - len(spec))
    by_axis = {k: spec[v] for v, k in enumerate(t.view.origin)}
    return tuple(P(*(None if k == "r" else by_axis[k] for k in t.axes(side))) for side in ("a", "b"))  # type: ignore[return-value]


def _reshard(t: Tagged, w: Any, dst: Any) -> Tagged:
    if t.factors is None:
        return t.replace(w=w)
    a_spec, b_spec = _factor_specs(t, dst.spec)
    mesh = dst.mesh
    a = jax.sharding.reshard(t.a, NamedSharding(mesh, a_spec))
    b = jax.sharding.reshard(t.b, NamedSharding(mesh, b_spec))
    return Tagged(w, a, b, t.view, t.factors)


def _shard_map(eqn, invals, ctx: Context):
    """A tagged weight entering ``shard_map``: its factors enter too, split like ``W``'s axes."""
    p = eqn.params
    jaxpr, consts = _closed(p["jaxpr"])
    flat, specs, slots = [], [], []
    for v, spec in zip(invals, p["in_specs"]):
        if isinstance(v, Tagged):
            if v.factors is None:  # probing: no factors
                flat.append(v.w), specs.append(spec), slots.append((v, 1))
                continue
            a_spec, b_spec = _factor_specs(v, spec)
            flat += [v.w, v.a, v.b]
            specs += [spec, a_spec, b_spec]
            slots.append((v, 3))
        else:
            flat.append(v), specs.append(spec), slots.append((None, 1))

    def body(*local):
        vals, i = [], 0
        for t, n in slots:
            if t is None:
                vals.append(local[i])
            else:
                a, b = (local[i + 1], local[i + 2]) if n == 3 else (None, None)
                vals.append(Tagged(local[i], a, b, t.view, t.factors))
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


# --------------------------------------------------------------------------- control flow


def _slice_leading(t: Tagged, ctx: Context) -> Tagged:
    """The tagged weight of one scan step: axis 0 of the view sliced away."""
    k = t.view.origin[0]
    if ctx.probing:
        for j in t.view.weight_axes(k):
            ctx.usage.setdefault(t.view.path, {}).setdefault(j, "s")
    else:
        _check_leading(t)
    view = dataclasses.replace(t.view, present=tuple(j for j in t.view.present if j != k), origin=t.view.origin[1:])
    return Tagged(t.w, t.a, t.b, view, t.factors)


def _check_leading(t: Tagged) -> None:
    """Raise unless the view's axis 0 is the weight's leading stacked axis (where ``a`` and ``b`` scan too)."""
    k = t.view.origin[0]
    if t.factors.roles[k] != "s" or k != min(j for j in t.view.present if t.factors.roles[j] == "s"):
        raise _mismatch(t, "scan", f"scanning over its axis {k}, which is not its leading stacked axis")


def _scan_counts(eqn) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation.

    Older JAX names them in the params; newer JAX does not, so they are read off the avals: consts
    and carries have the same shape outside and inside the body, scanned operands and stacked
    outputs gain a leading ``length`` axis, and each group comes in the order consts, carry, xs.
    """
    p = eqn.params
    if "num_consts" in p and "num_carry" in p:
        return p["num_consts"], p["num_carry"]
    inner = _closed(p["jaxpr"])[0]
    same = lambda outer, body: [tuple(o.aval.shape) == tuple(i.aval.shape) for o, i in zip(outer, body)]  # noqa: E731
    prefix = lambda flags: next((i for i, f in enumerate(flags) if not f), len(flags))  # noqa: E731
    ncarry = prefix(same(eqn.outvars, inner.outvars))
    return prefix(same(eqn.invars, inner.invars)) - ncarry, ncarry


def _scan(eqn, invals, ctx: Context):
    p = eqn.params
    nconsts, ncarry = _scan_counts(eqn)
    consts, init, xs = invals[:nconsts], invals[nconsts : nconsts + ncarry], invals[nconsts + ncarry :]
    init = [_untag(v, "carried through a loop", ctx) for v in init]
    for v in xs:
        if isinstance(v, Tagged) and not ctx.probing:
            _check_leading(v)
    jaxpr, jconsts = _closed(p["jaxpr"])
    outer_key = ctx.next_key()
    keys = None if outer_key is None else jax.random.split(outer_key, p["length"])

    def body(carry, step):
        x, key = step
        saved, ctx.dropout_key = ctx.dropout_key, key
        x = [_slice_leading(v, ctx) if isinstance(v, Tagged) else v for v in x]
        try:
            # A step handing back its own slice of a stacked weight (nnx.scan returns the layer
            # state): the stacked output is that weight itself. Carried outputs are never forwarded.
            args = [*consts, *carry, *x]
            step: dict[int, int] = {}
            outs = evaluate(jaxpr, jconsts, args, ctx, range(nconsts + ncarry, len(invals)), step)
            forwards.update({i: j for i, j in step.items() if i >= ncarry})
            for i in (i for i in step if i < ncarry):
                outs[i] = _untag(args[step[i]], "carried through a loop", ctx)
        finally:
            ctx.dropout_key = saved
        return outs[:ncarry], outs[ncarry:]

    forwards: dict[int, int] = {}
    carry, ys = lax.scan(body, init, (xs, keys), length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return _forward([*carry, *ys], forwards, invals)


def _cond(eqn, invals, ctx: Context):
    index, ops = invals[0], invals[1:]
    # An output that every branch forwards from the same tagged operand is that operand.
    per_branch: list[dict[int, int]] = [{} for _ in eqn.params["branches"]]
    branches = [
        lambda *ops, b=b, f=f: evaluate(*_closed(b), ops, ctx, range(len(ops)), f)
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
    return _forward(outs, per_branch[0], ops)


def _while(eqn, invals, ctx: Context):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    init = [_untag(v, "carried through a loop", ctx) for v in init]
    cj, bj = _closed(p["cond_jaxpr"]), _closed(p["body_jaxpr"])
    cond = lambda carry: evaluate(*cj, [*cconsts, *carry], ctx)[0]  # noqa: E731
    body = lambda carry: evaluate(*bj, [*bconsts, *carry], ctx)  # noqa: E731
    return lax.while_loop(cond, body, init)


# --------------------------------------------------------------------------- entry point


def run(
    fn: Callable[..., Any],
    params: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    tagged: dict[int, tuple[str, LoraFactors | None]],
    ctx: Context,
) -> Any:
    """Call ``fn(params, *args, **kwargs)`` with the params leaves in ``tagged`` (by leaf index) tagged.

    Array leaves of ``params``, ``args`` and ``kwargs`` are traced; every other leaf is static.
    """
    from ._tree import is_array

    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    dynamic = [i for i, leaf in enumerate(leaves) if is_array(leaf)]

    def flat_fn(*values):
        full = list(leaves)
        for i, v in zip(dynamic, values):
            full[i] = v
        p, a, k = jax.tree_util.tree_unflatten(treedef, full)
        return fn(p, *a, **k)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*(leaves[i] for i in dynamic))
    values = []
    for i in dynamic:
        v = leaves[i]
        if i in tagged:
            path, factors = tagged[i]
            view = View(path, tuple(range(v.ndim)), tuple(range(v.ndim)))
            v = Tagged(v, None if factors is None else factors.a, None if factors is None else factors.b, view, factors)
        values.append(v)
    outs = evaluate(closed.jaxpr, closed.consts, values, ctx)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def path_seed(path: str) -> int:
    """A stable 31-bit seed for a module path (independent of which other modules are targeted)."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF
