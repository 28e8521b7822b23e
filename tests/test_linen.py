"""The LoRA algebra on every Linen layer kind, against a NumPy reference of W + scale·B·A."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_base_output, assert_trees_close, delta_reference
from linen_models import MODELS

import jaxlora
from jaxlora import _matmul


def _setup(name, rank=2, alpha=3.0):
    model, make_x, target = MODELS[name]
    x = make_x()
    params = model.init(jax.random.key(0), x)
    config = jaxlora.LoraConfig(rank=rank, alpha=alpha, targets=target)
    lora = jaxlora.init(jax.random.key(2), params, config, fn=model.apply, args=(x,))
    # Non-zero B, so the LoRA branch contributes.
    lora = {
        p: jaxlora.LoraFactors(f.a, jax.random.normal(jax.random.key(i + 3), f.b.shape), f.scale, f.roles)
        for i, (p, f) in enumerate(lora.items())
    }
    return model, x, params, lora


def _merged_reference(params, lora):
    """params with each targeted W replaced by W + ΔW, ΔW computed by NumPy."""
    weights = jaxlora._tree.weights(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for path, f in lora.items():
        i = weights[path].index
        leaves[i] = np.asarray(leaves[i], np.float64) + delta_reference(f.a, f.b, f.roles, f.scale)
        leaves[i] = jnp.asarray(leaves[i], jnp.float32)
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_apply_equals_numpy_merged_reference(name, maybe_jit):
    model, x, params, lora = _setup(name)
    got = maybe_jit(lambda p, l, x: jaxlora.apply(model.apply, p, l, x))(params, lora, x)
    want = model.apply(_merged_reference(params, lora), x)
    base = model.apply(params, x)
    assert not np.allclose(want, base, atol=1e-3), "the LoRA branch should change the output"
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_dense_against_plain_numpy():
    model, x, params, lora = _setup("dense", rank=3, alpha=6.0)
    p, f = params["params"]["proj"], lora["proj"]
    xn, w, a, b = (np.asarray(v, np.float64) for v in (x, p["kernel"], f.a, f.b))
    want = xn @ w + 2.0 * (xn @ a) @ b + np.asarray(p["bias"])
    np.testing.assert_allclose(jaxlora.apply(model.apply, params, lora, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_b_gives_the_base_output(name, maybe_jit):
    model, x, params, _ = _setup(name)
    lora = jaxlora.init(
        jax.random.key(2), params, jaxlora.LoraConfig(rank=2, targets=MODELS[name][2]), fn=model.apply, args=(x,)
    )
    got = maybe_jit(lambda p, l, x: jaxlora.apply(model.apply, p, l, x))(params, lora, x)
    # exact where W reaches lax directly, op by op; jit, a scan, jnp.einsum's nested jit and attend's
    # jnp.dot of the transposed table (one compiled transpose + dot in the base) compile the two apart
    op_by_op = maybe_jit is not jax.jit and name not in ("scan", "einsum", "embed_tied")
    assert_base_output(got, maybe_jit(model.apply)(params, x), exact=op_by_op)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_merge_equals_factored_apply_and_unmerge_restores(name):
    model, x, params, lora = _setup(name)
    merged = jaxlora.merge(params, lora)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert jax.tree.map(lambda v: v.dtype, merged) == jax.tree.map(lambda v: v.dtype, params)
    np.testing.assert_allclose(
        model.apply(merged, x), jaxlora.apply(model.apply, params, lora, x), rtol=2e-4, atol=2e-4
    )
    assert_trees_close(jaxlora.unmerge(merged, lora), params, rtol=1e-5, atol=1e-5)


def test_merge_keeps_bfloat16_and_sums_in_float32():
    model, x, params, lora = _setup("dense")
    params16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
    merged = jaxlora.merge(params16, lora)
    w = merged["params"]["proj"]["kernel"]
    assert w.dtype == jnp.bfloat16
    want = np.asarray(params16["params"]["proj"]["kernel"], np.float64) + delta_reference(
        lora["proj"].a, lora["proj"].b, "io", lora["proj"].scale
    )
    np.testing.assert_array_equal(w, jnp.asarray(want, jnp.float32).astype(jnp.bfloat16))


def test_scanned_layers_each_use_their_own_slice():
    model, x, params, lora = _setup("scan")
    f = lora["layers/mlp"]
    assert f.roles == "sio" and f.a.shape == (3, 6, 2) and f.b.shape == (3, 2, 6)
    # Zero the LoRA of layers 0 and 2: only layer 1's slice may change the output.
    only1 = jaxlora.LoraFactors(f.a, f.b.at[jnp.array([0, 2])].set(0.0), f.scale, f.roles)
    got = jaxlora.apply(model.apply, params, {"layers/mlp": only1}, x)
    kernel = params["params"]["layers"]["mlp"]["kernel"]
    want_kernel = kernel.at[1].add(f.scale * f.a[1] @ f.b[1])
    want = model.apply({"params": {"layers": {"mlp": {**params["params"]["layers"]["mlp"], "kernel": want_kernel}}}}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_model_computes_in_bfloat16_with_float32_factors():
    model, x, params, lora = _setup("dense")
    params16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
    assert lora["proj"].a.dtype == jnp.float32
    y = jaxlora.apply(model.apply, params16, lora, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    want = model.apply(_merged_reference(params16, lora), x)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=5e-2, atol=5e-2)


def test_no_gradient_for_frozen_weights_is_computed(monkeypatch):
    # the factored form: the transient W + ΔW form makes a (6, 7) ΔW from the rank-r factors, which
    # tests/test_matmul.py::test_lora_gradient_forms_no_weight_gradient tells apart from a gradient
    monkeypatch.setattr(_matmul, "_MERGED", False)
    model, x, params, lora = _setup("dense")  # kernel (6, 7): no other array has that shape
    loss = lambda l: jnp.sum(jaxlora.apply(model.apply, params, l, x) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(lora)
    shapes = [
        tuple(v.aval.shape) for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general" for v in e.outvars
    ]
    assert shapes, "expected matmuls in the gradient"
    assert (6, 7) not in shapes and (7, 6) not in shapes, shapes
    hlo = jax.jit(jax.grad(loss)).lower(lora).as_text()
    assert "f32[6,7]" not in hlo and "f32[7,6]" not in hlo


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for value in e.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _all_eqns(sub)


def test_grad_matches_reference_gradient():
    model, x, params, lora = _setup("dense_general_query")
    f = lora["query"]

    def loss_factored(l):
        return jnp.sum(jnp.sin(jaxlora.apply(model.apply, params, l, x)))

    def loss_merged(a, b):  # plain autodiff through the merged weight
        w = params["params"]["query"]["kernel"] + f.scale * jnp.einsum("dr,rnh->dnh", a, b)
        p = {"params": {"query": {**params["params"]["query"], "kernel": w}}}
        return jnp.sum(jnp.sin(model.apply(p, x)))

    g = jax.grad(loss_factored)(lora)["query"]
    ga, gb = jax.grad(loss_merged, argnums=(0, 1))(f.a, f.b)
    np.testing.assert_allclose(g.a, ga, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.b, gb, rtol=1e-4, atol=1e-4)


def test_dropout_only_with_a_key():
    model, x, params, lora = _setup("dense")
    lora = {p: jaxlora.LoraFactors(f.a, f.b, f.scale, f.roles, dropout=0.5) for p, f in lora.items()}
    with pytest.warns(UserWarning, match=r"LoRA dropout is off: \d+ modules have dropout \[0.5\].*dropout_key="):
        plain = jaxlora.apply(model.apply, params, lora, x)
    nodrop = jaxlora.apply(
        model.apply, params, {p: jaxlora.LoraFactors(f.a, f.b, f.scale, f.roles) for p, f in lora.items()}, x
    )
    np.testing.assert_array_equal(plain, nodrop)
    k1 = jaxlora.apply(model.apply, params, lora, x, dropout_key=jax.random.key(7))
    k1_again = jax.jit(lambda k: jaxlora.apply(model.apply, params, lora, x, dropout_key=k))(jax.random.key(7))
    k2 = jaxlora.apply(model.apply, params, lora, x, dropout_key=jax.random.key(8))
    np.testing.assert_allclose(k1, k1_again, rtol=1e-5, atol=1e-5)
    assert not np.allclose(k1, plain) and not np.allclose(k1, k2)
    # Dropout touches only the LoRA branch: with B = 0 the output is the base output for any key.
    zero = {p: jaxlora.LoraFactors(f.a, jnp.zeros_like(f.b), f.scale, f.roles, 0.5) for p, f in lora.items()}
    np.testing.assert_array_equal(
        jaxlora.apply(model.apply, params, zero, x, dropout_key=jax.random.key(7)), model.apply(params, x)
    )


def test_dropout_varies_across_scanned_layers():
    model, x, params, lora = _setup("scan")
    lora = {p: jaxlora.LoraFactors(f.a, f.b, f.scale, f.roles, dropout=0.5) for p, f in lora.items()}
    y = jax.jit(lambda k: jaxlora.apply(model.apply, params, lora, x, dropout_key=k))(jax.random.key(0))
    assert np.isfinite(np.asarray(y)).all()


def test_init_from_abstract_params_matches_real():
    model, make_x, target = MODELS["scan"]
    x = make_x()
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    config = jaxlora.LoraConfig(rank=2, targets=target)
    from_abstract = jaxlora.init(
        jax.random.key(2), abstract, config, fn=model.apply, args=(jax.ShapeDtypeStruct(x.shape, x.dtype),)
    )
    from_real = jaxlora.init(jax.random.key(2), model.init(jax.random.key(0), x), config, fn=model.apply, args=(x,))
    assert_trees_close(from_abstract, from_real, rtol=0, atol=0)


def test_init_of_a_module_does_not_depend_on_other_targets():
    model, x, params, _ = _setup("remat")
    both = jaxlora.init(jax.random.key(5), params, jaxlora.LoraConfig(rank=2), fn=model.apply, args=(x,))
    one = jaxlora.init(
        jax.random.key(5), params, jaxlora.LoraConfig(rank=2, targets=["proj"]), fn=model.apply, args=(x,)
    )
    assert set(both) == {"hidden", "proj"} and set(one) == {"proj"}
    np.testing.assert_array_equal(both["proj"].a, one["proj"].a)


def test_init_distributions():
    params = {"params": {"big": {"kernel": jnp.zeros((400, 300))}, "emb": {"embedding": jnp.zeros((500, 64))}}}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=16))
    a = np.asarray(lora["big"].a)
    assert np.abs(a).max() <= 1 / np.sqrt(400) and np.abs(a).max() > 0.9 / np.sqrt(400)  # kaiming-uniform bound
    assert (np.asarray(lora["big"].b) == 0).all()
    gauss = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=16, init="gaussian", targets="big"))
    assert abs(np.std(gauss["big"].a) - 1 / 16) < 0.01
    assert set(lora) == {"big"}  # "all-linear" without a trace leaves embeddings out


def test_scale_rslora_and_patterns():
    params = {"params": {"q": {"kernel": jnp.zeros((16, 16))}, "v": {"kernel": jnp.zeros((16, 16))}}}
    config = jaxlora.LoraConfig(rank=4, alpha=8, rank_pattern={"v": 2}, alpha_pattern={"v": 1})
    lora = jaxlora.init(jax.random.key(0), params, config)
    assert lora["q"].scale == 2.0 and lora["q"].rank == 4
    assert lora["v"].scale == 0.5 and lora["v"].rank == 2
    rs = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=4, alpha=8, rslora=True))
    assert rs["q"].scale == 4.0


def test_dropout_without_key_warns_once_at_the_callers_line():
    import warnings

    params = {"w": jnp.ones((4, 6))}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, dropout=0.1))
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: once per call site
        for _ in range(3):
            jaxlora.apply(fn, params, lora, jnp.ones((1, 4)))
    assert len(caught) == 1 and caught[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]
    assert "for evaluation this is right" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a key, or without dropout: silent
        jaxlora.apply(fn, params, lora, jnp.ones((1, 4)), dropout_key=jax.random.key(1))
        jaxlora.apply(fn, params, jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2)), jnp.ones((1, 4)))
    stack = jaxlora.stack({"a": lora, "b": lora})
    with pytest.warns(UserWarning, match=r"LoRA dropout is off: 1 modules have dropout \[0.1\] \(w\)") as record:
        jaxlora.apply(fn, params, stack, jnp.ones((2, 4)), adapter_ids=jnp.array([0, 1]))
    assert record[0].filename == __file__
