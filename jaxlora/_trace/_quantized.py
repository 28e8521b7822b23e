"""Quantized weights inside the rewrite: a `Packed` value that stays quantized until its first use.

A `jaxlora.Quantized` leaf enters the traced function as a float ``ShapeDtypeStruct`` (the model sees
a float weight) and the evaluator as `Packed`, a `Lazy` pytree over its codes and scales. Calls,
``remat``, ``cond`` and the optimisation barrier carry it inside as it is; ``scan`` hands each step its
layer of the stack (`Packed.scan_layer`: the whole stack and the step's index, the layout keeping the
stacked axis outside the blocks, so the fused kernel reads the layer's codes in place);
a view of it (a cast, a transpose, a slice: `_eval.Viewed`) stays lazy too, and the first other
equation that reads it (the matmul itself) gets it dequantized (`_eval.realize`; a cast that folds,
straight to the cast's dtype). So the float weight is formed inside the body of the ``scan``/``remat``
that uses it, one layer at a time, and XLA fuses the dequantization into its consumer: for a targeted
weight, the transient ``W + ΔW`` of `_matmul.lora_op`. That matmul's backward pass keeps the lazy
weight (its codes), not the float one, and dequantizes it again (`_matmul.factored`, `_matmul.frozen`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .._quantized import Quantized, dequantize_weight
from .._quantized import layer as layer_of


class Lazy:
    """A weight kept in another form until its first use that needs it whole (`Packed`).

    Defined here, below the evaluator (`_eval` imports it and never the other way round).

    Calls, ``remat``, ``scan`` (each step gets its `scan_layer`) and ``cond`` carry it inside (`KEEPS_LAZY`),
    views keep it lazy (`_eval.Viewed`); any other equation gets it `realize`d first, so a quantized
    weight is dequantized inside the body that uses it. ``realize()`` gives the same array every time:
    a matmul's backward pass calls it again rather than keep the array (`_matmul.frozen`).
    """

    shape: tuple[int, ...]
    dtype: Any

    def realize(self, eqn=None) -> jax.Array:
        raise NotImplementedError

    def scannable(self) -> bool:
        """Whether a ``scan`` over its axis 0 can hand each step its slice (`scan_layer`)."""
        return False

    def scan_layer(self, index: Any) -> Lazy:
        """Its slice at ``index`` along axis 0 (a traced int32 scalar): one ``scan`` step's value."""
        raise NotImplementedError


def folds(dtype: Any, new: Any) -> bool:
    """Whether a weight of ``dtype`` cast to ``new`` may be dequantized straight to ``new``: the
    dequantization computes in float32, so from a narrower ``dtype`` (bfloat16 to float32, or
    float16 to bfloat16) the rounding to ``dtype`` that the model asks for would be skipped."""
    return jnp.dtype(new) == jnp.dtype(dtype) or jnp.finfo(dtype).bits >= 32


@jax.tree_util.register_pytree_node_class
class Packed(Lazy):
    """A quantized weight in the evaluator: its `Quantized` node, dequantized on `realize`.

    ``cast`` is the floating dtype the model cast it to (``_qdot`` keeps a cast weight packed), or None.
    ``layer`` (a traced int32 scalar, or None) makes it one layer of the stacked ``q``: a ``scan`` over
    layers passes the whole stack and the step's index (`scan_layer`) rather than slicing the codes,
    so the fused kernel reads them in place; everything else sees the layer's own `Quantized`.
    """

    def __init__(self, q: Quantized, cast: Any = None, layer: Any = None):
        self.q, self.cast, self.layer = q, cast, layer

    def tree_flatten(self):
        return (self.q, self.layer), self.cast

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], aux, children[1])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape if self.layer is None else self.q.inner

    @property
    def dtype(self) -> Any:
        return self.q.dtype if self.cast is None else self.cast

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def own(self) -> Quantized:
        """The weight's own `Quantized` (its layer of the stack, sliced out)."""
        return self.q if self.layer is None else layer_of(self.q, self.layer)

    def realize(self, eqn=None) -> jax.Array:
        dtype = self.cast  # the model's own cast first (a later cast then applies as written)
        if dtype is None and eqn is not None and eqn.primitive.name == "convert_element_type":
            if folds(self.q.dtype, eqn.params["new_dtype"]):
                dtype = eqn.params["new_dtype"]  # dequantize straight to the dtype the model casts to
        return dequantize_weight(self.own(), dtype)

    def scannable(self) -> bool:
        return self.layer is None and bool(self.q.outer)

    def scan_layer(self, index: Any) -> Packed:
        """This stack's layer ``index`` (a ``scan`` step's slice, the codes left in place)."""
        return Packed(self.q, self.cast, index)
