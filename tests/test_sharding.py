"""A/B shardings derived from W's (`jaxlora.shardings`, `jaxlora.init_sharded`), and LoRA on a mesh.

Checks of the derivation itself run in this process on a one-device mesh. Everything that needs
several devices runs in a subprocess with 8 simulated CPU devices (`helpers.run_with_devices`), so
this process keeps its single device; the checks are batched into few subprocesses.
"""

import importlib.util
import os
import pathlib
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_trees_close, run_with_devices
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _example():
    if "sharded_finetune" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sharded_finetune", ROOT / "examples" / "sharded_finetune.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["sharded_finetune"] = module  # flax dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["sharded_finetune"]


# The Llama example's weights: logical names -> mesh axes by the example's RULES, split by roles by hand.
EXPECTED = {
    "embed": ("io", P("tensor", None), P(None, "fsdp")),  # (vocab, embed), a lookup: vocab is the input
    "layers/attn/q": ("sioo", P(None, "fsdp", None), P(None, None, "tensor", None)),  # (L, embed, heads, hd)
    "layers/attn/k": ("sioo", P(None, "fsdp", None), P(None, None, "tensor", None)),
    "layers/attn/v": ("sioo", P(None, "fsdp", None), P(None, None, "tensor", None)),
    "layers/attn/o": ("siio", P(None, "tensor", None, None), P(None, None, "fsdp")),  # (L, heads, hd, embed)
    "layers/mlp/gate": ("sio", P(None, "fsdp", None), P(None, None, "tensor")),
    "layers/mlp/up": ("sio", P(None, "fsdp", None), P(None, None, "tensor")),
    "layers/mlp/down": ("sio", P(None, "tensor", None), P(None, None, "fsdp")),
    "lm_head": ("io", P("fsdp", None), P(None, "tensor")),
}


@pytest.fixture(scope="module")
def llama():
    """The example's model, abstract: boxed params, plain params and the LoRA tree (nothing allocated)."""
    ex = _example()
    model = ex.Llama(ex.LlamaConfig())
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
    params = nn.unbox(boxed)
    config = jaxlora.LoraConfig(rank=4, targets=list(EXPECTED))
    lora = jax.eval_shape(lambda k: jaxlora.init(k, params, config, fn=model.apply, args=(tokens,)), jax.random.key(1))
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    return ex, model, boxed, params, lora, mesh


def _specs(tree):
    return {p: (f.roles, getattr(f.a, "spec", f.a), getattr(f.b, "spec", f.b)) for p, f in tree.items()}


@pytest.mark.parametrize("form", ["boxed", "logical_specs", "named_shardings", "sharded_structs", "mesh_specs"])
def test_llama_specs_from_every_linen_form(llama, form):
    ex, _, boxed, params, lora, mesh = llama
    logical = nn.get_partition_spec(boxed)
    named = nn.logical_to_mesh_sharding(logical, mesh, ex.RULES)
    if form == "boxed":  # nn.LogicallyPartitioned leaves + rules
        out = jaxlora.shardings(boxed, lora, mesh=mesh, rules=ex.RULES)
    elif form == "logical_specs":  # PartitionSpecs of logical names + rules
        out = jaxlora.shardings(logical, lora, mesh=mesh, rules=ex.RULES)
    elif form == "named_shardings":  # NamedShardings: the mesh comes with them
        out = jaxlora.shardings(named, lora)
    elif form == "sharded_structs":  # jax.ShapeDtypeStruct with shardings, e.g. from eval_shape
        structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, named)
        out = jaxlora.shardings(structs, lora)
    else:  # PartitionSpecs of mesh axes, no mesh: PartitionSpecs come back
        out = jaxlora.shardings(jax.tree.map(lambda s: s.spec, named), lora)
    assert _specs(out) == EXPECTED
    for f in out.values():
        for s in (f.a, f.b):
            assert isinstance(s, P if form == "mesh_specs" else NamedSharding)
            assert form == "mesh_specs" or s.mesh == mesh
    # The result mirrors lora: scale and roles kept, so it works as jit in/out shardings of the tree.
    assert jax.tree.structure(out) == jax.tree.structure(lora)


def test_linen_partitioned_boxes_with_mesh_names():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(16, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("fsdp", "tensor")))(x)
            return nn.Dense(8, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("tensor", "fsdp")))(h)

    boxed = jax.eval_shape(Mlp().init, jax.random.key(0), jnp.ones((2, 8)))
    lora = jaxlora.init(jax.random.key(0), nn.unbox(boxed), jaxlora.LoraConfig(rank=2))
    out = jaxlora.shardings(boxed, lora, rank_axis=lambda path: "data" if path == "Dense_1" else None)
    assert _specs(out) == {
        "Dense_0": ("io", P("fsdp", None), P(None, "tensor")),
        "Dense_1": ("io", P("tensor", "data"), P("data", "fsdp")),
    }


def test_nnx_sharding_metadata():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))

    class Mlp(nnx.Module):
        def __init__(self, rngs, names_in, names_out):
            init = nnx.initializers.lecun_normal()
            self.up = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(init, names_in), rngs=rngs)
            self.down = nnx.Linear(16, 8, kernel_init=nnx.with_partitioning(init, names_out), rngs=rngs)

    # mesh axis names: the variables are created sharded (eager sharding named, as an imported library may
    # have turned Flax's default off for the process)
    with jax.set_mesh(mesh), nnx.use_eager_sharding(True):
        mesh_named = nnx.state(Mlp(nnx.Rngs(0), ("fsdp", "tensor"), ("tensor", "fsdp")), nnx.Param)
    with nnx.use_eager_sharding(False):  # logical names: only annotated
        logical = nnx.state(Mlp(nnx.Rngs(0), ("embed", "mlp"), ("mlp", "embed")), nnx.Param)
    assert mesh_named["up"]["kernel"].get_value().sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    lora = jaxlora.init(jax.random.key(0), mesh_named, jaxlora.LoraConfig(rank=2))
    want = {"up": ("io", P("fsdp", None), P(None, "tensor")), "down": ("io", P("tensor", None), P(None, "fsdp"))}
    assert _specs(jaxlora.shardings(mesh_named, lora)) == want
    rules = [("embed", "fsdp"), ("mlp", "tensor")]
    assert _specs(jaxlora.shardings(logical, lora, rules=rules, mesh=mesh)) == want
    assert _specs(jaxlora.shardings(nnx.get_partition_spec(logical), lora, rules=rules)) == want


def test_rank_axis_and_replicated_leaves():
    params = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((4, 8))}}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    out = jaxlora.shardings({"a": {"kernel": P("x")}, "b": {"kernel": None}}, lora, rank_axis="y")
    assert _specs(out) == {"a": ("io", P("x", "y"), P("y", None)), "b": ("io", P(None, "y"), P("y", None))}
    out = jaxlora.shardings(params, lora)  # host arrays on one device: replicated
    assert _specs(out) == {"a": ("io", P(None, None), P(None, None)), "b": ("io", P(None, None), P(None, None))}


def test_init_sharded_equals_init_on_one_device(llama):
    ex, model, boxed, params, _, mesh = llama
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    config = jaxlora.LoraConfig(rank=4, targets=list(EXPECTED))
    with jax.set_mesh(mesh), nn.logical_axis_rules(ex.RULES):
        lora = jaxlora.init_sharded(
            jax.random.key(1),
            params,
            config,
            fn=model.apply,
            args=(tokens,),
            param_shardings=boxed,
            mesh=mesh,
            rules=ex.RULES,
        )
        ref = jaxlora.init(jax.random.key(1), params, config, fn=model.apply, args=(tokens,))
    assert_trees_close(lora, ref, rtol=0, atol=0)
    assert {p: (f.roles, f.a.sharding.spec, f.b.sharding.spec) for p, f in lora.items()} == EXPECTED


def test_errors_are_collected_and_name_the_fix():
    params = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((4, 8))}, "c": {"kernel": jnp.ones((4, 4))}}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    bad = {"a": {"kernel": P(None, "x", "y")}, "b": {"kernel": "replicated"}}
    with pytest.raises(
        ValueError,
        match=r"(?s)'a': the weight has 2 axes.*has 3 entries.*'b': cannot read a sharding.*'c' has no sharding",
    ):
        jaxlora.shardings(bad, lora)
    with pytest.raises(ValueError, match=r"'a': factor a would use mesh axes \['x'\] twice.*rank_axis"):
        jaxlora.shardings({"a": {"kernel": P("x")}, "b": {"kernel": None}, "c": {"kernel": None}}, lora, rank_axis="x")
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match=r"names \['x'\], not axes of the mesh"):
        jaxlora.shardings({"a": {"kernel": P("x")}, "b": {"kernel": None}, "c": {"kernel": None}}, lora, mesh=mesh)
    with pytest.raises(ValueError, match=r"cannot be split over 'r' \(3 devices\) along an axis of size 2"):
        jaxlora.shardings(jax.tree.map(lambda _: None, params), lora, mesh=AbstractMesh((3,), ("r",)), rank_axis="r")
    with pytest.raises(TypeError, match="lora must be the dict"):
        jaxlora.shardings(params, [lora["a"]])
    with pytest.raises(ValueError, match=r"'x': expected LoraFactors, got int"):
        jaxlora.shardings(params, {"x": 3})
    with pytest.raises(ValueError, match="no mesh is known.*pass mesh="):
        jaxlora.init_sharded(
            jax.random.key(0), params, jaxlora.LoraConfig(rank=2), param_shardings=jax.tree.map(lambda _: P(), params)
        )


# --------------------------------------------------------------------------- 8 simulated devices

_PRELUDE = """
import importlib.util, sys
import numpy as np, jax, jax.numpy as jnp, flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxlora
spec = importlib.util.spec_from_file_location("sharded_finetune", "examples/sharded_finetune.py")
ex = importlib.util.module_from_spec(spec); sys.modules["sharded_finetune"] = ex; spec.loader.exec_module(ex)
assert jax.device_count() == 8
cfg = ex.LlamaConfig()
"""


@pytest.mark.slow
def test_mesh_training_matches_one_device_and_keeps_shardings():
    """FSDP-only, tensor-parallel-only and mixed meshes train like one device; A/B stay sharded."""
    code = (
        _PRELUDE
        + """
EXPECTED = __EXPECTED__
B, T, STEPS = 8, 16, 3
def check(lora, mesh, when):
    for p, f in lora.items():
        roles, a_spec, b_spec = EXPECTED[p]
        for side, want in (("a", a_spec), ("b", b_spec)):
            got = getattr(f, side).sharding
            assert got == NamedSharding(mesh, P(*want)), (when, p, side, got, want)

def train(mesh, params=None):
    s = ex.setup(cfg, mesh, batch=B, seq=T, rank=4, lr=1e-2, params=params)
    check(s.lora, mesh, "init")
    # the adapter tree holds A and B only: bytes = sum of the factor sizes, computed from W's shape
    flat = jax.tree_util.tree_flatten_with_path(s.params)[0]
    flat = {"/".join(str(getattr(k, "key", k)) for k in kp): w for kp, w in flat}
    want_bytes, want_local = 0, 0
    for p, f in s.lora.items():
        w = flat.get("params/" + p + "/kernel", flat.get("params/" + p))
        roles = EXPECTED[p][0]
        pick = lambda c: [d for d, r in zip(w.shape, roles) if r == c]
        a_shape, b_shape = pick("s") + pick("i") + [4], pick("s") + [4] + pick("o")
        for shape, spec in ((a_shape, EXPECTED[p][1]), (b_shape, EXPECTED[p][2])):
            want_bytes += 4 * int(np.prod(shape))
            split = [np.prod([mesh.shape[n] for n in ((e,) if isinstance(e, str) else e or ())]) for e in spec]
            want_local += 4 * int(np.prod([d // k for d, k in zip(shape, split)]))
    leaves = jax.tree.leaves(s.lora)
    assert len(leaves) == 2 * len(s.lora) == 2 * 7
    assert sum(x.nbytes for x in leaves) == want_bytes, (sum(x.nbytes for x in leaves), want_bytes)
    dev0 = mesh.devices.flat[0]
    local = sum(sh.data.nbytes for x in leaves for sh in x.addressable_shards if sh.device == dev0)
    assert local == want_local, (local, want_local)
    init = jax.device_get(s.lora)
    data = ex.batches(cfg, s.batch_sharding, B, T)
    lora, opt, losses = s.lora, s.opt_state, []
    with jax.set_mesh(mesh), nn.logical_axis_rules(ex.RULES):
        for _ in range(STEPS):
            lora, opt, loss = s.step(lora, opt, s.params, next(data))
            losses.append(float(loss))
    check(lora, mesh, "step")
    host = jax.device_get(lora)
    back = jax.device_put(host, s.lora_shardings)
    check(back, mesh, "device_put")
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(host)):
        np.testing.assert_array_equal(np.asarray(x), y)
    return np.array(losses), host, init, want_bytes, local, jax.device_get(s.params)

devs = jax.devices()
ref_losses, ref_lora, ref_init, total, _, host_params = train(ex.make_mesh((1, 1, 1), devs[:1]))
assert ref_losses[-1] < ref_losses[0], ref_losses
for name, mesh in [("fsdp", ex.make_mesh((1, 8, 1))), ("tensor", ex.make_mesh((1, 1, 2), devs[:2])),
                   ("mixed", ex.make_mesh((2, 2, 2)))]:
    losses, lora, init, nbytes, local, _ = train(mesh, host_params)
    assert nbytes == total and local < total, (name, nbytes, local, total)
    for x, y in zip(jax.tree.leaves(init), jax.tree.leaves(ref_init)):
        # born sharded, the same values as on one device (to an ulp or two: another compiled program)
        np.testing.assert_allclose(x, y, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(y).max())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
    for (kp, x), y in zip(jax.tree_util.tree_flatten_with_path(lora)[0], jax.tree.leaves(ref_lora)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5, err_msg=name + jax.tree_util.keystr(kp))
    print(name, "ok", losses, local, total)

"""
    ).replace("__EXPECTED__", repr({p: (r, tuple(a), tuple(b)) for p, (r, a, b) in EXPECTED.items() if "/" in p}))
    out = run_with_devices(code)
    assert "mixed ok" in out


_GATHERS = r"""
import re
from collections import Counter
AG = re.compile(r"=\s*\w+\[([\d,]*)\][^=\n]*?\ball-gather(?:-start)?\(")
def gathers(hlo):
    # the result shapes of every all-gather in compiled HLO text
    return Counter(tuple(int(d) for d in m.group(1).split(",") if d) for m in AG.finditer(hlo))
def excess(lora_hlo, base_hlo, limit):
    # all-gathers the LoRA program does beyond the base program's, bigger than `limit` elements
    extra = gathers(lora_hlo) - gathers(base_hlo)
    return {s: n for s, n in extra.items() if int(np.prod(s)) > limit}
"""


@pytest.mark.slow
def test_communication_merge_and_explicit_sharding():
    """The LoRA step gathers no frozen weight the base step does not; merge keeps shardings and gathers
    no weight; explicit-sharding (out_sharding / reshard) and shard_map programs are rewritten."""
    code = (
        _PRELUDE
        + _GATHERS
        + """
sys.path.insert(0, "tests"); from helpers import delta_reference
mesh = ex.make_mesh((1, 4, 2))
s = ex.setup(cfg, mesh, batch=8, seq=16, rank=2)
batch = next(ex.batches(cfg, s.batch_sharding, 8, 16))
largest_factor = max(int(np.prod(x.shape)) for x in jax.tree.leaves(s.lora))
smallest_weight = min(int(np.prod(s.params["params"]["layers"][m][n]["kernel"].shape[1:]))
                      for m, ns in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for n in ns)
assert largest_factor * 2 <= smallest_weight, (largest_factor, smallest_weight)
with jax.set_mesh(mesh), nn.logical_axis_rules(ex.RULES):
    lora_hlo = s.step.lower(s.lora, s.opt_state, s.params, batch).compile().as_text()
    base_hlo = s.base_step.lower(s.params, batch).compile().as_text()
    assert sum(gathers(base_hlo).values()) > 0   # FSDP: the base step does gather its weights
    assert excess(lora_hlo, base_hlo, largest_factor) == {}, excess(lora_hlo, base_hlo, largest_factor)
    # the check can fail: a LoRA step that replicates the frozen weights first is caught
    rep = NamedSharding(mesh, P())
    def gathering_loss(lora, params, batch):
        params = jax.tree.map(lambda w: jax.lax.with_sharding_constraint(w, rep), params)
        return ex.cross_entropy(jaxlora.apply(s.model.apply, params, lora, batch["inputs"]), batch["targets"])
    bad = jax.jit(jax.grad(gathering_loss)).lower(s.lora, s.params, batch).compile().as_text()
    assert excess(bad, base_hlo, largest_factor), "the gather check did not see replicated weights"
    print("hlo ok", sorted(gathers(lora_hlo).items()))

# merge on the mesh: output shardings equal the input's, no weight gathered, values right
lora = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), s.lora)  # B != 0
merge = jax.jit(jaxlora.merge)
merged = merge(s.params, lora)
for (kp, w), m in zip(jax.tree_util.tree_flatten_with_path(s.params)[0], jax.tree.leaves(merged)):
    # the same layout (a spec may come back without trailing Nones: P(x, y) is P(x, y, None))
    assert m.sharding.is_equivalent_to(w.sharding, w.ndim), (jax.tree_util.keystr(kp), m.sharding, w.sharding)
eager = jaxlora.merge(s.params, lora)
for w, m in zip(jax.tree.leaves(s.params), jax.tree.leaves(eager)):
    assert m.sharding.is_equivalent_to(w.sharding, w.ndim), (m.sharding, w.sharding)
merge_hlo = merge.lower(s.params, lora).compile().as_text()
big = {sh: n for sh, n in gathers(merge_hlo).items() if int(np.prod(sh)) > largest_factor}
assert big == {}, big
f = jax.device_get(lora["layers/attn/o"])
w = np.asarray(s.params["params"]["layers"]["attn"]["o"]["kernel"])
got = np.asarray(merged["params"]["layers"]["attn"]["o"]["kernel"])
np.testing.assert_allclose(got, w + delta_reference(f.a, f.b, f.roles, f.scale), rtol=1e-5, atol=1e-6)
print("merge ok")

# sharding in types (explicit axes): dot_general out_sharding and reshard on tagged weights
from jax.sharding import AxisType, reshard
emesh = jax.make_mesh((2, 4), ("data", "tensor"), (AxisType.Explicit,) * 2)
with jax.set_mesh(emesh):
    params = {"w1": jax.device_put(jnp.linspace(-1, 1, 16 * 32).reshape(16, 32), P(None, "tensor")),
              "w2": jax.device_put(jnp.linspace(-1, 1, 32 * 16).reshape(32, 16), P("tensor", None))}
    x = jax.device_put(jnp.linspace(0, 1, 8 * 16).reshape(8, 16), P("data", None))
    def f(p, x):  # contracting a sharded axis: needs out_sharding
        return jnp.dot(jnp.tanh(x @ p["w1"]), p["w2"], out_sharding=P("data", None))
    def g(p, x):
        return jnp.tanh(x @ reshard(p["w1"], P(None, None))) @ reshard(p["w2"], P(None, None))
    lora = jaxlora.init_sharded(jax.random.key(0), params, jaxlora.LoraConfig(rank=4))
    lora = jax.tree.map(lambda v: v + 0.05, lora)
    for fn in (f, g):
        y = jax.jit(lambda l: jaxlora.apply(fn, params, l, x))(lora)
        np.testing.assert_allclose(y, fn(jaxlora.merge(params, lora), x), rtol=1e-5, atol=1e-5)
        grads = jax.jit(jax.grad(lambda l: jaxlora.apply(fn, params, l, x).sum()))(lora)
        ref = jax.grad(lambda l: fn(jaxlora.merge(params, l), x).sum())(lora)
        for u, v in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
print("explicit ok")

# shard_map with a tagged weight: the factors enter split like W
amesh = jax.make_mesh((8,), ("x",), (AxisType.Auto,))
w = jax.device_put(jnp.linspace(0, 1, 16 * 32).reshape(16, 32), NamedSharding(amesh, P(None, "x")))
xx = jnp.linspace(0, 1, 64).reshape(4, 16)
h = lambda p, x: jax.shard_map(lambda w, x: jnp.sin(x @ w), mesh=amesh, in_specs=(P(None, "x"), P()),
                               out_specs=P(None, "x"))(p["w"], x)
lora = jaxlora.init(jax.random.key(1), {"w": w}, jaxlora.LoraConfig(rank=4), fn=h, args=(xx,))
lora = jax.tree.map(lambda v: v + 0.1, lora)
y = jax.jit(lambda l: jaxlora.apply(h, {"w": w}, l, xx))(lora)
np.testing.assert_allclose(y, h(jaxlora.merge({"w": w}, lora), xx), rtol=1e-5, atol=1e-5)
eager = jaxlora.apply(h, {"w": w}, lora, xx)  # eagerly too (eager shard_map cannot run a custom_vjp)
np.testing.assert_allclose(eager, y, rtol=1e-6, atol=1e-6)
grads = jax.jit(jax.grad(lambda l: jaxlora.apply(h, {"w": w}, l, xx).sum()))(lora)
ref = jax.grad(lambda l: h(jaxlora.merge({"w": w}, l), xx).sum())(lora)
for u, v in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
print("shard_map ok")
"""
    )
    out = run_with_devices(code)
    assert "hlo ok" in out and "merge ok" in out and "explicit ok" in out and "shard_map ok" in out


def _two_processes(code: str, *args: str) -> list[str]:
    """Run ``code`` as two processes of 4 CPU devices each (gloo collectives, a local coordinator);
    their stdouts. ``sys.argv[1:]`` holds the example's multihost flags, then ``args``."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip(),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    flags = ["--multihost", "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *flags, str(i), *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err[-3000:]
    return [out for out, _ in outs]


@pytest.mark.slow
def test_example_multihost_two_processes_checkpoint_and_resume(tmp_path):
    """The example script with ``--multihost``: two processes of 4 CPU devices each on a (data=2,
    fsdp=2, tensor=2) mesh; each host feeds only its own rows, and both report the same losses.
    Run A trains 6 steps, checkpointing steps 3 and 6 from both hosts into one Orbax CheckpointManager
    (asynchronously, while the next steps donate the arrays); with step 6 deleted, as if A had been
    killed after step 3's checkpoint, run C resumes and trains steps 4..6, whose losses are A's: the
    LoRA tree, the optimizer state and the step come back onto the mesh."""
    import json

    code = (
        _PRELUDE.replace("assert jax.device_count() == 8\n", "")
        + """
B, T = 8, 16
result = ex.train(sys.argv[1:] + ["--batch", str(B), "--seq", str(T), "--no-progress"])
assert jax.process_count() == 2 and result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}, result["mesh"]
# every host fed only its own rows: the assembled global batch is the one-process batch
# (the mesh-vs-one-device equality of the step itself is the training test's mixed mesh)
from jax.experimental import multihost_utils
mesh = ex.make_mesh((2, 2, 2))
sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
got = multihost_utils.process_allgather(next(ex.batches(cfg, sharding, B, T, start=4))["inputs"], tiled=True)
rng = np.random.default_rng([0, 4])
start, stride = rng.integers(0, cfg.vocab, (B, 1)), rng.integers(1, 4, (B, 1))
np.testing.assert_array_equal(got, (start + stride * np.arange(T)) % cfg.vocab)
assert np.isfinite(result["losses"]).all(), result["losses"]
import json
print("multihost ok", jax.process_index(), json.dumps([result["first_step"], result["losses"]]))
"""
    )

    def run(*args):
        outs = _two_processes(code, *args)
        reports = [out.split(f"multihost ok {i} ")[1] for i, out in enumerate(outs)]
        assert reports[0] == reports[1], reports  # both hosts saw the same losses
        return json.loads(reports[0]), outs[0]

    ckpt = str(tmp_path / "run")
    (first, a), _ = run("--steps", "6", "--save-every", "3", "--checkpoint-dir", ckpt)
    assert first == 1 and len(a) == 6 and a[-1] < a[0], a
    assert sorted(n for n in os.listdir(ckpt) if n.isdigit()) == ["3", "6"], os.listdir(ckpt)
    shutil.rmtree(os.path.join(ckpt, "6"))  # as if the run had been killed after step 3's checkpoint
    (first, c), out = run("--steps", "6", "--checkpoint-dir", ckpt, "--resume")
    assert f"resumed from step 3 in {ckpt}" in out and first == 4 and len(c) == 3, out
    # The same executable on the same devices with bit-identical inputs (Orbax stores the arrays'
    # bytes): equal in practice, though XLA does not promise it across processes; a few ulps allowed.
    np.testing.assert_allclose(c, a[3:], rtol=1e-6, atol=0)


def test_gradient_on_a_mesh_of_explicit_axes_has_each_inputs_sharded_type():
    """Sharding in types: the op's custom VJP returns each cotangent with its primal's sharded type, the
    input's too where its value was not kept (the second layer's input, which a gradient reaches)."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, PartitionSpec as P, reshard
import jaxlora
mesh = jax.make_mesh((2, 4), ("data", "tensor"), (AxisType.Explicit,) * 2)
with jax.set_mesh(mesh):
    params = {"w1": jax.device_put(jnp.linspace(-1, 1, 16 * 32).reshape(16, 32), P(None, "tensor")),
              "w2": jax.device_put(jnp.linspace(-1, 1, 32 * 16).reshape(32, 16), P("tensor", None))}
    x = jax.device_put(jnp.linspace(0, 1, 8 * 16).reshape(8, 16), P("data", None))
    def fn(p, x):  # the hidden activations (8, 32) are typed P("data", "tensor")
        return jnp.dot(jnp.tanh(x @ p["w1"]), reshard(p["w2"], P(None, None)))
    lora = jaxlora.init_sharded(jax.random.key(0), params, jaxlora.LoraConfig(rank=4))
    lora = jax.tree.map(lambda v: v + 0.05, lora)
    grads = jax.jit(jax.grad(lambda l: jaxlora.apply(fn, params, l, x).sum()))(lora)
    want = jax.grad(lambda l: fn(jaxlora.merge(params, l), x).sum())(lora)
for u, v in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
print("grads ok")
"""
    assert "grads ok" in run_with_devices(code)
