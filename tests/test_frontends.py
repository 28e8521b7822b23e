"""The same LoRA algebra through the three front-ends: Flax Linen, Flax NNX and a plain JAX function.

Each front-end builds the same model, y = tanh(x·W1)·W2 (flat) or L scanned layers h ← tanh(h·W[l])
(stacked), and hands back ``fn(params, x)``; the checks compare against NumPy's (W + scale·A·B)·x.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_base_output, assert_trees_close

import jaxlora

D, H, L = 5, 7, 3


class LinenFlat(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, use_bias=False, name="w2")(jnp.tanh(nn.Dense(H, use_bias=False, name="w1")(x)))


class LinenStacked(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.scan(
            _LinenLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=L, in_axes=nn.broadcast
        )
        return layer(name="layers")(x, None)[0]


class _LinenLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(D, use_bias=False, name="w")(x)), None


class NnxFlat(nnx.Module):
    def __init__(self, rngs):
        self.w1 = nnx.Linear(D, H, use_bias=False, rngs=rngs)
        self.w2 = nnx.Linear(H, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.w2(jnp.tanh(self.w1(x)))


class _NnxLayer(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Linear(D, D, use_bias=False, rngs=rngs)


class NnxStacked(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.split_rngs(splits=L)(nnx.vmap(_NnxLayer, in_axes=0, out_axes=0))(rngs)

    def __call__(self, x):
        step = lambda layer, h: jnp.tanh(layer.w(h))
        return nnx.scan(step, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.layers, x)


def _plain_flat(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _plain_stacked(p, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["w"])[0]


def _weight(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape) / np.sqrt(shape[-2])


def frontend(kind: str, stacked: bool):
    """``(fn, params, weights)``: ``weights(params)`` gives the NumPy kernels (in, out) by LoRA path."""
    x = jnp.ones((2, D))
    if kind == "linen":
        model = LinenStacked() if stacked else LinenFlat()
        params = model.init(jax.random.key(0), x)
        fn = model.apply
    elif kind == "nnx":
        graphdef, params = nnx.split(NnxStacked(nnx.Rngs(0)) if stacked else NnxFlat(nnx.Rngs(0)))
        fn = jaxlora.nnx.call(graphdef)
    else:
        fn = _plain_stacked if stacked else _plain_flat
        params = (
            {"layers": {"w": _weight((L, D, D), 0)}}
            if stacked
            else {"w1": _weight((D, H), 0), "w2": _weight((H, D), 1)}
        )
    found = jaxlora._tree.weights(params)
    weights = lambda p: {
        path: np.asarray(jax.tree_util.tree_leaves(p)[w.index], np.float64) for path, w in found.items()
    }
    return fn, params, weights


def numpy_forward(w, x, stacked):
    h = np.asarray(x, np.float64)
    if stacked:
        for layer in w["layers/w"]:
            h = np.tanh(h @ layer)
        return h
    return np.tanh(h @ w["w1"]) @ w["w2"]


def numpy_merged(w, lora):
    """W + scale·A·B for each adapted kernel, straight from the factors (stacked: one product per layer)."""
    out = dict(w)
    for path, f in lora.items():
        a, b = np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)
        out[path] = w[path] + f.scale * np.matmul(a, b)
    return out


FRONTENDS = [(kind, stacked) for kind in ("linen", "nnx", "plain") for stacked in (False, True)]
IDS = [f"{kind}-{'stacked' if stacked else 'flat'}" for kind, stacked in FRONTENDS]


def _setup(kind, stacked, zero_b=False):
    fn, params, weights = frontend(kind, stacked)
    x = jax.random.normal(jax.random.key(4), (3, D))
    lora = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=2, alpha=3.0), fn=fn, args=(x,))
    if not zero_b:
        lora = {
            p: dataclasses.replace(f, b=0.5 * jax.random.normal(jax.random.key(9 + i), f.b.shape))
            for i, (p, f) in enumerate(sorted(lora.items()))
        }
    return fn, params, weights, x, lora


@pytest.mark.parametrize("kind,stacked", FRONTENDS, ids=IDS)
def test_paths_and_layouts_agree_across_frontends(kind, stacked):
    *_, lora = _setup(kind, stacked)
    if stacked:
        assert {p: (f.roles, f.a.shape, f.b.shape) for p, f in lora.items()} == {
            "layers/w": ("sio", (L, D, 2), (L, 2, D))
        }
    else:
        assert {p: f.roles for p, f in lora.items()} == {"w1": "io", "w2": "io"}
        assert lora["w1"].a.shape == (D, 2) and lora["w2"].b.shape == (2, D)


@pytest.mark.parametrize("kind,stacked", FRONTENDS, ids=IDS)
def test_apply_equals_numpy_reference(kind, stacked, maybe_jit):
    fn, params, weights, x, lora = _setup(kind, stacked)
    got = maybe_jit(lambda p, l, x: jaxlora.apply(fn, p, l, x))(params, lora, x)
    want = numpy_forward(numpy_merged(weights(params), lora), x, stacked)
    assert not np.allclose(want, numpy_forward(weights(params), x, stacked), atol=1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,stacked", FRONTENDS, ids=IDS)
def test_zero_b_gives_the_base_output(kind, stacked, maybe_jit):
    fn, params, _, x, lora = _setup(kind, stacked, zero_b=True)
    got = maybe_jit(lambda p, l, x: jaxlora.apply(fn, p, l, x))(params, lora, x)
    # bit for bit op by op; a scan (even eagerly) or jit compiles each program whole, and XLA:CPU may
    # emit the two loops' dots differently (docs/design.md, "Numerics")
    assert_base_output(got, maybe_jit(fn)(params, x), exact=maybe_jit is not jax.jit and not stacked)


@pytest.mark.parametrize("kind,stacked", FRONTENDS, ids=IDS)
def test_merge_equals_factored_apply_and_unmerge_restores(kind, stacked, maybe_jit):
    fn, params, weights, x, lora = _setup(kind, stacked)
    merged = maybe_jit(jaxlora.merge)(params, lora)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(fn(merged, x), jaxlora.apply(fn, params, lora, x), rtol=1e-5, atol=1e-5)
    for path, w in numpy_merged(weights(params), lora).items():
        np.testing.assert_allclose(weights(merged)[path], w, rtol=1e-5, atol=1e-5)
    assert_trees_close(maybe_jit(jaxlora.unmerge)(merged, lora), params, atol=1e-5)


@pytest.mark.parametrize("kind,stacked", FRONTENDS, ids=IDS)
def test_gradients_only_on_a_and_b(kind, stacked, maybe_jit):
    fn, params, weights, x, lora = _setup(kind, stacked)
    y = jax.random.normal(jax.random.key(5), (3, D))
    loss = lambda l: jnp.mean((jaxlora.apply(fn, params, l, x) - y) ** 2)
    grads = maybe_jit(jax.grad(loss))(lora)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora)  # a, b per path; no W
    want = jax.grad(lambda l: jnp.mean((fn(jaxlora.merge(params, l), x) - y) ** 2))(lora)
    assert_trees_close(grads, want, rtol=1e-4, atol=1e-6)
    # and by hand for the flat model: dL/dB = scale·(x·A)ᵀ·dL/dy at the last layer
    if not stacked:
        w = numpy_merged(weights(params), lora)
        xn, f = np.asarray(x, np.float64), lora["w2"]
        h = np.tanh(xn @ w["w1"])
        dy = 2 * (h @ w["w2"] - np.asarray(y)) / y.size
        np.testing.assert_allclose(grads["w2"].b, f.scale * (h @ np.asarray(f.a)).T @ dy, rtol=1e-4, atol=1e-6)
