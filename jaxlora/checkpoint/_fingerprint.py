"""The base fingerprint: paths, shapes, dtypes and layouts (leaf names, roles) of the weights an adapter fits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .._matmul import LoraFactors
from .._quantized import is_quantized
from .._tree import nearest, weights

Fingerprint = dict[str, dict[str, Any]]


def fingerprint(params: Any, lora: Mapping[str, LoraFactors]) -> Fingerprint:
    """The fingerprint of the base weights that ``lora`` adapts: ``{path: {"shape", "dtype", "name", "roles"}}``.

    ``params`` may be abstract (``jax.eval_shape`` output); only shapes and dtypes are read. ``name`` is
    the weight's own leaf name (``"kernel"``, ``"embedding"``, ``"weight"``), which tells exporters a
    lookup table from a matmul weight; with ``roles`` (the factors' roles: which axes of the weight are
    input, output and stacked) it is the layout that `check` compares. A weight of a quantized base
    (`jaxlora.quantize`) adds ``"quantized"``:
    ``{"format": "nf4", "block_size": 64, "double_quant": True}`` (or ``{"format": "int8"}``).

    Raises:
      ValueError: naming every path of ``lora`` that is not an adaptable weight of ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"params": {"dense": {"kernel": jnp.ones((4, 6))}}}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> jaxlora.checkpoint.fingerprint(params, lora)
      {'dense': {'shape': [4, 6], 'dtype': 'float32', 'name': 'kernel', 'roles': 'io'}}
    """
    lora = {p: f for p, f in lora.items() if isinstance(f, LoraFactors)}  # saved modules are checked by shape
    found = weights(params)
    missing = [f"{p!r}: not an adaptable weight of params; {nearest(p, found)}" for p in lora if p not in found]
    if missing:
        raise ValueError("The LoRA tree does not fit params:\n  " + "\n  ".join(missing))
    out: Fingerprint = {}
    for p in lora:
        leaf = found[p].leaf
        out[p] = {
            "shape": [int(d) for d in leaf.shape],
            "dtype": str(jnp.dtype(leaf.dtype)),
            "name": found[p].name,
            "roles": lora[p].roles,
        }
        if is_quantized(leaf):  # trained on a quantized base: how it was quantized
            out[p]["quantized"] = leaf.describe()
    return out


def check(expected: Fingerprint, params: Any, *, source: str = "the adapter") -> None:
    """Raise if ``params`` lack a weight of the fingerprint ``expected``, or its shape or layout differs.

    Dtypes may differ (a float32-trained adapter applies to a bfloat16 base). The layout is compared
    as `layout_problem` says; a fingerprint without leaf names (older files) is checked by shape alone.

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
            quantized = (
                f" (it was a {want['quantized']['format']}-quantized weight: params must hold the jaxlora.Quantized "
                "node; an Orbax checkpoint of jaxlora.quantize's output restored without a target holds only its "
                "codes and scales, so restore it onto jax.eval_shape(lambda: jaxlora.quantize(float_params, ...)))"
                if isinstance(want.get("quantized"), dict)
                else ""
            )
            problems.append(f"{path!r}: missing from params; {nearest(path, found)}{quantized}")
            continue
        shape = [int(d) for d in found[path].leaf.shape]
        if shape != list(want["shape"]):
            problems.append(f"{path!r}: shape {list(want['shape'])} expected, found {shape}")
        elif problem := layout_problem(path, want, found[path].name):
            problems.append(problem)
    if problems:
        raise ValueError(
            f"{source} was made for another base model ({len(problems)} of {len(expected)} adapted weights differ):\n  "
            + "\n  ".join(problems)
            + "\nLoad the base model the adapter was trained on."
        )


def default_roles(name: str, ndim: int) -> str | None:
    """The roles a weight's leaf name implies, as `jaxlora.init` decides them without ``fn``: a 2-D
    ``weight`` is PyTorch's / Equinox's ``(out, in)``, any other 2-D leaf Flax's ``(in, out)``; with
    more axes the name does not tell (``None``)."""
    if ndim != 2:
        return None
    return "oi" if name == "weight" else "io"


def layout_problem(path: str, want: Mapping[str, Any], name: str) -> str | None:
    """A sentence if the weight ``name`` at ``path`` is laid out otherwise than the fingerprint ``want``.

    The same leaf name is the same layout. Another name passes only when both layouts are known and
    agree (``kernel`` and ``embedding`` are both ``(in, out)``): a square Flax ``kernel`` ``(in, out)``
    and a PyTorch ``weight`` ``(out, in)`` have one shape, and factors made for one would merge
    transposed into the other. ``want`` without ``roles`` (older fingerprints) gets the roles its name implies.

    Example:
      >>> layout_problem("fc", {"shape": [4, 4], "name": "kernel", "roles": "io"}, "weight")[:45]
      "'fc': the adapter was made for a 'kernel' lea"
    """
    made_for = want.get("name")
    if made_for is None or made_for == name:
        return None
    ndim = len(want["shape"])
    roles, here = want.get("roles") or default_roles(made_for, ndim), default_roles(name, ndim)
    if roles is not None and roles == here:
        return None
    return (
        f"{path!r}: the adapter was made for a {made_for!r} leaf laid out {_axes(roles)}, but params hold a "
        f"{name!r} laid out {_axes(here)}; its factors would merge transposed. Load the base in the layout the "
        "adapter was made for, or re-lay the factors out through the PEFT format, which names input and output: "
        "jaxlora.checkpoint.save_peft(d, lora), then jaxlora.checkpoint.load_peft(d, params=params)"
    )


def _axes(roles: str | None) -> str:
    names = {"i": "in", "o": "out", "s": "stacked"}
    return "(axes unknown)" if roles is None else f"({', '.join(names.get(c, c) for c in roles)})"
