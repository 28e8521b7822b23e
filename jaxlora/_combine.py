"""`combine`: several adapters into one, by each of PEFT's ``add_weighted_adapter`` methods.

Each method is defined as PEFT 0.21 defines it (``peft/tuners/lora/model.py`` and
``peft/utils/merge_utils.py``), on jaxlora's layout: per module and per stacked layer, ``a`` is an
``(I, r)`` matrix and ``b`` an ``(r, O)`` one (``I``, ``O`` the flattened input and output axes).

* ``cat``: ``a' = [w₁s₁a₁ | w₂s₂a₂ | ...]``, ``b' = [b₁ ; b₂ ; ...]``: exact, ranks add up.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the same merge on the
  ``a``'s (weights ``sign(ws)·√|ws|``) and on the ``b``'s (weights ``√|ws|``); equal ranks.
* ``svd`` and the ``_svd`` forms: the merge on each adapter's ``ΔW = s·a·b``, truncated to ``rank``
  by an SVD (``a' = U``, ``b' = S·Vᵀ``).

The merges, on tensors ``T_k`` with weights ``w_k``: task arithmetic ``Σ w_k T_k``; magnitude pruning
keeps the ``int(density·n)`` largest ``|T_k|`` of each tensor; DARE keeps each entry with probability
``density`` and divides by it; TIES keeps, per entry, the tensors whose sign agrees with the sign of
``Σ_k T_k`` (``"total"``) or of ``Σ_k sign(T_k)`` (``"frequency"``) and averages ``w_k T_k`` over them.
The result has ``scale = 1`` (PEFT: ``lora_alpha = r``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from ._matmul import LoraFactors
from ._saved import SavedModule
from ._trace import path_seed

Array = jax.Array
Lora = dict[str, LoraFactors | SavedModule]
Method = Literal[
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_linear_svd",
    "dare_ties",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
_MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = ("cat", *_MERGES, "svd", *(f"{m}_svd" for m in _MERGES[1:]))
_NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


def _magnitude(t: Array, density: float) -> Array:
    """Keep the ``int(density·n)`` entries of largest magnitude in each layer ``t[l]`` (``t: (L, ...)``)."""
    flat = t.reshape(t.shape[0], -1)
    k = int(density * flat.shape[1])
    keep = jnp.zeros(flat.shape, bool)
    if k:
        idx = jax.lax.top_k(jnp.abs(flat), k)[1]
        keep = keep.at[jnp.arange(flat.shape[0])[:, None], idx].set(True)
    return jnp.where(keep, flat, 0).reshape(t.shape)


def _random(t: Array, density: float, key: Array) -> Array:
    """DARE: keep each entry with probability ``density``, rescaled by ``1/density``."""
    return jnp.where(jax.random.bernoulli(key, density, t.shape), t / density, 0)


def _merge(
    ts: list[Array], weights: Array, method: str, density: float | None, sign: str, keys: list[Array] | None
) -> Array:
    """PEFT's merge ``method`` of the tensors ``ts`` (each ``(L, ...)``, pruned per layer) with ``weights``."""
    if method in _NEEDS_DENSITY and density < 1:  # PEFT: density >= 1 prunes nothing
        if method.startswith("dare"):
            ts = [_random(t, density, k) for t, k in zip(ts, keys)]
        else:
            ts = [_magnitude(t, density) for t in ts]
    stack = jnp.stack(ts)
    w = weights.reshape((-1,) + (1,) * (stack.ndim - 1))
    if method in ("ties", "dare_ties"):
        signs = jnp.sign(stack)
        majority = jnp.where((stack if sign == "total" else signs).sum(0) >= 0, 1.0, -1.0)
        agree = signs == majority[None]
        return (stack * w * agree).sum(0) / jnp.maximum(agree.sum(0), 1).astype(stack.dtype)
    return (stack * w).sum(0)


def _layers(f: LoraFactors) -> tuple[Array, Array, tuple[int, ...]]:
    """``a`` as ``(L, I, r)``, ``b`` as ``(L, r, O)``, and the stacked axes' shape."""
    ns = f.roles.count("s")
    s_shape, r = tuple(f.a.shape[:ns]), f.rank
    a = f.a.reshape(math.prod(s_shape), -1, r).astype(jnp.float32)
    return a, f.b.reshape(math.prod(s_shape), r, -1).astype(jnp.float32), s_shape


def _unlayer(a: Array, b: Array, like: LoraFactors, dtype) -> LoraFactors:
    ns = like.roles.count("s")
    r = a.shape[-1]
    a = a.reshape(*like.a.shape[:-1], r).astype(dtype)
    b = b.reshape(*like.b.shape[:ns], r, *like.b.shape[ns + 1 :]).astype(dtype)
    return LoraFactors(a=a, b=b, scale=1.0, roles=like.roles, dropout=like.dropout)


def combine(
    adapters: Sequence[Mapping[str, LoraFactors]],
    weights: Sequence[float],
    *,
    method: Method,
    rank: int | None = None,
    density: float | None = None,
    key: Array | None = None,
    majority_sign: Literal["total", "frequency"] = "total",
) -> Lora:
    """One adapter from several, as PEFT's ``add_weighted_adapter`` combines them.

    Args:
      adapters: LoRA trees (from `init`, training, or `jaxlora.checkpoint.load_peft`). A module
        present in only some of them is combined from those; a `SavedModule` (``modules_to_save``)
        present in one adapter is kept as it is (PEFT refuses one present in several).
      weights: one weight per adapter; negative weights subtract.
      method: ``"cat"`` (exact; the ranks add up), ``"linear"``, ``"ties"``, ``"dare_linear"``,
        ``"dare_ties"``, ``"magnitude_prune"`` (on the factors; all ranks of a module equal), or
        ``"svd"``, ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``
        (on the weighted ``ΔW``, truncated to ``rank`` by an SVD). See the module docstring.
      rank: the rank of the ``_svd`` results (default: the largest rank among the module's adapters).
      density: the fraction of entries kept by the pruning methods (required for them), in ``[0, 1]``.
      key: a PRNG key, required by the DARE methods (each module draws from ``fold_in(key, path)``).
      majority_sign: TIES's sign election, ``"total"`` (sign of the sum) or ``"frequency"`` (of the
        sign count).

    Returns:
      A LoRA tree with ``scale = 1`` for every module.

    Raises:
      ValueError: for an unknown method, mismatched weights, a missing ``density`` or ``key``,
        different ranks where a method needs them equal, adapters made for different weights, or a
        ``rank`` larger than a weight allows.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((8, 6))}
      >>> one = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> two = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=3))
      >>> jaxlora.combine([one, two], [1.0, 0.5], method="cat")["w"].rank
      5
    """
    problems = []
    if method not in METHODS:
        problems.append(f"method must be one of {METHODS}, got {method!r}.")
    if len(adapters) != len(weights) or not adapters:
        problems.append(f"give one weight per adapter: {len(adapters)} adapters but {len(weights)} weights.")
    base = method.removesuffix("_svd") if method != "svd" else "linear"
    if base in _NEEDS_DENSITY and (density is None or not 0 <= density):
        problems.append(f"method {method!r} needs density= (the fraction of entries kept, in [0, 1]), got {density!r}.")
    if base.startswith("dare") and key is None:
        problems.append(f"method {method!r} drops entries at random: pass key=jax.random.key(...).")
    if majority_sign not in ("total", "frequency"):
        problems.append(f'majority_sign must be "total" or "frequency", got {majority_sign!r}.')
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        problems.append(f"rank must be a positive int, got {rank!r}.")
    if problems:
        raise ValueError("jaxlora.combine:\n  " + "\n  ".join(problems))
    paths = list(dict.fromkeys(p for adapter in adapters for p in adapter))
    out: Lora = {}
    for path in paths:
        have = [(adapter[path], float(w)) for adapter, w in zip(adapters, weights) if path in adapter]
        fs = [f for f, _ in have]
        first = fs[0]
        if any(isinstance(f, SavedModule) for f in fs):  # as PEFT: a full copy passes through, unweighted
            if len(fs) > 1:
                problems.append(f"{path!r}: {len(fs)} adapters train this module in full (modules_to_save); keep one.")
            else:
                out[path] = first
            continue
        shapes = {
            (
                f.roles,
                tuple(f.a.shape[:-1]),
                tuple(f.b.shape[: f.roles.count("s")]),
                f.b.shape[f.roles.count("s") + 1 :],
            )
            for f in fs
        }
        if len(shapes) > 1 or any(not isinstance(f, LoraFactors) for f in fs):
            problems.append(
                f"{path!r}: the adapters were made for different weights (roles and shapes {sorted(shapes)})."
            )
            continue
        if any(f.m is not None for f in fs):  # m / ‖W + ΔW‖ rescales the base too: no sum of ΔWs gives it
            problems.append(
                f"{path!r}: DoRA adapters (a magnitude m) cannot be combined: m / ‖W + ΔW‖ rescales W as well, "
                "so no weighted sum of their ΔW reproduces them; merge each (jaxlora.merge) or combine plain LoRAs."
            )
            continue
        ranks = [f.rank for f in fs]
        if method in _MERGES and len(set(ranks)) > 1:
            problems.append(f"{path!r}: method {method!r} needs equal ranks, got {ranks}; use 'cat' or 'svd'.")
            continue
        dtype = jnp.result_type(*(f.a.dtype for f in fs))
        layers = [_layers(f) for f in fs]
        scaled = jnp.asarray([w * f.scale for f, w in have], jnp.float32)
        if base.startswith("dare"):
            k = jax.random.fold_in(key, path_seed(path))
            keys = list(jax.random.split(k, 2 * len(fs)))
        else:
            keys = [None] * (2 * len(fs))
        if method == "cat":
            a = jnp.concatenate([x * s for (x, _, _), s in zip(layers, scaled)], axis=-1)
            b = jnp.concatenate([y for _, y, _ in layers], axis=-2)
        elif method in _MERGES:
            sign = jnp.where(scaled >= 0, 1.0, -1.0)
            root = jnp.sqrt(jnp.abs(scaled))
            a = _merge([x for x, _, _ in layers], sign * root, method, density, majority_sign, keys[0::2])
            b = _merge([y for _, y, _ in layers], root, method, density, majority_sign, keys[1::2])
        else:
            deltas = [f.scale * (x @ y) for f, (x, y, _) in zip(fs, layers)]
            d = _merge(deltas, jnp.asarray([w for _, w in have], jnp.float32), base, density, majority_sign, keys[0::2])
            r = rank or max(ranks)
            if r > min(d.shape[1:]):
                problems.append(f"{path!r}: rank {r} exceeds min(inputs, outputs) = {min(d.shape[1:])} of the weight.")
                continue
            u, s, vt = jnp.linalg.svd(d, full_matrices=False)
            a, b = u[..., :r], s[:, :r, None] * vt[:, :r]
        out[path] = _unlayer(a, b, first, dtype)
    if problems:
        raise ValueError("jaxlora.combine:\n  " + "\n  ".join(problems))
    return out
