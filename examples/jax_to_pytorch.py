"""Train in JAX, serve in PyTorch: a Tunix Qwen3 fine-tuned with jaxlora, loaded by transformers + PEFT.

Runs on two CPU cores in under a minute (needs google-tunix, torch, transformers and peft):

    python examples/jax_to_pytorch.py                  # or --arch llama3, --tied

1. A tiny random Qwen3 (or Llama3) from Tunix (``tunix.models``, NNX) stands in for a pretrained one.
2. Fine-tune it with jaxlora (rank 4 on the attention and MLP projections and the output head) for a
   few Adam steps on a next-token loss; the model itself is never changed.
3. Export the adapter with `jaxlora.checkpoint.save_peft`, naming the modules as Hugging Face does
   through the shipped map ``jaxlora.checkpoint.TUNIX_NAMES`` (``layers/0/attn/q_proj`` ->
   ``model.layers.0.self_attn.q_proj``).
4. Build transformers' ``Qwen3ForCausalLM`` (``LlamaForCausalLM``) with the same config, copy the base
   weights over (`hf_state_dict`: the base is the user's to convert, the adapter is jaxlora's), load the
   adapter with ``peft.PeftModel.from_pretrained`` and check that the logits agree in float32 and that
   ``generate`` picks the same greedy tokens as the JAX model.
5. And back: PEFT's own ``save_pretrained`` files (no jaxlora metadata) load with
   `jaxlora.checkpoint.load_peft` and the same map to the factors that were trained.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.models.llama3 import model as llama3
from tunix.models.qwen3 import model as qwen3

import jaxlora

TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head)(/w)?"


def tiny_config(arch: str = "qwen3", tied: bool = False) -> qwen3.ModelConfig | llama3.ModelConfig:
    """A Qwen3 or Llama3 small enough for a CPU test: 2 layers, grouped-query attention (4 query, 2 kv heads)."""
    shapes = dict(num_layers=2, vocab_size=96, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=16, num_kv_heads=2)
    # Tunix 0.1.7's apply_rope is called without the config's rope_theta, so it uses its default 1e6 for both
    # models (Llama3's config says 5e5): keep 1e6 here and in the transformers config
    if arch == "qwen3":
        return qwen3.ModelConfig(**shapes, rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=tied)
    return llama3.ModelConfig(**shapes, rope_theta=1_000_000, norm_eps=1e-5, weight_tying=tied)


def _tied(config) -> bool:
    return config.use_tied_embedding if isinstance(config, qwen3.ModelConfig) else config.weight_tying


def random_model(config: qwen3.ModelConfig | llama3.ModelConfig, seed: int = 0) -> nnx.Module:
    """The Tunix model with every parameter random (Tunix initialises the MLP to zeros and the norms to ones)."""

    @nnx.jit  # one compiled init instead of many small eager ops
    def build():
        cls = qwen3.Qwen3 if isinstance(config, qwen3.ModelConfig) else llama3.Llama3
        model = cls(config, rngs=nnx.Rngs(seed))
        leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        # norms 1 + N(0, 0.1²), the embedding N(0, 1), matrices N(0, 1/d) with d their first axis (Tunix's
        # layouts put the input first; o_proj's (heads, head_dim, embed) gets heads, which only makes it larger)
        new = [
            1 + 0.1 * jax.random.normal(k, x.shape)
            if x.ndim == 1
            else jax.random.normal(k, x.shape) / x.shape[0] ** 0.5
            for k, x in zip(keys, leaves)
        ]
        nnx.update(model, jax.tree.unflatten(treedef, new))
        model.embedder.input_embedding.set_value(model.embedder.input_embedding[...] * config.vocab_size**0.5)
        return model

    return build()


def hf_config(config: qwen3.ModelConfig | llama3.ModelConfig):
    """transformers' ``Qwen3Config`` or ``LlamaConfig`` for a Tunix ``ModelConfig``."""
    from transformers import LlamaConfig, Qwen3Config

    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.embed_dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        rope_theta=1_000_000,
        tie_word_embeddings=_tied(config),
        max_position_embeddings=256,
        attention_bias=False,
        hidden_act="silu",
    )
    if isinstance(config, qwen3.ModelConfig):
        return Qwen3Config(**fields, use_sliding_window=False)
    return LlamaConfig(**fields, mlp_bias=False)


def hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The base weights of a Tunix Qwen3 or Llama3 under transformers' names, in torch's ``(out, in)`` layout.

    Tunix's Einsum weights flatten to the torch ``Linear``: q/k/v ``(embed, heads, head_dim)`` ->
    ``(heads·head_dim, embed)``, o ``(heads, head_dim, embed)`` -> ``(embed, heads·head_dim)``; the same
    row-major flattening `save_peft` gives the LoRA factors, so the base and the adapter line up.
    """
    c = model.config
    out = {
        "model.embed_tokens.weight": model.embedder.input_embedding[...],
        "model.norm.weight": model.final_norm.w[...],
    }
    if not _tied(c):
        out["lm_head.weight"] = model.lm_head.w[...].T
    for i, layer in enumerate(model.layers):
        p, attn, mlp = f"model.layers.{i}.", layer.attn, layer.mlp
        out[p + "input_layernorm.weight"] = layer.input_layernorm.w[...]
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.w[...]
        if isinstance(c, qwen3.ModelConfig):  # Qwen3 normalises each head's queries and keys
            out[p + "self_attn.q_norm.weight"] = attn.q_norm.w[...]
            out[p + "self_attn.k_norm.weight"] = attn.k_norm.w[...]
        for name in ("q_proj", "k_proj", "v_proj"):
            w = getattr(attn, name).w[...]
            out[p + f"self_attn.{name}.weight"] = w.reshape(w.shape[0], -1).T
        out[p + "self_attn.o_proj.weight"] = attn.o_proj.w[...].reshape(-1, c.embed_dim).T
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[p + f"mlp.{name}.weight"] = getattr(mlp, name).kernel[...].T
    return {k: np.array(v, np.float32) for k, v in out.items()}


def forward(model: nnx.Module, lora, tokens: jax.Array) -> jax.Array:
    """Logits ``(batch, seq, vocab)`` of the adapted model on a whole sequence, causal mask, no cache."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    logits, _ = jaxlora.nnx.apply(model, lora, tokens, positions, None, mask)
    return logits


def finetune(model: nnx.Module, data: jax.Array, *, steps: int, rank: int):
    """A few Adam steps of next-token cross-entropy on ``data``, training the LoRA factors only."""
    config = jaxlora.LoraConfig(rank=rank, alpha=2 * rank, targets=TARGETS)
    lora = jaxlora.nnx.init(jax.random.key(1), model, config, args=(data, *_example_args(data)))
    opt = optax.adam(3e-2)
    opt_state = opt.init(lora)

    def loss_fn(lora, model, data):
        logits = forward(model, lora, data[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, data[:, 1:]).mean()

    @nnx.jit
    def step(model, lora, opt_state, data):
        loss, grads = jax.value_and_grad(loss_fn)(lora, model, data)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        lora, opt_state, loss = step(model, lora, opt_state, data)
        losses.append(float(loss))
    return lora, config, losses


def _example_args(tokens):
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t), (b, t)), None, jnp.ones((b, t, t), bool)


def greedy(model: nnx.Module, lora, prompt: jax.Array, new_tokens: int) -> np.ndarray:
    """Greedy decoding in JAX: one compiled forward over a fixed-length buffer (the causal mask hides the
    positions not yet written), reading the logits at the last written position."""
    b, t = prompt.shape
    buf = jnp.zeros((b, t + new_tokens), prompt.dtype).at[:, :t].set(prompt)
    for pos in range(t, t + new_tokens):
        nxt = jnp.argmax(_forward(model, lora, buf)[:, pos - 1], axis=-1)
        buf = buf.at[:, pos].set(nxt.astype(buf.dtype))
    return np.array(buf)  # a writable copy (torch.from_numpy wants one)


_forward = nnx.jit(forward)


def main(steps: int = 5, rank: int = 4, new_tokens: int = 8, tied: bool = False, arch: str = "qwen3") -> dict:
    import peft
    import torch
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    start = time.perf_counter()
    config = tiny_config(arch, tied)
    model = random_model(config)
    data = jax.random.randint(jax.random.key(2), (8, 12), 0, config.vocab_size)
    lora, lora_config, losses = finetune(model, data, steps=steps, rank=rank)

    # Hugging Face's model with the same base weights, then the adapter through PEFT's own loader
    torch.manual_seed(0)
    hf = (Qwen3ForCausalLM if arch == "qwen3" else LlamaForCausalLM)(hf_config(config)).float().eval()
    hf.config._attn_implementation = "eager"
    state = {k: torch.from_numpy(v) for k, v in hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied_head = ["lm_head.weight"] if _tied(config) else []
    if missing != tied_head or unexpected:  # every base weight must be copied, and nothing else
        raise RuntimeError(f"hf_state_dict does not fit the model: missing {missing}, unexpected {unexpected}")
    with tempfile.TemporaryDirectory() as tmp:
        out = jaxlora.checkpoint.save_peft(
            tmp, lora, params=nnx.state(model, nnx.Param), config=lora_config, names=jaxlora.checkpoint.TUNIX_NAMES
        )
        target_modules = json.loads((out / "adapter_config.json").read_text())["target_modules"]
        served = peft.PeftModel.from_pretrained(hf, tmp).eval()
        # and back: PEFT's own files (no jaxlora metadata) placed on the Tunix weights by the same map
        served.save_pretrained(f"{tmp}/by_peft", save_embedding_layers=False)  # lm_head is no embedding
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        back = jaxlora.checkpoint.load_peft(
            f"{tmp}/by_peft/", params=params, names=jaxlora.checkpoint.TUNIX_NAMES,
            fn=jaxlora.nnx.call(graphdef, rest), args=(data, *_example_args(data)),
        )  # fmt: skip
    back_gap = max(
        float(np.abs(np.asarray(mine) - np.asarray(theirs)).max())
        for p, f in lora.items()
        for mine, theirs in ((f.a, back[p].a), (f.b, back[p].b))
    )
    back_same = sorted(back) == sorted(lora) and all(
        (back[p].roles, back[p].scale) == (f.roles, f.scale) for p, f in lora.items()
    )

    # the same sequences on both sides: the prompt and JAX's greedy continuation
    prompt = data[:4, :6]
    tokens = greedy(model, lora, prompt, new_tokens)
    jax_logits = np.asarray(_forward(model, lora, jnp.asarray(tokens)))
    jax_base = np.asarray(_forward(model, {}, jnp.asarray(tokens)))
    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        torch_logits = served(ids).logits.numpy()
        with served.disable_adapter():
            torch_base = served(ids).logits.numpy()
        torch_tokens = served.generate(
            ids[:, : prompt.shape[1]],
            attention_mask=torch.ones_like(ids[:, : prompt.shape[1]]),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        ).numpy()
    scale = float(np.abs(jax_logits).max())
    result = dict(
        losses=[round(x, 4) for x in losses],
        target_modules=len(target_modules),
        logits_scale=round(scale, 3),
        adapter_effect_max_abs=float(np.abs(jax_logits - jax_base).max()),
        base_max_abs=float(np.abs(jax_base - torch_base).max()),
        adapted_max_abs=float(np.abs(jax_logits - torch_logits).max()),
        peft_files_back_max_abs=back_gap,
        peft_files_back_same_modules=back_same,
        tokens_equal=bool((tokens == torch_tokens).all()),
        jax_tokens=tokens[:, prompt.shape[1] :].tolist(),
        torch_tokens=torch_tokens[:, prompt.shape[1] :].tolist(),
        seconds=round(time.perf_counter() - start, 1),
    )
    print(
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps; PEFT loaded {len(target_modules)} modules; "
        f"logits (scale {scale:.2f}) differ JAX vs PyTorch by {result['adapted_max_abs']:.1e} with the adapter "
        f"(which moves them by {result['adapter_effect_max_abs']:.2f}), {result['base_max_abs']:.1e} without; "
        f"greedy tokens {'identical' if result['tokens_equal'] else 'DIFFER'}; PEFT's re-saved files load back "
        f"{'to the same factors' if back_same and back_gap == 0 else 'DIFFERENT'}; {result['seconds']} s"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--arch", default="qwen3", choices=["qwen3", "llama3"])
    parser.add_argument("--tied", action="store_true", help="tie the output head to the embedding (Qwen3-0.6B)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (the rest goes to stderr)")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = main(args.steps, args.rank, args.new_tokens, args.tied, args.arch)
    if args.json:
        print(json.dumps(result, indent=2))
