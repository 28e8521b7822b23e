"""Module paths: the one place where LoRA keys are made from parameter key paths, and targets matched."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._config import ALL_LINEAR, LoraConfig, matches
from ._quantized import is_quantized

SEPARATOR = "/"
# Leaf names that *are* their module's weight: the key drops them ("query/kernel" -> "query").
WEIGHT_NAMES = ("kernel", "embedding", "weight")
# Leading collection names (Linen's variables dict) and trailing attribute names (NNX variables).
_COLLECTIONS = ("params",)
_VALUE_ATTRS = ("value", "raw_value")


class Weight(NamedTuple):
    """A parameter leaf that LoRA can adapt: floating, at least 2-D."""

    index: int  # position among the leaves of jax.tree.leaves(params)
    keypath: tuple[Any, ...]
    leaf: Any  # an array or a jax.ShapeDtypeStruct
    name: str  # the leaf's own name ("kernel")


def _entry_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _names(keypath: Iterable[Any]) -> list[str]:
    names = [_entry_name(e) for e in keypath]
    if len(names) > 1 and names[0] in _COLLECTIONS:
        names = names[1:]
    while len(names) > 1 and names[-1] in _VALUE_ATTRS:
        names = names[:-1]
    return names


def module_path(keypath: Iterable[Any]) -> str:
    """The LoRA key of a parameter leaf: its module path, e.g. ``"encoder/layer_0/query"``.

    A leading ``"params"`` collection is dropped, and so is a trailing leaf name in
    ``WEIGHT_NAMES``; any other leaf keeps its name (``"mlp/w1"``).

    Raises:
      ValueError: if a name in the path contains ``"/"``, which would make keys ambiguous.

    Example:
      >>> from jax.tree_util import DictKey
      >>> module_path((DictKey("params"), DictKey("encoder"), DictKey("query"), DictKey("kernel")))
      'encoder/query'
    """
    names = _names(keypath)
    bad = [n for n in names if SEPARATOR in n]
    if bad:
        raise ValueError(
            f"Parameter names {bad} contain {SEPARATOR!r}, which jaxlora uses to join module paths; "
            "rename those modules or parameters."
        )
    if len(names) > 1 and names[-1] in WEIGHT_NAMES:
        names = names[:-1]
    return SEPARATOR.join(names)


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct, np.generic))


def weights(params: Any) -> dict[str, Weight]:
    """Every adaptable leaf of ``params`` (floating, ``ndim >= 2``; a `jaxlora.Quantized` weight is
    one leaf), keyed by module path."""
    found: dict[str, Weight] = {}
    for index, (keypath, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]):
        if (
            not (is_array(leaf) or is_quantized(leaf))
            or len(leaf.shape) < 2
            or not jnp.issubdtype(leaf.dtype, jnp.floating)
        ):
            continue
        path = module_path(keypath)
        if path in found:
            raise ValueError(
                f"Two weights of params share the module path {path!r} "
                f"({jax.tree_util.keystr(found[path].keypath)} and {jax.tree_util.keystr(keypath)}); "
                "give them distinct names."
            )
        found[path] = Weight(index, tuple(keypath), leaf, _names(keypath)[-1])
    return found


def nearest(name: str, paths: Iterable[str], n: int = 3) -> str:
    """A hint listing the paths closest to ``name``."""
    paths = sorted(paths)
    close = difflib.get_close_matches(name, paths, n=n, cutoff=0.3)
    close = close or [p for p in paths if name.split(SEPARATOR)[-1] in p][:n] or paths[:n]
    return f"closest module paths: {close}" if close else "params has no adaptable weight"


def why_no_match(pattern: str, paths: Iterable[str]) -> str:
    """Why a target ``pattern`` matched none of ``paths``, when a near miss tells (else ``""``).

    Example:
      >>> print(why_no_match("Query", ["encoder/query"]))
      ['encoder/query'] differ only in case; patterns are case-sensitive
    """
    paths = sorted(paths)
    for prefix in (".*/", ".+/", "(.*/)?"):
        if pattern.startswith(prefix) and (top := [p for p in paths if matches(pattern[len(prefix) :], p)]):
            return (
                f"{prefix!r} requires a parent module, but {top[:3]} are at the top level; a pattern already "
                f"matches any whole trailing part of a path, so write {pattern[len(prefix) :]!r}"
            )
    leaf = pattern.rsplit(SEPARATOR, 1)
    if len(leaf) == 2 and leaf[1] in WEIGHT_NAMES and (hits := [p for p in paths if matches(leaf[0], p)]):
        return (
            f"module paths drop the leaf name {leaf[1]!r} ({hits[0] + SEPARATOR + leaf[1]!r} is keyed "
            f"{hits[0]!r}); write {leaf[0]!r}"
        )
    if missed := {p: why for p, why in near_misses(pattern, paths).items() if why.startswith("in ")}:
        (path, why), *_ = missed.items()
        return (
            f"it matches the module {why[3:]} holding the weight {path!r}, but a pattern must match a weight's "
            f"whole module path or a whole trailing part of it; write {f'(?:{pattern})(/.*)?'!r} or name the weights"
        )
    try:
        folded = [p for p in paths if re.fullmatch(rf"(?:.*/)?(?:{pattern})", p, flags=re.IGNORECASE)]
    except re.error:
        folded = []
    if folded:
        return f"{folded[:3]} differ only in case; patterns are case-sensitive"
    return (
        "a pattern must match a whole module path or a whole trailing part of one after a '/' "
        "(so 'uery' does not match 'query')"
    )


def select(
    candidates: dict[str, Weight],
    config: LoraConfig,
    linear: dict[str, str] | None,
    refused: dict[str, str] | None = None,
) -> list[str]:
    """The module paths ``config`` targets, in params order.

    ``linear`` maps the paths known to feed a matmul (from a trace) to ``""``, or to why ``"all-linear"``
    leaves them out (a lookup table, the output head); ``None`` without a trace. ``refused`` maps
    weights that LoRA cannot adapt to the reason, for the error message.

    Raises:
      ValueError: naming each target pattern that matched nothing, with the closest real paths.
    """
    problems, chosen = [], set()
    for pattern in config.target_patterns:
        if pattern == ALL_LINEAR:
            hits = {
                p
                for p, w in candidates.items()
                if (linear.get(p) == "" if linear is not None else w.name != "embedding")
            }
            left = {p: why for p, why in (linear or {}).items() if why and p in candidates}
            if not hits and left:
                shown = "; ".join(f"{p!r} ({why})" for p, why in left.items())
                problems.append(
                    f"target 'all-linear' matches no weight: it leaves out {shown}, as PEFT does; name them to "
                    "adapt them: targets=[...]."
                )
                continue
        else:
            hits = {p for p in candidates if matches(pattern, p)}
        refusals = [f"{p!r} {why}" for p, why in (refused or {}).items() if matches(pattern, p)]
        if not hits and refusals:
            problems.append(f"target {pattern!r} matches only weights LoRA cannot adapt: {'; '.join(refusals)}.")
        elif not hits:
            problems.append(
                f"target {pattern!r} matches no adaptable weight; {nearest(pattern, candidates)}: "
                f"{why_no_match(pattern, candidates)}."
            )
        if hits and pattern != ALL_LINEAR:
            _warn_near_misses(pattern, candidates, hits)
        chosen |= hits
    if problems:
        raise ValueError("LoraConfig.targets:\n  " + "\n  ".join(problems))
    chosen = {p for p in chosen if not config.excludes(p)}
    if not chosen:
        raise ValueError(f"Every targeted module is excluded by LoraConfig.exclude={config.exclude}.")
    return [p for p in candidates if p in chosen]


def near_misses(pattern: str, paths: Iterable[str]) -> dict[str, str]:
    """The paths ``pattern`` misses that the same names in list form would match: ``{path: why}``.

    A path inside a module the pattern matches (``attn/q_proj/w_q`` under ``attn/q_proj``), and a
    top-level path that a leading ``.*/`` or ``.+/`` shuts out (``q_proj`` for ``".*/(q_proj|v_proj)"``).

    Example:
      >>> near_misses(".*/(q_proj|up_proj)", ["attn/q_proj/w_q", "mlp/up_proj", "up_proj"])
      {'attn/q_proj/w_q': "in 'attn/q_proj'", 'up_proj': 'at the top level'}
    """
    out = {}
    for path in paths:
        names = path.split(SEPARATOR)
        if matches(pattern, path):
            continue
        module = next(
            (m for k in range(len(names) - 1, 0, -1) if matches(pattern, m := SEPARATOR.join(names[:k]))), None
        )
        if module is not None:
            out[path] = f"in {module!r}"
        elif any(pattern.startswith(pre) and matches(pattern[len(pre) :], path) for pre in (".*/", ".+/")):
            out[path] = "at the top level"
    return out


def _warn_near_misses(pattern: str, candidates: Iterable[str], hits: set[str]) -> None:
    """Warn where a target matches some weights and misses others inside modules it matches."""
    missed = near_misses(pattern, [p for p in candidates if p not in hits])
    if missed:
        shown = [f"{p!r} ({why})" for p, why in list(missed.items())[:4]] + (["..."] if len(missed) > 4 else [])
        warnings.warn(
            f"LoraConfig.targets pattern {pattern!r} matches {len(hits)} weights but not {len(missed)} weights that "
            f"the same names in list form would: {', '.join(shown)}. A pattern must match a weight's whole module "
            "path or a whole trailing part of it (a leading '.*/' needs a parent module); to adapt them too, "
            "name them in a list of targets.",
            UserWarning,
            stacklevel=4,
        )


def module_leaves(params: Any) -> dict[str, dict[str, tuple[int, Any]]]:
    """Every module of ``params`` with its leaves: ``{module path: {leaf name: (index, leaf)}}``.

    A module is any proper prefix of a leaf's names (``"head"`` and ``"head/dense"`` for the leaf
    ``head/dense/kernel``); leaf names are relative to it (``"dense/kernel"``). Used for
    ``modules_to_save``.
    """
    out: dict[str, dict[str, tuple[int, Any]]] = {}
    for index, (keypath, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        names = _names(keypath)
        module_path(keypath)  # refuses a name containing the separator
        for k in range(1, len(names)):
            out.setdefault(SEPARATOR.join(names[:k]), {})[SEPARATOR.join(names[k:])] = (index, leaf)
    return out


def select_saved(params: Any, patterns: Iterable[str]) -> dict[str, dict[str, tuple[int, Any]]]:
    """The modules ``patterns`` (``LoraConfig.modules_to_save``) choose: the outermost match of each leaf.

    Raises:
      ValueError: naming each pattern that matches no module, with the closest module paths.
    """
    modules = module_leaves(params)
    patterns = tuple(patterns)
    chosen = [m for m in modules if any(matches(p, m) for p in patterns)]
    chosen = [m for m in chosen if not any(m.startswith(o + SEPARATOR) for o in chosen)]  # outermost only
    problems = [
        f"modules_to_save pattern {p!r} matches no module; {nearest(p, modules)}."
        for p in patterns
        if not any(matches(p, m) for m in modules)
    ]
    if problems:
        raise ValueError("LoraConfig.modules_to_save:\n  " + "\n  ".join(problems))
    return {m: modules[m] for m in chosen}


def inside(path: str, modules: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``modules`` or lies inside one."""
    return any(path == m or path.startswith(m + SEPARATOR) for m in modules)
