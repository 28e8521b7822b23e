"""Every bad input gets an error that names the problem and the fix."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from linen_models import MODELS

import jaxlora


def _params():
    return {"params": {"encoder": {"query": {"kernel": jnp.zeros((8, 8))}, "value": {"kernel": jnp.zeros((8, 8))}}}}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank must be a positive int"),
        (dict(rank=-3), "rank must be a positive int"),
        (dict(rank=2.5), "rank must be a positive int"),
        (dict(alpha=-1), "alpha must be a positive number"),
        (dict(dtype=jnp.int32), "dtype must be floating"),
        (dict(dtype="not-a-dtype"), "is not a dtype"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(init="xavier"), 'init must be "kaiming" or "gaussian"'),
        (dict(targets=[]), "targets is empty"),
        (dict(targets="(unclosed"), "not a valid regex"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be a positive int"),
        (dict(rank_pattern=[("q", 2)]), "must be a dict from regex to number"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        jaxlora.LoraConfig(**kwargs)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError, match="(?s)rank must be.*dropout must be"):
        jaxlora.LoraConfig(rank=0, dropout=2.0)


def test_unknown_target_names_the_closest_paths():
    with pytest.raises(
        ValueError, match=r"target 'querry' matches no adaptable weight; closest module paths: \['encoder/query'"
    ):
        jaxlora.init(jax.random.key(0), _params(), jaxlora.LoraConfig(targets=["querry", "value"]))


@pytest.mark.parametrize(
    "target, params, why",
    [  # the README's own pattern on a model whose query/value sit at the top level
        (r".*/(query|value)", {"query": {"kernel": jnp.zeros((4, 4))}, "value": {"kernel": jnp.zeros((4, 4))}},
         r"'\.\*/' requires a parent module, but \['query', 'value'\] are at the top level.*write '\(query\|value\)'"),
        ("encoder/query/kernel", None, r"module paths drop the leaf name 'kernel'.*write 'encoder/query'"),
        ("Query", None, r"\['encoder/query'\] differ only in case"),
        ("uery", None, r"must match a whole module path or a whole trailing part"),
    ],
)  # fmt: skip
def test_unmatched_target_says_why_a_near_match_failed(target, params, why):
    with pytest.raises(ValueError, match=why):
        jaxlora.init(jax.random.key(0), params or _params(), jaxlora.LoraConfig(targets=target))


def test_everything_excluded():
    with pytest.raises(ValueError, match="Every targeted module is excluded"):
        jaxlora.init(jax.random.key(0), _params(), jaxlora.LoraConfig(targets="query", exclude=".*query"))


def test_rank_larger_than_weight_allows():
    params = {"params": {"thin": {"kernel": jnp.zeros((64, 4))}}}
    with pytest.raises(
        ValueError, match=r"'thin': rank 8 exceeds min\(inputs=64, outputs=4\).*rank_pattern=\{'thin': 4\}"
    ):
        jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=8))


def test_ambiguous_layout_without_a_trace_says_what_to_pass():
    model, make_x, _ = MODELS["dense_general_query"]
    params = model.init(jax.random.key(0), make_x())
    with pytest.raises(ValueError, match=r"'query'.*shape \(6, 3, 4\).*fn=model.apply, args=\(x,\)"):
        jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))


def test_lora_tree_that_does_not_fit_params():
    params = _params()
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    other = {"params": {"encoder": {"query": {"kernel": jnp.zeros((8, 16))}}}}
    with pytest.raises(
        ValueError,
        match=r"(?s)does not fit params.*'encoder/query': weight \(8, 16\) needs a \(8, 2\) and b \(2, 16\), "
        r"got a \(8, 2\) and b \(2, 8\).*'encoder/value' is not an adaptable weight",
    ):
        jaxlora.merge(other, lora)
    with pytest.raises(ValueError, match="does not fit params"):
        jaxlora.apply(lambda p, x: x @ p["params"]["encoder"]["query"]["kernel"], other, lora, jnp.ones((1, 8)))
    with pytest.raises(TypeError, match="lora must be the dict"):
        jaxlora.merge(params, [1, 2])
    with pytest.raises(ValueError, match="expected LoraFactors"):
        jaxlora.summary(params, {"encoder/query": (1, 2)})


def test_module_name_with_separator_is_rejected():
    with pytest.raises(ValueError, match="contain '/'"):
        jaxlora.init(jax.random.key(0), {"a/b": jnp.zeros((4, 4))}, jaxlora.LoraConfig(rank=2))


def test_weight_reaching_an_unsupported_op():
    params = {"w": jnp.ones((4, 4))}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    fn = lambda p, x: jnp.sin(p["w"]) @ x  # elementwise op on the weight: no factored form
    with pytest.raises(jaxlora.UnsupportedError, match=r"'w' is used by `sin`.*unsupported=\"merge\""):
        jaxlora.apply(fn, params, lora, jnp.ones(4))
    with pytest.raises(ValueError, match="unsupported must be one of"):
        jaxlora.apply(fn, params, lora, jnp.ones(4), unsupported="ignore")


def test_unsupported_merge_fallback_uses_the_merged_weight():
    params = {"w": jnp.ones((4, 4))}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    lora = {"w": jaxlora.LoraFactors(lora["w"].a, jnp.ones((2, 4)), 1.0, "io")}
    fn = lambda p, x: jnp.sin(p["w"]) @ x
    got = jaxlora.apply(fn, params, lora, jnp.ones(4), unsupported="merge")
    assert jnp.allclose(got, fn(jaxlora.merge(params, lora), jnp.ones(4)))


def test_grouped_conv_is_refused_with_the_module_named():
    class Depthwise(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(8, (3,), feature_group_count=4, name="dw")(x)

    x = jnp.ones((1, 9, 4))
    params = Depthwise().init(jax.random.key(0), x)
    config = jaxlora.LoraConfig(rank=1, targets="dw")
    with pytest.raises(
        ValueError,
        match=r"matches only weights LoRA cannot adapt: 'dw' \(Conv\) is the kernel of a grouped convolution",
    ):
        jaxlora.init(jax.random.key(0), params, config, fn=Depthwise().apply, args=(x,))
    lora = {"dw": jaxlora.LoraFactors(jnp.zeros((3, 1, 1)), jnp.zeros((1, 8)), 1.0, "iio")}  # made by hand
    with pytest.raises(jaxlora.UnsupportedError, match="'dw' is the kernel of a grouped convolution"):
        jaxlora.apply(Depthwise().apply, params, lora, x)


def test_weight_never_reaching_a_matmul_is_not_a_target():
    fn = lambda p, x: x * p["gain"].sum() + x @ p["w"]
    params = {"gain": jnp.ones((3, 3)), "w": jnp.ones((3, 3))}
    with pytest.raises(
        ValueError, match="target 'gain' matches only weights LoRA cannot adapt: 'gain' is used by `reduce_sum`"
    ):
        jaxlora.init(
            jax.random.key(0), params, jaxlora.LoraConfig(rank=1, targets=["gain"]), fn=fn, args=(jnp.ones(3),)
        )


def test_factors_made_for_another_layout():
    params = {"w": jnp.ones((4, 4))}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    fn = lambda p, x: jnp.einsum("ij,ij->i", p["w"], x)  # batch over both axes: no rank-r form
    with pytest.raises(jaxlora.UnsupportedError, match="'w'.*used by `dot_general`.*jaxlora.init"):
        jaxlora.apply(fn, params, lora, jnp.ones((4, 4)))


def test_merge_needs_real_weights():
    params = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    with pytest.raises(TypeError, match="merge needs real weights"):
        jaxlora.merge(params, lora)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_config_refuses_non_finite_alpha(value):
    with pytest.raises(ValueError, match=r"alpha must be a positive number .*and finite; got (nan|inf|-inf)"):
        jaxlora.LoraConfig(alpha=value)
    with pytest.raises(ValueError, match=r"alpha_pattern\['q'\] must be a positive number, and finite"):
        jaxlora.LoraConfig(alpha_pattern={"q": value})
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        jaxlora.LoraConfig(dropout=value)


def test_apply_refuses_abstract_values_outside_eval_shape():
    params = {"w": jnp.ones((4, 6))}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    x = jnp.ones((1, 4))
    abstract = jax.eval_shape(lambda: params)
    with pytest.raises(TypeError, match=r"abstract values \(jax.ShapeDtypeStruct\) at \['params'\]\['w'\].*eval_shape"):
        jaxlora.apply(fn, abstract, lora, x)
    with pytest.raises(TypeError, match=r"at \['args'\]\[0\], \['lora'\]\['w'\].a, \['lora'\]\['w'\].b"):
        jaxlora.apply(fn, params, jax.eval_shape(lambda: lora), jax.ShapeDtypeStruct((1, 4), jnp.float32))
    out = jax.eval_shape(lambda p: jaxlora.apply(fn, p, lora, x), abstract)  # the way the error suggests
    assert out.shape == (1, 6)
