"""Many adapters on one base: decode, prefill and training with mixed-adapter batches (`jaxlora.stack`).

A Llama-shaped decoder (``models.CONFIGS``; GQA, SwiGLU, ``nn.scan`` over layers) with a KV cache,
bf16 weights, LoRA rank 16 on every projection (stacks in bf16). Modes, each in its own process:

  base            decode steps of the plain model; the same compiled step on merged weights
                  (``merged``: a single adapter merged); a copy of W (the bandwidth yardstick).
  base_b1         ``base`` at batch 1.
  unmerged        decode with one adapter, ``jaxlora.apply`` (factored).
  mixed8          decode, ``adapter_ids`` naming 8 distinct adapters out of 64 resident.
  mixed64         decode, 64 distinct adapters out of 64 resident.
  mixed64_of1024  decode, 64 distinct adapters out of 1,024 resident.
  prefill_merged  prefill of ``prefill_batch x cache`` tokens, merged single adapter.
  prefill_mixed8  the same prefill, 8 distinct adapters.
  train_one       a training step (adamw) of one adapter on a ``prefill_batch x cache`` batch.
  train_stack8    a training step of 8 adapters at once on the same batch (each example its own).
  swap            `jaxlora.AdapterCache` (64 slots): the time to load one adapter on a miss, from host
                  memory (NumPy) and from a `jaxlora.checkpoint.save` directory.

Each decode figure is printed beside its bytes floor: the weights a step reads (all but the embedding
table, of which it gathers a row per token), the KV cache, and the adapters' factors in use, each read
once, over the copy bandwidth measured in ``base`` (``base_b1`` for itself); for the LoRA term, its
time over merged against the factors in use read once.

``--gemm`` picks the matmul emitter for skinny products: ``options`` (default) compiles each step with
``compiler_options=jaxlora.serving_compiler_options()`` (on GPUs, Triton GEMM off for that program);
``flags`` sets ``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`` in each worker; ``xla`` keeps XLA's
defaults. Each mode's JSON records its ``xla_flags`` and ``compiler_options``.

Run ``python -m benchmarks.multi_adapter --config llama8b --out benchmarks/results/multi_adapter_h200.json``:
every mode in one call of under ten minutes (``--timeout`` seconds a mode, ``--budget`` for all; a mode
past its time is recorded as ``"error": "timeout"`` and the JSON is rewritten after each mode). Each
worker prints its setup, trace+lower, compile and first-step seconds to stderr as it goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

MODES = ("base", "base_b1", "unmerged", "mixed8", "mixed64", "mixed64_of1024", "prefill_merged", "prefill_mixed8",
         "train_one", "train_stack8", "swap")  # fmt: skip
DECODE = ("base", "base_b1", "unmerged", "mixed8", "mixed64", "mixed64_of1024")
GEMMS = ("options", "flags", "xla")
NO_TRITON_GEMM = "--xla_gpu_enable_triton_gemm=false"
RESIDENT = {"mixed8": 64, "mixed64": 64, "mixed64_of1024": 1024, "prefill_mixed8": 8, "train_stack8": 8}
DISTINCT = {"mixed8": 8, "mixed64": 64, "mixed64_of1024": 64, "prefill_mixed8": 8, "train_stack8": 8}


CACHE_FORMS = ("xs", "carry")  # how the layers under nn.scan reach the cache; see _model


def empty_cache(cfg, batch: int, max_len: int, *, abstract: bool = False):
    """The KV cache of `_model`: keys and values, each ``(layers, batch, kv_heads, max_len, head_dim)``
    (examples on axis 1), zeros or (``abstract``) their ``ShapeDtypeStruct``."""
    import jax
    import jax.numpy as jnp

    shape, dt = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim), jnp.dtype(cfg.dtype)
    if abstract:
        return (jax.ShapeDtypeStruct(shape, dt),) * 2
    return jax.jit(lambda: (jnp.zeros(shape, dt), jnp.zeros(shape, dt)))()


def _model(cfg, max_len: int, *, fresh: bool = False, cache_form: str = "xs"):
    """A decoder with a KV cache: ``(tokens (b, t), cache, pos) -> (logits, cache)``, cache `empty_cache`.

    The layers run under ``nn.scan``; ``cache_form`` says how they reach the cache:

    * ``"xs"``: each layer reads its slice as a scanned input and never writes it: it attends over the
      cached positions before ``pos`` and, causally, over its own ``t`` new tokens, and returns their
      keys and values, written after the layers (``fresh``: the cache is empty, so only the new
      tokens are attended to).
    * ``"carry"``: the whole cache is the scan's carry; each layer writes its new keys and values at
      ``pos`` (``dynamic_update_slice`` in the loop) and attends over its slice up to them.

    Measured on the H200 (8B, batch 64, 1,024 cached positions; benchmarks/results/decode_form_h200_*):
    base decode 19.7 to 20.1 ms (xs) and 19.3 ms (carry) against 40.3 ms when the cache went in and out of the
    scan as a scanned input and output. Under ``adapter_ids`` ``vmap`` moves a carried cache's example
    axis to the front, four transposes of the whole cache a step (mixed8 35.6 ms against 25.8 ms for
    xs), so xs is the default. In both, the trace still shows one device copy of the whole cache a step
    (7.1 ms) although the compiled program aliases the donated cache to its output, and each layer's
    slice is copied out for the attention matmuls (4.0 ms); the bytes floor (W and the cache read
    once) is about 9 ms. Writing the one-token products as multiply-and-sum was slower (29.6 ms).
    Only the last position's logits are computed (a prefill needs no others).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from . import models

    dt = jnp.dtype(cfg.dtype)
    if cache_form not in CACHE_FORMS:
        raise ValueError(f"cache_form must be one of {CACHE_FORMS}, got {cache_form!r}")

    def scores(q, keys):
        """``(b, t, kv, g, hd)`` queries against ``(b, kv, S, hd)`` keys: ``(b, kv, g, t, S)``, float32."""
        return jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32)

    def mix(p, values):
        """``(b, kv, g, t, S)`` weights over ``(b, kv, S, hd)`` values: ``(b, t, kv, g, hd)``."""
        return jnp.einsum("bkgts,bksd->btkgd", p, values)

    def qkv(c, x):
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        b, t, _ = x.shape
        h = models.RMSNorm(dt, name="ln1")(x)
        q = dense(c.n_heads * c.head_dim, "q")(h).reshape(b, t, c.kv_heads, c.n_heads // c.kv_heads, c.head_dim)
        k = dense(c.kv_heads * c.head_dim, "k")(h).reshape(b, t, c.kv_heads, c.head_dim).swapaxes(1, 2)
        v = dense(c.kv_heads * c.head_dim, "v")(h).reshape(b, t, c.kv_heads, c.head_dim).swapaxes(1, 2)
        return q / jnp.asarray(c.head_dim**0.5, dt), k, v  # k, v: (b, kv, t, hd)

    def rest(c, x, a):
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        x = x + dense(c.d_model, "o")(a.reshape(*x.shape))
        h = models.RMSNorm(dt, name="ln2")(x)
        return x + dense(c.d_model, "down")(nn.silu(dense(c.ff, "gate")(h)) * dense(c.ff, "up")(h))

    class CarryBlock(nn.Module):
        @nn.compact
        def __call__(self, carry, inputs):
            (x, (kc, vc)), (layer, pos) = carry, inputs
            q, k, v = qkv(cfg, x)
            t = x.shape[1]
            kc = jax.lax.dynamic_update_slice(kc, k[None].astype(kc.dtype), (layer, 0, 0, pos, 0))
            vc = jax.lax.dynamic_update_slice(vc, v[None].astype(vc.dtype), (layer, 0, 0, pos, 0))
            keys, values = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in (kc, vc))
            s = scores(q, keys)
            s = jnp.where(jnp.arange(max_len)[None, :] <= (pos + jnp.arange(t))[:, None], s, -1e30)
            a = mix(jax.nn.softmax(s, axis=-1).astype(dt), values)
            return (rest(cfg, x, a), (kc, vc)), None

    class XsBlock(nn.Module):
        @nn.compact
        def __call__(self, x, inputs):
            (keys, values), pos = inputs
            q, k, v = qkv(cfg, x)
            t = x.shape[1]
            s_new = jnp.einsum("btkgd,bkud->bkgtu", q, k, preferred_element_type=jnp.float32)
            s_new = jnp.where(jnp.arange(t)[None, :] <= jnp.arange(t)[:, None], s_new, -1e30)
            if not fresh:
                s_old = jnp.where(jnp.arange(max_len) < pos, scores(q, keys), -1e30)
                s_new = jnp.concatenate([s_old, s_new], -1)
            p = jax.nn.softmax(s_new, axis=-1).astype(dt)
            a = jnp.einsum("bkgtu,bkud->btkgd", p[..., -t:], v)
            if not fresh:
                a = a + mix(p[..., :max_len], values)
            return rest(cfg, x, a), (k.astype(keys.dtype), v.astype(values.dtype))

    class Decoder(nn.Module):
        @nn.compact
        def __call__(self, tokens, cache, pos):
            x = nn.Embed(cfg.vocab, cfg.d_model, dtype=dt, param_dtype=dt, name="embed")(tokens)
            scan = lambda block: nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},  # noqa: E731
                                         in_axes=0, out_axes=0, length=cfg.n_layers)  # fmt: skip
            per_layer = jnp.broadcast_to(pos, (cfg.n_layers,))
            if cache_form == "carry":
                (x, cache), _ = scan(CarryBlock)(name="layers")((x, cache), (jnp.arange(cfg.n_layers), per_layer))
            else:
                x, new = scan(XsBlock)(name="layers")(x, (cache, per_layer))
                cache = tuple(jax.lax.dynamic_update_slice(c, n, (0, 0, 0, pos, 0)) for c, n in zip(cache, new))
            x = models.RMSNorm(dt, name="ln_f")(x[:, -1:])
            return nn.Dense(cfg.vocab, use_bias=False, dtype=dt, param_dtype=dt, name="lm_head")(x), cache

    return Decoder()


def _stack_like(lora, n: int, seed: int, dtype):
    """A `LoraStack` of ``n`` random adapters shaped like ``lora``, made on the device (no host copies)."""
    import jax
    import jax.numpy as jnp

    import jaxlora

    shapes = {}
    for p, f in lora.items():
        ns, r = f.roles.count("s"), f.rank
        shapes[p] = ((*f.a.shape[:-1], n, r), (*f.b.shape[:ns], n, r, *f.b.shape[ns + 1 :]))

    @functools.partial(jax.jit, static_argnums=1)
    def rnd(key, shape):  # a module at a time, made in float32 and cast on the device (the peak: one module)
        return (jax.random.normal(key, shape, jnp.float32) / 64).astype(dtype)

    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(shapes)))
    a, b = {}, {}
    for p, (sa, sb) in shapes.items():
        a[p] = rnd(next(keys), sa)
        b[p] = rnd(next(keys), sb)
    scale = {p: (f.scale,) * n for p, f in lora.items()}  # static metadata, as jaxlora.stack makes it
    rank = {p: (f.rank,) * n for p, f in lora.items()}
    roles = tuple((p, f.roles) for p, f in lora.items())
    return jaxlora.LoraStack(a, b, scale, rank, tuple(f"adapter{i}" for i in range(n)), roles,
                             tuple((p, 0.0) for p in lora))  # fmt: skip


def _worker(a: argparse.Namespace) -> dict:
    from jaxlora import _matmul

    from . import common

    with common.switches_restored():
        _matmul._STACK_FORM = getattr(a, "stack_form", None)
        out = _measure_swap(a) if a.mode == "swap" else _measure(a)
    out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    out["compiler_options"] = _compiler_options(a)
    return out


def _compiler_options(a: argparse.Namespace) -> dict:
    import jaxlora

    return jaxlora.serving_compiler_options() if getattr(a, "gemm", "options") == "options" else {}


def _measure_swap(a: argparse.Namespace) -> dict:
    """`jaxlora.AdapterCache` on the model's layout (``RESIDENT["mixed64"]`` slots): ms per miss."""
    import dataclasses
    import tempfile

    import jax
    import numpy as np

    import jaxlora

    from . import models

    cfg = models.configure(a.config, override=a.override)
    model = _model(cfg, a.cache)
    tokens = np.zeros((1, 1), np.int32)
    params = jax.jit(lambda k: model.init(k, tokens, empty_cache(cfg, 1, a.cache), 0))(jax.random.key(0))
    config = jaxlora.LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=models.targets(cfg), dtype=a.lora_dtype)
    args = (tokens, empty_cache(cfg, 1, a.cache, abstract=True), 0)
    shapes = jaxlora.init(jax.random.key(1), params, config, fn=model.apply, args=args)
    del params
    rng, dt = np.random.default_rng(0), np.dtype(jax.numpy.dtype(a.lora_dtype))
    host = {p: dataclasses.replace(f, a=(rng.standard_normal(f.a.shape, np.float32) / 64).astype(dt),
                                   b=(rng.standard_normal(f.b.shape, np.float32) / 64).astype(dt))
            for p, f in shapes.items()}  # fmt: skip
    slots = RESIDENT["mixed64"]
    names = [f"h{i}" for i in range(slots + 1 + a.steps)]  # one host tree under many names: every load a miss
    t0 = time.perf_counter()
    cache = jaxlora.AdapterCache({n: host for n in names}, max_loras=slots)
    out: dict = {"mode": "swap", "slots": slots, "setup_s": round(time.perf_counter() - t0, 2)}
    out["adapter_bytes"] = sum(x.nbytes for x in jax.tree.leaves(host))
    out["stack_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.stack))
    t0 = time.perf_counter()
    for n in names[:slots]:  # fill every slot (the first load compiles the slot writer)
        cache.ids([n])
    jax.block_until_ready(cache.stack)
    out["fill_s"] = round(time.perf_counter() - t0, 2)

    def miss(name):
        t = time.perf_counter()
        cache.ids([name])
        jax.block_until_ready(cache.stack)
        return (time.perf_counter() - t) * 1e3

    ms = [miss(n) for n in names[slots:]]
    out.update(median_ms=models.median(ms), step_ms=[round(x, 3) for x in ms])
    prep = []
    for _ in range(3):  # the host's share of a miss: padding to the slot rank
        t = time.perf_counter()
        cache._padded(names[0])
        prep.append((time.perf_counter() - t) * 1e3)
    out["host_prep_ms"] = models.median(prep)
    out["host_gb_per_s"] = out["adapter_bytes"] / (out["median_ms"] / 1e3) / 1e9
    with tempfile.TemporaryDirectory() as d:
        disk = [str(jaxlora.checkpoint.save(f"{d}/a{i}", host)) for i in range(2)]
        for i in range(max(2, a.steps // 2)):  # a new name each time: every load a miss
            cache.add(f"disk{i}", disk[i % 2])
        ms = [miss(f"disk{i}") for i in range(max(2, a.steps // 2))]
    out["disk_median_ms"] = models.median(ms)
    out["disk_step_ms"] = [round(x, 3) for x in ms]
    out["peak_bytes"] = models.peak_bytes()
    return out


def _program(a: argparse.Namespace) -> tuple:
    """The step of ``a.mode``: ``(fn, args, donate, carry, info)``, ``fn(*args)`` to be jitted.

    Every array reaches ``fn`` as an argument, the base params included: an array a jitted function
    closes over is embedded in the program as a constant (16 GB of weights for the 8B, which is what
    made the unmerged and mixed modes compile for minutes; `tests/test_benchmarks.py` checks that no
    mode's program holds a constant). ``carry(args, out)`` gives the next step's args (the cache or
    the training state, donated); ``out[-1]`` is what to block on.
    """
    import jax
    import jax.numpy as jnp
    import optax

    import jaxlora

    from . import models

    cfg = models.configure(a.config, override=a.override)
    decode = not a.mode.startswith(("prefill", "train"))
    batch = 1 if a.mode == "base_b1" else a.decode_batch if decode else a.prefill_batch
    max_len = a.cache
    info: dict = {"mode": a.mode, "batch": batch, "tokens_per_step": batch * (1 if decode else max_len)}
    targets = models.targets(cfg)
    lora_cfg = jaxlora.LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=targets, dtype=a.lora_dtype)

    if a.mode.startswith("train"):
        cfg = dataclasses.replace(cfg, batch=batch, seq=max_len)
        model = models.Decoder(cfg)
        tokens = models.tokens_for(cfg)
        params = jax.jit(model.init)(jax.random.key(0), tokens)
        lora = jaxlora.init(jax.random.key(1), params, lora_cfg, fn=model.apply, args=(tokens,))
        opt = optax.adamw(1e-4, mu_dtype=jnp.float32)
        if a.mode == "train_one":
            trained, ids = lora, None
            loss_of = lambda l, p, i, t: models.loss_fn(jaxlora.apply(model.apply, p, l, t), t)  # noqa: E731
        else:
            trained = _stack_like(lora, RESIDENT[a.mode], 1, jnp.dtype(a.lora_dtype))
            opt = optax.masked(opt, jaxlora.mask(trained))
            ids = jnp.arange(batch, dtype=jnp.int32) % DISTINCT[a.mode]
            loss_of = lambda s, p, i, t: models.loss_fn(jaxlora.apply(model.apply, p, s, t, adapter_ids=i), t)  # noqa: E731

        def step(trained, opt_state, params, ids, t):
            loss, g = jax.value_and_grad(loss_of)(trained, params, ids, t)
            updates, opt_state = opt.update(g, opt_state, trained)
            return optax.apply_updates(trained, updates), opt_state, loss

        args = (trained, opt.init(trained), params, ids, tokens)
        carry = lambda args, out: (out[0], out[1], *args[2:])  # noqa: E731
        info["weight_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        return step, args, (0, 1), carry, info

    model = _model(cfg, max_len, fresh=not decode, cache_form=getattr(a, "cache_form", "xs"))
    t = 1 if decode else max_len
    tokens = jax.random.randint(jax.random.key(2), (batch, t), 0, cfg.vocab, dtype=jnp.int32)
    params = jax.jit(lambda k: model.init(k, tokens[:1], empty_cache(cfg, 1, max_len), 0))(jax.random.key(0))
    cache_args = (tokens, empty_cache(cfg, batch, max_len, abstract=True), 0)
    lora = jaxlora.init(jax.random.key(1), params, lora_cfg, fn=model.apply, args=cache_args)
    lora = {p: dataclasses.replace(f, b=jnp.full(f.b.shape, 0.01, f.b.dtype)) for p, f in lora.items()}
    cache = empty_cache(cfg, batch, max_len)
    pos = jnp.int32(max_len - 1 if decode else 0)  # decode: attend over the whole cache
    info["lora_bytes_used"] = 0  # the factors a step reads (once, at best)
    if a.mode in ("base", "base_b1", "prefill_merged"):
        fwd = lambda p, x, c, pos: model.apply(p, x, c, pos)  # noqa: E731
        extra = jax.jit(jaxlora.merge)(params, lora)
        if a.mode != "prefill_merged":  # the same compiled step on the base weights, timed after the merged ones
            info["base_params"] = params
    elif a.mode == "unmerged":
        fwd = lambda e, x, c, pos: jaxlora.apply(model.apply, e[0], e[1], x, c, pos)  # noqa: E731
        extra = (params, lora)
        info["lora_bytes_used"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lora))
    else:
        n, k = RESIDENT[a.mode], DISTINCT[a.mode]
        stk = _stack_like(lora, n, 1, jnp.dtype(a.lora_dtype))
        ids = (jnp.arange(batch, dtype=jnp.int32) % k) * (n // k)  # k distinct slots, spread over the stack
        info["factor_bytes_resident"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((stk.a, stk.b)))
        info["factor_bytes_used"] = info["lora_bytes_used"] = info["factor_bytes_resident"] * k // n

        def fwd(extra, x, c, pos):
            p, s, i = extra
            return jaxlora.apply(model.apply, p, s, x, c, pos, adapter_ids=i, example_axes=(0, 1, None),
                                 example_out_axes=(0, 1))  # fmt: skip

        extra = (params, stk, ids)
    info["weight_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    info["embed_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["params"]["embed"]))
    info["kv_bytes"] = sum(c.size * c.dtype.itemsize for c in cache)
    carry = lambda args, out: (args[0], args[1], out[1], args[3])  # noqa: E731
    return fwd, (extra, tokens, cache, pos), (2,), carry, info


def _measure(a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from . import common, models

    t0 = time.perf_counter()
    fn, args, donate, carry, out = _program(a)
    base_params = out.pop("base_params", None)
    t1 = time.perf_counter()
    step = jax.jit(fn, donate_argnums=donate, compiler_options=_compiler_options(a) or None)
    lowered = step.lower(*args)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    out.update(setup_s=round(t1 - t0, 2), trace_lower_s=round(t2 - t1, 2), compile_s=round(t3 - t2, 2))
    state = {"args": args, "out": None}

    def run():
        state["out"] = compiled(*state["args"])
        state["args"] = carry(state["args"], state["out"])

    wait = lambda: jax.block_until_ready(state["out"][-1])  # noqa: E731

    def blocking():
        run()
        wait()

    t4 = time.perf_counter()
    blocking()
    out["first_step_s"] = round(time.perf_counter() - t4, 2)
    print(f"{a.mode}: setup {out['setup_s']} s, trace+lower {out['trace_lower_s']} s, compile {out['compile_s']} s, "
          f"first step {out['first_step_s']} s", file=sys.stderr, flush=True)  # fmt: skip
    for _ in range(a.warmup):
        blocking()
    common.sync_point()
    ms = models.timeit(blocking, a.steps, 0)
    out.update(median_ms=models.median(ms), step_ms=[round(x, 3) for x in ms])
    out["pipelined_ms"] = models.median(models.timeit_pipelined(run, wait, max(2, a.steps // 4), 4))
    out["tokens_per_s"] = out["tokens_per_step"] / (out["pipelined_ms"] / 1e3)
    if base_params is not None:  # the same compiled step on the base weights, and a copy of W for bandwidth
        state["args"] = (base_params, *state["args"][1:])
        out["base_pipelined_ms"] = models.median(models.timeit_pipelined(run, wait, max(2, a.steps // 4), 4))
        copy = jax.jit(lambda ws: [w * jnp.asarray(1, w.dtype) for w in ws])
        leaves = jax.tree.leaves(base_params)
        res = [None]
        cms = models.timeit(lambda: res.__setitem__(0, jax.block_until_ready(copy(leaves))), a.steps, 2)
        out["copy_gb_per_s"] = 2 * out["weight_bytes"] / (models.median(cms) / 1e3) / 1e9
    out["peak_bytes"] = models.peak_bytes()
    if getattr(a, "profile", None):
        with open(a.profile + ".hlo.txt", "w") as f:
            f.write(compiled.as_text())
        common.profile(blocking, a.profile)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama8b")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mode", default="base")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-dtype", default="bfloat16", help="dtype of the factors and stacks")
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--cache", type=int, default=1024, help="KV-cache length (and prefill/training sequence)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--override", default="{}")
    p.add_argument("--cache-form", default="xs", choices=CACHE_FORMS, help="how the scanned layers reach the cache")
    p.add_argument("--stack-form", default=None, choices=("gather", "onehot", "sgmv"), help="force the form")
    p.add_argument("--gemm", default="options", choices=GEMMS, help="skinny products: how Triton GEMM is turned off")
    p.add_argument("--profile", default=None, help="per mode: a trace of 3 steps and the HLO at PREFIX_<mode>")
    p.add_argument("--timeout", type=float, default=150, help="seconds one mode (its own process) may take")
    p.add_argument("--budget", type=float, default=540, help="seconds all modes together may take")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a)), flush=True)
        return {}
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from . import common, models

    flags = ["--config", a.config, "--rank", str(a.rank), "--lora-dtype", a.lora_dtype, "--steps", str(a.steps),
             "--warmup", str(a.warmup), "--override", a.override, "--decode-batch", str(a.decode_batch),
             "--prefill-batch", str(a.prefill_batch), "--cache", str(a.cache),
             "--cache-form", a.cache_form, "--gemm", a.gemm]  # fmt: skip
    if a.stack_form:
        flags += ["--stack-form", a.stack_form]
    jobs = {mode: ["--mode", mode, *flags] for mode in a.modes.split(",")}
    if a.profile:
        jobs = {m: [*j, "--profile", f"{a.profile}_{m}"] for m, j in jobs.items()}
    cfg = models.configure(a.config, override=a.override)
    result = {**common.environment(), "benchmark": "multi_adapter", "config_name": a.config,
              "config": dataclasses.asdict(cfg), "lora": {"rank": a.rank, "dtype": a.lora_dtype},
              "decode_batch": a.decode_batch, "prefill_batch": a.prefill_batch, "cache": a.cache,
              "cache_form": a.cache_form, "stack_form": a.stack_form or "by cost", "gemm": a.gemm,
              "timeout_s": a.timeout, "budget_s": a.budget, "modes": {}}  # fmt: skip
    partial = lambda so_far: common.write({**result, "modes": so_far, "partial": True}, a.out, quiet=True)  # noqa: E731
    envs = None
    if a.gemm == "flags":
        flags_env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {NO_TRITON_GEMM}".strip()}
        envs = {mode: flags_env for mode in jobs}
    m = common.run_workers("benchmarks.multi_adapter", jobs, a.timeout, parallel=False, budget=a.budget,
                           on_result=partial, envs=envs)  # fmt: skip
    result["modes"] = m
    ok = lambda k: "pipelined_ms" in m.get(k, {})  # noqa: E731
    ratios = {}
    for k in DECODE:  # each decode figure's bytes floor: what a step must read, read once
        ref = "base_b1" if k == "base_b1" else "base"
        if ok(k) and ok(ref):
            r, bw = m[k], m[ref]["copy_gb_per_s"] * 1e9
            floor = r["weight_bytes"] - r["embed_bytes"] + r["kv_bytes"] + r["lora_bytes_used"]
            r["floor_ms"] = floor / bw * 1e3
            r["over_floor"] = r["pipelined_ms"] / r["floor_ms"]
            ratios[f"{k}_over_floor"] = r["over_floor"]  # <= 1.2 for base (merged) and base_b1
            if r["lora_bytes_used"]:  # the LoRA term: its time over merged against its factors read once
                r["lora_ms"] = r["pipelined_ms"] - m["base"]["pipelined_ms"]
                r["lora_floor_ms"] = r["lora_bytes_used"] / bw * 1e3
                ratios[f"{k}_lora_over_floor"] = r["lora_ms"] / r["lora_floor_ms"]  # <= 1.5 for mixed64
    if ok("base"):
        b = m["base"]
        ratios["merged_tokens_per_s"] = b["tokens_per_s"]
        for k in ("unmerged", "mixed8", "mixed64", "mixed64_of1024"):
            if ok(k):
                ratios[f"{k}_over_merged"] = m[k]["tokens_per_s"] / b["tokens_per_s"]  # >= 0.90 for mixed8
    if ok("mixed64") and ok("mixed64_of1024"):
        ratios["of1024_over_of64_time"] = m["mixed64_of1024"]["pipelined_ms"] / m["mixed64"]["pipelined_ms"]  # <= 1.05
        ratios["of1024_minus_of64_peak_bytes"] = (m["mixed64_of1024"]["peak_bytes"] or 0) - (
            m["mixed64"]["peak_bytes"] or 0
        )
        ratios["of1024_minus_of64_factor_bytes"] = (
            m["mixed64_of1024"]["factor_bytes_resident"] - m["mixed64"]["factor_bytes_resident"]
        )
    if ok("prefill_merged") and ok("prefill_mixed8"):
        ratios["prefill_mixed8_over_merged"] = m["prefill_mixed8"]["tokens_per_s"] / m["prefill_merged"]["tokens_per_s"]
    if ok("train_one") and ok("train_stack8"):
        ratios["train_stack8_over_one"] = m["train_stack8"]["pipelined_ms"] / m["train_one"]["pipelined_ms"]  # <= 1.15
    result["ratios"] = ratios
    print(f"\n{result['device']}  {a.config}  decode batch {a.decode_batch}, cache {a.cache}, rank {a.rank}")
    print(f"gemm: {a.gemm} (XLA_FLAGS {m.get('base', {}).get('xla_flags')!r}, "
          f"compiler_options {m.get('base', {}).get('compiler_options')})")  # fmt: skip
    print(f"{'mode':<16} {'ms':>9} {'floor ms':>9} {'x floor':>8} {'LoRA ms':>8} {'its floor':>9} {'tokens/s':>11} "
          f"{'peak':>10} {'compile s':>9}")  # fmt: skip
    for mode, r in m.items():
        if "error" in r:
            print(f"{mode:<16} failed: {r['error'][:200]} {r.get('stderr_tail', '')[-200:]}")
        elif mode == "swap":
            print(f"{mode:<16} {r['median_ms']:>9.3f} ms a miss from host memory ({r['adapter_bytes'] / 1e6:,.1f} MB, "
                  f"{r['host_gb_per_s']:.2f} GB/s), {r['disk_median_ms']:.3f} ms from disk")  # fmt: skip
        else:
            f = lambda k, w=9, r=r: f"{r[k]:>{w}.3f}" if k in r else " " * (w - 1) + "-"  # noqa: E731
            print(f"{mode:<16} {r['pipelined_ms']:>9.3f} {f('floor_ms')} {f('over_floor', 8)} {f('lora_ms', 8)} "
                  f"{f('lora_floor_ms')} {r['tokens_per_s']:>11,.0f} {common.gb(r['peak_bytes']):>10} "
                  f"{r['compile_s']:>9}")  # fmt: skip
    for k, v in ratios.items():
        print(f"{k}: {v:,.3f}" if isinstance(v, float) else f"{k}: {v:,}")
    common.write(result, a.out)
    return result


if __name__ == "__main__":
    main()
