"""``modules_to_save``: small modules (a classifier head, norms) trained in full beside the factors.

A `SavedModule` sits in the LoRA tree under its module path, next to the `LoraFactors` of other
modules, and holds a trainable copy of every leaf of that module (``{"kernel": ..., "bias": ...}``,
names relative to the module). `jaxlora.apply` reads these copies in place of the frozen leaves,
`jaxlora.merge` writes them into ``params``, and `jaxlora.mask`, the optimizers and the checkpoints
see them as ordinary trainable leaves. A weight inside a saved module gets no factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ._tree import module_leaves, nearest


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SavedModule:
    """A module trained in full (PEFT's ``modules_to_save``): a pytree whose leaves are its weights.

    Attributes:
      weights: ``{leaf name: array}``, leaf names relative to the module path (``"kernel"``,
        ``"bias"``, ``"dense/kernel"``), same shapes and dtypes as in ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> head = SavedModule({"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)})
      >>> head.size
      10
    """

    weights: dict[str, jax.Array]

    @property
    def size(self) -> int:
        """The number of trainable parameters."""
        return sum(int(w.size) for w in self.weights.values())


def fit(params: Any, saved: Mapping[str, SavedModule]) -> dict[str, dict[str, int]]:
    """``{module: {leaf name: leaf index}}``; raises once, listing every copy that does not fit ``params``."""
    modules = module_leaves(params)
    out, problems = {}, []
    for path, s in saved.items():
        have = modules.get(path)
        if have is None:
            problems.append(f"{path!r} (a saved module) is no module of params; {nearest(path, modules)}.")
            continue
        if set(have) != set(s.weights):
            problems.append(f"{path!r}: params has leaves {sorted(have)}, the saved module {sorted(s.weights)}.")
            continue
        bad = [
            f"{n} {tuple(w.shape)} vs {tuple(have[n][1].shape)}"
            for n, w in s.weights.items()
            if tuple(w.shape) != tuple(have[n][1].shape)
        ]
        if bad:
            problems.append(f"{path!r}: saved module shapes differ from params: {', '.join(bad)}.")
            continue
        out[path] = {n: i for n, (i, _) in have.items()}
    if problems:
        raise ValueError("The saved modules do not fit params:\n  " + "\n  ".join(problems))
    return out


def copy(leaves: Mapping[str, tuple[int, Any]], path: str) -> SavedModule:
    """A `SavedModule` holding the module's current weights."""
    bad = [n for n, (_, leaf) in leaves.items() if isinstance(leaf, jax.ShapeDtypeStruct)]
    if bad:
        raise TypeError(
            f"modules_to_save copies {path!r}, but params holds only the shapes of {bad}; pass the loaded "
            "weights (or call init under jax.eval_shape to get shapes only)."
        )
    return SavedModule({n: jnp.asarray(leaf) for n, (_, leaf) in leaves.items()})


def substitute(params: Any, saved: Mapping[str, SavedModule], cast: bool = False) -> Any:
    """``params`` with every leaf of each saved module replaced by its copy (cast to the leaf's dtype)."""
    if not saved:
        return params
    where = fit(params, saved)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for path, s in saved.items():
        for n, i in where[path].items():
            w = s.weights[n]
            leaves[i] = w.astype(leaves[i].dtype) if cast else w
    return jax.tree_util.tree_unflatten(treedef, leaves)
