"""LoRA fine-tuning of a Llama-style decoder on a device mesh (data / FSDP / tensor parallel).

The frozen weights are sharded by their logical axis names; jaxlora derives the LoRA factors'
shardings from them, creates the factors already sharded, and the jitted step takes explicit
in/out shardings and donates the LoRA and optimizer state. The same script runs unchanged on
simulated CPU devices, on one or more GPUs, and on every host of a TPU pod::

    # 8 simulated CPU devices, about a minute
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python examples/sharded_finetune.py
    # one GPU host, all its GPUs; pick the mesh (data, fsdp, tensor) yourself if you like
    python examples/sharded_finetune.py --preset small --mesh 1,2,2
    # every host of a TPU pod / GPU cluster, the same command on each
    python examples/sharded_finetune.py --multihost --preset small
    # checkpoint every 100 steps (storage every host can reach); after a crash, the same command
    # with --resume continues from the latest checkpoint as if nothing had happened
    python examples/sharded_finetune.py --steps 1000 --save-every 100 --checkpoint-dir /shared/run1 [--resume]

The model: RMSNorm, rotary position embeddings, grouped-query attention, a SwiGLU MLP, weights
annotated with logical axis names (``nn.with_logical_partitioning``), the blocks stacked with
``nn.scan`` and rematerialised with ``nn.remat``. The data are synthetic (arithmetic progressions
modulo the vocabulary), so the loss visibly falls; plug your own loader into `batches`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora

# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 128
    dim: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    hidden: int = 128
    rope_theta: float = 10_000.0
    eps: float = 1e-5
    dtype: Any = jnp.float32  # compute dtype; the weights stay float32 (param_dtype)
    remat: bool = True


PRESETS = {
    "tiny": LlamaConfig(),
    "small": LlamaConfig(
        vocab=32_000, dim=1024, layers=8, heads=16, kv_heads=4, head_dim=64, hidden=2816, dtype=jnp.bfloat16
    ),
}

# Logical axis name -> mesh axes. Batch over data x fsdp, weights' embed axis over fsdp (ZeRO-3),
# heads / MLP / vocab over tensor (Megatron). Flax assigns each mesh axis once per array, in order.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def _param(module: nn.Module, name: str, shape: Sequence[int], names: tuple[str, ...], fan_in: int) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(1.0 / math.sqrt(fan_in)), names)
    return module.param(name, init, tuple(shape), jnp.float32)


class Proj(nn.Module):
    """A bias-free projection ``einsum(equation, x, kernel)`` whose kernel has logical axis names."""

    equation: str
    shape: tuple[int, ...]
    names: tuple[str, ...]
    fan_in: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _param(self, "kernel", self.shape, self.names, self.fan_in)
        return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of ``x: (batch, length, heads, head_dim)`` (half-split layout)."""
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[:, :, None, None].astype(jnp.float32) * freq[None, None, None, :]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        c = self.cfg
        group = c.heads // c.kv_heads
        q = Proj(
            "btd,dhk->bthk", (c.dim, c.heads, c.head_dim), ("embed", "heads", "head_dim"), c.dim, c.dtype, name="q"
        )(x)
        kv_shape, kv_names = (c.dim, c.kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim")
        k = Proj("btd,dhk->bthk", kv_shape, kv_names, c.dim, c.dtype, name="k")(x)
        v = Proj("btd,dhk->bthk", kv_shape, kv_names, c.dim, c.dtype, name="v")(x)
        q, k = rotary(q, positions, c.rope_theta), rotary(k, positions, c.rope_theta)
        b, t = x.shape[:2]
        q = q.reshape(b, t, c.kv_heads, group, c.head_dim)  # grouped-query: `group` query heads per kv head
        scores = jnp.einsum("btngk,bsnk->bngts", q, k).astype(jnp.float32) / math.sqrt(c.head_dim)
        causal = jnp.tril(jnp.ones((t, t), bool))
        probs = jax.nn.softmax(jnp.where(causal[None, None, None], scores, -1e30), axis=-1).astype(c.dtype)
        out = jnp.einsum("bngts,bsnk->btngk", probs, v).reshape(b, t, c.heads, c.head_dim)
        o_names = ("heads", "head_dim", "embed")
        return Proj("bthk,hkd->btd", (c.heads, c.head_dim, c.dim), o_names, c.heads * c.head_dim, c.dtype, name="o")(
            out
        )


class Mlp(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        gate = Proj("btd,dm->btm", (c.dim, c.hidden), ("embed", "mlp"), c.dim, c.dtype, name="gate")(x)
        up = Proj("btd,dm->btm", (c.dim, c.hidden), ("embed", "mlp"), c.dim, c.dtype, name="up")(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Proj("btm,md->btd", (c.hidden, c.dim), ("mlp", "embed"), c.hidden, c.dtype, name="down")(h)


class Block(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, None]:
        x = x + Attention(self.cfg, name="attn")(RMSNorm(self.cfg.eps, name="attn_norm")(x), positions)
        x = x + Mlp(self.cfg, name="mlp")(RMSNorm(self.cfg.eps, name="mlp_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class Llama(nn.Module):
    """A decoder-only transformer; params ``embed``, ``layers/...`` (stacked on axis 0), ``final_norm``, ``lm_head``."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.cfg
        table = _param(self, "embed", (c.vocab, c.dim), ("vocab", "embed"), 1)
        table = nn.with_logical_constraint(table, ("vocab", None))  # a vocab-parallel lookup, embed gathered
        x = jnp.take(table, tokens, axis=0).astype(c.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        block = nn.remat(Block, prevent_cse=False) if c.remat else Block
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=c.layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(c, name="layers")(x, positions)
        x = RMSNorm(c.eps, name="final_norm")(x)
        return Proj("btd,dv->btv", (c.dim, c.vocab), ("embed", "vocab"), c.dim, c.dtype, name="lm_head")(x).astype(
            jnp.float32
        )


# --------------------------------------------------------------------------- mesh, params, LoRA, step


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh. By default: data over hosts, tensor 2 where each host
    has 4 or more devices, fsdp over the rest."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if shape is None:
        hosts = jax.process_count()
        data = hosts if n % hosts == 0 else 1
        tensor = 2 if (n // data) % 2 == 0 and n // data >= 4 else 1
        shape = (data, n // (data * tensor), tensor)
    if math.prod(shape) != n:
        raise ValueError(f"mesh shape {tuple(shape)} (data, fsdp, tensor) needs {math.prod(shape)} devices, found {n}.")
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(shape), ("data", "fsdp", "tensor"), auto, devices=devices)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def like_lora(tree: Any, lora: Any, lora_shardings: Any, other: Any) -> Any:
    """Shardings for an optimizer state: each subtree shaped like ``lora`` gets ``lora_shardings``."""
    lora_def = jax.tree.structure(lora)
    is_lora = lambda x: jax.tree.structure(x) == lora_def  # noqa: E731
    return jax.tree.map(lambda x: lora_shardings if is_lora(x) else other, tree, is_leaf=is_lora)


@dataclasses.dataclass
class Setup:
    """Everything a training loop needs: the sharded params and LoRA tree, their shardings, the step."""

    model: Llama
    mesh: Mesh
    params: Any
    param_shardings: Any
    lora: Any
    lora_shardings: Any
    opt_state: Any
    opt_shardings: Any
    batch_sharding: NamedSharding
    step: Callable[..., Any]
    base_step: Callable[..., Any]  # full fine-tuning of the same model: the reference for communication
    config: jaxlora.LoraConfig


def setup(
    cfg: LlamaConfig,
    mesh: Mesh,
    *,
    batch: int,
    seq: int,
    rank: int = 8,
    lr: float = 1e-2,
    seed: int = 0,
    params: Any = None,
) -> Setup:
    """Build the sharded model, the sharded LoRA tree, the optimizer state and the jitted step.

    ``params`` are the frozen weights (say, loaded on the host from a checkpoint); they are placed with
    the derived shardings. Without them, random weights are created, each device making only its shards.
    """
    model = Llama(cfg)
    key_params, key_lora = jax.random.split(jax.random.key(seed))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        boxed = jax.eval_shape(model.init, key_params, tokens)  # nn.LogicallyPartitioned leaves, no memory
        param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
        if params is None:  # stand-in for loading a checkpoint
            init_params = lambda k: nn.unbox(model.init(k, jnp.zeros(tokens.shape, tokens.dtype)))  # noqa: E731
            params = jax.jit(init_params, out_shardings=param_shardings)(key_params)
        else:
            params = jax.device_put(params, param_shardings)

        config = jaxlora.LoraConfig(rank=rank, alpha=2 * rank, targets=["q", "k", "v", "o", "gate", "up", "down"])
        # A follows W's fsdp (input) axis, B W's tensor (output) axis; both born sharded inside jit.
        lora = jaxlora.init_sharded(
            key_lora, params, config, fn=model.apply, args=(tokens,), param_shardings=boxed, mesh=mesh, rules=RULES
        )
        lora_shardings = jaxlora.shardings(boxed, lora, mesh=mesh, rules=RULES)

        tx = optax.adamw(lr, weight_decay=0.0)
        replicated = NamedSharding(mesh, P())
        opt_shardings = like_lora(jax.eval_shape(tx.init, lora), lora, lora_shardings, replicated)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(lora)
        batch_sharding = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), RULES))

    def train_step(lora, opt_state, params, batch):
        def loss_fn(lora):
            logits = jaxlora.apply(model.apply, params, lora, batch["inputs"])
            return cross_entropy(logits, batch["targets"])

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    def base_train_step(params, batch):  # plain SGD on every weight: the base model's own forward/backward
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(model.apply(p, batch["inputs"]), batch["targets"]))(
            params
        )
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

    batch_shardings = {"inputs": batch_sharding, "targets": batch_sharding}
    step = jax.jit(
        train_step,
        in_shardings=(lora_shardings, opt_shardings, param_shardings, batch_shardings),
        out_shardings=(lora_shardings, opt_shardings, replicated),
        donate_argnums=(0, 1),
    )
    base_step = jax.jit(
        base_train_step, in_shardings=(param_shardings, batch_shardings), out_shardings=(param_shardings, replicated)
    )
    return Setup(
        model,
        mesh,
        params,
        param_shardings,
        lora,
        lora_shardings,
        opt_state,
        opt_shardings,
        batch_sharding,
        step,
        base_step,
        config,
    )


def batches(
    cfg: LlamaConfig, sharding: NamedSharding, batch: int, seq: int, seed: int = 0, start: int = 0
) -> Iterator[dict[str, jax.Array]]:
    """Synthetic arithmetic progressions mod vocab, from batch number ``start`` on. Every host builds only
    its own rows (the same rows whatever the host count) and the global array is assembled from them."""
    step = start
    while True:
        rng = np.random.default_rng([seed, step])
        start = rng.integers(0, cfg.vocab, (batch, 1))
        stride = rng.integers(1, 4, (batch, 1))
        seqs = ((start + stride * np.arange(seq + 1)) % cfg.vocab).astype(np.int32)
        local = {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}
        index = sharding.addressable_devices_indices_map((batch, seq))
        rows = sorted({idx[0].indices(batch)[:2] for idx in index.values()})
        lo, hi = rows[0][0], rows[-1][1]  # this host's block of rows
        if any(end != start for (_, end), (start, _) in zip(rows, rows[1:])):
            raise ValueError(
                f"this host's batch rows {rows} are not contiguous; put the hosts on the mesh's data axis."
            )
        yield {k: jax.make_array_from_process_local_data(sharding, v[lo:hi], (batch, seq)) for k, v in local.items()}
        step += 1


def save(mngr: ocp.CheckpointManager, step: int, s: Setup, lora: Any, opt_state: Any) -> None:
    """Checkpoint step ``step``: the LoRA tree (with its config and the base's fingerprint), the optimizer
    state, and the step itself (the manager's step number). Every host calls it: Orbax writes each
    array's shards from the host that holds them, and commits the step once all hosts are done. The
    save is asynchronous: the arrays are copied off the devices before it returns (so the next step may
    donate them) and written while training goes on."""
    items = jaxlora.checkpoint.save_args(lora, config=s.config, params=s.params)
    mngr.save(step, args=ocp.args.Composite(**items, opt_state=ocp.args.StandardSave(opt_state)), force=True)


def resume(mngr: ocp.CheckpointManager, s: Setup) -> tuple[int, Any, Any]:
    """``(step, lora, opt_state)`` of the latest checkpoint, each array read straight into its shards on
    the mesh, or ``(0, s.lora, s.opt_state)`` when there is none. Refuses a checkpoint made for another base."""
    if mngr.latest_step() is None:
        return 0, s.lora, s.opt_state
    abstract = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
    opt_target = jax.tree.map(abstract, s.opt_state, s.opt_shardings)
    lora, rest = jaxlora.checkpoint.restore_step(
        mngr, params=s.params, shardings=s.lora_shardings, opt_state=ocp.args.StandardRestore(opt_target)
    )
    return mngr.latest_step(), lora, rest["opt_state"]


def train(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the losses, the final LoRA tree and the timing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="global batch size (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--mesh", type=lambda s: tuple(int(v) for v in s.split(",")), default=None, help="data,fsdp,tensor"
    )
    parser.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (storage every host reaches)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps and at the end")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint, if any")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize() first")
    parser.add_argument(
        "--coordinator", default=None, help="host:port of process 0 (auto on TPU, SLURM, Open MPI, k8s)"
    )
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if (args.save_every or args.resume) and not args.checkpoint_dir:
        parser.error("--save-every and --resume need --checkpoint-dir")
    if args.multihost:  # on TPU pods and SLURM / Open MPI / Kubernetes clusters the arguments are found automatically
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    cfg = PRESETS[args.preset]
    mesh = make_mesh(args.mesh)
    s = setup(cfg, mesh, batch=args.batch, seq=args.seq, rank=args.rank, lr=args.lr, seed=args.seed)
    main = jax.process_index() == 0
    if main:
        kind, hosts = jax.devices()[0].device_kind, jax.process_count()
        print(f"devices: {jax.device_count()} ({kind}) on {hosts} host(s); mesh {dict(mesh.shape)}")
        print(jaxlora.summary(s.params, s.lora).__str__().splitlines()[-1])
    mngr = None
    if args.checkpoint_dir:
        options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=True)
        mngr = ocp.CheckpointManager(os.path.abspath(args.checkpoint_dir), options=options)
    start, lora, opt_state = resume(mngr, s) if args.resume else (0, s.lora, s.opt_state)
    if main and start:
        print(f"resumed from step {start} in {args.checkpoint_dir}")
    data = batches(cfg, s.batch_sharding, args.batch, args.seq, args.seed, start=start)
    from tqdm import tqdm

    bar = tqdm(range(start, args.steps), disable=args.no_progress or not main, unit="step")
    losses, times = [], []
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        for i in bar:
            batch = next(data)
            t0 = time.perf_counter()
            lora, opt_state, loss = s.step(lora, opt_state, s.params, batch)
            losses.append(float(loss))  # waits for the step
            times.append(time.perf_counter() - t0)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{args.batch * args.seq / times[-1]:,.0f}")
            if mngr and ((args.save_every and (i + 1) % args.save_every == 0) or i + 1 == args.steps):
                save(mngr, i + 1, s, lora, opt_state)
    if mngr:
        mngr.wait_until_finished()
        mngr.close()
    if not losses:
        if main:
            print(f"nothing to do: the checkpoint is at step {start}, --steps is {args.steps}")
        return {"losses": [], "first_step": start + 1, "lora": lora, "step_time": None, "peak_bytes": None,
                "mesh": dict(mesh.shape)}  # fmt: skip
    steady = times[1:] or times  # the first step compiles
    step_time = float(np.median(steady))
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    if main:
        mem = f", peak memory {peak / 2**20:,.0f} MiB on device 0" if peak else ""
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {step_time * 1e3:.1f} ms/step, "
              f"{args.batch * args.seq / step_time:,.0f} tokens/s{mem}")  # fmt: skip
    return {
        "losses": losses,
        "first_step": start + 1,
        "lora": lora,
        "step_time": step_time,
        "peak_bytes": peak,
        "mesh": dict(mesh.shape),
    }


if __name__ == "__main__":
    train()
