"""Flax NNX front-end: the same verbs on an ``nnx.Module``, through the generic jaxpr rewrite.

An NNX model splits into a graph definition and states (``nnx.split``). `call` turns the graph
definition into a pure function ``fn(params, *args)`` of the ``nnx.Param`` state, which is all the core
verbs need: ``jaxlora.init(key, params, config, fn=fn, args=...)``, ``jaxlora.apply(fn, params, lora,
...)``, ``jaxlora.merge(params, lora)`` (an ``nnx.State`` that ``nnx.merge`` accepts). Module paths
come out as ``"layers/0/attn/query"``: the state's trailing ``.value`` and the leaf name ``kernel`` or
``embedding`` are dropped.

`init`, `apply`, `merge`, `unmerge` and `summary` here take the model itself. None of them mutates
it: ``apply`` runs a copy rebuilt from the model's state, so RNG counters and batch statistics
updated by the call are discarded unless ``updates=True`` returns them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
from flax import nnx

from . import _core
from ._config import LoraConfig
from ._matmul import LoraFactors

M = TypeVar("M", bound=nnx.Module)
Lora = dict[str, LoraFactors]


__all__ = ["apply", "call", "init", "merge", "summary", "unmerge"]


def call(graphdef: nnx.GraphDef, *states: Any, method: str | None = None) -> Callable[..., Any]:
    """A pure function ``fn(params, *args, **kwargs)`` that runs the NNX model ``graphdef`` describes.

    ``fn`` rebuilds the model with ``nnx.merge(graphdef, params, *states, copy=True)`` and calls it
    (or its ``method``); it is what `jaxlora.init` and `jaxlora.apply` take as ``fn``. Updates the
    call makes to RNG counters or batch statistics land on the copy, never on ``states``.

    Args:
      graphdef: from ``graphdef, params, *states = nnx.split(model, nnx.Param, ...)``.
      *states: the other states of that split (RNG state, batch statistics), held fixed.
      method: the name of the model's method to call; ``None`` calls the model.

    Returns:
      ``fn(params, *args, **kwargs)``, returning what the model returns.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from flax import nnx
      >>> graphdef, params = nnx.split(nnx.Linear(4, 6, rngs=nnx.Rngs(0)))
      >>> fn = jaxlora.nnx.call(graphdef)
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2), fn=fn, args=(jnp.ones((1, 4)),))
      >>> jaxlora.apply(fn, params, lora, jnp.ones((1, 4))).shape
      (1, 6)
    """

    def fn(params: Any, *args: Any, **kwargs: Any) -> Any:
        model = nnx.merge(graphdef, params, *states, copy=True)  # fresh Variables: the call may update them
        return (model if method is None else getattr(model, method))(*args, **kwargs)

    return fn


def _split(model: Any, verb: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"jaxlora.nnx.{verb} takes an nnx.Module, got {type(model).__name__}. For a Linen model or any "
            f"function of a params pytree, use jaxlora.{verb} (with fn=model.apply or your function)."
        )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def init(
    key: jax.Array,
    model: nnx.Module,
    config: LoraConfig,
    *,
    args: tuple[Any, ...] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    method: str | None = None,
) -> Lora:
    """`jaxlora.init` for the ``nnx.Param`` weights of an NNX model.

    Args:
      key: a PRNG key.
      model: the frozen NNX model; it is not changed.
      config: what to adapt.
      args: example inputs of ``model(*args)`` (arrays or ``jax.ShapeDtypeStruct``); with them, init
        traces the model abstractly to learn each weight's input, output and stacked axes (needed for
        ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv`` and ``nnx.vmap``/``nnx.scan`` stacks).
        Without them only 2-D weights can be laid out.
      kwargs: keyword arguments of that call (``deterministic=True``); held fixed while tracing.
      method: the name of the method to trace instead of ``__call__``.

    Returns:
      The LoRA tree: module path (``"layers/0/attn/query"``) to `LoraFactors`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
      >>> lora = jaxlora.nnx.init(jax.random.key(0), model, jaxlora.LoraConfig(rank=2), args=(jnp.ones((1, 4)),))
      >>> sorted(lora), lora["kernel"].a.shape  # a lone layer's path is its leaf name
      (['kernel'], (4, 2))
    """
    graphdef, params, rest = _split(model, "init")
    if args is None and kwargs is None:
        return _core.init(key, params, config)
    model_fn = call(graphdef, rest, method=method)
    fn = lambda params, *args: model_fn(params, *args, **(kwargs or {}))  # noqa: E731
    return _core.init(key, params, config, fn=fn, args=tuple(args or ()))


def apply(
    model: nnx.Module,
    lora: Mapping[str, LoraFactors],
    *args: Any,
    method: str | None = None,
    dropout_key: jax.Array | None = None,
    unsupported: str = "error",
    updates: bool = False,
    adapter_ids: Any = None,
    example_axes: tuple[Any, ...] | None = None,
    **kwargs: Any,
) -> Any:
    """Call ``model(*args, **kwargs)`` with every targeted weight computed as ``W + scale·B·A``.

    The model is not mutated: it runs as a copy rebuilt from its state. Works eagerly, under
    ``jax.jit`` and ``nnx.jit`` (NNX modules are pytrees), and inside ``jax.grad`` over ``lora``.

    Args:
      model: the frozen NNX model.
      lora: the tree from `init` (or `jaxlora.init` on ``nnx.split(model)``'s params).
      *args, **kwargs: the model's inputs.
      method: the name of a method to call instead of ``__call__``.
      dropout_key, unsupported: as in `jaxlora.apply`.
      adapter_ids, example_axes: with a `jaxlora.LoraStack` as ``lora``: as in `jaxlora.apply` (the
        model's non-``Param`` state is shared by every example).
      updates: also return the model's non-``Param`` state after the call (RNG counters, batch
        statistics), to store with ``nnx.update(model, state)`` where that is wanted.

    Returns:
      What the model returns, or ``(output, state)`` with ``updates=True``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
      >>> lora = jaxlora.nnx.init(jax.random.key(0), model, jaxlora.LoraConfig(rank=2))
      >>> bool(jnp.allclose(jaxlora.nnx.apply(model, lora, jnp.ones((1, 4))), model(jnp.ones((1, 4)))))
      True
    """
    graphdef, params, rest = _split(model, "apply")

    def fn(params: Any, rest: Any, *args: Any, **kwargs: Any) -> Any:
        module = nnx.merge(graphdef, params, rest, copy=True)
        out = (module if method is None else getattr(module, method))(*args, **kwargs)
        return (out, nnx.state(module, nnx.Not(nnx.Param))) if updates else out

    if adapter_ids is not None:
        kwargs["adapter_ids"] = adapter_ids
        kwargs["example_axes"] = (None, *(example_axes if example_axes is not None else (0,) * len(args)))
    return _core.apply(fn, params, lora, rest, *args, dropout_key=dropout_key, unsupported=unsupported, **kwargs)


def merge(model: M, lora: Mapping[str, LoraFactors], *, return_norms: bool = False) -> Any:
    """A new model whose targeted weights are ``W + scale·B·A``; ``model`` is unchanged.

    With ``return_norms``, also DoRA's norms (``(merged, norms)``), which `unmerge` needs (see
    `jaxlora.merge`).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
      >>> lora = jaxlora.nnx.init(jax.random.key(0), model, jaxlora.LoraConfig(rank=2))
      >>> merged = jaxlora.nnx.merge(model, lora)
      >>> merged is model, bool(jnp.allclose(merged.kernel[...], model.kernel[...]))  # B = 0 at init
      (False, True)
    """
    graphdef, params, rest = _split(model, "merge")
    merged, norms = _core.merge(params, lora, return_norms=True)
    out = nnx.merge(graphdef, merged, rest)
    return (out, norms) if return_norms else out


def unmerge(model: M, lora: Mapping[str, LoraFactors], *, norms: Mapping[str, Any] | None = None) -> M:
    """A new model whose targeted weights are ``W - scale·B·A``: the inverse of `merge` (DoRA modules
    need the ``norms`` from ``merge(..., return_norms=True)``).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
      >>> lora = jaxlora.nnx.init(jax.random.key(0), model, jaxlora.LoraConfig(rank=2))
      >>> lora = jax.tree.map(lambda x: x + 1.0, lora)
      >>> back = jaxlora.nnx.unmerge(jaxlora.nnx.merge(model, lora), lora)
      >>> bool(jnp.allclose(back.kernel[...], model.kernel[...], atol=1e-5))
      True
    """
    graphdef, params, rest = _split(model, "unmerge")
    return nnx.merge(graphdef, _core.unmerge(params, lora, norms=norms), rest)


def summary(model: nnx.Module, lora: Mapping[str, LoraFactors]) -> _core.Summary:
    """`jaxlora.summary` over the model's ``nnx.Param`` weights.

    Example:
      >>> import jax, jaxlora
      >>> from flax import nnx
      >>> model = nnx.Linear(768, 768, rngs=nnx.Rngs(0))
      >>> lora = jaxlora.nnx.init(jax.random.key(0), model, jaxlora.LoraConfig(rank=8))
      >>> jaxlora.nnx.summary(model, lora).trainable
      12288
    """
    _, params, _ = _split(model, "summary")
    return _core.summary(params, lora)
