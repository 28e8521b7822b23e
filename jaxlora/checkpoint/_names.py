"""Name maps from third-party JAX model code to its Hugging Face twin, for `save_peft` and `load_peft`.

A map is a dict ``{regex: replacement}`` (the ``names=`` argument): the first pattern that fully
matches a jaxlora module path gives the torch module name. Each map covers the modules PEFT can adapt
with the same math: the attention and MLP projections and the untied output head. The embedding is left
out on purpose: with tied embeddings jaxlora's adapter on the table also reaches the output head
(``Embed.attend``), where PEFT's ``lora_embedding_A/B`` changes the lookup only, so writing it under the
torch name would load silently different; a module no pattern matches is an error instead.
"""

from __future__ import annotations

TUNIX_NAMES: dict[str, str] = {
    r"layers/(\d+)/attn/(q_proj|k_proj|v_proj|o_proj)(?:/w)?": r"model.layers.\1.self_attn.\2",
    r"layers/(\d+)/mlp/(gate_proj|up_proj|down_proj)": r"model.layers.\1.mlp.\2",
    r"lm_head(?:/w)?": "lm_head",
}
"""Tunix's NNX Llama3, Qwen2 and Qwen3 (google-tunix 0.1.7, dense) -> transformers' module names, as ``names=``.

The attention projections are ``Einsum`` modules with a weight leaf ``w``: ``(embed, heads, head_dim)`` for
q, k and v and ``(heads, head_dim, embed)`` for o, which flatten row-major to the torch ``Linear`` as PEFT's
``(r, in)`` and ``(out, r)`` need; the MLP projections are ``nnx.Linear``. ``(?:/w)?`` takes the path with
or without the Einsum's leaf name. The embedding is not mapped (see the module docstring).

Example:
  >>> from jaxlora.checkpoint import TUNIX_NAMES, torch_name
  >>> torch_name("layers/0/attn/q_proj/w", TUNIX_NAMES), torch_name("layers/0/mlp/down_proj", TUNIX_NAMES)
  ('model.layers.0.self_attn.q_proj', 'model.layers.0.mlp.down_proj')
"""
