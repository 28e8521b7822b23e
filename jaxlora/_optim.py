"""Masks and labels for optax, for users who keep frozen and LoRA leaves in one tree."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

from ._matmul import LoraFactors

T = TypeVar("T")


def mask(tree: Any, trainable: T = True, frozen: T = False) -> Any:
    """A pytree like ``tree``: ``trainable`` at every LoRA leaf (inside a `LoraFactors`), ``frozen`` elsewhere.

    In a `LoraStack` the factors ``a`` and ``b`` are trainable, its ``scale`` and ``rank`` frozen.

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
    from ._stack import LoraStack

    def label(x):
        if isinstance(x, LoraStack):  # the factors train; each adapter's scale and rank are data
            return dataclasses.replace(
                x,
                a=_all(x.a, trainable),
                b=_all(x.b, trainable),
                scale=_all(x.scale, frozen),
                rank=_all(x.rank, frozen),
            )
        return _all(x, trainable) if isinstance(x, LoraFactors) else frozen

    return jax.tree_util.tree_map(label, tree, is_leaf=lambda x: isinstance(x, (LoraFactors, LoraStack)))


def _all(tree: Any, value: Any) -> Any:
    return jax.tree_util.tree_map(lambda _: value, tree)
