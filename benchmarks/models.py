"""Benchmark models: a GPT-style / Llama-style decoder in Flax Linen, and the same decoder in Flax NNX.

Every projection is its own ``Dense`` (q, k, v, o, up, down, and gate for SwiGLU), so LoRA targets
them by name. Weights are ``param_dtype`` (bfloat16 in the benchmarks); attention is
``jax.nn.dot_product_attention`` with ``implementation="cudnn"`` on a GPU, XLA's elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of one benchmark model."""

    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads
    d_ff: int | None = None  # 4 * d_model by default
    vocab: int = 32768
    batch: int = 8
    seq: int = 1024
    mlp: str = "gelu"  # "gelu" (up, down) or "swiglu" (gate, up, down)
    remat: bool = False
    scan: bool = False
    dtype: str = "bfloat16"
    # with remat, what each block keeps for the backward pass (`remat_policy`)
    remat_policy: str = "block"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def matmul_params(self) -> int:
        """Parameters of every matmul (all layers and the LM head; not the embedding lookup)."""
        d, kv = self.d_model, self.kv_heads * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + (3 if self.mlp == "swiglu" else 2) * d * self.ff
        return self.n_layers * per_layer + d * self.vocab

    def params(self) -> int:
        return self.matmul_params() + self.d_model * self.vocab + (2 * self.n_layers + 1) * self.d_model

    def train_flops(self) -> float:
        """Model FLOPs of one training step: 6·N·tokens for the matmuls, plus causal attention (half of 12·L·seq·d)."""
        tokens = self.batch * self.seq
        return 6.0 * self.matmul_params() * tokens + 6.0 * self.n_layers * self.seq * self.d_model * tokens


CONFIGS = {
    "A": ModelConfig(d_model=1024, n_layers=24, n_heads=16, vocab=32768, batch=8, seq=1024),
    "B": ModelConfig(d_model=4096, n_layers=4, n_heads=32, vocab=32768, batch=4, seq=2048),
    "llama8b": ModelConfig(
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        vocab=128256,
        batch=4,
        seq=2048,
        mlp="swiglu",
        remat=True,
        scan=True,
    ),  # fmt: skip
    "llama70b": ModelConfig(
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        d_ff=28672,
        vocab=128256,
        batch=4,
        seq=4096,
        mlp="swiglu",
        remat=True,
        scan=True,
    ),  # fmt: skip
    "tiny": ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab=256, batch=2, seq=32, dtype="float32"),
    "tiny_scan": ModelConfig(
        d_model=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=256,
        vocab=256,
        batch=2,
        seq=32,
        mlp="swiglu",
        remat=True,
        scan=True,
    ),  # fmt: skip
    "cpu": ModelConfig(d_model=512, n_layers=4, n_heads=8, vocab=4096, batch=4, seq=256, dtype="float32"),
    "cpu_wide": ModelConfig(d_model=1024, n_layers=2, n_heads=8, vocab=2048, batch=4, seq=128, dtype="float32"),
}


def configure(
    name: str, remat: bool = False, scan: bool = False, override: str = "{}", policy: str = "block"
) -> ModelConfig:
    """``CONFIGS[name]`` with remat/scan switched on by flag (``policy="none"`` takes remat away), the remat
    policy, then JSON overrides, which may also switch them off (``'{"scan": false}'``: the layers unrolled)."""
    import json

    c = CONFIGS[name]
    remat_policy(policy)  # a bad name fails here, in the driver
    fields = dict(remat=remat or c.remat, scan=scan or c.scan, remat_policy=policy) | json.loads(override)
    return dataclasses.replace(c, **fields)


POLICIES = ("block", "none", "dots", "minimal", "outputs", "mlp")


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of ``ModelConfig.remat_policy``: ``"block"`` recomputes the whole
    block (no policy), ``"none"`` has no remat at all, ``"dots"`` is JAX's
    ``dots_with_no_batch_dims_saveable``, ``"minimal"`` and ``"outputs"`` are `jaxlora.remat_policy`'s
    levels, ``"mlp"`` is ``"outputs"`` of gate and up only (without LoRA, as in full fine-tuning,
    they name nothing: whole-block remat)."""
    import jaxlora

    if name not in POLICIES:
        raise ValueError(f"remat policy {name!r}: expected one of {POLICIES}")
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "mlp":
        return jaxlora.remat_policy("outputs", targets=("gate", "up"))
    return jaxlora.remat_policy(name) if name in ("minimal", "outputs") else None


def _remat(c: ModelConfig) -> bool:
    return c.remat and c.remat_policy != "none"


def attention(q, k, v):
    """Causal attention on ``(batch, seq, heads, head_dim)``: cuDNN's fused kernel on a GPU."""
    fused = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)  # cuDNN's dtypes
    impl = "cudnn" if fused else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def _norm(x, scale):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (x32 * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


# --------------------------------------------------------------------------- Linen


class RMSNorm(nn.Module):
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x):
        return _norm(x, self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype))


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, _=None):
        c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        b, t, _d = x.shape
        h = RMSNorm(dt, name="ln1")(x)
        q = dense(c.n_heads * c.head_dim, "q")(h).reshape(b, t, c.n_heads, c.head_dim)
        k = dense(c.kv_heads * c.head_dim, "k")(h).reshape(b, t, c.kv_heads, c.head_dim)
        v = dense(c.kv_heads * c.head_dim, "v")(h).reshape(b, t, c.kv_heads, c.head_dim)
        a = attention(q, k, v).reshape(b, t, c.d_model)
        x = x + dense(c.d_model, "o")(a)
        h = RMSNorm(dt, name="ln2")(x)
        if c.mlp == "swiglu":
            u = nn.silu(dense(c.ff, "gate")(h)) * dense(c.ff, "up")(h)
        else:
            u = nn.gelu(dense(c.ff, "up")(h))
        x = x + dense(c.d_model, "down")(u)
        return x, None


class Decoder(nn.Module):
    """A decoder-only transformer: ``tokens (batch, seq) -> logits (batch, seq, vocab)``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens):
        c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = nn.Embed(c.vocab, c.d_model, dtype=dt, param_dtype=dt, name="embed")(tokens)
        block = nn.remat(Block, prevent_cse=not c.scan, policy=remat_policy(c.remat_policy)) if _remat(c) else Block
        if c.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.n_layers)
            x, _ = stack(c, name="layers")(x, None)
        else:
            for i in range(c.n_layers):
                x, _ = block(c, name=f"layer_{i}")(x, None)
        x = RMSNorm(dt, name="ln_f")(x)
        return nn.Dense(c.vocab, use_bias=False, dtype=dt, param_dtype=dt, name="lm_head")(x)


def loss_fn(logits, tokens):
    """Next-token cross entropy, the softmax in float32."""
    logits = logits[:, :-1].astype(jnp.float32)
    labels = tokens[:, 1:]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jnp.mean(lse - picked)


def targets(cfg: ModelConfig) -> tuple[str, ...]:
    """The LoRA targets: every projection of every block (q, k, v, o, up, down, and gate for SwiGLU)."""
    return ("q", "k", "v", "o", "up", "down") + (("gate",) if cfg.mlp == "swiglu" else ())


# --------------------------------------------------------------------------- NNX (the nnx.LoRALinear peer)


class NnxBlock(nnx.Module):
    def __init__(self, c: ModelConfig, rank: int, rngs: nnx.Rngs):
        dt = jnp.dtype(c.dtype)

        def dense(n_in, n_out):
            if rank:
                return nnx.LoRALinear(
                    n_in, n_out, lora_rank=rank, use_bias=False, dtype=dt, param_dtype=dt, lora_dtype=dt,
                    lora_param_dtype=jnp.float32, rngs=rngs,
                )  # fmt: skip
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)

        self.c = c
        self.ln1 = nnx.Param(jnp.ones((c.d_model,), dt))
        self.ln2 = nnx.Param(jnp.ones((c.d_model,), dt))
        kv = c.kv_heads * c.head_dim
        self.q, self.k, self.v = dense(c.d_model, c.d_model), dense(c.d_model, kv), dense(c.d_model, kv)
        self.o = dense(c.d_model, c.d_model)
        self.gate = dense(c.d_model, c.ff) if c.mlp == "swiglu" else None
        self.up, self.down = dense(c.d_model, c.ff), dense(c.ff, c.d_model)

    def __call__(self, x):
        c = self.c
        b, t, _ = x.shape
        h = _norm(x, self.ln1[...])
        q = self.q(h).reshape(b, t, c.n_heads, c.head_dim)
        k = self.k(h).reshape(b, t, c.kv_heads, c.head_dim)
        v = self.v(h).reshape(b, t, c.kv_heads, c.head_dim)
        x = x + self.o(attention(q, k, v).reshape(b, t, c.d_model))
        h = _norm(x, self.ln2[...])
        u = nnx.silu(self.gate(h)) * self.up(h) if self.gate is not None else nnx.gelu(self.up(h))
        return x + self.down(u)


class NnxDecoder(nnx.Module):
    """The same decoder in NNX; with ``rank > 0`` every projection is an ``nnx.LoRALinear``."""

    def __init__(self, c: ModelConfig, rank: int, rngs: nnx.Rngs):
        dt = jnp.dtype(c.dtype)
        self.embed = nnx.Embed(c.vocab, c.d_model, dtype=dt, param_dtype=dt, rngs=rngs)
        self.layers = nnx.List([NnxBlock(c, rank, rngs) for _ in range(c.n_layers)])
        self.ln_f = nnx.Param(jnp.ones((c.d_model,), dt))
        self.lm_head = nnx.Linear(c.d_model, c.vocab, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)
        self.remat, self.policy = _remat(c), c.remat_policy

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = nnx.remat(lambda m, x: m(x), policy=remat_policy(self.policy))(layer, x) if self.remat else layer(x)
        return self.lm_head(_norm(x, self.ln_f[...]))


def tokens_for(cfg: ModelConfig, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (cfg.batch, cfg.seq), 0, cfg.vocab, dtype=jnp.int32)


def timeit(fn: Callable[[], object], steps: int, warmup: int) -> list[float]:
    """Milliseconds per call of ``fn`` (which must block on its result), after ``warmup`` calls."""
    import time

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def timeit_pipelined(run: Callable[[], object], wait: Callable[[], object], steps: int, window: int) -> list[float]:
    """Milliseconds per step when ``window`` steps are dispatched back to back and waited for once.

    This is how a training loop runs: the host queues the next step while the device runs this one,
    so per-step host work (argument handling, launching the compiled program) is hidden. One value per
    window, ``steps`` windows.
    """
    import time

    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(window):
            run()
        wait()
        out.append((time.perf_counter() - t0) * 1e3 / window)
    return out


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
