"""Property tests of the LoRA algebra over shapes, ranks and dtypes (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import delta_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora

settings.register_profile("jaxlora", deadline=None, max_examples=12, derandomize=True)
settings.load_profile("jaxlora")


@st.composite
def problems(draw):
    din, dout = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rank = draw(st.integers(1, min(din, dout)))
    batch = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    keys = jax.random.split(jax.random.key(seed), 3)
    w = jax.random.normal(keys[0], (din, dout)).astype(dtype)
    x = jax.random.normal(keys[1], (batch, din)).astype(dtype)
    lora = jaxlora.init(keys[2], {"w": w}, jaxlora.LoraConfig(rank=rank, alpha=draw(st.sampled_from([1.0, 8.0]))))
    b = jax.random.normal(keys[2], lora["w"].b.shape)
    return w, x, lora, jaxlora.LoraFactors(lora["w"].a, b, lora["w"].scale, "io")


def _tol(dtype):
    return dict(rtol=5e-2, atol=5e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-4)


def fn(p, x):
    return x @ p["w"]


@given(problems())
def test_zero_b_is_the_base(problem):
    w, x, lora, _ = problem
    np.testing.assert_array_equal(jaxlora.apply(fn, {"w": w}, lora, x), fn({"w": w}, x))


@given(problems())
def test_factored_equals_merged_equals_numpy(problem):
    w, x, _, f = problem
    got = jaxlora.apply(fn, {"w": w}, {"w": f}, x)
    merged = fn(jaxlora.merge({"w": w}, {"w": f}), x)
    ref = np.asarray(x, np.float64) @ (np.asarray(w, np.float64) + delta_reference(f.a, f.b, "io", f.scale))
    # bfloat16 rounds each output to 8 bits of mantissa: compare against the output's own scale.
    tol = dict(rtol=0, atol=2e-2 * (np.abs(ref).max() + 1)) if w.dtype == jnp.bfloat16 else _tol(w.dtype)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, **tol)
    np.testing.assert_allclose(np.asarray(merged, np.float64), ref, **tol)


@given(problems())
def test_merge_then_unmerge_restores(problem):
    w, _, _, f = problem
    back = jaxlora.unmerge(jaxlora.merge({"w": w}, {"w": f}), {"w": f})["w"]
    assert back.dtype == w.dtype
    scale = float(np.abs(np.asarray(delta_reference(f.a, f.b, "io", f.scale))).max()) + 1.0
    np.testing.assert_allclose(
        np.asarray(back, np.float64), np.asarray(w, np.float64), rtol=0, atol=scale * _tol(w.dtype)["atol"] / 5
    )
