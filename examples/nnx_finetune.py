"""LoRA on a Flax NNX model: adapt a small sequence model to a shifted task.

Runs on two CPU cores in about half a minute:

    python examples/nnx_finetune.py

1. An NNX model (attention with ``nnx.LinearGeneral``, an ``nnx.Linear`` MLP, blocks created by
   ``nnx.vmap`` and run by ``nnx.scan``) stands in for a pretrained model.
2. The task shifts: the targets come from the same model with a low-rank change to its MLP kernels
   the situation LoRA is made for. Adapt the frozen model with LoRA (rank 4 on the
   attention and MLP projections), training only A and B in an ``nnx.jit`` step; the model itself
   is never mutated.
3. Merge the factors into a new model for inference and check it matches the factored one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

import jaxlora

SEQ, D_IN, D_MODEL, HEADS, LAYERS, D_OUT = 6, 8, 16, 2, 2, 4


class Block(nnx.Module):
    """Multi-head self-attention (``nnx.LinearGeneral`` projections) and an MLP (``nnx.Linear``)."""

    def __init__(self, rngs: nnx.Rngs):
        head_dim = D_MODEL // HEADS
        self.query = nnx.LinearGeneral(D_MODEL, (HEADS, head_dim), rngs=rngs)
        self.key = nnx.LinearGeneral(D_MODEL, (HEADS, head_dim), rngs=rngs)
        self.value = nnx.LinearGeneral(D_MODEL, (HEADS, head_dim), rngs=rngs)
        self.out = nnx.LinearGeneral((HEADS, head_dim), D_MODEL, axis=(-2, -1), rngs=rngs)
        self.norm1 = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.norm2 = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.fc1 = nnx.Linear(D_MODEL, 2 * D_MODEL, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D_MODEL, D_MODEL, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm1(x)
        attn = nnx.dot_product_attention(self.query(h), self.key(h), self.value(h))
        x = x + self.out(attn)
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Linear(D_IN, D_MODEL, rngs=rngs)
        self.blocks = nnx.split_rngs(splits=LAYERS)(nnx.vmap(Block, in_axes=0, out_axes=0))(rngs)  # stacked
        self.head = nnx.Linear(D_MODEL, D_OUT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        run = nnx.scan(lambda block, h: block(h), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        return self.head(run(self.blocks, self.embed(x)).mean(axis=1))


def make_task(model: Model, key: jax.Array):
    """Targets from a copy of ``model`` whose stacked MLP kernels get a rank-2 change."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda v: v, state)  # a copy: the model is left alone
    for name, (d_in, d_out) in (("fc1", (D_MODEL, 2 * D_MODEL)), ("fc2", (2 * D_MODEL, D_MODEL))):
        kernel = state["blocks"][name]["kernel"]
        ku, kv, key = jax.random.split(key, 3)
        u = 0.3 * jax.random.normal(ku, (LAYERS, d_in, 2)) / d_in**0.5
        v = jax.random.normal(kv, (LAYERS, 2, d_out))
        kernel.set_value(kernel[...] + u @ v)
    fn = jax.jit(jaxlora.nnx.call(graphdef))  # the model as a pure function of its state
    return lambda x: fn(state, x)


def batches(task, seed: int, batch: int = 64):
    sample = jax.jit(lambda key: jax.random.normal(key, (batch, SEQ, D_IN)))
    for step in range(10**9):
        x = sample(jax.random.key(seed * 100_003 + step))
        yield x, task(x)


def mse(pred: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((pred - y) ** 2)


def main(lora_steps: int = 200, rank: int = 4) -> dict:
    start = time.perf_counter()
    model = nnx.jit(Model)(nnx.Rngs(0))  # one compiled init instead of many small eager ops
    task = make_task(model, jax.random.key(1))

    # 2. LoRA: the model is frozen; A and B are a separate pytree.
    x0 = jax.ShapeDtypeStruct((1, SEQ, D_IN), jnp.float32)
    config = jaxlora.LoraConfig(rank=rank, alpha=2 * rank, targets=r"blocks/(query|value|out|fc1|fc2)")
    lora = jaxlora.nnx.init(jax.random.key(1), model, config, args=(x0,))
    summary = jaxlora.nnx.summary(model, lora)
    print(summary)
    frozen = jax.tree.map(lambda v: v.copy(), nnx.state(model, nnx.Param))

    opt = optax.adam(1e-2)
    opt_state = opt.init(lora)

    @nnx.jit
    def lora_step(model, lora, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda lora: mse(jaxlora.nnx.apply(model, lora, x), y))(lora)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    test_x, test_y = next(batches(task, seed=99, batch=512))
    evaluate = nnx.jit(lambda model, lora: mse(jaxlora.nnx.apply(model, lora, test_x), test_y))
    before = float(evaluate(model, lora))
    data = batches(task, seed=1)
    for _ in (bar := tqdm(range(lora_steps), desc="LoRA", ncols=90)):
        lora, opt_state, loss = lora_step(model, lora, opt_state, *next(data))
        bar.set_postfix(loss=f"{float(loss):.4f}")
    after = float(evaluate(model, lora))

    # 3. Merge into a new model for inference; the frozen one is unchanged.
    merged = jaxlora.nnx.merge(model, lora)
    gap = float(jnp.abs(merged(test_x) - jaxlora.nnx.apply(model, lora, test_x)).max())
    unchanged = all(
        jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), frozen, nnx.state(model, nnx.Param)))
    )
    result = dict(
        trainable_percent=round(summary.percent, 3),
        loss_before=round(before, 4),
        loss_after=round(after, 4),
        merged_vs_unmerged_max_abs=gap,
        model_unchanged=unchanged,
        seconds=round(time.perf_counter() - start, 1),
    )
    print(
        f"test loss {before:.4f} -> {after:.4f} training {summary.percent:.2f}% of the parameters; merged vs "
        f"unmerged outputs differ by at most {gap:.1e}; the frozen model {'is unchanged' if unchanged else 'CHANGED'}; "
        f"{result['seconds']} s"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora-steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print the results as JSON (the rest goes to stderr)")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = main(args.lora_steps, args.rank)
    if args.json:
        print(json.dumps(result, indent=2))
