"""`LoraConfig`: what to adapt and how, validated when it is built."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from . import _peft_config

ALL_LINEAR = "all-linear"
Init = Literal["kaiming", "gaussian"]
ExpertRank = Literal["per_expert", "split"]


# Leaf names of a module's only weight that keys keep (changing keys would orphan saved adapters) but
# patterns may leave off, as keys leave off "kernel"/"weight": an Einsum's "w" (gemma, Tunix, Haiku).
WEIGHT_LEAVES = ("w",)


def matches(pattern: str, path: str) -> bool:
    """Whether ``pattern`` (a regex) matches ``path`` whole, or a whole trailing part of it.

    ``"query"`` and ``".*/query"`` both match ``"encoder/layer_0/query"``; ``"uery"`` does not. A path
    ending in an Einsum's weight ``w`` matches with or without it: ``"q_proj"`` matches ``"attn/q_proj/w"``.
    """
    head, _, leaf = path.rpartition("/")
    return any(
        re.fullmatch(pattern, p) is not None or re.fullmatch(rf"(?:.*/)?(?:{pattern})", p) is not None
        for p in ((path, head) if head and leaf in WEIGHT_LEAVES else (path,))
    )


def _positive_finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _freeze_patterns(name: str, value: Mapping[str, float] | None) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    if isinstance(value, tuple) and all(isinstance(kv, tuple) and len(kv) == 2 for kv in value):
        return value  # a built config's own frozen form (dataclasses.replace passes it back)
    if not isinstance(value, Mapping):
        raise TypeError(f"LoraConfig.{name} must be a dict from regex to number, got {type(value).__name__}.")
    return tuple(value.items())


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which weights get LoRA factors, their rank, scale, dtype and init.

    Args:
      rank: the rank ``r`` of ``B·A``; a positive int.
      alpha: the scale numerator: ``scale = alpha / rank`` (or ``alpha / sqrt(rank)`` with ``rslora``).
        Defaults to ``rank`` (scale 1).
      targets: which weights to adapt, matched against module paths such as
        ``"encoder/layer_0/attention/query"``: a regex, a list of regexes or module names (each must
        match something), or ``"all-linear"`` (every weight that feeds a matmul).
        A pattern matches a path whole or a whole trailing part of it, so ``"query"`` matches
        ``"encoder/layer_0/attention/query"``.
      exclude: patterns of paths never to adapt, matched the same way.
      rank_pattern: ``{pattern: rank}`` overriding ``rank`` for matching paths (first match wins).
      alpha_pattern: ``{pattern: alpha}`` overriding ``alpha`` likewise.
      rslora: use rank-stabilised scaling ``alpha / sqrt(rank)``.
      dropout: dropout rate on the LoRA branch's input; active only when ``apply`` gets a
        ``dropout_key``.
      dtype: dtype of ``A`` and ``B`` (float32 by default, also when the weights are bfloat16; the
        product is computed in the layer's own compute dtype).
      modules_to_save: patterns of modules trained in full beside the factors (PEFT's
        ``modules_to_save``: a classifier head, norms): `init` puts a `SavedModule` holding a copy of
        each such module's leaves in the LoRA tree, and no factors inside it.
      init: ``"kaiming"`` (PEFT's default: ``A`` uniform in ``±1/sqrt(fan_in)``) or ``"gaussian"``
        (``A`` normal with std ``1/rank``). ``B`` always starts at zero.
      expert_rank: for expert weights (the group axis of a ``ragged_dot``, learnt by ``init`` from
        ``fn``): ``"per_expert"`` gives each expert its own rank-``rank`` pair; ``"split"`` divides
        the rank across the experts (``rank // experts`` each, as SkyRL does), so an expert stack costs
        about as many parameters as one dense layer of ``rank``. The scale stays ``alpha / rank``.
      dora: DoRA (PEFT's ``use_dora``): each adapted weight also gets a trainable magnitude ``m``,
        one per output feature, initialised to the norms of ``W``'s output columns; the layer
        computes ``m / ‖W + ΔW‖ · (W + ΔW)``, the norm treated as a constant in the backward pass.

    PEFT's names (``r``, ``lora_alpha``, ``target_modules``, ``use_dora``...) raise a ``TypeError``
    naming jaxlora's; `LoraConfig.from_peft` converts a PEFT config.

    Raises:
      ValueError, TypeError: for a field that cannot work, naming the field and the fix.

    Example:
      >>> import jaxlora
      >>> config = jaxlora.LoraConfig(rank=8, alpha=16, targets=r".*/(query|value)")
      >>> config.scale_for("encoder/layer_0/query")
      2.0
    """

    rank: int = 8
    alpha: float | None = None
    targets: str | Sequence[str] = ALL_LINEAR
    exclude: str | Sequence[str] = ()
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    rslora: bool = False
    dropout: float = 0.0
    dtype: jnp.dtype | str | type = jnp.float32
    init: Init = "kaiming"
    expert_rank: ExpertRank = "per_expert"
    dora: bool = False
    modules_to_save: str | Sequence[str] = ()

    def __post_init__(self) -> None:
        problems = []
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank <= 0:
            problems.append(f"rank must be a positive int, got {self.rank!r}; try rank=8.")
        if self.alpha is not None and not _positive_finite(self.alpha):
            problems.append(
                f"alpha must be a positive number or None (meaning alpha = rank), and finite; got {self.alpha!r}."
            )
        if isinstance(self.targets, str):
            targets: tuple[str, ...] = (self.targets,)
        else:
            targets = tuple(self.targets)
        if not targets:
            problems.append('targets is empty; pass a regex, a list of module names, or "all-linear".')
        set_("targets", self.targets if isinstance(self.targets, str) else targets)
        set_("exclude", (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude))
        saved = self.modules_to_save
        set_("modules_to_save", (saved,) if isinstance(saved, str) else tuple(saved or ()))
        for name in ("targets", "exclude", "modules_to_save"):
            for pattern in self.target_patterns if name == "targets" else getattr(self, name):
                if pattern == ALL_LINEAR:
                    continue
                try:
                    re.compile(pattern)
                except re.error as e:
                    problems.append(f"{name} pattern {pattern!r} is not a valid regex: {e}.")
        set_("rank_pattern", _freeze_patterns("rank_pattern", self.rank_pattern))
        set_("alpha_pattern", _freeze_patterns("alpha_pattern", self.alpha_pattern))
        for pattern, r in self.rank_pattern:
            if not isinstance(r, (int, np.integer)) or r <= 0:
                problems.append(f"rank_pattern[{pattern!r}] must be a positive int, got {r!r}.")
        for pattern, a in self.alpha_pattern:
            if not _positive_finite(a):
                problems.append(f"alpha_pattern[{pattern!r}] must be a positive number, and finite; got {a!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}.")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            problems.append(f"dtype {self.dtype!r} is not a dtype; use jnp.float32 or jnp.bfloat16.")
        else:
            if not jnp.issubdtype(dtype, jnp.floating):
                problems.append(f"dtype must be floating (A and B are trained), got {dtype}; use jnp.float32.")
            set_("dtype", dtype)
        if self.init not in ("kaiming", "gaussian"):
            problems.append(f'init must be "kaiming" or "gaussian", got {self.init!r}.')
        if self.expert_rank not in ("per_expert", "split"):
            problems.append(f'expert_rank must be "per_expert" or "split", got {self.expert_rank!r}.')
        if not isinstance(self.dora, (bool, np.bool_)):
            problems.append(f"dora must be True or False, got {self.dora!r}.")
        if problems:
            raise ValueError("Invalid LoraConfig:\n  " + "\n  ".join(problems))

    @property
    def target_patterns(self) -> tuple[str, ...]:
        """The targets as a tuple of patterns."""
        return (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)

    def rank_for(self, path: str) -> int:
        """The rank for the module at ``path`` (``rank_pattern`` first, then ``rank``)."""
        return int(next((r for p, r in self.rank_pattern if matches(p, path)), self.rank))

    def scale_for(self, path: str) -> float:
        """The scale ``alpha / r`` (or ``alpha / sqrt(r)``) for the module at ``path``."""
        r = self.rank_for(path)
        alpha = next((a for p, a in self.alpha_pattern if matches(p, path)), self.alpha)
        alpha = r if alpha is None else alpha
        return float(alpha / (math.sqrt(r) if self.rslora else r))

    def excludes(self, path: str) -> bool:
        """Whether ``exclude`` rules ``path`` out."""
        return any(matches(p, path) for p in self.exclude)

    @classmethod
    def from_peft(cls, peft_config: Any, **overrides: Any) -> LoraConfig:
        """The `LoraConfig` of a PEFT ``LoraConfig``, its dict, or an ``adapter_config.json`` path.

        Maps ``r`` -> ``rank``, ``lora_alpha`` -> ``alpha``, ``target_modules`` -> ``targets``
        (a list of module names becomes their trailing-name patterns, ``"self_attn.q_proj"`` ->
        ``"self_attn/q_proj"``; a regex keeps its meaning with ``\\.`` read as ``"/"``; ``"all-linear"``
        stays), ``exclude_modules`` -> ``exclude``, ``lora_dropout`` -> ``dropout``, ``use_dora`` ->
        ``dora``, ``use_rslora`` -> ``rslora``, ``init_lora_weights`` (``True`` -> ``"kaiming"``,
        ``"gaussian"``), and ``modules_to_save``, ``rank_pattern``, ``alpha_pattern`` as patterns.
        Torch module names often differ from Flax paths (``layers.0`` vs ``layers_0``): `jaxlora.init`
        says which targets match nothing. A PEFT object is read through its ``to_dict()``, so neither
        torch nor peft is imported here.

        Args:
          peft_config: a ``peft.LoraConfig``, its ``to_dict()``, or the path of an
            ``adapter_config.json`` or of the adapter directory holding one.
          **overrides: jaxlora fields to set on top (``dtype``, ``expert_rank``, ``targets``...).

        Returns:
          The `LoraConfig`.

        Raises:
          ValueError: naming every PEFT field jaxlora cannot honour (a ``bias`` other than ``"none"``,
            ``init_lora_weights="pissa"``/``"olora"``: use `jaxlora.init_from_weights`; ``loftq_config``,
            ``layers_to_transform``, ``target_parameters``, ...), or no ``target_modules`` and no ``targets``.
          FileNotFoundError: for a path with no ``adapter_config.json``.
          TypeError: for anything else.

        Example:
          >>> import jaxlora
          >>> peft = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "use_dora": True}
          >>> config = jaxlora.LoraConfig.from_peft(peft)
          >>> config.rank, config.alpha, config.targets, config.dora
          (16, 32, ('q_proj', 'v_proj'), True)
        """
        return cls(**(_peft_config.peft_fields(peft_config, frozenset(overrides)) | overrides))


@functools.wraps(LoraConfig.__init__)
def _init_with_peft_hint(self: LoraConfig, *args: Any, **kwargs: Any) -> None:
    peft = [name for name in kwargs if name in _peft_config.PEFT_NAMES]
    if peft:
        raise _peft_config.peft_spelling_error(peft)
    _dataclass_init(self, *args, **kwargs)


_dataclass_init = LoraConfig.__init__
LoraConfig.__init__ = _init_with_peft_hint  # type: ignore[method-assign]  # PEFT's names get jaxlora's in the error
