"""Merged export: the full parameters with ``W + scale·B·A`` folded in, written one weight at a time.

The safetensors writers compute the file's header from shapes alone, then merge and write each weight
in turn, so the extra host memory stays near one weight, not a second copy of the model; the Orbax
writer hands Orbax's partial-save session a chunk of merged weights at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .._matmul import LoraFactors
from .._tree import _names, nearest
from ._peft import read_peft

_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
Layout = Callable[[str], tuple[str, tuple[int, ...] | None]]


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another path.")


def write_safetensors(
    path: str | os.PathLike,
    entries: list[tuple[str, tuple[int, ...], Any]],
    produce: Callable[[int], np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write a safetensors file whose tensors are made one at a time by ``produce(i)``; returns the bytes written.

    ``entries`` lists ``(name, shape, dtype)`` in file order; only the tensor being written is in memory.
    The file appears atomically (written under a temporary name, then renamed).
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _DTYPES[np.dtype(dtype).name],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (name, shape, dtype) in enumerate(entries):
            array = np.ascontiguousarray(produce(i))
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: produced {array.shape} {array.dtype}, header says {tuple(shape)} {dtype}")
            f.write(memoryview(array.astype(array.dtype.newbyteorder("<"), copy=False)).cast("B"))
            del array
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def leaf_paths(params: Any) -> list[str]:
    """``"/"``-joined names of every leaf of ``params`` (a leading ``params`` collection dropped)."""
    return ["/".join(_names(kp)) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


CHUNK_BYTES = 256 * 2**20  # merged weights held in memory at once by the Orbax export (or one weight)


def _save_orbax_in_chunks(path: Path, params: Any, merged: Callable[[int], Any], overwrite: bool) -> None:
    """An Orbax PyTree checkpoint written through Orbax's partial-save session, a chunk of weights a call.

    The tree is saved as nested dicts keyed by the params' path names (Linen's own layout).
    """
    import shutil

    from orbax.checkpoint.experimental.v1 import partial

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    staging = path.with_name(path.name + ".partial_save")
    for stale in (staging, path) if overwrite else (staging,):
        if stale.exists():  # an old output (asked to replace) or an interrupted earlier export
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    def flush(indices: list[int]) -> None:
        chunk: dict[str, Any] = {}
        for i in indices:
            *parents, leaf = [str(getattr(e, "key", getattr(e, "name", getattr(e, "idx", e)))) for e in flat[i][0]]
            node = chunk
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = merged(i)
        partial.save(path.absolute(), chunk)

    pending, size = [], 0
    for i, (_, leaf) in enumerate(flat):
        pending.append(i)
        size += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if size >= CHUNK_BYTES:
            flush(pending)
            pending, size = [], 0
    if pending:
        flush(pending)
    partial.finalize(path.absolute())


def save_merged(
    path: str | os.PathLike,
    params: Any,
    lora: Mapping[str, LoraFactors],
    *,
    format: str = "safetensors",
    layout: Layout | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``merge(params, lora)`` to disk: a safetensors file or an Orbax checkpoint.

    Args:
      path: the output file (safetensors) or directory (Orbax).
      params: the base parameters.
      lora: the LoRA tree.
      format: ``"safetensors"``: streamed, one merged weight in memory at a time; keys are leaf paths
        such as ``"encoder/layer_0/query/kernel"`` unless ``layout`` renames them. ``"orbax"``: an Orbax
        PyTree checkpoint of the merged params as nested dicts of path names, written through Orbax's
        partial-save session about ``CHUNK_BYTES`` at a time (restore with
        ``orbax.checkpoint.v1.load(path)``); unadapted weights are written as they are.
      layout: safetensors only: ``leaf path -> (key, axes permutation or None)``, e.g. to write a
        Hugging Face checkpoint with torch names and ``(out, in)`` kernels.
      overwrite: replace an existing output.
      progress: called as ``progress(done, total)`` after each leaf is merged (the CLI's progress bar).

    Returns:
      The output path.

    Raises:
      FileExistsError: if the output exists and ``overwrite`` is false.
      ValueError: if ``lora`` does not fit ``params``, or for an unknown ``format``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile
      >>> from safetensors.numpy import load_file
      >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> out = jaxlora.checkpoint.save_merged(tempfile.mkdtemp() + "/m.safetensors", params, lora)
      >>> sorted(load_file(out))
      ['fc/bias', 'fc/kernel']
    """
    from .._core import _fit, merged_weight

    path = Path(path)
    _check_target(path, overwrite)
    targets = _fit(params, lora)
    by_index = {w.index: lora[p] for p, w in targets.items()}
    leaves = jax.tree_util.tree_leaves(params)

    def merged(i: int) -> Any:
        w = leaves[i] if i not in by_index else merged_weight(leaves[i], by_index[i])[0]
        if progress is not None:
            progress(i + 1, len(leaves))
        return w

    if format == "orbax":
        _save_orbax_in_chunks(path, params, merged, overwrite)
        return path
    if format != "safetensors":
        raise ValueError(f'format must be "safetensors" or "orbax", got {format!r}.')
    entries, perms = [], []
    for name, leaf in zip(leaf_paths(params), leaves):
        key, perm = layout(name) if layout else (name, None)
        shape = tuple(leaf.shape) if perm is None else tuple(leaf.shape[k] for k in perm)
        entries.append((key, shape, np.dtype(leaf.dtype)))
        perms.append(perm)

    def produce(i: int) -> np.ndarray:
        array = np.asarray(merged(i))
        return array if perms[i] is None else np.transpose(array, perms[i])

    write_safetensors(path, entries, produce, metadata={"format": "pt", "merged_by": "jaxlora"})
    return path


def _peft_deltas(adapter: str | os.PathLike) -> Iterator[tuple[str, str, np.ndarray, np.ndarray, float, Any]]:
    from ._peft import _scale

    config, modules, _ = read_peft(adapter)
    saved = sorted(n for n, m in modules.items() if m["kind"] == "saved")
    if saved:
        raise ValueError(
            f"{adapter} holds modules_to_save {saved} (full trained copies); merge_safetensors writes only LoRA "
            "deltas: load it with jaxlora.checkpoint.load_peft and export with jaxlora.checkpoint.save_merged."
        )
    for name, m in modules.items():
        yield name, m["kind"], m["A"], m["B"], _scale(config, name, m["A"].shape[0]), m.get("M")


def merge_safetensors(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Merge a PEFT adapter into a Hugging Face safetensors checkpoint, one tensor at a time (PEFT's math).

    ``W (out, in) += scale · B·A`` for ``lora_A``/``lora_B`` and ``W (vocab, features) += scale · (B·A)ᵀ`` for
    embeddings, summed in float32 and cast back to ``W``'s dtype; with DoRA's ``lora_magnitude_vector``
    the sum is then scaled to ``m / ‖W + ΔW‖`` per output feature. Only one base tensor is read at a time.
    ``progress``, if given, is called as ``progress(done, total)`` after each tensor.

    Raises:
      FileExistsError: if ``out`` exists and ``overwrite`` is false.
      ValueError: naming adapter modules whose ``<name>.weight`` the base lacks or whose shape differs.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile, numpy as np
      >>> from safetensors.numpy import save_file, load_file
      >>> d = tempfile.mkdtemp()
      >>> save_file({"fc.weight": np.zeros((6, 4), np.float32)}, d + "/base.safetensors")
      >>> params = {"fc": {"weight": jnp.zeros((6, 4))}}  # torch layout (out, in)
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> _ = jaxlora.checkpoint.save_peft(d + "/adapter", lora)
      >>> out = jaxlora.checkpoint.merge_safetensors(d + "/base.safetensors", d + "/adapter", d + "/m.safetensors")
      >>> load_file(out)["fc.weight"].shape
      (6, 4)
    """
    from safetensors import safe_open

    out = Path(out)
    _check_target(out, overwrite)
    deltas = {f"{name}.weight": (kind, A, B, s, M) for name, kind, A, B, s, M in _peft_deltas(adapter)}
    with safe_open(str(base), framework="numpy") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
        problems = [f"{k!r}: not in the base; {nearest(k, keys)}" for k in deltas if k not in keys]
        entries = []
        for k in keys:
            sl = f.get_slice(k)
            shape, dtype = tuple(sl.get_shape()), _np_dtype(sl.get_dtype())
            entries.append((k, shape, dtype))
            if k in deltas:
                kind, A, B, _, _ = deltas[k]
                want = (B.shape[0], A.shape[1]) if kind == "linear" else (A.shape[1], B.shape[0])
                if shape != want:
                    problems.append(f"{k!r}: base {shape}, adapter expects {want}")
        if problems:
            shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
            raise ValueError(f"The adapter {adapter} does not fit the base {base}:\n  " + "\n  ".join(shown))

        def produce(i: int) -> np.ndarray:
            k, _, dtype = entries[i]
            w = f.get_tensor(k)
            if k not in deltas:
                return w
            kind, A, B, s, M = deltas[k]
            d = B.astype(np.float32) @ A.astype(np.float32)  # one weight-sized temporary, updated in place
            d *= np.float32(s)
            d = d if kind == "linear" else d.T
            d += w
            del w
            if M is not None:  # DoRA: m / ‖W + ΔW‖ · (W + ΔW), the norm over the input axis
                axis = 1 if kind == "linear" else 0
                g = M.reshape(-1).astype(np.float32) / np.linalg.norm(d, axis=axis)
                d *= g[:, None] if kind == "linear" else g[None, :]
            return d.astype(dtype, copy=False)

        def counted(i: int) -> np.ndarray:
            array = produce(i)
            if progress is not None:
                progress(i + 1, len(entries))
            return array

        write_safetensors(out, entries, counted, metadata={**meta, "merged_by": "jaxlora"})
    return out


def _np_dtype(code: str) -> np.dtype:
    names = {v: k for k, v in _DTYPES.items()}
    if code == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(names[code])
