"""`init_from_weights`: LoRA factors taken from the weights themselves (PiSSA, OLoRA).

Each targeted weight is seen, per stacked layer, as an ``(I, O)`` matrix ``M`` (its input axes
flattened, then its output axes: jaxlora's orientation, the transpose of PyTorch's ``(out, in)``).

* PiSSA (Meng et al. 2024; PEFT ``init_lora_weights="pissa"``): ``M = U·S·Vᵀ``; with the top ``r``
  singular triplets and ``S' = S_r / scale``, ``a = U_r·√S'`` and ``b = √S'·V_rᵀ``, so that
  ``scale·a·b`` is the best rank-``r`` part of ``M``. ``niter`` uses a randomized SVD instead
  (Halko et al. 2009, algorithm 5.1, as ``torch.svd_lowrank``; PEFT's ``"pissa_niter_K"``).
* OLoRA (Büyükakyüz 2024; PEFT ``"olora"``): ``Mᵀ = Q·R``; ``b = Q_rᵀ`` and ``a = R_rᵀ`` (no scale
  divided out, as PEFT).

Both return the residual base ``W - scale·a·b`` (computed in float32, cast to ``W``'s dtype), so the
adapted model's output equals the original model's at step 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp

from ._config import LoraConfig
from ._core import Lora, init
from ._matmul import LoraFactors, delta
from ._trace import path_seed
from ._tree import weights

Params = TypeVar("Params")
Array = jax.Array


def _matrix(w: Array, roles: str) -> tuple[Array, tuple[int, ...]]:
    """``w`` as ``(L, I, O)`` in float32, and its axes' permutation into (stacked, input, output) order."""
    perm = tuple(k for role in "sio" for k, c in enumerate(roles) if c == role)
    shape = [w.shape[k] for k in perm]
    ns, ni = roles.count("s"), roles.count("i")
    m = jnp.transpose(w.astype(jnp.float32), perm)
    return m.reshape(math.prod(shape[:ns]), math.prod(shape[ns : ns + ni]), -1), perm


def randomized_svd(key: Array, m: Array, rank: int, niter: int) -> tuple[Array, Array, Array]:
    """The top ``rank`` singular triplets of each ``m[l]`` by randomized subspace iteration.

    ``niter`` power iterations refine a Gaussian sketch (Halko et al. 2009, algorithm 5.1, as
    ``torch.svd_lowrank`` with ``q = rank``). Returns ``u (L, I, rank)``, ``s (L, rank)``,
    ``vt (L, rank, O)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = jax.random.normal(jax.random.key(0), (1, 20, 3)) @ jax.random.normal(jax.random.key(1), (1, 3, 9))
      >>> u, s, vt = randomized_svd(jax.random.key(2), m, 3, niter=2)
      >>> bool(jnp.allclose((u * s[:, None]) @ vt, m, atol=1e-4))
      True
    """
    tall = m.shape[1] >= m.shape[2]
    x = m if tall else jnp.swapaxes(m, 1, 2)
    xt = jnp.swapaxes(x, 1, 2)
    q = jnp.linalg.qr(x @ jax.random.normal(key, (x.shape[0], x.shape[2], rank), x.dtype))[0]
    for _ in range(niter):
        q = jnp.linalg.qr(xt @ q)[0]
        q = jnp.linalg.qr(x @ q)[0]
    u, s, vt = jnp.linalg.svd(jnp.swapaxes(q, 1, 2) @ x, full_matrices=False)
    u = q @ u
    if not tall:
        u, vt = jnp.swapaxes(vt, 1, 2), jnp.swapaxes(u, 1, 2)
    return u, s, vt


def init_from_weights(
    key: Array,
    params: Params,
    config: LoraConfig,
    *,
    method: Literal["pissa", "olora"] = "pissa",
    niter: int | None = None,
    fn: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
) -> tuple[Params, Lora]:
    """LoRA factors from the principal (PiSSA) or QR (OLoRA) directions of each targeted weight.

    Args:
      key: a PRNG key (used by the randomized SVD; shapes, roles and scales come from `init`).
      params: the base parameters, as real arrays.
      config: what to adapt, as for `init`.
      method: ``"pissa"`` or ``"olora"`` (see the module docstring).
      niter: PiSSA only: use a randomized SVD with this many power iterations (PEFT's
        ``"pissa_niter_K"``), much faster than the full SVD for large weights.
      fn, args: the model function and example arguments, as for `init` (needed for weights with
        more than two axes). Stacked (scanned) weights are decomposed layer by layer.

    Returns:
      ``(residual_params, lora)``: ``params`` with each targeted ``W`` replaced by ``W - scale·a·b``
      (same dtypes), and the LoRA tree; ``apply(fn, residual_params, lora, x)`` equals ``fn(params, x)``.
      Keep ``lora`` as it is now to export a plain LoRA later (`jaxlora.checkpoint.save_peft` with
      ``initial=``).

    Raises:
      ValueError: for an unknown method, ``niter`` with OLoRA, or what `init` refuses.
      TypeError: if ``params`` holds only shapes.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
      >>> residual, lora = jaxlora.init_from_weights(jax.random.key(1), params, jaxlora.LoraConfig(rank=2))
      >>> x = jnp.ones((1, 8))
      >>> bool(jnp.allclose(jaxlora.apply(lambda p, x: x @ p["w"], residual, lora, x), x @ params["w"], atol=1e-5))
      True
    """
    if method not in ("pissa", "olora"):
        raise ValueError(f'method must be "pissa" or "olora", got {method!r}.')
    if niter is not None and (method != "pissa" or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter (a randomized SVD's power iterations) is a non-negative int for PiSSA; got {niter!r}.")
    from ._quantized import is_quantized

    lora0 = init(key, params, config, fn=fn, args=args)
    found = weights(params)
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_quantized)
    quantized = [p for p, f in lora0.items() if isinstance(f, LoraFactors) and is_quantized(leaves[found[p].index])]
    if quantized:
        raise TypeError(
            f"init_from_weights decomposes float weights, but {quantized} are quantized (jaxlora.quantize); "
            "run it on the float params, then quantize the residual base it returns."
        )
    lora: Lora = {}
    for path, f in lora0.items():
        if not isinstance(f, LoraFactors):  # a SavedModule (modules_to_save): a copy, trained in full
            lora[path] = f
            continue
        i = found[path].index
        w = leaves[i]
        if isinstance(w, jax.ShapeDtypeStruct):
            raise TypeError(f"init_from_weights needs the weights, but params holds only the shape of {path!r} ({w}).")
        m, _ = _matrix(w, f.roles)
        r = f.rank
        if method == "olora":
            q, rr = jnp.linalg.qr(jnp.swapaxes(m, 1, 2))  # M^T = Q R, as PEFT's QR of the (out, in) weight
            a, b = jnp.swapaxes(rr[:, :r], 1, 2), jnp.swapaxes(q[..., :r], 1, 2)
        else:
            if niter is None:
                u, s, vt = jnp.linalg.svd(m, full_matrices=False)
            else:
                u, s, vt = randomized_svd(jax.random.fold_in(key, path_seed(path)), m, r, niter)
            root = jnp.sqrt(s[:, :r] / f.scale)
            a, b = u[..., :r] * root[:, None, :], root[..., None] * vt[:, :r]
        a = a.reshape(f.a.shape).astype(config.dtype)
        b = b.reshape(f.b.shape).astype(config.dtype)
        # DoRA's m (= ‖W‖) stays: the residual plus ΔW is W again, so its norm is unchanged
        lora[path] = LoraFactors(a=a, b=b, scale=f.scale, roles=f.roles, dropout=f.dropout, m=f.m)
        leaves[i] = (w.astype(jnp.float32) - delta(lora[path], jnp.float32)).astype(w.dtype)
    return jax.tree_util.tree_unflatten(treedef, leaves), lora
