"""The base fingerprint: paths, shapes, dtypes and leaf names of the weights an adapter was made for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .._matmul import LoraFactors
from .._quant import is_quantized
from .._tree import nearest, weights

Fingerprint = dict[str, dict[str, Any]]


def fingerprint(params: Any, lora: Mapping[str, LoraFactors]) -> Fingerprint:
    """The fingerprint of the base weights that ``lora`` adapts: ``{path: {"shape", "dtype", "name"}}``.

    ``params`` may be abstract (``jax.eval_shape`` output); only shapes and dtypes are read. ``name`` is
    the weight's own leaf name (``"kernel"``, ``"embedding"``), which tells exporters a lookup table from
    a matmul weight. A weight of a quantized base (`jaxlora.quantize`) adds ``"quantized"``:
    ``{"format": "nf4", "block_size": 64, "double_quant": True}`` (or ``{"format": "int8"}``).

    Raises:
      ValueError: naming every path of ``lora`` that is not an adaptable weight of ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"params": {"dense": {"kernel": jnp.ones((4, 6))}}}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> jaxlora.checkpoint.fingerprint(params, lora)
      {'dense': {'shape': [4, 6], 'dtype': 'float32', 'name': 'kernel'}}
    """
    lora = {p: f for p, f in lora.items() if isinstance(f, LoraFactors)}  # saved modules are checked by shape
    found = weights(params)
    missing = [f"{p!r}: not an adaptable weight of params; {nearest(p, found)}" for p in lora if p not in found]
    if missing:
        raise ValueError("The LoRA tree does not fit params:\n  " + "\n  ".join(missing))
    out: Fingerprint = {}
    for p in lora:
        leaf = found[p].leaf
        out[p] = {"shape": [int(d) for d in leaf.shape], "dtype": str(jnp.dtype(leaf.dtype)), "name": found[p].name}
        if is_quantized(leaf):  # trained on a quantized base: how it was quantized
            out[p]["quantized"] = leaf.describe()
    return out


def check(expected: Fingerprint, params: Any, *, source: str = "the adapter") -> None:
    """Raise if ``params`` lack a weight of the fingerprint ``expected`` or its shape differs.

    Dtypes may differ (a float32-trained adapter applies to a bfloat16 base).

    Raises:
      ValueError: listing every mismatching path, first ones first, with what was expected and found.

    Example:
      >>> import jax.numpy as jnp
      >>> fp = {"dense": {"shape": [4, 6], "dtype": "float32", "name": "kernel"}}
      >>> check(fp, {"params": {"dense": {"kernel": jnp.ones((4, 6))}}})
      >>> check(fp, {"params": {"dense": {"kernel": jnp.ones((4, 5))}}})
      Traceback (most recent call last):
      ...
      ValueError: ...'dense': shape [4, 6] expected, found [4, 5]...
    """
    found = weights(params)
    problems = []
    for path, want in expected.items():
        if path not in found:
            problems.append(f"{path!r}: missing from params; {nearest(path, found)}")
            continue
        shape = [int(d) for d in found[path].leaf.shape]
        if shape != list(want["shape"]):
            problems.append(f"{path!r}: shape {list(want['shape'])} expected, found {shape}")
    if problems:
        raise ValueError(
            f"{source} was made for another base model ({len(problems)} of {len(expected)} adapted weights differ):\n  "
            + "\n  ".join(problems)
            + "\nLoad the base model the adapter was trained on."
        )
