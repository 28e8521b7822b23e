"""`summary` reproduces the trainable-parameter counts of Hu et al. 2021 (Tables 2 and 4) from shapes alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxlora


class Layer(nn.Module):
    d: int
    ff: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(self.d, name=n)(h) for n in ("query", "key", "value"))
        a = jax.nn.softmax(q @ k.swapaxes(-1, -2) / self.d**0.5) @ v
        x = x + nn.Dense(self.d, name="output")(a)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(self.d, name="fc2")(nn.gelu(nn.Dense(self.ff, name="fc1")(h)))


class Transformer(nn.Module):
    layers: int
    d: int
    ff: int
    vocab: int

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d, name="embed")(ids)
        for i in range(self.layers):
            x = Layer(self.d, self.ff, name=f"layer_{i}")(x)
        return x


@pytest.mark.parametrize(
    "layers, d, vocab, rank, trainable, paper_millions, total_billions",
    [
        (12, 768, 50265, 8, 294_912, 0.3, 0.124),  # RoBERTa-base, Table 2
        (24, 1024, 50265, 8, 786_432, 0.8, 0.353),  # RoBERTa-large, Table 2
        (96, 12288, 50257, 1, 4_718_592, 4.7, 174.6),  # GPT-3 175B, Table 4
        (96, 12288, 50257, 8, 37_748_736, 37.7, 174.6),
    ],
)
def test_paper_counts(layers, d, vocab, rank, trainable, paper_millions, total_billions):
    model = Transformer(layers, d, 4 * d, vocab)
    params = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
    config = jaxlora.LoraConfig(rank=rank, alpha=rank, targets=r".*/(query|value)")
    lora = jax.eval_shape(lambda: jaxlora.init(jax.random.key(0), params, config))  # nothing materialised
    s = jaxlora.summary(params, lora)
    assert s.trainable == trainable
    assert round(s.trainable / 1e6, 1) == paper_millions
    assert len(s.modules) == 2 * layers and s.modules[0].path == "layer_0/query"
    assert abs(s.total / 1e9 - total_billions) / total_billions < 0.01
    assert f"trainable params: {trainable:,} || all params: {s.total:,} || trainable%:" in str(s)
