"""Every ```python block of README.md runs as written.

A block runs after a small prelude (below, one per block, in README order) that makes what the
README's prose assumes: ``model``, ``params``, ``x``, a ``batch``; a Linen model whose module paths
(``encoder/layer_0/query``) match the README's. A block preceded by an
``<!-- illustrative: FILE (TEST) -->`` comment needs a mesh or a training loop; it names its tested
twin, which this test checks is run by that test file.
"""

import os
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?:<!-- illustrative: (?P<twin>\S+) \((?P<test>\S+)\) -->\n)?```python\n(?P<code>.*?)```", re.S)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, v = nn.Dense(16, name="query")(x), nn.Dense(16, name="value")(x)
        return x + nn.Dense(16, name="out")(jnp.tanh(q) * v)


class _Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = _Layer(name=f"layer_{i}")(x)
        return x


class _Model(nn.Module):  # module paths encoder/layer_{0,1}/{query,value,out}, head
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="head")(_Encoder(name="encoder")(x))


def _linen():
    model, x = _Model(), jax.random.normal(jax.random.key(0), (4, 8, 16))
    batch = {"x": x, "y": jnp.arange(32).reshape(4, 8) % 5}
    return dict(model=model, x=x, batch=batch, params=model.init(jax.random.key(1), x), jax=jax, jnp=jnp)


def _nnx():
    from flax import nnx

    import jaxlora

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.query, self.value = nnx.Linear(16, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)

        def __call__(self, x):
            return self.value(jnp.tanh(self.query(x)))

    return dict(model=Model(nnx.Rngs(0)), x=jnp.ones((2, 16)), key=jax.random.key(0), jaxlora=jaxlora,
                config=jaxlora.LoraConfig(rank=4, targets=["query", "value"]))  # fmt: skip


def _checkpoints():
    import optax
    import orbax.checkpoint as ocp

    import jaxlora

    env = _linen()
    config = jaxlora.LoraConfig(rank=4, alpha=8, targets=r".*/(query|value)")
    lora = jaxlora.init(jax.random.key(2), env["params"], config)
    opt_state = optax.adam(1e-3).init(lora)
    return dict(env, os=os, ocp=ocp, jaxlora=jaxlora, config=config, lora=lora, step=1, opt_state=opt_state,
                abstract_opt=jax.eval_shape(lambda: opt_state))  # fmt: skip


def _variants():  # the "LoRA variants" section's set-up block, run as the README reads it
    setup = next(b["code"] for b in _blocks() if "class Classifier" in b["code"])
    env: dict = {}
    exec(compile(setup, "README.md LoRA variants set-up", "exec"), env)
    return env


# one per runnable block, in README order
PRELUDES = [_linen, _nnx, dict, _variants, _variants, _variants, _variants, _checkpoints]


def _blocks():
    return list(BLOCK.finditer((ROOT / "README.md").read_text()))


def test_every_block_is_run_or_has_a_tested_twin():
    blocks = _blocks()
    runnable = [b for b in blocks if not b["twin"]]
    assert len(runnable) == len(PRELUDES), f"{len(runnable)} runnable README blocks, {len(PRELUDES)} preludes"
    for b in blocks:
        if b["twin"]:
            assert (ROOT / b["twin"]).is_file(), b["twin"]
            assert pathlib.Path(b["twin"]).stem in (ROOT / b["test"]).read_text(), (b["twin"], b["test"])


@pytest.mark.parametrize("i", range(len(PRELUDES)))
def test_readme_block_runs(i, tmp_path, monkeypatch, capsys):
    code = [b for b in _blocks() if not b["twin"]][i]["code"]
    monkeypatch.chdir(tmp_path)  # the blocks write run/, hf_adapter/, model.safetensors, ...
    exec(compile(code, f"README.md block {i}", "exec"), PRELUDES[i]())
