"""PEFT's ``LoraConfig`` in jaxlora's names: `LoraConfig.from_peft` and the PEFT-spelling error.

PEFT matches ``target_modules`` (a list) as whole dotted suffixes of torch module names and a
``target_modules`` string as a regex over the whole name; jaxlora matches a regex against a module
path, whole or a whole trailing part, with ``"/"`` between modules. A list entry becomes that
suffix escaped, its dots turned into ``"/"``; in a regex (and in the keys of ``rank_pattern`` and
``alpha_pattern``) an escaped dot ``\\.`` becomes ``"/"`` (an unescaped ``.`` matches ``"/"`` as it
matched ``"."``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# PEFT's spelling -> jaxlora's, for the LoraConfig fields whose names differ
PEFT_NAMES = {
    "r": "rank",
    "lora_alpha": "alpha",
    "target_modules": "targets",
    "exclude_modules": "exclude",
    "lora_dropout": "dropout",
    "use_dora": "dora",
    "use_rslora": "rslora",
    "init_lora_weights": "init",
}
# PEFT fields that say nothing about the adapter's math (bookkeeping, the torch layout of GPT-2's Conv1D)
_IGNORED = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "fan_in_fan_out", "megatron_core", "runtime_config", "qalora_group_size",
    "ensure_weight_tying",
}  # fmt: skip
_INITS = {True: "kaiming", "gaussian": "gaussian"}
_HINTS = {
    "target_parameters": "target the expert weights by their module paths in targets=",
    "layers_to_transform": "name the layers in targets= (e.g. r'layers_(0|1)/.*/query')",
    "layers_pattern": "name the layers in targets=",
    "bias": 'jaxlora trains no biases beside the factors; use bias="none" or modules_to_save',
    "lora_bias": "jaxlora trains no LoRA bias",
}


# init_lora_weights whose init rewrites the base weight (PiSSA, CorDA, OLoRA, LoRA-GA: W - scale·B₀·A₀; LoftQ: a
# quantized residual). PEFT re-runs it when it loads such an adapter, so the factors belong to a base other than W.
_BASE_REWRITING = ("pissa", "corda", "olora", "lora_ga", "loftq")
# what `load_peft` reads from a PEFT adapter's config, and the fields that do not change what its tensors compute
_LOAD_READ = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_dropout", "bias",
              "modules_to_save", "target_parameters", "init_lora_weights"}  # fmt: skip
_LOAD_IGNORED = _IGNORED | {
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "megatron_config", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "velora_config",
}  # fmt: skip
_LOAD_HINTS = {
    "layer_replication": "PEFT builds a model of repeated base layers for this adapter; params hold each layer once",
    "alora_invocation_tokens": "aLoRA adapts only the tokens from the invocation on; jaxlora adapts every token",
    "use_qalora": "QALoRA's lora_A reads the input pooled in groups",
    "arrow_config": "Arrow routes each token among several adapters",
    "lora_bias": "jaxlora has no bias on lora_B",
    "trainable_token_indices": "jaxlora does not train single embedding rows",
}


def load_problems(config: Mapping[str, Any]) -> list[str]:
    """The fields of a PEFT adapter's config under which PEFT computes something other than what `load_peft`
    reads (``W + scale·B·A`` per module, DoRA, ``modules_to_save``), one sentence each: never dropped silently."""
    problems = []
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING):
        problems.append(
            f"init_lora_weights={init!r}: PEFT rewrites the base weight when it builds this adapter (W - scale·B0·A0, "
            "or LoftQ's quantized residual), so its factors belong to that base weight, not to the original; convert "
            "it to a plain LoRA in PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)), or, if "
            "your params are the residual base PEFT saved, set init_lora_weights to true in adapter_config.json"
        )
    for name, value in config.items():
        if name in _LOAD_READ or name in _LOAD_IGNORED or _unset(value):
            continue
        hint = _LOAD_HINTS.get(name, "jaxlora does not know how it changes the adapter's output")
        problems.append(f"{name}={value!r}: {hint}; jaxlora cannot load this adapter as plain LoRA")
    return problems


def peft_spelling_error(names: list[str]) -> TypeError:
    """The one-line error for ``LoraConfig(r=...)`` and the other PEFT spellings."""
    renames = ", ".join(f"{n} -> {PEFT_NAMES[n]}" for n in names)
    return TypeError(
        f"LoraConfig takes jaxlora's field names, not PEFT's: {renames}; "
        "or convert a PEFT config with LoraConfig.from_peft(peft_config_or_dict_or_path)."
    )


def _suffix(name: str) -> str:
    """A PEFT module-name suffix (``"self_attn.q_proj"``) as a jaxlora pattern (``"self_attn/q_proj"``)."""
    return "/".join(re.escape(part) for part in name.split("."))


def _regex(pattern: str) -> str:
    return pattern.replace(r"\.", "/")


def _modules(value: Any, field: str, problems: list[str]) -> str | tuple[str, ...] | None:
    """``target_modules``-like values: a regex string, ``"all-linear"``, or names (list, set, tuple)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if value == "all-linear" else _regex(value)
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return tuple(_suffix(v) for v in sorted(value))
    problems.append(f"{field} must be a regex string or a list of module names, got {value!r}")
    return None


def _read(source: Any) -> dict[str, Any]:
    """The fields of a PEFT config given as an object, a dict, or an ``adapter_config.json`` path."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "adapter_config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"LoraConfig.from_peft: no {path}; pass a PEFT adapter directory, its adapter_config.json, "
                "a PEFT LoraConfig or its dict."
            )
        try:
            fields = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"LoraConfig.from_peft: {path} is not valid JSON ({e}).") from None
        if not isinstance(fields, dict):
            raise ValueError(f"LoraConfig.from_peft: {path} holds a {type(fields).__name__}, not a JSON object.")
        return fields
    if isinstance(source, Mapping):
        return dict(source)
    if callable(getattr(source, "to_dict", None)):  # peft.LoraConfig (duck-typed: no torch import)
        return dict(source.to_dict())
    raise TypeError(
        "LoraConfig.from_peft takes a peft.LoraConfig, its dict, or the path of an adapter_config.json (or its "
        f"directory); got {type(source).__name__}."
    )


def _unset(value: Any) -> bool:
    return value is None or value is False or (hasattr(value, "__len__") and len(value) == 0)


def peft_fields(source: Any, given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """jaxlora `LoraConfig` keyword arguments for a PEFT config; raises naming every field it cannot honour.

    ``given``: the jaxlora fields the caller sets itself (a PEFT config without ``target_modules`` is
    then fine when ``targets`` is given).
    """
    peft = _read(source)
    problems: list[str] = []
    kind = peft.get("peft_type", "LORA")
    kind = getattr(kind, "value", kind)
    if kind != "LORA":
        problems.append(f"peft_type is {kind!r}; only LORA configs map to a LoraConfig")
    out: dict[str, Any] = {}
    if "r" in peft:
        out["rank"] = peft["r"]
    if "lora_alpha" in peft:
        out["alpha"] = peft["lora_alpha"]
    targets = _modules(peft.get("target_modules"), "target_modules", problems)
    if peft.get("target_modules") is None and "targets" not in given:
        problems.append(
            "target_modules is None (PEFT then picks defaults per torch architecture); set target_modules, or "
            "pass targets= to from_peft"
        )
    elif targets is not None:
        out["targets"] = targets
    exclude = _modules(peft.get("exclude_modules"), "exclude_modules", problems)
    if exclude is not None:
        out["exclude"] = exclude
    saved = _modules(peft.get("modules_to_save"), "modules_to_save", problems)
    if saved is not None:
        out["modules_to_save"] = saved
    for name in ("rank_pattern", "alpha_pattern"):
        if peft.get(name):
            out[name] = {_regex(k): v for k, v in peft[name].items()}
    for name in ("lora_dropout", "use_dora", "use_rslora"):
        if name in peft:
            out[PEFT_NAMES[name]] = peft[name]
    init = peft.get("init_lora_weights", True)
    if isinstance(init, str) and (init in ("pissa", "olora") or init.startswith("pissa_niter_")):
        problems.append(
            f"init_lora_weights={init!r}: jaxlora starts PiSSA and OLoRA from the weights with "
            "jaxlora.init_from_weights(key, params, config, method=...) (niter=K for pissa_niter_K); drop the field"
        )
    elif init is True or init == "gaussian":
        out["init"] = _INITS[init]
    else:
        problems.append(f'init_lora_weights={init!r} has no jaxlora equivalent (use True or "gaussian")')
    if peft.get("bias", "none") != "none":
        problems.append(f"bias={peft['bias']!r}: {_HINTS['bias']}")
    done = {"r", "lora_alpha", "target_modules", "exclude_modules", "modules_to_save", "rank_pattern",
            "alpha_pattern", "lora_dropout", "use_dora", "use_rslora", "init_lora_weights", "bias"}  # fmt: skip
    for name, value in peft.items():
        if name in done or name in _IGNORED or _unset(value):
            continue
        hint = _HINTS.get(name, "jaxlora has no equivalent; leave it unset")
        problems.append(f"{name}={value!r}: {hint}")
    if problems:
        raise ValueError("LoraConfig.from_peft cannot honour these PEFT fields:\n  " + "\n  ".join(problems))
    return out
