"""Serve many LoRA adapters from one base model: a batch of requests, each naming its own adapter.

A small Llama-style decoder (Flax Linen) with a KV cache; a jitted prefill and a jitted greedy
decode loop (``lax.scan``) over a mixed batch, where each request names its adapter (or none: the
base alone). The server knows more adapters than it has device slots: a `jaxlora.AdapterCache` of
``max_loras`` slots loads each batch's adapters from host memory on demand, evicting the least
recently used, and the same compiled functions serve whatever is loaded (no recompiles). The steps
compile with `jaxlora.serving_compiler_options` (on GPUs: cuBLAS for the decode step's skinny
products). Every request's tokens are checked against generating with its adapter alone, merged
into the weights.

Run: ``python examples/serve.py`` (CPU, about a minute).
"""

from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlora

VOCAB, D, HEADS, LAYERS, MAX_LEN = 256, 64, 4, 2, 48
_COMPILES = {"n": 0}
jax.monitoring.register_event_duration_secs_listener(
    lambda event, d, **kw: _COMPILES.__setitem__(
        "n", _COMPILES["n"] + (event == "/jax/core/compile/backend_compile_duration")
    )
)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, cache, pos):
        """``x (b, t, D)``; ``cache (b, 2, MAX_LEN, HEADS, hd)`` holds keys and values; ``pos``: where x starts."""
        b, t, _ = x.shape
        hd = D // HEADS
        h = nn.RMSNorm(name="ln1")(x)
        q, k, v = (nn.Dense(D, use_bias=False, name=n)(h).reshape(b, t, HEADS, hd) for n in ("q", "k", "v"))
        cache = jax.lax.dynamic_update_slice(cache, jnp.stack([k, v], 1), (0, 0, pos, 0, 0))
        keys, values = cache[:, 0], cache[:, 1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / np.sqrt(hd)
        visible = jnp.arange(MAX_LEN)[None, :] <= (pos + jnp.arange(t))[:, None]  # causal, and only what is written
        scores = jnp.where(visible, scores, -1e9)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), values).reshape(b, t, D)
        x = x + nn.Dense(D, use_bias=False, name="o")(att)
        h = nn.RMSNorm(name="ln2")(x)
        u = nn.silu(nn.Dense(4 * D, use_bias=False, name="gate")(h)) * nn.Dense(4 * D, use_bias=False, name="up")(h)
        return x + nn.Dense(D, use_bias=False, name="down")(u), cache


class Decoder(nn.Module):
    """``tokens (b, t)``, ``cache (b, LAYERS, 2, MAX_LEN, HEADS, hd)``, ``pos`` -> ``logits (b, t, VOCAB)``, cache."""

    @nn.compact
    def __call__(self, tokens, cache, pos):
        x = nn.Embed(VOCAB, D, name="embed")(tokens)
        caches = []
        for i in range(LAYERS):
            x, c = Block(name=f"layer_{i}")(x, cache[:, i], pos)
            caches.append(c)
        return nn.Dense(VOCAB, use_bias=False, name="lm_head")(nn.RMSNorm(name="ln_f")(x)), jnp.stack(caches, 1)


def empty_cache(batch: int) -> jax.Array:
    return jnp.zeros((batch, LAYERS, 2, MAX_LEN, HEADS, D // HEADS), jnp.float32)


def generator(forward):
    """Jitted prefill and greedy decode for ``forward(extra, tokens, cache, pos) -> (logits, cache)``.

    ``extra`` is what changes between calls without recompiling (the stack and the ids, or params).
    """
    jit = functools.partial(jax.jit, compiler_options=jaxlora.serving_compiler_options())

    @jit
    def prefill(extra, prompts):
        logits, cache = forward(extra, prompts, empty_cache(prompts.shape[0]), 0)
        return jnp.argmax(logits[:, -1], -1), cache

    @jit
    def decode(extra, first, cache, start, steps_template):
        def step(carry, _):
            token, cache, pos = carry
            logits, cache = forward(extra, token[:, None], cache, pos)
            nxt = jnp.argmax(logits[:, -1], -1)
            return (nxt, cache, pos + 1), nxt

        _, tokens = jax.lax.scan(step, (first, cache, start), steps_template)
        return jnp.concatenate([first[:, None], tokens.T], axis=1)

    def generate(extra, prompts, new_tokens):
        first, cache = prefill(extra, prompts)
        return decode(extra, first, cache, jnp.int32(prompts.shape[1]), jnp.zeros(new_tokens - 1))

    return generate


def make_adapters(params, tokens, cache, names, ranks):
    """Adapters with different ranks, alphas and targets, B random (a trained adapter's B is not zero)."""
    model = Decoder()
    out = {}
    targets = [["q", "v"], "all-linear", ["up", "down", "gate"], ["q", "k", "v", "o"]]
    for k, (name, rank) in enumerate(zip(names, ranks)):
        config = jaxlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets[k % len(targets)], exclude=["lm_head"])
        lora = jaxlora.init(jax.random.key(k), params, config, fn=model.apply, args=(tokens, cache, 0))
        keys = jax.random.split(jax.random.key(100 + k), len(lora))
        out[name] = {p: f.__class__(a=f.a, b=0.5 * jax.random.normal(kk, f.b.shape), scale=f.scale, roles=f.roles)
                     for kk, (p, f) in zip(keys, lora.items())}  # fmt: skip
    return out


def main(batch: int = 8, prompt_len: int = 8, new_tokens: int = 24, max_loras: int = 3) -> dict:
    model = Decoder()
    prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, VOCAB)
    params = model.init(jax.random.key(0), prompts, empty_cache(batch), 0)
    names = ("sql", "chat", "math", "code", "legal", "bio")
    adapters = make_adapters(params, prompts, empty_cache(batch), names, ranks=(4, 8, 2, 6, 3, 8))
    # more adapters than device slots: each batch's adapters are loaded on demand from host memory (NumPy
    # trees here; checkpoint directories work alike), slots of rank 8 with every scale folded into b
    cache = jaxlora.AdapterCache(jax.device_get(adapters), max_loras=max_loras)

    def mixed(extra, tokens, cache, pos):  # params come in as an argument: closed over, jit would embed them
        params, stk, ids = extra
        return jaxlora.apply(model.apply, params, stk, tokens, cache, pos, adapter_ids=ids)

    serve = generator(mixed)
    alone = generator(lambda p, tokens, cache, pos: model.apply(p, tokens, cache, pos))

    def requests(first):  # max_loras distinct adapters (and the base) over the batch, starting at names[first]
        pick = [names[(first + k) % len(names)] for k in range(max_loras)] + [None]
        return [pick[i % len(pick)] for i in range(batch)]

    def check(wanted, out):
        bad = []
        for row, name in enumerate(wanted):
            p = params if name is None else jaxlora.merge(params, adapters[name])
            if not np.array_equal(np.asarray(out[row]), np.asarray(alone(p, prompts[row : row + 1], new_tokens)[0])):
                bad.append(row)
        return bad

    wanted = requests(0)
    ids = cache.ids(wanted)
    t0 = time.perf_counter()
    out = jax.block_until_ready(serve((params, cache.stack, ids), prompts, new_tokens))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        out = jax.block_until_ready(serve((params, cache.stack, ids), prompts, new_tokens))
    tokens_per_s = reps * batch * new_tokens / (time.perf_counter() - t0)
    bad = check(wanted, out)
    differ = len({tuple(np.asarray(out[r]).tolist()) for r in range(batch)})
    # Adapters come and go: the next batches name others, loaded into the least recently used slots.
    recompiles, bad_after_swap, loads, swap_s = 0, [], cache.loads, 0.0
    for first in range(1, len(names), 2):
        wanted, n0 = requests(first), _COMPILES["n"]
        t0 = time.perf_counter()
        ids = cache.ids(wanted)
        swap_s += time.perf_counter() - t0
        out = jax.block_until_ready(serve((params, cache.stack, ids), prompts, new_tokens))
        recompiles += _COMPILES["n"] - n0
        bad_after_swap += check(wanted, out)
    loaded = cache.loads - loads
    result = dict(batch=batch, new_tokens=new_tokens, tokens_per_s=tokens_per_s, compile_s=compile_s,
                  mismatched_requests=bad, mismatched_after_swap=bad_after_swap, distinct_outputs=differ,
                  recompiles_after_swap=recompiles, adapters_loaded=loaded)  # fmt: skip
    print(f"{batch} requests, adapters {[n or 'base' for n in requests(0)]}, {max_loras} device slots")
    print(f"greedy decode of {new_tokens} tokens: {tokens_per_s:,.0f} tokens/s (compiled in {compile_s:.1f} s)")
    print(f"each request equals its adapter alone (merged): {not bad}; after the cache loaded {loaded} more "
          f"adapters ({1e3 * swap_s / max(loaded, 1):.1f} ms each): {not bad_after_swap}")  # fmt: skip
    print(f"recompiles as adapters came and went: {recompiles}; distinct outputs: {differ} of {batch}")
    return result


if __name__ == "__main__":
    r = main()
    assert not r["mismatched_requests"] and not r["mismatched_after_swap"] and r["recompiles_after_swap"] == 0
