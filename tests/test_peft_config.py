"""PEFT's names: `LoraConfig.from_peft` and the one-line error for ``LoraConfig(r=...)``."""

import dataclasses
import json
import pickle

import jax
import jax.numpy as jnp
import pytest

import jaxlora

PEFT_TO_JAXLORA = {
    "r": "rank",
    "lora_alpha": "alpha",
    "target_modules": "targets",
    "exclude_modules": "exclude",
    "lora_dropout": "dropout",
    "use_dora": "dora",
    "use_rslora": "rslora",
    "init_lora_weights": "init",
}
# module paths as a torch twin would name them, "." -> "/"
PARAMS = {
    "layers_0": {
        "self_attn": {"q_proj": {"kernel": jnp.ones((4, 4))}, "v_proj": {"kernel": jnp.ones((4, 4))}},
        "cross": {"q_proj": {"kernel": jnp.ones((4, 4))}},
        "mlp": {"up": {"kernel": jnp.ones((4, 4))}},
    }
}


@pytest.mark.parametrize("peft_name", sorted(PEFT_TO_JAXLORA))
def test_each_peft_spelling_names_jaxlora_s(peft_name):
    with pytest.raises(TypeError, match=rf"^[^\n]*{peft_name} -> {PEFT_TO_JAXLORA[peft_name]}[^\n]*from_peft[^\n]*$"):
        jaxlora.LoraConfig(**{peft_name: 8})


def test_several_peft_spellings_in_one_line():
    with pytest.raises(TypeError, match=r"r -> rank, lora_alpha -> alpha, target_modules -> targets; or convert"):
        jaxlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'rnk'"):  # other typos: Python's own error
        jaxlora.LoraConfig(rnk=8)


def test_config_stays_a_frozen_hashable_dataclass():
    config = jaxlora.LoraConfig(rank=4, alpha=8, targets=["q_proj"], rank_pattern={"v_proj": 2})
    back = pickle.loads(pickle.dumps(config))
    assert back == config and hash(back) == hash(config)
    assert dataclasses.replace(config, rank=2) == jaxlora.LoraConfig(
        rank=2, alpha=8, targets=["q_proj"], rank_pattern={"v_proj": 2}
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 2
    traced = jax.jit(lambda x, c: x * c.rank, static_argnums=1)
    assert traced(jnp.ones(()), config) == 4 and traced(jnp.ones(()), back) == 4
    assert [f.name for f in dataclasses.fields(config)][:3] == ["rank", "alpha", "targets"]


def test_from_peft_dict_maps_every_field():
    config = jaxlora.LoraConfig.from_peft(
        {
            "peft_type": "LORA",
            "r": 16,
            "lora_alpha": 32,
            "target_modules": ["self_attn.q_proj", "v_proj"],
            "exclude_modules": ["cross.q_proj"],
            "lora_dropout": 0.05,
            "use_dora": True,
            "use_rslora": True,
            "init_lora_weights": "gaussian",
            "modules_to_save": ["mlp.up"],
            "rank_pattern": {r"layers\.0\.self_attn\.v_proj": 4},
            "alpha_pattern": {"v_proj": 8},
            "bias": "none",
            "fan_in_fan_out": False,
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "gpt2",
            "inference_mode": True,
            "layers_to_transform": None,
            "loftq_config": {},
        },
        dtype=jnp.bfloat16,
    )
    assert (config.rank, config.alpha, config.dropout, config.dora, config.rslora, config.init) == (
        16, 32, 0.05, True, True, "gaussian"
    )  # fmt: skip
    assert config.targets == ("self_attn/q_proj", "v_proj") and config.exclude == ("cross/q_proj",)
    assert config.modules_to_save == ("mlp/up",) and config.dtype == jnp.bfloat16
    assert config.rank_for("layers_0/self_attn/v_proj") == 16  # PEFT's "layers.0" is not Flax's "layers_0"
    assert config.rank_for("layers/0/self_attn/v_proj") == 4 and config.scale_for("x/v_proj") == 8 / 4


def test_from_peft_targets_select_what_peft_would():
    pick = lambda targets: sorted(  # noqa: E731
        jaxlora.init(jax.random.key(0), PARAMS, jaxlora.LoraConfig.from_peft({"r": 2, "target_modules": targets}))
    )
    assert pick(["q_proj"]) == ["layers_0/cross/q_proj", "layers_0/self_attn/q_proj"]  # a trailing name
    assert pick(["self_attn.q_proj"]) == ["layers_0/self_attn/q_proj"]  # a dotted suffix
    assert pick(r".*self_attn\.(q|v)_proj") == ["layers_0/self_attn/q_proj", "layers_0/self_attn/v_proj"]  # a regex
    assert len(pick("all-linear")) == 4
    assert jaxlora.LoraConfig.from_peft({"target_modules": ["q_proj"]}).rank == 8  # PEFT's defaults are jaxlora's


def test_from_peft_file_and_directory(tmp_path):
    fields = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(fields))
    want = jaxlora.LoraConfig(rank=4, alpha=8, targets=["q_proj"], init="kaiming")
    assert jaxlora.LoraConfig.from_peft(tmp_path) == want
    assert jaxlora.LoraConfig.from_peft(str(tmp_path / "adapter_config.json")) == want


def test_from_peft_reads_what_save_peft_wrote(tmp_path):
    config = jaxlora.LoraConfig(rank=4, alpha=8, targets=["q_proj"], rank_pattern={"self_attn/q_proj": 2})
    lora = jaxlora.init(jax.random.key(0), PARAMS, config)
    jaxlora.checkpoint.save_peft(tmp_path, lora, params=PARAMS, config=config)
    back = jaxlora.LoraConfig.from_peft(tmp_path)
    again = jaxlora.init(jax.random.key(0), PARAMS, back)
    assert sorted(again) == sorted(lora)
    assert {p: (f.rank, f.scale) for p, f in again.items()} == {p: (f.rank, f.scale) for p, f in lora.items()}


def test_from_peft_refuses_what_it_cannot_honour_all_at_once():
    with pytest.raises(ValueError, match=r"(?s)cannot honour.*peft_type is 'IA3'.*init_from_weights.*bias='all'.*"
                       r"loftq_config.*layers_to_transform=\[0\].*target_parameters"):  # fmt: skip
        jaxlora.LoraConfig.from_peft(
            {
                "peft_type": "IA3",
                "target_modules": ["q_proj"],
                "bias": "all",
                "init_lora_weights": "pissa_niter_4",
                "loftq_config": {"loftq_bits": 4},
                "layers_to_transform": [0],
                "target_parameters": ["mlp.experts.down_proj"],
            }
        )
    with pytest.raises(ValueError, match=r"init_lora_weights=False has no jaxlora equivalent"):
        jaxlora.LoraConfig.from_peft({"target_modules": ["q"], "init_lora_weights": False})
    with pytest.raises(ValueError, match=r"init_lora_weights='olora'.*method="):
        jaxlora.LoraConfig.from_peft({"target_modules": ["q"], "init_lora_weights": "olora"})
    with pytest.raises(ValueError, match=r"target_modules is None .*pass targets= to from_peft"):
        jaxlora.LoraConfig.from_peft({"r": 4})
    assert jaxlora.LoraConfig.from_peft({"r": 4}, targets=["q"]).targets == ("q",)
    with pytest.raises(ValueError, match=r"target_modules must be a regex string or a list of module names, got 3"):
        jaxlora.LoraConfig.from_peft({"target_modules": 3})
    with pytest.raises(ValueError, match=r"Invalid LoraConfig:\n  rank must be a positive int"):
        jaxlora.LoraConfig.from_peft({"r": 0, "target_modules": ["q"]})


def test_from_peft_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no .*adapter_config.json; pass a PEFT adapter directory"):
        jaxlora.LoraConfig.from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        jaxlora.LoraConfig.from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holds a list, not a JSON object"):
        jaxlora.LoraConfig.from_peft(tmp_path)
    with pytest.raises(TypeError, match=r"takes a peft.LoraConfig, its dict, or the path .* got int"):
        jaxlora.LoraConfig.from_peft(3)


@pytest.mark.torch
def test_from_peft_of_a_real_peft_config():
    peft = pytest.importorskip("peft")
    theirs = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, use_rslora=True,
        rank_pattern={"v_proj": 4}, modules_to_save=["mlp.up"], task_type="CAUSAL_LM",
    )  # fmt: skip
    ours = jaxlora.LoraConfig.from_peft(theirs)
    assert ours == jaxlora.LoraConfig.from_peft(theirs.to_dict())
    assert (ours.rank, ours.alpha, ours.dropout, ours.rslora, ours.init) == (8, 16, 0.1, True, "kaiming")
    assert ours.targets == ("q_proj", "v_proj") and ours.modules_to_save == ("mlp/up",)
    assert ours.rank_for("layers_0/self_attn/v_proj") == 4
    with pytest.raises(ValueError, match=r"bias='lora_only'"):
        jaxlora.LoraConfig.from_peft(peft.LoraConfig(target_modules=["q"], bias="lora_only"))
