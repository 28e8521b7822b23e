"""LoRA on a mixture-of-experts decoder: attention and the experts themselves, through ``ragged_dot``.

Runs on two CPU cores in about half a minute:

    python examples/moe_finetune.py

The model is Mixtral-shaped and tiny (Flax Linen): each layer has causal attention and a sparse
SwiGLU MLP with a router choosing the top 2 of 8 experts per token; the tokens are sorted by expert
and each expert's rows go through ``jax.lax.ragged_dot`` with its own slice of the expert weights
``(experts, d, ff)``. `jaxlora.init` traces the model and learns that the first axis of each expert
weight is the expert axis, so every expert gets its own pair ``a (experts, d, r)``,
``b (experts, r, ff)``; `jaxlora.apply` computes the expert matmuls as
``ragged_dot(x, W) + scale · ragged_dot(ragged_dot(x, a), b)``, never a weight-sized gradient.

1. Random weights stand in for a pretrained model; a "teacher" is the same model with a low-rank
   change to its attention and expert weights (a LoRA of rank 2 with random ``b``, merged).
2. Distil the teacher into the frozen model with LoRA (rank 4) on attention and experts.
3. Merge for inference and check the merged model matches the factored one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from tqdm import tqdm

import jaxlora

VOCAB, D, HEADS, FF, EXPERTS, TOP_K, LAYERS, SEQ = 64, 32, 4, 64, 8, 2, 2, 16


class SparseMlp(nn.Module):
    """Mixtral's sparse MLP: a router, the top-``TOP_K`` experts per token, SwiGLU experts."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: (tokens, D)
        logits = nn.Dense(EXPERTS, use_bias=False, name="router")(x)
        weights, expert = lax.top_k(logits, TOP_K)  # (tokens, TOP_K)
        weights = jax.nn.softmax(weights, axis=-1).reshape(-1)
        order = jnp.argsort(expert.reshape(-1))  # the (token, choice) pairs sorted by expert
        sizes = jnp.bincount(expert.reshape(-1), length=EXPERTS).astype(jnp.int32)
        rows = x[order // TOP_K]
        init = nn.initializers.normal(D**-0.5)
        gate = self.param("gate", init, (EXPERTS, D, FF))
        up = self.param("up", init, (EXPERTS, D, FF))
        down = self.param("down", nn.initializers.normal(FF**-0.5), (EXPERTS, FF, D))
        h = nn.silu(lax.ragged_dot(rows, gate, sizes)) * lax.ragged_dot(rows, up, sizes)
        y = lax.ragged_dot(h, down, sizes) * weights[order][:, None]
        return jnp.zeros_like(x).at[order // TOP_K].add(y)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:  # h: (batch, SEQ, D)
        b, s, _ = h.shape
        x = nn.RMSNorm(name="attn_norm")(h)
        q, k, v = (nn.Dense(D, use_bias=False, name=n)(x).reshape(b, s, HEADS, D // HEADS) for n in "qkv")
        mask = jnp.tril(jnp.ones((s, s), bool))
        att = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) / (D // HEADS) ** 0.5, -1e9)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, axis=-1), v).reshape(b, s, D)
        h = h + nn.Dense(D, use_bias=False, name="o")(out)
        return h + SparseMlp(name="moe")(nn.RMSNorm(name="mlp_norm")(h).reshape(b * s, D)).reshape(b, s, D)


class Mixtral(nn.Module):
    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nn.Embed(VOCAB, D, name="embed")(tokens)
        for i in range(LAYERS):
            h = Block(name=f"layer_{i}")(h)
        return nn.Dense(VOCAB, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(h))


TARGETS = [r".*/(q|k|v|o)", r".*/moe/(gate|up|down)"]  # attention and the experts; not the router


def main(steps: int = 150, rank: int = 4, batch: int = 8, lr: float = 1e-2, seed: int = 0) -> dict:
    k_model, k_teacher, k_b, k_lora, k_data = jax.random.split(jax.random.key(seed), 5)
    model = Mixtral()
    tokens = jnp.zeros((batch, SEQ), jnp.int32)
    params = model.init(k_model, tokens)

    # the teacher: a rank-2 change to the same weights (random b, merged into a copy)
    change = jaxlora.init(
        k_teacher, params, jaxlora.LoraConfig(rank=2, targets=TARGETS), fn=model.apply, args=(tokens,)
    )
    keys = iter(jax.random.split(k_b, len(change)))
    change = {
        p: jaxlora.LoraFactors(f.a, jax.random.normal(next(keys), f.b.shape), f.scale, f.roles)
        for p, f in change.items()
    }
    teacher = jaxlora.merge(params, change)

    config = jaxlora.LoraConfig(rank=rank, alpha=2 * rank, targets=TARGETS)
    lora = jaxlora.init(k_lora, params, config, fn=model.apply, args=(tokens,))
    print(jaxlora.summary(params, lora))
    print(
        "expert factors:",
        lora["layer_0/moe/gate"].roles,
        lora["layer_0/moe/gate"].a.shape,
        lora["layer_0/moe/gate"].b.shape,
    )
    opt = optax.adam(lr)

    def loss_fn(lora, tokens):
        logits = jaxlora.apply(model.apply, params, lora, tokens)
        target = jax.nn.softmax(model.apply(teacher, tokens))
        return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), axis=-1))  # distillation

    @jax.jit
    def step(lora, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(lora, tokens)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    held_out = jax.random.randint(jax.random.fold_in(k_data, 10**6), (batch, SEQ), 0, VOCAB)
    evaluate = jax.jit(loss_fn)
    before = float(evaluate(lora, held_out))
    opt_state, start = opt.init(lora), time.perf_counter()
    for i in (bar := tqdm(range(steps), desc="LoRA (distillation)", ncols=90)):
        lora, opt_state, loss = step(
            lora, opt_state, jax.random.randint(jax.random.fold_in(k_data, i), (batch, SEQ), 0, VOCAB)
        )
        bar.set_postfix(loss=f"{float(loss):.4f}")
    jax.block_until_ready(loss)
    seconds = time.perf_counter() - start
    after = float(evaluate(lora, held_out))
    floor = float(-jnp.mean(jnp.sum(jax.nn.softmax(l := model.apply(teacher, held_out)) * jax.nn.log_softmax(l), -1)))
    print(f"held-out distillation loss: {before:.4f} -> {after:.4f} (teacher entropy {floor:.4f}) in {seconds:.1f} s")

    unmerged = jaxlora.apply(model.apply, params, lora, held_out)
    merged = model.apply(jaxlora.merge(params, lora), held_out)
    gap = float(jnp.max(jnp.abs(merged - unmerged)))
    print(f"merged vs unmerged logits: max |diff| = {gap:.2e}")
    closed = (before - after) / (before - floor)
    print(
        f"LoRA on the expert weights closed {closed:.0%} of the gap to the teacher in {steps} steps ({seconds:.1f} s)"
    )
    return {
        "loss_before": before,
        "loss_after": after,
        "teacher_entropy": floor,
        "merged_vs_unmerged_max_abs": gap,
        "seconds": seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print the results as JSON (the rest goes to stderr)")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = main(steps=args.steps, rank=args.rank)
    if args.json:
        print(json.dumps(result, indent=2))
