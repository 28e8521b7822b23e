"""A `LoraStack` on disk (Orbax), and many PEFT adapter directories read into one stack.

A stack checkpoint holds two Orbax items: ``lora_stack`` (every module's ``a`` and ``b`` arrays,
keyed ``m0``, ``m1``, ... as in `save`) and ``lora_stack_meta`` (JSON: format, version, the adapters'
names, whether scales are folded, each module's path, roles, dropout, shapes and its adapters'
scales and ranks, the base fingerprint). Version 1 stored scales and ranks as float32 arrays in
``lora_stack``; they are read, validated, into the static metadata.
It is written with the protocol of `_commit` (beside, checksummed, renamed in), and verified and read from
one commit (`_commit.read`).
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
from .._version import __version__
from . import _commit, _fingerprint
from ._info import module_problems
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
      overwrite: replace an existing stack checkpoint (and nothing else), as `save` does.

    Returns:
      The checkpoint's path.

    Raises:
      FileExistsError: if ``directory`` exists and ``overwrite`` is false.
      ValueError: if ``overwrite`` would replace something that is not a jaxlora stack checkpoint.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile
      >>> params = {"w": jnp.ones((4, 6))}
      >>> one = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> path = jaxlora.checkpoint.save_stack(tempfile.mkdtemp() + "/s", jaxlora.stack({"one": one}), params=params)
      >>> jaxlora.checkpoint.restore_stack(path, params=params).names
      ('one',)
    """
    if not isinstance(stk, LoraStack):
        raise TypeError(f"save_stack saves a jaxlora.LoraStack, got {type(stk).__name__}; use save for one adapter.")
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
    with _commit.committing(directory, kind="stack", overwrite=overwrite, collective=True) as staging:
        _checkpointer().save(staging, args=items)
    return Path(directory).absolute()


def restore_stack(directory: str | os.PathLike, *, params: Any = None, sharding: Any = None) -> LoraStack:
    """Load a stack saved by `save_stack`.

    Args:
      directory: the checkpoint directory.
      params: the base parameters (may be abstract): checked against the saved fingerprint.
      sharding: a ``jax.sharding.Sharding`` to read every array into (default: the first device).

    Raises:
      FileNotFoundError: if ``directory`` does not exist.
      CheckpointReplacedError: if saves to ``directory`` replaced it during each of three attempts to read it.
      CorruptCheckpointError: if a file differs from what was saved, or the metadata contradicts itself.
      ValueError: for a directory that is not a stack checkpoint, a newer format, or another base.
    """
    return _commit.read(Path(directory).absolute(), "stack", lambda commit: _restore(commit, params, sharding), _legacy)


def _restore(commit: _commit.Commit, params: Any, sharding: Any) -> LoraStack:
    path, meta = _stack_meta(commit)
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
    try:
        out = _checkpointer().restore(path, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(target)}))
        out = out[ARRAYS]
    except Exception as e:  # Orbax/TensorStore raise many types for damaged files
        raise _commit.CorruptCheckpointError(
            f"{path} is truncated or corrupt: reading its arrays failed ({type(e).__name__}: {str(e)[:300]}); "
            "restore an earlier checkpoint or save again."
        ) from e
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


def _legacy(p: Path) -> bool:
    try:
        _check(p, json.loads((p / META / "metadata").read_text()))
    except (OSError, ValueError):
        return False
    return (p / ARRAYS).is_dir()


def read_stack_meta(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The stack checkpoint at ``directory`` (or the leftover an interrupted overwrite left), verified
    against its manifest, and its metadata, checked against itself."""
    return _commit.read(Path(directory).absolute(), "stack", _stack_meta, _legacy)


def _stack_meta(commit: _commit.Commit) -> tuple[Path, dict[str, Any]]:
    path = commit.root
    if not path.exists():
        raise FileNotFoundError(f"No stack checkpoint at {path}: it does not exist.")
    verified = path.is_dir() and commit.verify()
    meta_file = path / META / "metadata"
    if not meta_file.is_file():
        hint = "use jaxlora.checkpoint.restore for one adapter" if (path / "lora_meta").exists() else "no metadata"
        raise ValueError(f"{path} is not a jaxlora stack checkpoint ({META}/metadata is missing: {hint}).")
    try:
        meta = json.loads(commit.read_bytes(f"{META}/metadata"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _commit.CorruptCheckpointError(
            f"{path} is corrupt: {META}/metadata is not valid JSON ({e}); restore an earlier checkpoint or save again."
        ) from None
    _check(path, meta)
    if not verified:
        _commit.warn_unverified(path, "the stack")
    return path, meta


def _check(path: Path, meta: Any) -> None:
    """Check a stack's metadata against itself; every problem in one error (never a raw KeyError)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} is not a jaxlora stack checkpoint: format {found!r}, expected {FORMAT!r}.")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this jaxlora reads "
            f"{FORMAT!r} up to version {VERSION}."
        )
    names, modules, problems = meta.get("names"), meta.get("modules"), []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        problems.append(f"'names' {names!r} is not a list of distinct adapter names")
    if not isinstance(meta.get("base"), (dict, type(None))):
        problems.append(f"'base' is {type(meta.get('base')).__name__}, not a fingerprint dict or null")
    if not isinstance(modules, list):
        problems.append(f"'modules' is {type(modules).__name__}, not a list")
        modules = []
    n = len(names) if isinstance(names, list) else None
    for i, m in enumerate(modules):
        where = m.get("path", f"#{i}") if isinstance(m, dict) else f"#{i}"
        if isinstance(m, dict) and not isinstance(m.get("path"), str):
            problems.append(f"module #{i}: 'path' {m.get('path')!r} is not a module path")
        problems += module_problems(where, m, adapters=n)
    if problems:
        raise _commit.CorruptCheckpointError(
            f"{path} is damaged: its {META} item does not hold up; restore an earlier checkpoint or save again:\n  "
            + "\n  ".join(problems[:8])
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
