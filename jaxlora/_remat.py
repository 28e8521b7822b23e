"""What the backward pass keeps: names on the LoRA op's values, and `jax.checkpoint` policies built on them.

Every adapted op (`_matmul.lora_op`) names two of its values with `jax.ad_checkpoint.checkpoint_name`:

* ``"lora_xa"``: the rank-``r`` product ``x·A`` (``r`` columns per token), which ``dB`` needs;
* ``"lora_out/<path>"`` (``path`` the module path, e.g. ``"layers/gate"``): the op's output, the base
  op plus the LoRA term (for DoRA, before the magnitude scaling). The model's own backward needs it
  wherever a nonlinearity follows (SwiGLU's gate and up, attention's q, k, v), and recomputing it
  is the block's big matmul again. Saving it costs one array, where
  ``dots_with_no_batch_dims_saveable`` keeps the two summands ``x·W`` and ``(x·A)·B`` apart.

The LoRA input ``x`` (which ``dA`` needs) is not named: it is the model's own activation, often
shared by several ops (q, k, v), and a name per op would make one saved copy per op. Name it in the
model (``checkpoint_name(h, "h")``) and pass ``names=("h",)`` to save it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
from jax.ad_checkpoint import checkpoint_name

from ._config import matches

XA = "lora_xa"
OUT = "lora_out"
LEVELS = ("minimal", "outputs")


@functools.cache
def _name_primitive():
    """checkpoint_name's primitive, as a jaxpr shows it (a policy reads its ``name`` parameter); found
    on first use, not at import."""
    return jax.make_jaxpr(lambda x: checkpoint_name(x, XA))(0.0).eqns[0].primitive


def remat_policy(
    keep: str = "outputs", *, targets: Sequence[str] | None = None, names: Sequence[str] = ()
) -> Callable[..., bool]:
    """A `jax.checkpoint` policy that saves jaxlora's named values and recomputes everything else.

    Pass it to your own ``jax.checkpoint``, ``nn.remat`` or ``nnx.remat`` around a block that
    `jaxlora.apply` adapts (the rewrite keeps the policy: docs/design.md, "What the backward keeps").

    * ``"minimal"`` saves the rank-``r`` products ``x·A`` (``"lora_xa"``): as frugal as whole-block
      remat (``r`` values a token per op more), and the backward skips their recomputation.
    * ``"outputs"`` also saves the adapted ops' outputs (``"lora_out/<path>"``) that the backward
      reads, of every module or of those ``targets`` matches: no recomputation of those matmuls.

    Args:
      keep: ``"minimal"`` or ``"outputs"``.
      targets: with ``"outputs"``, the modules whose outputs to save, as ``LoraConfig.targets``
        matches paths (``("gate", "up")`` matches ``"layers/gate"``); ``None`` for all.
      names: more `checkpoint_name` names of your model's own values to save as well.

    Returns:
      A policy ``(primitive, *avals, **params) -> bool`` (like ``jax.checkpoint_policies``' own).

    Raises:
      ValueError: ``keep`` is not one of the levels, or ``targets`` is given with ``"minimal"``.
      TypeError: ``names`` or ``targets`` is a string, or holds something other than strings.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"w": jnp.ones((4, 4))}
      >>> lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, targets=("w",)))
      >>> block = lambda p, x: jnp.tanh(x @ p["w"])
      >>> loss = lambda l, x: jax.checkpoint(lambda x: jaxlora.apply(block, params, l, x),
      ...                                    policy=jaxlora.remat_policy("outputs"))(x).sum()
      >>> jax.grad(loss)(lora, jnp.ones((3, 4)))["w"].a.shape
      (4, 2)
    """
    if keep not in LEVELS:
        raise ValueError(f"remat_policy: keep={keep!r} is not a level; expected one of {list(LEVELS)}.")
    for what, value in (("names", names), ("targets", () if targets is None else targets)):
        if isinstance(value, str) or not all(isinstance(n, str) for n in value):
            raise TypeError(
                f"remat_policy: {what} must be a sequence of strings, got {value!r}; "
                f'e.g. {what}=("gate", "up"), not {what}="gate".'
            )
    if targets is not None and keep != "outputs":
        raise ValueError(f'remat_policy: targets={targets!r} selects outputs to save; pass keep="outputs" with it.')
    fixed = {XA, *names}
    outputs = keep == "outputs"
    name_p = _name_primitive()

    def policy(prim, *_, **params) -> bool:
        if prim is not name_p:
            return False
        name = params["name"]
        if name in fixed:
            return True
        if not outputs or not (name == OUT or name.startswith(OUT + "/")):
            return False
        path = name[len(OUT) + 1 :]
        return targets is None or any(matches(t, path) for t in targets)

    return policy
