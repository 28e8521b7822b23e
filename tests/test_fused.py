"""The fused LoRA GEMM (`jaxlora._fused`): its kernel (in Pallas's interpreter on a CPU, compiled on a
GPU) against NumPy, the automatic fallback to XLA, and jaxlora's layer op on the kernel path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close

import jaxlora
from jaxlora import _fused, _matmul

TILES = (16, 16, 16)
# JAX 0.11 deprecates Pallas's Triton lowering (the kernel's GPU path); the tests still hold it to its math
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles that divide the tests' small shapes, so the kernel covers them."""
    monkeypatch.setattr(_fused, "BLOCK", TILES)


def _operands(m, k, n, r, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(keys[0], (m, k), dtype), jax.random.normal(keys[1], (k, n), dtype),
            jax.random.normal(keys[2], (m, r), dtype), jax.random.normal(keys[3], (r, n), dtype))  # fmt: skip


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("epilogue", [False, True])
def test_the_kernel_computes_x_w_plus_t_b(transpose_w, epilogue):
    x, w, t, b = _operands(48, 64, 32, 16, jnp.float32)
    want = np.asarray(x) @ np.asarray(w) + (np.asarray(t) @ np.asarray(b) if epilogue else 0)
    w_in = w.T if transpose_w else w
    with jax.default_matmul_precision("highest"):  # a GPU's default would round f32 products to TF32
        got = _fused.matmul(x, w_in, t if epilogue else None, b if epilogue else None, transpose_w=transpose_w,
                            block=TILES, interpret=True)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_the_kernel_accumulates_bfloat16_in_float32():
    x, w, t, b = _operands(32, 256, 32, 16, jnp.bfloat16)
    f = lambda v: np.asarray(v, np.float32)  # noqa: E731
    got = _fused.matmul(x, w, t, b, block=TILES, interpret=True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(f(got), f(x) @ f(w) + f(t) @ f(b), rtol=1e-2, atol=0.25)  # one bf16 rounding


def test_tiles_that_do_not_divide_the_shapes_are_an_error_naming_the_fix():
    x, w, t, b = _operands(40, 64, 32, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"tiles \(16, 16, 16\) do not divide x \(40, 64\).*use `reference`"):
        _fused.matmul(x, w, t, b, block=TILES, interpret=True)


def test_the_fallback_is_chosen_off_the_gpu_and_for_shapes_the_tiles_do_not_cover(small_tiles, monkeypatch):
    x, w = jnp.zeros((4, 8, 32), jnp.bfloat16), jnp.zeros((32, 48), jnp.bfloat16)
    assert _fused.chosen(x, w, 16) == (jax.default_backend() == "gpu" and _fused._PAYS)
    monkeypatch.setattr(_fused, "_KERNEL", True)
    assert _fused.chosen(x, w, 16)
    assert not _fused.chosen(x, w, 8)  # rank under the kernel's smallest dot
    assert not _fused.chosen(jnp.zeros((4, 8, 30), jnp.bfloat16), jnp.zeros((30, 48), jnp.bfloat16), 16)
    assert not _fused.chosen(x.astype(jnp.float32), w.astype(jnp.float32), 16)  # 16-bit floats only
    monkeypatch.setattr(_fused, "_KERNEL", False)
    assert not _fused.chosen(x, w, 16)


def _layer(x, w, a, b, scale=2.0):
    dot = lambda u, v: jnp.dot(u, v, preferred_element_type=jnp.float32).astype(u.dtype)  # noqa: E731
    return _matmul.lora_op(x, w, a, b, scale, base=jnp.dot, first_op=dot, second_op=dot, delta_op=jnp.dot,
                           side_by_side=True)  # fmt: skip


def _value_and_grads(x, w, a, b):
    y, pull = jax.vjp(lambda x, a, b: _layer(x, w, a, b), x, a, b)
    g = jax.random.normal(jax.random.key(9), y.shape, y.dtype)
    return (y, *pull(g))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_the_kernel_path_gives_the_xla_value_and_gradients(small_tiles, monkeypatch, dtype):
    x, w, _, _ = _operands(64, 32, 48, 16, dtype)
    a = jax.random.normal(jax.random.key(3), (32, 16), jnp.float32) / 4
    b = jax.random.normal(jax.random.key(4), (16, 48), jnp.float32)
    monkeypatch.setattr(_matmul, "_MERGED", False)  # the XLA form with the same products: x·W + (x·a)·b
    # a fresh function each time: jit and make_jaxpr share a trace cache, and the switches are read at trace time
    want = jax.jit(lambda *v: _value_and_grads(*v))(x, w, a, b)
    monkeypatch.setattr(_fused, "_KERNEL", True)
    jaxpr = str(jax.make_jaxpr(lambda *v: _value_and_grads(*v))(x, w, a, b))
    assert jaxpr.count("pallas_call") == 2  # the forward and the input gradient
    got = jax.jit(lambda *v: _value_and_grads(*v))(x, w, a, b)
    f = lambda v: np.asarray(v, np.float32)  # noqa: E731
    for g, e in zip(got, want):
        assert g.dtype == e.dtype
        np.testing.assert_allclose(f(g), f(e), rtol=2e-2, atol=5e-2 * float(np.max(np.abs(f(e)))))


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(64, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="up")(x))
        return nn.Dense(32, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="down")(h)


def test_a_flax_model_trains_the_same_on_the_kernel_path(small_tiles, monkeypatch):
    x = jax.random.normal(jax.random.key(0), (2, 16, 32), jnp.bfloat16)
    model = Mlp()
    params = model.init(jax.random.key(1), x)
    lora = jaxlora.init(jax.random.key(2), params, jaxlora.LoraConfig(rank=16, targets=("up", "down")))
    lora = {k: jaxlora.LoraFactors(f.a, 0.1 * jnp.ones_like(f.b), f.scale, f.roles) for k, f in lora.items()}

    def loss(lora):
        y = jaxlora.apply(model.apply, params, lora, x)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    monkeypatch.setattr(_matmul, "_MERGED", False)
    want = jax.jit(jax.value_and_grad(loss))(lora)
    monkeypatch.setattr(_fused, "_KERNEL", True)
    # two forwards, and the input gradient of "down" only: the model input x is not differentiated
    assert str(jax.make_jaxpr(jax.value_and_grad(loss))(lora)).count("pallas_call") == 3
    got = jax.jit(jax.value_and_grad(loss))(lora)
    assert_trees_close(got, want, rtol=3e-2, atol=3e-3)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel needs a GPU (its Triton lowering)")
@pytest.mark.parametrize(("k", "n"), [(1024, 1024), (1024, 4096), (4096, 1024)])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_the_compiled_kernel_matches_xla_on_the_gpu(k, n, transpose_w):
    x, w, t, b = _operands(2048, k, n, 16, jnp.bfloat16)
    w = w / k**0.5
    w_in = w.T if transpose_w else w
    got = np.asarray(_fused.matmul(x, w_in, t, b, transpose_w=transpose_w), np.float32)
    want = np.asarray(_fused.reference(x, w_in, t, b, transpose_w=transpose_w), np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=6e-2)  # both accumulate in f32, round once to bf16
