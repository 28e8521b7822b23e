"""Training-step time and peak memory: full fine-tuning against LoRA, each mode in its own process.

Modes:
  full    full fine-tuning: bfloat16 weights, adamw (float32 first moment), params donated.
  lora    jaxlora.apply on the frozen Linen model, adamw on the float32 LoRA factors.
  nnx     the same model written in Flax NNX with every projection an ``nnx.LoRALinear``.
  merge   merge ``W + s·A·B`` every step (jaxlora.merge inside the step), then the plain model.
  frozen  the frozen model's forward pass and loss only (no gradient): a floor.
  lora_plain  jaxlora with its custom VJP swapped for plain autodiff of the same math (an ablation).
  lora_factored jaxlora with its transient ``W + ΔW`` form switched off: always ``x·W + (x·A)·B`` (an ablation).
  lora_merged   jaxlora with the transient ``W + ΔW`` form for every op, whatever its cost rule says (an ablation).
  lora_single   jaxlora without the one-read ops on ``[W | a]`` and ``[W ; b]`` (an ablation).
  lora_fused    jaxlora with every Dense layer on the fused Pallas GEMM (`jaxlora._fused`; a GPU).
  torch_full, torch_full_compiled, peft, peft_compiled
                the PyTorch peer (`benchmarks.torch_peer`): the same decoder in torch, full fine-tuning
                or PEFT LoRA, eager or under ``torch.compile``; ``..._ckpt`` (``peft_ckpt``,
                ``peft_compiled_ckpt``, ...) with gradient checkpointing of every block. PEFT's adapters
                follow ``--lora-dtype``: float32 (PEFT's default) or bfloat16.
  dora    as lora, with DoRA (``LoraConfig(dora=True)``: a trainable magnitude per output feature).

``--modes lora,dora`` prints the DoRA/LoRA step-time ratio measured in the same run.

Run ``python -m benchmarks.train_step --config A`` (configs in benchmarks/models.py; ``--remat``,
``--scan``, ``--policy`` for what each rematerialized block keeps: ``block`` (nothing: the whole block
is recomputed), ``none`` (no remat), ``dots`` (``dots_with_no_batch_dims_saveable``), ``minimal`` or
``outputs`` (`jaxlora.remat_policy`), ``mlp`` (``outputs`` of gate and up)); it prints a table with
each mode's MFU and writes JSON with ``--out``.
Model FLOPs: ``6·N·tokens`` for full fine-tuning, ``4·N·tokens`` plus the LoRA products
(``6·tokens·r·(in + out)`` per adapted matrix) for LoRA, both plus causal attention; recomputation
is not counted. Each mode records its compiled step's
``memory_analysis``; ``--buffers DIR`` has XLA dump each mode's buffer assignment in ``DIR/<mode>``
for ``python -m benchmarks.buffers DIR/full DIR/lora``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time

MODES = ("full", "lora", "nnx", "merge", "frozen")
ABLATIONS = ("lora_plain", "lora_factored", "lora_merged", "lora_single", "lora_fused")
VARIANTS = ("dora",)


def _worker(a: argparse.Namespace) -> dict:
    """One mode, timed; jaxlora's private switches that an ablation flips are restored afterwards."""
    from . import common, torch_peer

    if a.mode in torch_peer.TORCH_MODES:
        return torch_peer.measure(a)
    with common.switches_restored():
        return _measure(a)


def _optimizer_step(opt, loss_of):
    """``jit(step)(trained, opt_state, *rest) -> (trained, opt_state, loss)``, donating the first two."""
    import jax
    import optax

    def step(trained, opt_state, *rest):
        loss, g = jax.value_and_grad(loss_of)(trained, *rest)
        updates, opt_state = opt.update(g, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _step_args(mode: str, state: list, params, rest, tokens) -> tuple:
    """The arguments the timed loop passes to the jitted step of ``mode`` (its latest state)."""
    if mode == "frozen":
        return params, tokens
    if mode == "full":
        return state[0], state[1], tokens
    return state[0], state[1], rest if mode == "nnx" else params, tokens


def _measure(a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxlora

    from . import common, models

    cfg = models.configure(a.config, a.remat, a.scan, a.override, a.policy)
    tokens = models.tokens_for(cfg)
    rest = params = fwd = None
    targets = tuple(a.targets.split(",")) if a.targets else models.targets(cfg)
    lora_cfg = jaxlora.LoraConfig(
        rank=a.rank, alpha=2 * a.rank, targets=targets, dtype=a.lora_dtype, dora=a.mode == "dora"
    )
    opt = optax.adamw(1e-4, mu_dtype=jnp.float32)
    t0 = time.perf_counter()

    if a.mode == "nnx":
        from flax import nnx

        model = models.NnxDecoder(cfg, a.rank, nnx.Rngs(0))
        graphdef, train, rest = nnx.split(model, nnx.LoRAParam, ...)
        opt_state = opt.init(train)

        def loss_of(train, rest, tokens):
            return models.loss_fn(nnx.merge(graphdef, train, rest)(tokens), tokens)

        step = _optimizer_step(opt, loss_of)
        state = [train, opt_state]
        run = lambda: state.__setitem__(slice(0, 3), step(state[0], state[1], rest, tokens))  # noqa: E731
    else:
        model = models.Decoder(cfg)
        params = jax.jit(model.init)(jax.random.key(0), tokens)
        apply = lambda p, t: models.loss_fn(model.apply(p, t), t)  # noqa: E731
        if a.mode == "full":
            opt_state = jax.jit(opt.init)(params)

            step = _optimizer_step(opt, apply)
            state = [params, opt_state]
            run = lambda: state.__setitem__(slice(0, 3), step(state[0], state[1], tokens))  # noqa: E731
        elif a.mode == "frozen":
            fwd = jax.jit(apply)
            state = [None]
            run = lambda: state.__setitem__(0, fwd(params, tokens))  # noqa: E731
        else:
            lora = jaxlora.init(jax.random.key(1), params, lora_cfg, fn=model.apply, args=(tokens,))
            from jaxlora import _fused, _matmul

            if a.mode == "lora_plain":  # the ablation: plain autodiff of the reference math

                def plain(x, xl, w, first, second, scale, base, first_op, second_op, *_):
                    f, s = _matmul._cast(first, second, scale, xl.dtype)
                    y = base(x, w)
                    return y + second_op(first_op(xl, f), s).astype(y.dtype)

                _matmul.factored = plain
            if a.mode in ("lora_factored", "lora_merged"):  # the ablations: never / always the transient W + ΔW
                _matmul._MERGED = a.mode == "lora_merged"
            _matmul._SIDE_BY_SIDE = a.mode != "lora_single"
            _fused._KERNEL = True if a.mode == "lora_fused" else None
            if a.mode.startswith("lora") or a.mode in VARIANTS:
                loss_of = lambda l, p, t: models.loss_fn(jaxlora.apply(model.apply, p, l, t), t)  # noqa: E731
            elif a.mode == "merge":
                loss_of = lambda l, p, t: apply(jaxlora.merge(p, l), t)  # noqa: E731
            else:
                raise ValueError(f"unknown mode {a.mode!r}; expected one of {MODES + ABLATIONS + VARIANTS}")
            opt_state = opt.init(lora)

            step = _optimizer_step(opt, loss_of)
            state = [lora, opt_state]
            run = lambda: state.__setitem__(slice(0, 3), step(state[0], state[1], params, tokens))  # noqa: E731

    def blocking():
        run()
        jax.block_until_ready(state[-1])

    blocking()  # compile
    compile_s = time.perf_counter() - t0
    for _ in range(a.warmup):
        blocking()
    common.sync_point()
    ms = models.timeit(blocking, a.steps, 1)
    piped = models.timeit_pipelined(run, lambda: jax.block_until_ready(state[-1]), a.steps, a.window)
    fn = fwd if a.mode == "frozen" else step  # jit's caches hand back the executable the loop ran: no recompile
    compiled = fn.lower(*_step_args(a.mode, state, params, rest, tokens)).compile()
    if a.hlo:  # the optimised HLO of the step, for reading which kernels XLA made
        with open(a.hlo, "w") as f:
            f.write(compiled.as_text())
    if a.profile:
        common.profile(blocking, a.profile)
    out = {
        "mode": a.mode,
        "median_ms": models.median(ms),
        "pipelined_ms": models.median(piped),
        "min_ms": min(ms),
        "step_ms": [round(x, 3) for x in ms],
        "peak_bytes": models.peak_bytes(),
        "loss": float(state[-1]),
        "compile_s": round(compile_s, 2),
    }
    memory = common.memory_analysis(compiled)
    if memory is not None:
        out["memory_analysis"] = memory
    if a.buffers:
        out["buffers"] = a.buffers
        if not glob.glob(os.path.join(a.buffers, "*buffer-assignment.txt")):
            raise RuntimeError(f"--buffers {a.buffers}: XLA wrote no buffer assignment there. It reads XLA_FLAGS "
                               "once, as JAX starts its backend: run the driver, which sets --xla_dump_to per mode, "
                               f"or start Python with XLA_FLAGS=--xla_dump_to={a.buffers}")  # fmt: skip
    out["tokens_per_s"] = cfg.batch * cfg.seq / (out["median_ms"] / 1e3)
    return out


def model_flops(cfg, mode: str, rank: int, targets: tuple[str, ...]) -> float | None:
    """Model FLOPs of one step of ``mode``: full fine-tuning ``6·N·tokens``; LoRA ``4·N·tokens`` (forward
    and input gradient) plus the LoRA products, ``6·tokens·r·(in + out)`` per adapted matrix
    (``x·A``, ``t·B``, ``g·Bᵀ``, ``dt·Aᵀ``, ``dA``, ``dB``); both plus causal attention
    (`ModelConfig.train_flops`). None for the forward-only ``frozen`` mode."""
    if mode == "frozen":
        return None
    if mode == "full" or mode.startswith("torch_full"):
        return cfg.train_flops()
    d, kv, ff, tokens = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.ff, cfg.batch * cfg.seq
    shapes = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, ff), "up": (d, ff), "down": (ff, d)}
    lora = sum(6.0 * tokens * rank * sum(shapes[t]) for t in targets) * cfg.n_layers
    return cfg.train_flops() - 2.0 * cfg.matmul_params() * tokens + lora


def _add_mfu(result: dict, cfg, rank: int, targets: tuple[str, ...]) -> None:
    """Each timed mode's model TFLOPs, achieved TFLOP/s and (on a GPU) MFU against a 989 TFLOP/s bf16 peak
    (H100 and H200 SXM share it)."""
    from . import common

    for mode, r in result["modes"].items():
        flops = model_flops(cfg, mode.split("@")[0], rank, targets)
        if flops is None or "median_ms" not in r:
            continue
        r["model_tflops"] = flops / 1e12
        r["achieved_tflops_per_s"] = flops / (r["median_ms"] / 1e3) / 1e12
        if result["backend"] == "gpu":
            r["mfu"] = r["achieved_tflops_per_s"] * 1e12 / common.H100_BF16_FLOPS


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="A")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mode", default="full")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="", help="comma-separated LoRA targets (default: every projection)")
    p.add_argument("--lora-dtype", default="float32", help="dtype of A and B")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--scan", action="store_true")
    p.add_argument("--policy", default="block", help="what each rematerialized block keeps: block (nothing), none "
                   "(no remat), dots, minimal, outputs, mlp (see above); a comma-separated list runs each jaxlora "
                   "mode under each, labelled mode@policy")  # fmt: skip
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--window", type=int, default=4, help="steps dispatched back to back for pipelined_ms")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--override", default="{}", help="JSON of ModelConfig fields to change, e.g. '{\"n_layers\": 2}'")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=None)
    p.add_argument("--parallel", action="store_true", help="compile all modes at once, then time them one by one")
    p.add_argument("--hlo", default=None, help="worker: write the compiled step's HLO text here")
    p.add_argument("--profile", default=None, help="per mode: a trace of 3 steps and the HLO")
    p.add_argument("--buffers", default=None, help="per mode: XLA's buffer assignment of each program in DIR/<mode> "
                   "(read it with python -m benchmarks.buffers)")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a)), flush=True)
        return {}

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # this process only reads the device name
    from . import common, models

    policies = a.policy.split(",")
    for policy in policies:
        models.remat_policy(policy)  # a bad name fails here, before any worker starts
    cfg = models.configure(a.config, a.remat, a.scan, a.override, policies[0])
    flags = ["--config", a.config, "--rank", str(a.rank), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    flags += ["--targets", a.targets, "--lora-dtype", a.lora_dtype]
    flags += ["--window", str(a.window), "--override", a.override]
    flags += (["--remat"] if a.remat else []) + (["--scan"] if a.scan else [])
    result = {
        **common.environment(),
        "benchmark": "train_step",
        "config_name": a.config,
        "config": dataclasses.asdict(cfg),
        "params": cfg.params(),
        "lora": {
            "rank": a.rank,
            "alpha": 2 * a.rank,
            "dtype": a.lora_dtype,
            "targets": a.targets.split(",") if a.targets else list(models.targets(cfg)),
        },
        "optimizer": "optax.adamw(1e-4, mu_dtype=float32)",
        "remat_policy": a.policy if cfg.remat else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "modes": {},
    }
    from . import torch_peer

    # several policies: each jaxlora mode once per policy, as "mode@policy" (the torch peers once)
    label = lambda mode, p: mode if len(policies) == 1 or mode in torch_peer.TORCH_MODES else f"{mode}@{p}"  # noqa: E731
    jobs = {label(mode, p): ["--mode", mode, *flags, "--policy", p] for mode in a.modes.split(",") for p in policies}
    full, lora = label("full", policies[0]), label("lora", policies[0])
    if a.profile:
        jobs = {m: [*j, "--profile", f"{a.profile}_{m}", "--hlo", f"{a.profile}_{m}.hlo.txt"] for m, j in jobs.items()}
    envs = {}
    if a.buffers:  # XLA reads XLA_FLAGS as the backend starts, so each worker gets its own in its environment
        dirs = {m: os.path.join(os.path.abspath(a.buffers), m) for m in jobs}
        jobs = {m: [*j, "--buffers", dirs[m]] for m, j in jobs.items()}
        flags_now = os.environ.get("XLA_FLAGS", "")
        envs = {m: {"XLA_FLAGS": f"{flags_now} --xla_dump_to={d}".strip()} for m, d in dirs.items()}
    result["modes"] = common.run_workers("benchmarks.train_step", jobs, a.timeout, a.parallel, envs=envs)
    targets = tuple(a.targets.split(",")) if a.targets else models.targets(cfg)
    _add_mfu(result, cfg, a.rank, targets)
    common.add_ratios(result["modes"], full)
    for peer in ("peft", "peft_compiled"):  # how many times faster jaxlora's LoRA step is than PEFT's
        if "median_ms" in result["modes"].get(peer, {}) and "median_ms" in result["modes"].get(lora, {}):
            result[f"speedup_over_{peer}"] = result["modes"][peer]["median_ms"] / result["modes"][lora]["median_ms"]
    common.add_ratios(result["modes"], lora, [label(v, policies[0]) for v in VARIANTS])  # DoRA against LoRA
    if "mfu" in result["modes"].get(full, {}):
        result["mfu_full"] = result["modes"][full]["mfu"]
    remat = f" remat ({a.policy})" if cfg.remat else ""
    print(f"\n{result['device']}  config {a.config}{remat}{' scan' if cfg.scan else ''}  "
          f"batch {cfg.batch}x{cfg.seq}  rank {a.rank}  {cfg.params() / 1e6:.0f}M params")  # fmt: skip
    common.print_steps(result["modes"], full)
    for peer in ("peft", "peft_compiled"):
        if f"speedup_over_{peer}" in result:
            print(f"jaxlora LoRA step is {result[f'speedup_over_{peer}']:.2f}x faster than {peer}")
    said = [f"{m} {r['compile_s']} ({common.rounded(r.get('compile_ratio_to_full'))})"
            for m, r in result["modes"].items() if "compile_s" in r]  # fmt: skip
    print("compile s, start to first step done (ratio to full): " + ", ".join(said))
    for mode in VARIANTS:
        r = result["modes"].get(label(mode, policies[0]), {})
        if f"ratio_to_{lora}" in r:
            print(f"{mode}/lora: step {r[f'ratio_to_{lora}']:.3f}x, pipelined {r[f'pipelined_ratio_to_{lora}']:.3f}x, "
                  f"peak memory {common.rounded(r.get(f'memory_ratio_to_{lora}'))}x")  # fmt: skip
    said = [f"{m} {r['achieved_tflops_per_s']:.1f}" + (f" ({100 * r['mfu']:.1f}%)" if "mfu" in r else "")
            for m, r in result["modes"].items() if "achieved_tflops_per_s" in r]  # fmt: skip
    print("model TFLOP/s (MFU of 989 TFLOP/s bf16): " + ", ".join(said))
    common.write(result, a.out)
    return result


if __name__ == "__main__":
    main()
