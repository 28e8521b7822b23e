"""The factored matmul's custom VJP against plain autodiff of the reference math ``op(x, W + ΔW)``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import _matmul


def _trained(lora, key):
    """Non-zero B, so every gradient path carries signal."""
    keys = jax.random.split(key, len(lora))
    return {k: jaxlora.LoraFactors(f.a, 0.3 * jax.random.normal(kk, f.b.shape, f.b.dtype), f.scale, f.roles, f.dropout)
            for kk, (k, f) in zip(keys, lora.items())}  # fmt: skip


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return jnp.tanh(nn.Dense(8, name="mlp")(h)).astype(h.dtype), None

        h, _ = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(
            x, None
        )
        return h


class Wrap(nn.Module):
    make: object

    @nn.compact
    def __call__(self, x):
        return self.make()(x)


# name: (model, input shape)
LAYOUTS = {
    "dense": (lambda: nn.Dense(6, name="proj"), (2, 5, 8)),
    "dense_general_in": (lambda: nn.DenseGeneral((3, 4), name="proj"), (2, 5, 8)),
    "dense_general_out": (lambda: nn.DenseGeneral(6, axis=(-2, -1), name="proj"), (2, 5, 3, 4)),
    "einsum": (lambda: nn.Einsum((8, 3, 4), "btd,dnh->btnh", name="proj"), (2, 5, 8)),
    "conv": (lambda: nn.Conv(5, (3,), name="proj"), (2, 7, 4)),
    "scan": (Scanned, (2, 5, 8)),
}


def _setup(name, dtype):
    make, shape = LAYOUTS[name]
    model = make() if name == "scan" else Wrap(make)
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), model.init(jax.random.key(1), x))
    lora = jaxlora.init(
        jax.random.key(2),
        params,
        jaxlora.LoraConfig(rank=2, alpha=4, targets="mlp" if name == "scan" else "proj"),
        fn=model.apply,
        args=(x,),
    )
    return model, x, params, _trained(lora, jax.random.key(3))


def _loss_fast(model):
    return lambda lora, params, x: jnp.sum(jnp.sin(jaxlora.apply(model.apply, params, lora, x).astype(jnp.float32)))


def _loss_reference(model):
    return lambda lora, params, x: jnp.sum(jnp.sin(model.apply(_merge_exact(params, lora), x).astype(jnp.float32)))


def _merge_exact(params, lora):
    """``W + ΔW`` in float32, differentiable in the factors (the reference math, plain autodiff)."""
    from jaxlora._tree import weights

    ws = weights(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for path, f in lora.items():
        i = ws[path].index
        leaves[i] = leaves[i].astype(jnp.float32) + _matmul.delta(f, jnp.float32)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _close(got, want, rtol, atol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = max(float(np.abs(w).max()), 1e-6)
        np.testing.assert_allclose(g / scale, w / scale, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_matches_autodiff_of_reference(name, dtype):
    model, x, params, lora = _setup(name, jnp.dtype(dtype))
    tol = 1e-5 if dtype == "float32" else 3e-2  # bf16 activations: ~2^-8 relative per rounding
    x32 = x.astype(jnp.float32)
    got = jax.jit(jax.grad(_loss_fast(model), argnums=(0, 2)))(lora, params, x)
    want = jax.grad(_loss_reference(model), argnums=(0, 2))(lora, params, x32)
    _close(got, want, tol, tol)


@pytest.mark.parametrize("name", ["dense", "dense_general_in", "scan"])
def test_weight_gradient_when_asked(name):
    model, x, params, lora = _setup(name, jnp.float32)
    got = jax.grad(_loss_fast(model), argnums=1)(lora, params, x)
    want = jax.grad(_loss_reference(model), argnums=1)(lora, params, x)
    _close(got, want, 1e-5, 1e-5)


def _dot_outputs(jaxpr) -> list[tuple[int, ...]]:
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else _params_jaxprs(eqn.params):
            shapes += _dot_outputs(sub)
    return shapes


def _params_jaxprs(params):
    for v in params.values():
        for u in v if isinstance(v, (tuple, list)) else [v]:
            if hasattr(u, "eqns"):
                yield u
            elif hasattr(u, "jaxpr") and hasattr(u.jaxpr, "eqns"):
                yield u.jaxpr


def test_lora_gradient_forms_no_weight_shaped_product():
    model, x, params, lora = _setup("dense", jnp.float32)
    x = jnp.ones((4, 16, 8))
    jaxpr = jax.make_jaxpr(jax.grad(_loss_fast(model)))(lora, params, x).jaxpr
    shapes = _dot_outputs(jaxpr)
    assert shapes, "expected the dots of the forward and backward passes"
    assert (8, 6) not in shapes and (6, 8) not in shapes, shapes


def test_constant_input_gets_no_input_gradient():
    """With x a constant, the backward pass computes only the factors' gradients (symbolic zeros)."""
    model, x, params, lora = _setup("dense", jnp.float32)
    hlo = jax.jit(jax.grad(_loss_fast(model))).lower(lora, params, x).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    # forward: x·W, x·a, t·b; backward: g·bᵀ, tᵀ·g, xᵀ·(g·bᵀ); no g·Wᵀ and no (g·bᵀ)·aᵀ
    assert len(dots) == 6, "\n".join(dots)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_op_forward_matches(dtype, monkeypatch):
    """The experimental one-op forward ``[x | x·a]·[W ; b]`` gives the same values and gradients."""
    model, x, params, lora = _setup("dense", jnp.dtype(dtype))
    plain_y = jaxlora.apply(model.apply, params, lora, x)
    plain_g = jax.grad(_loss_fast(model), argnums=(0, 2))(lora, params, x)
    monkeypatch.setattr(_matmul, "_CONCAT_FORWARD", True)
    y = jaxlora.apply(model.apply, params, lora, x)
    g = jax.grad(_loss_fast(model), argnums=(0, 2))(lora, params, x)
    tol = 1e-5 if dtype == "float32" else 3e-2
    _close(y, plain_y, tol, tol)
    _close(g, plain_g, tol, tol)


def test_dropout_gradient_is_that_of_the_dropped_branch():
    model, x, params, lora = _setup("dense", jnp.float32)
    lora = {k: jaxlora.LoraFactors(f.a, f.b, f.scale, f.roles, dropout=0.5) for k, f in lora.items()}
    key = jax.random.key(7)

    def fast(lora, x):
        return jnp.sum(jnp.sin(jaxlora.apply(model.apply, params, lora, x, dropout_key=key)))

    def plain(lora, x):  # the same computation with the custom VJP swapped for autodiff
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_matmul, "factored", _plain_factored)
            return fast(lora, x)

    _close(jax.grad(fast, argnums=(0, 1))(lora, x), jax.grad(plain, argnums=(0, 1))(lora, x), 1e-5, 1e-5)


def _plain_factored(x, xl, w, first, second, scale, base, first_op, second_op, concat=None):
    f, t = _matmul._rank_product(xl, first, scale, first_op)
    y = base(x, w)
    return y + second_op(t, second.astype(t.dtype)).astype(y.dtype)
