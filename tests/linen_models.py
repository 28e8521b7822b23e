"""Small Flax Linen models, one per layer kind jaxlora adapts, with inputs to call them on."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(7, name="proj")(x)


class DenseGeneralQuery(nn.Module):  # kernel (d_model, heads, head_dim)
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral((3, 4), name="query")(x)


class DenseGeneralOut(nn.Module):  # kernel (heads, head_dim, d_model)
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral(6, axis=(-2, -1), name="out")(x)


class Einsum(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((6, 3, 4), "btd,dnh->btnh", name="qkv")(x)


class EmbedLookup(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(11, 6, name="embed")(ids)


class EmbedTied(nn.Module):  # lookup and attend (logits) through one table
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(11, 6, name="embed")
        return embed.attend(jnp.tanh(embed(ids)))


class Conv1D(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(5, (3,), name="conv")(x)


class Conv2D(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(5, (3, 3), padding="SAME", name="conv")(x)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(6, name="mlp")(jnp.tanh(x)), None


class Scanned(nn.Module):  # kernels (layers, in, out)
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack(name="layers")(x, None)[0]


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.remat(nn.Dense)(7, name="proj")(jnp.tanh(nn.remat(nn.Dense)(6, name="hidden")(x)))


def _x(*shape):
    return jax.random.normal(jax.random.key(1), shape)


def _ids(*shape):
    return jax.random.randint(jax.random.key(1), shape, 0, 11)


# name -> (model, input, the module path targeted)
MODELS = {
    "dense": (Dense(), lambda: _x(2, 5, 6), "proj"),
    "dense_general_query": (DenseGeneralQuery(), lambda: _x(2, 5, 6), "query"),
    "dense_general_out": (DenseGeneralOut(), lambda: _x(2, 5, 3, 4), "out"),
    "einsum": (Einsum(), lambda: _x(2, 5, 6), "qkv"),
    "embed": (EmbedLookup(), lambda: _ids(2, 5), "embed"),
    "embed_tied": (EmbedTied(), lambda: _ids(2, 5), "embed"),
    "conv1d": (Conv1D(), lambda: _x(2, 9, 4), "conv"),
    "conv2d": (Conv2D(), lambda: _x(2, 7, 7, 4), "conv"),
    "scan": (Scanned(), lambda: _x(2, 5, 6), "layers/mlp"),
    "remat": (Remat(), lambda: _x(2, 5, 6), "(proj|hidden)"),
}
