"""The JAX peer: jaxlora against Tunix + qwix LoRA on the same Tunix Llama3-8B-shaped model, each in its own process.

Both modes train rank-``r`` LoRA factors (``alpha = 2r``) on the same modules of the same model (Tunix's NNX
``Llama3``, ``ModelConfig.llama3p1_8b`` shapes, random bfloat16 weights), with the same batch, next-token cross
entropy (logits cast to float32) and ``optax.adamw(1e-4)``, in one ``jax.jit`` step that donates the factors and
their optimizer state:

* ``jaxlora``: ``jaxlora.nnx.init`` on the model, ``jaxlora.apply`` of ``jaxlora.nnx.call(graphdef, rest)``
  over the frozen ``nnx.Param`` state;
* ``qwix``: ``qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=..., rank, alpha))``, as Tunix's
  trainers do, then ``nnx.split(model, nnx.LoRAParam, ...)``: the factors are the trained state;
* ``qwix_nnx``: the same model trained as Tunix's ``PeftTrainer`` does: ``nnx.Optimizer(wrt=nnx.LoRAParam)``,
  ``nnx.value_and_grad(argnums=nnx.DiffState(0, nnx.LoRAParam))``, ``nnx.jit`` through ``nnx.cached_partial``.

With ``--remat`` (Tunix's ``RematConfig.DECODER``, ``nnx.remat`` per layer) the ``qwix`` mode fails: qwix writes
its factors inside the ``nnx.remat`` trace of a model merged under ``jax.jit`` (flax's ``TraceContextError``);
``qwix_nnx`` and ``jaxlora`` run (seen on the CPU, flax 0.12.8).

qwix makes its factors in the weight's dtype (bfloat16 here), so jaxlora's are bfloat16 too (``--lora-dtype``).
Each mode reports the loss of its first step (both start at ``B = 0``, so both are the base model's loss: a
check that they run the same model), compile time, step time (median of ``--steps`` blocking steps;
``pipelined_ms``: ``--window`` steps dispatched back to back), tokens/s,
the device's peak memory and the compiled step's memory analysis.

    python -m benchmarks.jax_peer --out benchmarks/results/jax_peer_h200.json      # on the GPU

On the H200 each 8B mode takes over 100 s to make its model, set up and compile (both modes ran out of a
100 s ``--timeout`` on 2026-12-03, ``jax_peer_h200_timeout.json``): give it 300 s. Each worker prints its
progress (model made, LoRA set up, first step compiled) to stderr, kept in the JSON if it times out.
    python -m benchmarks.jax_peer --config tiny                                      # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

MODES = ("jaxlora", "qwix", "qwix_nnx")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {  # name -> (ModelConfig classmethod or fields, batch, seq)
    "8b": ("llama3p1_8b", 2, 2048),
    "tiny": (
        dict(
            num_layers=2,
            vocab_size=256,
            embed_dim=64,
            hidden_dim=128,
            num_heads=4,
            head_dim=16,
            num_kv_heads=2,
            rope_theta=500_000,
            norm_eps=1e-5,
        ),
        2,
        32,
    ),  # fmt: skip
}


def _model_config(name: str, remat: bool):
    import dataclasses

    from tunix.models.llama3 import model as llama3

    spec = CONFIGS[name][0]
    cfg = getattr(llama3.ModelConfig, spec)() if isinstance(spec, str) else llama3.ModelConfig(**spec)
    return dataclasses.replace(cfg, remat_config=llama3.RematConfig.DECODER) if remat else cfg


def _random_model(cfg, dtype):
    """The model with every weight N(0, 0.02²) in ``dtype``, made in one compiled program (no float32 copy)."""
    import jax
    from flax import nnx
    from tunix.models.llama3 import model as llama3

    graphdef, state = nnx.split(nnx.eval_shape(lambda: llama3.Llama3(cfg, rngs=nnx.Rngs(0))))

    @jax.jit
    def make(key):
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(key, len(leaves))
        new = [(0.02 * jax.random.normal(k, x.shape)).astype(dtype) for k, x in zip(keys, leaves)]
        return jax.tree.unflatten(treedef, new)

    return nnx.merge(graphdef, make(jax.random.key(0)))


def _worker(a: argparse.Namespace) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from . import common, models

    dtype = jnp.dtype(a.dtype)
    cfg = _model_config(a.config, a.remat)
    batch, seq = a.batch or CONFIGS[a.config][1], a.seq or CONFIGS[a.config][2]
    t_start = time.perf_counter()

    def progress(what: str) -> None:  # to stderr as it goes: a mode past its time shows where it was
        print(f"[{a.mode}] {what}: {time.perf_counter() - t_start:.1f} s", file=sys.stderr, flush=True)

    model = _random_model(cfg, dtype)
    jax.block_until_ready(nnx.state(model))
    progress("random model made")
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))
    small = (tokens[:1, :8], positions[:1, :8], None, mask[:1, :8, :8])  # for the LoRA set-up's own trace
    targets = rf".*/({'|'.join(PROJECTIONS)})(/w)?"

    if a.mode == "jaxlora":
        import jaxlora

        config = jaxlora.LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=targets, dtype=a.lora_dtype)
        train = jaxlora.nnx.init(jax.random.key(2), model, config, args=small)
        graphdef, frozen, rest = nnx.split(model, nnx.Param, ...)
        fn = jaxlora.nnx.call(graphdef, rest)

        def logits_of(train, frozen, inputs):
            return jaxlora.apply(fn, frozen, train, inputs, positions, None, mask)[0]

    elif a.mode in ("qwix", "qwix_nnx"):
        import qwix

        # qwix matches its own module paths ("layers/0/attn/q_proj") with re.fullmatch
        provider = qwix.LoraProvider(module_path=f".*({'|'.join(PROJECTIONS)})", rank=a.rank, alpha=2.0 * a.rank)
        adapted = qwix.apply_lora_to_model(model, provider, *small, rngs=nnx.Rngs(2))
        graphdef, train, frozen = nnx.split(adapted, nnx.LoRAParam, ...)

        def logits_of(train, frozen, inputs):
            return nnx.merge(graphdef, train, frozen)(inputs, positions, None, mask)[0]

    else:
        raise ValueError(f"--mode {a.mode!r}: expected one of {MODES}")

    def loss_of(train, frozen, tokens):
        logits = logits_of(train, frozen, tokens[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    progress("LoRA set up")
    opt = optax.adamw(1e-4)
    compiled = None
    t0 = time.perf_counter()
    if a.mode == "qwix_nnx":  # Tunix's PeftTrainer: nnx.Optimizer(wrt=LoRAParam), nnx.value_and_grad, nnx.jit
        optimizer = nnx.Optimizer(adapted, opt, wrt=nnx.LoRAParam)

        def nnx_loss(model, tokens):
            logits = model(tokens[:, :-1], positions, None, mask)[0].astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        def train_step(model, optimizer, tokens):
            loss, grads = nnx.value_and_grad(nnx_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, tokens)
            optimizer.update(model, grads)
            return loss

        # as Tunix does with cache_nnx_graph: the graph traversal is cached, not redone each call
        jitted = nnx.cached_partial(nnx.jit(train_step, donate_argnames=("optimizer",)), adapted, optimizer)
        state = [None, None, jitted(tokens)]
        first_loss = float(state[2])

        def run():
            state[2] = jitted(tokens)

        trained = lambda: nnx.state(adapted, nnx.LoRAParam)  # noqa: E731
    else:

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(train, opt_state, frozen, tokens):
            loss, grads = jax.value_and_grad(loss_of)(train, frozen, tokens)
            updates, opt_state = opt.update(grads, opt_state, train)
            return optax.apply_updates(train, updates), opt_state, loss

        opt_state = opt.init(train)
        compiled = step.lower(train, opt_state, frozen, tokens).compile()
        state = list(compiled(train, opt_state, frozen, tokens))
        first_loss = float(state[2])

        def run():
            state[:] = compiled(state[0], state[1], frozen, tokens)

        trained = lambda: state[0]  # noqa: E731
    compile_s = time.perf_counter() - t0
    progress(f"compiled and ran the first step ({compile_s:.1f} s)")

    def blocking():
        run()
        jax.block_until_ready(state[2])

    step_ms = models.timeit(blocking, a.steps, a.warmup)
    piped = models.timeit_pipelined(run, lambda: jax.block_until_ready(state[2]), a.steps, a.window)
    median = models.median(step_ms)
    leaves = jax.tree.leaves(trained())
    d, nh, kh, f = cfg.embed_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_dim
    expected = cfg.num_layers * a.rank * ((d + nh) * 2 + (d + kh) * 2 + (d + f) * 3)  # r·(in + out) per weight
    if sum(x.size for x in leaves) != expected:
        raise RuntimeError(
            f"{a.mode}: trains {sum(x.size for x in leaves)} parameters, where rank {a.rank} on every layer's "
            f"{', '.join(PROJECTIONS)} is {expected}: the two modes would not adapt the same modules"
        )
    return {
        "mode": a.mode,
        "batch": batch,
        "seq": seq,
        "first_loss": first_loss,
        "loss": float(state[2]),
        "trainable_params": int(sum(x.size for x in leaves)),
        "lora_dtypes": sorted({str(x.dtype) for x in leaves}),
        "compile_s": round(compile_s, 2),
        "step_ms": [round(t, 3) for t in step_ms],
        "median_ms": median,
        "pipelined_ms": models.median(piped),
        "tokens_per_s": batch * seq / (median / 1e3),
        "peak_bytes": models.peak_bytes(),
        "memory_analysis": None if compiled is None else common.memory_analysis(compiled),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="8b", choices=sorted(CONFIGS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mode", default="jaxlora")
    p.add_argument("--batch", type=int, default=0, help="default: the config's (8b: 2)")
    p.add_argument("--seq", type=int, default=0, help="default: the config's (8b: 2048)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", help="the base weights' dtype")
    p.add_argument("--lora-dtype", default="bfloat16", help="jaxlora's A and B (qwix follows the weights)")
    p.add_argument("--remat", action="store_true", help="Tunix's RematConfig.DECODER (nnx.remat per layer)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--window", type=int, default=4, help="steps dispatched back to back for pipelined_ms")
    p.add_argument("--timeout", type=float, default=900, help="seconds for one mode")
    p.add_argument("--budget", type=float, default=None, help="seconds for all modes (later ones are skipped)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        warnings.simplefilter("ignore", DeprecationWarning)  # tunix 0.1.7 on jax 0.10+
        print(json.dumps(_worker(a)), flush=True)
        return {}

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # this process only reads the device name
    from . import common

    flags = ["--config", a.config, "--batch", str(a.batch), "--seq", str(a.seq), "--rank", str(a.rank)]
    flags += ["--dtype", a.dtype, "--lora-dtype", a.lora_dtype, "--steps", str(a.steps), "--warmup", str(a.warmup)]
    flags += ["--window", str(a.window)]
    flags += ["--remat"] if a.remat else []
    result = {
        **common.environment(),
        "benchmark": "jax_peer",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "model": f"tunix.models.llama3 Llama3, ModelConfig {CONFIGS[a.config][0]!r}, random {a.dtype} weights",
        "config_name": a.config,
        "remat": a.remat,
        "lora": {"rank": a.rank, "alpha": 2 * a.rank, "targets": list(PROJECTIONS), "dtype": a.lora_dtype},
        "optimizer": "optax.adamw(1e-4)",
        "versions_peer": _versions(),
        "modes": {},
    }
    jobs = {mode: ["--mode", mode, *flags] for mode in a.modes.split(",")}

    def partial(modes):  # what is measured so far is written after each mode, in case a later one hangs
        common.write({**result, "modes": modes}, a.out, quiet=True)

    result["modes"] = common.run_workers(
        "benchmarks.jax_peer", jobs, a.timeout, parallel=False, budget=a.budget, on_result=partial
    )
    common.add_ratios(result["modes"], "jaxlora")
    mine = result["modes"].get("jaxlora", {})
    for name in ("qwix", "qwix_nnx"):  # how many times faster jaxlora's step is than the peer's
        peer = result["modes"].get(name, {})
        if "median_ms" in mine and "median_ms" in peer:
            result[f"speedup_over_{name}"] = peer["median_ms"] / mine["median_ms"]
            print(f"jaxlora step is {result[f'speedup_over_{name}']:.2f}x faster than {name}")
    for m, r in result["modes"].items():
        if "median_ms" in r:
            print(f"  {m}: {r['median_ms']:.2f} ms/step, {r['tokens_per_s']:.0f} tokens/s, peak "
                  f"{common.gb(r['peak_bytes'])}, compile {r['compile_s']} s, first loss {r['first_loss']:.4f}, "
                  f"{r['trainable_params']} trainable")  # fmt: skip
    common.write(result, a.out)
    return result


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("google-tunix", "qwix"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
