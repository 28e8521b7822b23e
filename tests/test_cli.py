"""The command line on real checkpoints: inspect, merge, convert; exit codes and messages."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import assert_trees_close

import jaxlora
from jaxlora import checkpoint as ckpt
from jaxlora.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base (Orbax params), a jaxlora adapter and the same adapter in PEFT format."""
    d = tmp_path_factory.mktemp("cli")
    up, down = jax.random.normal(jax.random.key(0), (8, 32)), jax.random.normal(jax.random.key(1), (32, 8))
    params = {"params": {"up": {"kernel": up}, "down": {"kernel": down, "bias": jnp.zeros(8)}}}
    config = jaxlora.LoraConfig(rank=4, alpha=8, rank_pattern={"down": 2})
    lora = jaxlora.init(jax.random.key(2), params, config)
    lora = {p: jaxlora.LoraFactors(f.a, f.b + 0.1, f.scale, f.roles) for p, f in lora.items()}
    with ocp.StandardCheckpointer() as c:
        c.save(d / "base", params)
    ckpt.save(d / "adapter", lora, config=config, params=params)
    ckpt.save_peft(d / "peft", lora, params=params, config=config)
    return d, params, config, lora


def test_inspect_text_and_json(saved, capsys):
    d, params, config, lora = saved
    assert main(["inspect", str(d / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "format:     orbax (version 1)" in out and "modules:    2" in out and "rank:       [2, 4]" in out
    assert f"parameters: {sum(f.a.size + f.b.size for f in lora.values()):,} (LoRA)" in out
    assert "base:       2 adapted weights, 512 parameters" in out
    assert "up" in out and "weight [8, 32]" in out and "on disk" in out
    assert main(["inspect", "--json", str(d / "peft")]) == 0
    about = json.loads(capsys.readouterr().out)
    assert about["format"] == "peft" and about["modules"]["down"]["rank"] == 2 and about["config"]["alpha"] == 8


def test_convert_both_ways(saved, tmp_path, capsys):
    d, params, config, lora = saved
    assert main(["convert", str(d / "adapter"), str(tmp_path / "p")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert_trees_close(ckpt.load_peft(tmp_path / "p", params=params), lora, rtol=0, atol=0)
    assert main(["convert", str(tmp_path / "p"), str(tmp_path / "o")]) == 0
    back = ckpt.restore(tmp_path / "o", params=params)
    assert_trees_close(back, lora, rtol=0, atol=0)
    assert ckpt.info(tmp_path / "o").config == ckpt.info(d / "adapter").config
    assert ckpt.info(tmp_path / "o").base == ckpt.info(d / "adapter").base
    assert main(["convert", str(d / "peft"), str(tmp_path / "o2"), "--base", str(d / "base")]) == 0
    assert_trees_close(ckpt.restore(tmp_path / "o2", params=params), lora, rtol=0, atol=0)


def test_merge_orbax_and_safetensors(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    d, params, config, lora = saved
    want = jaxlora.merge(params, lora)
    for adapter in ("adapter", "peft"):
        out = tmp_path / f"merged_{adapter}"
        assert main(["merge", str(d / "base"), str(d / adapter), str(out)]) == 0
        assert_trees_close(
            ocp.v1.load(out, jax.tree.map(ocp.utils.to_shape_dtype_struct, params)), want, rtol=0, atol=0
        )
    assert main(["merge", str(d / "base"), str(d / "adapter"), str(tmp_path / "m.safetensors")]) == 0
    np.testing.assert_array_equal(
        load_file(str(tmp_path / "m.safetensors"))["up/kernel"], want["params"]["up"]["kernel"]
    )
    # a Hugging Face style base: torch names and (out, in) layouts, with a name mapping for the jaxlora adapter
    t = lambda x: np.ascontiguousarray(np.asarray(x).T)  # noqa: E731 (save_file writes the raw buffer)
    hf = {
        "model.up_proj.weight": t(params["params"]["up"]["kernel"]),
        "model.down_proj.weight": t(params["params"]["down"]["kernel"]),
    }
    save_file(hf, str(tmp_path / "hf.safetensors"))
    (tmp_path / "names.json").write_text(json.dumps({"(up|down)": r"model.\1_proj"}))
    assert main(["merge", str(tmp_path / "hf.safetensors"), str(d / "adapter"), str(tmp_path / "hf_merged.safetensors"),
                 "--names", str(tmp_path / "names.json")]) == 0  # fmt: skip
    got = load_file(str(tmp_path / "hf_merged.safetensors"))
    np.testing.assert_allclose(
        got["model.up_proj.weight"], np.asarray(want["params"]["up"]["kernel"]).T, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        got["model.down_proj.weight"], np.asarray(want["params"]["down"]["kernel"]).T, rtol=1e-6, atol=1e-6
    )


def test_errors_and_exit_codes(saved, tmp_path, capsys):
    d, params, config, lora = saved
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "inspect: error: No adapter checkpoint at" in capsys.readouterr().err
    assert main(["merge", str(d / "base"), str(d / "adapter"), str(d / "adapter")]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(d / "adapter"), str(tmp_path / "x"), "--to", "orbax"]) == 1
    assert "already in orbax format; pick --to peft" in capsys.readouterr().err
    assert main(["convert", str(d / "base"), str(tmp_path / "x")]) == 1
    assert "is not an adapter" in capsys.readouterr().err
    assert main(["merge", str(d / "adapter"), str(d / "adapter"), str(tmp_path / "y")]) == 1
    assert "pass the base model" in capsys.readouterr().err
    assert main(["merge", str(d / "base"), str(d / "adapter"), str(tmp_path / "z"), "--names", "nope"]) == 1
    assert "expected FILE.json, MODULE:ATTR" in capsys.readouterr().err
    assert main(["merge", str(d / "base"), str(d / "adapter"), str(tmp_path / "z"), "--names", "json:NOPE"]) == 1
    assert "json has no attribute 'NOPE'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["merge", str(d / "base")])
    assert e.value.code == 2
    assert "the following arguments are required: adapter, out" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["inspect"], ["merge"], ["convert"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: python -m jaxlora {command[0] if command else ''}".strip() in out
    if not command:
        assert all(c in out for c in ("inspect", "merge", "convert"))
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_shell(saved):
    """As a shell user runs it: output on stdout, errors on stderr, exit statuses 0 and 1."""
    d = saved[0]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", "jaxlora", *a], env=env, capture_output=True, text=True)  # noqa: E731
    r = run("inspect", str(d / "adapter"))
    assert r.returncode == 0 and "rank:" in r.stdout and r.stderr == ""
    r = run("inspect", str(d / "nope"))
    assert r.returncode == 1 and r.stdout == "" and "python -m jaxlora inspect: error:" in r.stderr


def test_merged_export_can_be_a_base_again(saved, tmp_path):
    """A merged Orbax export (Orbax's v1 layout) is accepted as the base of another merge."""
    d, params, config, lora = saved
    assert main(["merge", str(d / "base"), str(d / "adapter"), str(tmp_path / "once")]) == 0
    assert main(["merge", str(tmp_path / "once"), str(d / "adapter"), str(tmp_path / "twice")]) == 0
    twice = ocp.v1.load(tmp_path / "twice", jax.tree.map(ocp.utils.to_shape_dtype_struct, params))
    assert_trees_close(twice, jaxlora.merge(jaxlora.merge(params, lora), lora), rtol=1e-6, atol=1e-6)


def test_merge_into_torch_names_without_names_says_so(saved, tmp_path, capsys):
    """A jaxlora adapter merged into a Hugging Face base whose names differ: the error names the user's
    adapter (not the temporary PEFT copy the CLI makes), lists a few of the paths, and suggests --names."""
    from safetensors.numpy import save_file

    d, params, _, _ = saved
    t = lambda x: np.ascontiguousarray(np.asarray(x).T)  # noqa: E731
    save_file({"model.up_proj.weight": t(params["params"]["up"]["kernel"])}, str(tmp_path / "hf.safetensors"))
    assert main(["merge", str(tmp_path / "hf.safetensors"), str(d / "adapter"), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert f"The adapter {d / 'adapter'} does not fit the base {tmp_path / 'hf.safetensors'}" in err
    assert "'up.weight': not in the base" in err and "pass --names" in err
    assert "tmp" not in err.replace(str(tmp_path), "").replace(str(d), ""), err  # no internal temporary directory
    assert len(err.splitlines()) < 12


def test_help_does_not_import_jax():
    """``python -m jaxlora --help`` answers without importing JAX (the names load on first use)."""
    code = (
        "import runpy, sys\n"
        "for argv in (['--help'], ['merge', '--help']):\n"
        "    sys.argv = ['jaxlora', *argv]\n"
        "    try:\n"
        "        runpy.run_module('jaxlora', run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print('imported jax:', 'jax' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "usage: python -m jaxlora merge" in r.stdout and r.stdout.endswith("imported jax: False\n"), r.stdout


def test_convert_refuses_flax_names_without_names_or_keep_names(tmp_path, capsys):
    params = {"params": {"layers_0": {"Dense_0": {"kernel": jnp.ones((4, 6))}}, "head": {"kernel": jnp.ones((6, 2))}}}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
    ckpt.save(tmp_path / "adapter", lora, params=params)
    assert main(["convert", str(tmp_path / "adapter"), str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "['layers_0/Dense_0'] are Flax names" in err and "Pass --names" in err and "--keep-names" in err
    assert not (tmp_path / "p").exists()
    assert main(["convert", str(tmp_path / "adapter"), str(tmp_path / "p"), "--keep-names", "--names", "x.json"]) == 1
    assert "--names and --keep-names contradict each other" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "adapter"), str(tmp_path / "p"), "--keep-names"]) == 0
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["target_modules"] == [
        "head", "layers_0.Dense_0"
    ]  # fmt: skip
    (tmp_path / "names.json").write_text(json.dumps({"layers_(\\d+)/Dense_0": r"layers.\1.fc", "head": "head"}))
    assert (
        main(["convert", str(tmp_path / "adapter"), str(tmp_path / "q"), "--names", str(tmp_path / "names.json")]) == 0
    )
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["target_modules"] == ["head", "layers.0.fc"]


def test_a_safetensors_file_jaxlora_wrote_is_a_merge_base(saved, tmp_path):
    from safetensors.numpy import load_file

    d, params, config, lora = saved
    once = jaxlora.merge(params, lora)
    twice = jaxlora.merge(once, lora)
    assert main(["merge", str(d / "base"), str(d / "adapter"), str(tmp_path / "once.safetensors")]) == 0
    for adapter in ("adapter", "peft"):
        out = tmp_path / f"twice_{adapter}.safetensors"
        assert main(["merge", str(tmp_path / "once.safetensors"), str(d / adapter), str(out)]) == 0
        got = load_file(str(out))
        assert sorted(got) == ["down/bias", "down/kernel", "up/kernel"]
        np.testing.assert_allclose(got["up/kernel"], twice["params"]["up"]["kernel"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["down/kernel"], twice["params"]["down"]["kernel"], rtol=1e-6, atol=1e-6)
    assert main(["merge", str(tmp_path / "once.safetensors"), str(d / "adapter"), str(tmp_path / "twice_orbax")]) == 0
    back = ocp.v1.load(tmp_path / "twice_orbax", jax.tree.map(ocp.utils.to_shape_dtype_struct, params["params"]))
    np.testing.assert_allclose(back["up"]["kernel"], twice["params"]["up"]["kernel"], rtol=1e-6, atol=1e-6)


def test_names_file_relative_to_cwd_or_importable(saved, tmp_path, monkeypatch, capsys):
    d, params, config, lora = saved
    pkg = tmp_path / "lib" / "mymaps"
    pkg.mkdir(parents=True)
    (pkg / "shared.py").write_text('PREFIX = "model."\n')
    (pkg / "bert.py").write_text('from shared import PREFIX\nNAMES = {"(up|down)": PREFIX + r"\\1_proj"}\n')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative FILE.py is read from here; its sibling imports work
    assert main(["convert", str(d / "adapter"), "a", "--names", "../lib/mymaps/bert.py:NAMES"]) == 0
    assert json.loads((work / "a" / "adapter_config.json").read_text())["target_modules"] == [
        "model.down_proj", "model.up_proj"
    ]  # fmt: skip
    assert "json" in sys.modules and sys.modules["json"].__name__ == "json"  # nothing shadowed
    (pkg / "plain.py").write_text('NAMES = {"(up|down)": r"net.\\1"}\n')
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))  # not a file here, but an importable module path
    assert main(["convert", str(d / "adapter"), "b", "--names", "mymaps/plain.py:NAMES"]) == 0
    assert json.loads((work / "b" / "adapter_config.json").read_text())["target_modules"] == ["net.down", "net.up"]
    assert main(["convert", str(d / "adapter"), "c", "--names", "nowhere/x.py:NAMES"]) == 1
    err = capsys.readouterr().err
    assert "no file" in err and "no importable module 'nowhere.x'" in err and str(work) in err
    assert main(["convert", str(d / "adapter"), "c", "--names", "missing.json"]) == 1
    assert "--names 'missing.json': no file" in capsys.readouterr().err


def test_merge_of_a_torch_named_adapter_suggests_names(saved, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    d, params, config, lora = saved
    (tmp_path / "names.json").write_text(json.dumps({"(up|down)": r"model.\1_proj"}))
    assert main(["convert", str(d / "adapter"), str(tmp_path / "hf"), "--names", str(tmp_path / "names.json")]) == 0
    weights = tmp_path / "hf" / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # as PEFT writes it: no jaxlora metadata to place it by
    (tmp_path / "hf" / "jaxlora_manifest.json").unlink()  # nor a manifest
    assert main(["merge", str(d / "base"), str(tmp_path / "hf"), str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "torch module 'model.up_proj' matches no weight" in err and "pass --names" in err
    assert main(["merge", str(d / "base"), str(tmp_path / "hf"), str(tmp_path / "m"),
                 "--names", str(tmp_path / "names.json")]) == 0  # fmt: skip
    # a PEFT adapter with jaxlora's names merged into a Hugging Face base: convert it again with --names
    t = lambda x: np.ascontiguousarray(np.asarray(x).T)  # noqa: E731
    save_file({"model.up_proj.weight": t(params["params"]["up"]["kernel"])}, str(tmp_path / "base.safetensors"))
    assert main(["merge", str(tmp_path / "base.safetensors"), str(d / "peft"), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "'up.weight': not in the base" in err and "convert the jaxlora adapter again with --names" in err


def test_merges_report_progress(saved, tmp_path):
    from safetensors.numpy import save_file

    d, params, config, lora = saved
    calls = []
    ckpt.save_merged(tmp_path / "m.safetensors", params, lora, progress=lambda *a: calls.append(a))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    base = {"up.weight": np.ones((32, 8), np.float32), "down.weight": np.ones((8, 32), np.float32)}
    save_file(base | {"x": np.ones(2, np.float32)}, str(tmp_path / "b.safetensors"))
    ckpt.merge_safetensors(
        tmp_path / "b.safetensors", d / "peft", tmp_path / "o.safetensors", progress=lambda *a: calls.append(a)
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
