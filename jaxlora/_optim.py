"""Masks and labels for optax, for users who keep frozen and LoRA leaves in one tree."""

from __future__ import annotations

from typing import Any, TypeVar

import jax

from ._matmul import LoraFactors

T = TypeVar("T")


def mask(tree: Any, trainable: T = True, frozen: T = False) -> Any:
    """A pytree like ``tree``: ``trainable`` at every LoRA leaf (inside a `LoraFactors`), ``frozen`` elsewhere.

    With the defaults it is a boolean mask for ``optax.masked``; with labels it feeds
    ``optax.multi_transform``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxlora
      >>> params = {"w": jnp.ones((4, 6))}
      >>> tree = {"base": params, "lora": jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))}
      >>> labels = jaxlora.mask(tree, trainable="lora", frozen="frozen")
      >>> opt = optax.multi_transform({"lora": optax.adam(1e-3), "frozen": optax.set_to_zero()}, labels)
      >>> labels["base"]["w"], labels["lora"]["w"].a
      ('frozen', 'lora')
    """
    is_factors = lambda x: isinstance(x, LoraFactors)  # noqa: E731
    return jax.tree_util.tree_map(
        lambda x: jax.tree_util.tree_map(lambda _: trainable, x) if is_factors(x) else frozen,
        tree,
        is_leaf=is_factors,
    )
