"""Merged export: the full parameters with ``W + scale·B·A`` folded in, written one weight at a time.

The safetensors writers compute the file's header from shapes alone, then merge and write each weight
in turn, so the extra host memory stays near one weight, not a second copy of the model; the Orbax
writer hands Orbax's partial-save session a chunk of merged weights at a time. Both go through
`_commit`: a safetensors file is written beside its target and renamed over it in one step, with
the SHA-256 of the whole file in its header (``jaxlora_sha256``), checked when jaxlora reads it back
as a merge base; an Orbax export is a directory committed with a manifest like any checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .._matmul import LoraFactors
from .._tree import _names, nearest
from . import _commit
from ._peft import read_peft
from ._safetensors import DTYPES as _DTYPES
from ._safetensors import np_dtype

# bits per element of each code safetensors knows; F4 and F6 pack several elements a byte, have no numpy
# array type, and are only ever copied byte for byte (merge_safetensors' unadapted tensors)
_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6,
    "F6_E3M2": 6, "F4": 4, "C64": 64, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16,
    "U8": 8, "BOOL": 8,
}  # fmt: skip
Layout = Callable[[str], tuple[str, tuple[int, ...] | None]]


def _code(dtype: Any) -> str | None:
    """The safetensors code of a numpy dtype (or of a code itself); ``None`` if safetensors cannot hold it."""
    if isinstance(dtype, str) and dtype in _BITS:
        return dtype
    return _DTYPES.get(np.dtype(dtype).name)


def _nbytes(shape: tuple[int, ...], code: str) -> int:
    return math.prod(shape) * _BITS[code] // 8


def _header(entries: list[tuple[str, tuple[int, ...], Any]], metadata: Mapping[str, str] | None) -> tuple[bytes, int]:
    """The safetensors header (length prefix not included, padded to 8 bytes) and the data size."""
    header: dict[str, Any] = {"__metadata__": {**(metadata or {}), _commit.SHA_KEY: _commit.PLACEHOLDER}}
    offset, problems = 0, []
    for name, shape, dtype in entries:
        code = _code(dtype)
        if code is None:
            problems.append(f"{name!r}: {np.dtype(dtype).name}")
            continue
        size = _nbytes(shape, code)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if problems:
        raise ValueError(
            "safetensors has no dtype for these tensors:\n  "
            + "\n  ".join(problems)
            + f"\nIt holds {sorted(_DTYPES)}; cast them to one of those "
            "(jax.tree.map(lambda x: x.astype(...), params)), or export with format='orbax'."
        )
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), offset


def _tensor_bytes(name: str, data: Any, shape: tuple[int, ...], dtype: Any) -> memoryview:
    """The little-endian bytes of ``data``: an array of the entry's shape and dtype, or those bytes already."""
    code = _code(dtype)
    if isinstance(data, bytes | bytearray | memoryview):  # copied from another file as it is
        if len(data) != _nbytes(shape, code):
            raise ValueError(f"{name}: {len(data)} bytes, but the header says {tuple(shape)} {code}")
        return memoryview(data)
    array = np.ascontiguousarray(data)
    if array.shape != tuple(shape) or _code(array.dtype) != code:
        raise ValueError(f"{name}: produced {array.shape} {array.dtype}, header says {tuple(shape)} {code}")
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.byteswap()  # safetensors is little-endian
    return memoryview(array.reshape(-1).view(np.uint8))


def write_safetensors(
    path: str | os.PathLike,
    entries: list[tuple[str, tuple[int, ...], Any]],
    produce: Callable[[int], Any],
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> int:
    """Write a safetensors file whose tensors are made one at a time by ``produce(i)``; returns the bytes written.

    ``entries`` lists ``(name, shape, dtype)`` in file order, ``dtype`` a numpy dtype or a safetensors code
    (``"F4"``); ``produce(i)`` returns the array, or its little-endian bytes (a tensor copied from another
    file, any code). Only the tensor being written is in memory. The file appears atomically (written beside
    ``path``, sealed with its checksum, then renamed over it).

    Raises:
      ValueError: naming every tensor whose dtype safetensors cannot hold.
    """
    raw, offset = _header(entries, metadata)
    with _commit.committing_file(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for i, (name, shape, dtype) in enumerate(entries):
                f.write(_tensor_bytes(name, produce(i), shape, dtype))
        _commit.seal(tmp)
    return 8 + len(raw) + offset


def leaf_paths(params: Any) -> list[str]:
    """``"/"``-joined names of every leaf of ``params`` (a leading ``params`` collection dropped)."""
    return ["/".join(_names(kp)) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


CHUNK_BYTES = 256 * 2**20  # merged weights held in memory at once by the Orbax export (or one weight)


def _save_orbax_in_chunks(path: Path, params: Any, merged: Callable[[int], Any]) -> None:
    """An Orbax PyTree checkpoint written through Orbax's partial-save session, a chunk of weights a call.

    The tree is saved as nested dicts keyed by the params' path names (Linen's own layout). ``path`` is
    `_commit`'s staging path: Orbax's own ``.partial_save`` directory sits beside it, under its name.
    """
    from orbax.checkpoint.experimental.v1 import partial

    flat = jax.tree_util.tree_flatten_with_path(params)[0]

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
    dtype: Any = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``merge(params, lora)`` to disk: a safetensors file or an Orbax checkpoint.

    A quantized base (`jaxlora.quantize`) is written as a float model, ``merge(dequantize(params), lora)``:
    each quantized weight dequantized to its own float dtype (or ``dtype``), ``ΔW`` added in float32.

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
      dtype: the dtype of the merged and the dequantized weights, as in `jaxlora.merge` (default: each
        weight's own; a quantized one's float dtype). Other leaves are written as they are.
      overwrite: replace an existing output of the same kind (a ``.safetensors`` file, or an Orbax
        checkpoint directory), and nothing else. Either way the old output stays whole until the new
        one is complete (see docs/design.md, "Checkpoints").
      progress: called as ``progress(done, total)`` after each leaf is merged (the CLI's progress bar).

    Returns:
      The output path.

    Raises:
      FileExistsError: if the output exists and ``overwrite`` is false.
      ValueError: if ``lora`` does not fit ``params``, for an unknown ``format``, for leaves whose
        dtype safetensors cannot hold (``int4``), naming them, or if ``overwrite`` would replace
        something other than an output of this format.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile
      >>> from safetensors.numpy import load_file
      >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
      >>> out = jaxlora.checkpoint.save_merged(tempfile.mkdtemp() + "/m.safetensors", params, lora)
      >>> sorted(load_file(out))
      ['fc/bias', 'fc/kernel']
    """
    from .._core import _fit, _split, merged_weight
    from .._quantized import dequantize_weight, is_quantized
    from .._saved import substitute

    path = Path(path)
    if format not in ("safetensors", "orbax"):
        raise ValueError(f'format must be "safetensors" or "orbax", got {format!r}.')
    kind = "merged" if format == "orbax" else "safetensors"
    _commit.check_replaceable(_commit.resolve(path), kind, overwrite=overwrite)  # before any merging
    targets = _fit(params, lora)
    by_index = {w.index: lora[p] for p, w in targets.items()}
    params = substitute(params, _split(lora)[1], cast=True)  # modules_to_save: their trained copies
    # a quantized weight is one leaf, as _fit counts them, written as the float weight it stands for
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_quantized)

    def out_dtype(i: int) -> np.dtype:
        cast = dtype is not None and (i in by_index or is_quantized(leaves[i]))
        return np.dtype(dtype if cast else leaves[i].dtype)

    def merged(i: int) -> Any:
        w = leaves[i]
        if i in by_index:
            w = merged_weight(w, by_index[i], dtype)[0]
        elif is_quantized(w):
            w = dequantize_weight(w, dtype)
        if progress is not None:
            progress(i + 1, len(leaves))
        return w

    view = jax.tree_util.tree_unflatten(  # params with each quantized weight as the float array it writes
        treedef, [jax.ShapeDtypeStruct(w.shape, out_dtype(i)) if is_quantized(w) else w for i, w in enumerate(leaves)]
    )
    if format == "orbax":
        with _commit.committing(path, kind="merged", overwrite=overwrite, collective=True) as staging:
            _save_orbax_in_chunks(staging, view, merged)
        return path
    entries, perms = [], []
    for i, (name, leaf) in enumerate(zip(leaf_paths(view), leaves)):
        key, perm = layout(name) if layout else (name, None)
        shape = tuple(leaf.shape) if perm is None else tuple(leaf.shape[k] for k in perm)
        entries.append((key, shape, out_dtype(i)))
        perms.append(perm)

    def produce(i: int) -> np.ndarray:
        array = np.asarray(merged(i), entries[i][2])  # jax without x64 computes a float64 weight's merge in float32
        return array if perms[i] is None else np.transpose(array, perms[i])

    write_safetensors(path, entries, produce, metadata={"format": "pt", "merged_by": "jaxlora"}, overwrite=overwrite)
    return path


def _peft_deltas(adapter: str | os.PathLike) -> Iterator[tuple[str, bool, np.ndarray, np.ndarray, float, Any]]:
    """Each module's name, whether its base weight is stored ``(in, out)``, ``A``, ``B``, scale and DoRA magnitude.

    ``(in, out)``: an embedding's ``(vocab, features)``, and under ``fan_in_fan_out`` (which PEFT sets for
    GPT-2's ``Conv1D``) a linear weight: PEFT then merges ``W + scale·(B·A)ᵀ``."""
    from ._peft import _scale

    config, modules, _ = read_peft(adapter)
    saved = sorted(n for n, m in modules.items() if m["kind"] == "saved")
    if saved:
        raise ValueError(
            f"{adapter} holds modules_to_save {saved} (full trained copies); merge_safetensors writes only LoRA "
            "deltas: load it with jaxlora.checkpoint.load_peft and export with jaxlora.checkpoint.save_merged."
        )
    in_out = bool(config.get("fan_in_fan_out"))
    for name, m in modules.items():
        yield name, m["kind"] != "linear" or in_out, m["A"], m["B"], _scale(config, name, m["A"].shape[0]), m.get("M")


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
    embeddings and, under the config's ``fan_in_fan_out`` (GPT-2's ``Conv1D``, stored ``(in, out)``), linear
    weights, summed in float32 and cast back to ``W``'s dtype; with DoRA's ``lora_magnitude_vector``
    the sum is then scaled to ``m / ‖W + ΔW‖`` per output feature. Only one base tensor is read at a time.
    ``progress``, if given, is called as ``progress(done, total)`` after each tensor.

    Raises:
      FileExistsError: if ``out`` exists and ``overwrite`` is false.
      FileNotFoundError: if ``base`` does not exist.
      CorruptCheckpointError: if ``base`` is a jaxlora export that no longer matches its checksum.
      CheckpointReplacedError: if a save replaced ``base`` while it was read.
      ValueError: naming adapter modules whose ``<name>.weight`` the base lacks, whose shape differs or
        that is no float tensor (a quantized checkpoint); for a damaged base or adapter.

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
    _commit.check_replaceable(_commit.resolve(out), "safetensors", overwrite=overwrite)
    deltas = {f"{name}.weight": (in_out, A, B, s, M) for name, in_out, A, B, s, M in _peft_deltas(adapter)}
    try:
        data = open(base, "rb")  # every byte of the base is read through this one handle
    except FileNotFoundError:
        raise FileNotFoundError(f"The base {base} does not exist.") from None
    except OSError as e:  # a directory, say
        raise ValueError(f"The base {base} is not a readable safetensors file ({type(e).__name__}: {e}).") from None
    try:
        _commit.verify_safetensors(Path(base), data)  # a merged export of jaxlora's carries its checksum
        try:
            reader = safe_open(str(base), framework="numpy")
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise ValueError(f"The base {base} is not a readable safetensors file ({type(e).__name__}: {e}).") from None
        if not os.path.samestat(os.fstat(data.fileno()), os.stat(base)):
            raise _commit.replaced(Path(base))  # the header safe_open read is another file's: a save replaced base
    except BaseException:
        data.close()
        raise
    with reader as f, data:
        keys = list(f.keys())
        meta = f.metadata() or {}
        start, spans = _data_spans(data)
        problems = [f"{k!r}: not in the base; {nearest(k, keys)}" for k in deltas if k not in keys]
        entries = []
        for k in keys:
            sl = f.get_slice(k)
            shape, code = tuple(sl.get_shape()), sl.get_dtype()
            entries.append((k, shape, code))
            if k in deltas and not _is_float(code):
                problems.append(
                    f"{k!r}: the base tensor is {code}, not a float weight, so no LoRA delta can be added to it "
                    "(a quantized checkpoint? merge into the float checkpoint it was made from)"
                )
            elif k in deltas:
                in_out, A, B, _, _ = deltas[k]
                want = (A.shape[1], B.shape[0]) if in_out else (B.shape[0], A.shape[1])
                if shape != want:
                    problems.append(f"{k!r}: base {shape}, adapter expects {want}")
        if problems:
            shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
            raise ValueError(f"The adapter {adapter} does not fit the base {base}:\n  " + "\n  ".join(shown))

        def produce(i: int) -> np.ndarray | bytes:
            k, shape, code = entries[i]
            lo, hi = spans[k]
            data.seek(start + lo)
            raw = data.read(hi - lo)  # unadapted tensors are copied byte for byte, whatever their dtype
            if k not in deltas:
                return raw
            dtype = np_dtype(code)
            w = np.frombuffer(raw, dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype).reshape(shape)
            del raw
            in_out, A, B, s, M = deltas[k]
            acc = np.float64 if code == "F64" else np.float32  # float32, or float64 not to round a float64 base
            d = B.astype(acc) @ A.astype(acc)  # one weight-sized temporary, updated in place
            d *= acc(s)
            d = d.T if in_out else d
            d += w.astype(acc, copy=False)
            del w
            if M is not None:  # DoRA: m / ‖W + ΔW‖ · (W + ΔW), the norm over the input axis
                g = M.reshape(-1).astype(acc) / np.linalg.norm(d, axis=0 if in_out else 1)
                d *= g[None, :] if in_out else g[:, None]
            return d.astype(dtype, copy=False)

        def counted(i: int) -> np.ndarray:
            array = produce(i)
            if progress is not None:
                progress(i + 1, len(entries))
            return array

        write_safetensors(out, entries, counted, metadata={**meta, "merged_by": "jaxlora"}, overwrite=overwrite)
    return out


def _is_float(code: str) -> bool:
    return code in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _data_spans(f: Any) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where a safetensors file's data starts, and each tensor's ``[begin, end)`` byte range after that."""
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    return 8 + n, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}
