"""Evaluation: re-run a jaxpr equation by equation, with targeted weights travelling as `Tagged`.

``fn(params, *args)`` is traced once to a jaxpr (``jax.make_jaxpr``; public API) and evaluated on
the caller's values. Equations that touch no `Tagged` value are bound unchanged; the others go to
the rule registered for their primitive (`register`): views of ``W`` (`_views`), factored ops
(`_ops`), control flow and calls (`_control`). A primitive with no rule gets the weight untagged:
an error naming it, or ``W + ΔW`` under ``unsupported="merge"``.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from .._matmul import LoraFactors, delta, frozen, weight_norm
from .._quantized import is_quantized
from .._tree import is_array
from ._quantized import Lazy, Packed

FALLBACKS = ("error", "merge")


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
    """A targeted weight inside the traced function: its view ``w``, the factors (None when probing)
    and DoRA's magnitude ``m`` (None without DoRA), each sliced and reshaped alike as views go.

    ``stored`` is the `Lazy` weight that ``w`` was realized from at the matmul now using it (`realize`),
    else None: the op's backward pass keeps it rather than ``w`` (`_matmul.lora_op`). Any view drops it.
    """

    def __init__(self, w, a, b, view: View, factors: LoraFactors | None, m=None, stored=None):
        self.w, self.a, self.b, self.view, self.factors, self.m, self.stored = w, a, b, view, factors, m, stored

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.m, self.stored), (self.view, self.factors)

    @classmethod
    def tree_unflatten(cls, aux, children):
        w, a, b, m, stored = children
        return cls(w, a, b, *aux, m=m, stored=stored)

    def replace(self, w=None, **view_changes) -> Tagged:
        view = dataclasses.replace(self.view, **view_changes) if view_changes else self.view
        return Tagged(self.w if w is None else w, self.a, self.b, view, self.factors, self.m)

    def role(self, axis: int) -> str:
        return self.factors.roles[self.view.origin[axis]]

    def axes(self, side: str) -> list:
        """The axes of ``side`` ("a", "b" or the magnitude "m") as original-axis numbers, "r" the rank."""
        roles, present = self.factors.roles, self.view.present
        group = lambda role: [k for k in present if roles[k] == role]  # noqa: E731
        return {
            "a": group("s") + group("i") + ["r"],
            "b": group("s") + ["r"] + group("o"),
            "m": group("s") + group("o"),
        }[side]


KEEPS_LAZY: set[str] = set()  # primitives whose rules carry Lazy values inside (filled by _control)
VIEWS: set[str] = set()  # primitives that make a view of a weight (filled by _views): a lazy weight's stays lazy
# rules that may use a lazy weight as it is (a quantized matmul, `_qdot`); None from one: realize it
LAZY_RULES: dict[str, Callable[[Any, list[Any], Any], list[Any] | None]] = {}


def is_lazy(v: Any) -> bool:
    return isinstance(v, Lazy) or isinstance(v, Tagged) and isinstance(v.w, Lazy)


# False: a matmul's backward pass keeps a lazy weight's realized W, as before the stored form was kept
# (the tests compare both ways)
_STORED = True


def realize(v: Any, eqn=None, keep: bool = True) -> Any:
    """``v`` with a lazy weight (itself, or a tagged weight's ``w``) turned into its array.

    A tagged weight realized for a matmul (``eqn``) keeps its lazy form as ``stored``, for the op's
    backward pass to form ``W`` again from (`_matmul.lora_op`), unless not ``keep`` (inside a remat,
    whose backward recomputes ``W`` anyway: keeping it there saves one dequantization).
    """
    if isinstance(v, Lazy):
        return v.realize(eqn)
    if isinstance(v, Tagged) and isinstance(v.w, Lazy):
        stored = v.w if keep and _STORED and eqn is not None and eqn.primitive.name in MATMULS else None
        return Tagged(v.w.realize(eqn), v.a, v.b, v.view, v.factors, v.m, stored)
    return v


def _frozen(eqn, invals: Sequence[Any]) -> list[Any] | None:
    """A matmul of an untargeted lazy weight by `_matmul.frozen`: its backward pass keeps the lazy
    weight (a quantized one's codes), not ``W``, and forms ``W`` again for ``dx``. None where the
    equation is no matmul of one lazy weight and one floating operand (the weight is then realized)."""
    if not _STORED or eqn.primitive.name not in MATMULS or any(isinstance(v, Tagged) for v in invals):
        return None
    lazy = [i for i, v in enumerate(invals) if isinstance(v, Lazy)]
    floating = [i for i, v in enumerate(invals) if i not in lazy and jnp.issubdtype(jnp.result_type(v), jnp.inexact)]
    if len(lazy) != 1 or len(floating) != 1:
        return None
    (k,), (j,) = lazy, floating

    def base(x, w):
        vals = list(invals)
        vals[j], vals[k] = x, w
        return bind(eqn, vals)[0]

    return [frozen(invals[j], invals[k].realize(eqn), invals[k], base)]


@jax.tree_util.register_pytree_node_class
class Viewed(Lazy):
    """A view (`VIEWS`: a cast, transpose, slice, reshape) of a lazy weight, taken where it is realized.

    ``invals`` are the equation's inputs, the weight among them still lazy; realized, it is exactly
    the array the evaluator would have made at the view (`realize`, then the equation), so a matmul
    of the view still has a stored form to keep instead (`_frozen`, `Tagged.stored`).
    """

    def __init__(self, eqn, invals: Sequence[Any], index: int):
        self.eqn, self.invals, self.index = eqn, list(invals), index
        aval = eqn.outvars[index].aval
        self.shape, self.dtype = tuple(aval.shape), aval.dtype

    def tree_flatten(self):
        return (self.invals,), (self.eqn, self.index)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], children[0], aux[1])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def realize(self, eqn=None) -> jax.Array:
        return bind(self.eqn, [realize(v, self.eqn) for v in self.invals])[self.index]


def _view(eqn, invals: list[Any], ctx: Context) -> list[Any] | None:
    """A view of one lazy weight: kept lazy (`Viewed`); a targeted weight's view moves its factors by
    the view's rule as ever, its ``w`` then the lazy view. None where it is no such view."""
    lazy = [i for i, v in enumerate(invals) if is_lazy(v)]
    others = [v for i, v in enumerate(invals) if i not in lazy]
    if not _STORED or eqn.primitive.name not in VIEWS or len(lazy) != 1 or any(isinstance(v, Tagged) for v in others):
        return None
    (k,) = lazy
    v = invals[k]
    if isinstance(v, Lazy):
        return [Viewed(eqn, invals, i) for i in range(len(eqn.outvars))]
    outs = RULES[eqn.primitive.name](eqn, [realize(u, eqn) for u in invals], ctx)
    source = [v.w if i == k else u for i, u in enumerate(invals)]
    return [
        Tagged(Viewed(eqn, source, i), o.a, o.b, o.view, o.factors, o.m) if isinstance(o, Tagged) else o
        for i, o in enumerate(outs)
    ]


def _placeholder(v: Any) -> Any:
    """The plain array standing in for a forwarded tagged or lazy output (replaced by `forward`)."""
    w = v.w if isinstance(v, Tagged) else v
    return jnp.zeros(w.shape, w.dtype) if isinstance(w, Lazy) else w


class UnsupportedError(ValueError):
    """A targeted weight reached an operation that jaxlora cannot factor."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """One example's adapter in a `LoraStack` (``jaxlora.apply(..., adapter_ids=)``, under ``vmap``).

    Each factor holds ``slots`` adapters side by side on its rank axis, ``rank[path]`` columns each;
    ``index`` (traced) picks this example's, ``scale[path]`` (traced, from the stack's static scales;
    0 for id -1, NaN for an id out of range) is its scale.
    ``examples`` is the number of examples mapped over, for the cost of each form.
    """

    index: jax.Array
    scale: dict[str, jax.Array]
    rank: dict[str, int]
    slots: int
    examples: int


@dataclasses.dataclass
class Context:
    """State of one evaluation: probe records, or the dropout key and the fallback policy."""

    probing: bool = False
    in_remat: bool = False  # inside jax.checkpoint, where the one-read [W | a] op measured slower
    fallback: str = "error"
    dropout_key: jax.Array | None = None
    # per-example factors (a stack): never the transient W + ΔW or [W | a] (one W-sized sum per example)
    stack: Selection | None = None
    usage: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict)
    ops: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    experts: dict[str, set[int]] = dataclasses.field(default_factory=dict)  # a ragged_dot's group axes of W
    sites: int = 0
    # probing: which weights' matmul outputs flow (through float values) into each value, by id (the
    # value is kept so its id stays unique); the weights whose output reaches another matmul; and the
    # weights whose matmul alone produces an output of the function (an output layer: `heads`)
    flow: dict[int, tuple[Any, frozenset[str]]] = dataclasses.field(default_factory=dict)
    consumed: set[str] = dataclasses.field(default_factory=set)
    outputs: set[str] = dataclasses.field(default_factory=set)
    gathered: set[str] = dataclasses.field(default_factory=set)  # applying: weights looked up by a gather so far
    # applying: weights stored as a leaf named "kernel", never a lookup table, whose factors' roles may be
    # init's untraced (in, out) guess; contracted over their "output" axis they are refused, unless looked up
    kernels: frozenset[str] = frozenset()

    def record(self, t: Tagged, op: str, roles: dict[int, str]) -> None:
        self.ops.setdefault(t.view.path, set()).add(op)
        seen = self.usage.setdefault(t.view.path, {})
        for axis, role in roles.items():
            for k in t.view.weight_axes(t.view.origin[axis]):
                seen.setdefault(k, role)

    def next_key(self) -> jax.Array | None:
        self.sites += 1
        return None if self.dropout_key is None else jax.random.fold_in(self.dropout_key, self.sites)


def bind(eqn, invals: Sequence[Any], params: dict[str, Any] | None = None) -> list[Any]:
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
    puts the tagged input back in its place (`forward`). A call that hands its weights back
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
        if any(isinstance(v, (Tagged, Lazy)) for v in invals) or (
            ctx.stack is not None and eqn.primitive.name in PER_EXAMPLE_RULES
        ):
            outs = _rule(eqn, invals, ctx)
        else:
            outs = bind(eqn, invals)
        if ctx.probing:
            _flow(eqn, invals, outs, ctx)
        for var, val in zip(eqn.outvars, outs):
            env[var] = val
    outs = []
    for i, v in enumerate(jaxpr.outvars):
        val = read(v)
        lazy_or_tagged = isinstance(val, (Tagged, Lazy))
        j = next((j for j in forwardable if args[j] is val), None) if lazy_or_tagged else None
        if j is not None and forwards is not None:
            forwards[i] = j
            outs.append(_placeholder(val))
        else:
            outs.append(untag(val, "returned by the function", ctx))
    return outs


MATMULS = ("dot_general", "conv_general_dilated", "ragged_dot_general", "ragged_dot")
# calls whose body is the callee's own computation (the sets flow through them, as through an inlined call)
CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def _flow(eqn, invals: Sequence[Any], outs: Sequence[Any], ctx: Context) -> None:
    """Probing: carry the set of weights whose matmul output reaches each float value (`Context.flow`).

    A matmul with a targeted weight starts a new set (that weight); one between activations (attention
    scores) passes its inputs' sets on; both mark their inputs' sets as consumed by a matmul. Integer
    values (an ``argmax``) carry nothing. Values made inside ``scan``, ``cond``, ``while`` and ``remat``
    bodies are the bodies' own tracers, so their sets stop there, and what enters such a body counts as
    consumed (an output layer inside a loop is not found); calls (``jit``, ``jax.nn.softmax``,
    custom derivatives) pass them on.
    """
    came = frozenset().union(*(ctx.flow[id(v)][1] for v in invals if id(v) in ctx.flow))
    loop = eqn.primitive.name not in CALLS and _has_body(eqn)  # scan, while, cond, remat, shard_map
    if eqn.primitive.name in MATMULS or loop:  # what a loop body does with a value is unknown here: consumed
        ctx.consumed.update(came)
    if eqn.primitive.name in MATMULS:
        came = frozenset(v.view.path for v in invals if isinstance(v, Tagged)) or came
    if not came:
        return
    for o in outs:  # an inlined call's outputs come with their sets from its body: keep those
        floating = jnp.issubdtype(getattr(o, "dtype", jnp.int32), jnp.floating)
        if not isinstance(o, (Tagged, Lazy)) and floating and id(o) not in ctx.flow:
            ctx.flow[id(o)] = (o, came)


def _has_body(eqn) -> bool:
    """Whether the equation holds a jaxpr (a call, ``scan``, ``cond``, ``while``, ``remat``, ``shard_map``)."""
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, (Jaxpr, ClosedJaxpr)):
                return True
    return False


def output_layers(outs: Sequence[Any], ctx: Context) -> set[str]:
    """The weights whose matmul alone (no other weight's, through no later matmul) gives one of ``outs``."""
    found = set()
    for o in outs:
        only = ctx.flow.get(id(o), (None, frozenset()))[1]
        if len(only) == 1 and not only & ctx.consumed:
            found |= only
    return found


def forward(outs: Sequence[Any], forwards: dict[int, int], invals: Sequence[Any]) -> list[Any]:
    """``outs`` with each output that forwards a tagged input replaced by that input."""
    return [invals[forwards[i]] if i in forwards else o for i, o in enumerate(outs)]


def closed(j) -> tuple[Jaxpr, Sequence[Any]]:
    return (j.jaxpr, j.consts) if hasattr(j, "consts") else (j, ())


def untag(value: Any, where: str, ctx: Context) -> Any:
    """A plain array for ``value``: the merged weight under the "merge" fallback, else an error."""
    value = realize(value)
    if not isinstance(value, Tagged):
        return value
    if ctx.probing:
        ctx.ops.setdefault(value.view.path, set()).add(f"is {where}")
        return value.w
    if ctx.fallback == "merge" and ctx.stack is not None:
        raise UnsupportedError(
            f"LoRA weight {value.view.path!r} is {where}, which jaxlora cannot compute in factored form, and "
            'unsupported="merge" is not available with adapter_ids (it would form one W + ΔW per example). '
            "Fix: leave this module out of the adapters' targets."
        )
    if ctx.fallback == "merge":
        merged = value.w.astype(jnp.float32) + delta_view(value)
        if value.m is not None:  # DoRA: m / ‖W + ΔW‖ · (W + ΔW)
            norm = view_norm_op(value)(value.w, value.a, value.b, merged)
            merged = merged * to_view(value, value.m.astype(jnp.float32) / norm)
        return merged.astype(value.w.dtype)
    raise UnsupportedError(
        f"LoRA weight {value.view.path!r} is {where}, which jaxlora cannot compute in factored form "
        "(it only factors dot_general, ragged_dot, conv_general_dilated and gather). Fix: leave this module out of "
        'LoraConfig.targets, or pass unsupported="merge" to jaxlora.apply to use W + scale·B·A for this '
        "use (it materialises the merged weight)."
    )


def delta_view(t: Tagged, a=None, b=None, scale=None, accumulate=jnp.float32) -> jax.Array:
    """ΔW for the current view of ``t`` (its remaining axes, in view order), from ``t``'s factors or ``a, b``."""
    roles = "".join(t.factors.roles[k] for k in t.view.present)
    a, b = (t.a, t.b) if a is None else (a, b)
    scale = t.factors.scale if scale is None else scale
    d = delta(dataclasses.replace(t.factors, a=a, b=b, roles=roles, scale=scale), accumulate=accumulate)
    return jnp.transpose(d, [t.view.present.index(k) for k in t.view.origin])


def view_delta_op(t: Tagged):
    """lora_op's ``delta_op``: unscaled ΔW of the view from (first = a, second = b), in their dtype."""
    return lambda first, second: delta_view(t, first, second, 1.0, None)


def to_view(t: Tagged, g: jax.Array) -> jax.Array:
    """``g`` in ``m``'s layout (stacked, then output axes), shaped to broadcast against the view ``t.w``."""
    roles, present, m_axes = t.factors.roles, t.view.present, t.axes("m")
    kept = [k for k in present if roles[k] != "i"]
    g = jnp.transpose(g, [m_axes.index(k) for k in kept])
    sizes = dict(zip(kept, g.shape))
    g = jnp.reshape(g, [sizes.get(k, 1) for k in present])
    return jnp.transpose(g, [present.index(k) for k in t.view.origin])


def view_norm_op(t: Tagged):
    """lora_op's ``norm_op``: ``‖W + ΔW‖`` of the view over its input axes, in ``m``'s layout."""
    to_present = [t.view.origin.index(k) for k in t.view.present]
    roles = "".join(t.factors.roles[k] for k in t.view.present)

    def norm(w, a, b, merged):
        merged = None if merged is None else jnp.transpose(merged, to_present)
        return weight_norm(jnp.transpose(w, to_present), a, b, t.factors.scale, roles, merged=merged)

    return norm


def mismatch(t: Tagged, op: str, what: str) -> UnsupportedError:
    return UnsupportedError(
        f"LoRA weight {t.view.path!r} (roles {t.factors.roles!r}: i=input, o=output, s=stacked) is used by "
        f"`{op}` {what}. Its factors were made for another use: build them with "
        "jaxlora.init(key, params, config, fn=<this function>, args=<its inputs>) so init traces this use."
    )


Rule = Callable[[Any, list[Any], Context], list[Any]]
RULES: dict[str, Rule] = {}


def register(*names: str) -> Callable[[Rule], Rule]:
    """Make the decorated function the rule for equations of these primitives that take a `Tagged` value."""

    def add(rule: Rule) -> Rule:
        for name in names:
            RULES[name] = rule
        return rule

    return add


# primitives whose rule runs on every equation of a mixed-adapter batch (under vmap), tagged or not
PER_EXAMPLE_RULES: set[str] = set()


def untag_all(eqn, invals: list[Any], ctx: Context) -> list[Any]:
    """The equation on plain values: each tagged input untagged (an error, or ``W + ΔW``)."""
    return bind(eqn, [untag(v, f"used by `{eqn.primitive.name}`", ctx) for v in invals])


def _rule(eqn, invals: list[Any], ctx: Context) -> list[Any]:
    if eqn.primitive.name not in KEEPS_LAZY and any(is_lazy(v) for v in invals):
        rule = LAZY_RULES.get(eqn.primitive.name)
        outs = None if rule is None else rule(eqn, invals, ctx)
        # outside a remat a matmul's backward keeps the stored weight, not W (`_frozen`, `Tagged.stored`);
        # inside one the backward recomputes W from the codes anyway, and keeping it saves a dequantization
        keep_codes = not ctx.probing and not ctx.in_remat
        if outs is None and keep_codes:
            outs = _frozen(eqn, invals)
        if outs is None and keep_codes:
            outs = _view(eqn, invals, ctx)
        if outs is not None:
            return outs
        # a quantized weight's first real use: dequantize here
        invals = [realize(v, eqn, keep=keep_codes) for v in invals]
        if not any(isinstance(v, Tagged) for v in invals):
            return bind(eqn, invals)
    return RULES.get(eqn.primitive.name, untag_all)(eqn, invals, ctx)


def run(
    fn: Callable[..., Any],
    params: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    tagged: dict[int, tuple[str, LoraFactors | None]],
    ctx: Context,
) -> Any:
    """Call ``fn(params, *args, **kwargs)`` with the params leaves in ``tagged`` (by leaf index) tagged.

    Array leaves of ``params``, ``args`` and ``kwargs`` are traced; every other leaf is static. A
    `jaxlora.Quantized` weight is traced as its float shape and evaluated as a `Lazy` value.
    """
    _refuse_abstract(params, args, kwargs, tagged)
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs), is_leaf=is_quantized)
    dynamic = [i for i, leaf in enumerate(leaves) if is_array(leaf) or is_quantized(leaf)]

    def flat_fn(*values):
        full = list(leaves)
        for i, v in zip(dynamic, values):
            full[i] = v
        p, a, k = jax.tree_util.tree_unflatten(treedef, full)
        return fn(p, *a, **k)

    as_float = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype) if is_quantized(v) else v  # noqa: E731
    traced, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*(as_float(leaves[i]) for i in dynamic))
    values = []
    for i in dynamic:
        v = Packed(leaves[i]) if is_quantized(leaves[i]) else leaves[i]
        if i in tagged:
            path, factors = tagged[i]
            view = View(path, tuple(range(v.ndim)), tuple(range(v.ndim)))
            f = factors
            v = Tagged(v, None if f is None else f.a, None if f is None else f.b, view, f, None if f is None else f.m)
        values.append(v)
    outs = evaluate(traced.jaxpr, traced.consts, values, ctx)
    if ctx.probing:
        ctx.outputs = output_layers(outs, ctx)
        ctx.flow.clear()
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def _refuse_abstract(params: Any, args: tuple, kwargs: dict, tagged: dict) -> None:
    """Raise naming every ``jax.ShapeDtypeStruct`` among the inputs (inside ``jax.eval_shape`` they are tracers)."""
    factors = {path: f for path, f in tagged.values() if f is not None}
    named = {"params": params, "args": args, "kwargs": kwargs, "lora": factors}
    flat = jax.tree_util.tree_flatten_with_path(named)[0]
    found = [jax.tree_util.keystr(k) for k, v in flat if isinstance(v, jax.ShapeDtypeStruct)]
    if found:
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise TypeError(
            f"jaxlora.apply got abstract values (jax.ShapeDtypeStruct) at {', '.join(found[:5])}{more}: they hold "
            "no numbers to compute with. For output shapes, call it inside jax.eval_shape: "
            "jax.eval_shape(lambda p, x: jaxlora.apply(fn, p, lora, x), params, x); else pass arrays "
            "(restore or initialise the params first)."
        )


def path_seed(path: str) -> int:
    """A stable 31-bit seed for a module path (independent of which other modules are targeted)."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF
