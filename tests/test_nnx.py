"""Flax NNX: module paths, every layer kind, vmap/scan stacks, jit/nnx.jit, training, no mutation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_base_output, assert_trees_close, delta_reference

import jaxlora

D = 6


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.LinearGeneral(D, (2, 3), rngs=rngs)  # kernel (in, heads, head_dim)
        self.out = nnx.LinearGeneral((2, 3), D, axis=(-2, -1), rngs=rngs)  # kernel (heads, head_dim, out)

    def __call__(self, x):
        return self.out(jnp.tanh(self.query(x)))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn = Attention(rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.mlp = nnx.Einsum("btd,df->btf", (D, D), (D,), rngs=rngs)

    def __call__(self, x):
        return x + self.mlp(self.norm(self.attn(x)))


class Model(nnx.Module):
    def __init__(self, rngs, vocab=11):
        self.embed = nnx.Embed(vocab, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, (3,), rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(2)])
        self.head = nnx.Linear(D, 5, rngs=rngs)

    def __call__(self, ids):
        x = self.conv(self.embed(ids))
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Stacked(nnx.Module):
    """Layers created with nnx.vmap and run with nnx.scan (or nnx.vmap as an ensemble)."""

    def __init__(self, rngs, n=3, ensemble=False, remat=False):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Attention(rngs)

        self.layers, self.ensemble, self.remat = make(rngs), ensemble, remat

    def __call__(self, x):
        if self.ensemble:
            return nnx.vmap(lambda layer, x: layer(x), in_axes=(0, 0))(self.layers, x)
        step = nnx.remat(lambda layer, x: layer(x)) if self.remat else (lambda layer, x: layer(x))
        return nnx.scan(step, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.layers, x)


IDS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])


def _nonzero_b(lora, seed=5):
    return {
        p: dataclasses.replace(f, b=jax.random.normal(jax.random.key(seed + i), f.b.shape))
        for i, (p, f) in enumerate(sorted(lora.items()))
    }


def _numpy_merged(state, lora):
    found = jaxlora._tree.weights(state)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    for path, f in lora.items():
        i = found[path].index
        leaves[i] = jnp.asarray(
            np.asarray(leaves[i], np.float64) + delta_reference(f.a, f.b, f.roles, f.scale), jnp.float32
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _setup(targets="all-linear"):
    model = Model(nnx.Rngs(0))
    lora = _nonzero_b(
        jaxlora.nnx.init(jax.random.key(1), model, jaxlora.LoraConfig(rank=2, alpha=4.0, targets=targets), args=(IDS,))
    )
    return model, lora


def test_module_paths_and_roles():
    graphdef, state = nnx.split(Model(nnx.Rngs(0)))
    fn = jaxlora.nnx.call(graphdef)
    targets = ["embed", "conv", "query", "out", "mlp", "head"]
    lora = jaxlora.init(jax.random.key(1), state, jaxlora.LoraConfig(rank=2, targets=targets), fn=fn, args=(IDS,))
    roles = {p: f.roles for p, f in lora.items()}
    assert roles == {
        "embed": "io",
        "conv": "iio",
        "layers/0/attn/query": "ioo",
        "layers/0/attn/out": "iio",
        "layers/0/mlp": "io",
        "layers/1/attn/query": "ioo",
        "layers/1/attn/out": "iio",
        "layers/1/mlp": "io",
        "head": "io",
    }
    assert "layers/0/norm/scale" not in jaxlora.init(
        jax.random.key(1), state, jaxlora.LoraConfig(rank=2), fn=fn, args=(IDS,)
    )


@pytest.mark.parametrize("target", ["embed", "conv", "query", "out", "mlp", "head"])
def test_each_layer_kind_equals_numpy_merged_reference(target, maybe_jit):
    model, lora = _setup(target)
    graphdef, state = nnx.split(model)
    got = maybe_jit(lambda m, l, ids: jaxlora.nnx.apply(m, l, ids))(model, lora, IDS)
    want = nnx.merge(graphdef, _numpy_merged(state, lora))(IDS)
    assert not np.allclose(want, model(IDS), atol=1e-3), "the LoRA branch should change the output"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_linear_against_plain_numpy():
    model = nnx.Linear(D, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, D))
    lora = _nonzero_b(jaxlora.nnx.init(jax.random.key(1), model, jaxlora.LoraConfig(rank=3, alpha=6.0)))
    f = lora["kernel"]
    xn, w, a, b = (np.asarray(v, np.float64) for v in (x, model.kernel[...], f.a, f.b))
    np.testing.assert_allclose(jaxlora.nnx.apply(model, lora, x), xn @ w + 2.0 * (xn @ a) @ b, rtol=1e-5, atol=1e-5)


def test_zero_b_is_the_base_model():
    model = Model(nnx.Rngs(0))
    lora = jaxlora.nnx.init(jax.random.key(1), model, jaxlora.LoraConfig(rank=2), args=(IDS,))
    # not bit for bit even eagerly: nnx.Einsum's weight passes through jnp.einsum's own jit, which the
    # rewrite inlines, so that op is compiled apart from the base model's
    assert_base_output(jaxlora.nnx.apply(model, lora, IDS), model(IDS), exact=False)


def test_merge_returns_a_state_nnx_merge_accepts(maybe_jit):
    model, lora = _setup()
    graphdef, state = nnx.split(model)
    merged_state = maybe_jit(jaxlora.merge)(state, lora)
    assert isinstance(merged_state, nnx.State)
    merged = nnx.merge(graphdef, merged_state)
    np.testing.assert_allclose(
        merged(IDS), jaxlora.apply(jaxlora.nnx.call(graphdef), state, lora, IDS), rtol=1e-4, atol=1e-4
    )
    back = nnx.split(nnx.merge(graphdef, jaxlora.unmerge(merged_state, lora)))[1]
    assert_trees_close(back, state, atol=1e-5)


def test_module_level_merge_and_unmerge_leave_the_model_alone():
    model, lora = _setup()
    before = jax.tree.map(np.asarray, nnx.state(model))
    merged = jaxlora.nnx.merge(model, lora)
    assert merged is not model and isinstance(merged, Model)
    np.testing.assert_allclose(merged(IDS), jaxlora.nnx.apply(model, lora, IDS), rtol=1e-4, atol=1e-4)
    assert_trees_close(nnx.state(jaxlora.nnx.unmerge(merged, lora)), before, atol=1e-5)
    assert_trees_close(nnx.state(model), before, rtol=0, atol=0)


@pytest.mark.parametrize(
    "ensemble,remat", [(False, False), (False, True), (True, False)], ids=["scan", "remat", "vmap"]
)
def test_layers_stacked_with_nnx_vmap_and_scan(ensemble, remat, maybe_jit):
    model = Stacked(nnx.Rngs(0), ensemble=ensemble, remat=remat)
    x = jax.random.normal(jax.random.key(3), (3, 2, D) if ensemble else (2, D))
    lora = _nonzero_b(jaxlora.nnx.init(jax.random.key(1), model, jaxlora.LoraConfig(rank=2), args=(x,)))
    assert {p: f.roles for p, f in lora.items()} == {"layers/query": "sioo", "layers/out": "siio"}
    assert lora["layers/query"].a.shape == (3, D, 2) and lora["layers/query"].b.shape == (3, 2, 2, 3)
    graphdef, state = nnx.split(model)
    got = maybe_jit(lambda m, l, x: jaxlora.nnx.apply(m, l, x))(model, lora, x)
    np.testing.assert_allclose(got, nnx.merge(graphdef, _numpy_merged(state, lora))(x), rtol=1e-4, atol=1e-4)


def test_nnx_jit_training_step_trains_only_lora_and_keeps_the_model_frozen():
    model, _ = _setup()
    lora = jaxlora.nnx.init(
        jax.random.key(1), model, jaxlora.LoraConfig(rank=4, targets=["query", "out", "mlp"]), args=(IDS,)
    )
    before = jax.tree.map(np.asarray, nnx.state(model))
    target = jax.random.normal(jax.random.key(9), (2, 5, 5))
    opt = optax.adam(3e-2)

    @nnx.jit
    def step(model, lora, opt_state):
        loss_fn = lambda lora: jnp.mean((jaxlora.nnx.apply(model, lora, IDS) - target) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    opt_state, losses = opt.init(lora), []
    for _ in range(30):
        lora, opt_state, loss = step(model, lora, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    assert_trees_close(nnx.state(model), before, rtol=0, atol=0)  # the frozen model is untouched


def test_gradients_are_on_a_and_b_only_and_match_the_merged_model():
    model, lora = _setup(["query", "mlp"])
    graphdef, state = nnx.split(model)
    loss = lambda out: jnp.sum(jnp.sin(out))
    got = jax.jit(jax.grad(lambda l: loss(jaxlora.nnx.apply(model, l, IDS))))(lora)
    want = jax.grad(lambda l: loss(nnx.merge(graphdef, jaxlora.merge(state, l))(IDS)))(lora)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(lora)
    assert_trees_close(got, want, rtol=1e-3, atol=1e-3)  # gradients of size ~30, float32


def test_split_params_from_other_state_and_method():
    class WithDropout(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(D, D, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.proj(x))

        def logits(self, x):
            return self.proj(x)

    model = WithDropout(nnx.Rngs(0))
    x = jnp.ones((2, D))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = jaxlora.nnx.call(graphdef, rest, method="logits")
    lora = _nonzero_b(jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=2), fn=fn, args=(x,)))
    assert sorted(lora) == ["proj"]
    np.testing.assert_allclose(jaxlora.apply(fn, params, lora, x), jaxlora.nnx.apply(model, lora, x, method="logits"))
    by_method = jaxlora.nnx.init(jax.random.key(1), model, jaxlora.LoraConfig(rank=2), args=(x,), method="logits")
    assert_trees_close(by_method, jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=2), fn=fn, args=(x,)))
    count = int(model.drop.rngs.count[...])
    out, state = jaxlora.nnx.apply(model, lora, x, updates=True)
    assert int(model.drop.rngs.count[...]) == count, "apply does not mutate the model"
    assert int(state["drop"]["rngs"]["count"][...]) == count + 1, "updates=True returns the new RNG state"
    assert out.shape == (2, D)


class _BatchNormNet(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(D, D, rngs=rngs)
        self.bn = nnx.BatchNorm(D, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.bn(self.proj(x)))


def test_batch_stats_and_rng_updates_are_returned_not_applied():
    model = _BatchNormNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (8, D))
    lora = _nonzero_b(jaxlora.nnx.init(jax.random.key(1), model, jaxlora.LoraConfig(rank=2), args=(x,)))

    def loss(lora):
        out, state = jaxlora.nnx.apply(model, lora, x, updates=True)
        return jnp.mean(out**2), state

    (_, state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)
    assert sorted(grads) == ["proj"]
    np.testing.assert_array_equal(model.bn.mean[...], np.zeros(D))  # not mutated by apply
    h = np.asarray(x @ jaxlora.nnx.merge(model, lora).proj.kernel[...]) + np.asarray(model.proj.bias[...])
    np.testing.assert_allclose(state["bn"]["mean"][...], 0.01 * h.mean(0), rtol=1e-4, atol=1e-6)  # momentum 0.99
    nnx.update(model, state)  # the caller decides to keep the statistics
    np.testing.assert_allclose(model.bn.mean[...], 0.01 * h.mean(0), rtol=1e-4, atol=1e-6)


def test_call_with_train_mode_state_inside_init_apply_and_jit():
    model = _BatchNormNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (8, D))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = jaxlora.nnx.call(graphdef, rest)  # dropout and batch norm update their (copied) state
    lora = _nonzero_b(jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=2), fn=fn, args=(x,)))
    got = jax.jit(lambda p, l: jaxlora.apply(fn, p, l, x))(params, lora)
    np.testing.assert_allclose(got, fn(jaxlora.merge(params, lora), x), rtol=1e-4, atol=1e-4)
    assert int(rest["drop"]["rngs"]["count"][...]) == 0


def test_an_nnx_model_is_itself_a_params_pytree():
    model, lora = _setup(["query", "mlp"])
    fn = lambda m, ids: m(ids)
    assert sorted(
        jaxlora.init(jax.random.key(1), model, jaxlora.LoraConfig(rank=2, targets="query"), fn=fn, args=(IDS,))
    ) == [
        "layers/0/attn/query",
        "layers/1/attn/query",
    ]
    np.testing.assert_allclose(jaxlora.apply(fn, model, lora, IDS), jaxlora.nnx.apply(model, lora, IDS), rtol=1e-6)
    assert isinstance(jaxlora.merge(model, lora), Model)


def test_summary_counts_nnx_params():
    model = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    lora = jaxlora.nnx.init(jax.random.key(1), model, jaxlora.LoraConfig(rank=4))
    s = jaxlora.nnx.summary(model, lora)
    assert (s.trainable, s.total) == (4 * (64 + 32), 64 * 32 + 32 + 4 * (64 + 32))


@pytest.mark.parametrize("verb", ["init", "apply", "merge", "unmerge", "summary"])
def test_model_verbs_refuse_a_non_module(verb):
    params = {"w": jnp.ones((4, 4))}
    args = {"init": (jax.random.key(0), params, jaxlora.LoraConfig(rank=2))}.get(verb, (params, {}))
    with pytest.raises(TypeError, match=rf"jaxlora.nnx.{verb} takes an nnx.Module, got dict.*use jaxlora.{verb}"):
        getattr(jaxlora.nnx, verb)(*args)


@pytest.mark.slow
def test_example_nnx_finetune():
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "nnx_finetune.py"
    spec = importlib.util.spec_from_file_location("nnx_finetune", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nnx_finetune"] = module
    spec.loader.exec_module(module)
    result = module.main(lora_steps=60, rank=4)
    assert result["loss_after"] < 0.5 * result["loss_before"], result
    assert result["merged_vs_unmerged_max_abs"] < 1e-4
    assert result["model_unchanged"]


def test_init_and_apply_pass_keyword_arguments():
    class Switch(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.LinearGeneral(D, (2, 3), rngs=rngs)
            self.b = nnx.Linear(D, D, rngs=rngs)

        def __call__(self, x, *, use_a: bool):
            return self.a(x) if use_a else self.b(x)

    model, x = Switch(nnx.Rngs(0)), jnp.ones((2, D))
    lora = jaxlora.nnx.init(jax.random.key(1), model, jaxlora.LoraConfig(rank=2), args=(x,), kwargs={"use_a": True})
    assert sorted(lora) == ["a"] and lora["a"].roles == "ioo"  # only what that call reaches
    lora = _nonzero_b(lora)
    got = jaxlora.nnx.apply(model, lora, x, use_a=True)
    np.testing.assert_allclose(got, jaxlora.nnx.merge(model, lora)(x, use_a=True), rtol=1e-5, atol=1e-5)


def test_nnx_transforms_inside_the_model(maybe_jit):
    class Inner(nnx.Module):  # nnx.jit, nnx.cond and nnx.remat hand the layer state back
        def __init__(self, rngs):
            self.a = nnx.Linear(D, D, rngs=rngs)
            self.b = nnx.LinearGeneral(D, (2, 3), rngs=rngs)

        def __call__(self, x):
            h = nnx.jit(lambda m, x: jnp.tanh(m(x)))(self.a, x)
            h = nnx.cond(x.sum() > 0, lambda m, h: m(h), lambda m, h: -m(h), self.b, h)
            return nnx.remat(lambda m, h: m(h))(self.a, h.reshape(2, D))

    model, x = Inner(nnx.Rngs(0)), jax.random.normal(jax.random.key(3), (2, D))
    lora = _nonzero_b(jaxlora.nnx.init(jax.random.key(1), model, jaxlora.LoraConfig(rank=2), args=(x,)))
    assert {p: f.roles for p, f in lora.items()} == {"a": "io", "b": "ioo"}
    got = maybe_jit(lambda m, l, x: jaxlora.nnx.apply(m, l, x))(model, lora, x)
    np.testing.assert_allclose(got, jaxlora.nnx.merge(model, lora)(x), rtol=1e-5, atol=1e-5)
