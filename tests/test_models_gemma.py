"""The ``gemma`` library's Gemma3 (Linen) on a tiny random config, and its own LoRA (``gm.nn.LoRA``).

gemma 4.x needs Python 3.12 (and imports kauldron, hence TensorFlow): .ci/run installs it there
(the models extra); elsewhere this module skips with the reason.
"""

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
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
    randomize,
    rel_close,
)

import jaxlora

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    gm = pytest.importorskip("gemma.gm", reason="gemma not installed (the models extra, Python 3.12: .ci/run)")
    try:  # the lazy import of the model code: kauldron, TensorFlow, grain
        from gemma.gm.nn import _config

        gm.nn.Gemma3_270M  # noqa: B018
    except (ImportError, AttributeError) as e:  # gemma 3.x's kauldron on jax >= 0.10: AttributeError
        pytest.skip(
            f"gemma is installed but its model code does not import: {e!r} (.ci/gemma-py312.txt)",
            allow_module_level=True,
        )

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

V = 64
CONFIG = dataclasses.replace(
    gm.nn.Gemma3_270M.config,
    num_embed=V, embed_dim=32, hidden_dim=64, num_heads=2, head_dim=8, num_kv_heads=1, sliding_window_size=4,
    attention_types=_config.make_attention_layers_types(gm.nn._gemma.GEMMA3_ATTENTION_PATTERN, num_layers=1),
)  # fmt: skip
MODEL = gm.nn.Transformer(config=CONFIG, dtype=jnp.float32)


def _tokens():
    return jax.random.randint(jax.random.key(1), (2, 6), 0, V)


def _fn(params, tokens):
    return MODEL.apply(params, tokens).logits


@pytest.fixture(scope="module")
def case() -> Case:
    params = MODEL.init(jax.random.key(0), _tokens())
    return make_case(_fn, params, (_tokens(),), jaxlora.LoraConfig(rank=4, alpha=8, targets="all-linear"), "gemma3")


def test_b0_is_base(case):
    check_b0(case)


def test_merge_equals_apply(case):
    check_merge(case)


def test_jit_grad(case):
    check_grad(case)


def test_mixed_adapter_batch(case):
    check_stack(case)


def test_nf4_base(case):
    check_nf4(case)


def test_equals_gm_nn_lora(case):
    """gm.nn.LoRA (scale 1) from the same factors: the same logits and the same gradients."""
    lmodel = gm.nn.LoRA(rank=4, model=MODEL, dtype=jnp.float32)
    lparams = lmodel.init(jax.random.key(0), _tokens())
    flat = {jax.tree_util.keystr(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(lparams)[0]}
    # gemma's wrapper sits beside the weight: attn/q_einsum/_LoRAEinsum_0/lora/{a,b} for attn/q_einsum/w,
    # mlp/_LoRAEinsum_linear/lora/{a,b} for mlp/linear
    where = {}
    for kp, _ in jax.tree_util.tree_flatten_with_path(lparams)[0]:
        names = [str(k.key) for k in kp][1:]
        if "lora" not in names:
            continue
        i = names.index("lora")
        owner = names[i - 1]
        weight = names[: i - 1] + (["w"] if owner == "_LoRAEinsum_0" else [owner.removeprefix("_LoRAEinsum_")])
        key = jaxlora.module_path(["params", *weight])
        where.setdefault(key, {})[names[-1]] = jax.tree_util.keystr(kp)
    config = jaxlora.LoraConfig(rank=4, alpha=4, targets=[re.escape(k) for k in sorted(where)])
    lora = randomize(jaxlora.init(jax.random.key(0), case.params, config, fn=_fn, args=(_tokens(),)), 8, std=0.2)
    assert sorted(lora) == sorted(where) and len(lora) == 5, (sorted(lora), sorted(where))

    def to_gemma(lora):
        new = dict(flat)
        for key, f in lora.items():
            for ab in "ab":
                x = getattr(f, ab)
                assert x.shape == new[where[key][ab]].shape, (key, ab, x.shape, new[where[key][ab]].shape)
                new[where[key][ab]] = x
        return jax.tree_util.tree_unflatten(jax.tree.structure(lparams), [new[k] for k in flat])

    tok = _tokens()
    theirs = lambda p, tok: lmodel.apply(p, tok).logits  # noqa: E731
    rel_close(case.run(case.params, lora, tok), jax.jit(theirs)(to_gemma(lora), tok))
    loss = lambda out: jnp.mean(jnp.square(out))  # noqa: E731
    g = jax.jit(jax.grad(lambda l, p, tok: loss(jaxlora.apply(_fn, p, l, tok))))(lora, case.params, tok)
    gg = jax.jit(jax.grad(lambda p, tok: loss(theirs(p, tok))))(to_gemma(lora), tok)
    gflat = {jax.tree_util.keystr(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(gg)[0]}
    scale = max(float(jnp.abs(gflat[w[ab]]).max()) for w in where.values() for ab in "ab")
    for key, f in g.items():
        for ab in "ab":
            np.testing.assert_allclose(getattr(f, ab), gflat[where[key][ab]], rtol=1e-4, atol=1e-5 * scale)


def test_quantize_default_is_not_silent(case):
    """gemma's matrices are `w`, `gating_einsum`, `linear`: a name-based default that selects none must raise."""
    try:
        q = jaxlora.quantize(case.params, "nf4", block_size=16)
    except ValueError:
        return
    assert quantized_leaves(q), "quantize returned the model with no weight quantized, silently"


def test_regex_of_einsum_names_adapts_attention(case):
    """The natural regex over gemma's layer names adapts the attention Einsums (paths `attn/q_einsum/w`)."""
    config = jaxlora.LoraConfig(rank=2, targets=r".*/(q_einsum|kv_einsum|attn_vec_einsum|gating_einsum|linear)")
    lora = jaxlora.init(jax.random.key(0), case.params, config, fn=case.fn, args=case.args)
    assert len(lora) == 5, sorted(lora)
