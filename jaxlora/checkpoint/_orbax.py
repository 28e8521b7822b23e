"""Adapter checkpoints in Orbax's format: the LoRA arrays plus a JSON item with everything else.

A checkpoint directory holds two Orbax items: ``lora`` (the arrays ``a`` and ``b`` of every module, in
Orbax's OCDBT format) and ``lora_meta`` (JSON: format name and version, each module's path, rank, scale,
roles and dropout, the `LoraConfig` it was made with, and the base fingerprint). The static fields of
`LoraFactors` are no pytree leaves, so they travel in the JSON and `restore` rebuilds the factors.
Every save goes through `_commit.committing`: written beside ``directory``, checksummed in
``jaxlora_manifest.json``, then renamed into place; `restore` and `info` verify the manifest before
reading anything and check the JSON item against itself, all from one commit (`_commit.read`: a save
racing the read makes it read again, never mix the two). The JSON item also holds the SHA-256 of each
array's values (`_digests`), checked once they are read: a ``CheckpointManager`` step, which Orbax
writes and no manifest covers, is verified too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .._config import LoraConfig
from .._matmul import LoraFactors
from .._saved import SavedModule
from .._version import __version__
from . import _commit, _fingerprint
from ._info import AdapterInfo as AdapterInfo
from ._info import config_from_json as config_from_json
from ._info import config_to_json as config_to_json
from ._info import module_problems
from ._peft import peft_info  # _peft never imports this module: no circle

FORMAT = "jaxlora.adapter"
VERSION = 1
ARRAYS = "lora"  # the Orbax item names; a CheckpointManager may hold other items next to them
META = "lora_meta"
Lora = dict[str, LoraFactors]
PathLike = str | os.PathLike


def metadata(
    lora: Mapping[str, LoraFactors],
    *,
    config: LoraConfig | None = None,
    params: Any = None,
    fingerprint: _fingerprint.Fingerprint | None = None,
) -> dict[str, Any]:
    """The JSON item saved next to the arrays (format, version, modules, config, base fingerprint)."""
    if not isinstance(lora, Mapping) or not all(isinstance(f, (LoraFactors, SavedModule)) for f in lora.values()):
        raise TypeError("lora must be the dict of LoraFactors that jaxlora.init returns.")
    saved = {
        path: {
            "kind": "saved",
            "leaves": {
                n: {"shape": list(map(int, w.shape)), "dtype": jnp.dtype(w.dtype).name} for n, w in f.weights.items()
            },
        }
        for path, f in lora.items()
        if isinstance(f, SavedModule)
    }
    modules = {
        path: saved[path]
        if path in saved
        else {
            "rank": int(f.a.shape[-1]),
            "scale": float(f.scale),
            "roles": f.roles,
            "dropout": float(f.dropout),
            "a_shape": [int(d) for d in f.a.shape],
            "b_shape": [int(d) for d in f.b.shape],
            "dtype": jnp.dtype(f.a.dtype).name,
            "b_dtype": jnp.dtype(f.b.dtype).name,
            **({} if f.m is None else {"m_shape": [int(d) for d in f.m.shape], "m_dtype": jnp.dtype(f.m.dtype).name}),
            **({"from_config": True} if _from_config(config, path, f) else {}),
        }
        for path, f in lora.items()
        if path not in saved
    } | saved
    modules = {path: modules[path] for path in lora}  # in the tree's order
    return {
        "format": FORMAT,
        "version": VERSION,
        "jaxlora_version": __version__,
        "modules": modules,
        "config": None if config is None else config_to_json(config),
        "base": _fingerprint.fingerprint(params, lora) if params is not None else fingerprint,
    }


def _from_config(config: LoraConfig | None, path: str, f: LoraFactors) -> bool:
    """Whether ``f``'s scale and rank are ``config``'s for ``path`` (then `restore` checks they still are)."""
    return config is not None and (config.rank_for(path), config.scale_for(path)) == (f.a.shape[-1], float(f.scale))


def _arrays(lora: Mapping[str, LoraFactors]) -> dict[str, dict[str, jax.Array]]:
    # Keyed by position, not path: module paths contain "/", which Orbax would read as nesting.
    return {
        f"m{i}": {f"w{j}": w for j, w in enumerate(f.weights.values())}
        if isinstance(f, SavedModule)
        else {"a": f.a, "b": f.b, **({} if f.m is None else {"m": f.m})}
        for i, f in enumerate(lora.values())
    }


def _digests(arrays: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]] | None:
    """The SHA-256 of each array's bytes (C order, its own dtype), keyed as `_arrays` keys them; None where
    some array is not all on this process (several JAX processes: each holds only its shards)."""
    leaves = [x for entry in arrays.values() for x in entry.values()]
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves):
        return None
    host = jax.device_get({k: dict(v) for k, v in arrays.items()})  # one transfer for the whole tree
    return {
        k: {n: hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for n, x in entry.items()}
        for k, entry in host.items()
    }


def _check_digests(meta: dict[str, Any], arrays: Mapping[str, Any], where: Path | str) -> None:
    """Raise if an array read back differs from the one saved (a flipped bit in a file no manifest covers)."""
    want = meta.get("sha256")
    if not isinstance(want, dict):
        return  # saved before jaxlora recorded them, or by several processes
    got = _digests({k: v for k, v in arrays.items() if isinstance(v, Mapping)})
    if got is None:
        return
    paths = list(meta["modules"])
    bad = [
        f"{paths[int(k[1:])] if k[1:].isdigit() and int(k[1:]) < len(paths) else k!r}.{n}"
        for k, entry in want.items()
        for n, digest in (entry.items() if isinstance(entry, dict) else ())
        if got.get(k, {}).get(n) != digest
    ]
    if bad:
        raise _commit.CorruptCheckpointError(
            f"{where} is damaged: the values read back differ from those saved (SHA-256 recorded at save) for "
            f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; restore an earlier checkpoint or save again."
        )


def save_args(
    lora: Mapping[str, LoraFactors],
    *,
    config: LoraConfig | None = None,
    params: Any = None,
    fingerprint: _fingerprint.Fingerprint | None = None,
) -> dict[str, ocp.args.CheckpointArgs]:
    """Orbax items that save ``lora``, for an ``ocp.args.Composite`` next to your own items.

    Args:
      lora: the LoRA tree.
      config: the `LoraConfig` it was made with (saved for the record and for ``inspect``).
      params: the base parameters (may be abstract); their fingerprint lets `restore` reject another base.
      fingerprint: the base fingerprint itself (``info(path).base``), when params are not at hand.

    Returns:
      ``{"lora": StandardSave, "lora_meta": JsonSave}``. The JSON item records the SHA-256 of every
      array's values (one device-to-host copy of the adapter, here), which `restore_step` checks.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, orbax.checkpoint as ocp
      >>> lora = jaxlora.init(jax.random.key(0), {"w": jnp.ones((4, 6))}, jaxlora.LoraConfig(rank=2))
      >>> sorted(jaxlora.checkpoint.save_args(lora))
      ['lora', 'lora_meta']
    """
    arrays = _arrays(lora)
    meta = metadata(lora, config=config, params=params, fingerprint=fingerprint)
    return {ARRAYS: ocp.args.StandardSave(arrays), META: ocp.args.JsonSave({**meta, "sha256": _digests(arrays)})}


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(
    directory: PathLike,
    lora: Mapping[str, LoraFactors],
    *,
    config: LoraConfig | None = None,
    params: Any = None,
    fingerprint: _fingerprint.Fingerprint | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the LoRA tree (not the base) as an Orbax checkpoint in ``directory``.

    Args:
      directory: where to write; must not exist unless ``overwrite=True``.
      lora: the LoRA tree.
      config: the `LoraConfig` it was made with (optional, recorded).
      params: the base parameters (may be abstract), recorded as a fingerprint (optional).
      fingerprint: the base fingerprint itself, when params are not at hand (optional).
      overwrite: replace an existing adapter checkpoint (and nothing else). The new one is written
        completely beside it, checksummed, and renamed in; a process killed between the two renames
        leaves both complete beside ``directory``, and `restore` uses the new one (with a warning).
        Through a symlink, its target is replaced.

    Returns:
      The checkpoint's path.

    Raises:
      FileExistsError: if ``directory`` exists (or an interrupted overwrite left its checkpoint beside it)
        and ``overwrite`` is false.
      ValueError: if ``overwrite`` would replace something that is not a jaxlora adapter checkpoint.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile
      >>> params = {"w": jnp.ones((4, 6))}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> path = jaxlora.checkpoint.save(tempfile.mkdtemp() + "/adapter", lora, params=params)
      >>> jaxlora.checkpoint.restore(path, params=params)["w"].a.shape
      (4, 2)
    """
    items = ocp.args.Composite(**save_args(lora, config=config, params=params, fingerprint=fingerprint))
    with _commit.committing(directory, kind="adapter", overwrite=overwrite, collective=True) as staging:
        _checkpointer().save(staging, args=items)
    return Path(directory).absolute()


def _legacy(p: Path) -> bool:
    """A complete leftover of a save made before checkpoints had manifests."""
    if not ((p / "_CHECKPOINT_METADATA").is_file() and (p / ARRAYS).is_dir()):
        return False
    try:
        _check_meta(_commit.Commit(p, "adapter"))
    except ValueError:
        return False
    return True


def _read_meta(commit: _commit.Commit, asked: Path) -> dict[str, Any]:
    """The JSON item of the checkpoint a read of ``asked`` found, after checking it is one jaxlora can read, intact."""
    path = commit.root
    if not path.exists():
        raise FileNotFoundError(f"No adapter checkpoint at {path}: it does not exist.")
    if path == asked and (".orbax-checkpoint-tmp" in path.name or ".jaxlora-new-" in path.name):
        raise ValueError(
            f"{path} is an unfinished save (it was interrupted); restore {path.name.split('.jaxlora-')[0]}"
            " or the previous checkpoint instead."
        )
    verified = path.is_dir() and commit.verify()
    meta = _check_meta(commit)
    if not verified and not path.name.isdigit():  # a CheckpointManager's step is Orbax's, and has no manifest
        _commit.warn_unverified(path, "the adapter")
    return meta


def _check_meta(commit: _commit.Commit) -> dict[str, Any]:
    path = commit.root
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not an adapter checkpoint directory.")
    meta_file = path / META / "metadata"
    if not meta_file.is_file():
        if (path / "adapter_config.json").is_file():
            hint = "it is a PEFT adapter: use jaxlora.checkpoint.load_peft"
        elif steps := sorted(p.name for p in path.iterdir() if p.name.isdigit()):
            hint = f"it holds CheckpointManager steps {steps[-5:]}: pass {path / steps[-1]} or use restore_step"
        elif (path / "lora_stack_meta").is_dir():
            hint = "it is a stack of adapters: use jaxlora.checkpoint.restore_stack"
        elif (path / "_CHECKPOINT_METADATA").exists():
            items = sorted(p.name for p in path.iterdir() if p.is_dir())
            hint = f"it is an Orbax checkpoint with items {items}, but without jaxlora's {META!r} item"
        else:
            hint = f"it has no {META}/metadata file"
        raise ValueError(f"{path} is not a jaxlora adapter checkpoint: {hint}.")
    try:
        meta = json.loads(commit.read_bytes(f"{META}/metadata"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _commit.CorruptCheckpointError(
            f"{path} is corrupt: {META}/metadata is not valid JSON ({e}); restore an earlier checkpoint or save again."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} is not a jaxlora adapter checkpoint: format {found!r}, expected {FORMAT!r}.")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise ValueError(
            f"{path} has format version {meta.get('version')!r}, written by a newer jaxlora "
            f"({meta.get('jaxlora_version')}); this jaxlora reads versions up to {VERSION}. Upgrade jaxlora."
        )
    _validate(meta, path)
    return meta


def _validate(meta: dict[str, Any], path: Path) -> None:
    """Check the JSON item against itself; every problem named, in one `CorruptCheckpointError`."""
    modules, problems, config = meta.get("modules"), [], None
    if not isinstance(modules, dict):
        problems.append(f"'modules' is {type(modules).__name__}, not a dict from module path to its metadata")
        modules = {}
    if not isinstance(meta.get("base"), (dict, type(None))):
        problems.append(f"'base' is {type(meta.get('base')).__name__}, not a fingerprint dict or null")
    if meta.get("config") is not None:
        try:
            config = config_from_json(meta["config"])
        except (TypeError, ValueError, AttributeError) as e:
            problems.append(f"'config' is not a valid LoraConfig ({str(e).splitlines()[-1].strip()})")
    for p, m in modules.items():
        problems += module_problems(p, m)
        if isinstance(m, dict) and m.get("from_config") and not problems:
            want = None if config is None else (config.rank_for(p), config.scale_for(p))
            if want != (m.get("rank"), m.get("scale")):
                problems.append(
                    f"module {p!r}: rank {m.get('rank')} and scale {m.get('scale')} were saved as the config's, "
                    f"which gives {want}"
                )
    if problems:
        raise _commit.CorruptCheckpointError(
            f"{path} is damaged: its {META} item does not hold up; restore an earlier checkpoint or save again:\n  "
            + "\n  ".join(problems[:8])
        )


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def info(directory: PathLike) -> AdapterInfo:
    """Describe a saved adapter (Orbax or PEFT format) without loading its arrays.

    Raises:
      FileNotFoundError, ValueError: for a missing, foreign, unfinished, corrupt or too new directory.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile
      >>> lora = jaxlora.init(jax.random.key(0), {"w": jnp.ones((4, 6))}, jaxlora.LoraConfig(rank=2))
      >>> path = jaxlora.checkpoint.save(tempfile.mkdtemp() + "/adapter", lora)
      >>> a = jaxlora.checkpoint.info(path)
      >>> a.format, a.trainable, a.modules["w"]["rank"]
      ('orbax', 20, 2)
    """
    path = Path(directory).absolute()
    peft = path.is_dir() and (path / "adapter_config.json").is_file() and not (path / META).exists()
    if peft or not path.exists() and _commit.leftovers(_commit.resolve(path), "peft"):
        return peft_info(path)

    def read(commit: _commit.Commit) -> AdapterInfo:
        meta = _read_meta(commit, path)
        return AdapterInfo("orbax", meta["version"], meta["config"], meta["modules"], meta["base"], _size(commit.root))

    return _commit.read(path, "adapter", read, _legacy)


def _sharding_for(shardings: Any, path: str, name: str) -> jax.sharding.Sharding | None:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    entry = shardings.get(path) if isinstance(shardings, Mapping) else None
    if entry is None:
        return None
    if isinstance(entry, SavedModule):
        return entry.weights[name]
    return entry.get(name) if isinstance(entry, Mapping) else getattr(entry, name)


def _abstract(meta: dict[str, Any], shardings: Any) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    if shardings is not None and not isinstance(shardings, (Mapping, jax.sharding.Sharding)):
        raise TypeError(
            "shardings must be a jax.sharding.Sharding for every array, or a dict from module path to "
            f"LoraFactors (or {{'a': ..., 'b': ...}}) of shardings; got {type(shardings).__name__}."
        )
    if isinstance(shardings, Mapping) and (extra := sorted(set(shardings) - set(meta["modules"]))):
        raise ValueError(f"shardings name modules the checkpoint lacks: {extra}; it holds {sorted(meta['modules'])}.")
    specs = [
        f"{path!r}.{name}: {s}"
        for path, m in meta["modules"].items()
        for name in (m["leaves"] if m.get("kind") == "saved" else ("a", "b"))
        if (s := _sharding_for(shardings, path, name)) is not None and not isinstance(s, jax.sharding.Sharding)
    ]
    if specs:
        raise TypeError(
            "restore needs a jax.sharding.Sharding for each array, not a PartitionSpec (which names no "
            "devices):\n  " + "\n  ".join(specs[:8]) + "\nPass mesh= to jaxlora.shardings (e.g. "
            "jaxlora.shardings(param_shardings, lora, mesh=mesh)), or wrap each spec in NamedSharding(mesh, spec)."
        )
    return {
        f"m{i}": {
            f"w{j}": jax.ShapeDtypeStruct(
                tuple(w["shape"]), jnp.dtype(w["dtype"]), sharding=_sharding_for(shardings, path, n)
            )
            for j, (n, w) in enumerate(m["leaves"].items())
        }
        if m.get("kind") == "saved"
        else {
            name: jax.ShapeDtypeStruct(
                tuple(m[f"{name}_shape"]),
                jnp.dtype(m["dtype" if name == "a" else f"{name}_dtype"]),
                sharding=_sharding_for(shardings, path, name),
            )
            for name in ("a", "b", "m")
            if f"{name}_shape" in m  # "m": DoRA modules only
        }
        for i, (path, m) in enumerate(meta["modules"].items())
    }


def _rebuild(meta: dict[str, Any], arrays: Mapping[str, Any], where: Path | str) -> Lora:
    lora, problems = {}, []
    for i, (path, m) in enumerate(meta["modules"].items()):
        entry = arrays.get(f"m{i}") if isinstance(arrays, Mapping) else None
        if entry is None:
            problems.append(f"{path!r}: arrays missing")
            continue
        if m.get("kind") == "saved":
            got = {n: entry.get(f"w{j}") for j, n in enumerate(m["leaves"])}
            bad = [n for n, w in got.items() if w is None or list(w.shape) != m["leaves"][n]["shape"]]
            if bad:
                problems.append(f"{path!r}: saved module leaves {bad} missing or of another shape")
            else:
                lora[path] = SavedModule(got)
            continue
        a, b = entry["a"], entry["b"]
        if list(a.shape) != m["a_shape"] or list(b.shape) != m["b_shape"]:
            problems.append(
                f"{path!r}: a {m['a_shape']} and b {m['b_shape']} expected, found {list(a.shape)} and {list(b.shape)}"
            )
            continue
        mag = entry.get("m") if "m_shape" in m else None
        if "m_shape" in m and (mag is None or list(mag.shape) != m["m_shape"]):
            problems.append(f"{path!r}: DoRA magnitude {m['m_shape']} expected, found {getattr(mag, 'shape', None)}")
            continue
        lora[path] = LoraFactors(a=a, b=b, scale=m["scale"], roles=m["roles"], dropout=m["dropout"], m=mag)
    if problems:
        raise ValueError(f"{where} is corrupt (its arrays do not match its metadata):\n  " + "\n  ".join(problems))
    return lora


def restore(directory: PathLike, *, params: Any = None, shardings: Any = None) -> Lora:
    """Load an adapter saved by `save`.

    Args:
      directory: the checkpoint directory.
      params: the base parameters (may be abstract): checked against the saved fingerprint.
      shardings: where to place the arrays: a ``jax.sharding.Sharding`` for all, or a dict from module
        path to `LoraFactors` (or ``{"a": ..., "b": ...}``) of shardings, such as ``jax.tree.map(lambda
        x: x.sharding, lora)``. Each array is read straight into its shards.

    Returns:
      The LoRA tree, with the saved scales, roles and dropout.

    Raises:
      FileNotFoundError: if ``directory`` does not exist.
      CheckpointReplacedError: if saves to ``directory`` replaced it during each of three attempts to read it.
      ValueError: for a foreign, unfinished, corrupt or newer-version checkpoint, or a base whose
        adapted weights have other shapes (naming the mismatching paths).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile
      >>> params = {"w": jnp.ones((4, 6))}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, alpha=4))
      >>> path = jaxlora.checkpoint.save(tempfile.mkdtemp() + "/adapter", lora, params=params)
      >>> jaxlora.checkpoint.restore(path)["w"].scale
      2.0
    """
    asked = Path(directory).absolute()

    def read(commit: _commit.Commit) -> Lora:  # all of one commit (`_commit.read`)
        path, meta = commit.root, _read_meta(commit, asked)
        if params is not None and meta["base"] is not None:
            _fingerprint.check(meta["base"], params, source=f"The adapter at {path}")
        if not (path / ARRAYS).is_dir():
            raise _commit.CorruptCheckpointError(
                f"{path} is corrupt: its {ARRAYS!r} item (the arrays) is missing; restore an earlier checkpoint."
            )
        target = _abstract(meta, shardings)
        try:
            items = ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(target)})
            arrays = _checkpointer().restore(path, args=items)[ARRAYS]
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            raise _commit.CorruptCheckpointError(
                f"{path} is truncated or corrupt: reading its arrays failed ({type(e).__name__}: {str(e)[:300]}); "
                "restore an earlier checkpoint or save again."
            ) from e
        _check_digests(meta, arrays, path)
        return _rebuild(meta, arrays, path)

    return _commit.read(asked, "adapter", read, _legacy)


def restore_step(
    manager: ocp.CheckpointManager,
    step: int | None = None,
    *,
    params: Any = None,
    shardings: Any = None,
    **items: ocp.args.CheckpointArgs,
) -> tuple[Lora, dict[str, Any]]:
    """Restore the LoRA tree, and any other items, from a step saved through a ``CheckpointManager``.

    Save with ``manager.save(step, args=ocp.args.Composite(**save_args(lora, ...), opt_state=...))``.

    Args:
      manager: the ``ocp.CheckpointManager``.
      step: the step; the latest finished one by default.
      params, shardings: as in `restore`.
      **items: Orbax restore args for the other items, e.g. ``opt_state=ocp.args.StandardRestore(abstract)``.

    Returns:
      ``(lora, {name: restored item})``.

    Raises:
      FileNotFoundError: if the manager holds no finished step.
      ValueError: as `restore`; `CorruptCheckpointError` (a ValueError) where the values read back differ
        from the SHA-256 recorded by `save_args` (a flipped bit in the step's files).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile, orbax.checkpoint as ocp
      >>> lora = jaxlora.init(jax.random.key(0), {"w": jnp.ones((4, 6))}, jaxlora.LoraConfig(rank=2))
      >>> with ocp.CheckpointManager(tempfile.mkdtemp()) as mngr:
      ...     _ = mngr.save(3, args=ocp.args.Composite(**jaxlora.checkpoint.save_args(lora)))
      ...     mngr.wait_until_finished()
      ...     restored, _ = jaxlora.checkpoint.restore_step(mngr)
      >>> restored["w"].b.shape
      (2, 6)
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{manager.directory} holds no finished checkpoint step; nothing to resume from.")
    path = Path(manager.directory) / str(step)
    meta = _check_meta(_commit.Commit(path, "adapter")) if path.is_dir() else None  # no jaxlora manifest there
    if meta is None:
        meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    if params is not None and meta["base"] is not None:
        _fingerprint.check(meta["base"], params, source=f"The adapter at step {step} of {manager.directory}")
    args = {ARRAYS: ocp.args.StandardRestore(_abstract(meta, shardings)), **items}
    try:
        out = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
        raise ValueError(
            f"Step {step} of {manager.directory} is truncated or corrupt ({type(e).__name__}: {str(e)[:300]}); "
            "restore an earlier step."
        ) from e
    _check_digests(meta, out[ARRAYS], f"Step {step} of {manager.directory}")
    return _rebuild(meta, out[ARRAYS], f"step {step} of {manager.directory}"), {k: out[k] for k in items}
