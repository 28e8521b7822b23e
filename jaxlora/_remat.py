"""What the backward pass keeps: names on the LoRA op's values, and `jax.checkpoint` policies built on them.

Every adapted op (`_matmul.lora_op`) names two of its values with `jax.ad_checkpoint.checkpoint_name`:

* ``"lora_xa"``: the rank-``r`` product ``x·A`` (``r`` columns per token), which ``dB`` needs;
* ``"lora_out"``: the op's output, the base op plus the LoRA term (for DoRA, before the magnitude
  scaling); the model's own backward needs it wherever a nonlinearity follows (SwiGLU's gate and up,
  attention's q, k, v). Saving it costs one array, where ``dots_with_no_batch_dims_saveable`` keeps
  the two summands ``x·W`` and ``(x·A)·B`` separately.

The LoRA input ``x`` (which ``dA`` needs) is not named: it is the model's own activation, often
shared by several ops (q, k, v), and a name per op would make one saved copy per op. Name it in the
model (``checkpoint_name(h, "h")``) and pass ``names=("h",)`` to save it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

XA = "lora_xa"
OUT = "lora_out"

# what each policy saves, most frugal first
KEEP: dict[str, tuple[str, ...]] = {"minimal": (XA,), "outputs": (XA, OUT)}


def remat_policy(keep: str = "outputs", *, names: Sequence[str] = ()) -> Callable[..., bool]:
    """A `jax.checkpoint` policy that saves jaxlora's named values and recomputes everything else.

    Pass it to your own ``jax.checkpoint``, ``nn.remat`` or ``nnx.remat`` around a block that
    `jaxlora.apply` adapts (the rewrite keeps the policy: docs/design.md, "What the backward keeps").

    * ``"minimal"`` saves the rank-``r`` products ``x·A`` (``"lora_xa"``): as frugal as whole-block
      remat (``r`` values a token per op more), and the backward skips their recomputation.
    * ``"outputs"`` also saves each adapted op's output (``"lora_out"``): the backward recomputes no
      adapted matmul, only the cheap ops between them (norms, activations, attention).

    Args:
      keep: ``"minimal"`` or ``"outputs"``.
      names: more `checkpoint_name` names of your model's own values to save as well.

    Returns:
      A policy: ``jax.checkpoint_policies.save_only_these_names`` of the names.

    Raises:
      ValueError: ``keep`` is not one of the levels.
      TypeError: ``names`` is a string, or holds something other than strings.

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
    if keep not in KEEP:
        raise ValueError(f"remat_policy: keep={keep!r} is not a level; expected one of {sorted(KEEP)}.")
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"remat_policy: names must be a sequence of checkpoint_name strings, got {names!r}; "
            f'e.g. names=("attn_out",), not names="attn_out".'
        )
    return jax.checkpoint_policies.save_only_these_names(*KEEP[keep], *names)
