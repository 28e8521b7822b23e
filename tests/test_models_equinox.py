"""An Equinox transformer (scanned blocks of eqx.nn.MultiheadAttention, LayerNorm and eqx.nn.MLP) on a tiny
random config. Equinox's Linear stores ``weight`` as ``(out, in)``; the blocks are stacked ``(layers, ...)``
by ``eqx.filter_vmap`` and run with ``lax.scan``.
"""

import jax
import jax.numpy as jnp
import pytest
from models_common import (  # noqa: F401 (allow_rank_promotion: an autouse fixture)
    Case,
    allow_rank_promotion,
    check_b0,
    check_grad,
    check_merge,
    check_nf4,
    check_stack,
    make_case,
    quantized_leaves,
)

import jaxlora

eqx = pytest.importorskip("equinox", reason="equinox not installed (the models extra)")

V, D, HEADS, LAYERS = 64, 32, 4, 2


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP  # its activation (jax.nn.gelu) is a function field

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(D), eqx.nn.LayerNorm(D)
        self.attn = eqx.nn.MultiheadAttention(HEADS, D, key=k1)
        self.mlp = eqx.nn.MLP(D, D, 2 * D, depth=1, activation=jax.nn.gelu, key=k2)

    def __call__(self, x):  # x: (T, D)
        h = jax.vmap(self.ln1)(x)
        mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        x = x + self.attn(h, h, h, mask=mask)
        return x + jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))


class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: Block  # stacked: every array leaf has a leading (LAYERS,) axis
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(V, D, key=k1)
        self.blocks = eqx.filter_vmap(Block)(jax.random.split(k2, LAYERS))
        self.ln_f = eqx.nn.LayerNorm(D)
        self.head = eqx.nn.Linear(D, V, key=k3)

    def __call__(self, tokens):  # tokens: (T,) -> logits (T, V)
        x = jax.vmap(self.embed)(tokens)
        arrays, static = eqx.partition(self.blocks, eqx.is_array)
        x, _ = jax.lax.scan(lambda x, b: (eqx.combine(b, static)(x), None), x, arrays)
        return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))


MODEL = Transformer(jax.random.key(0))
PARAMS, STATIC = eqx.partition(MODEL, eqx.is_array)  # the user's split: arrays vs functions and config


def _fn(params, tokens):  # tokens: (batch, T)
    return jax.vmap(eqx.combine(params, STATIC))(tokens)


def _tokens():
    return jax.random.randint(jax.random.key(1), (2, 6), 0, V)


@pytest.fixture(scope="module")
def case() -> Case:
    config = jaxlora.LoraConfig(rank=4, alpha=8, targets="all-linear")
    return make_case(_fn, PARAMS, (_tokens(),), config, "equinox")


def test_module_paths(case):
    # the scanned blocks' projections, the MLP's two layers and the head; all stacked but the head
    assert sorted(case.lora) == [
        "blocks/attn/key_proj", "blocks/attn/output_proj", "blocks/attn/query_proj", "blocks/attn/value_proj",
        "blocks/mlp/layers/0", "blocks/mlp/layers/1", "head",
    ]  # fmt: skip
    assert case.lora["blocks/attn/query_proj"].roles == "soi" and case.lora["head"].roles == "oi"


def test_b0_is_base(case):
    check_b0(case, eager=True)


def test_merge_equals_apply(case):
    check_merge(case)


def test_jit_grad(case):
    check_grad(case)


def test_mixed_adapter_batch(case):
    check_stack(case)


def test_nf4_base(case):
    check_nf4(case)


def test_init_takes_the_model_itself(case):
    """The model itself as params (its activation a function leaf), as apply accepts: non-arrays are static."""
    fn = lambda model, tokens: jax.vmap(model)(tokens)  # noqa: E731
    lora = jaxlora.init(jax.random.key(0), MODEL, case.config, fn=fn, args=case.args)
    assert sorted(lora) == sorted(case.lora)


def test_quantize_default_keeps_norms_and_embedding_float(case):
    """Given fn, stacked LayerNorm weights (layers, d) and the embedding table (2-axis `weight` leaves) stay float."""
    got = quantized_leaves(jaxlora.quantize(PARAMS, "nf4", block_size=16, fn=case.fn, args=case.args))
    assert got and not [p for p in got if "ln" in p or "embed" in p], got
