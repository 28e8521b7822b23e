"""New adapter values (same shapes) never recompile a jitted training step or inference function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import jaxlora

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_counter = {"active": False, "n": 0}


def _listener(event, duration, **kwargs):
    if _counter["active"] and event == _COMPILE_EVENT:
        _counter["n"] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


@pytest.fixture
def compiles():
    """Counts XLA backend compilations (jax.monitoring, a public API) while the test runs."""
    _counter.update(active=True, n=0)
    yield lambda: _counter["n"]
    _counter["active"] = False


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + nn.Dense(8, name="mlp")(jnp.tanh(h)), None

        h = nn.Dense(8, name="inp")(x)
        h, _ = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(
            h, None
        )
        return nn.Dense(3, name="out")(h)


def _setup():
    model, x = Net(), jnp.ones((4, 5))
    params = model.init(jax.random.key(0), x)
    config = jaxlora.LoraConfig(rank=2, targets=["inp", "mlp", "out"], dropout=0.1)
    lora = jaxlora.init(jax.random.key(1), params, config, fn=model.apply, args=(x,))
    return model, x, params, lora


def _other_values(lora, seed):
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)])


def test_training_step_compiles_once(compiles):
    model, x, params, lora = _setup()
    opt = optax.adamw(1e-3)

    @jax.jit
    def step(lora, opt_state, params, x, key):
        def loss(lora):
            return jnp.mean(jaxlora.apply(model.apply, params, lora, x, dropout_key=key) ** 2)

        value, grads = jax.value_and_grad(loss)(lora)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value

    fresh = [_other_values(lora, seed) for seed in range(3)]  # made before counting: eager ops compile too
    inputs = [(f, opt.init(f), jax.random.key(seed)) for seed, f in enumerate(fresh)]
    state = (lora, opt.init(lora))
    n0 = compiles()
    state = step(*state, params, x, jax.random.key(9))[:2]
    first = compiles()
    assert first == n0 + 1
    for f, f_state, key in inputs:  # updated factors, fresh adapters of the same shapes, new dropout keys
        state = step(*state, params, x, key)[:2]
        step(f, f_state, params, x, key)
    assert compiles() == first


def test_inference_compiles_once(compiles):
    model, x, params, lora = _setup()
    fwd = jax.jit(lambda p, l, x: jaxlora.apply(model.apply, p, l, x))
    fresh = [_other_values(lora, seed) for seed in range(3)]
    n0 = compiles()
    with pytest.warns(UserWarning, match="LoRA dropout is off"):  # an eval step: traced once, so warned once
        y0 = fwd(params, lora, x)
    first = compiles()
    assert first == n0 + 1
    ys = [fwd(params, f, x) for f in fresh]
    assert compiles() == first
    assert not any(bool(jnp.allclose(y, y0)) for y in ys)  # the new values did reach the output
