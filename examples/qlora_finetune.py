"""QLoRA on the CPU: quantize the quickstart model to NF4, LoRA-train on it, compare with bf16 + LoRA.

Runs on two CPU cores in about a minute:

    python examples/qlora_finetune.py

1. Pretrain the quickstart's character-level transformer on Python's prose docs; store it in bfloat16.
2. Quantize that base to NF4 (bitsandbytes' layout: block 64, double quantization) with
   ``jaxlora.quantize``; the embedding and the output head stay bfloat16.
3. LoRA-train the same adapter on code twice, once on the bf16 base and once on the NF4 base, and
   print held-out code loss of the NF4 base alone, NF4 + LoRA and bf16 + LoRA, with each base's bytes,
   and what the NF4 base's bits per parameter count. ``--json`` prints the results as JSON instead.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import textwrap
import time
from pydoc_data import topics

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quickstart import CONTEXT, CharLM, batches, cross_entropy, encode, evaluate  # noqa: E402

import jaxlora  # noqa: E402


def pretrain(model, params, data, steps: int):
    opt = optax.adamw(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in (bar := tqdm(range(steps), desc="pretrain on prose", ncols=90)):
        params, state, loss = step(params, state, *next(data))
        bar.set_postfix(loss=f"{float(loss):.3f}")
    return params


def lora_train(model, base, config, data, steps: int, name: str):
    """Train LoRA factors on a frozen ``base`` (float or quantized); returns the adapter and its loss fn."""
    tokens = jnp.zeros((1, CONTEXT), jnp.int32)
    lora = jaxlora.init(jax.random.key(1), base, config, fn=model.apply, args=(tokens,))
    loss_of = jax.jit(
        lambda lora, x, y: cross_entropy(jaxlora.apply(model.apply, base, lora, x).astype(jnp.float32), y)
    )
    opt = optax.adamw(1e-2)
    state = opt.init(lora)

    @jax.jit
    def step(lora, state, x, y):
        loss, grads = jax.value_and_grad(loss_of)(lora, x, y)
        updates, state = opt.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, loss

    for _ in (bar := tqdm(range(steps), desc=f"LoRA on code, {name} base", ncols=90)):
        lora, state, loss = step(lora, state, *next(data))
        bar.set_postfix(loss=f"{float(loss):.3f}")
    return lora, loss_of


def bits_by_weight(qparams) -> dict[float, list[str]]:
    """``{bits a parameter: ["path (shape)", ...]}`` over the quantized weights."""
    out: dict[float, list[str]] = {}
    is_quantized = lambda w: isinstance(w, jaxlora.Quantized)  # noqa: E731
    for path, w in jax.tree_util.tree_leaves_with_path(qparams, is_leaf=is_quantized):
        if is_quantized(w):
            name = "/".join(str(getattr(k, "key", k)) for k in path[1:-1])
            out.setdefault(round(jaxlora.bits_per_parameter(w), 3), []).append(f"{name} {tuple(w.shape)}")
    return dict(sorted(out.items()))


def main(pretrain_steps: int = 200, lora_steps: int = 120, rank: int = 8) -> dict:
    start = time.perf_counter()
    model = CharLM(d_model=128)  # NF4 blocks of 64 must divide each weight's layer slice
    prose = encode("\n".join(topics.topics.values()))
    code = encode("\n".join(inspect.getsource(m) for m in (textwrap, json.decoder, json.encoder, argparse)))
    code_train, code_test = code[: int(0.9 * len(code))], code[int(0.9 * len(code)) :]
    params = model.init(jax.random.key(0), jnp.zeros((1, CONTEXT), jnp.int32))
    params = pretrain(model, params, batches(prose, 32, seed=0), pretrain_steps)

    bf16 = jax.tree_util.tree_map(lambda w: w.astype(jnp.bfloat16), params)
    nf4 = jaxlora.quantize(bf16, "nf4")
    config = jaxlora.LoraConfig(rank=rank, alpha=2 * rank, targets=r".*/(query|value|out|fc1|fc2)")
    base_loss = jax.jit(lambda p, x, y: cross_entropy(jaxlora.apply(model.apply, p, {}, x).astype(jnp.float32), y))

    rows = {}
    for name, base in (("bf16", bf16), ("nf4", nf4)):
        lora, loss_of = lora_train(model, base, config, batches(code_train, 32, seed=1), lora_steps, name)
        rows[name] = dict(
            base_loss=round(evaluate(lambda x, y, b=base: base_loss(b, x, y), code_test), 3),
            lora_loss=round(evaluate(lambda x, y, lo=lora, f=loss_of: f(lo, x, y), code_test), 3),
            base_bytes=jaxlora._quantized.nbytes(base),
            matrix_bits=round(jaxlora.bits_per_parameter(base), 3) if name == "nf4" else 16.0,
        )
    print(f"{'base':<6} {'base alone':>11} {'+ LoRA':>8} {'base bytes':>12} {'bits/param (matrices)':>22}")
    for name, r in rows.items():
        print(f"{name:<6} {r['base_loss']:>11.3f} {r['lora_loss']:>8.3f} {r['base_bytes']:>12,} {r['matrix_bits']:>22}")
    print("(held-out code loss in nats/char; LoRA trained on code from the same start on each base)")
    by_bits = bits_by_weight(nf4)
    print(
        "bits/param (matrices) = stored bits of the NF4 weights (4-bit codes, int8 absmax, float32 group scales) "
        "over their parameters; the embedding and the head stay bf16 and are not counted. By weight:"
    )
    for bits, names in by_bits.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        print(f"  {bits:>7.3f}  {shown}")
    print(
        "4.127 (the README's figure) = 4 + 8/64 + 32/(64*256): a 2-D weight, its absmax values in groups of 256.\n"
        "A 3-D kernel (in, heads, head_dim) keeps its first axis outside the blocks, as a stack of layers would,\n"
        "so each short slice pads its own group of 256 absmax values: at this toy size those pay far more."
    )
    result = dict(rows=rows, nf4_bits_by_weight=by_bits, seconds=round(time.perf_counter() - start, 1))
    print(
        f"NF4 + LoRA reaches {rows['nf4']['lora_loss']:.3f} vs bf16 + LoRA {rows['bf16']['lora_loss']:.3f} on a "
        f"base of {rows['nf4']['base_bytes'] / rows['bf16']['base_bytes']:.2f}x the bytes, in {result['seconds']} s"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--lora-steps", type=int, default=120)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the results as JSON (the rest goes to stderr)")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = main(args.pretrain_steps, args.lora_steps, args.rank)
    if args.json:
        print(json.dumps(result, indent=2))
