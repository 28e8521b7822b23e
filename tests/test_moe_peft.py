"""Expert weights as PEFT ``target_parameters``: files PEFT's ``lora.ParamWrapper`` loads onto a torch MoE twin
with 3-D expert parameters (both orientations), PEFT-made expert adapters read back, and the refusals."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from test_moe import FF, TOP_K, D, E, _setup

import jaxlora
from jaxlora import checkpoint as ckpt

NAMES = {"router": "router", "gate_up": "experts.gate_up_proj", "down": "experts.down_proj"}
EXPERTS = ["gate_up", "down"]
MODES = {  # expert_rank="split": rank 8 over 4 experts is rank 2 each, scale alpha / 8 (and rsLoRA's sqrt)
    "per_expert": {},
    "split_rslora": dict(rank=8, expert_rank="split", rank_pattern={"router": 2}, rslora=True),
}


def _strip_header(directory):
    """Drop jaxlora's metadata from the safetensors header: the files as PEFT itself would read them."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "jaxlora_manifest.json").unlink()  # PEFT writes none


def test_layout_and_round_trip(tmp_path):
    model, x, params, lora = _setup(fused=True)
    out = ckpt.save_peft(tmp_path, lora, params=params, names=NAMES, experts=EXPERTS)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["router"]
    assert cfg["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 6 and cfg["lora_dropout"] == 0.0
    from safetensors.numpy import load_file

    t = load_file(str(out / "adapter_model.safetensors"))
    # gate_up_proj is registered first, so PEFT nests its wrapper inside down_proj's: one base_layer deeper
    A, B = (
        t["base_model.model.experts.base_layer.lora_A.weight"],
        t["base_model.model.experts.base_layer.lora_B.weight"],
    )
    a, b = np.asarray(lora["gate_up"].a), np.asarray(lora["gate_up"].b)  # (E, D, r), (E, r, 2FF)
    assert A.shape == (E * 3, D) and B.shape == (2 * FF, 3 * E)
    for e in range(E):  # PEFT's reshape: A rows expert-major (E, r, in), B columns rank-major (out, r, E)
        np.testing.assert_array_equal(A.reshape(E, 3, D)[e], a[e].T)
        np.testing.assert_array_equal(B.reshape(2 * FF, 3, E)[:, :, e], b[e].T)
    assert t["base_model.model.experts.lora_A.weight"].shape == (E * 3, FF)
    assert t["base_model.model.experts.lora_B.weight"].shape == (D, 3 * E)
    assert_trees_close(ckpt.load_peft(out), lora, rtol=0, atol=0)  # jaxlora's header carries the layout
    assert_trees_close(ckpt.load_peft(out, params=params, names=NAMES), lora, rtol=0, atol=0)
    about = ckpt.info(out)
    assert about.modules["down"]["kind"] == "expert" and about.modules["down"]["rank"] == 3
    assert about.modules["down"]["torch"] == "experts.down_proj" and about.modules["down"]["a_shape"] == [E, FF, 3]
    _strip_header(out)  # as PEFT writes it: placed through params, names and the traced roles
    about = ckpt.info(out).modules  # PEFT's own files: the rank per expert comes from the config
    assert about["experts.down_proj"]["rank"] == 3 and about["experts.down_proj"]["a_shape"] == [E, FF, 3]
    assert about["experts.gate_up_proj"]["b_shape"] == [E, 3, 2 * FF]
    back = ckpt.load_peft(out, params=params, names=NAMES, fn=model.apply, args=(x,))
    assert_trees_close(back, lora, rtol=0, atol=0)
    assert {p: f.roles for p, f in back.items()} == {"router": "io", "gate_up": "sio", "down": "sio"}
    np.testing.assert_array_equal(
        jaxlora.apply(model.apply, params, back, x), jaxlora.apply(model.apply, params, lora, x)
    )


def test_export_refusals(tmp_path):
    _, _, params, lora = _setup(fused=True)
    with pytest.raises(ValueError, match=r"'down': stacked-layer axis .*unstack.*pass experts=\[\.\.\.\]"):
        ckpt.save_peft(tmp_path / "a", lora, names=NAMES)
    with pytest.raises(ValueError, match=r"experts patterns \['gate'\] match no module"):
        ckpt.save_peft(tmp_path / "a", lora, names=NAMES, experts=["gate_up", "down", "gate"])
    with pytest.raises(ValueError, match=r"'gate_up': an expert weight's torch name must be its parameter's full name"):
        ckpt.save_peft(tmp_path / "a", lora, experts=EXPERTS)  # default names: "gate_up" has no module part
    odd = {"router": "router", "gate_up": "experts.w13", "down": "experts.w2"}
    with pytest.raises(
        ValueError, match=r"torch module 'experts' has several targeted parameters \['w13', 'w2'\].*parameter_order="
    ):
        ckpt.save_peft(tmp_path / "a", lora, names=odd, experts=EXPERTS)
    out = ckpt.save_peft(tmp_path / "b", lora, names=odd, experts=EXPERTS, parameter_order=["w13", "w2"])
    from safetensors.numpy import load_file

    assert "base_model.model.experts.base_layer.lora_A.weight" in load_file(str(out / "adapter_model.safetensors"))
    dropped = {p: jaxlora.LoraFactors(f.a, f.b, f.scale, f.roles, dropout=0.1) for p, f in lora.items()}
    with pytest.raises(ValueError, match=r"\['down', 'gate_up', 'router'\] have LoRA dropout.*ParamWrapper.*replace"):
        ckpt.save_peft(tmp_path / "a", dropped, names=NAMES, experts=EXPERTS)
    two = {"moe": jaxlora.LoraFactors(jnp.ones((2, 3, 4, 1)), jnp.ones((2, 3, 1, 5)), 1.0, "ssio")}
    dora = {"moe": jaxlora.LoraFactors(jnp.ones((3, 4, 1)), jnp.ones((3, 1, 5)), 1.0, "sio", m=jnp.ones((3, 5)))}
    with pytest.raises(ValueError, match=r"'moe': cannot be .*target_parameters.*2 stacked axes .*unstack"):
        ckpt.save_peft(tmp_path / "a", two, names={"moe": "layers.experts.w"}, experts="moe")
    with pytest.raises(ValueError, match=r"'moe': cannot be .*target_parameters.*DoRA magnitude.*no DoRA"):
        ckpt.save_peft(tmp_path / "a", dora, names={"moe": "layers.experts.w"}, experts="moe")


def test_import_refusals(tmp_path):
    model, x, params, lora = _setup(fused=True)
    out = ckpt.save_peft(tmp_path, lora, params=params, names=NAMES, experts=EXPERTS)
    _strip_header(out)
    with pytest.raises(ValueError, match=r"'experts.base_layer': the adapter has target_parameters .*pass params="):
        ckpt.load_peft(out)
    with pytest.raises(ValueError, match=r"torch module 'experts' matches no weight of params.*full name"):
        ckpt.load_peft(out, params=params, names={"router": "router", "gate_up": "gate_up", "down": "down"})
    with pytest.raises(ValueError, match=r"'experts' has several targeted parameters.*parameter_order="):
        ckpt.load_peft(out, params=params, names=NAMES, fn=model.apply, args=(x,), parameter_order=["w1"])
    swapped = {"router": "router", "gate_up": "experts.down_proj", "down": "experts.gate_up_proj"}
    with pytest.raises(ValueError, match=r"'experts' -> 'gate_up': lora_A \(12, 12\) and lora_B \(8, 12\) need"):
        ckpt.load_peft(out, params=params, names=swapped, fn=model.apply, args=(x,))


# ---- cross-check against PyTorch + PEFT's lora.ParamWrapper ---------------------------------------------


def _torch_twin(params, transposed):
    """The Moe of test_moe in torch, experts as 3-D parameters: ``(E, in, out)`` with transformers'
    ``is_transposed`` (GptOss) or ``(E, out, in)`` (Mixtral, Qwen-MoE)."""
    torch = pytest.importorskip(
        "torch", reason="torch not installed: pip install -e '.[peft]' to run the PEFT cross-checks"
    )
    pytest.importorskip(
        "peft",
        minversion="0.21",
        reason="peft >= 0.21 (its target_parameters layout) not installed: pip install -e '.[peft]'",
    )
    from torch import nn as tnn

    class Experts(tnn.Module):
        def __init__(self):
            super().__init__()
            self.is_transposed = transposed  # read by PEFT's ParamWrapper, as transformers sets it
            self.gate_up_proj = tnn.Parameter(torch.zeros((E, D, 2 * FF) if transposed else (E, 2 * FF, D)))
            self.down_proj = tnn.Parameter(torch.zeros((E, FF, D) if transposed else (E, D, FF)))

        def forward(self, x, idx, weights):
            gate_up, down = self.gate_up_proj, self.down_proj  # under PEFT: W + ΔW
            out = torch.zeros_like(x)
            for e in range(E):
                tok, slot = torch.where(idx == e)
                h = x[tok] @ (gate_up[e] if transposed else gate_up[e].T)
                gate, up = h.chunk(2, dim=-1)
                y = (tnn.functional.silu(gate) * up) @ (down[e] if transposed else down[e].T)
                out.index_add_(0, tok, y * weights[tok, slot, None])
            return out

    class Twin(tnn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.experts = tnn.Linear(D, E, bias=False), Experts()

        def forward(self, x):
            weights, idx = torch.topk(self.router(x), TOP_K, dim=-1)
            return self.experts(x, idx, torch.softmax(weights, dim=-1))

    p = params["params"]
    twin, t = Twin(), lambda v: torch.tensor(np.asarray(v))
    with torch.no_grad():
        twin.router.weight.copy_(t(p["router"]["kernel"]).T)
        twin.experts.gate_up_proj.copy_(t(p["gate_up"]) if transposed else t(p["gate_up"]).transpose(1, 2))
        twin.experts.down_proj.copy_(t(p["down"]) if transposed else t(p["down"]).transpose(1, 2))
    return torch, twin.eval()


def _jax_layout(w, transposed):
    return w if transposed else np.swapaxes(w, 1, 2)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("transposed", [False, True], ids=["E_out_in", "E_in_out"])
def test_peft_loads_jaxlora_expert_adapter(tmp_path, transposed, mode):
    fields = {"rank": 3, **MODES[mode]}
    model, x, params, lora = _setup(fused=True, **fields)
    torch, twin = _torch_twin(params, transposed)
    import peft

    xt = torch.tensor(np.asarray(x))
    with torch.no_grad():
        base = twin(xt).numpy()
    np.testing.assert_allclose(base, model.apply(params, x), atol=1e-5, rtol=1e-5)  # the twins agree without LoRA
    from jaxlora.checkpoint._peft import _pattern_value

    config = jaxlora.LoraConfig(**fields)  # its rslora picks use_rslora
    ckpt.save_peft(tmp_path, lora, params=params, names=NAMES, config=config, experts=EXPERTS)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    for p, f in lora.items():  # PEFT's scale formula gives jaxlora's scale exactly, r being the rank per expert
        name = NAMES[p]
        r = _pattern_value(cfg["rank_pattern"], name, cfg["r"])  # as PEFT's get_pattern_key
        alpha = _pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"])
        assert r == f.rank and alpha / (math.sqrt(r) if cfg["use_rslora"] else r) == f.scale, p
    loaded = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    assert sum(isinstance(m, peft.tuners.lora.layer.ParamWrapper) for m in loaded.modules()) == 2
    with torch.no_grad():
        got = loaded(xt).numpy()
    want = np.asarray(jaxlora.apply(model.apply, params, lora, x))
    assert np.abs(want - base).max() > 0.1  # the adapter changes the output
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    merged = loaded.merge_and_unload()
    jmerged = jaxlora.merge(params, lora)["params"]
    for name, w in (("gate_up", merged.experts.gate_up_proj), ("down", merged.experts.down_proj)):
        np.testing.assert_allclose(_jax_layout(w.detach().numpy(), transposed), jmerged[name], atol=1e-5, rtol=1e-5)


# PEFT applies rank_pattern / alpha_pattern to target_parameters by parameter name, but its check for unused
# patterns looks at module names only, so it warns about patterns it did apply (the ranks below prove it)
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize("transposed", [False, True], ids=["E_out_in", "E_in_out"])
def test_peft_made_expert_adapter_loads_into_jaxlora(tmp_path, transposed):
    model, x, params, _ = _setup(fused=True)
    torch, twin = _torch_twin(params, transposed)
    import peft

    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=["router"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        rank_pattern={"experts.down_proj": 3},
        alpha_pattern={"experts.gate_up_proj": 7},
        init_lora_weights=False,  # random B: a non-trivial adapter
    )
    peft_model = peft.get_peft_model(twin, cfg).eval()
    peft_model.save_pretrained(str(tmp_path))
    xt = torch.tensor(np.asarray(x))
    with torch.no_grad():
        want = peft_model(xt).numpy()
    lora = ckpt.load_peft(tmp_path, params=params, names=NAMES, fn=model.apply, args=(x,))
    assert {p: (f.roles, f.rank, f.scale) for p, f in lora.items()} == {
        "router": ("io", 2, 2.5),
        "gate_up": ("sio", 2, 3.5),
        "down": ("sio", 3, 5 / 3),
    }
    got = np.asarray(jaxlora.apply(model.apply, params, lora, x))
    assert np.abs(want - np.asarray(model.apply(params, x))).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    merged = peft_model.merge_and_unload()
    jmerged = jaxlora.merge(params, lora)["params"]
    for name, w in (("gate_up", merged.experts.gate_up_proj), ("down", merged.experts.down_proj)):
        np.testing.assert_allclose(_jax_layout(w.detach().numpy(), transposed), jmerged[name], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(merged.router.weight.detach().numpy().T, jmerged["router"]["kernel"], atol=1e-6)


def test_cli_converts_an_orbax_expert_adapter_with_experts(tmp_path, capsys):
    from jaxlora.__main__ import main

    model, x, params, lora = _setup(fused=True)
    ckpt.save(tmp_path / "orbax", lora, params=params)
    (tmp_path / "names.json").write_text(json.dumps({f"^{k}$": v for k, v in NAMES.items()}))
    argv = ["convert", str(tmp_path / "orbax"), str(tmp_path / "peft"), "--names", str(tmp_path / "names.json")]
    assert main(argv) == 1  # without --experts the expert axis is refused, pointing at experts=
    assert "experts=" in capsys.readouterr().err
    assert main([*argv, "--experts", "gate_up", "--experts", "down"]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert_trees_close(ckpt.load_peft(tmp_path / "peft"), lora, rtol=0, atol=0)
