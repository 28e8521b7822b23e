"""What a saved adapter is, without its arrays: the lower module that `_orbax` and `_peft` both use."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from .._config import LoraConfig


class AdapterInfo(NamedTuple):
    """What a saved adapter holds, read without loading its arrays (see `info`).

    Attributes:
      format: ``"orbax"`` or ``"peft"``.
      version: the format version (jaxlora's, or PEFT's ``peft_version`` string).
      config: the `LoraConfig` fields as a dict, or ``None`` when unknown.
      modules: ``{path: {"rank", "scale", "roles", "dropout", "a_shape", "b_shape", "dtype"}}``; a saved
        module (``modules_to_save``): ``{path: {"kind": "saved", "leaves": {name: {"shape", "dtype"}}}}``.
      base: the base fingerprint ``{path: {"shape", "dtype", "name"}}``, or ``None`` when unknown.
      size_bytes: bytes on disk.
    """

    format: str
    version: Any
    config: dict[str, Any] | None
    modules: dict[str, dict[str, Any]]
    base: dict[str, dict[str, Any]] | None
    size_bytes: int

    @property
    def trainable(self) -> int:
        """The number of LoRA parameters."""
        return sum(
            sum(int(np.prod(w["shape"])) for w in m["leaves"].values())
            if m.get("kind") == "saved"
            else sum(int(np.prod(m[f"{k}_shape"])) for k in ("a", "b", "m") if f"{k}_shape" in m)
            for m in self.modules.values()
        )


def config_to_json(config: LoraConfig) -> dict[str, Any]:
    """`LoraConfig` fields as JSON-able values (patterns as dicts, dtype as its name)."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["targets"] = out["targets"] if isinstance(out["targets"], str) else list(out["targets"])
    out["exclude"] = list(out["exclude"])
    out["modules_to_save"] = list(out["modules_to_save"])
    out["rank_pattern"] = dict(out["rank_pattern"])
    out["alpha_pattern"] = dict(out["alpha_pattern"])
    out["dtype"] = jnp.dtype(out["dtype"]).name
    return out


def config_from_json(fields: Mapping[str, Any]) -> LoraConfig:
    """The inverse of `config_to_json`."""
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in fields.items() if k in names})


def _ints(x: Any) -> bool:
    return isinstance(x, list) and all(type(d) is int and d >= 0 for d in x)


def _dtype_ok(name: Any) -> bool:
    try:
        jnp.dtype(name)
    except (TypeError, ValueError):
        return False
    return isinstance(name, str)


def module_problems(path: Any, m: Any, *, adapters: int | None = None) -> list[str]:
    """What is wrong with one module's saved metadata, checked against itself (empty if nothing).

    Roles only from ``s``, ``i``, ``o``; ``a (*S, *I, r)`` and ``b (*S, r, *O)`` (a stack of ``adapters``:
    ``a (*S, *I, n, R)``, ``b (*S, n, R, *O)``) consistent with the roles and the rank; ``0 <= dropout < 1``;
    a finite scale (one adapter's; a stack's scales and ranks are checked by `_stack`).
    """
    where = f"module {path!r}"
    if not isinstance(m, dict):
        return [f"{where}: {type(m).__name__} where a dict is due"]
    if m.get("kind") == "saved":
        leaves = m.get("leaves")
        if not isinstance(leaves, dict) or not all(
            isinstance(w, dict) and _ints(w.get("shape")) and _dtype_ok(w.get("dtype")) for w in leaves.values()
        ):
            return [f"{where}: saved module leaves {leaves!r} are not {{name: {{shape, dtype}}}}"]
        return []
    problems = [f"{where}: {k!r} missing" for k in ("roles", "dropout", "a_shape", "b_shape", "dtype") if k not in m]
    if problems:
        return problems
    roles, dropout, a, b = m["roles"], m["dropout"], m["a_shape"], m["b_shape"]
    if not isinstance(roles, str) or not roles or set(roles) - set("sio") or "i" not in roles or "o" not in roles:
        return [f"{where}: roles {roles!r} are not axes from {{s, i, o}} with an i and an o"]
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        problems.append(f"{where}: dropout {dropout!r} is not in [0, 1)")
    single = adapters is None  # a stack's scales and ranks are lists, which `_stack` checks
    if single and "scale" in m and (not isinstance(m["scale"], (int, float)) or not math.isfinite(m["scale"])):
        problems.append(f"{where}: scale {m['scale']!r} is not a finite number")
    for k in ("dtype", "b_dtype", "m_dtype"):
        if k in m and not _dtype_ok(m[k]):
            problems.append(f"{where}: {k} {m[k]!r} is no dtype")
    if not (_ints(a) and _ints(b)):
        return [*problems, f"{where}: shapes {a!r}, {b!r} are not lists of sizes"]
    n = 0 if adapters is None else 1
    ns, ni, no = (roles.count(c) for c in "sio")
    if len(a) != ns + ni + n + 1 or len(b) != ns + n + 1 + no:
        want = "a: *S, *I, r; b: *S, r, *O" if adapters is None else "a: *S, *I, n, R; b: *S, n, R, *O"
        return [*problems, f"{where}: a {a} and b {b} do not have the axes roles {roles!r} give ({want})"]
    r = a[-1]
    if b[ns + n] != r or a[:ns] != b[:ns] or (single and "rank" in m and m["rank"] != r):
        problems.append(f"{where}: a {a}, b {b} and rank {m.get('rank', r)} disagree on the rank or stacked axes")
    if adapters is not None and a[-2] != adapters or b[ns : ns + n] != a[-1 - n : -1]:
        problems.append(f"{where}: a {a} and b {b} do not hold {adapters} adapters")
    if "m_shape" in m and m["m_shape"] != a[:ns] + b[ns + 1 :]:
        problems.append(f"{where}: DoRA magnitude {m['m_shape']} is not (*S, *O) of a {a} and b {b}")
    return problems
