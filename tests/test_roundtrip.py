"""Train in JAX, serve in PyTorch: Tunix's name map, and a Tunix Qwen3 fine-tuned with jaxlora generating the same
tokens under transformers + PEFT (examples/jax_to_pytorch.py)."""

import importlib.util
import json
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

import jaxlora
from jaxlora.checkpoint import TUNIX_NAMES, torch_name

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "jax_to_pytorch.py"


@pytest.mark.parametrize(
    "path, name",
    [
        ("layers/0/attn/q_proj/w", "model.layers.0.self_attn.q_proj"),  # an Einsum keeps its leaf name ...
        ("layers/11/attn/o_proj", "model.layers.11.self_attn.o_proj"),  # ... or not
        ("layers/3/attn/k_proj/w", "model.layers.3.self_attn.k_proj"),
        ("layers/3/attn/v_proj/w", "model.layers.3.self_attn.v_proj"),
        ("layers/2/mlp/gate_proj", "model.layers.2.mlp.gate_proj"),  # nnx.Linear: kernel dropped
        ("layers/2/mlp/up_proj", "model.layers.2.mlp.up_proj"),
        ("layers/27/mlp/down_proj", "model.layers.27.mlp.down_proj"),
        ("lm_head/w", "lm_head"),
    ],
)
def test_tunix_names_give_transformers_module_names(path, name):
    assert torch_name(path, TUNIX_NAMES) == name


def test_tunix_names_refuse_the_embedding(tmp_path):
    """A tied table's adapter reaches the output head in JAX but not under PEFT's embedding LoRA: no silent export."""
    params = {"embedder": {"input_embedding": jnp.ones((16, 8))}, "lm_head": {"w": jnp.ones((8, 16))}}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    with pytest.raises(ValueError, match=r"'embedder/input_embedding': no pattern of the name mapping matches it"):
        jaxlora.checkpoint.save_peft(tmp_path, lora, params=params, names=TUNIX_NAMES)


def test_cli_converts_with_the_shipped_map(tmp_path):
    """``--names jaxlora.checkpoint:TUNIX_NAMES`` (MODULE:ATTR) writes transformers' module names."""
    from jaxlora.__main__ import main

    params = {"layers": {"0": {"mlp": {"up_proj": {"kernel": jnp.ones((4, 6))}}}}, "lm_head": {"w": jnp.ones((6, 8))}}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    jaxlora.checkpoint.save(tmp_path / "adapter", lora, params=params)
    args = ["convert", str(tmp_path / "adapter"), str(tmp_path / "peft"), "--names", "jaxlora.checkpoint:TUNIX_NAMES"]
    assert main(args) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["lm_head", "model.layers.0.mlp.up_proj"]


def _example():
    pytest.importorskip("torch", reason="torch not installed: pip install -e '.[peft]'")
    pytest.importorskip("peft", reason="peft not installed: pip install -e '.[peft]'")
    pytest.importorskip("transformers", reason="transformers not installed: pip install -e '.[peft]'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # tunix 0.1.7 imports jax.experimental.shard_map
        pytest.importorskip("tunix.models.qwen3.model", reason="google-tunix not installed (the models extra)")
    spec = importlib.util.spec_from_file_location("jax_to_pytorch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["jax_to_pytorch"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # tunix 0.1.7 on jax 0.10+: shard_map, thread_resources
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # transformers 5 warns PEFT
@pytest.mark.parametrize("arch, tied", [("qwen3", False), ("llama3", True)])
def test_tunix_round_trip_to_transformers_and_peft(arch, tied):
    """Fine-tuned in JAX, the adapter loaded by PEFT on transformers' twin gives the same logits (float32, to a
    hundred-thousandth of their scale) and the same greedy tokens; PEFT's own re-saved files load back to the
    same factors."""
    with jax.numpy_rank_promotion("allow"):  # Tunix's RMSNorm broadcasts (d,) against (batch, seq, d)
        result = _example().main(steps=3, new_tokens=6, tied=tied, arch=arch)
    assert result["losses"][-1] < result["losses"][0]
    assert result["target_modules"] == 14 + (not tied)  # 2 layers x (q, k, v, o, gate, up, down), lm_head if untied
    tol = 1e-5 * result["logits_scale"]
    assert result["base_max_abs"] < tol  # the base conversion (hf_state_dict) is right ...
    assert result["adapted_max_abs"] < tol  # ... and so is the adapter,
    assert result["adapter_effect_max_abs"] > 1e4 * tol  # which moves the logits far beyond the tolerance
    assert result["tokens_equal"], (result["jax_tokens"], result["torch_tokens"])
    assert result["peft_files_back_same_modules"] and result["peft_files_back_max_abs"] == 0.0
