"""Training with real optax optimizers: only A and B change, and no optimizer state exists for W."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
