"""Masks and labels for optax, for users who keep frozen and LoRA leaves in one tree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import optax

from ._matmul import LoraFactors
from ._saved import SavedModule

T = TypeVar("T")


def mask(tree: Any, trainable: T = True, frozen: T = False) -> Any:
    """A pytree like ``tree``: ``trainable`` at every LoRA leaf (`LoraFactors`, `SavedModule`), ``frozen`` elsewhere.

    In a `LoraStack` the factors ``a`` and ``b`` are trainable; its scales and ranks are static, no leaves.

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
        if isinstance(x, LoraStack):  # its leaves are the factors alone
            return dataclasses.replace(x, a=_all(x.a, trainable), b=_all(x.b, trainable))
        return _all(x, trainable) if isinstance(x, (LoraFactors, SavedModule)) else frozen

    return jax.tree_util.tree_map(label, tree, is_leaf=lambda x: isinstance(x, (LoraFactors, SavedModule, LoraStack)))


def _all(tree: Any, value: Any) -> Any:
    return jax.tree_util.tree_map(lambda _: value, tree)


def loraplus_labels(tree: Any) -> Any:
    """LoRA+ labels for ``optax.multi_transform``: ``"a"`` on each ``a``, ``"b"`` on each ``b``.

    DoRA's magnitude ``m`` learns at ``B``'s rate (``"b"``), as PEFT groups every 1-D trainable
    parameter with ``B``; so do the 1-D leaves (biases, norm scales) of ``modules_to_save``, whose
    other leaves learn at ``A``'s rate (``"a"``). A `LoraStack`'s leaves are its ``a`` and ``b``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> lora = jaxlora.init(jax.random.key(0), {"w": jnp.ones((4, 6))}, jaxlora.LoraConfig(rank=2))
      >>> labels = jaxlora.loraplus_labels(lora)["w"]
      >>> labels.a, labels.b
      ('a', 'b')
    """
    from ._stack import LoraStack

    def label(x: Any) -> Any:
        if isinstance(x, LoraFactors):
            return dataclasses.replace(x, a="a", b="b", m=None if x.m is None else "b")
        if isinstance(x, LoraStack):
            return dataclasses.replace(x, a=_all(x.a, "a"), b=_all(x.b, "b"))
        return "b" if getattr(x, "ndim", 2) == 1 else "a"

    return jax.tree_util.tree_map(label, tree, is_leaf=lambda x: isinstance(x, (LoraFactors, LoraStack)))


def loraplus(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    ratio: float = 16.0,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024; PEFT's ``create_loraplus_optimizer``): ``B`` learns ``ratio`` times faster than ``A``.

    Builds ``optimizer(learning_rate, **kwargs)`` for every ``a`` and ``optimizer(ratio ·
    learning_rate, **kwargs)`` for every ``b`` (a schedule is scaled step by step), joined by
    ``optax.multi_transform`` over `loraplus_labels`.

    Args:
      optimizer: an optax optimizer factory whose first argument is the learning rate (``optax.adamw``).
      learning_rate: ``A``'s learning rate (PEFT's ``lr``), a number or an optax schedule.
      ratio: ``B``'s learning rate over ``A``'s (PEFT's ``loraplus_lr_ratio``; its example uses 16).
      **kwargs: passed to ``optimizer`` (``weight_decay=...``).

    Raises:
      ValueError: if ``ratio`` is not positive.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxlora
      >>> lora = jaxlora.init(jax.random.key(0), {"w": jnp.ones((4, 6))}, jaxlora.LoraConfig(rank=2))
      >>> opt = jaxlora.loraplus(optax.adamw, 1e-4, ratio=16, weight_decay=0.0)
      >>> state = opt.init(lora)
    """
    if not isinstance(ratio, (int, float)) or ratio <= 0:
        raise ValueError(f"loraplus ratio must be a positive number (B's learning rate over A's), got {ratio!r}.")
    if callable(learning_rate):
        schedule = learning_rate
        fast: optax.ScalarOrSchedule = lambda step: ratio * schedule(step)  # noqa: E731
    else:
        fast = ratio * learning_rate
    transforms = {"a": optimizer(learning_rate, **kwargs), "b": optimizer(fast, **kwargs)}
    return optax.multi_transform(transforms, loraplus_labels)
