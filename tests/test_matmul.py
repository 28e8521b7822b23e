"""The factored matmul's custom VJP against plain autodiff of the reference math ``op(x, W + ΔW)``."""

import re

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


def _dots(jaxpr) -> list[tuple[tuple[int, ...], int]]:
    """(output shape, contracted size) of every dot_general, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            k = int(np.prod([eqn.invars[0].aval.shape[d] for d in lc]))
            found.append((tuple(eqn.outvars[0].aval.shape), k))
        for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else _params_jaxprs(eqn.params):
            found += _dots(sub)
    return found


def _params_jaxprs(params):
    for v in params.values():
        for u in v if isinstance(v, (tuple, list)) else [v]:
            if hasattr(u, "eqns"):
                yield u
            elif hasattr(u, "jaxpr") and hasattr(u.jaxpr, "eqns"):
                yield u.jaxpr


@pytest.mark.parametrize("merged", [False, True])
def test_lora_gradient_forms_no_weight_gradient(merged, monkeypatch):
    """No dot contracts the tokens into a W-shaped array (xᵀ·g); the merged form's ΔW = a·b contracts r."""
    monkeypatch.setattr(_matmul, "_MERGED", merged)
    model, x, params, lora = _setup("dense", jnp.float32)
    x = jnp.ones((4, 16, 8))
    dots = _dots(jax.make_jaxpr(jax.grad(_loss_fast(model)))(lora, params, x).jaxpr)
    assert dots, "expected the dots of the forward and backward passes"
    w_shaped = [k for shape, k in dots if shape in ((8, 6), (6, 8))]
    assert all(k == 2 for k in w_shaped) and bool(w_shaped) == merged, dots  # only ΔW, contracting r = 2


def test_constant_input_gets_no_input_gradient(monkeypatch):
    """With x a constant, the backward pass computes only the factors' gradients (symbolic zeros)."""
    monkeypatch.setattr(_matmul, "_MERGED", False)
    model, x, params, lora = _setup("dense", jnp.float32)
    hlo = jax.jit(jax.grad(_loss_fast(model))).lower(lora, params, x).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    # forward: x·W, x·a, t·b; backward: g·bᵀ, tᵀ·g, xᵀ·(g·bᵀ); no g·Wᵀ and no (g·bᵀ)·aᵀ
    assert len(dots) == 6, "\n".join(dots)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_form_agrees(name, dtype, monkeypatch):
    """Factored or transient ``W + ΔW``, with or without the one-read ops on ``[W | a]`` and ``[W ; b]``:
    the same values and gradients."""
    model, x, params, lora = _setup(name, jnp.dtype(dtype))
    results = []
    for merged, side in [(False, False), (True, False), (True, True)]:
        monkeypatch.setattr(_matmul, "_MERGED", merged)
        monkeypatch.setattr(_matmul, "_SIDE_BY_SIDE", side)
        y = jax.jit(lambda l, p, x: jaxlora.apply(model.apply, p, l, x))(lora, params, x)
        g = jax.jit(jax.grad(_loss_fast(model), argnums=(0, 2)))(lora, params, x)
        results.append((y, g))
    tol = 1e-5 if dtype == "float32" else 3e-2
    for r in results[1:]:
        _close(r, results[0], tol, tol)


def test_merge_is_cheaper_for_many_tokens_only():
    w = jnp.zeros((64, 64))
    base = lambda x, w: x @ w  # noqa: E731
    assert _matmul.merge_is_cheaper(jnp.zeros((512, 64)), w, base)  # a training or prefill batch
    assert not _matmul.merge_is_cheaper(jnp.zeros((8, 64)), w, base)  # a decode step


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


def _plain_factored(x, xl, w, first, second, scale, base, first_op, second_op, *_):
    f, s = _matmul._cast(first, second, scale, xl.dtype)
    y = base(x, w)
    return y + second_op(first_op(xl, f), s).astype(y.dtype)


def _big_float32(jaxpr, size) -> int:
    """How many float32 values of at least ``size`` elements the jaxpr (and its sub-jaxprs) makes."""
    n = 0
    for eqn in jaxpr.eqns:
        n += sum(v.aval.dtype == jnp.float32 and v.aval.size >= size for v in eqn.outvars)
        for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else _params_jaxprs(eqn.params):
            n += _big_float32(sub, size)
    return n


@pytest.mark.parametrize("merged", [False, True])
def test_bfloat16_step_makes_no_float32_activation(merged, monkeypatch):
    """float32 A and B never pull a bfloat16 activation (or its gradient) up to float32."""
    monkeypatch.setattr(_matmul, "_MERGED", merged)
    model = nn.Dense(64, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.ones((4, 32, 64), jnp.bfloat16)
    params = model.init(jax.random.key(0), x)
    lora = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=4))
    assert all(f.a.dtype == jnp.float32 for f in lora.values())
    loss = lambda lora, x: jnp.sum(jaxlora.apply(model.apply, params, lora, x))  # noqa: E731
    base = lambda x: jnp.sum(model.apply(params, x))  # noqa: E731
    got = _big_float32(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(lora, x).jaxpr, x.size // 4)
    want = _big_float32(jax.make_jaxpr(jax.grad(base))(x).jaxpr, x.size // 4)
    assert got == want, (got, want)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="XLA's dot_merger is a pass of the GPU pipeline")
def test_on_a_gpu_xla_makes_one_gemm_of_the_products_of_projections_sharing_an_input():
    """design.md, "Projections that share an input": the rewrite keeps q, k and v apart and XLA's GPU
    pipeline groups their rank-r products, here the weight gradients ``xᵀ·(g·Bᵀ)`` of the three ``A``
    (one product with 3·r columns)."""
    d, r, tokens = 512, 8, 256
    ks = jax.random.split(jax.random.key(0), 5)
    params = {n: jax.random.normal(k, (d, d), jnp.bfloat16) / 16 for n, k in zip("qkv", ks)}
    x = jax.random.normal(ks[3], (tokens, d), jnp.bfloat16)

    def fn(params, x):
        return jnp.tanh(x @ params["q"]) * (x @ params["k"]) + x @ params["v"]

    lora = jaxlora.init(ks[4], params, jaxlora.LoraConfig(rank=r, targets=("q", "k", "v")), fn=fn, args=(x,))
    lora = jax.tree.map(lambda v: v + 0.01, lora)  # B ≠ 0

    def loss(lora):
        return jaxlora.apply(fn, params, lora, x).astype(jnp.float32).var()

    hlo = jax.jit(jax.grad(loss)).lower(lora).compile().as_text()
    results = [re.match(r"\s*(?:ROOT )?%\S+ = (\(.*?\)|\S+) (.*)", line) for line in hlo.splitlines()]
    gemms = [m for m in results if m and re.search(r"cublas|gemm|^dot\(", m[2])]  # m[1]: the result's shape
    grouped = [m[0] for m in gemms if re.search(rf"\[(\d+,)*{3 * r}\]", m[1])]
    assert gemms, "no GEMM found in the compiled HLO:\n" + hlo
    assert grouped, "no GEMM with 3·r columns:\n" + "\n".join(m[0] for m in gemms)
