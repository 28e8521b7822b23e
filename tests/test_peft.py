"""PEFT adapter files: round trip, exact scales, errors, and (with torch + peft) outputs equal to PyTorch's."""

import json
import math
import os
import stat

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, reseal

import jaxlora
from jaxlora import checkpoint as ckpt

# Flax names differ from the torch twin's on purpose: the mapping below connects them.
NAMES = {"tok": "embed", "proj_in": "fc1", "heads": "attn.heads", "proj_out": "fc2"}


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(50, 16, name="tok")(ids)
        h = nn.gelu(nn.Dense(32, name="proj_in")(h))
        h = nn.DenseGeneral((2, 8), name="heads")(h)  # kernel (32, 2, 8): a torch Linear(32, 16)
        h = h.reshape(h.shape[:-2] + (16,))
        return nn.Dense(4, name="proj_out")(h)


@pytest.fixture(scope="module")
def model():
    net, ids = Net(), (jnp.arange(14).reshape(2, 7) * 7) % 50
    return net, net.init(jax.random.key(0), ids), ids


def _with_b(lora, seed=1):
    keys = iter(jax.random.split(jax.random.key(seed), len(lora)))
    return {
        p: jaxlora.LoraFactors(f.a, jax.random.normal(next(keys), f.b.shape) * 0.5, f.scale, f.roles, f.dropout)
        for p, f in lora.items()
    }


def _lora(model, **kw):
    net, params, ids = model
    config = jaxlora.LoraConfig(
        rank=4, alpha=8, targets=list(NAMES), rank_pattern={"heads": 2}, alpha_pattern={"proj_out": 3}, **kw
    )
    return config, _with_b(jaxlora.init(jax.random.key(2), params, config, fn=net.apply, args=(ids,)))


@pytest.mark.parametrize("rslora", [False, True])
def test_round_trip_and_config(tmp_path, model, rslora):
    from jaxlora.checkpoint._peft import _pattern_value

    net, params, ids = model
    config, lora = _lora(model, rslora=rslora)
    out = ckpt.save_peft(tmp_path, lora, params=params, names=NAMES, config=config, base_model_name_or_path="twin")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is rslora
    assert cfg["target_modules"] == ["attn.heads", "embed", "fc1", "fc2"]
    assert cfg["rank_pattern"] == {r"^attn\.heads": 2} and cfg["alpha_pattern"] == {"^fc2": 3}  # each its module alone
    assert cfg["base_model_name_or_path"] == "twin"
    from safetensors.numpy import load_file

    t = load_file(str(out / "adapter_model.safetensors"))
    np.testing.assert_array_equal(t["base_model.model.fc1.lora_A.weight"], np.asarray(lora["proj_in"].a).T)  # (r, in)
    np.testing.assert_array_equal(t["base_model.model.fc1.lora_B.weight"], np.asarray(lora["proj_in"].b).T)  # (out, r)
    assert t["base_model.model.attn.heads.lora_A.weight"].shape == (2, 32)
    assert t["base_model.model.attn.heads.lora_B.weight"].shape == (16, 2)
    assert t["base_model.model.embed.lora_embedding_A"].shape == (4, 50)  # (r, vocab)
    assert t["base_model.model.embed.lora_embedding_B"].shape == (16, 4)  # (features, r)
    for p, f in lora.items():  # PEFT's scale formula gives jaxlora's scale exactly
        name = NAMES[p]
        r = _pattern_value(cfg["rank_pattern"], name, cfg["r"])  # as PEFT's get_pattern_key
        alpha = _pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"])
        assert alpha / (math.sqrt(r) if rslora else r) == f.scale, p
    for kw in (
        {},
        {"params": params, "names": NAMES},
        {"params": params, "names": NAMES, "fn": net.apply, "args": (ids,)},
    ):
        back = ckpt.load_peft(out, **kw)
        assert list(sorted(back)) == sorted(lora)
        assert_trees_close(back, lora, rtol=0, atol=0)
        assert all(back[p].scale == lora[p].scale and back[p].roles == lora[p].roles for p in lora)
    np.testing.assert_array_equal(
        jaxlora.apply(net.apply, params, back, ids), jaxlora.apply(net.apply, params, lora, ids)
    )
    about = ckpt.info(out)
    assert about.format == "peft" and about.modules["heads"]["rank"] == 2 and about.base["tok"]["name"] == "embedding"
    # without params the layout still travels in jaxlora's header (every module is written as linear then)
    bare = ckpt.save_peft(tmp_path / "bare", lora, names=NAMES, config=config)
    assert_trees_close(ckpt.load_peft(bare), lora, rtol=0, atol=0)
    assert ckpt.load_peft(bare)["heads"].a.shape == (32, 2)


def test_exact_alpha_for_odd_scales():
    from jaxlora.checkpoint._peft import _alpha_for

    # scales as jaxlora makes them (alpha / r or alpha / sqrt(r)) come back exactly
    for alpha0, r, rs in [
        (16, 8, False),
        (0.3, 3, False),
        (16, 7, True),
        (2, 6, False),
        (0.7, 5, True),
        (1e-3, 64, True),
    ]:
        scale = alpha0 / (math.sqrt(r) if rs else r)
        alpha = _alpha_for(scale, r, rs)
        assert alpha / (math.sqrt(r) if rs else r) == scale, (scale, r, rs, alpha)
    # a scale no float alpha reaches (0.1 = x / 3 has no float solution) is off by at most one rounding
    assert _alpha_for(0.1, 3, False) / 3 == pytest.approx(0.1, rel=2e-16)
    assert _alpha_for(2.0, 8, False) == 16 and isinstance(_alpha_for(2.0, 8, False), int)


def test_foreign_layout_needs_params_and_mapping(tmp_path, model):
    """An adapter without jaxlora's metadata (as PEFT writes it) is placed through params and names."""
    net, params, ids = model
    _, lora = _lora(model)
    out = ckpt.save_peft(tmp_path, lora, params=params, names=NAMES)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})  # strip jaxlora's header
    (out / "jaxlora_manifest.json").unlink()  # and its manifest: the files as PEFT writes them
    back = ckpt.load_peft(out, params=params, names=NAMES, fn=net.apply, args=(ids,))
    assert_trees_close(back, lora, rtol=0, atol=0)
    assert back["heads"].roles == "ioo"
    with pytest.raises(ValueError, match="(?s)'attn.heads': no pattern|torch module 'attn.heads' matches no weight"):
        ckpt.load_peft(out, params=params, names={k: v for k, v in NAMES.items() if k != "heads"})
    with pytest.raises(ValueError, match="torch module 'fc1' matches no weight of params"):
        ckpt.load_peft(out, params=params)
    with pytest.raises(ValueError, match="a name mapping can only be inverted against params"):
        ckpt.load_peft(out, names=NAMES)
    with pytest.raises(ValueError, match="more than\\s+two axes|never reaches"):
        ckpt.load_peft(out, params=params, names=NAMES)  # DenseGeneral's layout needs fn


def test_errors(tmp_path, model):
    net, params, ids = model
    _, lora = _lora(model)
    out = ckpt.save_peft(tmp_path / "a", lora, params=params, names=NAMES)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ckpt.save_peft(out, lora, params=params, names=NAMES)
    ckpt.save_peft(out, lora, params=params, names=NAMES, overwrite=True)
    with pytest.raises(ValueError, match="'proj_in': no pattern of the name mapping"):
        ckpt.save_peft(tmp_path / "b", lora, names={"tok|heads|proj_out": "x"})
    with pytest.raises(ValueError, match=r"same torch names \['x'\]"):
        ckpt.save_peft(tmp_path / "b", lora, names=lambda p: "x")
    stacked = {"s": jaxlora.LoraFactors(jnp.ones((3, 4, 2)), jnp.ones((3, 2, 5)), 1.0, "sio")}
    with pytest.raises(ValueError, match="stacked-layer axis .*unstack"):
        ckpt.save_peft(tmp_path / "c", stacked)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_peft(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a PEFT adapter: \['adapter_config.json', 'adapter_model.safetensors'\]"):
        ckpt.load_peft(tmp_path / "empty")
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True, "modules_to_save": ["cls"]}))
    reseal(out)
    missing = r"(?s)modules_to_save \['cls'\].*'fc1': use_dora is True but lora_magnitude_vector is missing"
    with pytest.raises(ValueError, match=missing):
        ckpt.load_peft(out, params=params, names=NAMES)
    (out / "adapter_config.json").write_text("{oops")
    reseal(out)
    with pytest.raises(ValueError, match="not valid JSON"):
        ckpt.load_peft(out)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    data = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ckpt.CorruptCheckpointError, match=r"is damaged.*\n  adapter_config.json: .*\n  adapter_model.safetensors: "
    ):
        ckpt.load_peft(out)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ckpt.load_peft(reseal(out))


def test_wrong_shapes_named(tmp_path, model):
    net, params, ids = model
    _, lora = _lora(model)
    out = ckpt.save_peft(tmp_path, lora, params=params, names=NAMES)
    other = jax.tree_util.tree_map(lambda x: x, params)
    other["params"]["proj_in"]["kernel"] = jnp.zeros((16, 40))
    with pytest.raises(
        ValueError, match=r"'fc1' -> 'proj_in': lora_A \(4, 16\) and lora_B \(32, 4\) need \(r, 16\) and \(40, r\)"
    ):
        ckpt.load_peft(out, params=other, names=NAMES, fn=net.apply, args=(ids,))


def _rewrite_config(out, **changes):
    cfg = json.loads((out / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is KeyError:
            del cfg[k]
        else:
            cfg[k] = v
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    reseal(out)  # the edit reaches the config checks behind the checksums
    return cfg


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"lora_alpha": "16"}, r"lora_alpha is '16'; expected a finite number"),
        ({"lora_alpha": None}, r"lora_alpha is None; expected a finite number"),
        ({"lora_alpha": KeyError}, r"'lora_alpha' is missing"),
        ({"r": KeyError, "rank_pattern": [2]}, r"(?s)'r' is missing.*rank_pattern is \[2\]; expected an object"),
        ({"r": 2.5, "lora_dropout": 1.0}, r"(?s)r is 2.5; expected a positive integer.*lora_dropout is 1.0"),
        ({"modules_to_save": "cls", "use_rslora": "yes"}, r"(?s)use_rslora is 'yes'.*modules_to_save is 'cls'"),
    ],
)
def test_bad_config_fields_named(tmp_path, model, changes, match):
    _, lora = _lora(model)
    out = ckpt.save_peft(tmp_path, lora, params=model[1], names=NAMES)
    _rewrite_config(out, **changes)
    with pytest.raises(
        ValueError, match="(?s)adapter_config.json is not a readable PEFT LoRA config:.*" + match.removeprefix("(?s)")
    ):
        ckpt.load_peft(out, params=model[1], names=NAMES)


def test_config_that_is_not_an_object(tmp_path, model):
    out = ckpt.save_peft(tmp_path, _lora(model)[1], params=model[1], names=NAMES)
    (out / "adapter_config.json").write_text("[8, 16]")
    reseal(out)
    with pytest.raises(ValueError, match="holds a JSON list, where PEFT writes an object"):
        ckpt.load_peft(out)


def test_rank_contradicting_the_tensors_refused(tmp_path, model):
    """PEFT builds each module at the config's rank and refuses other shapes; so does load_peft (and
    merge_safetensors), naming the module, the config's rank and the tensors' shapes."""
    net, params, ids = model
    _, lora = _lora(model)
    out = ckpt.save_peft(tmp_path, lora, params=params, names=NAMES)
    cfg = _rewrite_config(out, r=8)
    match = r"'fc1': the config gives rank 8 \(r\), but lora_A is \(4, 16\) and lora_B \(32, 4\); PEFT refuses"
    with pytest.raises(ValueError, match=match):
        ckpt.load_peft(out, params=params, names=NAMES, fn=net.apply, args=(ids,))
    with pytest.raises(ValueError, match=match):
        ckpt.merge_safetensors(tmp_path / "nobase.safetensors", out, tmp_path / "m.safetensors")
    _rewrite_config(out, r=cfg["r"], rank_pattern={"attn.heads": 3})
    with pytest.raises(
        ValueError, match=r"'attn.heads': the config gives rank 3 \(rank_pattern\), but lora_A is \(2, 32\)"
    ):
        ckpt.load_peft(out, params=params, names=NAMES, fn=net.apply, args=(ids,))


def test_damaged_jaxlora_metadata_named(tmp_path, model):
    from safetensors.numpy import load_file, save_file

    out = ckpt.save_peft(tmp_path, _lora(model)[1], params=model[1], names=NAMES)
    tensors = load_file(out / "adapter_model.safetensors")
    for meta, match in (("{oops", "is not valid JSON"), ('{"modules": {"fc1": {}}}', "modules entry 'fc1' lacks")):
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt", "jaxlora": meta})
        reseal(out)
        with pytest.raises(ValueError, match=f"jaxlora metadata in adapter_model.safetensors (is damaged: )?.*{match}"):
            ckpt.load_peft(out)


def _square(name):
    w = jax.random.normal(jax.random.key(5), (6, 6))
    return {"params": {"fc": {name: w if name == "kernel" else w.T}}}  # one weight, in either layout


def test_layout_recorded_and_checked(tmp_path):
    """A square Flax kernel (in, out) and a torch weight (out, in) share a shape; the fingerprint's layout
    tells them apart, so an Orbax adapter is refused rather than merged transposed, and a PEFT file
    (whose tensors name input and output) is re-laid out for the weight."""
    kernel, weight = _square("kernel"), _square("weight")
    lora = _with_b(jaxlora.init(jax.random.key(0), kernel, jaxlora.LoraConfig(rank=2)))
    assert ckpt.fingerprint(kernel, lora)["fc"] == {
        "shape": [6, 6],
        "dtype": "float32",
        "name": "kernel",
        "roles": "io",
    }
    orbax = ckpt.save(tmp_path / "orbax", lora, params=kernel)
    match = (
        r"'fc': the adapter was made for a 'kernel' leaf laid out \(in, out\), but params hold a 'weight' laid out "
        r"\(out, in\); its factors would merge transposed"
    )
    with pytest.raises(ValueError, match=match):
        ckpt.restore(orbax, params=weight)
    assert_trees_close(ckpt.restore(orbax, params=kernel), lora)
    peft = ckpt.save_peft(tmp_path / "peft", lora, params=kernel)
    back = ckpt.load_peft(peft, params=weight)
    assert back["fc"].roles == "oi"
    want = jaxlora.merge(kernel, lora)["params"]["fc"]["kernel"]
    np.testing.assert_allclose(jaxlora.merge(weight, back)["params"]["fc"]["weight"], want.T, rtol=1e-6, atol=1e-6)
    # an older fingerprint without roles is checked by the layout its leaf name implies; one without names by shape
    old = {"shape": [6, 6], "dtype": "float32", "name": "kernel"}
    with pytest.raises(ValueError, match="merge transposed"):
        ckpt.check_base({"fc": old}, weight)
    ckpt.check_base({"fc": {"shape": [6, 6], "dtype": "float32"}}, weight)
    ckpt.check_base({"fc": old}, {"params": {"fc": {"embedding": jnp.zeros((6, 6))}}})  # both (in, out)


# ---- cross-check against PyTorch + PEFT ------------------------------------------------------------


def _torch_twin(params):
    torch = pytest.importorskip(
        "torch", reason="torch not installed: pip install -e '.[peft]' to run the PEFT cross-checks"
    )
    pytest.importorskip("peft", reason="peft not installed: pip install -e '.[peft]' to run the PEFT cross-checks")
    from torch import nn as tnn

    class Attn(tnn.Module):
        def __init__(self):
            super().__init__()
            self.heads = tnn.Linear(32, 16)

    class Twin(tnn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc1, self.attn, self.fc2 = (
                tnn.Embedding(50, 16),
                tnn.Linear(16, 32),
                Attn(),
                tnn.Linear(16, 4),
            )

        def forward(self, ids):
            h = tnn.functional.gelu(self.fc1(self.embed(ids)), approximate="tanh")
            return self.fc2(self.attn.heads(h))

    p = params["params"]
    twin, t = Twin(), lambda x: torch.tensor(np.asarray(x))
    with torch.no_grad():
        twin.embed.weight.copy_(t(p["tok"]["embedding"]))
        twin.fc1.weight.copy_(t(p["proj_in"]["kernel"]).T)
        twin.fc1.bias.copy_(t(p["proj_in"]["bias"]))
        twin.attn.heads.weight.copy_(t(p["heads"]["kernel"].reshape(32, 16)).T)
        twin.attn.heads.bias.copy_(t(p["heads"]["bias"].reshape(16)))
        twin.fc2.weight.copy_(t(p["proj_out"]["kernel"]).T)
        twin.fc2.bias.copy_(t(p["proj_out"]["bias"]))
    return torch, twin.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_torch_peft_loads_jaxlora_adapter(tmp_path, model, rslora):
    net, params, ids = model
    torch, twin = _torch_twin(params)
    import peft

    with torch.no_grad():
        base = twin(torch.tensor(np.asarray(ids))).numpy()
    np.testing.assert_allclose(base, net.apply(params, ids), atol=2e-5)  # the twins agree without LoRA
    config, lora = _lora(model, rslora=rslora)
    ckpt.save_peft(tmp_path, lora, params=params, names=NAMES, config=config)
    loaded = peft.PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(torch.tensor(np.asarray(ids))).numpy()
    want = jaxlora.apply(net.apply, params, lora, ids)
    assert np.abs(np.asarray(want) - base).max() > 0.1  # the adapter changes the output
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)


@pytest.mark.torch
def test_peft_refuses_a_rank_contradicting_the_tensors_too(tmp_path, model):
    net, params, ids = model
    torch, twin = _torch_twin(params)
    import peft

    ckpt.save_peft(tmp_path, _lora(model)[1], params=params, names=NAMES)
    _rewrite_config(tmp_path, r=8)
    with pytest.raises(RuntimeError, match="size mismatch for base_model.model.fc1.lora_A"):
        peft.PeftModel.from_pretrained(twin, str(tmp_path))


def test_peft_made_adapter_loads_into_jaxlora(tmp_path, model):
    net, params, ids = model
    torch, twin = _torch_twin(params)
    import peft

    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["embed", "fc1", "heads", "fc2"],
        rank_pattern={"fc2": 2},
        alpha_pattern={"heads": 5},
        use_rslora=True,
        init_lora_weights=False,  # random B: a non-trivial adapter
    )
    peft_model = peft.get_peft_model(twin, cfg).eval()
    peft_model.save_pretrained(str(tmp_path))
    with torch.no_grad():
        want = peft_model(torch.tensor(np.asarray(ids))).numpy()
    about = ckpt.info(tmp_path)  # a foreign adapter: no jaxlora metadata, torch names
    assert about.format == "peft" and about.base is None and about.modules["fc2"]["rank"] == 2
    assert about.modules["embed"]["kind"] == "embedding" and about.modules["attn.heads"]["scale"] == 5 / 2
    lora = ckpt.load_peft(tmp_path, params=params, names=NAMES, fn=net.apply, args=(ids,))
    assert lora["proj_out"].rank == 2 and lora["heads"].scale == 5 / 2 and lora["tok"].scale == 16 / 2
    got = jaxlora.apply(net.apply, params, lora, ids)
    assert np.abs(want - np.asarray(net.apply(params, ids))).max() > 0.1
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_adapter_files_get_the_mode_open_would_give(tmp_path, umask):
    params = {"params": {"fc": {"kernel": jnp.ones((4, 6))}}}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    old = os.umask(umask)
    try:
        out = ckpt.save_peft(tmp_path / "adapter", lora, params=params)
    finally:
        os.umask(old)
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in out.iterdir()}
    want = oct(0o666 & ~umask)
    assert modes == {"adapter_config.json": want, "adapter_model.safetensors": want, "jaxlora_manifest.json": want}


# adapter_config.json as PEFT writes it (every field, at PEFT's defaults), for an adapter of one Linear "fc"
_PEFT_CONFIG = {
    "peft_type": "LORA", "task_type": None, "auto_mapping": None, "base_model_name_or_path": "twin", "revision": None,
    "inference_mode": True, "peft_version": "0.21.0", "r": 2, "lora_alpha": 4, "target_modules": ["fc"],
    "exclude_modules": None, "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
    "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
    "rank_pattern": {}, "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
    "trainable_token_indices": None, "loftq_config": {}, "eva_config": None, "corda_config": None,
    "lora_ga_config": None, "use_dora": False, "velora_config": None, "alora_invocation_tokens": None,
    "use_qalora": False, "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
    "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False,
}  # fmt: skip


def _peft_made(path, **changes):
    """A PEFT-made adapter directory (no jaxlora metadata, no manifest) of ``fc`` (in 6, out 5, r 2)."""
    import safetensors.numpy

    path.mkdir()
    rng = np.random.default_rng(0)
    tensors = {f"base_model.model.fc.lora_{n}.weight": rng.normal(size=s).astype(np.float32) for n, s in
               (("A", (2, 6)), ("B", (5, 2)))}  # fmt: skip
    safetensors.numpy.save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({**_PEFT_CONFIG, **changes}))
    return path


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_peft_made_adapter_with_every_default_field_loads(tmp_path, init):
    params = {"params": {"fc": {"kernel": jnp.ones((6, 5))}}}
    lora = ckpt.load_peft(_peft_made(tmp_path / "a", init_lora_weights=init), params=params)
    assert lora["fc"].a.shape == (6, 2) and lora["fc"].scale == 2.0


@pytest.mark.parametrize(
    "changes,match",
    [  # PEFT re-runs these inits when it loads the adapter, rewriting the base weight: the factors belong to another W
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'.*base weight"),
        ({"init_lora_weights": "pissa_niter_4"}, r"init_lora_weights='pissa_niter_4'"),
        ({"init_lora_weights": "olora"}, r"init_lora_weights='olora'"),
        ({"init_lora_weights": "corda"}, r"init_lora_weights='corda'"),
        ({"init_lora_weights": "lora_ga"}, r"init_lora_weights='lora_ga'"),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, r"init_lora_weights='loftq'"),
        # these change what the adapter computes beyond W + scale·B·A
        ({"layer_replication": [[0, 1], [0, 1]]}, r"layer_replication=\[\[0, 1\], \[0, 1\]\]"),
        ({"alora_invocation_tokens": [5, 7]}, r"alora_invocation_tokens=\[5, 7\]"),
        ({"arrow_config": {"top_k": 2}}, r"arrow_config="),
        ({"use_qalora": True}, r"use_qalora=True"),
        ({"some_future_field": 3}, r"some_future_field=3"),
    ],
)
def test_peft_fields_load_peft_cannot_honour_are_named(tmp_path, changes, match):
    params = {"params": {"fc": {"kernel": jnp.ones((6, 5))}}}
    with pytest.raises(ValueError, match=r"(?s)Cannot read the PEFT adapter.*" + match):
        ckpt.load_peft(_peft_made(tmp_path / "a", **changes), params=params)


def test_a_torch_name_that_ends_another_keeps_its_own_rank_and_alpha(tmp_path):
    """PEFT takes the first rank/alpha_pattern key matching a whole dotted suffix of a module name: a key
    ``fc`` also matches ``zblock.fc``. Each module must still get its own rank and scale, in PEFT and back."""
    from jaxlora.checkpoint._peft import _pattern_value

    w = jnp.ones((4, 4))
    params = {"params": {n: {"kernel": w} for n in ("fc", "other", "other2")} | {"zblock": {"fc": {"kernel": w}}}}
    config = jaxlora.LoraConfig(
        rank=2, alpha=2, targets=["fc", "other.*"], rank_pattern={"^fc": 4}, alpha_pattern={"^fc": 8, "zblock/fc": 32}
    )
    lora = jaxlora.init(jax.random.key(0), params, config)
    made = {p: (f.a.shape[-1], f.scale) for p, f in lora.items() if "fc" in p}
    assert made == {"fc": (4, 2.0), "zblock/fc": (2, 16.0)}
    out = ckpt.save_peft(tmp_path / "a", lora, params=params, config=config)
    cfg = json.loads((out / "adapter_config.json").read_text())
    for torch_name, p in (("fc", "fc"), ("zblock.fc", "zblock/fc")):  # as PEFT reads the config
        r = _pattern_value(cfg["rank_pattern"], torch_name, cfg["r"])
        assert (r, _pattern_value(cfg["alpha_pattern"], torch_name, cfg["lora_alpha"]) / r) == (
            lora[p].a.shape[-1],
            lora[p].scale,
        ), torch_name
    back = ckpt.load_peft(out, params=params)
    assert {p: f.scale for p, f in back.items()} == {p: f.scale for p, f in lora.items()}
    # a file whose keys match more than their module (as jaxlora wrote them before) is refused, not misread
    _rewrite_config(out, alpha_pattern={"fc": 8, "zblock.fc": 32})
    with pytest.raises(ValueError, match=r"'zblock.fc': PEFT reads scale 4.0 .*saved it with scale 16.0"):
        ckpt.load_peft(out, params=params)
