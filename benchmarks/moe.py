"""Mixture-of-experts training step: full fine-tuning against LoRA on attention, and on attention + experts.

A Mixtral-shaped decoder (Flax Linen): grouped-query attention and a sparse SwiGLU MLP per layer, a
router choosing the top 2 of 8 experts per token, the tokens sorted by expert and each expert's rows
multiplied through ``jax.lax.ragged_dot`` with the ``(experts, d, ff)`` expert weights. Each mode
runs in its own process (its own peak memory):

  full          full fine-tuning: bfloat16 weights, adamw, params and optimizer state donated.
  lora_attn     LoRA (jaxlora.apply) on q, k, v, o only.
  lora_experts  LoRA on q, k, v, o and every expert weight (gate, up, down: one pair per expert).

The optimizer is ``optax.adamw(1e-4, mu_dtype=--mu-dtype)`` in every mode; with ``float32`` moments
full fine-tuning of the Mixtral-shaped config (11.9 B parameters) does not fit one H200, so the
default is ``bfloat16`` (both moments then take the weights' dtype).

    python -m benchmarks.moe --config mixtral --out benchmarks/results/moe_h200.json

(``--ragged-lowering pallas`` uses JAX's Triton kernel for ``ragged_dot`` on a GPU instead of XLA's)
prints step time and peak memory, each as a ratio to full fine-tuning, and writes JSON with the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

MODES = ("full", "lora_attn", "lora_experts")
ATTENTION = ("q", "k", "v", "o")
EXPERTS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    d_model: int = 4096
    n_layers: int = 8
    n_heads: int = 32
    n_kv_heads: int = 8
    d_ff: int = 14336
    experts: int = 8
    top_k: int = 2
    vocab: int = 32000
    batch: int = 4
    seq: int = 2048
    dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def params(self) -> int:
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        layer = 2 * d * d + 2 * d * kv + d * self.experts + 3 * self.experts * d * self.d_ff + 2 * d
        return self.n_layers * layer + 2 * d * self.vocab + d


CONFIGS = {
    "mixtral": MoeConfig(),  # Mixtral 8x7B's layer shape, 8 layers (of 32), at 4 x 2048 tokens
    "tiny": MoeConfig(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        experts=4,
        vocab=256,
        batch=2,
        seq=32,
        dtype="float32",
    ),  # fmt: skip
}


def _model(cfg: MoeConfig):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax import lax

    from . import models

    dt = jnp.dtype(cfg.dtype)
    init = nn.initializers.normal(0.02)

    class SparseMlp(nn.Module):
        @nn.compact
        def __call__(self, x):  # (tokens, d)
            logits = nn.Dense(cfg.experts, use_bias=False, dtype=dt, param_dtype=dt, name="router")(x)
            weights, expert = lax.top_k(logits.astype(jnp.float32), cfg.top_k)
            weights = jax.nn.softmax(weights, axis=-1).astype(dt).reshape(-1)
            order = jnp.argsort(expert.reshape(-1))
            sizes = jnp.bincount(expert.reshape(-1), length=cfg.experts).astype(jnp.int32)
            rows = x[order // cfg.top_k]
            shape = (cfg.experts, cfg.d_model, cfg.d_ff)
            gate, up = self.param("gate", init, shape, dt), self.param("up", init, shape, dt)
            down = self.param("down", init, (cfg.experts, cfg.d_ff, cfg.d_model), dt)
            h = nn.silu(lax.ragged_dot(rows, gate, sizes)) * lax.ragged_dot(rows, up, sizes)
            y = lax.ragged_dot(h, down, sizes) * weights[order][:, None]
            return jnp.zeros_like(x).at[order // cfg.top_k].add(y)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            b, t, d = x.shape
            dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
            h = models.RMSNorm(dt, name="ln1")(x)
            kv = cfg.n_kv_heads * cfg.head_dim
            q = dense(d, "q")(h).reshape(b, t, cfg.n_heads, cfg.head_dim)
            k = dense(kv, "k")(h).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
            v = dense(kv, "v")(h).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
            x = x + dense(d, "o")(models.attention(q, k, v).reshape(b, t, d))
            h = models.RMSNorm(dt, name="ln2")(x)
            return x + SparseMlp(name="moe")(h.reshape(b * t, d)).reshape(b, t, d)

    class Mixtral(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(cfg.vocab, cfg.d_model, dtype=dt, param_dtype=dt, name="embed")(tokens)
            for i in range(cfg.n_layers):
                x = Block(name=f"layer_{i}")(x)
            x = models.RMSNorm(dt, name="ln_f")(x)
            return nn.Dense(cfg.vocab, use_bias=False, dtype=dt, param_dtype=dt, name="lm_head")(x)

    return Mixtral()


def _measure(a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxlora

    from . import models, train_step

    if a.ragged_lowering == "pallas":  # JAX's Triton kernel for ragged_dot on a GPU instead of XLA's
        jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", True)
    cfg = dataclasses.replace(CONFIGS[a.config], **json.loads(a.override))
    model = _model(cfg)
    tokens = jax.random.randint(jax.random.key(0), (cfg.batch, cfg.seq), 0, cfg.vocab, dtype=jnp.int32)
    opt = optax.adamw(1e-4, mu_dtype=jnp.dtype(a.mu_dtype))
    t0 = time.perf_counter()
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    apply = lambda p, t: models.loss_fn(model.apply(p, t), t)  # noqa: E731
    lora = None
    if a.mode == "full":
        step = train_step._optimizer_step(opt, apply)
        state = [params, jax.jit(opt.init)(params)]
        run = lambda: state.__setitem__(slice(0, 3), step(state[0], state[1], tokens))  # noqa: E731
    elif a.mode in ("lora_attn", "lora_experts"):
        targets = [rf".*/{n}" for n in ATTENTION] + (
            [rf".*/moe/{n}" for n in EXPERTS] if a.mode == "lora_experts" else []
        )
        config = jaxlora.LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=targets, expert_rank=a.expert_rank)
        lora = jaxlora.init(jax.random.key(1), params, config, fn=model.apply, args=(tokens,))
        loss_of = lambda l, p, t: models.loss_fn(jaxlora.apply(model.apply, p, l, t), t)  # noqa: E731
        step = train_step._optimizer_step(opt, loss_of)
        state = [lora, opt.init(lora)]
        run = lambda: state.__setitem__(slice(0, 3), step(state[0], state[1], params, tokens))  # noqa: E731
    else:
        raise ValueError(f"unknown mode {a.mode!r}; expected one of {MODES}")

    def blocking():
        run()
        jax.block_until_ready(state[-1])

    blocking()  # compile
    compile_s = time.perf_counter() - t0
    for _ in range(a.warmup):
        blocking()
    ms = models.timeit(blocking, a.steps, 0)
    piped = models.timeit_pipelined(run, lambda: jax.block_until_ready(state[-1]), a.steps, a.window)
    out = {
        "mode": a.mode,
        "median_ms": models.median(ms),
        "pipelined_ms": models.median(piped),
        "step_ms": [round(x, 3) for x in ms],
        "peak_bytes": models.peak_bytes(),
        "loss": float(state[-1]),
        "compile_s": round(compile_s, 1),
    }
    if lora is not None:
        out["trainable"] = jaxlora.summary(params, lora).trainable
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mixtral", choices=sorted(CONFIGS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mode", default="full")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--expert-rank", default="per_expert", choices=["per_expert", "split"])
    p.add_argument("--mu-dtype", default="bfloat16", help="adamw's first-moment dtype, in every mode")
    p.add_argument("--ragged-lowering", default="xla", choices=["xla", "pallas"], help="ragged_dot on a GPU")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--override", default="{}", help="JSON of MoeConfig fields to change, e.g. '{\"n_layers\": 2}'")
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_measure(a)), flush=True)
        return {}

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # this process only reads the device name
    from . import common

    cfg = dataclasses.replace(CONFIGS[a.config], **json.loads(a.override))
    flags = ["--config", a.config, "--rank", str(a.rank), "--expert-rank", a.expert_rank, "--mu-dtype", a.mu_dtype]
    flags += ["--ragged-lowering", a.ragged_lowering]
    flags += ["--steps", str(a.steps), "--window", str(a.window), "--warmup", str(a.warmup), "--override", a.override]
    result = {
        **common.environment(),
        "benchmark": "moe",
        "config_name": a.config,
        "config": dataclasses.asdict(cfg),
        "params": cfg.params(),
        "lora": {"rank": a.rank, "alpha": 2 * a.rank, "expert_rank": a.expert_rank, "dtype": "float32"},
        "optimizer": f"optax.adamw(1e-4, mu_dtype={a.mu_dtype})",
        "ragged_lowering": a.ragged_lowering,
        "modes": common.run_workers(
            "benchmarks.moe", {m: ["--mode", m, *flags] for m in a.modes.split(",")}, a.timeout, parallel=False
        ),  # fmt: skip
    }
    common.add_ratios(result["modes"], "full")
    print(f"\n{result['device']}  config {a.config}  batch {cfg.batch}x{cfg.seq}  {cfg.experts} experts "
          f"top-{cfg.top_k}  rank {a.rank}  {cfg.params() / 1e9:.2f}B params")  # fmt: skip
    common.print_steps(result["modes"])
    common.write(result, a.out)
    return result


if __name__ == "__main__":
    main()
