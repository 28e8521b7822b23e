"""The LoRA math, in one place: the factors, their product ``ΔW``, and the factored layer op.

A targeted weight ``W`` keeps its own layout. Each of its axes has a *role*:

* ``"i"``, an input axis: contracted with the activations (Dense ``in``; Conv ``kh, kw, in``;
  the vocabulary axis of an embedding, which the lookup indexes);
* ``"o"``, an output axis: produced by the layer (Dense ``out``; DenseGeneral ``heads, head_dim``);
* ``"s"``, a stacked-layer axis: one slice per layer (``nn.scan``/``lax.scan``, ``vmap``).

With ``S``, ``I`` and ``O`` the axes of each role, in ``W``'s order, the factors are::

    a: (*S, *I, r)      # PEFT's lora_A, transposed: projects the input down to rank r
    b: (*S, r, *O)      # PEFT's lora_B, transposed: zero at init
    ΔW[s, i, o] = scale * Σ_r a[s, i, r] · b[s, r, o]

so a Flax Dense kernel ``(in, out)`` gets ``a: (in, r)`` and ``b: (r, out)``, and the layer computes
``x·W + scale · (x·a)·b``, or ``x·(W + ΔW)`` on a transient sum where that moves fewer bytes
(`merge_is_cheaper`); ``W`` itself is never changed.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec

from . import _fused, _remat

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """The trainable factors of one adapted weight: a pytree node with leaves ``a``, ``b`` (and ``m``).

    Attributes:
      a: ``(*S, *I, r)``: the down-projection (see the module docstring for the roles).
      b: ``(*S, r, *O)``: the up-projection, zero at init.
      scale: ``alpha / r`` (or ``alpha / sqrt(r)``); static, so it is no trainable leaf.
      roles: one of ``"s"``, ``"i"``, ``"o"`` per axis of ``W``, in ``W``'s order; static.
      dropout: dropout rate on the LoRA branch's input; static.
      m: DoRA's magnitude ``(*S, *O)``, one per output feature (per layer of a stack); ``None``
        for plain LoRA. The layer then computes ``m / ‖W + ΔW‖ · (W + ΔW)``, the norm taken over
        the input axes and treated as a constant in the backward pass (`weight_norm`).

    Example:
      >>> import jax.numpy as jnp
      >>> f = LoraFactors(a=jnp.ones((3, 2)), b=jnp.zeros((2, 4)), scale=0.5, roles="io")
      >>> f.rank, delta(f).shape
      (2, (3, 4))
    """

    a: Array
    b: Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    roles: str = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    m: Array | None = None

    @property
    def rank(self) -> int:
        """The rank ``r``."""
        return self.a.shape[-1]


def factor_shapes(weight_shape: tuple[int, ...], roles: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``a`` and ``b`` for a weight of ``weight_shape`` with ``roles``."""
    pick = lambda role: tuple(d for d, c in zip(weight_shape, roles) if c == role)  # noqa: E731
    return pick("s") + pick("i") + (rank,), pick("s") + (rank,) + pick("o")


def magnitude_shape(weight_shape: tuple[int, ...], roles: str) -> tuple[int, ...]:
    """The shape of DoRA's ``m``: ``W``'s stacked axes, then its output axes."""
    pick = lambda role: tuple(d for d, c in zip(weight_shape, roles) if c == role)  # noqa: E731
    return pick("s") + pick("o")


def expand_magnitude(g: Array, roles: str) -> Array:
    """``g`` in ``m``'s layout ``(*S, *O)``, shaped to broadcast against ``W`` (size 1 on its input axes)."""
    kept = [k for k, c in enumerate(roles) if c == "s"] + [k for k, c in enumerate(roles) if c == "o"]
    g = jnp.transpose(g, [kept.index(k) for k in sorted(kept)])
    sizes = dict(zip(sorted(kept), g.shape))
    return jnp.reshape(g, [sizes.get(k, 1) for k in range(len(roles))])


def weight_norm(w: Array, a: Array, b: Array, scale: float, roles: str, *, merged: Array | None = None) -> Array:
    """``‖W + ΔW‖`` over ``W``'s input axes, in float32: shape ``(*S, *O)``, like DoRA's ``m``.

    ``w`` is ``W`` in its own layout (``roles``), ``a`` and ``b`` the factors, and ``merged``, when
    given, the sum ``W + ΔW`` already formed (then the norm is read off it: one pass). Otherwise
    ``W + ΔW`` is never formed: with ``P = aᵀW`` (``r·|W|`` multiply-adds, one read of ``W``),
    ``‖w_o + s·Δw_o‖² = ‖w_o‖² + 2s·Σ_r P[r, o]·b[r, o] + s²·b_oᵀ(aᵀa)b_o``, the rest rank-sized.

    Example:
      >>> import jax.numpy as jnp
      >>> w, a, b = jnp.eye(3)[:, :2], jnp.ones((3, 1)), jnp.ones((1, 2))
      >>> weight_norm(w, a, b, 1.0, "io")  # columns (2, 1, 1) and (1, 2, 1)
      Array([2.4494898, 2.4494898], dtype=float32)
    """
    f32 = jnp.float32
    inputs = tuple(k for k, c in enumerate(roles) if c == "i")
    kept = [k for k, c in enumerate(roles) if c == "s"] + [k for k, c in enumerate(roles) if c == "o"]
    to_m = [sorted(kept).index(k) for k in kept]  # the reduced axes in m's order (stacked, then output)
    if merged is not None:
        return jnp.sqrt(jnp.transpose(jnp.sum(jnp.square(merged.astype(f32)), axis=inputs), to_m))
    letters = iter(string.ascii_letters)
    names = [next(letters) for _ in roles]
    pick = lambda role: "".join(n for n, c in zip(names, roles) if c == role)  # noqa: E731
    s_, i_, o_, r_, q_ = pick("s"), pick("i"), pick("o"), next(letters), next(letters)
    dot = partial(jnp.einsum, preferred_element_type=f32)
    sq = jnp.transpose(jnp.sum(jnp.square(w.astype(f32)), axis=inputs), to_m)
    p = dot(f"{s_}{i_}{r_},{''.join(names)}->{s_}{r_}{o_}", a.astype(w.dtype), w)
    b32 = b.astype(f32)
    cross = jnp.sum(p * b32, axis=len(s_))
    gram = dot(f"{s_}{i_}{r_},{s_}{i_}{q_}->{s_}{r_}{q_}", a, a)
    quad = dot(f"{s_}{r_}{o_},{s_}{r_}{q_},{s_}{q_}{o_}->{s_}{o_}", b32, gram, b32)
    return jnp.sqrt(jnp.maximum(sq + 2 * scale * cross + scale**2 * quad, 0.0))


def delta(factors: LoraFactors, dtype: jnp.dtype | None = None, *, accumulate: jnp.dtype | None = jnp.float32) -> Array:
    """``ΔW = scale · a·b`` in ``W``'s own layout, accumulated in ``accumulate`` and cast to ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> f = LoraFactors(a=jnp.ones((1, 3, 2)), b=jnp.ones((1, 2, 4)), scale=0.5, roles="sio")
      >>> delta(f)[0, 0, 0]
      Array(1., dtype=float32)
    """
    letters = iter(string.ascii_letters)
    names = [next(letters) for _ in factors.roles]
    pick = lambda role: "".join(n for n, c in zip(names, factors.roles) if c == role)  # noqa: E731
    r = next(letters)
    spec = f"{pick('s')}{pick('i')}{r},{pick('s')}{r}{pick('o')}->{''.join(names)}"
    out = jnp.einsum(spec, factors.a, factors.b, preferred_element_type=accumulate)
    if factors.scale != 1:
        out = out * jnp.asarray(factors.scale, out.dtype)
    return out.astype(dtype or factors.a.dtype)


def lora_op(
    x: Array,
    w: Array,
    first: Array,
    second: Array,
    scale: float,
    *,
    base: Callable[[Array, Array], Array],
    first_op: Callable[[Array, Array], Array],
    second_op: Callable[[Array, Array], Array],
    delta_op: Callable[[Array, Array], Array] | None = None,
    side_by_side: bool = False,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
    magnitude: Array | None = None,
    norm_op: Callable[[Array, Array, Array, Array | None], Array] | None = None,
    to_out: Callable[[Array, int], Array] | None = None,
    path: str | None = None,
    stored: Any = None,
) -> Array:
    """``base(x, W) + scale · second_op(first_op(x, first), second)``: a layer op with LoRA.

    ``base`` is the model's own op (a ``dot_general``, convolution or lookup); ``first_op`` applies
    the same op to the factor that shares ``W``'s input axes, which brings ``x`` down to rank ``r``,
    and ``second_op`` lifts the result back to the op's output. The factors are cast to the
    activations' dtype, so a bfloat16 model stays in bfloat16 while ``a`` and ``b`` stay float32.
    No gradient for ``W`` is computed unless ``W`` itself is differentiated.

    For floating ``x`` the derivative is a custom VJP (`factored`): it saves only the LoRA input
    and the rank-``r`` product ``x·a`` (in the activations' dtype), and its backward pass computes
    the activation gradient and the two small factor gradients, never a ``W``-shaped gradient.
    ``x·a`` and the op's value (before DoRA's scaling) are named ``"lora_xa"`` and ``"lora_out/<path>"``
    (``"lora_out"`` without a ``path``, the module path) for `jax.checkpoint` policies (`jaxlora.remat_policy`).

    ``delta_op(first, second)``, when given, is ``ΔW`` (unscaled) in the layout ``base`` reads ``W``
    in. Where one pass over ``W`` costs less than the LoRA term's passes over the activations (many
    tokens: prefill and training batches, see `merge_is_cheaper`) and there is no LoRA dropout,
    ``base`` then runs once on a transient ``W + ΔW`` (forward, and the input gradient), the
    cheapest form; ``W`` itself is never changed, and no ``ΔW`` is kept between steps.

    ``side_by_side`` says that ``W`` is 2-D ``(in, out)``, contracted with the last axis of ``x``
    (a Dense layer). With the transient ``W + ΔW`` and under differentiation, ``x`` is then read once
    for ``x·W`` and ``x·a`` (one op on ``[W | a]``), and the output gradient once for ``g·Wᵀ`` and
    ``g·bᵀ`` (one op on ``[W ; b]``). Where `jaxlora._fused.chosen` picks it (a GPU, covered shapes,
    no dropout), a Dense layer's ``x·W + t·b`` and ``g·Wᵀ + dt·aᵀ`` are instead one fused Pallas GEMM each.

    DoRA (``magnitude`` given): the value is ``g ⊙ (base(x, W) + scale·second_op(first_op(x, a), b))``
    with ``g = m / ‖W + ΔW‖`` per output feature, the norm under ``stop_gradient`` (PEFT and the
    DoRA paper detach it). ``norm_op(w, a, b, merged)`` gives the norm in ``m``'s layout (read off
    the transient ``W + ΔW`` when that form is chosen, else from the factors, `weight_norm`), and
    ``to_out(g, ndim)`` lays ``g`` out to broadcast against the op's ``ndim``-D output. The backward pass is the
    LoRA one on ``g ⊙ dy``, plus ``dm`` from the saved pre-scale output: still no ``W``-shaped gradient.

    ``stored``, when given, is ``W`` as it is stored (a quantized weight's codes and scales): a pytree
    whose ``realize()`` is ``w``. The backward pass then keeps it rather than ``w`` and forms ``W``
    again where ``dx`` needs it (`factored`), so no float copy of a frozen quantized weight outlives
    the forward pass.
    """
    z, delta_op = _lora_op(
        x, w, first, second, scale, base, first_op, second_op, delta_op, side_by_side, dropout_rate, dropout_key,
        stored,
    )  # fmt: skip
    z = checkpoint_name(z, _remat.OUT if path is None else f"{_remat.OUT}/{path}")
    if magnitude is None:
        return z
    merged = None
    if delta_op is not None:  # the same W + ΔW the op sums (XLA forms it once)
        merged = _merged(w, *_cast(first, second, scale, x.dtype), delta_op)
    n = lax.stop_gradient(norm_op(w, first, second, merged))
    g = to_out(magnitude.astype(jnp.float32) / n, z.ndim)
    return (z * g).astype(z.dtype)


def _lora_op(
    x, w, first, second, scale, base, first_op, second_op, delta_op, side_by_side, dropout_rate, dropout_key, stored
):
    """`lora_op` without DoRA: the op's value and the ``delta_op`` its form used (None: factored)."""
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    xl = x
    if dropout_key is not None and dropout_rate > 0.0 and floating:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, x.shape)
        xl = jnp.where(keep, x / (1.0 - dropout_rate), 0).astype(x.dtype)
    if floating:
        if side_by_side and xl is x and not _on_mesh() and _fused.chosen(x, w, first.shape[-1]):
            return factored(x, xl, w, first, second, scale, base, first_op, second_op, None, False, True, stored), None
        if delta_op is not None and (xl is not x or not merge_is_cheaper(x, w, base)):
            delta_op = None
        # the one-read ops pay off with the transient W + ΔW (measured slower and larger without it)
        side_by_side = side_by_side and _SIDE_BY_SIDE and delta_op is not None and w.dtype == x.dtype
        out = factored(x, xl, w, first, second, scale, base, first_op, second_op, delta_op, side_by_side, False, stored)
        return out, delta_op
    y = base(x, w)  # a lookup: integer indices have no gradient, plain autodiff is already minimal
    t = first_op(x, first.astype(y.dtype))
    t = (t * jnp.asarray(scale, t.dtype)).astype(y.dtype)
    return y + second_op(t, second.astype(y.dtype)).astype(y.dtype), None


# The switches the benchmarks flip to measure each form: _MERGED None chooses by cost, True/False
# forces one; _SIDE_BY_SIDE False turns the one-read ops on [W | a] and [W ; b] off.
_MERGED: bool | None = None
_SIDE_BY_SIDE = True


def merge_is_cheaper(x: Array, w: Array, base: Callable[[Array, Array], Array]) -> bool:
    """Whether ``base(x, W + ΔW)`` costs less than ``base(x, W) + (x·a)·b``.

    On a GPU or TPU the rank-``r`` products are bound by memory: forming ``W + ΔW`` reads and writes
    ``W`` about twice (the product, then the sum), while the factored term reads ``x`` once more and
    reads and writes the output once more (forward), and ``dx`` once more (backward); so the merged
    form wins when ``4·|W| < |x| + |y|``. On a CPU they are bound by arithmetic: ``ΔW`` costs
    ``r·|W|`` multiply-adds (twice in training) against ``r·(|x| + |y|)`` for the factored term, so
    ``2·|W| < |x| + |y|``. Either way: a training or prefill batch of many tokens, not a decode step;
    and not on a mesh of several devices (see `_on_mesh`).

    Example:
      >>> import jax.numpy as jnp
      >>> merge_is_cheaper(jnp.zeros((4096, 64)), jnp.zeros((64, 64)), jnp.dot)  # many tokens
      True
      >>> merge_is_cheaper(jnp.zeros((8, 64)), jnp.zeros((64, 64)), jnp.dot)  # a decode step
      False
    """
    if _MERGED is not None:
        return _MERGED
    y = jax.eval_shape(base, x, w)
    weight_cost = 2 if jax.default_backend() == "cpu" else 4
    return weight_cost * w.size < x.size + y.size and not _on_mesh()


def _on_mesh() -> bool:
    """Whether the program runs on a mesh of several devices (``jax.set_mesh``).

    There the factored form is kept: its extra collectives are factor-sized, while the partitioner
    may gather ``W + ΔW`` (or ``[W | a]``, whose concatenation crosses a sharded axis) on its own.
    """
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


def _merged(w: Array, f: Array, s: Array, delta_op: Callable) -> Array:
    """The transient ``W + ΔW`` (``f`` already holds the scale), in ``W``'s dtype."""
    return w + delta_op(f, s).astype(w.dtype)


def _forward(x, xl, w, f, s, base, first_op, second_op, delta_op, side_by_side, fused=False, need_t=True):
    """The op's value and (if needed or used) the rank product ``t = first_op(xl, f)``."""
    # t is named for jax.checkpoint policies (`_remat`) where it is made, so that a recomputed
    # output reuses a saved t rather than making it again
    if fused:  # x·W + t·s in one kernel (xl is x)
        t = checkpoint_name(first_op(x, f), _remat.XA)
        y = _fused.matmul(x.reshape(-1, w.shape[0]), w, t.reshape(-1, t.shape[-1]), s)
        return y.reshape(*x.shape[:-1], w.shape[1]), t
    wm = w if delta_op is None else _merged(w, f, s, delta_op)
    t = None
    if side_by_side and need_t:  # one read of x for both products
        out = w.shape[1]
        yt = base(x, jnp.concatenate([wm, f.astype(wm.dtype)], axis=1))
        # t is kept for the backward pass: the barrier makes it its own small array, so the residual
        # does not hold the whole [y | t] output alive until then.
        y, t = yt[..., :out], checkpoint_name(lax.optimization_barrier(yt[..., out:]), _remat.XA)
    else:
        y = base(x, wm)
        if need_t or delta_op is None:
            t = checkpoint_name(first_op(xl, f), _remat.XA)
    if delta_op is None:
        y = y + second_op(t, s).astype(y.dtype)
    return y, t


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def factored(
    x, xl, w, first, second, scale, base, first_op, second_op, delta_op=None, side_by_side=False, fused=False,
    stored=None,
):  # fmt: skip
    """``base(x, W) + second_op(first_op(xl, scale·first), second)`` with a VJP that has no ``dW``.

    ``xl`` is ``x`` after LoRA dropout (``x`` itself without it). With ``delta_op`` (then ``xl`` is
    ``x``) the value is ``base(x, W + ΔW)``; with ``fused`` (a Dense layer, ``xl`` is ``x``) the forward
    and the input gradient are `jaxlora._fused.matmul`. Residuals, each only where a requested
    cotangent needs it (`_factored_fwd`): ``xl`` for ``dA``, the rank-``r`` product ``t = xl·a``
    (named ``"lora_xa"``) for ``dB``, ``W`` (a buffer the caller holds anyway) for ``dx``, the two
    factors cast to ``x``'s dtype (factor-sized), and ``x`` only for ``dW``. Given ``stored`` (``W``
    as stored, whose ``realize()`` is ``w``: `lora_op`), ``dx`` keeps that instead and forms ``W`` again
    (where ``W`` is a dequantized weight, the caller holds its codes, not ``W``); it gets no cotangent
    (a gradient of the stored leaves, if asked for, flows through ``w``).
    """
    f, s = _cast(first, second, scale, xl.dtype)  # no side_by_side: at B = 0 this is base(x, W) + an exact zero
    return _forward(x, xl, w, f, s, base, first_op, second_op, delta_op, False, fused, need_t=False)[0]


def _cast(first: Array, second: Array, scale: float, dtype) -> tuple[Array, Array]:
    """The factors in the activations' dtype, the scale folded into the first."""
    return (first * jnp.asarray(scale, first.dtype)).astype(dtype), second.astype(dtype)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Like:
    """A residual the backward pass needs only the type of: static, so no bytes are kept.

    ``spec`` is the sharding its type carries on a mesh of explicit axes (else None), so that a
    cotangent computed from its stand-in has the primal's type, as a custom VJP must return.
    """

    shape: tuple[int, ...]
    dtype: jnp.dtype
    spec: PartitionSpec | None = None


def _keep(v: Array, needed: bool) -> Array | _Like:
    if needed:
        return v
    spec = getattr(getattr(jax.typeof(v), "sharding", None), "spec", None)
    spec = spec if spec is not None and any(p is not None for p in spec) else None
    return _Like(tuple(v.shape), jnp.dtype(v.dtype), spec)


def _array(v: Array | _Like) -> Array:
    """``v``, or zeros in its place (for ``jax.vjp`` of an op linear in ``v``, whose value is then unused)."""
    return jnp.zeros(v.shape, v.dtype, out_sharding=v.spec) if isinstance(v, _Like) else v


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Need:
    """Which cotangents were asked for (the primals' ``perturbed`` flags), and the backward's paths."""

    x: bool
    xl: bool
    w: bool
    first: bool
    second: bool
    fused: bool  # dx (with the LoRA term) by the fused kernel
    merged: bool  # dx on W + ΔW or [W ; b] (with the LoRA term when delta_op is given)
    dt: bool  # the rank product's cotangent


def _factored_fwd(x, xl, w, first, second, scale, base, first_op, second_op, delta_op, side_by_side, fused, stored):
    # symbolic_zeros=True: each primal comes with `.perturbed`, so the backward pass computes only
    # the cotangents that someone asked for (no dW unless W is differentiated, no dx for a constant x),
    # and the residuals hold only what those need: the rest is a `_Like` (shape and dtype, no bytes).
    nx, nxl, nw, nfirst, nsecond = (p.perturbed for p in (x, xl, w, first, second))
    x, xl, w, first, second = (p.value for p in (x, xl, w, first, second))
    stored = _values(stored)
    f, s = _cast(first, second, scale, xl.dtype)
    out, t = _forward(x, xl, w, f, s, base, first_op, second_op, delta_op, side_by_side, fused, need_t=nsecond)
    by_fused = fused and (nx or nxl)
    by_merged = not by_fused and (nx or (nxl and delta_op is not None))
    dxl = nxl and not by_fused and delta_op is None  # dt·fᵀ
    need = _Need(nx, nxl, nw, nfirst, nsecond, by_fused, by_merged, nfirst or dxl or by_fused)
    if t is None:  # not needed: only its shape
        t = jax.eval_shape(first_op, xl, f)
    res = (
        _keep(x, nw),
        _keep(xl, nfirst),
        _keep(w, (by_fused or by_merged) and stored is None),
        stored if by_fused or by_merged else None,
        _keep(f, by_fused or dxl or (by_merged and delta_op is not None)),
        _keep(s, need.dt or (by_merged and (delta_op is not None or side_by_side))),
        _keep(t, nsecond),
        _Like(first.shape, first.dtype),
        _Like(second.shape, second.dtype),
        need,
    )
    return out, res


def _factored_bwd(scale, base, first_op, second_op, delta_op, side_by_side, fused, res, g):
    x, xl, w, stored, f, s, t, first, second, need = res
    if isinstance(g, SymbolicZero):
        return None, None, None, None, None, None
    # Each op is linear in the argument transposed, so the forward that jax.vjp traces is dead code.
    dx = dxl = dt = ds = dw = df = None
    g = g.astype(t.dtype)
    if need.fused:  # g·Wᵀ + dt·fᵀ in one kernel: dx holds the LoRA term (xl is x)
        dt = jax.vjp(lambda t: second_op(t, s), _array(t))[1](g)[0]
        k, n = w.shape
        w = _again(w, stored)
        dx = _fused.matmul(g.reshape(-1, n), w, dt.reshape(-1, dt.shape[-1]), f.T, transpose_w=True)
        dx = dx.reshape(*x.shape[:-1], k).astype(x.dtype)
    elif need.merged:
        # W + ΔW is made again only once g exists: the barrier stops XLA from keeping the forward's
        # copy alive, or preparing every layer's up front.
        wm = w = _again(w, stored)
        if delta_op is not None:
            wm, f, s, g = lax.optimization_barrier((w, f, s, g))
            wm = _merged(wm, f, s, delta_op)
        if side_by_side:  # one read of g for g·Wᵀ and g·bᵀ
            k = w.shape[0]
            z = jnp.zeros((*x.shape[:-1], k + s.shape[0]), x.dtype)
            dz = jax.vjp(lambda z: base(z, jnp.concatenate([wm, s.astype(wm.dtype)], axis=0)), z)[1](g)[0]
            dx, dt = dz[..., :k], dz[..., k:]
        else:
            dx = jax.vjp(lambda x: base(x, wm), _array(x))[1](g)[0]
        dx = dx.astype(x.dtype)
    if dt is None and need.dt:
        dt = jax.vjp(lambda t: second_op(t, s), _array(t))[1](g)[0]
    if need.second:
        ds = jax.vjp(lambda s: second_op(t, s), _array(s))[1](g)[0].astype(second.dtype)
    if need.w:
        dw = jax.vjp(lambda w: base(x, w), _array(w))[1](g)[0].astype(w.dtype)
    if need.xl and not need.fused and delta_op is None:  # (else xl is x and dx has the LoRA term already)
        dxl = jax.vjp(lambda xl: first_op(xl, f), _array(xl))[1](dt)[0].astype(xl.dtype)
    if need.first:
        df = jax.vjp(lambda f: first_op(xl, f), _array(f))[1](dt)[0]
        df = df.astype(first.dtype) * jnp.asarray(scale, first.dtype)
    return dx, dxl, dw, df, ds, None


factored.defvjp(_factored_fwd, _factored_bwd, symbolic_zeros=True)


def _values(stored: Any) -> Any:
    """``stored`` with its leaves' values (a custom VJP's ``fwd`` gets each leaf with ``.perturbed``)."""
    return jax.tree_util.tree_map(lambda p: p.value, stored)


def _again(w: Array | _Like, stored: Any) -> Array:
    """``W`` in the backward pass: the saved ``w``, or ``W`` formed again from its ``stored`` form."""
    return w if stored is None else stored.realize()


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def frozen(x: Array, w: Array, stored: Any, base: Callable[[Array, Array], Array]) -> Array:
    """``base(x, W)`` for an op linear in ``x`` (a matmul) whose backward pass keeps ``stored``, not ``W``.

    ``stored`` is ``W`` as it is stored (a quantized weight's codes and scales: a pytree whose
    ``realize()`` is ``w``); ``dx`` forms ``W`` again from it, as `factored` does for an adapted
    weight. ``dW`` (only if ``w`` is differentiated) keeps ``x``; ``stored`` gets no cotangent.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> @jax.tree_util.register_static
      ... class Ones:  # a weight stored as nothing at all (a quantized one: its codes and scales)
      ...     def realize(self):
      ...         return jnp.ones((3, 2))
      >>> jax.grad(lambda x: frozen(x, Ones().realize(), Ones(), jnp.dot).sum())(jnp.zeros((1, 3)))
      Array([[2., 2., 2.]], dtype=float32)
    """
    return base(x, w)


def _frozen_fwd(x, w, stored, base):
    nx, nw = x.perturbed, w.perturbed
    x, w = x.value, w.value
    return base(x, w), (_keep(x, nw), _keep(w, False), _values(stored) if nx else None)


def _frozen_bwd(base, res, g):
    x, w, stored = res
    if isinstance(g, SymbolicZero):
        return None, None, None
    dx = dw = None
    if stored is not None:  # linear in x: the forward that jax.vjp traces is dead code
        w_again = _again(w, stored)
        dx = jax.vjp(lambda x: base(x, w_again), _array(x))[1](g)[0]
    if not isinstance(x, _Like):
        dw = jax.vjp(lambda w: base(x, w), _array(w))[1](g)[0]
    return dx, dw, None


frozen.defvjp(_frozen_fwd, _frozen_bwd, symbolic_zeros=True)


# The stack form the benchmarks and tests may force: None chooses by cost; "gather", "onehot" or
# "sgmv" forces one wherever the op has it (elsewhere the gather form runs).
_STACK_FORM: str | None = None
STACK_FORMS = ("gather", "onehot", "sgmv")


def stack_form(
    examples: int, tokens: int, factors: int, itemsize: int, slots: int, *, onehot: bool = True, sgmv: bool = True
) -> str:
    """The form of `stacked_op` that moves the fewest bytes: ``"gather"``, ``"onehot"`` or ``"sgmv"``.

    ``factors`` is the element count of both factors of all ``slots`` adapters, ``tokens`` the rows
    of the rank product per example; ``onehot`` and ``sgmv`` say whether the op has those forms.
    Per example, the gather form copies its adapter's factors (read, write, read again:
    ``3·factors/slots`` elements) and does ``tokens·factors/slots`` multiply-adds; the one-hot form
    reads every slot's factors once for the whole batch and does ``tokens·factors`` multiply-adds per
    example; the SGMV form reads each adapter in use once (at most ``min(slots, examples)``) and does
    the gather's multiply-adds, plus a sort of the rows. Multiply-adds are weighed against bytes by the
    accelerator's arithmetic intensity (about 200 flops a byte on a GPU or TPU). On a CPU, bound by
    arithmetic, the gather measured fastest at every shape tried (``ragged_dot`` there multiplies every
    row by every group's factors), so it is always chosen there. SGMV lost to both on the H200 too
    (8B decode), so the rule weighs it only where `_SGMV_BY_COST` is set (off; docs/design.md).

    Example:
      >>> stack_form(8, 1024, 8 * 16 * 8192, 2, 8)  # prefill
      'gather'
    """
    if _STACK_FORM is not None:
        if _STACK_FORM not in STACK_FORMS:
            raise ValueError(f"_STACK_FORM must be None or one of {STACK_FORMS}, got {_STACK_FORM!r}.")
        return _STACK_FORM if {"onehot": onehot, "sgmv": sgmv}.get(_STACK_FORM, True) else "gather"
    if jax.default_backend() == "cpu":  # measured: the gather wins at every shape tried (docs/design.md)
        return "gather"
    flops_per_byte = 200.0
    macs = examples * tokens * factors
    costs = {"gather": 3 * examples * factors * itemsize / slots + 2 * macs / slots / flops_per_byte}
    if onehot:
        costs["onehot"] = factors * itemsize + 2 * macs / flops_per_byte
    if sgmv and _SGMV_BY_COST:
        costs["sgmv"] = min(slots, examples) * factors * itemsize / slots + 2 * macs / slots / flops_per_byte
    return min(costs, key=costs.__getitem__)


# Whether the cost rule may choose SGMV off the CPU (off: it lost on the H200; docs/design.md), and the
# grouped product SGMV uses (None: lax.ragged_dot; benchmarks/sgmv_probe.py swaps in others).
_SGMV_BY_COST = False
_RAGGED_DOT: Callable[..., Array] | None = None


@dataclasses.dataclass(frozen=True)
class Rows:
    """A ``dot_general`` without batch axes read as rows, for the row-wise forms of `stacked_op`.

    ``to_rows(x)`` is ``(*F, K)``: ``x``'s free axes ``F`` then its contracted ones flattened;
    ``groups(first, second, slots)`` the factors as ``(slots, K, R)`` and ``(slots, R, N)``;
    ``from_rows(y)`` lays ``(*F, N)`` out as the op's output; ``precision`` is the op's.
    """

    to_rows: Callable[[Array], Array]
    groups: Callable[[Array, Array, int], tuple[Array, Array]]
    from_rows: Callable[[Array], Array]
    precision: Any = None


def stacked_op(
    x: Array,
    w: Array,
    first: Array,
    second: Array,
    index: Array,
    scale: Array,
    slots: int,
    examples: int,
    *,
    base: Callable[[Array, Array], Array],
    first_op: Callable[[Array, Array], Array],
    second_op: Callable[[Array, Array], Array],
    first_axis: int,
    second_axis: int,
    t_axis: int | None,
    rows: Rows | None = None,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
    stored: Any = None,
) -> Array:
    """One example's op with its own adapter out of a stack (`jaxlora.stack`), called under ``vmap``.

    ``first`` and ``second`` hold ``slots`` adapters side by side on their rank axes (``first_axis``,
    ``second_axis``), each ``R`` columns; ``index`` (traced, per example) picks one and ``scale`` is
    its scale. With ids per token, ``index`` and ``scale`` have one entry per row of the op (shaped
    to broadcast against ``rows.to_rows(x)``'s leading axes; ``rows`` is then given). Three forms,
    chosen from static shapes (`stack_form`):

    * **gather** (BGMV): this example's ``R`` columns are sliced out (under ``vmap``: a gather of
      per-example factors, whose transpose sends each example's gradient to its own adapter) and the
      op is `lora_op`'s factored form, never the transient ``W + ΔW`` (per token: each row's factors);
    * **one-hot** (``t_axis``, the rank axis of ``first_op``'s output, given): ``first_op`` runs on every
      slot at once (factors shared by the whole batch, read once), the product is masked to this
      example's slot and scaled, and ``second_op`` lifts it back;
    * **sgmv** (``rows`` given): the rows of the whole batch (`jax.custom_batching.custom_vmap` sees
      the batch under the ``vmap``) sorted by adapter, the shrink and the expand each one
      ``lax.ragged_dot`` over the groups, the rows put back in order (`sgmv`).

    ``index`` must be in range: ``jaxlora.apply`` clips each id into ``[0, slots)`` and gives id -1
    scale 0 and an id outside ``[-1, slots)`` scale NaN (every form then returns NaN). ``stored`` is
    `lora_op`'s (``W`` as stored, for the backward pass).
    """
    rank = first.shape[first_axis] // slots
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    form = "gather"
    if floating:
        tokens = jax.eval_shape(first_op, x, first).size // first.shape[first_axis]
        size = first.size + second.size
        form = stack_form(examples, tokens, size, first.dtype.itemsize, slots, onehot=t_axis is not None,
                          sgmv=rows is not None)  # fmt: skip
    if index.ndim and form == "gather":  # ids per token: each row's own factors
        form = "rows"
    if form == "gather":
        f = lax.dynamic_slice_in_dim(first, index * rank, rank, first_axis)
        f = (f * scale.astype(f.dtype)).astype(f.dtype)
        s = lax.dynamic_slice_in_dim(second, index * rank, rank, second_axis)
        return lora_op(x, w, f, s, 1.0, base=base, first_op=first_op, second_op=second_op,
                       dropout_rate=dropout_rate, dropout_key=dropout_key, stored=stored)  # fmt: skip
    xl = _dropout(x, dropout_rate, dropout_key)
    y = base(x, w) if stored is None or not floating else frozen(x, w, stored, base)
    if form == "onehot":
        t = first_op(xl, first.astype(x.dtype))
        column = jnp.arange(first.shape[first_axis]) // rank
        if index.ndim:  # per token: t is (*rows, slots·R) (a dot_general)
            gate = jnp.where(column.reshape((1,) * index.ndim + (-1,)) == index[..., None], scale[..., None], 0.0)
        else:
            gate = jnp.where(column == index, scale, 0.0)
            gate = jnp.expand_dims(gate, [d for d in range(t.ndim) if d != t_axis % t.ndim])
        t = t * gate.astype(t.dtype)
        return y + second_op(t, second.astype(x.dtype)).astype(y.dtype)
    assert rows is not None  # (stack_form offers "sgmv" only with rows; _ops refuses ids per token without)
    a, b = rows.groups(first.astype(x.dtype), second.astype(x.dtype), slots)
    xr = rows.to_rows(xl)
    lead = (1,) * (xr.ndim - 1 - index.ndim)  # one id per example: the same for all its rows
    index, scale = index.reshape(index.shape + lead), scale.reshape(scale.shape + lead)
    term = sgmv if form == "sgmv" else _bgmv
    return y + rows.from_rows(term(xr, index, scale, a, b, rows.precision)).astype(y.dtype)


def _bgmv(x: Array, ids: Array, scale: Array, a: Array, b: Array, precision=None) -> Array:
    """Each row ``x[..., :]`` times its own adapter's factors (``ids`` broadcast to the rows)."""
    shape = x.shape[:-1]
    ids, scale = jnp.broadcast_to(ids, shape), jnp.broadcast_to(scale, shape)
    t = jnp.einsum("...k,...kr->...r", x, a[ids], precision=precision) * scale[..., None].astype(x.dtype)
    return jnp.einsum("...r,...rn->...n", t, b[ids], precision=precision)


def _sgmv_rows(x: Array, ids: Array, scale: Array, a: Array, b: Array, precision=None) -> Array:
    """``scale · (x·a[id])·b[id]`` row by row, the rows grouped by id: two ``ragged_dot``s.

    ``x``: ``(*F, K)``; ``ids`` (in ``[0, slots)``) and ``scale``: broadcast to ``F``; ``a``:
    ``(slots, K, R)``; ``b``: ``(slots, R, N)``. Returns ``(*F, N)``. There are at most ``ids.size``
    distinct ids: when that is fewer than ``slots``, the groups are the ids in use (their factors
    gathered once each), else every slot is a group (most of them empty).
    """
    shape, k = x.shape[:-1], x.shape[-1]
    if x.size == 0 or ids.size == 0:  # an empty batch: no rows to group
        return jnp.zeros((*shape, b.shape[-1]), x.dtype)
    groups = min(a.shape[0], ids.size)
    ids = jnp.broadcast_to(ids, shape).reshape(-1)
    scale = jnp.broadcast_to(scale, shape).reshape(-1)
    order = jnp.argsort(ids, stable=True)
    sorted_ids = ids[order]
    if groups == a.shape[0]:
        sizes = jnp.zeros(groups, jnp.int32).at[sorted_ids].add(1)
    else:  # the groups in use, numbered in sorted order; the rest empty (slot 0's factors, unread rows)
        new = jnp.concatenate([jnp.ones(1, bool), sorted_ids[1:] != sorted_ids[:-1]])
        group = jnp.cumsum(new) - 1
        sizes = jnp.zeros(groups, jnp.int32).at[group].add(1)
        used = jnp.zeros(groups, ids.dtype).at[group].set(sorted_ids)
        a, b = a[used], b[used]
    rows = x.reshape(-1, k)[order]
    ragged_dot = _RAGGED_DOT or lax.ragged_dot
    t = ragged_dot(rows, a, sizes, precision=precision) * scale[order][:, None].astype(x.dtype)
    y = ragged_dot(t, b, sizes, precision=precision)
    back = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return y[back].reshape(*shape, b.shape[-1])


def _batched(in_batched: Any, axis_size: int, x: Array, ids: Array, scale: Array) -> tuple[Array, Array, Array]:
    """``x``, ``ids``, ``scale`` with the mapped axis in front (``x`` broadcast when not mapped)."""
    xb, ib, sb = in_batched[:3]
    x = x if xb else jnp.broadcast_to(x, (axis_size, *x.shape))
    return x, ids if ib else ids[None], scale if sb else scale[None]


@functools.cache
def _sgmv_fn(precision: Any) -> Callable[..., Array]:
    """`sgmv` for one ``precision``: a ``custom_vjp`` around two ``custom_vmap``s (forward, backward)."""

    @jax.custom_batching.custom_vmap
    def forward(x, ids, scale, a, b):
        return _sgmv_rows(x, ids, scale, a, b, precision)

    @forward.def_vmap
    def _(axis_size, in_batched, x, ids, scale, a, b):
        if in_batched[3] or in_batched[4]:  # factors that differ along this map: no grouping across it
            axes = [0 if m else None for m in in_batched]
            return jax.vmap(partial(_sgmv_rows, precision=precision), in_axes=axes)(x, ids, scale, a, b), True
        return _sgmv_rows(*_batched(in_batched, axis_size, x, ids, scale), a, b, precision), True

    def vjp(x, ids, scale, a, b, g):
        return jax.vjp(lambda x, a, b: _sgmv_rows(x, ids, scale, a, b, precision), x, a, b)[1](g)

    @jax.custom_batching.custom_vmap
    def backward(x, ids, scale, a, b, g):
        return vjp(x, ids, scale, a, b, g)

    @backward.def_vmap
    def _(axis_size, in_batched, x, ids, scale, a, b, g):
        if in_batched[3] or in_batched[4]:
            axes = [0 if m else None for m in in_batched]
            return jax.vmap(vjp, in_axes=axes)(x, ids, scale, a, b, g), (True, True, True)
        x, ids, scale = _batched(in_batched, axis_size, x, ids, scale)
        g = g if in_batched[5] else jnp.broadcast_to(g, (axis_size, *g.shape))
        return vjp(x, ids, scale, a, b, g), (True, False, False)  # each slot's gradient: summed over the map

    @jax.custom_vjp
    def term(x, ids, scale, a, b):
        return forward(x, ids, scale, a, b)

    def fwd(x, ids, scale, a, b):
        return forward(x, ids, scale, a, b), (x, ids, scale, a, b)

    def bwd(res, g):
        dx, da, db = backward(*res, g)
        return dx, None, None, da, db

    term.defvjp(fwd, bwd)
    return term


def sgmv(x: Array, ids: Array, scale: Array, a: Array, b: Array, precision: Any = None) -> Array:
    """The LoRA term of a mixed batch, rows grouped by adapter: ``scale · (x·a[id])·b[id]`` per row.

    ``x``: ``(*F, K)``; ``ids`` (each in ``[0, slots)``) and ``scale`` broadcast to ``F``; ``a``:
    ``(slots, K, R)``; ``b``: ``(slots, R, N)``; returns ``(*F, N)``. Under ``jax.vmap`` (as in
    ``jaxlora.apply(..., adapter_ids=)``, which maps the model over the examples) the rows of every
    example are grouped together (`jax.custom_batching.custom_vmap`), so each adapter in use is read
    once for the whole batch: the rows sorted by id (a stable argsort), the shrink and the expand each
    one ``lax.ragged_dot`` over the groups, the rows put back in order. The gradient (a ``custom_vjp``
    whose backward pass is grouped the same way) sends each row's to its own adapter.

    Example:
      >>> import jax.numpy as jnp
      >>> a, b = jnp.ones((2, 3, 1)), jnp.stack([jnp.ones((1, 2)), 2 * jnp.ones((1, 2))])
      >>> sgmv(jnp.ones((2, 3)), jnp.array([1, 0]), jnp.array([1.0, 0.5]), a, b)
      Array([[6. , 6. ],
             [1.5, 1.5]], dtype=float32)
    """
    return _sgmv_fn(precision)(x, ids, scale, a, b)


def _dropout(x: Array, rate: float, key: Array | None) -> Array:
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
