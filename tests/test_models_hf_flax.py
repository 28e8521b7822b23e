"""Hugging Face's Flax models (Llama, BERT, GPT-2) on tiny random configs, called as users call them:
``model(ids, params=params).logits``.

transformers 5 removed Flax; 4.57 still ships it and runs on jax 0.12. .ci/run installs it on Python 3.12
(.ci/hf-flax-py312.txt, no torch there); on Python 3.11 transformers 5 serves the PEFT cross-checks and this
module skips. GPT-2's ``FlaxConv1D`` stores its ``kernel`` ``(out, in)``: the trace lays the factors out.
"""

import inspect
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from models_common import (  # noqa: F401 (allow_rank_promotion: an autouse fixture)
    Case,
    allow_rank_promotion,
    check_b0,
    check_grad,
    check_merge,
    check_stack,
    make_case,
    quantized_leaves,
    randomize,
    rel_close,
)

import jaxlora

SKIP = "transformers < 5 ships Flax: .ci/run installs it on Python 3.12 (.ci/hf-flax-py312.txt)"
hf_llama = pytest.importorskip("transformers.models.llama.modeling_flax_llama", reason=SKIP)
hf_bert = pytest.importorskip("transformers.models.bert.modeling_flax_bert", reason=SKIP)
hf_gpt2 = pytest.importorskip("transformers.models.gpt2.modeling_flax_gpt2", reason=SKIP)
from transformers import BertConfig, GPT2Config, LlamaConfig  # noqa: E402

V = 64
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
EXPECTED = {  # "all-linear": every projection; not Llama's lm_head, nor the embedding BERT's and GPT-2's heads tie
    "llama": [f"model/layers/0/{m}" for m in ("mlp/down_proj", "mlp/gate_proj", "mlp/up_proj")]
    + [f"model/layers/0/self_attn/{p}_proj" for p in "kovq"],
    "bert": [f"bert/encoder/layer/0/{m}" for m in ("attention/output/dense", "intermediate/dense", "output/dense")]
    + [f"bert/encoder/layer/0/attention/self/{p}" for p in ("key", "query", "value")]
    + ["cls/predictions/transform/dense"],
    "gpt2": [f"transformer/h/0/{m}" for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")],
}


@pytest.fixture(scope="module", autouse=True)
def _flax_own_param():
    """Flax's own ``nn.Module.param`` for this module's tests: importing ``gemma`` (another test module, maybe in
    this process) replaces it process-wide with a wrapper that passes ``dtype=None`` on to every init function
    as an extra argument, which Llama's RMSNorm init (two arguments) refuses when Flax checks a param's shape."""
    patched = nn.Module.param
    nn.Module.param = inspect.unwrap(patched)
    yield
    nn.Module.param = patched


def _model(name: str):
    if name == "llama":
        return hf_llama.FlaxLlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2), seed=0)
    if name == "bert":  # the masked-LM head: its decoder is tied to the word embedding
        return hf_bert.FlaxBertForMaskedLM(BertConfig(**SMALL, max_position_embeddings=16), seed=0)
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=16)  # lm_head tied to wte
    return hf_gpt2.FlaxGPT2LMHeadModel(cfg, seed=0)


def _ids():
    return jax.random.randint(jax.random.key(1), (2, 6), 0, V)


def _fn(model):
    return lambda params, ids: model(ids, params=params).logits


@pytest.fixture(scope="module", params=["llama", "bert", "gpt2"])
def case(request) -> Case:
    model = _model(request.param)
    config = jaxlora.LoraConfig(rank=4, alpha=8, targets="all-linear")
    return make_case(_fn(model), model.params, (_ids(),), config, request.param)


def test_all_linear_leaves_out_the_head(case):
    assert sorted(case.lora) == sorted(EXPECTED[case.name])
    # GPT-2's FlaxConv1D kernel is (out, in): the trace puts A on its input side, (in, r)
    roles = "oi" if case.name == "gpt2" else "io"
    assert {f.roles for f in case.lora.values()} == {roles}


def test_b0_is_base(case):
    check_b0(case)


def test_merge_equals_apply(case):
    check_merge(case)


def test_jit_grad(case):
    check_grad(case)


def test_mixed_adapter_batch(case):
    check_stack(case)


def test_nf4_base(case):
    """quantize given fn: exactly the adapted kernels (never the head, embeddings, norms); apply on the NF4 base
    equals apply on its dequantized weights."""
    q = jaxlora.quantize(case.params, "nf4", block_size=16, double_quant=False, fn=case.fn, args=case.args)
    assert quantized_leaves(q) == sorted(
        "".join(f"[{k!r}]" for k in path.split("/")) + "['kernel']" for path in case.lora
    )
    deq = jax.tree.map(
        lambda x: jaxlora.dequantize(x) if isinstance(x, jaxlora.Quantized) else x,
        q,
        is_leaf=lambda x: isinstance(x, jaxlora.Quantized),
    )
    lora = randomize(case.lora, 5)
    rel_close(case.run(q, lora, *case.args), case.run(deq, lora, *case.args))


# ----------------------------------------------------------------------------- GPT-2's (out, in) kernels


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)
def test_gpt2_untraced_init_is_refused_by_apply(case):
    """init without fn guesses Flax's (in, out) for a 2-D 'kernel': apply traces and refuses it, naming each."""
    untraced = jaxlora.init(jax.random.key(0), case.params, case.config)
    assert untraced["transformer/h/0/attn/c_attn"].roles == "io"  # the guess: A would sit on the output side
    with pytest.raises(
        jaxlora.UnsupportedError,
        match=r"'transformer/h/0/attn/c_attn'.*its output axes: a 'kernel' that fn looks up nowhere.*FlaxConv1D",
    ):
        jaxlora.apply(case.fn, case.params, untraced, *case.args)


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)
def test_gpt2_merge_transposes_delta(case):
    """A traced init: a is (in, r), b (r, out), and merge adds scale·(a·b)ᵀ to the (out, in) kernel."""
    lora = randomize(case.lora, 6)
    f = lora["transformer/h/0/attn/c_attn"]
    assert f.a.shape == (32, 4) and f.b.shape == (4, 96)
    w = case.params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]  # (96, 32)
    got = jaxlora.merge(case.params, lora)["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    want = np.asarray(w, np.float64) + f.scale * (np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)
def test_gpt2_peft_files(case, tmp_path):
    """save_peft writes PEFT's GPT-2 shapes, lora_A (r, in) and lora_B (out, r); the same files as PEFT writes
    them (no jaxlora metadata) load back given fn, and without it the (out, in) kernels are refused, saying so."""
    from safetensors.numpy import load_file, save_file

    lora = randomize(case.lora, 7)
    out = jaxlora.checkpoint.save_peft(tmp_path / "ours", lora, params=case.params)
    tensors = load_file(out / "adapter_model.safetensors")
    name = "base_model.model.transformer.h.0.attn.c_attn"
    assert tensors[f"{name}.lora_A.weight"].shape == (4, 32) and tensors[f"{name}.lora_B.weight"].shape == (96, 4)
    peft = tmp_path / "peft"
    peft.mkdir()
    config = json.loads((out / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))  # PEFT's on Conv1D
    save_file(tensors, peft / "adapter_model.safetensors")
    back = jaxlora.checkpoint.load_peft(peft, params=case.params, fn=case.fn, args=case.args)
    assert sorted(back) == sorted(lora)
    for path, f in lora.items():
        assert back[path].roles == "oi" and back[path].scale == f.scale
        np.testing.assert_array_equal(back[path].a, f.a)
        np.testing.assert_array_equal(back[path].b, f.b)
    with pytest.raises(
        ValueError, match=r"(?s)'transformer/h/0/attn/c_attn'.*lora_A \(4, 32\).*FlaxConv1D\): pass fn="
    ):
        jaxlora.checkpoint.load_peft(peft, params=case.params)
    # the square attn/c_proj (32, 32) alone fits either layout: read without fn, apply refuses it
    only = tmp_path / "c_proj"
    only.mkdir()
    (only / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["attn.c_proj"]}))
    save_file({k: v for k, v in tensors.items() if ".attn.c_proj." in k}, only / "adapter_model.safetensors")
    guessed = jaxlora.checkpoint.load_peft(only, params=case.params)
    with pytest.raises(jaxlora.UnsupportedError, match=r"'transformer/h/0/attn/c_proj'.*FlaxConv1D"):
        jaxlora.apply(case.fn, case.params, guessed, *case.args)
