"""Training with real optax optimizers: only A and B change, and no optimizer state exists for W."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from linen_models import MODELS

import jaxlora


def _problem():
    model, make_x, _ = MODELS["dense_general_query"]
    x = make_x()
    params = model.init(jax.random.key(0), x)
    target = jnp.sin(model.apply(params, x))
    lora = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=2, alpha=4), fn=model.apply, args=(x,))
    loss = lambda params, lora: jnp.mean((jaxlora.apply(model.apply, params, lora, x) - target) ** 2)
    return params, lora, loss


def test_separate_trees_with_adamw():
    params, lora, loss = _problem()
    opt = optax.adamw(3e-2)
    state = opt.init(lora)

    @jax.jit
    def step(lora, state):
        value, grads = jax.value_and_grad(loss, argnums=1)(params, lora)
        updates, state = opt.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, value

    first = loss(params, lora)
    for _ in range(30):
        lora, state, _ = step(lora, state)
    assert loss(params, lora) < 0.7 * first
    assert isinstance(lora["query"], jaxlora.LoraFactors) and lora["query"].roles == "ioo"


def test_one_tree_with_mask_keeps_w_bit_identical():
    params, lora, loss = _problem()
    tree = {"base": params, "lora": lora}
    labels = jaxlora.mask(tree, trainable="lora", frozen="frozen")
    opt = optax.multi_transform({"lora": optax.adam(3e-2), "frozen": optax.set_to_zero()}, labels)
    state = opt.init(tree)
    # No optimizer state mirrors W: adam's moments exist for A and B only.
    sizes = [leaf.size for leaf in jax.tree.leaves(state)]
    assert sum(sizes) <= 2 * (lora["query"].a.size + lora["query"].b.size) + 10

    @jax.jit
    def step(tree, state):
        grads = jax.grad(lambda t: loss(t["base"], t["lora"]))(tree)
        updates, state = opt.update(grads, state, tree)
        return optax.apply_updates(tree, updates), state

    new = tree
    for _ in range(5):
        new, state = step(new, state)
    jax.tree.map(np.testing.assert_array_equal, new["base"], params)
    assert not np.allclose(new["lora"]["query"].b, 0.0)
    assert not np.allclose(new["lora"]["query"].a, lora["query"].a)


def test_boolean_mask_for_optax_masked():
    params, lora, _ = _problem()
    m = jaxlora.mask({"base": params, "lora": lora})
    assert m["lora"]["query"].a is True and m["base"]["params"]["query"]["kernel"] is False
    opt = optax.masked(optax.sgd(1.0), m)
    opt.init({"base": params, "lora": lora})  # structure accepted by optax


def test_loraplus_applies_two_learning_rates():
    params, lora, loss = _problem()
    lora = {p: jaxlora.LoraFactors(f.a, f.b + 0.1, f.scale, f.roles, f.dropout) for p, f in lora.items()}
    grads = jax.grad(loss, argnums=1)(params, lora)
    opt = jaxlora.loraplus(optax.sgd, 1e-2, ratio=16)
    updates, _ = opt.update(grads, opt.init(lora), lora)
    for p in lora:  # plain SGD: the update is -lr * g on A and -16 lr * g on B
        np.testing.assert_allclose(updates[p].a, -1e-2 * np.asarray(grads[p].a), rtol=1e-6)
        np.testing.assert_allclose(updates[p].b, -0.16 * np.asarray(grads[p].b), rtol=1e-6)
        assert np.abs(np.asarray(grads[p].b)).max() > 0


def test_loraplus_schedule_and_kwargs():
    params, lora, loss = _problem()
    grads = jax.grad(loss, argnums=1)(params, lora)
    opt = jaxlora.loraplus(optax.sgd, optax.linear_schedule(1.0, 0.0, 10), ratio=4, momentum=None)
    state = opt.init(lora)
    for step in range(3):  # lr(step) = 1 - step / 10 on A, 4x on B
        updates, state = opt.update(grads, state, lora)
        lr = 1.0 - step / 10
        np.testing.assert_allclose(updates["query"].a, -lr * np.asarray(grads["query"].a), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(updates["query"].b, -4 * lr * np.asarray(grads["query"].b), rtol=1e-5, atol=1e-12)
    labels = jaxlora.loraplus_labels({"q": lora["query"], "head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}})
    assert (labels["q"].a, labels["q"].b, labels["head"]["kernel"], labels["head"]["bias"]) == ("a", "b", "a", "b")


def test_loraplus_ratio_error():
    with pytest.raises(ValueError, match="ratio must be a positive number"):
        jaxlora.loraplus(optax.adam, 1e-3, ratio=0)


def test_loraplus_dora_magnitude_and_stack():
    """DoRA's m learns at B's rate (PEFT groups 1-D trainables with B); a stack's scale and rank are no leaves."""
    params = {"w": jax.random.normal(jax.random.key(0), (4, 6))}
    dora = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=2, dora=True))
    plain = jaxlora.init(jax.random.key(2), params, jaxlora.LoraConfig(rank=3))
    opt = jaxlora.loraplus(optax.sgd, 1e-2, ratio=8)
    grads = jax.tree.map(jnp.ones_like, dora)
    updates, _ = opt.update(grads, opt.init(dora), dora)
    np.testing.assert_allclose(updates["w"].m, -0.08 * np.ones(6), rtol=1e-6)
    np.testing.assert_allclose(updates["w"].a, -0.01 * np.ones((4, 2)), rtol=1e-6)
    stack = jaxlora.stack({"x": plain, "y": plain})
    grads = jax.tree.map(jnp.ones_like, stack)
    updates, _ = opt.update(grads, opt.init(stack), stack)
    np.testing.assert_allclose(updates.b["w"], -0.08 * np.ones(stack.b["w"].shape), rtol=1e-6)
    np.testing.assert_allclose(updates.a["w"], -0.01 * np.ones(stack.a["w"].shape), rtol=1e-6)
    assert len(jax.tree.leaves(updates)) == 2 and updates.scale == stack.scale  # a and b; scale and rank static
