"""Tunix's NNX models (Qwen3, Llama3, Gemma3) on tiny random configs, and Tunix's own LoRA (qwix).

Needs the ``models`` extra (google-tunix, qwix); skips with the reason where it is not installed.
One model of each kind per module (built once); each check is in tests/models_common.py.
"""

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

pytest.importorskip("tunix", reason="google-tunix not installed (the models extra: pip install -e '.[models]')")
qwix = pytest.importorskip("qwix", reason="qwix not installed (the models extra)")
with warnings.catch_warnings():  # tunix 0.1.7 imports jax.experimental.shard_map, deprecated since jax 0.8
    warnings.simplefilter("ignore", DeprecationWarning)
    from tunix.models.gemma3 import model as gemma3
    from tunix.models.llama3 import model as llama3
    from tunix.models.qwen3 import model as qwen3
from flax import nnx  # noqa: E402

# Tunix and qwix call APIs that jax and flax deprecate (shard_map's old home, Variable(sharding=...)).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

B, L, V = 2, 6, 64
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _build(name: str):
    if name == "qwen3":
        cfg = qwen3.ModelConfig(
            num_layers=1, vocab_size=V, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2,
            rope_theta=10_000, norm_eps=1e-6,
        )  # fmt: skip
        return qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)), cfg
    if name == "llama3":
        cfg = llama3.ModelConfig(
            num_layers=1, vocab_size=V, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2,
            rope_theta=10_000, norm_eps=1e-6,
        )  # fmt: skip
        return llama3.Llama3(cfg, rngs=nnx.Rngs(0)), cfg
    cfg = gemma3.ModelConfig(
        num_layers=1, num_embed=V, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2,
        sliding_window_size=4, param_dtype=jnp.float32,
    )  # fmt: skip
    return gemma3.Gemma3(cfg, rngs=nnx.Rngs(0)), cfg


def _inputs():
    tok = jax.random.randint(jax.random.key(1), (B, L), 0, V)
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, L, L))
    return tok, pos, mask


@pytest.fixture(scope="module", params=["qwen3", "llama3", "gemma3"])
def case(request) -> Case:
    model, _ = _build(request.param)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    call = jaxlora.nnx.call(graphdef, rest)

    def fn(params, tok, pos, mask):
        return call(params, tok, pos, None, mask)[0]  # (logits, cache)

    return make_case(fn, params, _inputs(), jaxlora.LoraConfig(rank=4, alpha=8, targets="all-linear"), request.param)


def test_b0_is_base(case):
    check_b0(case)


def test_merge_equals_apply(case):
    check_merge(case)


HEAVY = pytest.mark.parametrize(
    "case", ["qwen3", pytest.param("llama3", marks=pytest.mark.slow), pytest.param("gemma3", marks=pytest.mark.slow)],
    indirect=True,
)  # fmt: skip


@HEAVY
def test_jit_grad(case):
    check_grad(case)


@HEAVY
def test_mixed_adapter_batch(case):
    check_stack(case)


@HEAVY
def test_nf4_base(case):
    check_nf4(case)


# ----------------------------------------------------------------------------- Tunix's own LoRA: qwix


def _names(keypath) -> tuple:
    names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)
    return names[:-1] if names[-1] == "value" else names


@pytest.mark.parametrize("name", ["qwen3", pytest.param("llama3", marks=pytest.mark.slow)])
def test_equals_qwix(name):
    """qwix.LoraProvider on the same model and the same factors: the same logits and the same gradients."""
    model, _ = _build(name)
    tok, pos, mask = _inputs()
    provider = qwix.LoraProvider(module_path=".*(" + "|".join(PROJ) + ")", rank=4, alpha=8.0)
    qmodel = qwix.apply_lora_to_model(model, provider, tok, pos, None, mask, rngs=nnx.Rngs(3))
    qdef, qlora, qrest = nnx.split(qmodel, nnx.LoRAParam, ...)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    call = jaxlora.nnx.call(graphdef, rest)
    fn = lambda p, *a: call(p, a[0], a[1], None, a[2])[0]  # noqa: E731
    weight_key = {_names(kp): jaxlora.module_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    qpaths = {}  # jaxlora key -> (qwix path of a, qwix path of b)
    for kp, _ in jax.tree_util.tree_flatten_with_path(qlora)[0]:
        names = _names(kp)
        leaf = next(n for n in names[::-1] if n.endswith(("_lora_a", "_lora_b")))
        i = names.index(leaf)
        key = weight_key[names[:i] + (leaf[: -len("_lora_a")],)]
        qpaths.setdefault(key, {})[leaf[-1]] = kp
    assert len(qpaths) == 7, sorted(qpaths)
    config = jaxlora.LoraConfig(rank=4, alpha=8, targets=sorted(map(re.escape, qpaths)))
    lora = randomize(jaxlora.init(jax.random.key(0), params, config, fn=fn, args=(tok, pos, mask)), 7, std=0.2)
    assert sorted(lora) == sorted(qpaths)

    shapes = {kp: x.shape for kp, x in jax.tree_util.tree_flatten_with_path(qlora)[0]}

    def to_qwix(lora):  # the same layouts (a: (*in, r), b: (r, *out)); qwix's dot_general a is (prod(in), r)
        flat = {}
        for key, f in lora.items():
            flat[qpaths[key]["a"]] = f.a.reshape(shapes[qpaths[key]["a"]])
            flat[qpaths[key]["b"]] = f.b.reshape(shapes[qpaths[key]["b"]])
        return jax.tree_util.tree_unflatten(jax.tree.structure(qlora), [flat[k] for k in shapes])

    def qwix_fn(ql, *a):
        return nnx.merge(qdef, ql, qrest, copy=True)(a[0], a[1], None, a[2])[0]

    args = (tok, pos, mask)
    ours = lambda l, p, *a: jaxlora.apply(fn, p, l, *a)  # noqa: E731
    rel_close(jax.jit(ours)(lora, params, *args), jax.jit(qwix_fn)(to_qwix(lora), *args))
    loss = lambda out: jnp.mean(jnp.square(out))  # noqa: E731
    g = jax.jit(jax.grad(lambda l, p, *a: loss(ours(l, p, *a))))(lora, params, *args)
    gq = jax.jit(jax.grad(lambda ql, *a: loss(qwix_fn(ql, *a))))(to_qwix(lora), *args)
    want = jax.tree.leaves(gq)
    got = jax.tree.leaves(to_qwix({k: f for k, f in g.items()}))
    scale = max(float(jnp.abs(x).max()) for x in want)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x.reshape(y.shape), y, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- the pitfalls (#27)


def test_regex_of_projection_names_adapts_attention(case):
    """The natural regex over projection names adapts the attention Einsums too, not only the MLP."""
    if case.name == "gemma3":
        pytest.skip("Gemma3 names its projections q_einsum, kv_einsum, attn_vec_einsum")
    config = jaxlora.LoraConfig(rank=2, targets=r".*/(" + "|".join(PROJ) + ")")
    lora = jaxlora.init(jax.random.key(0), case.params, config, fn=case.fn, args=case.args)
    assert len(lora) == 7, sorted(lora)


def test_all_linear_leaves_out_the_head(case):
    """As PEFT's all-linear: every projection, but not the output head (nor a tied embedding used as one)."""
    assert not [k for k in case.lora if "lm_head" in k or "embed" in k], sorted(case.lora)


def test_quantize_default_takes_every_matmul_weight(case):
    """quantize given fn quantizes exactly the weights that feed a matmul: the attention Einsums too."""
    q = jaxlora.quantize(case.params, "nf4", block_size=16, fn=case.fn, args=case.args)
    got = quantized_leaves(q)
    assert len(got) >= 6 and not [p for p in got if "norm" in p], got  # gemma3 fuses k and v
