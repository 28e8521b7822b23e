"""A quantized weight's matmul by the fused kernel: ``x·W`` read from the packed codes (`jaxlora._qmatmul`).

Rules that may take a `Packed` weight as it is (`LAZY_RULES`), before the evaluator dequantizes it:

* ``convert_element_type`` to a floating dtype keeps it packed, noting the dtype (a model that casts
  its params to the compute dtype, e.g. Flax's ``dtype=jnp.bfloat16``);
* ``dot_general`` of activations ``x (..., K)`` against ``W (K, N)`` (a Dense layer: ``x``'s last
  axis against ``W``'s first, no batch axes) runs `_qmatmul.dot` where `_qmatmul.mode` picks the
  kernel (a GPU, shapes it covers, few rows; a scanned stack's layer is read in place, `Packed.layer`;
  at the op's own precision); a targeted weight adds its LoRA term ``scale·(x·a)·b`` beside it, as
  `_matmul.lora_op`'s factored form does. DoRA, LoRA dropout, an adapter stack (``adapter_ids``),
  other layouts and a mesh of several devices (``jax.set_mesh``) fall back: the weight is
  dequantized and the op runs as before.

Every other case returns None and the evaluator dequantizes the weight (`_eval.realize`).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from .. import _qmatmul, _remat
from .._matmul import _cast, _on_mesh
from ._eval import LAZY_RULES, Context, Tagged
from ._quantized import Packed, folds


def _packed(v: Any) -> Packed | None:
    w = v.w if isinstance(v, Tagged) else v
    return w if isinstance(w, Packed) else None


def _convert(eqn, invals: list[Any], ctx: Context) -> list[Any] | None:
    (v,) = invals
    w, new = _packed(v), jnp.dtype(eqn.params["new_dtype"])
    if ctx.probing or w is None or not jnp.issubdtype(new, jnp.floating) or not folds(w.dtype, new):
        return None  # (a cast that does not fold: the weight is dequantized to its dtype, then cast)
    cast = Packed(w.q, new, w.layer)
    return [v.replace(w=cast) if isinstance(v, Tagged) else cast]


def _dot_general(eqn, invals: list[Any], ctx: Context) -> list[Any] | None:
    if ctx.probing or ctx.stack is not None or len(invals) != 2 or _on_mesh():
        return None
    x, v = invals
    w = _packed(v)
    if w is None or _packed(x) is not None or isinstance(x, Tagged) or w.ndim != 2:
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or tuple(rc) != (0,) or tuple(lc) != (x.ndim - 1,) or x.dtype != w.dtype:
        return None
    out_dtype = eqn.params.get("preferred_element_type") or x.dtype
    precision = eqn.params.get("precision")  # the kernel's tile products take it too (float32: TF32 or IEEE)
    if _qmatmul.mode(w.q, math.prod(x.shape[:-1]), x.dtype, stacked=w.layer is not None) == "xla":
        return None
    if not isinstance(v, Tagged):
        return [_qmatmul.dot(x, w.q, out_dtype, w.layer, precision)]
    f = v.factors
    view = v.view  # W's own (in, out) axes, as they are (a slice of a stacked weight inside scan is too)
    dense = "".join(f.roles[k] for k in view.origin) == "io" if f is not None else False
    if not dense or view.present != view.origin or view.merged or v.m is not None or f.dropout or v.a.ndim != 2:
        return None
    y = _qmatmul.dot(x, w.q, out_dtype, w.layer, precision)
    first, second = _cast(v.a, v.b, f.scale, x.dtype)  # as lora_op's factored form: scale folded into a
    t = lax.dot_general(x, first, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    t = checkpoint_name(t, _remat.XA)  # named as lora_op names them, for jaxlora.remat_policy
    z = y + lax.dot_general(t, second, (((t.ndim - 1,), (0,)), ((), ())), precision=precision).astype(y.dtype)
    return [checkpoint_name(z, f"{_remat.OUT}/{view.path}")]


LAZY_RULES["convert_element_type"] = _convert
LAZY_RULES["dot_general"] = _dot_general
