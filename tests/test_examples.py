"""Every example runs (with few steps) and does what it claims."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.examples  # CI runs these slow ones on Python 3.11 (.ci/run)

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (flax modules) look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quickstart():
    result = _load("quickstart").main(pretrain_steps=40, lora_steps=40, rank=4)
    assert result["code_loss_after"] < result["code_loss_before"]
    assert result["merged_vs_unmerged_max_abs"] < 1e-4
    assert 0 < result["trainable_percent"] < 10


@pytest.mark.slow
def test_moe_finetune():
    result = _load("moe_finetune").main(steps=40)
    assert result["loss_after"] < result["loss_before"] - 0.1
    assert result["merged_vs_unmerged_max_abs"] < 1e-4


@pytest.mark.slow
def test_qlora_finetune():
    result = _load("qlora_finetune").main(pretrain_steps=40, lora_steps=30, rank=4)
    rows = result["rows"]
    assert any("fc1" in name for name in result["nf4_bits_by_weight"][4.127])  # the README's figure: 2-D weights
    assert rows["nf4"]["lora_loss"] < rows["nf4"]["base_loss"]
    assert rows["bf16"]["lora_loss"] < rows["bf16"]["base_loss"]
    assert rows["nf4"]["base_bytes"] < 0.7 * rows["bf16"]["base_bytes"]  # the embedding stays bf16 (as bitsandbytes)


@pytest.mark.slow
def test_serve():
    result = _load("serve").main(batch=6, new_tokens=12)
    assert result["mismatched_requests"] == [] and result["mismatched_after_swap"] == []
    assert result["recompiles_after_swap"] == 0 and result["distinct_outputs"] > 1 and result["tokens_per_s"] > 0


@pytest.mark.slow
def test_examples_print_a_summary_or_json_and_progress_on_stderr():
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES.parent), JAX_PLATFORMS="cpu")
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, str(EXAMPLES / "plain_jax_finetune.py"), "--lora-steps", "3", *a],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    human, machine = run(), run("--json")
    assert "test loss" in human.stdout.splitlines()[-1] and "{" not in human.stdout
    assert "LoRA: 100%" in human.stderr and "LoRA: 100%" in machine.stderr  # tqdm, on stderr
    result = json.loads(machine.stdout)  # stdout holds the JSON alone
    assert {"loss_before", "loss_after", "seconds"} <= set(result) and "test loss" in machine.stderr
