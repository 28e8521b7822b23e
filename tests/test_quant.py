"""Quantized bases (QLoRA): the NF4 table and layout, error bounds, apply on every layer kind and
front-end, gradients, bytes a parameter, Orbax, sharding, merge and errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import run_with_devices
from hypothesis import given, settings
from hypothesis import strategies as st
from linen_models import MODELS

import jaxlora
from jaxlora import _quantized

NF4_PUBLISHED = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]  # fmt: skip


def test_nf4_table_is_bitsandbytes_normal_map():
    from scipy.stats import norm

    # bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True), rebuilt from the paper
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    values /= values.max()
    np.testing.assert_allclose(_quantized.NF4, values, atol=2e-7)
    np.testing.assert_allclose(_quantized.NF4, NF4_PUBLISHED, atol=5e-5)


def _nf4_reference(w, block=64):
    """Codes and per-block absmax with NumPy (nearest code, ties to the lower one)."""
    x = np.asarray(w, np.float64).reshape(-1, block)
    absmax = np.abs(x).max(-1)
    idx = np.abs(x[..., None] / absmax[:, None, None] - _quantized.NF4.astype(np.float64)).argmin(-1)
    return idx.reshape(-1), absmax


def test_nf4_layout_matches_numpy_reference():
    w = jax.random.normal(jax.random.key(0), (128, 64))
    q = jaxlora.quantize({"kernel": w}, "nf4", double_quant=False)["kernel"]
    idx, absmax = _nf4_reference(w)
    codes = np.asarray(q.codes)
    np.testing.assert_array_equal(codes >> 4, idx[0::2])  # first element in the high nibble
    np.testing.assert_array_equal(codes & 15, idx[1::2])
    np.testing.assert_allclose(np.asarray(q.scale), absmax, rtol=1e-6)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (128 * 64 // 2,)


TINY = float(np.finfo(np.float32).tiny)
FLOOR = 128 * TINY  # below this, magnitudes (and nested steps, int8 scales) code as 0
HALF_GAP = float(np.diff(_quantized.NF4.astype(np.float64)).max() / 2)  # 0.1519: between -1 and -0.696


_dequantize = jax.jit(jaxlora.dequantize)  # one compiled program a shape, not one dispatch an op


def _recovered_absmax(q):
    """Each block's absmax as decoded from the stored leaves, in float64: ``(layers, blocks)``."""
    layers = max(1, math.prod(q.outer))
    nb = math.prod(q.inner) // q.block_size
    if not q.double_quant:
        return np.asarray(q.scale, np.float64).reshape(layers, nb)
    codes = np.asarray(q.scale, np.float64).reshape(layers, -1, 256)
    steps = np.asarray(q.scale_scale, np.float64).reshape(layers, -1, 1)
    mean = np.asarray(q.scale_mean, np.float64).reshape(layers, 1)
    return (codes * steps).reshape(layers, -1)[:, :nb] + mean


def _check_nf4_bound(w, q):
    """The derived bound. Per block: a = the true absmax, r = the recovered one, s = the nested step
    (max |a - mean| / 127 over its group of 256 blocks). Then r > 0 when a > 0 and a <= r <= a + s
    (coded rounding up; only where a + s would pass float32's maximum is r rounded down, to >= a - s),
    and each element is off by at most half the largest NF4 gap times r (plus r - a where r < a, plus
    the rounding of W's dtype, plus FLOOR)."""
    dtype = np.dtype(q.dtype)
    x = np.asarray(w, np.float64)
    x = np.where(np.abs(x) < TINY, 0.0, x).reshape(max(1, math.prod(q.outer)), -1, q.block_size)
    a = np.abs(x).max(-1)
    r = _recovered_absmax(q)
    assert (r[a > 0] > 0).all(), "a block's recovered absmax is not positive: its values flip sign"
    s = 0.0
    if q.double_quant:
        nb = a.shape[1]
        centred = np.pad(a - a.mean(-1, keepdims=True), [(0, 0), (0, -nb % 256)]).reshape(len(a), -1, 256)
        s = np.repeat(np.abs(centred).max(-1) / 127, 256, axis=-1)[:, :nb] * (1 + 1e-5) + FLOOR
    top = float(np.finfo(np.float32).max)
    low = np.where(a + s > top, a - s, a * (1 - 1e-6))
    assert (r >= low).all() and (r <= a + s + 1e-6 * a).all()
    eps = float(jnp.finfo(dtype).eps) / 2 + 1e-6  # W's dtype rounds the dequantized value
    bound = (HALF_GAP + eps) * r + np.maximum(0, a - r) + FLOOR
    back = np.asarray(_dequantize(q), np.float64).reshape(x.shape)
    assert np.isfinite(back).all()
    err = np.abs(back - x)
    assert (err <= bound[..., None]).all(), float((err / bound[..., None]).max())
    return err, a


def _weights(rng, dist, shape):
    if dist == "normal":
        return rng.normal(size=shape)
    if dist == "student_t":  # heavy tails: df 1.5, a few blocks far above the rest
        return rng.standard_t(1.5, size=shape)
    w = rng.normal(size=shape)  # "outlier_row": one input row of W (Flax's (in, out)) 1000x the rest
    w[..., rng.integers(shape[-2]), :] *= 1000
    return w


@pytest.mark.slow
@settings(deadline=None, max_examples=10, derandomize=True)
@given(
    dist=st.sampled_from(["normal", "student_t", "outlier_row"]),
    shape=st.sampled_from([(64, 64), (130, 64), (16, 256), (2, 32, 128)]),
    block=st.sampled_from([2, 16, 64]),
    double_quant=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_nf4_round_trip_within_derived_bound(dist, shape, block, double_quant, dtype, seed):
    w = jnp.asarray(_weights(np.random.default_rng(seed), dist, shape), dtype)
    q = jaxlora.quantize({"kernel": w}, "nf4", block_size=block, double_quant=double_quant)["kernel"]
    err, a = _check_nf4_bound(w, q)
    if dist == "normal" and block == 64:  # and a useful codec, not just a bounded one
        assert err.mean() < 0.1 * np.abs(np.asarray(w, np.float64)).mean()


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_double_quant_never_flips_a_block(double_quant):
    """One outlier row sets a nested step far above the typical absmax: rounding to nearest made
    some recovered absmax negative (the block sign-flipped and ~4000x too large); coded rounding up,
    every block keeps its sign and stays within the bound."""
    w = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)  # 256 blocks: one nested group
    w[0] *= 1000
    w[1] *= 1e-3
    q = jaxlora.quantize({"kernel": jnp.asarray(w)}, "nf4", double_quant=double_quant)["kernel"]
    err, a = _check_nf4_bound(w, q)
    back = np.asarray(jaxlora.dequantize(q))
    assert (np.sign(back) * np.sign(w) >= 0).all()
    step = np.abs(a - a.mean()).max() / 127 if double_quant else 0.0  # the nested step of the one group
    assert (err.max(-1) <= (HALF_GAP + 1e-6) * (a + step * (1 + 1e-5))).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_extreme_weights_round_trip_within_the_bound(dtype):
    """Layer 0 up to the dtype's largest value (no overflow in absmax, mean, scales or their
    products), layer 1 down to float32's smallest normal (no division turned 0/0)."""
    info = jnp.finfo(dtype)
    rng = np.random.default_rng(1)
    w = rng.uniform(-1, 1, size=(2, 64, 256))
    w[0] *= float(info.max)
    w[0, 0, :64] = float(info.max)  # a block at exactly the largest value
    w[1] *= float(info.tiny) * 2.0 ** rng.integers(0, 24, size=(64, 1))  # spread over the smallest normals
    w = jnp.asarray(w, dtype)
    for double_quant in (True, False):
        _check_nf4_bound(w, jaxlora.quantize({"kernel": w}, "nf4", double_quant=double_quant)["kernel"])
    back = np.asarray(_dequantize(jaxlora.quantize({"kernel": w}, "int8")["kernel"]), np.float64)
    x = np.asarray(w, np.float64)
    m = np.abs(x).max(axis=1, keepdims=True)
    eps = float(info.eps) / 2 + 1e-6
    assert np.isfinite(back).all()
    assert (np.abs(back - x) <= m / 127 / 2 + eps * m + FLOOR).all()


@pytest.mark.parametrize("dist", ["normal", "heavy_tailed"])
def test_int8_round_trip_within_half_a_step(dist):
    key = jax.random.key(2)
    w = jax.random.normal(key, (3, 64, 32)) if dist == "normal" else jax.random.t(key, 2.0, (3, 64, 32))
    q = jaxlora.quantize({"kernel": w}, "int8")["kernel"]
    assert q.codes.dtype == jnp.int8 and q.scale.shape == (3, 1, 32)
    step = np.abs(np.asarray(w)).max(axis=1, keepdims=True) / 127  # per layer and output channel
    err = np.abs(np.asarray(jaxlora.dequantize(q)) - np.asarray(w))
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()


def test_bits_per_parameter_counted_from_leaves():
    params = {"a": {"kernel": jnp.ones((4096, 1024), jnp.bfloat16)}, "b": {"kernel": jnp.ones((8, 512, 2048))}}
    q = jaxlora.quantize(params, "nf4")
    bits = jaxlora.bits_per_parameter(q)
    leaf_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(q))
    n = sum(math.prod(v["kernel"].shape) for v in params.values())
    assert bits == pytest.approx(8 * leaf_bytes / n)
    assert bits == pytest.approx(4.127, rel=0.01)
    assert jaxlora.bits_per_parameter(jaxlora.quantize(params, "nf4", double_quant=False)) == pytest.approx(4.5)
    # summary reports bytes a parameter; bf16 would be 2
    lora = jaxlora.init(jax.random.key(0), q, jaxlora.LoraConfig(rank=2, targets="a"))
    s = jaxlora.summary(q, lora)
    assert s.bytes_per_parameter == pytest.approx(bits / 8, rel=0.01) and "bytes a parameter" in str(s)


def _quantize_targets(params, path, fmt):
    return jaxlora.quantize(params, fmt, block_size=2, targets=path)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_apply_equals_apply_on_dequantized(kind, fmt):
    model, make_x, target = MODELS[kind]
    x = make_x()
    params = model.init(jax.random.key(0), x)
    if fmt == "int8" and kind.startswith("embed"):
        pytest.skip("int8 scales run along the last axis: fine for tables too, covered by nf4 here")
    q = _quantize_targets(params, target, fmt)
    assert any(isinstance(v, jaxlora.Quantized) for v in jax.tree_util.tree_leaves(q, is_leaf=_quantized.is_quantized))
    lora = jaxlora.init(jax.random.key(1), q, jaxlora.LoraConfig(rank=2, targets=target), fn=model.apply, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.3, lora)
    f = jax.jit(lambda q, lora, x: jaxlora.apply(model.apply, q, lora, x))
    want = jaxlora.apply(model.apply, jaxlora.dequantize(q), lora, x)
    np.testing.assert_allclose(f(q, lora, x), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    base = jaxlora.apply(model.apply, q, {}, x)  # no adapter, eagerly
    np.testing.assert_allclose(base, model.apply(jaxlora.dequantize(q), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype, casts",
    [(jnp.float32, (jnp.bfloat16, jnp.float32)), (jnp.bfloat16, (jnp.float32,)), (jnp.float32, (jnp.float16,))],
)
def test_casts_of_a_quantized_weight_round_as_the_model_writes_them(dtype, casts):
    w = (jax.random.normal(jax.random.key(0), (64, 32)) * 3).astype(dtype)
    x = jax.random.normal(jax.random.key(1), (4, 64))

    def fn(p, x):
        k = p["dense"]["kernel"]
        for c in casts:  # bfloat16 then float32 again: the rounding to bfloat16 was skipped
            k = k.astype(c)
        return x.astype(k.dtype) @ k

    q = jaxlora.quantize({"dense": {"kernel": w}}, "nf4")
    deq = jaxlora.dequantize(q)
    lora = jaxlora.init(jax.random.key(2), q, jaxlora.LoraConfig(rank=2), fn=fn, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.3, lora)
    for adapter in ({}, lora):  # the untargeted weight and the targeted one
        want = jaxlora.apply(fn, deq, adapter, x)
        np.testing.assert_array_equal(jax.jit(lambda q, a: jaxlora.apply(fn, q, a, x))(q, adapter), want)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(128, name="up", dtype=jnp.bfloat16)(x)
        return x + nn.Dense(64, name="down", dtype=jnp.bfloat16)(nn.gelu(h)), None


class _ScanRemat(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(nn.remat(_Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return nn.Dense(8, name="head")(stack(name="layers")(x, None)[0])


def _scan_model():
    model, x = _ScanRemat(), jax.random.normal(jax.random.key(3), (4, 16, 64))
    params = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), model.init(jax.random.key(0), x))
    return model, params, x


def test_scan_remat_bf16_dequantizes_inside_the_body_and_grads_only_factors():
    model, params, x = _scan_model()
    q = jaxlora.quantize(params, "nf4")
    assert isinstance(q["params"]["layers"]["up"]["kernel"], jaxlora.Quantized)
    assert not isinstance(q["params"]["head"]["kernel"], jaxlora.Quantized)  # the output head stays bf16
    config = jaxlora.LoraConfig(rank=4, targets=("up", "down"))
    lora = jaxlora.init(jax.random.key(1), q, config, fn=model.apply, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.05, lora)
    loss = lambda p, lora: jnp.mean(jaxlora.apply(model.apply, p, lora, x).astype(jnp.float32) ** 2)  # noqa: E731
    got, g = jax.jit(jax.value_and_grad(loss, argnums=1))(q, lora)
    want, g_want = jax.jit(jax.value_and_grad(loss, argnums=1))(jaxlora.dequantize(q), lora)
    np.testing.assert_allclose(got, want, rtol=2e-2)
    for path in lora:
        np.testing.assert_allclose(
            g[path].b, g_want[path].b, rtol=0.1, atol=0.02 * float(jnp.abs(g_want[path].b).max())
        )
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=1))(q, lora)
    text = str(jaxpr)
    w_shaped = ["f32[3,64,128]", "bf16[3,64,128]", "f32[3,128,64]", "bf16[3,128,64]"]
    assert not any(s in text for s in w_shaped), "a whole stacked float weight (or its gradient) was formed"


def test_nnx_and_plain_jax_front_ends():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(64, 128, rngs=rngs), nnx.Linear(128, 8, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.relu(self.fc1(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    x = jax.random.normal(jax.random.key(1), (4, 64))
    q = jaxlora.quantize(state, "nf4")
    fn = jaxlora.nnx.call(graphdef)
    lora = jaxlora.init(jax.random.key(2), q, jaxlora.LoraConfig(rank=2, targets="fc1"), fn=fn, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.1, lora)
    np.testing.assert_allclose(jaxlora.apply(fn, q, lora, x), jaxlora.apply(fn, jaxlora.dequantize(q), lora, x),
                               rtol=1e-5, atol=1e-5)  # fmt: skip

    def mlp(p, x):  # plain JAX, weights used through a transpose
        return jnp.tanh(x @ p["w1"]["weight"].T) @ p["w2"]["kernel"]

    p = {"w1": {"weight": jax.random.normal(jax.random.key(3), (128, 64))}, "w2": {"kernel": jnp.ones((128, 8))}}
    qp = jaxlora.quantize(p, "int8")
    lora = jaxlora.init(jax.random.key(4), qp, jaxlora.LoraConfig(rank=2, targets="w1"), fn=mlp, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.1, lora)
    np.testing.assert_allclose(jaxlora.apply(mlp, qp, lora, x), jaxlora.apply(mlp, jaxlora.dequantize(qp), lora, x),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_training_step_with_optax_and_merge():
    model, params, x = _scan_model()
    q = jaxlora.quantize(params, "nf4")
    config = jaxlora.LoraConfig(rank=4, targets=("up", "down"))
    lora = jaxlora.init(jax.random.key(1), q, config, fn=model.apply, args=(x,))
    opt = optax.adam(1e-2)
    state = opt.init(lora)

    @jax.jit
    def step(lora, state):
        loss = lambda lora: jnp.mean(jaxlora.apply(model.apply, q, lora, x).astype(jnp.float32) ** 2)  # noqa: E731
        value, g = jax.value_and_grad(loss)(lora)
        updates, state = opt.update(g, state)
        return optax.apply_updates(lora, updates), state, value

    losses = []
    for _ in range(5):
        lora, state, value = step(lora, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    merged = jaxlora.merge(q, lora, dtype=jnp.bfloat16)
    assert not any(
        isinstance(v, jaxlora.Quantized) for v in jax.tree_util.tree_leaves(merged, is_leaf=_quantized.is_quantized)
    )
    want = jaxlora.apply(model.apply, q, lora, x).astype(jnp.float32)
    np.testing.assert_allclose(model.apply(merged, x).astype(jnp.float32), want, atol=0.05 * float(jnp.abs(want).max()))
    requant, report = jaxlora.merge(q, lora, quantize=True)
    assert isinstance(requant["params"]["layers"]["up"]["kernel"], jaxlora.Quantized)
    assert set(report) == set(lora) and all(0 < float(r["error"]) < 0.2 for r in report.values())


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_merge_requantizes_in_the_layout_quantize_chose(fmt):
    """A 3-D weight that is not a stack (DenseGeneral's (in, heads, head_dim), which quantize(fn=) codes
    as one block run, outer axes ()) comes back from merge(quantize=True) in that layout, not re-read as
    a stack of `in` layers (other codes and scale shapes, 256-block absmax groups per row). The values:
    exactly encode's of the merged weight in the original layout (the same function on the same input)."""

    class Heads(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral((4, 32), name="q")(x)

    model, x = Heads(), jnp.ones((1, 64))
    params = model.init(jax.random.key(0), x)
    q = jaxlora.quantize(params, fmt, fn=model.apply, args=(x,))
    before = q["params"]["q"]["kernel"]
    assert before.outer == ()  # the trace saw no stacked axis
    lora = jaxlora.init(jax.random.key(1), q, jaxlora.LoraConfig(rank=2), fn=model.apply, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.05, lora)
    requant, _ = jaxlora.merge(q, lora, quantize=True)
    after = requant["params"]["q"]["kernel"]
    assert after.outer == before.outer
    assert [v.shape for v in jax.tree_util.tree_leaves(after)] == [v.shape for v in jax.tree_util.tree_leaves(before)]
    merged = jaxlora.merge(q, lora, dtype=jnp.float32)["params"]["q"]["kernel"]
    want = _quantized.encode(merged, fmt, stacked=0)
    for got, ref in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(got, ref)


def test_orbax_round_trip_and_fingerprint(tmp_path):
    _, params, x = _scan_model()
    q = jaxlora.quantize(params, "nf4")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "base", q)
    with ocp.StandardCheckpointer() as ckpt:
        back = ckpt.restore(tmp_path / "base", jax.eval_shape(lambda: q))
    a, b = (jax.tree_util.tree_leaves(t) for t in (q, back))
    assert len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))
    assert isinstance(back["params"]["layers"]["up"]["kernel"], jaxlora.Quantized)
    model = _ScanRemat()
    config = jaxlora.LoraConfig(rank=2, targets="up")
    lora = jaxlora.init(jax.random.key(0), q, config, fn=model.apply, args=(x,))
    fp = jaxlora.checkpoint.fingerprint(q, lora)
    assert fp["layers/up"]["quantized"] == {"format": "nf4", "block_size": 64, "double_quant": True}
    jaxlora.checkpoint.save(tmp_path / "adapter", lora, config=config, params=q)
    assert jaxlora.checkpoint.info(tmp_path / "adapter").base["layers/up"]["quantized"]["format"] == "nf4"


def test_sharded_quantized_params_give_the_single_device_loss():
    out = run_with_devices(
        """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxlora
w = {"l": {"kernel": jax.random.normal(jax.random.key(0), (2, 256, 512))}, "o": {"kernel": jnp.ones((512, 8))}}
def fn(p, x):
    h = jax.lax.scan(lambda h, k: (jnp.tanh(h @ k[:, :256]), None), x, p["l"]["kernel"])[0]
    return h @ p["o"]["kernel"][:256]
x = jax.random.normal(jax.random.key(1), (8, 256))
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
specs = {"l": {"kernel": NamedSharding(mesh, P(None, "model"))}, "o": {"kernel": NamedSharding(mesh, P("model"))}}
for fmt in ("nf4", "int8"):
    q = jaxlora.quantize(w, fmt)
    lora = jaxlora.init(jax.random.key(2), q, jaxlora.LoraConfig(rank=2, targets="l"), fn=fn, args=(x,))
    lora = jax.tree_util.tree_map(lambda v: v + 0.1, lora)
    loss = lambda q, lora, x: jnp.mean(jaxlora.apply(fn, q, lora, x) ** 2)
    one = jax.jit(loss)(q, lora, x)
    qs = jaxlora.quantized_shardings(q, specs)
    want = P(None, "model") if fmt == "nf4" else P(None, "model", None)  # flat blocks / int8 codes like W
    assert qs["l"]["kernel"].codes.spec == want, qs["l"]["kernel"].codes.spec
    q8 = jax.device_put(q, qs)
    assert len(q8["l"]["kernel"].codes.sharding.device_set) == 8
    x8 = jax.device_put(x, NamedSharding(mesh, P("data")))
    many = jax.jit(loss)(q8, lora, x8)
    np.testing.assert_allclose(many, one, rtol=1e-5)
    print(fmt, "ok")
"""
    )
    assert "nf4 ok" in out and "int8 ok" in out


def test_errors_are_clear():
    w = {"kernel": jnp.ones((3, 10))}
    with pytest.raises(
        ValueError, match=r"'kernel': a slice must hold a multiple of block_size=64 elements \(30 elements a"
    ):
        jaxlora.quantize(w, "nf4")
    with pytest.raises(ValueError, match=r"\(32 elements a slice here: one layer of the stack, shape \(2, 4, 8\)\)"):
        jaxlora.quantize({"up": {"kernel": jnp.ones((2, 4, 8))}}, "nf4")
    with pytest.raises(ValueError, match="Unknown quantization format 'nf5'"):
        jaxlora.quantize(w, "nf5")
    with pytest.raises(ValueError, match="not floating"):
        jaxlora.quantize({"kernel": jnp.ones((8, 64), jnp.int32)}, "nf4", targets="kernel")
    q = jaxlora.quantize({"kernel": jnp.ones((8, 64))}, "nf4")
    with pytest.raises(ValueError, match="already quantized"):
        jaxlora.quantize(q, "nf4")
    with pytest.raises(ValueError, match="matches no leaf"):
        jaxlora.quantize({"kernel": jnp.ones((8, 64))}, "nf4", targets="nope")
    with pytest.raises(ValueError, match="positive even integer"):
        jaxlora.quantize(w, "nf4", block_size=3)
    lora = jaxlora.init(jax.random.key(0), {"kernel": jnp.ones((8, 64))}, jaxlora.LoraConfig(rank=2))
    with pytest.raises(ValueError, match="are not quantized"):
        jaxlora.merge({"kernel": jnp.ones((8, 64))}, lora, quantize=True)


def test_quantize_file_one_tensor_at_a_time(tmp_path):
    import safetensors.numpy

    rng = np.random.default_rng(0)
    tensors = {"fc.weight": rng.normal(size=(16, 64)).astype(np.float32), "fc.bias": np.zeros(16, np.float32),
               "lm_head.weight": rng.normal(size=(8, 64)).astype(np.float32)}  # fmt: skip
    safetensors.numpy.save_file(tensors, tmp_path / "m.safetensors")
    out = jaxlora.quantize_file(str(tmp_path / "m.safetensors"), "nf4")
    assert isinstance(out["fc.weight"], jaxlora.Quantized)
    assert not isinstance(out["lm_head.weight"], jaxlora.Quantized) and out["fc.bias"].shape == (16,)
    want = jaxlora.dequantize(jaxlora.quantize({"kernel": tensors["fc.weight"]}, "nf4"))["kernel"]
    np.testing.assert_array_equal(jaxlora.dequantize(out["fc.weight"]), want)


def test_dora_on_a_quantized_base():
    """DoRA on NF4 (QDoRA): m starts at the dequantized W's norms and apply equals apply on the dequantized base."""
    model, params, x = _scan_model()
    q = jaxlora.quantize(params, "nf4")
    config = jaxlora.LoraConfig(rank=4, targets=("up", "down"), dora=True)
    lora = jaxlora.init(jax.random.key(1), q, config, fn=model.apply, args=(x,))
    w = np.asarray(jaxlora.dequantize(q)["params"]["layers"]["up"]["kernel"], np.float32)  # (L, in, out)
    # init takes the norms of the float32 dequantization; dequantize(q) rounds it to bf16 (2^-9 relative)
    np.testing.assert_allclose(lora["layers/up"].m, np.linalg.norm(w, axis=1), rtol=2e-3)
    lora = jax.tree.map(lambda v: v + 0.05, lora)  # B non-zero, m moved off the norms
    want = jaxlora.apply(model.apply, jaxlora.dequantize(q), lora, x).astype(jnp.float32)
    got = jaxlora.apply(model.apply, q, lora, x).astype(jnp.float32)
    np.testing.assert_allclose(got, want, atol=1e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_non_finite_weights_are_refused_before_anything_is_deleted(fmt):
    good = jnp.ones((8, 64))
    params = {
        "a": {"kernel": good.at[0, 3].set(jnp.nan)},
        "b": {"kernel": good.at[1, :2].set(jnp.inf).at[2, 0].set(-jnp.inf)},
        "c": {"kernel": good},
    }
    with pytest.raises(ValueError, match=r"(?s)'a': 1 of 512 values are NaN or inf.*'b': 3 of 512 values"):
        jaxlora.quantize(params, fmt, donate=True)
    assert not any(v["kernel"].is_deleted() for v in params.values())


@pytest.mark.parametrize(("fmt", "double_quant"), [("nf4", False), ("nf4", True), ("int8", False)])
def test_non_finite_weights_under_jit_dequantize_to_nan(fmt, double_quant):
    """Values are not concrete under a trace, so quantize cannot raise: the block (NF4), group of 256
    blocks (NF4 with double quantization) or output channel (int8) holding one decodes to NaN."""
    w = jax.random.normal(jax.random.key(0), (512, 64)).at[300, 5].set(jnp.nan)  # 512 blocks: 2 groups
    run = jax.jit(lambda w: jaxlora.quantize({"kernel": w}, fmt, double_quant=double_quant)["kernel"])
    back = np.isnan(np.asarray(_dequantize(run(w))))
    want = np.zeros(w.shape, bool)
    if fmt == "int8":
        want[:, 5] = True
    elif double_quant:
        want[256:] = True  # blocks of 64 are rows here; rows 256..511 are the second group
    else:
        want[300] = True
    np.testing.assert_array_equal(back, want)


def test_donate_keeps_buffers_that_tied_or_float_leaves_still_hold():
    w = jax.random.normal(jax.random.key(0), (64, 64))
    alias = jax.device_put(w, w.sharding)  # another Array object, possibly the same buffer
    params = {"a": {"kernel": w}, "b": {"kernel": w}, "c": {"kernel": alias}, "head": {"kernel": w}}
    q = jaxlora.quantize(params, "nf4", donate=True)  # "head" stays float (DEFAULT_EXCLUDE)
    assert q["a"]["kernel"] is q["b"]["kernel"]  # tied weights stay tied, quantized once
    assert not w.is_deleted() and np.array_equal(q["head"]["kernel"], w)  # the float head still reads it
    want = _dequantize(q["a"]["kernel"])
    np.testing.assert_array_equal(_dequantize(q["c"]["kernel"]), want)
    params = {"a": {"kernel": w}, "b": {"kernel": w}, "c": {"kernel": alias}}
    q = jaxlora.quantize(params, "nf4", donate=True)
    assert w.is_deleted()  # freed once its last holder was quantized
    np.testing.assert_array_equal(_dequantize(q["b"]["kernel"]), want)


def test_abstract_params_quantize_to_an_abstract_tree():
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 64, 128), jnp.bfloat16)}}
    want = jax.eval_shape(lambda: jaxlora.quantize({"dense": {"kernel": jnp.ones((4, 64, 128), jnp.bfloat16)}}))
    got = jaxlora.quantize(params, donate=True)
    assert isinstance(got["dense"]["kernel"], jaxlora.Quantized)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    assert jax.tree_util.tree_leaves(got) == jax.tree_util.tree_leaves(want)
