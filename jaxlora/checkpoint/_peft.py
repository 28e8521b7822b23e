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

Expert weights (``W (experts, *I, *O)``, roles with one ``"s"`` axis: ``ragged_dot`` or a batched
einsum) are PEFT's ``target_parameters``: a 3-D ``nn.Parameter`` ``(experts, in, out)`` (transformers'
``is_transposed`` experts, GptOss) or ``(experts, out, in)`` (Mixtral, Qwen-MoE) adapted by
``lora.ParamWrapper``. Either orientation stores ``lora_A.weight`` ``(experts·r, in)``, rows expert-major
(``A[e·r + k, i] = a[e, i, k]``), and ``lora_B.weight`` ``(out, r·experts)``, columns rank-major
(``B[o, k·experts + e] = b[e, k, o]``), so ``ΔW[e] = scale · B_e·A_e`` with PEFT's ``r`` the rank of
each expert. The tensors sit under the parameter's *module* (``...mlp.experts.lora_A.weight``); PEFT
nests one wrapper per targeted parameter of a module in the order the module registers them, so the
first of two is under ``...experts.base_layer.lora_A.weight`` (``parameter_order`` says the order).

Module names differ between a Flax model and its torch twin, so both directions take ``names``: a
function from jaxlora module path to torch module name (for an expert weight: the torch parameter's
full name, ``"model.layers.0.mlp.experts.gate_up_proj"``), or a dict ``{regex: replacement}`` (first
full match wins, ``re`` group references allowed). By default ``"/"`` becomes ``"."``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._config import matches
from .._matmul import LoraFactors
from .._peft_config import load_problems
from .._saved import SavedModule
from .._tree import module_leaves, nearest, weights
from . import _commit, _fingerprint, _safetensors
from ._info import AdapterInfo, config_to_json

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
# transformers' expert modules register their 3-D parameters in this order (GptOss, Mixtral, Qwen-MoE, Llama4)
PARAMETER_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
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


def nested_keys(
    params: list[str], order: tuple[str, ...] | list[str] = PARAMETER_ORDER
) -> tuple[dict[str, str], list[str]]:
    """The module key under which PEFT stores each targeted 3-D parameter's factors, and problems.

    PEFT wraps the targeted parameters of one torch module one around the other, in the order the
    module registers them, so with ``n`` of them the ``k``-th (from 0) sits ``n - 1 - k``
    ``.base_layer`` deep; ``order`` gives that order by parameter name.

    Example:
      >>> nested_keys(["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "moe.w"])[0]
      {'mlp.experts.gate_up_proj': 'mlp.experts.base_layer', 'mlp.experts.down_proj': 'mlp.experts', 'moe.w': 'moe'}
    """
    groups: dict[str, list[str]] = collections.defaultdict(list)
    keys, problems = {}, []
    for name in params:
        module, _, param = name.rpartition(".")
        if not module:
            problems.append(
                f"{name!r}: an expert weight's torch name must be its parameter's full name, '<module>.<parameter>' "
                "(such as 'model.layers.0.mlp.experts.gate_up_proj'); map it so with names="
            )
            continue
        groups[module].append(param)
    for module, found in groups.items():
        if len(found) > 1 and any(q not in order for q in found):
            problems.append(
                f"torch module {module!r} has several targeted parameters {sorted(found)}: PEFT nests one wrapper per "
                "parameter in the order the module registers them, and that order names the tensors; pass "
                f"parameter_order=[...] listing them in that order (now {list(order)})"
            )
            continue
        ranked = sorted(found, key=lambda q: list(order).index(q) if q in order else 0)
        keys.update({f"{module}.{q}": module + ".base_layer" * (len(ranked) - 1 - k) for k, q in enumerate(ranked)})
    return keys, problems


def _expert_to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a (E, *I, r)``, ``b (E, r, *O)`` -> ParamWrapper's ``lora_A (E·r, in)`` and ``lora_B (out, r·E)``."""
    e, r = a.shape[0], a.shape[-1]
    return (
        a.reshape(e, -1, r).transpose(0, 2, 1).reshape(e * r, -1),  # rows expert-major: e·r + k
        b.reshape(e, r, -1).transpose(2, 1, 0).reshape(-1, r * e),  # columns rank-major: k·E + e
    )


def _expert_from_peft(A: np.ndarray, B: np.ndarray, e: int, i_shape: tuple[int, ...], o_shape: tuple[int, ...]):
    """The inverse of `_expert_to_peft` for ``e`` experts."""
    r = A.shape[0] // e
    a = A.reshape(e, r, -1).transpose(0, 2, 1).reshape(e, *i_shape, r)
    b = B.reshape(B.shape[0], r, e).transpose(2, 1, 0).reshape(e, r, *o_shape)
    return a, b


def save_peft_files(
    directory: str | os.PathLike,
    lora: Mapping[str, LoraFactors],
    *,
    base: _fingerprint.Fingerprint | None = None,
    names: Names = None,
    config: Mapping[str, Any] | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    experts: str | Sequence[str] = (),
    parameter_order: Sequence[str] = PARAMETER_ORDER,
) -> Path:
    """`save_peft` given the base fingerprint instead of params (used to convert Orbax checkpoints)."""
    from safetensors.numpy import save_file

    path = Path(directory)
    _commit.check_replaceable(_commit.resolve(path), "peft", overwrite=overwrite, slot=True)
    rslora = bool(config and config.get("rslora"))
    expert_patterns = (experts,) if isinstance(experts, str) else tuple(experts)
    is_expert = {p: isinstance(f, LoraFactors) and any(matches(q, p) for q in expert_patterns) for p, f in lora.items()}
    unmatched = [q for q in expert_patterns if not any(matches(q, p) for p in lora)]
    tensors, problems, modules = {}, [], {}
    ranks, alphas, dropouts = {}, {}, set()
    saved: dict[str, Any] = {}
    if unmatched:
        problems.append(f"experts patterns {unmatched} match no module of the LoRA tree; {nearest(unmatched[0], lora)}")
    torch_names: dict[str, str] = {}
    for p in lora:
        try:
            torch_names[p] = torch_name(p, names)
        except ValueError as e:
            problems.append(str(e))
    expert_key, key_problems = nested_keys(
        [n for p, n in torch_names.items() if is_expert[p] and lora[p].roles.count("s") == 1], tuple(parameter_order)
    )
    problems += key_problems
    for p, f in lora.items():
        if p not in torch_names:
            continue
        name = torch_names[p]
        if is_expert[p]:
            bad = []
            if f.roles.count("s") != 1:
                bad.append(
                    f"roles {f.roles!r} have {f.roles.count('s')} stacked axes where PEFT's 3-D parameter has one "
                    "expert axis (unstack scanned layers first)"
                )
            if f.m is not None:
                bad.append("it has a DoRA magnitude, and PEFT's ParamWrapper has no DoRA (use_dora)")
            if bad:
                problems.append(f"{p!r}: cannot be a PEFT target_parameters entry: " + "; ".join(bad))
                continue
            if name not in expert_key:
                continue  # its module's problem is listed already
            r = int(f.a.shape[-1])
            a, b = _expert_to_peft(np.asarray(f.a), np.asarray(f.b))
            tensors[f"{PREFIX}{expert_key[name]}.lora_A.weight"] = np.ascontiguousarray(a)
            tensors[f"{PREFIX}{expert_key[name]}.lora_B.weight"] = np.ascontiguousarray(b)
            ranks[name], alphas[name] = r, _alpha_for(float(f.scale), r, rslora)
            dropouts.add(float(f.dropout))
            modules[p] = {
                "torch": name,
                "key": expert_key[name],
                "roles": f.roles,
                "scale": float(f.scale),
                "kind": "expert",
                "dropout": float(f.dropout),
                "a_shape": [int(d) for d in f.a.shape],
                "b_shape": [int(d) for d in f.b.shape],
            }
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
                "ragged_dot or batched einsum) has no PEFT module equivalent: PEFT names each layer's module "
                "(unstack the layers first); for expert weights, pass experts=[...] naming them, which writes "
                "PEFT's target_parameters for a 3-D torch parameter (names= must give its full parameter name)."
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
    targeted = [m["torch"] for m in modules.values() if m["kind"] == "expert"]
    dropped = sorted(p for p, m in modules.items() if m["dropout"] > 0)
    if targeted and dropped:
        problems.append(
            f"modules {dropped} have LoRA dropout, and PEFT's ParamWrapper (target_parameters, here {targeted}) "
            "refuses an adapter with lora_dropout != 0; dropout only acts in training, so save with it off: "
            "{p: dataclasses.replace(f, dropout=0.0) for p, f in lora.items()}."
        )
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
        "target_modules": sorted(n for n in ranks if n not in targeted),
        "target_parameters": sorted(targeted) or None,
        "use_rslora": rslora,
        # PEFT's keys are regexes matching any dotted suffix ("fc" matches "block.fc"): anchored, each matches its own
        "rank_pattern": {_exact(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {_exact(n): a for n, a in alphas.items() if a != alpha},
        "lora_dropout": max(dropouts) if dropouts else 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted(m["torch"] for m in saved.values()) or None,
        "use_dora": dora == {True},
    }
    extra = {"version": 1, "modules": modules, "saved": saved, "base": base, "config": dict(config) if config else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    # both files in one directory swap: a reader sees the old adapter or the new one, never a mix
    with _commit.committing(
        path, kind="peft", overwrite=overwrite, slot=True, carry=(CONFIG_FILE, WEIGHTS_FILE)
    ) as tmp:
        tmp.mkdir()
        with open(tmp / WEIGHTS_FILE, "wb"):  # created as open() creates files (0666 less the umask) ...
            mode = stat.S_IMODE(os.stat(tmp / WEIGHTS_FILE).st_mode)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "jaxlora": json.dumps(extra)})
        os.chmod(tmp / WEIGHTS_FILE, mode)  # ... as safetensors writes its own temporary file 0600
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
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
    experts: str | Sequence[str] = (),
    parameter_order: Sequence[str] = PARAMETER_ORDER,
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
      overwrite: replace the PEFT adapter in ``directory`` (and nothing else). Both files are written
        into a new directory beside it and swapped in together, so a reader sees the old adapter or
        the new one, never a mix. A directory that also holds other files (a hub repo's ``README.md``,
        a run's logs) is kept as it is: the two files are renamed into it, and jaxlora's readers refuse
        the moment between the renames (its manifest then disagrees), never read a mix.
      initial: for an adapter trained from `jaxlora.init_from_weights` (PiSSA, OLoRA) on the residual
        base: the tree as that function returned it. The file then holds an ordinary LoRA against
        the *original* weights, ``ΔW = scale·(a·b - a₀·b₀)`` at rank ``2r`` (``a' = [a | a₀]``,
        ``b' = [b ; -b₀]``, the scale kept, so ``lora_alpha`` doubles, or grows ``√2``-fold under
        rsLoRA): PEFT's ``path_initial_model_for_weight_conversion``.
      experts: patterns (as in `LoraConfig.targets`) of the expert weights (one ``"s"`` axis: the
        experts of a ``ragged_dot`` or batched einsum) to write as PEFT ``target_parameters``, each
        a 3-D torch parameter that ``names`` gives by its full name (``"mlp.experts.down_proj"``).
        Both ``expert_rank`` modes are written (PEFT's ``r`` is the rank of each expert).
      parameter_order: the torch parameter names in the order their module registers them, which
        decides PEFT's tensor names when one module has several targeted parameters (default:
        transformers' ``gate_up_proj``, ``gate_proj``, ``up_proj``, ``down_proj``).

    Returns:
      The directory.

    Raises:
      FileExistsError: if adapter files exist and ``overwrite`` is false.
      ValueError: if ``directory`` holds another kind of checkpoint; for modules PEFT cannot express
        (stacked layers; stacked axes not named in
        ``experts``; expert weights with DoRA or several stacked axes; LoRA dropout together with
        expert weights, which PEFT's ``ParamWrapper`` refuses), names the mapping does not cover, or
        an ``initial`` tree that does not match ``lora``.

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
        experts=experts,
        parameter_order=parameter_order,
    )


def against_original(lora: Mapping[str, LoraFactors], initial: Mapping[str, LoraFactors]) -> Lora:
    """``lora``, trained on a residual base from ``initial``, as a LoRA of rank ``2r`` on the original base."""
    problems, out = [], {}
    for p, f in lora.items():
        if isinstance(f, SavedModule):  # trained in full: the same on either base
            out[p] = f
            continue
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
        # DoRA: W_res + s·a·b = W + s·(a·b - a₀·b₀), the same weight, so the same norm and magnitude
        out[p] = LoraFactors(a=a, b=b, scale=f.scale, roles=f.roles, dropout=f.dropout, m=f.m)
    if problems:
        raise ValueError("save_peft(initial=...) does not match the LoRA tree:\n  " + "\n  ".join(problems))
    return out


def _exact(name: str) -> str:
    """A rank/alpha_pattern key that PEFT matches against ``name`` alone (not against ``x.name``)."""
    return "^" + re.escape(name)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches a whole dotted suffix of ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft(
    directory: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, Any] | None]:
    """The config, ``{torch name: {"kind", "A", "B"}}`` and jaxlora's metadata (or ``None``) of a PEFT dir,
    all of one commit (`_commit.read`)."""
    return _commit.read(Path(directory).absolute(), "peft", _read_peft)


def _read_peft(
    commit: _commit.Commit,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, Any] | None]:
    path = commit.root
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
    verified = commit.verify()  # written by jaxlora: every file checked before it is read
    try:
        config = json.loads(commit.read_bytes(CONFIG_FILE))  # each file read once, checked as it is read
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON ({e}); the adapter is corrupt.") from None
    problems = config_problems(config)
    if problems:
        raise ValueError(f"{path / CONFIG_FILE} is not a readable PEFT LoRA config:\n  " + "\n  ".join(problems))
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LORA adapters can be read")
    problems += load_problems(config)
    to_save = list(config.get("modules_to_save") or [])
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}; trained biases are not LoRA factors")
    modules: dict[str, dict[str, Any]] = {}
    data = commit.read_bytes(WEIGHTS_FILE)
    try:
        meta, tensors = _safetensors.load(data)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path / WEIGHTS_FILE} is truncated or corrupt ({type(e).__name__}: {e}).") from e
    del data
    for key in sorted(tensors):
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        module, _, leaf = key[len(PREFIX) :].rpartition(".")
        # PEFT's modules_to_save entries match a module name or a dotted suffix of it
        if suffix is None and key.startswith(PREFIX) and any(module == m or module.endswith(f".{m}") for m in to_save):
            modules.setdefault(module, {"kind": "saved", "tensors": {}})["tensors"][leaf] = tensors[key]
            continue
        if suffix is None or not key.startswith(PREFIX):
            problems.append(f"tensor {key!r} is not a LoRA factor jaxlora can read")
            continue
        kind, which = _SUFFIXES[suffix]
        entry = modules.setdefault(key[len(PREFIX) : -len(suffix)], {})
        entry[which] = tensors[key]
        if kind is not None:
            entry["kind"] = kind
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
    if not config.get("target_parameters"):  # else load_peft checks, once it knows each expert weight's experts
        problems += [
            p for name, m in modules.items() if "A" in m and "B" in m and (p := rank_problem(config, name, m, 1))
        ]
    extra = _jaxlora_meta(meta, problems)
    if problems:
        raise ValueError(f"Cannot read the PEFT adapter at {path}:\n  " + "\n  ".join(problems))
    if extra is not None and not verified:
        _commit.warn_unverified(path, "the PEFT adapter jaxlora wrote")
    return config, modules, extra


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def config_problems(config: Any) -> list[str]:
    """What in a parsed ``adapter_config.json`` a LoRA reader cannot use, one sentence each.

    ``r`` and ``lora_alpha`` must be present (PEFT always writes them; they fix the scale); the other
    keys may be missing (PEFT's defaults apply) but, when present, must have PEFT's types.

    Example:
      >>> config_problems({"r": 8, "lora_alpha": "16"})
      ["lora_alpha is '16'; expected a finite number"]
    """
    if not isinstance(config, dict):
        return [f"it holds a JSON {type(config).__name__}, where PEFT writes an object of config fields"]
    problems = [
        f"{k!r} is missing (PEFT always writes it; it sets the scale)" for k in ("r", "lora_alpha") if k not in config
    ]
    r, alpha = config.get("r", 1), config.get("lora_alpha", 1)
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        problems.append(f"r is {r!r}; expected a positive integer")
    if not _is_number(alpha):
        problems.append(f"lora_alpha is {alpha!r}; expected a finite number")
    for key, valid, what in (
        ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        pattern = config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and all(valid(v) for v in pattern.values())):
            problems.append(f"{key} is {pattern!r}; expected an object from module-name patterns to {what}")
    for key in ("use_rslora", "use_dora"):
        if config.get(key) not in (None, True, False):
            problems.append(f"{key} is {config[key]!r}; expected true or false")
    dropout = config.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        problems.append(f"lora_dropout is {dropout!r}; expected a number in [0, 1)")
    for key in ("modules_to_save", "target_parameters"):
        names = config.get(key)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            problems.append(f"{key} is {names!r}; expected a list of module names or null")
    if not isinstance(config.get("peft_type", "LORA"), str):
        problems.append(f'peft_type is {config["peft_type"]!r}; expected "LORA"')
    return problems


def rank_problem(config: Mapping[str, Any], name: str, m: Mapping[str, np.ndarray], experts: int) -> str | None:
    """A sentence if the config's rank for module (or expert parameter) ``name`` contradicts its tensors.

    PEFT builds each module at the config's rank (``r``, or ``rank_pattern``'s) and then refuses tensors
    of another shape; reading the rank off the tensors instead would pair them with a wrong scale.
    """
    r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    if m["A"].shape[0] == r * experts and m["B"].shape[1] == r * experts:
        return None
    source = "rank_pattern" if r != config["r"] else "r"
    per = f" for each of {experts} experts" if experts > 1 else ""
    return (
        f"{name!r}: the config gives rank {r}{per} ({source}), but lora_A is {m['A'].shape} and lora_B "
        f"{m['B'].shape}; PEFT refuses this adapter (fix r / rank_pattern in {CONFIG_FILE})"
    )


def _jaxlora_meta(meta: Mapping[str, str], problems: list[str]) -> dict[str, Any] | None:
    """jaxlora's own metadata in the safetensors header (``None`` in a file PEFT wrote)."""
    if "jaxlora" not in meta:
        return None
    try:
        extra = json.loads(meta["jaxlora"])
    except json.JSONDecodeError as e:
        problems.append(f"the jaxlora metadata in {WEIGHTS_FILE} is not valid JSON ({e})")
        return None
    bad = []
    if not isinstance(extra, dict) or not isinstance(extra.get("modules"), dict):
        bad.append("it has no 'modules' object")
    else:
        for group, need in (("modules", {"torch", "roles", "kind"}), ("saved", {"torch", "leaves"})):
            for p, m in (extra.get(group) or {}).items():
                if not isinstance(m, dict) or not need <= set(m):
                    bad.append(f"{group} entry {p!r} lacks some of {sorted(need)}")
    if bad:
        problems.append(f"the jaxlora metadata in {WEIGHTS_FILE} is damaged: " + "; ".join(bad))
        return None
    return extra


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
    parameter_order: Sequence[str] = PARAMETER_ORDER,
) -> Lora:
    """Read a PEFT LoRA adapter (made by PEFT or by `save_peft`) into a jaxlora tree.

    Args:
      directory: the adapter directory.
      params: the JAX base parameters (may be abstract). Needed to place the factors of an adapter
        PEFT made: torch module names are matched by mapping every weight path of ``params`` through
        ``names``, and each weight's layout (2-D Flax ``(in, out)``, torch ``(out, in)``, or more axes)
        decides how ``(r, in)`` / ``(out, r)`` are reshaped. Without it only adapters written by
        `save_peft` (which carry their layout) or 2-D Flax ``(in, out)`` layouts can be read.
        ``target_parameters`` (3-D expert parameters) are matched the same way: ``names`` maps an
        expert weight to the torch parameter's full name, and its one stacked axis is the experts.
      names: jaxlora module path -> torch module name, as in `save_peft`.
      fn, args: the model function and example arguments, needed for weights with more than two axes
        (as in `jaxlora.init`).
      dtype: cast the factors to this dtype (default: as stored).
      parameter_order: as in `save_peft`: the order in which a torch module registers its targeted
        parameters, which tells PEFT's nested tensor names apart.

    Returns:
      The LoRA tree, with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) per module,
      ``rank_pattern`` and ``alpha_pattern`` applied, and DoRA's ``m`` from ``lora_magnitude_vector``.

    Raises:
      FileNotFoundError: if ``directory`` does not exist.
      CheckpointReplacedError: if saves to ``directory`` replaced it during each of three attempts to read it.
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
    saved = {m.get("key", m["torch"]): (p, m) for p, m in (extra or {}).get("modules", {}).items()}
    targets = list(config.get("target_parameters") or [])
    # tensor key (a module name, maybe with ".base_layer") -> the torch parameter it adapts
    param_of = {k: m["torch"] for k, (_, m) in saved.items() if m.get("kind") == "expert"}
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
        targeted = [n for n in by_torch if any(n == t or n.endswith(f".{t}") for t in targets)]
        keys, key_problems = nested_keys(targeted, tuple(parameter_order)) if targeted else ({}, [])
        problems += key_problems
        param_of.update({k: n for n, k in keys.items() if k in modules and k not in param_of})
        where: dict[str, str] = {}
        for name in modules:
            if name in saved and saved[name][0] in candidates:
                where[name] = saved[name][0]
            elif param_of.get(name, name) in by_torch:
                where[name] = by_torch[param_of.get(name, name)]
            else:
                hint = (
                    f" (target_parameters {targets}: names= must map each expert weight to its torch parameter's "
                    "full name)"
                    if targets
                    else ""
                )
                problems.append(
                    f"torch module {name!r} matches no weight of params; "
                    f"{nearest(name, by_torch)} (after the name mapping){hint}"
                )
        if problems:
            raise ValueError(
                f"Cannot place the PEFT adapter at {path} on params "
                "(pass names= mapping jaxlora paths to torch names):\n  " + "\n  ".join(problems)
            )
        paths = set(where.values())
        # jaxlora's recorded roles, where the weight has the layout they were made for; elsewhere (an adapter of
        # a Flax kernel (in, out) on a torch weight (out, in)) PEFT's (r, in) and (out, r) take the base's roles
        base = (extra or {}).get("base") or {}
        roles = {
            p: saved[n][1]["roles"]
            for n, (p, _) in saved.items()
            if p in paths
            and n in modules
            and not (p in base and _fingerprint.layout_problem(p, base[p], candidates[p].name))
        }
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
        for name, p in where.items():
            placed[name] = (p, roles[p], tuple(int(d) for d in candidates[p].leaf.shape))
    else:
        for name in modules:
            if name in saved:
                placed[name] = (saved[name][0], saved[name][1]["roles"], None)
            elif targets:
                problems.append(
                    f"{name!r}: the adapter has target_parameters {targets}, whose tensors are named by module "
                    "only; pass params= (and names=, fn=, args=) to place them"
                )
            elif names is None:
                placed[name] = (name.replace(".", "/"), None, None)
            else:
                problems.append(f"{name!r}: a name mapping can only be inverted against params; pass params=")
    lora: Lora = {}
    for name, m in modules.items():
        if name not in placed:
            continue
        p, role, shape = placed[name]
        A, B = m["A"], m["B"]  # (r, in), (out, r); an expert parameter's: (experts·r, in), (out, r·experts)
        r = A.shape[0]
        if role is None:
            role = "io"
        expert = name in param_of
        if "s" in role and not expert:
            problems.append(f"{name!r}: the weight at {p!r} is stacked (roles {role!r}); PEFT adapters are per layer")
            continue
        if expert and role.count("s") != 1:
            problems.append(
                f"{name!r} (target parameter {param_of[name]!r}) -> {p!r}: roles {role!r}, but a 3-D expert "
                "parameter needs a weight with exactly one stacked (expert) axis"
            )
            continue
        if shape is not None:
            i_shape = tuple(d for d, c in zip(shape, role) if c == "i")
            o_shape = tuple(d for d, c in zip(shape, role) if c == "o")
            experts = math.prod(d for d, c in zip(shape, role) if c == "s")
        elif name in saved and "a_shape" in saved[name][1]:
            a_shape, b_shape = saved[name][1]["a_shape"], saved[name][1]["b_shape"]
            experts = a_shape[0] if expert else 1
            i_shape, o_shape = tuple(a_shape[int(expert) : -1]), tuple(b_shape[1 + int(expert) :])
        else:
            i_shape, o_shape, experts = (A.shape[1],), (B.shape[0],), 1
        if expert:
            r = A.shape[0] // experts
        if targets and (bad := rank_problem(config, param_of.get(name, name), m, experts if expert else 1)):
            problems.append(bad)  # read_peft checked the rest
            continue
        if A.shape[1] != math.prod(i_shape) or B.shape[0] != math.prod(o_shape) or A.shape[0] != r * experts:
            need_a, need_b = ("r", "r") if not expert else (f"{experts}·r", f"r·{experts}")
            problems.append(
                f"{name!r} -> {p!r}: lora_A {A.shape} and lora_B {B.shape} need ({need_a}, {math.prod(i_shape)}) "
                f"and ({math.prod(o_shape)}, {need_b}) for weight {shape}"
                + (
                    "; they fit it stored (out, in) (Hugging Face's FlaxConv1D): pass fn= and args= so that the "
                    "trace reads its layout"
                    if fn is None and role == "io" and (A.shape[1], B.shape[0]) == (o_shape + i_shape)
                    else ""
                )
            )
            continue
        if expert:
            a_np, b_np = _expert_from_peft(A, B, experts, i_shape, o_shape)
            a, b = jnp.asarray(a_np, dtype), jnp.asarray(b_np, dtype)
        else:
            a = jnp.asarray(A.T.reshape(*i_shape, r), dtype)
            b = jnp.asarray(B.T.reshape(r, *o_shape), dtype)
        mag = None if "M" not in m else jnp.asarray(m["M"].reshape(o_shape), dtype)
        dropout = float(config.get("lora_dropout", 0.0))
        dropout = saved[name][1].get("dropout", dropout) if name in saved else dropout
        scale = _scale(config, param_of.get(name, name), r)
        if name in saved and not math.isclose(scale, saved[name][1].get("scale", scale), rel_tol=1e-9):
            problems.append(
                f"{param_of.get(name, name)!r}: PEFT reads scale {scale} for it from {CONFIG_FILE}, but jaxlora "
                f"saved it with scale {saved[name][1]['scale']} (a rank/alpha_pattern key of an older jaxlora "
                "also matches this module); load it with that jaxlora and save it again with this one"
            )
            continue
        lora[p] = LoraFactors(a=a, b=b, scale=scale, roles=role, dropout=dropout, m=mag)
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
    return _commit.read(Path(directory).absolute(), "peft", _peft_info)


def _peft_info(commit: _commit.Commit) -> AdapterInfo:
    path = commit.root
    config, modules, extra = _read_peft(commit)
    saved = {m.get("key", m["torch"]): (p, m) for p, m in (extra or {}).get("modules", {}).items()}
    keys, _ = nested_keys(list(config.get("target_parameters") or []), PARAMETER_ORDER)
    expert_keys = {k: q for q, k in keys.items()}  # tensor key -> the torch parameter it adapts
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
        shapes = [list(m["A"].shape[::-1]), list(m["B"].shape[::-1])]
        torch = name
        if name in saved and saved[name][1].get("kind") == "expert":  # ParamWrapper's (experts·r, in) rows
            shapes = [saved[name][1]["a_shape"], saved[name][1]["b_shape"]]
            r, torch = int(shapes[0][-1]), saved[name][1]["torch"]
        elif name not in saved and (param := expert_keys.get(name)) is not None:  # made by PEFT: r from the config
            r, torch, p = int(_pattern_value(config.get("rank_pattern") or {}, param, config.get("r", r))), param, param
            e = int(m["A"].shape[0]) // r
            shapes = [[e, int(m["A"].shape[1]), r], [e, r, int(m["B"].shape[0])]]
        out[p] = {
            "torch": torch,
            "kind": "expert" if torch != name else m["kind"],
            "rank": r,
            "scale": _scale(config, torch, r),
            "roles": roles,
            "dropout": float(config.get("lora_dropout", 0.0)),
            "a_shape": shapes[0],
            "b_shape": shapes[1],
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
