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
``x·W + scale · (x·a)·b`` without ever forming ``W + ΔW``.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """The trainable factors of one adapted weight: a pytree node with leaves ``a`` and ``b``.

    Attributes:
      a: ``(*S, *I, r)``: the down-projection (see the module docstring for the roles).
      b: ``(*S, r, *O)``: the up-projection, zero at init.
      scale: ``alpha / r`` (or ``alpha / sqrt(r)``); static, so it is no trainable leaf.
      roles: one of ``"s"``, ``"i"``, ``"o"`` per axis of ``W``, in ``W``'s order; static.
      dropout: dropout rate on the LoRA branch's input; static.

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

    @property
    def rank(self) -> int:
        """The rank ``r``."""
        return self.a.shape[-1]


def factor_shapes(weight_shape: tuple[int, ...], roles: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``a`` and ``b`` for a weight of ``weight_shape`` with ``roles``."""
    pick = lambda role: tuple(d for d, c in zip(weight_shape, roles) if c == role)  # noqa: E731
    return pick("s") + pick("i") + (rank,), pick("s") + (rank,) + pick("o")


def delta(factors: LoraFactors, dtype: jnp.dtype | None = None) -> Array:
    """``ΔW = scale · a·b`` in ``W``'s own layout, accumulated in float32 and cast to ``dtype``.

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
    out = jnp.einsum(spec, factors.a, factors.b, preferred_element_type=jnp.float32) * factors.scale
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
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> Array:
    """``base(x, W) + scale · second_op(first_op(x, first), second)``: a layer op with LoRA.

    ``base`` is the model's own op (a ``dot_general``, convolution or lookup); ``first_op`` applies
    the same op to the factor that shares ``W``'s input axes, which brings ``x`` down to rank ``r``,
    and ``second_op`` lifts the result back to the op's output. The factors are cast to the
    activations' dtype, so a bfloat16 model stays in bfloat16 while ``a`` and ``b`` stay float32.
    No gradient for ``W`` exists: it is a constant of this function.
    """
    y = base(x, w)
    if dropout_key is not None and dropout_rate > 0.0 and jnp.issubdtype(x.dtype, jnp.floating):
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout_rate), 0).astype(x.dtype)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else y.dtype
    t = first_op(x, first.astype(dtype))
    t = (t * jnp.asarray(scale, t.dtype)).astype(dtype)
    return y + second_op(t, second.astype(dtype)).astype(y.dtype)


def rank_dot(t: Array, second: Array, t_axis: int, second_axis: int, batch: tuple[tuple[int, ...], tuple[int, ...]]) -> Array:
    """Contract ``t``'s rank axis with ``second``'s, batching over shared stacked axes."""
    return lax.dot_general(t, second, (((t_axis,), (second_axis,)), batch))
