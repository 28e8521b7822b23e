"""A `LoraStack` on disk (Orbax), and many PEFT adapter directories read into one stack.

A stack checkpoint holds two Orbax items: ``lora_stack`` (every module's ``a`` and ``b`` arrays,
keyed ``m0``, ``m1``, ... as in `save`) and ``lora_stack_meta`` (JSON: format, version, the adapters'
names, whether scales are folded, each module's path, roles, dropout, shapes and its adapters'
scales and ranks, the base fingerprint). Version 1 stored scales and ranks as float32 arrays in
``lora_stack``; they are read, validated, into the static metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .._stack import LoraStack, stack
from . import _fingerprint
from ._peft import PARAMETER_ORDER, Names, load_peft

FORMAT = "jaxlora.stack"
VERSION = 2  # 1: scale and rank were float32 arrays in ARRAYS
ARRAYS, META = "lora_stack", "lora_stack_meta"
FIELDS = ("a", "b")


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_stack(directory: str | os.PathLike, stk: LoraStack, *, params: Any = None, overwrite: bool = False) -> Path:
    """Save a `LoraStack` (not the base) as an Orbax checkpoint in ``directory``.

    Args:
      directory: where to write; must not exist unless ``overwrite=True``.
      stk: the stack.
      params: the base parameters (may be abstract), recorded as a fingerprint that `restore_stack`
        checks (optional).
      overwrite: replace an existing checkpoint.

    Returns:
      The checkpoint's path.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile
      >>> params = {"w": jnp.ones((4, 6))}
      >>> one = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> path = jaxlora.checkpoint.save_stack(tempfile.mkdtemp() + "/s", jaxlora.stack({"one": one}), params=params)
      >>> jaxlora.checkpoint.restore_stack(path, params=params).names
      ('one',)
    """
    from .. import __version__

    if not isinstance(stk, LoraStack):
        raise TypeError(f"save_stack saves a jaxlora.LoraStack, got {type(stk).__name__}; use save for one adapter.")
    path = Path(directory).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another directory.")
    roles, dropout = dict(stk.roles), dict(stk.dropout)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "jaxlora_version": __version__,
        "names": list(stk.names),
        "folded": stk.folded,
        "modules": [
            {
                "path": p,
                "roles": roles[p],
                "dropout": dropout[p],
                "a_shape": list(stk.a[p].shape),
                "b_shape": list(stk.b[p].shape),
                "dtype": jnp.dtype(stk.a[p].dtype).name,
                "b_dtype": jnp.dtype(stk.b[p].dtype).name,
                "scale": list(stk.scale[p]),
                "rank": list(stk.rank[p]),
            }
            for p in stk.paths
        ],  # fmt: skip
        "base": None if params is None else _fingerprint.fingerprint(params, {p: stk.factors(p) for p in stk.paths}),
    }
    arrays = {f"m{i}": {k: getattr(stk, k)[p] for k in FIELDS} for i, p in enumerate(stk.paths)}
    items = ocp.args.Composite(**{ARRAYS: ocp.args.StandardSave(arrays), META: ocp.args.JsonSave(meta)})
    _checkpointer().save(path, args=items, force=overwrite)
    return path


def restore_stack(directory: str | os.PathLike, *, params: Any = None, sharding: Any = None) -> LoraStack:
    """Load a stack saved by `save_stack`.

    Args:
      directory: the checkpoint directory.
      params: the base parameters (may be abstract): checked against the saved fingerprint.
      sharding: a ``jax.sharding.Sharding`` to read every array into (default: the first device).

    Raises:
      FileNotFoundError: if ``directory`` does not exist.
      ValueError: for a directory that is not a stack checkpoint, a newer format, or another base.
    """
    path = Path(directory).absolute()
    if not path.exists():
        raise FileNotFoundError(f"No stack checkpoint at {path}: it does not exist.")
    meta_file = path / META / "metadata"
    if not meta_file.is_file():
        hint = "use jaxlora.checkpoint.restore for one adapter" if (path / "lora_meta").exists() else "no metadata"
        raise ValueError(f"{path} is not a jaxlora stack checkpoint ({META}/metadata is missing: {hint}).")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this jaxlora reads "
            f"{FORMAT!r} up to version {VERSION}."
        )
    if params is not None and meta["base"] is not None:
        _fingerprint.check(meta["base"], params, source=f"The stack at {path}")
    n, old = len(meta["names"]), meta["version"] < 2
    target = {}
    for i, m in enumerate(meta["modules"]):
        target[f"m{i}"] = {
            "a": jax.ShapeDtypeStruct(tuple(m["a_shape"]), jnp.dtype(m["dtype"]), sharding=sharding),
            "b": jax.ShapeDtypeStruct(tuple(m["b_shape"]), jnp.dtype(m["b_dtype"]), sharding=sharding),
        }
        if old:  # version 1: each module's scales and ranks as float32 arrays beside its factors
            target[f"m{i}"].update(
                scale=jax.ShapeDtypeStruct((n,), jnp.float32), rank=jax.ShapeDtypeStruct((n,), jnp.float32)
            )
    out = _checkpointer().restore(path, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(target)}))[ARRAYS]
    mods = meta["modules"]
    fields = {k: {m["path"]: out[f"m{i}"][k] for i, m in enumerate(mods)} for k in FIELDS}
    folded = meta.get("folded", False)
    held = [out[f"m{i}"] if old else m for i, m in enumerate(mods)]
    scale, rank = _scales_and_ranks(path, mods, held, n, folded)
    return LoraStack(
        **fields,
        scale=scale,
        rank=rank,
        names=tuple(meta["names"]),
        roles=tuple((m["path"], m["roles"]) for m in mods),
        dropout=tuple((m["path"], float(m["dropout"])) for m in mods),
        folded=folded,
    )


def _scales_and_ranks(path: Path, mods: list[dict], held: list[Any], n: int, folded: Any) -> tuple[dict, dict]:
    """Each module's scales and ranks (``held[i]``: its JSON entry, or its arrays in a version-1
    checkpoint), validated: ``n`` finite scales and ``n`` whole ranks in ``[0, slot rank]``; in a
    folded stack every scale 1.0 and every rank the slot rank."""
    scale, rank, problems = {}, {}, []
    if not isinstance(folded, bool):
        problems.append(f"folded {folded!r}, expected true or false")
    for m, h in zip(mods, held):
        s, r, R = _numbers(h.get("scale"), n), _numbers(h.get("rank"), n), m["a_shape"][-1]
        if s is None:
            problems.append(f"{m['path']!r}: scale {h.get('scale')!r}, expected {n} finite numbers")
        if r is None or not ((r == np.round(r)) & (r >= 0) & (r <= R)).all():
            problems.append(f"{m['path']!r}: rank {h.get('rank')!r}, expected {n} whole numbers in [0, {R}]")
        elif s is not None and folded is True and not ((s == 1.0).all() and (r == R).all()):
            problems.append(f"{m['path']!r}: a folded stack has scale 1.0 and rank {R} in every slot")
        elif s is not None:
            scale[m["path"]], rank[m["path"]] = s.tolist(), [int(x) for x in r]
    if problems:
        raise ValueError(
            f"The stack at {path} has invalid scales or ranks (a damaged checkpoint, or ranks an optimizer "
            "changed before it was saved):\n  " + "\n  ".join(problems)
        )
    return scale, rank


def _numbers(x: Any, n: int) -> np.ndarray | None:
    """``x`` (a JSON list of numbers, or a version-1 array) as ``n`` finite float64 numbers, or None."""
    if isinstance(x, list) and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in x):
        x = np.asarray(x, np.float64)
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.number):
        return None
    v = x.astype(np.float64)
    return v if v.shape == (n,) and np.isfinite(v).all() else None


def load_peft_stack(
    directories: Mapping[str, str | os.PathLike],
    *,
    params: Any = None,
    names: Names = None,
    fn: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
    rank: int | None = None,
    dtype: Any = None,
    parameter_order: Sequence[str] = PARAMETER_ORDER,
) -> LoraStack:
    """Read many PEFT adapter directories (ranks, alphas and targets may differ) into one stack.

    Args:
      directories: ``{adapter name: PEFT adapter directory}``; the names become ``stack.names``.
      params, names, fn, args, parameter_order: as in `load_peft` (each directory is read with them).
      rank, dtype: as in `jaxlora.stack`.

    Returns:
      ``jaxlora.stack({name: load_peft(directory, ...)}, rank=rank, dtype=dtype)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile
      >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 6))}}}
      >>> dirs = {f"r{r}": jaxlora.checkpoint.save_peft(tempfile.mkdtemp(), jaxlora.init(
      ...     jax.random.key(r), params, jaxlora.LoraConfig(rank=r)), params=params) for r in (1, 2)}
      >>> jaxlora.checkpoint.load_peft_stack(dirs, params=params).rank["fc"]
      (1, 2)
    """
    adapters = {
        name: load_peft(d, params=params, names=names, fn=fn, args=args, dtype=dtype, parameter_order=parameter_order)
        for name, d in directories.items()
    }
    return stack(adapters, rank=rank, dtype=dtype)
