"""Hugging Face PEFT adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT stores, per adapted torch module ``<name>``, the tensors
``base_model.model.<name>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight`` ``(out, r)`` (for an
``nn.Embedding``: ``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B`` ``(features, r)``), and
computes ``ΔW = scale · B·A`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``). A
jaxlora module with ``a: (*I, r)`` and ``b: (r, *O)`` maps to ``A = a.reshape(-1, r).T`` and
``B = b.reshape(r, -1).T``: a Flax ``Dense`` kernel ``(in, out)`` gives ``A = a.T``, and a
``DenseGeneral`` kernel flattens its input and output axes as the torch ``Linear`` twin does.
DoRA's magnitude ``m`` (``*O``) is ``...<name>.lora_magnitude_vector`` ``(out,)``, flattened alike,
with ``use_dora: true`` in the config.

Module names differ between a Flax model and its torch twin, so both directions take ``names``: a
function from jaxlora module path to torch module name, or a dict ``{regex: replacement}`` (first
full match wins, ``re`` group references allowed). By default ``"/"`` becomes ``"."``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._matmul import LoraFactors
from .._saved import SavedModule
from .._tree import module_leaves, nearest, weights
from . import _fingerprint
from ._orbax import AdapterInfo, config_to_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
    ".lora_magnitude_vector": (None, "M"),  # DoRA; the kind comes from the A and B tensors
}
MAGNITUDE = "lora_magnitude_vector"
Names = Callable[[str], str] | Mapping[str, str] | None
Lora = dict[str, LoraFactors | SavedModule]
# Flax leaf names of a saved module -> PyTorch's (a 2-D kernel is transposed: (in, out) -> (out, in))
_TORCH_LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def _torch_leaf(path: str, rel: str, w: Any) -> tuple[str, bool]:
    """The torch parameter name of a saved module's leaf, and whether its array is transposed."""
    *inner, leaf = rel.split("/")
    if leaf == "kernel" and len(w.shape) != 2:
        raise ValueError(
            f"{path!r}: saved module leaf {rel!r} {tuple(w.shape)} is no 2-D kernel; PEFT's modules_to_save "
            "can be written only for Dense kernels, embeddings, norms and biases."
        )
    return ".".join([*inner, _TORCH_LEAVES.get(leaf, leaf)]), leaf == "kernel"


def torch_name(path: str, names: Names = None) -> str:
    """The torch module name for the jaxlora module ``path`` under the mapping ``names``.

    Raises:
      ValueError: if a dict mapping has no pattern that fully matches ``path``.

    Example:
      >>> torch_name("encoder/layer_0/attention/query")
      'encoder.layer_0.attention.query'
      >>> torch_name("encoder/layer_0/query", {r"encoder/layer_(\\d+)/(.*)": r"encoder.layer.\\1.attention.self.\\2"})
      'encoder.layer.0.attention.self.query'
    """
    if names is None:
        return path.replace("/", ".")
    if callable(names):
        return str(names(path))
    for pattern, replacement in names.items():
        if m := re.fullmatch(pattern, path):
            return m.expand(replacement)
    raise ValueError(f"{path!r}: no pattern of the name mapping matches it fully (patterns: {list(names)}).")


def _alpha_for(scale: float, r: int, rslora: bool) -> float:
    """The ``lora_alpha`` that gives exactly ``scale`` under PEFT's formula, preferring round numbers."""
    denom = math.sqrt(r) if rslora else r
    raw = scale * denom
    near, up, down = [], raw, raw
    for _ in range(64):  # the floats next to raw: one of them usually divides to scale exactly
        up, down = math.nextafter(up, math.inf), math.nextafter(down, 0.0)
        near += [up, down]
    for candidate in (round(raw), round(raw, 6), round(raw, 9), round(raw, 12), raw, *near):
        if candidate > 0 and candidate / denom == scale:
            return int(candidate) if float(candidate).is_integer() else float(candidate)
    return raw  # within one rounding of scale; no float alpha gives it exactly


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, path)


def save_peft_files(
    directory: str | os.PathLike,
    lora: Mapping[str, LoraFactors],
    *,
    base: _fingerprint.Fingerprint | None = None,
    names: Names = None,
    config: Mapping[str, Any] | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """`save_peft` given the base fingerprint instead of params (used to convert Orbax checkpoints)."""
    from safetensors.numpy import save_file

    path = Path(directory)
    if not overwrite and any((path / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE)):
        raise FileExistsError(f"{path} already holds a PEFT adapter; pass overwrite=True to replace it.")
    rslora = bool(config and config.get("rslora"))
    tensors, problems, modules = {}, [], {}
    ranks, alphas, dropouts = {}, {}, set()
    saved: dict[str, Any] = {}
    for p, f in lora.items():
        try:
            name = torch_name(p, names)
        except ValueError as e:
            problems.append(str(e))
            continue
        if isinstance(f, SavedModule):  # PEFT's adapter file: base_model.model.<module>.<param>
            leaves = {}
            for rel, w in f.weights.items():
                try:
                    leaf, transposed = _torch_leaf(p, rel, w)
                except ValueError as e:
                    problems.append(str(e))
                    continue
                tensors[f"{PREFIX}{name}.{leaf}"] = np.ascontiguousarray(np.asarray(w).T if transposed else w)
                leaves[rel] = [leaf, transposed]
            saved[p] = {"torch": name, "leaves": leaves}
            continue
        if "s" in f.roles:
            problems.append(
                f"{p!r}: stacked-layer axis or expert axis (roles {f.roles!r}: layers from nn.scan, or experts of a "
                "ragged_dot or batched einsum) has no PEFT equivalent here: PEFT names each layer's module "
                "(unstack the layers first), and jaxlora does not write PEFT's `target_parameters` layout "
                "for 3-D expert weights; save expert adapters with jaxlora.checkpoint.save (Orbax) or "
                "export merged weights."
            )
            continue
        kind = "embedding" if base is not None and base.get(p, {}).get("name") == "embedding" else "linear"
        r = int(f.a.shape[-1])
        a = np.asarray(f.a).reshape(-1, r).T  # (r, in)
        b = np.asarray(f.b).reshape(r, -1).T  # (out, r)
        keys = ("lora_A.weight", "lora_B.weight") if kind == "linear" else ("lora_embedding_A", "lora_embedding_B")
        tensors[f"{PREFIX}{name}.{keys[0]}"] = np.ascontiguousarray(a)
        tensors[f"{PREFIX}{name}.{keys[1]}"] = np.ascontiguousarray(b)
        if f.m is not None:
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = np.ascontiguousarray(np.asarray(f.m).reshape(-1))
        ranks[name], alphas[name] = r, _alpha_for(float(f.scale), r, rslora)
        dropouts.add(float(f.dropout))
        modules[p] = {
            "torch": name,
            "roles": f.roles,
            "scale": float(f.scale),
            "kind": kind,
            "dropout": float(f.dropout),
            "a_shape": [int(d) for d in f.a.shape],
            "b_shape": [int(d) for d in f.b.shape],
        }
    dora = {f.m is not None for f in lora.values() if isinstance(f, LoraFactors)}
    if len(dora) > 1:
        problems.append(
            "some modules use DoRA and some do not "
            f"({sorted(p for p, f in lora.items() if isinstance(f, LoraFactors) and f.m is None)} do not); "
            "PEFT's use_dora is one flag for the whole adapter: save them as two adapters."
        )
    dup = [n for n, c in collections.Counter(m["torch"] for m in [*modules.values(), *saved.values()]).items() if c > 1]
    if dup:
        problems.append(f"the name mapping sends several modules to the same torch names {dup}.")
    if problems:
        raise ValueError("Cannot write a PEFT adapter:\n  " + "\n  ".join(problems))
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "use_rslora": rslora,
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "lora_dropout": max(dropouts) if dropouts else 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted(m["torch"] for m in saved.values()) or None,
        "use_dora": dora == {True},
    }
    extra = {"version": 1, "modules": modules, "saved": saved, "base": base, "config": dict(config) if config else None}
    path.mkdir(parents=True, exist_ok=True)
    _write_atomic(
        path / WEIGHTS_FILE, lambda f: save_file(tensors, f, metadata={"format": "pt", "jaxlora": json.dumps(extra)})
    )
    _write_atomic(path / CONFIG_FILE, lambda f: Path(f).write_text(json.dumps(adapter_config, indent=2) + "\n"))
    return path


def save_peft(
    directory: str | os.PathLike,
    lora: Mapping[str, LoraFactors],
    *,
    params: Any = None,
    names: Names = None,
    config: Any = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    initial: Mapping[str, LoraFactors] | None = None,
) -> Path:
    """Write ``lora`` as a PEFT adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Everything needed to reproduce the outputs travels in the files: each module's rank (``r`` and
    ``rank_pattern``) and its exact scale (``lora_alpha`` and ``alpha_pattern``, chosen so that PEFT's
    ``lora_alpha / r`` equals jaxlora's scale). The safetensors header also keeps jaxlora's own metadata
    (roles, paths, base fingerprint), so `load_peft` restores the tree exactly.

    Args:
      directory: the output directory (created if needed).
      lora: the LoRA tree.
      params: the base parameters (may be abstract): tells embeddings (``lora_embedding_A/B``) from
        linear weights and records the base fingerprint. Without it every module is written as linear.
      names: jaxlora module path -> torch module name (see the module docstring).
      config: the `LoraConfig` (its ``rslora`` picks ``use_rslora``; recorded).
      base_model_name_or_path: written to the config, as PEFT does (e.g. ``"bert-base-uncased"``).
      overwrite: replace existing adapter files.
      initial: for an adapter trained from `jaxlora.init_from_weights` (PiSSA, OLoRA) on the residual
        base: the tree as that function returned it. The file then holds an ordinary LoRA against
        the *original* weights, ``ΔW = scale·(a·b - a₀·b₀)`` at rank ``2r`` (``a' = [a | a₀]``,
        ``b' = [b ; -b₀]``, the scale kept, so ``lora_alpha`` doubles, or grows ``√2``-fold under
        rsLoRA): PEFT's ``path_initial_model_for_weight_conversion``.

    Returns:
      The directory.

    Raises:
      FileExistsError: if adapter files exist and ``overwrite`` is false.
      ValueError: for modules PEFT cannot express (stacked layers) or names the mapping does not cover,
        or an ``initial`` tree that does not match ``lora``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile, json
      >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 6))}}}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, alpha=8))
      >>> out = jaxlora.checkpoint.save_peft(tempfile.mkdtemp(), lora, params=params)
      >>> cfg = json.loads((out / "adapter_config.json").read_text())
      >>> cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
      (2, 8, ['fc'])
    """
    if initial is not None:
        lora = against_original(lora, initial)
    base = None if params is None else _fingerprint.fingerprint(params, lora)
    fields = None if config is None else config_to_json(config)
    return save_peft_files(
        directory,
        lora,
        base=base,
        names=names,
        config=fields,
        base_model_name_or_path=base_model_name_or_path,
        overwrite=overwrite,
    )


def against_original(lora: Mapping[str, LoraFactors], initial: Mapping[str, LoraFactors]) -> Lora:
    """``lora``, trained on a residual base from ``initial``, as a LoRA of rank ``2r`` on the original base."""
    problems, out = [], {}
    for p, f in lora.items():
        f0 = initial.get(p)
        if f0 is None or (f0.roles, f0.scale, f0.a.shape, f0.b.shape) != (f.roles, f.scale, f.a.shape, f.b.shape):
            found = "nothing" if f0 is None else f"roles {f0.roles!r}, scale {f0.scale}, a {f0.a.shape}, b {f0.b.shape}"
            problems.append(
                f"{p!r}: initial= needs the factors init_from_weights returned for it (roles {f.roles!r}, scale "
                f"{f.scale}, a {f.a.shape}, b {f.b.shape}); found {found}."
            )
            continue
        ns = f.roles.count("s")
        a = jnp.concatenate([f.a, jnp.asarray(f0.a, f.a.dtype)], axis=-1)
        b = jnp.concatenate([f.b, -jnp.asarray(f0.b, f.b.dtype)], axis=ns)
        out[p] = LoraFactors(a=a, b=b, scale=f.scale, roles=f.roles, dropout=f.dropout)
    if problems:
        raise ValueError("save_peft(initial=...) does not match the LoRA tree:\n  " + "\n  ".join(problems))
    return out


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches a whole dotted suffix of ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft(
    directory: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, Any] | None]:
    """The config, ``{torch name: {"kind", "A", "B"}}`` and jaxlora's metadata (or ``None``) of a PEFT dir."""
    from safetensors import safe_open

    path = Path(directory)
    if not path.exists():
        raise FileNotFoundError(f"No PEFT adapter at {path}: it does not exist.")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        hint = (
            " (it is a jaxlora Orbax checkpoint: use jaxlora.checkpoint.restore)"
            if (path / "lora_meta").is_dir()
            else ""
        )
        raise ValueError(f"{path} is not a PEFT adapter: {missing} missing{hint}.")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON ({e}); the adapter is corrupt.") from None
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LORA adapters can be read")
    to_save = list(config.get("modules_to_save") or [])
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}; trained biases are not LoRA factors")
    modules: dict[str, dict[str, Any]] = {}
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="numpy") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
                module, _, leaf = key[len(PREFIX) :].rpartition(".")
                # PEFT's modules_to_save entries match a module name or a dotted suffix of it
                if (
                    suffix is None
                    and key.startswith(PREFIX)
                    and any(module == m or module.endswith(f".{m}") for m in to_save)
                ):
                    modules.setdefault(module, {"kind": "saved", "tensors": {}})["tensors"][leaf] = f.get_tensor(key)
                    continue
                if suffix is None or not key.startswith(PREFIX):
                    problems.append(f"tensor {key!r} is not a LoRA factor jaxlora can read")
                    continue
                kind, which = _SUFFIXES[suffix]
                entry = modules.setdefault(key[len(PREFIX) : -len(suffix)], {})
                entry[which] = f.get_tensor(key)
                if kind is not None:
                    entry["kind"] = kind
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path / WEIGHTS_FILE} is truncated or corrupt ({type(e).__name__}: {e}).") from e
    missing = [
        m
        for m in to_save
        if not any(n == m or n.endswith(f".{m}") for n, x in modules.items() if x.get("kind") == "saved")
    ]
    if missing:
        problems.append(f"modules_to_save {to_save} lists {missing}, but the file holds no tensors for them")
    for name, m in modules.items():
        if m.get("kind") == "saved":
            continue
        if "A" not in m or "B" not in m:
            problems.append(f"{name!r}: has lora_A and lora_B incomplete (found {sorted(k for k in m if k != 'kind')})")
        elif m["A"].ndim != 2 or m["B"].ndim != 2 or m["A"].shape[0] != m["B"].shape[1]:
            problems.append(f"{name!r}: lora_A {m['A'].shape} and lora_B {m['B'].shape} are not (r, in) and (out, r)")
        elif "M" in m and m["M"].size != m["B"].shape[0]:
            problems.append(
                f"{name!r}: {MAGNITUDE} {m['M'].shape} does not hold one value per output ({m['B'].shape[0]})"
            )
        elif bool(config.get("use_dora")) != ("M" in m):
            problems.append(
                f"{name!r}: use_dora is {bool(config.get('use_dora'))} but {MAGNITUDE} is "
                f"{'present' if 'M' in m else 'missing'}"
            )
    if problems:
        raise ValueError(f"Cannot read the PEFT adapter at {path}:\n  " + "\n  ".join(problems))
    extra = json.loads(meta["jaxlora"]) if "jaxlora" in meta else None
    return config, modules, extra


def _scale(config: Mapping[str, Any], name: str, r: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    return float(alpha / (math.sqrt(r) if config.get("use_rslora") else r))


def load_peft(
    directory: str | os.PathLike,
    *,
    params: Any = None,
    names: Names = None,
    fn: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
    dtype: Any = None,
) -> Lora:
    """Read a PEFT LoRA adapter (made by PEFT or by `save_peft`) into a jaxlora tree.

    Args:
      directory: the adapter directory.
      params: the JAX base parameters (may be abstract). Needed to place the factors of an adapter
        PEFT made: torch module names are matched by mapping every weight path of ``params`` through
        ``names``, and each weight's layout (2-D Flax ``(in, out)``, torch ``(out, in)``, or more axes)
        decides how ``(r, in)`` / ``(out, r)`` are reshaped. Without it only adapters written by
        `save_peft` (which carry their layout) or 2-D Flax ``(in, out)`` layouts can be read.
      names: jaxlora module path -> torch module name, as in `save_peft`.
      fn, args: the model function and example arguments, needed for weights with more than two axes
        (as in `jaxlora.init`).
      dtype: cast the factors to this dtype (default: as stored).

    Returns:
      The LoRA tree, with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) per module,
      ``rank_pattern`` and ``alpha_pattern`` applied, and DoRA's ``m`` from ``lora_magnitude_vector``.

    Raises:
      FileNotFoundError: if ``directory`` does not exist.
      ValueError: for a directory that is not a readable LoRA adapter (naming what is missing,
        ``modules_to_save``, trained biases), torch names no weight of ``params`` maps to, or factor
        shapes that do not fit the weights.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora, tempfile
      >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 6))}}}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, alpha=8))
      >>> out = jaxlora.checkpoint.save_peft(tempfile.mkdtemp(), lora, params=params)
      >>> back = jaxlora.checkpoint.load_peft(out, params=params)
      >>> back["fc"].a.shape, back["fc"].scale
      ((4, 2), 4.0)
    """
    path = Path(directory)
    config, modules, extra = read_peft(path)
    to_save = {n: m["tensors"] for n, m in modules.items() if m.get("kind") == "saved"}
    modules = {n: m for n, m in modules.items() if n not in to_save}
    saved = {m["torch"]: (p, m) for p, m in (extra or {}).get("modules", {}).items()}
    problems: list[str] = []
    # torch name -> (jaxlora path, roles, weight shape or None)
    placed: dict[str, tuple[str, str | None, tuple[int, ...] | None]] = {}
    if params is not None:
        candidates = weights(params)
        by_torch: dict[str, str] = {}
        for p in candidates:
            try:
                by_torch.setdefault(torch_name(p, names), p)
            except ValueError:
                continue
        for name in modules:
            if name in saved and saved[name][0] in candidates:
                by_torch[name] = saved[name][0]
            if name not in by_torch:
                problems.append(
                    f"torch module {name!r} matches no weight of params; "
                    f"{nearest(name, by_torch)} (after the name mapping)"
                )
        if problems:
            raise ValueError(
                f"Cannot place the PEFT adapter at {path} on params "
                "(pass names= mapping jaxlora paths to torch names):\n  " + "\n  ".join(problems)
            )
        paths = {by_torch[n] for n in modules}
        roles = {p: saved[n][1]["roles"] for n, (p, _) in saved.items() if p in paths and n in modules}
        need = sorted(paths - set(roles))
        if need:
            from .. import _core
            from .._config import LoraConfig

            probe = jax.eval_shape(
                lambda: _core.init(
                    jax.random.key(0),
                    params,
                    LoraConfig(rank=1, targets=[f"^{re.escape(p)}" for p in need]),
                    fn=fn,
                    args=args,
                )
            )
            roles.update({p: f.roles for p, f in probe.items()})
        for name in modules:
            p = by_torch[name]
            placed[name] = (p, roles[p], tuple(int(d) for d in candidates[p].leaf.shape))
    else:
        for name in modules:
            if name in saved:
                placed[name] = (saved[name][0], saved[name][1]["roles"], None)
            elif names is None:
                placed[name] = (name.replace(".", "/"), None, None)
            else:
                problems.append(f"{name!r}: a name mapping can only be inverted against params; pass params=")
    lora: Lora = {}
    for name, m in modules.items():
        if name not in placed:
            continue
        p, role, shape = placed[name]
        A, B = m["A"], m["B"]  # (r, in), (out, r)
        r = A.shape[0]
        if role is None:
            role = "io"
        if "s" in role:
            problems.append(f"{name!r}: the weight at {p!r} is stacked (roles {role!r}); PEFT adapters are per layer")
            continue
        if shape is not None:
            i_shape = tuple(d for d, c in zip(shape, role) if c == "i")
            o_shape = tuple(d for d, c in zip(shape, role) if c == "o")
        elif name in saved and "a_shape" in saved[name][1]:
            i_shape, o_shape = tuple(saved[name][1]["a_shape"][:-1]), tuple(saved[name][1]["b_shape"][1:])
        else:
            i_shape, o_shape = (A.shape[1],), (B.shape[0],)
        if A.shape[1] != math.prod(i_shape) or B.shape[0] != math.prod(o_shape):
            problems.append(
                f"{name!r} -> {p!r}: lora_A {A.shape} and lora_B {B.shape} need (r, {math.prod(i_shape)}) and "
                f"({math.prod(o_shape)}, r) for weight {shape}"
            )
            continue
        a = jnp.asarray(A.T.reshape(*i_shape, r), dtype)
        b = jnp.asarray(B.T.reshape(r, *o_shape), dtype)
        mag = None if "M" not in m else jnp.asarray(m["M"].reshape(o_shape), dtype)
        dropout = saved[name][1]["dropout"] if name in saved else float(config.get("lora_dropout", 0.0))
        lora[p] = LoraFactors(a=a, b=b, scale=_scale(config, name, r), roles=role, dropout=dropout, m=mag)
    lora.update(_saved_modules(to_save, extra, params, names, dtype, problems))
    if problems:
        raise ValueError(f"Cannot read the PEFT adapter at {path}:\n  " + "\n  ".join(problems))
    return lora


def _saved_modules(
    to_save: Mapping[str, Mapping[str, np.ndarray]], extra: Any, params: Any, names: Names, dtype: Any, problems: list
) -> dict[str, SavedModule]:
    """PEFT's ``modules_to_save`` tensors as `SavedModule` s, placed by jaxlora's metadata or by ``params``."""
    known = {m["torch"]: (p, m["leaves"]) for p, m in ((extra or {}).get("saved") or {}).items()}
    if params is not None:
        for p, leaves in module_leaves(params).items():
            try:
                name = torch_name(p, names)
                known.setdefault(name, (p, {rel: list(_torch_leaf(p, rel, w)) for rel, (_, w) in leaves.items()}))
            except ValueError:
                continue
    out = {}
    for name, tensors in to_save.items():
        if name not in known:
            problems.append(f"modules_to_save {name!r} matches no module of params (pass params= and names=)")
            continue
        p, leaves = known[name]
        by_torch = {leaf: (rel, transposed) for rel, (leaf, transposed) in leaves.items()}
        if set(by_torch) != set(tensors):
            problems.append(f"{name!r} -> {p!r}: PEFT holds {sorted(tensors)}, the module {sorted(by_torch)}")
            continue
        out[p] = SavedModule(
            {by_torch[t][0]: jnp.asarray(x.T if by_torch[t][1] else x, dtype) for t, x in tensors.items()}
        )
    return out


def peft_info(directory: str | os.PathLike) -> AdapterInfo:
    """`jaxlora.checkpoint.info` for a PEFT directory."""
    path = Path(directory)
    config, modules, extra = read_peft(path)
    saved = {m["torch"]: (p, m) for p, m in (extra or {}).get("modules", {}).items()}
    out = {}
    for name, m in modules.items():
        if m.get("kind") == "saved":
            p = next((q for q, s in ((extra or {}).get("saved") or {}).items() if s["torch"] == name), name)
            out[p] = {
                "torch": name,
                "kind": "saved",
                "leaves": {k: {"shape": list(t.shape), "dtype": str(t.dtype)} for k, t in m["tensors"].items()},
            }
            continue
        r = int(m["A"].shape[0])
        p, roles = (saved[name][0], saved[name][1]["roles"]) if name in saved else (name, None)
        out[p] = {
            "torch": name,
            "kind": m["kind"],
            "rank": r,
            "scale": _scale(config, name, r),
            "roles": roles,
            "dropout": float(config.get("lora_dropout", 0.0)),
            "a_shape": list(m["A"].shape[::-1]),
            "b_shape": list(m["B"].shape[::-1]),
            "dtype": str(m["A"].dtype),
            **({"m_shape": list(m["M"].shape)} if "M" in m else {}),
        }
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    config_fields = (extra or {}).get("config") or {
        k: config.get(k)
        for k in ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern", "lora_dropout")
    }
    return AdapterInfo(
        "peft", config.get("peft_version", "unknown"), config_fields, out, (extra or {}).get("base"), size
    )
