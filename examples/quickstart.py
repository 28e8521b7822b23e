"""jaxlora quickstart: pretrain a tiny Flax transformer on Python's own docs, then LoRA-adapt it to code.

Runs on two CPU cores in about a minute:

    python examples/quickstart.py

1. Pretrain a character-level language model (full fine-tuning) on the prose of `pydoc_data.topics`.
2. Adapt it with LoRA (rank 8 on the attention and MLP projections) to Python source code from the
   standard library, training only A and B.
3. Check that the merged model (W + scale·B·A) gives the same logits as the factored one.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import textwrap
import time
from pydoc_data import topics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxlora

CONTEXT = 64


class Block(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x):
        head_dim = self.d_model // self.heads
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.DenseGeneral((self.heads, head_dim), name=n)(h) for n in ("query", "key", "value"))
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        attn = nn.dot_product_attention(q, k, v, mask=mask)
        x = x + nn.DenseGeneral(self.d_model, axis=(-2, -1), name="out")(attn)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(self.d_model, name="fc2")(nn.gelu(nn.Dense(4 * self.d_model, name="fc1")(h)))


class CharLM(nn.Module):
    d_model: int = 96
    heads: int = 4
    layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(256, self.d_model, name="embed")(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (CONTEXT, self.d_model))[None, : tokens.shape[1]]
        for i in range(self.layers):
            x = Block(self.d_model, self.heads, name=f"block_{i}")(x)
        return nn.Dense(256, name="head")(nn.LayerNorm(name="ln_f")(x))


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", "replace"), np.uint8).astype(np.int32)


def batches(data: np.ndarray, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - CONTEXT - 1, batch)
        chunk = np.stack([data[s : s + CONTEXT + 1] for s in starts])
        yield chunk[:, :-1], chunk[:, 1:]


def cross_entropy(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def evaluate(loss_fn, data: np.ndarray, n: int = 8) -> float:
    it = batches(data, 32, seed=123)
    return float(np.mean([loss_fn(*next(it)) for _ in range(n)]))


def main(pretrain_steps: int, lora_steps: int, rank: int) -> dict:
    start = time.perf_counter()
    model = CharLM()
    prose = encode("\n".join(topics.topics.values()))
    code = encode("\n".join(inspect.getsource(m) for m in (textwrap, json.decoder, json.encoder, argparse)))
    code_train, code_test = code[: int(0.9 * len(code))], code[int(0.9 * len(code)) :]
    tokens = jnp.zeros((1, CONTEXT), jnp.int32)
    params = model.init(jax.random.key(0), tokens)

    # 1. Pretraining: ordinary full fine-tuning of every weight.
    opt = optax.adamw(3e-3)
    state = opt.init(params)

    @jax.jit
    def pretrain_step(params, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    data = batches(prose, 32, seed=0)
    for _ in (bar := tqdm(range(pretrain_steps), desc="pretrain on prose", ncols=90)):
        params, state, loss = pretrain_step(params, state, *next(data))
        bar.set_postfix(loss=f"{float(loss):.3f}")

    # 2. LoRA: the frozen params stay as they are; only the factors are trained.
    config = jaxlora.LoraConfig(rank=rank, alpha=2 * rank, targets=r".*/(query|value|out|fc1|fc2)")
    lora = jaxlora.init(jax.random.key(1), params, config, fn=model.apply, args=(tokens,))
    summary = jaxlora.summary(params, lora)
    print(summary)

    lora_loss = jax.jit(lambda lora, x, y: cross_entropy(jaxlora.apply(model.apply, params, lora, x), y))
    opt = optax.adamw(1e-2)
    state = opt.init(lora)

    @jax.jit
    def lora_step(lora, state, x, y):
        loss, grads = jax.value_and_grad(lora_loss)(lora, x, y)
        updates, state = opt.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, loss

    before = evaluate(lambda x, y: lora_loss(lora, x, y), code_test)
    data = batches(code_train, 32, seed=1)
    for _ in (bar := tqdm(range(lora_steps), desc="LoRA on code", ncols=90)):
        lora, state, loss = lora_step(lora, state, *next(data))
        bar.set_postfix(loss=f"{float(loss):.3f}")
    after = evaluate(lambda x, y: lora_loss(lora, x, y), code_test)

    # 3. Merge for inference: same logits, no extra cost per token.
    x, _ = next(batches(code_test, 4, seed=2))
    merged = jaxlora.merge(params, lora)
    gap = float(jnp.abs(model.apply(merged, x) - jaxlora.apply(model.apply, params, lora, x)).max())
    result = dict(
        trainable_percent=round(summary.percent, 3),
        code_loss_before=round(before, 3),
        code_loss_after=round(after, 3),
        merged_vs_unmerged_max_abs=gap,
        seconds=round(time.perf_counter() - start, 1),
    )
    print(
        f"held-out code loss: {before:.3f} -> {after:.3f} (nats/char); merged vs unmerged logits: max |Δ| = {gap:.2e}"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--lora-steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the results as JSON (the rest goes to stderr)")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = main(args.pretrain_steps, args.lora_steps, args.rank)
    if args.json:
        print(json.dumps(result, indent=2))
