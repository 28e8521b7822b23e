"""QLoRA on a quantized frozen base: training steps, the largest 70B batch, and decode, each in its own process.

Modes:
  train_bf16  LoRA on the bfloat16 base (the reference).
  train_int8  LoRA on the int8 base (``jaxlora.quantize(params, "int8")``).
  train_nf4   QLoRA on the NF4 base (block 64, double quantization).
  decode_bf16 / decode_int8 / decode_nf4  decode steps (one new token per sequence, a ``--cache``-token
              KV cache attended in full, one LoRA adapter unmerged) at each of ``--decode-batches``, each
              program compiled with ``jaxlora.serving_compiler_options()`` (the fast skinny bf16 GEMM).
``--qmatmul SETTING`` sets the fused kernel's switches in each worker before anything is traced
(``jaxlora._qmatmul.configure``; e.g. ``benchmarks.qdecode``'s ``sweep.chosen``); the JSON records them.
The driver also counts the bytes of the NF4 base against the bf16 one from the leaves' shapes alone
(``jax.eval_shape``, no device memory): with the default targets (embedding and ``lm_head`` kept in
bf16) and with every matrix quantized, for ``--config`` (the real 8B on a CPU in seconds).
Quantized bases are made layer by layer on the device: each stacked kernel's random bf16 layer is
drawn and encoded inside one jitted ``lax.map``, so the float model never exists whole (the 70B's
would be 140 GB). Embedding and ``lm_head`` stay bfloat16.

``--policy`` is what each rematerialized block keeps in the train modes, as in ``benchmarks.train_step``
(issue 26's target: the NF4 step within 1.05x of bf16 LoRA at the same policy).

CPU smoke run: ``python -m benchmarks.qlora --config tiny --batches 2 --steps 2``.
H200: ``python -m benchmarks.qlora --out benchmarks/results/qlora_h200.json`` (llama8b modes, then the
70B at each of ``--batches`` sequences of 4096, in separate processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

TRAIN = ("train_bf16", "train_int8", "train_nf4")
DECODE = ("decode_bf16", "decode_int8", "decode_nf4")


def _base(init, fmt: str | None):
    """Random base params (N(0, 0.02)) shaped as ``init(key)``'s, quantized leaf by leaf on the device
    when ``fmt`` is given."""
    import jax
    import jax.numpy as jnp

    from jaxlora import _quantized
    from jaxlora._tree import module_path

    abstract = jax.eval_shape(init, jax.random.key(0))
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for i, (kp, leaf) in enumerate(flat):
        key = jax.random.key(i)
        path = module_path(kp)
        if fmt and path.startswith("layers/") and leaf.ndim == 3:

            def make(key, shape=leaf.shape, dtype=leaf.dtype):
                keys = jax.random.split(key, shape[0])
                layer = lambda k: _quantized.encode((0.02 * jax.random.normal(k, shape[1:])).astype(dtype), fmt)  # noqa: E731
                return jax.lax.map(layer, keys)

            leaves.append(jax.jit(make)(key))
        elif any(part.startswith("ln") for part in path.split("/")):  # RMSNorm scales
            leaves.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            normal = lambda k, s=leaf.shape, d=leaf.dtype: (0.02 * jax.random.normal(k, s)).astype(d)  # noqa: E731
            leaves.append(jax.jit(normal)(key))
        jax.block_until_ready(leaves[-1])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def stored_base_bytes(config: str, override: str = "{}", fmt: str = "nf4") -> dict:
    """Bytes of the base as stored, from the leaves' shapes alone (``jax.eval_shape``: no device memory).

    ``bf16``: the float model; ``default``: `jaxlora.quantize`'s default targets (embedding and
    ``lm_head`` stay bf16); ``every_matrix``: every kernel and the embedding quantized too (norm
    scales stay float). The ratios are to ``bf16``.
    """
    import re

    import jax

    import jaxlora
    from jaxlora._tree import module_path

    from . import models

    cfg = models.configure(config, override=override)
    model = models.Decoder(cfg)
    tokens = jax.ShapeDtypeStruct((1, 8), "int32")
    abstract = jax.eval_shape(lambda k: model.init(k, tokens), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    matrices = [module_path(kp) for kp, leaf in flat if str(kp[-1].key) in ("kernel", "embedding")]
    every = [re.escape(m) for m in matrices]
    quantized = {
        "default": jax.eval_shape(lambda p: jaxlora.quantize(p, fmt), abstract),
        "every_matrix": jax.eval_shape(lambda p: jaxlora.quantize(p, fmt, targets=every, exclude=()), abstract),
    }
    out = {"format": fmt, "bf16": jaxlora._quantized.nbytes(abstract)}
    for k, q in quantized.items():
        out[k] = jaxlora._quantized.nbytes(q)
        out[f"{k}_ratio_to_bf16"] = out[k] / out["bf16"]
    packed = jaxlora._quantized.is_quantized
    q = jax.tree_util.tree_flatten_with_path(quantized["default"], is_leaf=packed)[0]
    out["kept_float_in_default"] = [module_path(kp) for kp, x in q if module_path(kp) in matrices and not packed(x)]
    return out


def _measure(a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxlora
    from jaxlora import _qmatmul

    from . import common, models

    _qmatmul.configure(a.qmatmul)  # before anything is traced
    cfg = models.configure(a.config, override=a.override, policy=a.policy)
    model = models.Decoder(cfg)
    fmt = {"bf16": None, "int8": "int8", "nf4": "nf4"}[a.mode.split("_")[1]]
    t0 = time.perf_counter()
    tokens = models.tokens_for(cfg)
    decode = a.mode.startswith("decode")
    if decode:  # the KV-cache decoder of benchmarks/multi_adapter.py, attending over a full cache
        from .multi_adapter import _model, empty_cache

        model = _model(cfg, a.cache, cache_form=a.cache_form)
        args = lambda b: (jnp.zeros((b, 1), jnp.int32), empty_cache(cfg, b, a.cache, abstract=True), 0)  # noqa: E731
        params = _base(lambda k: model.init(k, *args(1)), fmt)
    else:
        params = _base(lambda k: model.init(k, tokens), fmt)
    base_bytes = jaxlora._quantized.nbytes(params)
    build_s = time.perf_counter() - t0
    out = {"mode": a.mode, "base_bytes": base_bytes, "bits_per_parameter": 8 * base_bytes / cfg.params(),
           "build_s": round(build_s, 1), "batch": cfg.batch, "seq": cfg.seq, "qmatmul_setting": a.qmatmul,
           "qmatmul": _qmatmul.switches()}  # fmt: skip
    if fmt:  # the quantized weights alone (the embedding and lm_head stay bf16): NF4 ~4.127 bits, ratio ~0.258
        out["quantized_bits"] = jaxlora.bits_per_parameter(params)
        out["quantized_ratio_to_bf16"] = out["quantized_bits"] / 16
    if a.mode.startswith("train"):
        config = jaxlora.LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=models.targets(cfg))
        lora = jaxlora.init(jax.random.key(1), params, config, fn=model.apply, args=(tokens,))
        opt = optax.adamw(1e-4, mu_dtype=jnp.float32)
        opt_state = opt.init(lora)

        def step(lora, opt_state, params, tokens):
            loss_of = lambda l: models.loss_fn(jaxlora.apply(model.apply, params, l, tokens), tokens)  # noqa: E731
            loss, g = jax.value_and_grad(loss_of)(lora)
            updates, opt_state = opt.update(g, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state, loss

        step = jax.jit(step, donate_argnums=(0, 1))
        state = [lora, opt_state, None]
        run = lambda: state.__setitem__(slice(0, 3), step(state[0], state[1], params, tokens))  # noqa: E731
        wait = lambda: jax.block_until_ready(state[-1])  # noqa: E731
        blocking = lambda: (run(), wait())  # noqa: E731
        t0 = time.perf_counter()
        blocking()
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        for _ in range(a.warmup):
            blocking()
        common.sync_point()
        ms = models.timeit(blocking, a.steps, 0)
        out.update(median_ms=models.median(ms), step_ms=[round(x, 2) for x in ms], loss=float(state[-1]))
        out["tokens_per_s"] = cfg.batch * cfg.seq / (out["median_ms"] / 1e3)
    else:  # one token a step for each of `batch` sequences, one LoRA (rank a.rank, B non-zero) unmerged
        config = jaxlora.LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=models.targets(cfg))
        lora = jaxlora.init(jax.random.key(1), params, config, fn=model.apply, args=args(1))
        lora = {p: dataclasses.replace(f, b=jnp.full(f.b.shape, 0.01, f.b.dtype)) for p, f in lora.items()}
        options = jaxlora.serving_compiler_options()  # cuBLAS for the skinny bf16 products (and XLA's fallback)
        fwd = jax.jit(lambda p, l, t, c, pos: jaxlora.apply(model.apply, p, l, t, c, pos), donate_argnums=3,
                      compiler_options=options or None)  # fmt: skip
        out["compiler_options"] = options
        out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        out["cache"] = a.cache
        out["decode"] = {}
        for b in [int(x) for x in a.decode_batches.split(",")]:
            t = jnp.zeros((b, 1), jnp.int32)
            state = [empty_cache(cfg, b, a.cache), None]
            pos = jnp.int32(a.cache - 1)
            t0 = time.perf_counter()
            compiled = fwd.lower(params, lora, t, state[0], pos).compile()
            compile_s = time.perf_counter() - t0

            def step(compiled=compiled, t=t, pos=pos, state=state):
                state[1], state[0] = compiled(params, lora, t, state[0], pos)
                jax.block_until_ready(state[1])

            ms = models.timeit(step, a.steps, a.warmup + 1)
            out["decode"][str(b)] = {"median_ms": models.median(ms), "tokens_per_s": b / (models.median(ms) / 1e3),
                                     "compile_s": round(compile_s, 2)}  # fmt: skip
            if a.profile:  # where a step's time goes: python -m benchmarks.trace_summary PREFIX_*.trace.json.gz
                prefix = f"{a.profile}_{a.mode}_b{b}"
                with open(prefix + ".hlo.txt", "w") as fh:
                    fh.write(compiled.as_text())
                common.profile(step, prefix)
    out["peak_bytes"] = models.peak_bytes()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama8b", help="the model for the train and decode modes")
    p.add_argument("--modes", default=",".join(TRAIN + DECODE))
    p.add_argument("--big", default="llama70b", help="the model QLoRA-trained at each of --batches ('' to skip)")
    p.add_argument("--batches", default="4,8", help="batch sizes (of --big-seq tokens) to try for --big")
    p.add_argument("--big-seq", type=int, default=4096)
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--cache", type=int, default=1024, help="KV-cache length of the decode modes")
    p.add_argument("--cache-form", default="xs", help="the decode model's cache form (benchmarks.multi_adapter)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--override", default="{}", help="JSON of ModelConfig fields to change")
    p.add_argument("--policy", default="block", help="what each rematerialized block keeps in the train modes "
                   "(benchmarks.train_step's --policy: block, none, dots, minimal, outputs, mlp)")  # fmt: skip
    p.add_argument("--qmatmul", default="", help="the fused kernel's bk,bn,warps,stages,programs[,gemv[,flags]]")
    p.add_argument("--mode", default="train_nf4")
    p.add_argument("--timeout", type=float, default=420, help="seconds a process may take")
    p.add_argument("--profile", default="", help="decode modes: 3 steps traced and the HLO at PREFIX_<mode>_b<B>")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_measure(a)), flush=True)
        return {}

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from . import common, models

    cfg = models.configure(a.config, override=a.override, policy=a.policy)  # a bad policy fails here
    flags = ["--config", a.config, "--rank", str(a.rank), "--steps", str(a.steps), "--warmup", str(a.warmup),
             "--override", a.override, "--decode-batches", a.decode_batches, "--cache", str(a.cache),
             "--cache-form", a.cache_form, "--policy", a.policy, "--qmatmul", a.qmatmul,
             "--profile", a.profile]  # fmt: skip
    jobs = {m: ["--mode", m, *flags] for m in a.modes.split(",") if m}
    result = {**common.environment(), "benchmark": "qlora", "config_name": a.config,
              "config": dataclasses.asdict(cfg), "params": cfg.params(), "rank": a.rank,
              "remat_policy": a.policy if cfg.remat else None, "qmatmul_setting": a.qmatmul}  # fmt: skip
    result["base_bytes"] = stored_base_bytes(a.config, a.override)
    bb = result["base_bytes"]
    print(f"{a.config} base: bf16 {common.gb(bb['bf16'])}; NF4 with the default targets {common.gb(bb['default'])} "
          f"({bb['default_ratio_to_bf16']:.3f}x, {', '.join(bb['kept_float_in_default'])} kept bf16), every matrix "
          f"{common.gb(bb['every_matrix'])} ({bb['every_matrix_ratio_to_bf16']:.3f}x)", flush=True)  # fmt: skip
    result["modes"] = common.run_workers("benchmarks.qlora", jobs, a.timeout, parallel=False)
    if a.big:
        big = {}
        for b in [int(x) for x in a.batches.split(",") if x]:
            o = json.dumps({**json.loads(a.override if a.big == a.config else "{}"), "batch": b, "seq": a.big_seq})
            bflags = ["--config", a.big, "--rank", str(a.rank), "--steps", "2", "--warmup", "0", "--override", o,
                      "--policy", a.policy, "--qmatmul", a.qmatmul]  # fmt: skip
            big.update(common.run_workers("benchmarks.qlora", {f"{a.big}_nf4_b{b}": ["--mode", "train_nf4", *bflags]},
                                          a.timeout, parallel=False))  # fmt: skip
        result["big"] = {"config_name": a.big, "config": dataclasses.asdict(models.configure(a.big)), "runs": big}
        fits = [r for r in big.values() if "median_ms" in r]
        if fits:
            best = max(fits, key=lambda r: r["batch"])
            result["big"]["largest"] = {k: best[k] for k in ("batch", "seq", "tokens_per_s", "peak_bytes", "median_ms")}
    m = result["modes"]
    ref = m.get("train_bf16", {})
    print(f"\n{result['device']}  {a.config}  batch {cfg.batch}x{cfg.seq}  rank {a.rank}")
    print(f"{'mode':<12} {'step ms':>9} {'ratio':>6} {'tokens/s':>10} {'peak':>10} {'base':>10} {'base ratio':>10}")
    for name, r in m.items():
        if "error" in r:
            print(f"{name:<12} failed: {r['error'][:200]}")
            continue
        if "median_ms" in r and "median_ms" in ref:
            r["ratio_to_bf16"] = r["median_ms"] / ref["median_ms"]
        bf16_bytes = ref.get("base_bytes") or m.get("decode_bf16", {}).get("base_bytes")
        if bf16_bytes:
            r["base_ratio_to_bf16"] = r["base_bytes"] / bf16_bytes
        if "median_ms" in r:
            print(f"{name:<12} {r['median_ms']:>9.2f} {r.get('ratio_to_bf16', float('nan')):>6.3f} "
                  f"{r['tokens_per_s']:>10.0f} {common.gb(r['peak_bytes']):>10} {common.gb(r['base_bytes']):>10} "
                  f"{r.get('base_ratio_to_bf16', float('nan')):>10.3f}")  # fmt: skip
        for b, d in r.get("decode", {}).items():
            bf = m.get("decode_bf16", {}).get("decode", {}).get(b)
            if bf:
                d["vs_bf16"] = d["tokens_per_s"] / bf["tokens_per_s"]  # > 1: faster than bf16
            print(f"{name:<12} batch {b}: {d['median_ms']:.2f} ms, {d['tokens_per_s']:.0f} tokens/s "
                  f"({d.get('vs_bf16', float('nan')):.2f}x bf16), base {common.gb(r['base_bytes'])}")  # fmt: skip
    for name, r in result.get("big", {}).get("runs", {}).items():
        if "error" in r:
            print(f"{name}: failed: {r['error'][:200]}")
        else:
            print(f"{name}: {r['batch']}x{r['seq']}: {r['median_ms']:.0f} ms, {r['tokens_per_s']:.0f} tokens/s, "
                  f"peak {common.gb(r['peak_bytes'])}, base {common.gb(r['base_bytes'])}")  # fmt: skip
    common.write(result, a.out)
    return result


if __name__ == "__main__":
    main()
