"""MaxText's Llama2 decoder (scanned and unscanned) on a tiny random config, and MaxText's own LoRA (qwix).

Needs maxtext 0.2.5 and the modules its model code imports: on Python 3.12, ``pip install --no-deps -r
.ci/maxtext-py312.txt`` after the models extra (that file says why). Skips with the reason where they are
not installed. Each check is in tests/models_common.py.
"""

import os
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

pytest.importorskip("maxtext", reason="maxtext not installed (Python 3.12: see .ci/maxtext-py312.txt)")
qwix = pytest.importorskip("qwix", reason="qwix not installed (the models extra)")
import flax  # noqa: E402
from flax import nnx  # noqa: E402

_shard = flax.config.flax_always_shard_variable
try:
    with warnings.catch_warnings():  # its imports (TensorFlow, transformers, pathwaysutils) warn
        warnings.simplefilter("ignore")
        from jax.sharding import Mesh
        from maxtext.configs import pyconfig
        from maxtext.models import models
        from maxtext.utils import lora_utils, maxtext_utils
        from maxtext.utils.globals import MAXTEXT_PKG_DIR
except ImportError as e:  # maxtext without the modules its model code imports
    pytest.skip(f"maxtext's model code does not import ({e}): see .ci/maxtext-py312.txt", allow_module_level=True)
finally:  # importing MaxText turns Flax's eager sharding off process-wide; other test modules share the process
    flax.config.update("flax_always_shard_variable", _shard)

# MaxText and qwix call APIs that jax and flax deprecate.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

B, L, V = 2, 8, 64


def _config(scan: bool, **lora):
    return pyconfig.initialize(
        [None, os.path.join(MAXTEXT_PKG_DIR, "configs", "base.yml")],
        model_name="llama2-7b", override_model_config=True, base_emb_dim=32, base_num_query_heads=4,
        base_num_kv_heads=4, base_mlp_dim=64, base_num_decoder_layers=2, head_dim=8, vocab_size=V,
        max_target_length=L, per_device_batch_size=1, dtype="float32", weight_dtype="float32",
        matmul_precision="highest", attention="dot_product", scan_layers=scan, enable_checkpointing=False,
        skip_jax_distributed_system=True, run_name="jaxlora", hardware="cpu", **lora,
    )  # fmt: skip


def _build(scan: bool, **lora):
    cfg = _config(scan, **lora)
    mesh = Mesh(maxtext_utils.create_device_mesh(cfg, devices=jax.devices()[:1]), cfg.mesh_axes)
    with nnx.use_eager_sharding(False):  # as MaxText runs: logical axis names, no mesh
        model = models.Transformer(cfg, mesh, quant=None, rngs=nnx.Rngs(0))
    return model, cfg, mesh


def _inputs():
    tok = jax.random.randint(jax.random.key(1), (B, L), 0, V)
    return tok, jnp.broadcast_to(jnp.arange(L), (B, L))


def _fn(graphdef, rest):
    call = jaxlora.nnx.call(graphdef, rest)
    return lambda params, tok, pos: call(params, tok, pos, enable_dropout=False)


@pytest.fixture(scope="module", params=["scanned", "unscanned"])
def case(request) -> Case:
    model, _, _ = _build(request.param == "scanned")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = _fn(graphdef, rest)
    return make_case(fn, params, _inputs(), jaxlora.LoraConfig(rank=4, alpha=8, targets="all-linear"), request.param)


def test_b0_is_base(case):
    check_b0(case)


def test_merge_equals_apply(case):
    check_merge(case)


UNSCANNED_SLOW = pytest.mark.parametrize(
    "case", ["scanned", pytest.param("unscanned", marks=pytest.mark.slow)], indirect=True
)


@pytest.mark.slow
def test_jit_grad(case):
    check_grad(case)


@UNSCANNED_SLOW
def test_mixed_adapter_batch(case):
    check_stack(case)


@UNSCANNED_SLOW
def test_nf4_base(case):
    check_nf4(case)


def test_all_linear_takes_each_projection_not_the_head(case):
    """Seven projections a layer (one scanned stack, or one per layer), not ``decoder/logits_dense`` nor the
    embedding; a scanned stack's factors lead with the layer axis (MaxText scans over kernel axis 1)."""
    layers = ["layers"] if case.name == "scanned" else ["layers_0", "layers_1"]
    want = [f"decoder/{ly}/{m}" for ly in layers for m in ("mlp/wi_0", "mlp/wi_1", "mlp/wo")] + [
        f"decoder/{ly}/self_attention/{m}" for ly in layers for m in ("key", "out", "query", "value")
    ]
    assert sorted(case.lora) == sorted(want)
    if case.name == "scanned":
        f = case.lora["decoder/layers/self_attention/query"]
        assert (f.a.shape, f.b.shape) == ((2, 32, 4), (2, 4, 4, 8))


def test_quantize_given_fn_leaves_out_the_head(case):
    """quantize given fn quantizes the projections, not ``decoder/logits_dense`` (MaxText's output head)."""
    q = jaxlora.quantize(case.params, "nf4", block_size=16, fn=case.fn, args=case.args)
    got = quantized_leaves(q)
    assert len(got) == len(case.lora) and not [p for p in got if "logits_dense" in p or "norm" in p], got


# ----------------------------------------------------------------------------- MaxText's own LoRA: qwix


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["scanned", "unscanned"])
def test_equals_maxtext_lora(scan):
    """MaxText's LoRA (``lora_utils.apply_lora_to_model``: qwix, its default module path) on the same model and
    the same factors: the same logits and the same gradients."""
    qmodel, cfg, mesh = _build(scan, lora={"enable_lora": True, "lora_rank": 4, "lora_alpha": 8.0})
    with nnx.use_eager_sharding(False):
        qmodel = lora_utils.apply_lora_to_model(qmodel, mesh, cfg)
    qdef, qlora, qrest = nnx.split(qmodel, nnx.LoRAParam, ...)
    model, _, _ = _build(scan)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn, args = _fn(graphdef, rest), _inputs()

    qpaths = {}  # jaxlora key -> {"a": qwix key path of a, "b": ...}
    for kp, _ in jax.tree_util.tree_flatten_with_path(qlora)[0]:
        names = [str(k.key) for k in kp if isinstance(k, jax.tree_util.DictKey)]  # ends "kernel_lora_a"
        qpaths.setdefault("/".join(names[:-1]), {})[names[-1][-1]] = kp
    assert len(qpaths) == 7 * (1 if scan else 2), sorted(qpaths)
    config = jaxlora.LoraConfig(rank=4, alpha=8, targets="all-linear")
    lora = randomize(jaxlora.init(jax.random.key(0), params, config, fn=fn, args=args), 7, std=0.2)
    assert sorted(lora) == sorted(qpaths)
    shapes = {kp: x.shape for kp, x in jax.tree_util.tree_flatten_with_path(qlora)[0]}

    def to_qwix(lora):  # qwix flattens in and out, and keeps MaxText's layer axis at 1: a (in, layers, r)
        flat = {}
        for key, f in lora.items():
            a, b = f.a, f.b
            if scan:  # ours lead with the layer axis: a (layers, *in, r), b (layers, r, *out)
                a = a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 0, 2)
                b = b.reshape(*b.shape[:2], -1).transpose(1, 0, 2)
            flat[qpaths[key]["a"]] = a.reshape(shapes[qpaths[key]["a"]])
            flat[qpaths[key]["b"]] = b.reshape(shapes[qpaths[key]["b"]])
        return jax.tree_util.tree_unflatten(jax.tree.structure(qlora), [flat[k] for k in shapes])

    def qwix_fn(ql, tok, pos):
        return nnx.merge(qdef, ql, qrest, copy=True)(tok, pos, enable_dropout=False)

    ours = lambda l, p, *a: jaxlora.apply(fn, p, l, *a)  # noqa: E731
    rel_close(jax.jit(ours)(lora, params, *args), jax.jit(qwix_fn)(to_qwix(lora), *args))
    loss = lambda out: jnp.mean(jnp.square(out))  # noqa: E731
    g = jax.jit(jax.grad(lambda l, p, *a: loss(ours(l, p, *a))))(lora, params, *args)
    gq = jax.jit(jax.grad(lambda ql, *a: loss(qwix_fn(ql, *a))))(to_qwix(lora), *args)
    want = jax.tree.leaves(gq)
    scale = max(float(jnp.abs(x).max()) for x in want)
    for x, y in zip(jax.tree.leaves(to_qwix(g)), want, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * scale)
