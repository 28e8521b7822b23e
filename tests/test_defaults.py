"""The defaults on third-party naming (issue 27): tiny models written with the codebases' own names.

* gemma-style (Linen): Einsum modules whose weight is ``w`` (``attn/q_einsum/w``), MLP matrices named
  ``gating_einsum`` and ``linear``, RMSNorm ``scale``, an embedding table tied as the output head.
* MaxText-style (plain JAX, scanned): ``decoder/layers/...`` stacked ``(layers, ...)`` kernels, stacked
  norm scales ``(layers, d)``, an untied output head ``decoder/logits_dense`` (not named ``lm_head``).
* Hugging Face's ``FlaxConv1D`` (GPT-2): a 2-D ``kernel`` stored ``(out, in)``.
* Equinox-style: a pytree with a function field, ``weight`` leaves, stacked LayerNorm weights.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import _tree
from jaxlora._quantized import encode

V, D, H, K, F, L = 64, 32, 2, 16, 64, 3  # vocabulary, width, heads, head size, MLP width, layers
TOKENS = jnp.arange(8).reshape(2, 4) % V


def _rms(x, scale):
    return (
        x
        * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        * (1 + scale).reshape((1,) * (x.ndim - 1) + (-1,))
    )


class Einsum(nn.Module):  # gemma's and Tunix's Einsum: one weight, named "w"
    shape: tuple
    eq: str

    @nn.compact
    def __call__(self, x):
        return jnp.einsum(self.eq, x, self.param("w", nn.initializers.normal(0.2), self.shape))


class GemmaBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = _rms(x, self.param("pre_attention_norm", nn.initializers.zeros, (D,)))
        q = Einsum((H, D, K), "btd,hdk->bthk", name="q_einsum")(h)
        k, v = Einsum((2, H, D, K), "btd,chdk->cbthk", name="kv_einsum")(h)
        p = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k), axis=-1)
        x = x + Einsum((H, K, D), "bthk,hkd->btd", name="attn_vec_einsum")(jnp.einsum("bhts,bshk->bthk", p, v))
        h = _rms(x, self.param("pre_ffw_norm", nn.initializers.zeros, (D,)))
        gate, up = jnp.einsum("btd,cdf->cbtf", h, self.param("gating_einsum", nn.initializers.normal(0.2), (2, D, F)))
        return x + jax.nn.gelu(gate) * up @ self.param("linear", nn.initializers.normal(0.2), (F, D))


class Gemma(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        table = self.param("input_embedding", nn.initializers.normal(1.0), (V, D))
        x = jnp.take(table, tokens, axis=0)
        for i in range(2):
            x = GemmaBlock(name=f"layer_{i}")(x)
        return _rms(x, self.param("final_norm", nn.initializers.zeros, (D,))) @ table.T  # tied head


GEMMA = Gemma()
GEMMA_PARAMS = GEMMA.init(jax.random.key(0), TOKENS)


def maxtext_params():
    key = jax.random.key(1)
    n = lambda k, *s: jax.random.normal(k, s) / np.sqrt(s[-2])  # noqa: E731
    ks = jax.random.split(key, 6)
    layers = {
        "pre_self_attention_layer_norm": {"scale": jnp.ones((L, D))},
        "self_attention": {"query": {"kernel": n(ks[0], L, D, H, K)}, "out": {"kernel": n(ks[1], L, H, K, D)}},
        "mlp": {"wi": {"kernel": n(ks[2], L, D, F)}, "wo": {"kernel": n(ks[3], L, F, D)}},
    }
    return {
        "params": {
            "token_embedder": {"embedding": n(ks[4], V, D)},
            "decoder": {
                "layers": layers,
                "decoder_norm": {"scale": jnp.ones(D)},
                "logits_dense": {"kernel": n(ks[5], D, V)},
            },
        }
    }


def maxtext(params, tokens):
    p = params["params"]
    x = jnp.take(p["token_embedder"]["embedding"], tokens, axis=0)

    def layer(x, w):
        h = _rms(x, w["pre_self_attention_layer_norm"]["scale"])
        a = jnp.einsum("btd,dhk->bthk", h, w["self_attention"]["query"]["kernel"])
        x = x + jnp.einsum("bthk,hkd->btd", jnp.tanh(a), w["self_attention"]["out"]["kernel"])
        return x + jnp.tanh(x @ w["mlp"]["wi"]["kernel"]) @ w["mlp"]["wo"]["kernel"], None

    x = jax.lax.scan(layer, x, p["decoder"]["layers"])[0]
    return _rms(x, p["decoder"]["decoder_norm"]["scale"]) @ p["decoder"]["logits_dense"]["kernel"]


MAXTEXT_PARAMS = maxtext_params()


# --------------------------------------------------------------------------- quantize's default selection


def _quantized(q):
    return {p for p, w in _tree.weights(q).items() if isinstance(w.leaf, jaxlora.Quantized)}


def test_quantize_traced_gemma_einsums_not_tied_table_or_norms():
    q = jaxlora.quantize(GEMMA_PARAMS, "nf4", block_size=32, fn=GEMMA.apply, args=(TOKENS,))
    want = {f"layer_{i}/{m}" for i in range(2) for m in ("q_einsum/w", "kv_einsum/w", "attn_vec_einsum/w")}
    want |= {f"layer_{i}/{m}" for i in range(2) for m in ("gating_einsum", "linear")}
    assert _quantized(q) == want  # the tied table (lookup and head) and the norms stay float
    # a (d, heads, head_dim) Einsum is not a stack of d layers: its blocks run over the whole weight
    assert q["params"]["layer_0"]["q_einsum"]["w"].outer == ()
    got = jaxlora.apply(GEMMA.apply, q, {}, TOKENS)
    np.testing.assert_allclose(got, GEMMA.apply(jaxlora.dequantize(q), TOKENS), rtol=1e-5, atol=1e-5)


def test_quantize_untraced_default_on_gemma_names_raises_with_the_fix():
    with pytest.raises(ValueError, match=r"quantizes nothing in params.*Pass fn= \(and args=\)"):
        jaxlora.quantize(GEMMA_PARAMS, "nf4")


def test_quantize_traced_maxtext_stacked_kernels_not_head_norms_or_table():
    q = jaxlora.quantize(MAXTEXT_PARAMS, "nf4", block_size=32, fn=maxtext, args=(TOKENS,))
    layers = "decoder/layers"
    want = {f"{layers}/self_attention/query", f"{layers}/self_attention/out", f"{layers}/mlp/wi", f"{layers}/mlp/wo"}
    assert _quantized(q) == want  # not decoder/logits_dense, the embedding, the stacked (layers, d) norm scales
    assert q["params"]["decoder"]["layers"]["mlp"]["wi"]["kernel"].outer == (L,)  # scanned: one layer a slice
    got = jaxlora.apply(maxtext, q, {}, TOKENS)  # the stacked codes are sliced by the scan, layer by layer
    np.testing.assert_allclose(got, maxtext(jaxlora.dequantize(q), TOKENS), rtol=1e-5, atol=1e-5)


def test_quantize_untraced_keeps_its_name_rule():  # without fn: names, MaxText's head among the excluded ones
    q = jaxlora.quantize(MAXTEXT_PARAMS, "nf4", block_size=32)
    assert "decoder/logits_dense" not in _quantized(q) and "decoder/layers/mlp/wi" in _quantized(q)
    q = jaxlora.quantize(MAXTEXT_PARAMS, "nf4", block_size=32, exclude=())  # a head by any other name: fn knows
    assert "decoder/logits_dense" in _quantized(q)
    assert q["params"]["decoder"]["layers"]["mlp"]["wi"]["kernel"].outer == (L,)


def test_dense_general_bits_per_parameter():
    """A DenseGeneral (128, 4, 32) kernel: 4.13 bits a parameter traced, not 20.5 as 128 stacked slices."""
    model = nn.DenseGeneral((4, 32), use_bias=False)
    x = jnp.ones((2, 128))
    params = model.init(jax.random.key(0), x)
    traced = jaxlora.quantize(params, "nf4", fn=model.apply, args=(x,))
    assert round(jaxlora.bits_per_parameter(traced), 2) == 4.13
    assert jaxlora.bits_per_parameter(jaxlora.quantize(params, "nf4")) > 20  # untraced: counted as stacked


def test_quantize_block_size_error_names_the_leaf():
    with pytest.raises(
        ValueError, match=r"'layer_0/q_einsum/w': a slice .*\(1024 elements a slice here.*exclude='layer_0/q_einsum/w'"
    ):
        jaxlora.quantize(GEMMA_PARAMS, "nf4", block_size=48, fn=GEMMA.apply, args=(TOKENS,))
    model = nn.DenseGeneral((4, 8), use_bias=False)  # (128, 4, 8): 32 elements a "layer" when counted as stacked
    params = model.init(jax.random.key(0), jnp.ones((1, 128)))
    with pytest.raises(ValueError, match=r"'Dense_0': .*\(32 elements a slice here: one layer of the stack"):
        jaxlora.quantize({"Dense_0": params["params"]}, "nf4")
    jaxlora.quantize(params, "nf4", fn=model.apply, args=(jnp.ones((1, 128)),))  # traced: 4096 elements


def test_quantize_traced_selects_nothing_raises():
    params = {"table": jnp.ones((V, D))}
    with pytest.raises(ValueError, match=r"fn feeds no matmul with a weight"):
        jaxlora.quantize(params, "nf4", fn=lambda p, t: jnp.take(p["table"], t, axis=0), args=(TOKENS,))


def test_encode_stacked_is_checked():
    with pytest.raises(ValueError, match="stacked must be 0 or 1"):
        encode(jnp.ones((4, 64)), "nf4", stacked=2)


# --------------------------------------------------------------------------- "all-linear"


def test_all_linear_leaves_out_tied_table_and_output_head():
    config = jaxlora.LoraConfig(rank=2)  # targets="all-linear", the default
    lora = jaxlora.init(jax.random.key(0), GEMMA_PARAMS, config, fn=GEMMA.apply, args=(TOKENS,))
    assert "input_embedding" not in lora and len(lora) == 10  # the tied table is the head: left out, as PEFT
    lora = jaxlora.init(jax.random.key(0), MAXTEXT_PARAMS, config, fn=maxtext, args=(TOKENS,))
    assert sorted(lora) == sorted(f"decoder/layers/{m}" for m in ("self_attention/query", "self_attention/out",
                                                                 "mlp/wi", "mlp/wo"))  # fmt: skip
    # named, the head and the table are adapted (an explicit target wins)
    lora = jaxlora.init(jax.random.key(0), MAXTEXT_PARAMS, dataclasses.replace(config, targets=["logits_dense"]),
                        fn=maxtext, args=(TOKENS,))  # fmt: skip
    assert list(lora) == ["decoder/logits_dense"]


def test_all_linear_keeps_a_classifier_and_kv_cache_outputs():
    """Only a head over the vocabulary is left out (PEFT's output embedding); a classifier stays, and a
    projection whose output is also returned (a KV cache) but feeds attention is no head."""
    params = {"embed": jnp.ones((V, D)), "k": jnp.ones((D, D)), "cls": jnp.ones((D, 3))}

    def fn(p, t):
        x = jnp.take(p["embed"], t, axis=0)
        k = x @ p["k"]
        h = jax.nn.softmax(x @ k.swapaxes(-1, -2)) @ x
        return h.mean(1) @ p["cls"], k

    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2), fn=fn, args=(TOKENS,))
    assert sorted(lora) == ["cls", "k"]


# --------------------------------------------------------------------------- module paths and patterns


def test_regex_matches_einsum_modules_through_their_w_leaf():
    regex = r".*/(q_einsum|kv_einsum|attn_vec_einsum|gating_einsum|linear)"
    config = jaxlora.LoraConfig(rank=2, targets=regex)
    lora = jaxlora.init(jax.random.key(0), GEMMA_PARAMS, config, fn=GEMMA.apply, args=(TOKENS,))
    listed = jaxlora.LoraConfig(rank=2, targets=["q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "linear"])
    assert sorted(lora) == sorted(jaxlora.init(jax.random.key(0), GEMMA_PARAMS, listed, fn=GEMMA.apply, args=(TOKENS,)))
    assert len(lora) == 10 and "layer_0/q_einsum/w" in lora  # keys keep the leaf: saved adapters still fit
    ranked = jaxlora.LoraConfig(rank=2, targets=regex, rank_pattern={"q_einsum": 4}, exclude=["layer_1/linear"])
    lora = jaxlora.init(jax.random.key(0), GEMMA_PARAMS, ranked, fn=GEMMA.apply, args=(TOKENS,))
    assert lora["layer_0/q_einsum/w"].a.shape[-1] == 4 and "layer_1/linear" not in lora


PROJ = {"attn": {"q_proj": {"w_q": jnp.ones((D, D))}}, "mlp": {"up_proj": {"kernel": jnp.ones((D, F))}}}


def test_regex_missing_weights_inside_matched_modules_warns():
    config = jaxlora.LoraConfig(rank=2, targets=r".*(q_proj|up_proj)")
    with pytest.warns(
        UserWarning,
        match=r"not 1 weights that the same names in list form would: 'attn/q_proj/w_q' \(in 'attn/q_proj'\)",
    ):
        lora = jaxlora.init(jax.random.key(0), PROJ, config)
    assert list(lora) == ["mlp/up_proj"]
    params = {"q_proj": {"kernel": jnp.ones((D, D))}, "mlp": {"up_proj": {"kernel": jnp.ones((D, F))}}}
    with pytest.warns(UserWarning, match=r"'q_proj' \(at the top level\).*a leading '\.\*/' needs a parent"):
        lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, targets=r".*/(q_proj|up_proj)"))
    assert list(lora) == ["mlp/up_proj"]


def test_pattern_matching_only_a_module_says_so():
    with pytest.raises(ValueError, match=r"matches the module 'attn/q_proj' holding the weight 'attn/q_proj/w_q'"):
        jaxlora.init(jax.random.key(0), PROJ, jaxlora.LoraConfig(rank=2, targets=["q_proj"]))


# --------------------------------------------------------------------------- (out, in) kernels


class FlaxConv1D(nn.Module):  # Hugging Face's GPT-2 layer: kernel (features, in), used transposed
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.2), (self.features, x.shape[-1]))
        return jax.lax.dot_general(x, kernel.T, (((x.ndim - 1,), (0,)), ((), ())))


class GPT2Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return FlaxConv1D(D, name="c_proj")(jnp.tanh(FlaxConv1D(3 * D, name="c_attn")(x))[..., :D])


def test_out_in_kernel_untraced_is_refused_at_apply_traced_is_right():
    model, x = GPT2Attn(), jax.random.normal(jax.random.key(1), (2, 4, D))
    params = model.init(jax.random.key(0), x)
    config = jaxlora.LoraConfig(rank=2)
    untraced = jaxlora.init(jax.random.key(0), params, config)
    assert untraced["c_attn"].roles == "io"  # Flax's (in, out) guess: A would sit on the output side
    with pytest.raises(
        jaxlora.UnsupportedError, match=r"'c_attn'.*its output axes: a 'kernel' that fn looks up nowhere"
    ):
        jaxlora.apply(model.apply, params, untraced, x)
    lora = jaxlora.init(jax.random.key(0), params, config, fn=model.apply, args=(x,))
    assert lora["c_attn"].roles == "oi" and lora["c_attn"].a.shape == (D, 2) and lora["c_attn"].b.shape == (2, 3 * D)
    lora = {p: dataclasses.replace(f, b=jax.random.normal(jax.random.key(2), f.b.shape)) for p, f in lora.items()}
    w, f = params["params"]["c_attn"]["kernel"], lora["c_attn"]
    want = w + f.scale * (np.asarray(f.a) @ np.asarray(f.b)).T  # (out, in): ΔW transposed like W
    np.testing.assert_allclose(jaxlora.merge(params, lora)["params"]["c_attn"]["kernel"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jaxlora.apply(model.apply, params, lora, x), model.apply(jaxlora.merge(params, lora), x), rtol=1e-4, atol=1e-5
    )


def test_tied_table_attend_alone_still_works():  # a chunked loss: the head applied in a function of its own
    params = {"embed": {"embedding": jax.random.normal(jax.random.key(0), (V, D))}}
    body = lambda p, t: jnp.take(p["embed"]["embedding"], t, axis=0)  # noqa: E731
    head = lambda p, h: h @ p["embed"]["embedding"].T  # noqa: E731
    lora = jaxlora.init(
        jax.random.key(0), params, jaxlora.LoraConfig(rank=2, targets=["embed"]), fn=body, args=(TOKENS,)
    )
    lora = {p: dataclasses.replace(f, b=jnp.ones_like(f.b)) for p, f in lora.items()}
    h = jnp.ones((2, 4, D))
    np.testing.assert_allclose(
        jaxlora.apply(head, params, lora, h), head(jaxlora.merge(params, lora), h), rtol=1e-5, atol=1e-4
    )


# --------------------------------------------------------------------------- function fields (Equinox)


def _eqx_style():
    """An Equinox-style pytree: ``weight`` leaves (out, in), stacked LayerNorm weights, a function field."""
    ks = jax.random.split(jax.random.key(3), 3)
    params = {
        "embedding": {"weight": jax.random.normal(ks[0], (V, D))},
        "layers": {"ln": {"weight": jnp.ones((L, D))}, "linear": {"weight": jax.random.normal(ks[1], (L, D, D)) / 6}},
        "head": {"weight": jax.random.normal(ks[2], (3, D))},
        "activation": jax.nn.gelu,  # eqx.nn.MLP's activation field: not an array
    }

    def fn(p, t):
        x = p["embedding"]["weight"][t]
        step = lambda x, w: (
            p["activation"](jnp.einsum("oi,bti->bto", w["linear"]["weight"], x * w["ln"]["weight"][None, None])),
            None,
        )  # noqa: E731
        x = jax.lax.scan(step, x, p["layers"])[0]
        return jnp.einsum("oi,bi->bo", p["head"]["weight"], x.mean(1))

    return params, fn


def test_function_field_init_with_fn_and_quantize():
    params, fn = _eqx_style()
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2), fn=fn, args=(TOKENS,))
    assert sorted(lora) == ["head", "layers/linear"] and lora["layers/linear"].roles == "soi"
    np.testing.assert_array_equal(jaxlora.apply(fn, params, lora, TOKENS), fn(params, TOKENS))
    q = jaxlora.quantize(params, "nf4", block_size=32, fn=fn, args=(TOKENS,), exclude=())
    assert _quantized(q) == {"layers/linear", "head"}  # not the table, not the stacked (layers, d) norm weights
    assert "layers/ln" in _quantized(jaxlora.quantize(params, "nf4", block_size=32))  # the name rule would


def test_equinox_mlp_function_field():
    eqx = pytest.importorskip("equinox", reason="equinox is not installed")
    mlp = eqx.nn.MLP(D, 3, 16, depth=2, activation=jax.nn.gelu, key=jax.random.key(0))
    x = jnp.ones(D)
    lora = jaxlora.init(jax.random.key(0), mlp, jaxlora.LoraConfig(rank=2), fn=lambda m, x: m(x), args=(x,))
    assert sorted(lora) == ["layers/0", "layers/1", "layers/2"]
    np.testing.assert_array_equal(jaxlora.apply(lambda m, x: m(x), mlp, lora, x), mlp(x))


def test_all_linear_with_only_left_out_weights_says_why():
    def tied(p, t):
        table = p["table"]
        return jnp.take(table, t, axis=0) @ table.T

    with pytest.raises(
        ValueError, match=r"'all-linear' matches no weight: it leaves out 'table' \(a lookup table, tied"
    ):
        jaxlora.init(
            jax.random.key(0), {"table": jnp.ones((V, D))}, jaxlora.LoraConfig(rank=2), fn=tied, args=(TOKENS,)
        )


def test_output_head_through_einsum_and_not_through_a_scan():
    """A head written with ``jnp.einsum`` (a nested jit, inlined) and followed by a jitted ``log_softmax``
    is found; a projection whose output only
    leaves through a scan (its use inside unknown here) is not taken for a head."""
    ks = jax.random.split(jax.random.key(0), 3)
    params = {"embed": jax.random.normal(ks[0], (V, D)), "proj": jax.random.normal(ks[1], (D, V)),
              "stack": jax.random.normal(ks[2], (L, V, V)) / 8, "head": jnp.ones((D, V))}  # fmt: skip

    def lm(p, t):
        return jax.nn.log_softmax(jnp.einsum("btd,dv->btv", jnp.take(p["embed"], t, axis=0), p["head"]))

    def scanned(p, t):
        x = jnp.take(p["embed"], t, axis=0) @ p["proj"]
        return jax.lax.scan(lambda h, w: (h @ w, None), x, p["stack"])[0]

    config = jaxlora.LoraConfig(rank=2)
    with pytest.raises(ValueError, match=r"leaves out 'head' \(the output head: its matmul alone"):
        jaxlora.init(jax.random.key(0), params, config, fn=lm, args=(TOKENS,))
    assert sorted(jaxlora.init(jax.random.key(0), params, config, fn=scanned, args=(TOKENS,))) == ["proj", "stack"]
