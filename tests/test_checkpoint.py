"""Orbax adapter checkpoints: round trip, base fingerprint, safety (interrupted, corrupt, foreign, newer), resume."""

import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import assert_trees_close, run_with_devices

import jaxlora
from jaxlora import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(50, 16, name="embed")(ids)
        h = nn.DenseGeneral((2, 8), name="heads")(h)  # kernel (16, 2, 8): roles "ioo"
        h = h.reshape(h.shape[:-2] + (16,))
        return nn.Dense(4, name="out")(nn.gelu(nn.Dense(16, name="mlp")(h)))


def _model():
    net, ids = Net(), jnp.arange(12).reshape(2, 6) % 50
    params = net.init(jax.random.key(0), ids)
    return net, params, ids


def _random_b(lora, key=1, dtype=None):
    """B is zero at init; give it values so round trips are tested on real numbers."""
    keys = iter(jax.random.split(jax.random.key(key), len(lora)))
    out = {}
    for p, f in lora.items():
        b = jax.random.normal(next(keys), f.b.shape, f.b.dtype)
        a = f.a if dtype is None else f.a.astype(dtype)
        out[p] = jaxlora.LoraFactors(
            a=a, b=b if dtype is None else b.astype(dtype), scale=f.scale, roles=f.roles, dropout=f.dropout
        )
    return out


@pytest.fixture(scope="module")
def trained():
    net, params, ids = _model()
    config = jaxlora.LoraConfig(
        rank=4, alpha=8, targets=["embed", "heads", "mlp", "out"], rank_pattern={"out": 2}, dropout=0.1
    )
    lora = _random_b(jaxlora.init(jax.random.key(2), params, config, fn=net.apply, args=(ids,)))
    return net, params, ids, config, lora


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_round_trip_values_dtypes_config(tmp_path, trained, dtype):
    net, params, ids, config, lora = trained
    lora = _random_b(lora, dtype=dtype)
    path = ckpt.save(tmp_path / "adapter", lora, config=config, params=params)
    back = ckpt.restore(path, params=params)
    assert list(back) == list(lora)
    for p in lora:
        f, g = lora[p], back[p]
        assert (g.scale, g.roles, g.dropout) == (f.scale, f.roles, f.dropout), p
        assert g.a.dtype == f.a.dtype and g.b.dtype == f.b.dtype, p
        np.testing.assert_array_equal(np.asarray(g.a, np.float32), np.asarray(f.a, np.float32))
        np.testing.assert_array_equal(np.asarray(g.b, np.float32), np.asarray(f.b, np.float32))
    assert lora["heads"].roles == "ioo" and back["out"].rank == 2 and back["out"].scale == 4.0
    with pytest.warns(UserWarning, match="LoRA dropout is off"):  # the config has dropout 0.1; no key here
        np.testing.assert_array_equal(
            jaxlora.apply(net.apply, params, back, ids), jaxlora.apply(net.apply, params, lora, ids)
        )
    about = ckpt.info(path)
    assert about.format == "orbax" and about.version == 1
    assert about.config == {**about.config, "rank": 4, "alpha": 8, "rank_pattern": {"out": 2}, "dropout": 0.1}
    assert about.base["embed"] == {"shape": [50, 16], "dtype": "float32", "name": "embedding", "roles": "io"}
    assert about.base["heads"]["shape"] == [16, 2, 8]
    assert about.trainable == sum(f.a.size + f.b.size for f in lora.values())
    # the adapter is small: the base is not in it
    assert about.size_bytes < 200_000


def test_config_json_round_trip(trained):
    from jaxlora.checkpoint._orbax import config_from_json, config_to_json

    config = trained[3]
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config


def test_mismatched_base_names_paths(tmp_path, trained):
    net, params, ids, config, lora = trained
    path = ckpt.save(tmp_path / "adapter", lora, params=params)
    other = Net().init(jax.random.key(0), ids)
    other["params"]["mlp"]["kernel"] = jnp.zeros((16, 32))
    other["params"]["out"]["kernel"] = jnp.zeros((32, 4))
    with pytest.raises(
        ValueError, match=r"(?s)another base model \(2 of 4.*'mlp': shape \[16, 16\] expected, found \[16, 32\]"
    ):
        ckpt.restore(path, params=other)
    del other["params"]["heads"]
    with pytest.raises(ValueError, match=r"'heads': missing from params"):
        ckpt.restore(path, params=other)


def test_never_overwrites_unless_asked(tmp_path, trained):
    lora = trained[4]
    path = ckpt.save(tmp_path / "adapter", lora)
    newer = _random_b(lora, key=7)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ckpt.save(path, newer)
    assert_trees_close(ckpt.restore(path), lora, rtol=0, atol=0)
    ckpt.save(path, newer, overwrite=True)
    assert_trees_close(ckpt.restore(path), newer, rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no leftovers


def test_restore_onto_shardings():
    out = run_with_devices(
        textwrap.dedent(
            """
            import tempfile, jax, jax.numpy as jnp, numpy as np, jaxlora
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
            params = {"params": {"up": {"kernel": jnp.ones((16, 64))}, "down": {"kernel": jnp.ones((64, 16))}}}
            lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=8))
            lora = {p: jaxlora.LoraFactors(a=f.a, b=f.b + 1.0, scale=f.scale, roles=f.roles) for p, f in lora.items()}
            path = jaxlora.checkpoint.save(tempfile.mkdtemp() + "/a", lora, params=params)
            mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
            s = lambda *spec: NamedSharding(mesh, P(*spec))
            target = {"up": jaxlora.LoraFactors(a=s(), b=s(None, "model"), scale=0.0, roles="io"),
                      "down": {"a": s("model", None), "b": s()}}
            back = jaxlora.checkpoint.restore(path, params=params, shardings=target)
            assert back["up"].b.sharding == s(None, "model"), back["up"].b.sharding
            assert back["down"].a.sharding == s("model", None)
            assert back["up"].b.addressable_shards[0].data.shape == (8, 16)
            np.testing.assert_array_equal(back["down"].a, lora["down"].a)
            one = jaxlora.checkpoint.restore(path, shardings=s())
            assert one["up"].a.sharding == s()
            print("ok")
            """
        ),
        n=8,
    )
    assert out.strip().endswith("ok")


def test_bad_shardings(tmp_path, trained):
    path = ckpt.save(tmp_path / "adapter", trained[4])
    with pytest.raises(ValueError, match=r"shardings name modules the checkpoint lacks: \['nope'\]"):
        ckpt.restore(path, shardings={"nope": None})
    with pytest.raises(TypeError, match="shardings must be"):
        ckpt.restore(path, shardings=[1])
    # jaxlora.shardings without a mesh gives PartitionSpecs, which place nothing: say so, and how
    net, params, _, _, lora = trained
    specs = jaxlora.shardings(jax.tree.map(lambda w: jax.sharding.PartitionSpec(), params), lora)
    with pytest.raises(TypeError, match=r"(?s)not a PartitionSpec.*\n  'embed'\.a: .*Pass mesh= to jaxlora\.shardings"):
        ckpt.restore(path, params=params, shardings=specs)


_SAVER = """
import sys, numpy as np, jax, jax.numpy as jnp, jaxlora
params = {"w": jnp.zeros((4096, 4096))}
lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=1024))
print("saving", flush=True)
jaxlora.checkpoint.save(sys.argv[1], lora, overwrite=True)
print("done", flush=True)
"""


def test_interrupted_save_keeps_previous(tmp_path):
    params = {"w": jnp.zeros((4096, 4096))}
    first = _random_b(jaxlora.init(jax.random.key(5), params, jaxlora.LoraConfig(rank=1024)))
    path = ckpt.save(tmp_path / "adapter", first)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        deadline = time.time() + 60
        while time.time() < deadline:  # kill as soon as the new checkpoint's files are being written
            if any(".orbax-checkpoint-tmp" in p or "jaxlora-new" in p for p in os.listdir(tmp_path)):
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in os.listdir(tmp_path) if p != "adapter"]
    assert leftovers, "the save finished before the kill; the test did not interrupt it"
    assert_trees_close(ckpt.restore(path), first, rtol=0, atol=0)
    for p in leftovers:
        with pytest.raises(ValueError, match="unfinished save|not a jaxlora adapter"):
            ckpt.restore(tmp_path / p)


_KILLED_OVERWRITE = """
import dataclasses, os, sys, jax, jax.numpy as jnp, jaxlora
real, calls = os.replace, []
def replace(src, dst):  # the process dies at the rename numbered sys.argv[2] (0: before the first)
    if len(calls) == int(sys.argv[2]):
        os._exit(9)
    calls.append(src)
    real(src, dst)
os.replace = replace
params = {"w": jnp.zeros((6, 5))}
lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2))
lora = {"w": dataclasses.replace(lora["w"], b=jnp.full(lora["w"].b.shape, 7.0))}
jaxlora.checkpoint.save(sys.argv[1], lora, overwrite=True)
"""


def _killed_overwrite(path, at):
    """Overwrite the checkpoint at ``path`` in a subprocess that ``os._exit``s at rename number ``at``."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _KILLED_OVERWRITE, str(path), str(at)], env=env, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    return {p.name.split(".jaxlora-")[1].split("-")[0]: p for p in path.parent.iterdir() if ".jaxlora-" in p.name}


def _small_lora(b):
    lora = jaxlora.init(jax.random.key(0), {"w": jnp.zeros((6, 5))}, jaxlora.LoraConfig(rank=2))
    return {"w": dataclasses.replace(lora["w"], b=jnp.full(lora["w"].b.shape, b))}


def test_overwrite_killed_between_the_renames_recovers(tmp_path):
    path = ckpt.save(tmp_path / "adapter", _small_lora(1.0))
    left = _killed_overwrite(path, at=1)  # the old one renamed away, the new one not yet in place
    assert not path.exists() and sorted(left) == ["new", "old"]
    for read in (ckpt.restore, ckpt.info):
        with pytest.warns(UserWarning, match=f"{path} does not exist.*interrupted.*{left['new']}.*{left['old']}"):
            got = read(path)
    np.testing.assert_array_equal(got.modules["w"]["b_shape"], [2, 5])
    with pytest.warns(UserWarning, match="interrupted"):
        np.testing.assert_array_equal(ckpt.restore(path)["w"].b, 7.0)  # the new one: complete, and the latest
    with pytest.raises(FileExistsError, match="already exists"):  # a checkpoint is there, for restore
        ckpt.save(path, _small_lora(2.0))
    ckpt.save(path, _small_lora(2.0), overwrite=True)
    assert os.listdir(tmp_path) == ["adapter"]  # the leftovers are gone
    np.testing.assert_array_equal(ckpt.restore(path)["w"].b, 2.0)  # no warning (they are errors here)


def test_overwrite_killed_before_the_renames_keeps_the_old(tmp_path):
    path = ckpt.save(tmp_path / "adapter", _small_lora(1.0))
    left = _killed_overwrite(path, at=0)  # the new one complete beside the old, nothing renamed
    assert sorted(left) == ["new"]
    np.testing.assert_array_equal(ckpt.restore(path)["w"].b, 1.0)  # the old one, silently: it is in place
    with pytest.raises(ValueError, match="unfinished save.*restore adapter"):
        ckpt.restore(left["new"])
    ckpt.save(path, _small_lora(2.0), overwrite=True)
    assert os.listdir(tmp_path) == ["adapter"]


def test_incomplete_new_checkpoint_is_never_used(tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    left = _killed_overwrite(ckpt.save(killed / "adapter", _small_lora(1.0)), at=1)
    for damage in ["orbax_tmp_name", "arrays_missing", "meta_corrupt"]:
        shutil.copytree(killed, tmp_path / damage)
        path, old, new = (tmp_path / damage / p.name for p in (killed / "adapter", left["old"], left["new"]))
        if damage == "orbax_tmp_name":  # a kill while Orbax wrote it: it never got its final name
            new.rename(new.with_name(new.name + ".orbax-checkpoint-tmp-1234"))
        elif damage == "arrays_missing":
            shutil.rmtree(new / "lora")
        else:
            (new / "lora_meta" / "metadata").write_text("{")
        with pytest.warns(UserWarning, match=f"Using the complete checkpoint it left at {old} \\(the newest of 1"):
            np.testing.assert_array_equal(ckpt.restore(path)["w"].b, 1.0)
        shutil.rmtree(old)
        with pytest.raises(FileNotFoundError, match="does not exist"):
            ckpt.restore(path)


# TensorStore reports the failed reads to Orbax's event loop after Orbax has closed it (an Orbax quirk,
# not ours): the resulting "Event loop is closed" messages are unraisable and harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_arrays(tmp_path, trained):
    lora = trained[4]
    cut = ckpt.save(tmp_path / "truncated", lora)
    data = [os.path.join(r, n) for r, _, files in os.walk(cut / "lora") if os.path.basename(r) == "d" for n in files]
    assert data
    for f in data:  # cut every data file in half
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(
        ckpt.CorruptCheckpointError, match="is damaged; restore an earlier.*\n  lora/.*bytes, .*written"
    ):
        ckpt.restore(cut)  # the manifest's sizes catch it before a byte of the arrays is read
    (cut / "jaxlora_manifest.json").unlink()  # as written before manifests: Orbax's own read fails
    with pytest.warns(UserWarning, match="no jaxlora_manifest.json.*unverified"):
        with pytest.raises(ValueError, match="truncated or corrupt: reading its arrays failed.*restore an earlier"):
            ckpt.restore(cut)
    time.sleep(1.0)  # let TensorStore's late callbacks arrive within this test
    gc.collect()


def _edit(checkpoint, rel, text=None):
    """Rewrite (or, with ``text=None``, delete) a file of a checkpoint, and its manifest to match: the
    damage the manifest would catch, made to reach the checks behind it."""
    from jaxlora.checkpoint import _commit

    f = checkpoint / rel
    shutil.rmtree(f) if text is None else f.write_text(text)
    _commit.write_manifest(checkpoint, _commit.read_manifest(checkpoint)["kind"])


def test_corrupt_foreign_and_newer(tmp_path, trained):
    net, params, ids, config, lora = trained
    good = ckpt.save(tmp_path / "good", lora, params=params)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.restore(tmp_path / "missing")
    # corrupt metadata
    bad = ckpt.save(tmp_path / "badjson", lora)
    size = (bad / "lora_meta" / "metadata").stat().st_size  # (the JSON's size, now with the arrays' SHA-256)
    with pytest.raises(
        ckpt.CorruptCheckpointError, match=f"is damaged.*\n  lora_meta/metadata: 24 bytes, {size} written"
    ):
        (bad / "lora_meta" / "metadata").write_text('{"format": "jaxlora.adap')
        ckpt.restore(bad)
    _edit(bad, "lora_meta/metadata", '{"format": "jaxlora.adap')
    with pytest.raises(ValueError, match="is corrupt: lora_meta/metadata is not valid JSON.*earlier checkpoint"):
        ckpt.restore(bad)
    # arrays missing entirely
    gone = ckpt.save(tmp_path / "noarrays", lora)
    _edit(gone, "lora")
    with pytest.raises(ValueError, match="'lora' item .* is missing"):
        ckpt.restore(gone)
    # newer format version
    newer = ckpt.save(tmp_path / "newer", lora)
    meta = json.loads((newer / "lora_meta" / "metadata").read_text())
    _edit(newer, "lora_meta/metadata", json.dumps({**meta, "version": 99, "jaxlora_version": "9.0"}))
    with pytest.raises(ValueError, match="format version 99, written by a newer jaxlora.*Upgrade jaxlora"):
        ckpt.restore(newer)
    # another library's Orbax checkpoint; a plain directory; a PEFT directory; a file
    with ocp.StandardCheckpointer() as saver:
        saver.save(tmp_path / "params", params)
    with pytest.raises(ValueError, match="not a jaxlora adapter checkpoint"):
        ckpt.restore(tmp_path / "params")
    other = ckpt.save(tmp_path / "foreign", lora)
    _edit(other, "lora_meta/metadata", json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format 'something-else', expected 'jaxlora.adapter'"):
        ckpt.restore(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no lora_meta/metadata file"):
        ckpt.info(tmp_path / "empty")
    (tmp_path / "peftlike").mkdir()
    (tmp_path / "peftlike" / "adapter_config.json").write_text("{}")
    (tmp_path / "peftlike" / "lora_meta").mkdir()
    with pytest.raises(ValueError, match="PEFT adapter: use jaxlora.checkpoint.load_peft"):
        ckpt.restore(tmp_path / "peftlike")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        ckpt.restore(tmp_path / "file")
    assert_trees_close(ckpt.restore(good, params=params), lora, rtol=0, atol=0)


def _train_setup():
    net, params, ids = _model()
    config = jaxlora.LoraConfig(rank=4, targets=["mlp", "out", "heads"])
    lora = jaxlora.init(jax.random.key(3), params, config, fn=net.apply, args=(ids,))
    y = jax.random.normal(jax.random.key(4), (2, 6, 4))
    tx = optax.adam(1e-2)

    @jax.jit
    def step(lora, opt_state):
        loss_fn = lambda lora: jnp.mean((jaxlora.apply(net.apply, params, lora, ids) - y) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return params, config, lora, tx, step


def test_manager_resume_matches_uninterrupted(tmp_path):
    params, config, lora0, tx, step = _train_setup()
    lora, opt_state, losses = lora0, tx.init(lora0), []
    for _ in range(8):
        lora, opt_state, loss = step(lora, opt_state)
        losses.append(float(loss))

    options = ocp.CheckpointManagerOptions(save_interval_steps=2, max_to_keep=2, enable_async_checkpointing=True)
    lora, opt_state = lora0, tx.init(lora0)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
        for i in range(1, 6):  # "crashes" after step 5; the last save was step 4
            lora, opt_state, _ = step(lora, opt_state)
            mngr.save(
                i,
                args=ocp.args.Composite(
                    **ckpt.save_args(lora, config=config, params=params), opt_state=ocp.args.StandardSave(opt_state)
                ),
            )
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 4]  # every 2 steps, keep the last 2
    with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
        abstract = jax.eval_shape(tx.init, lora0)
        lora, rest = ckpt.restore_step(mngr, params=params, opt_state=ocp.args.StandardRestore(abstract))
        assert mngr.latest_step() == 4
    opt_state = rest["opt_state"]
    resumed = []
    for _ in range(4):
        lora, opt_state, loss = step(lora, opt_state)
        resumed.append(float(loss))
    np.testing.assert_allclose(resumed, losses[4:], rtol=1e-6)
    assert resumed[0] == losses[4]  # exactly the same next-step loss


def test_restore_step_errors(tmp_path, trained):
    with ocp.CheckpointManager(tmp_path / "empty") as mngr:
        with pytest.raises(FileNotFoundError, match="holds no finished checkpoint step"):
            ckpt.restore_step(mngr)
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, args=ocp.args.Composite(**ckpt.save_args(trained[4])))
        mngr.wait_until_finished()
    with pytest.raises(ValueError, match=r"CheckpointManager steps \['1'\]"):
        ckpt.restore(tmp_path / "run")
    assert_trees_close(ckpt.restore(tmp_path / "run" / "1"), trained[4], rtol=0, atol=0)


def test_a_flipped_bit_in_a_manager_step_is_refused(tmp_path):
    """A CheckpointManager step is Orbax's directory, which no jaxlora manifest covers: one flipped bit in
    its array file was restored as other factors, silently (every one of 8 flips). The SHA-256 of each
    array's values, recorded by save_args, makes restore_step (and restore of the step) refuse it."""
    params = {"w": jnp.ones((512, 256))}
    lora = jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=32, targets="w"))
    lora = jax.tree.map(lambda v: jax.random.normal(jax.random.key(1), v.shape), lora)  # no zeros, no repeats
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, args=ocp.args.Composite(**ckpt.save_args(lora)))
        mngr.wait_until_finished()
    big = max((f for f in (tmp_path / "run" / "1").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    clean = big.read_bytes()
    assert len(clean) > 50_000  # the arrays' data file
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, len(clean), 8):
        data = bytearray(clean)
        data[pos] ^= 1 << int(rng.integers(0, 8))
        big.write_bytes(bytes(data))
        for read in (lambda: ckpt.restore_step(ocp.CheckpointManager(tmp_path / "run"))[0],
                     lambda: ckpt.restore(tmp_path / "run" / "1")):  # fmt: skip
            try:
                got = read()
            except ValueError:  # CorruptCheckpointError, or Orbax's own read failing
                continue
            assert_trees_close(got, lora, rtol=0, atol=0)  # else only exactly what was saved
    data = bytearray(clean)
    data[len(clean) // 2] ^= 1
    big.write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"values read back differ from those saved .* 'w'\.[ab];"):
        ckpt.restore_step(ocp.CheckpointManager(tmp_path / "run"))


# ---- merged export ----------------------------------------------------------------------------------


def test_save_merged_safetensors_and_orbax(tmp_path, trained):
    from safetensors.numpy import load_file

    net, params, ids, config, lora = trained
    want = jaxlora.merge(params, lora)
    out = ckpt.save_merged(tmp_path / "m.safetensors", params, lora)
    got = load_file(str(out))
    flat = {"/".join(str(k.key) for k in kp[1:]): v for kp, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    assert sorted(got) == sorted(flat)
    for k in flat:
        np.testing.assert_array_equal(got[k], np.asarray(flat[k]), err_msg=k)
    # numpy reference for one merged weight
    f = lora["mlp"]
    ref = np.asarray(params["params"]["mlp"]["kernel"], np.float64) + f.scale * np.asarray(
        f.a, np.float64
    ) @ np.asarray(f.b, np.float64)
    np.testing.assert_allclose(got["mlp/kernel"], ref, rtol=1e-5, atol=1e-6)
    # a renaming layout with a transpose (e.g. to torch (out, in))
    t = ckpt.save_merged(
        tmp_path / "t.safetensors",
        params,
        lora,
        layout=lambda p: (p.replace("/", "."), (1, 0) if p.endswith("mlp/kernel") else None),
    )
    np.testing.assert_array_equal(load_file(str(t))["mlp.kernel"], got["mlp/kernel"].T)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ckpt.save_merged(out, params, lora)
    with pytest.raises(ValueError, match='format must be "safetensors" or "orbax"'):
        ckpt.save_merged(tmp_path / "x", params, lora, format="npz")
    o = ckpt.save_merged(tmp_path / "orbax", params, lora, format="orbax")
    assert_trees_close(ocp.v1.load(o, jax.tree.map(ocp.utils.to_shape_dtype_struct, params)), want, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ckpt.save_merged(o, params, lora, format="orbax")
    assert_trees_close(
        ocp.v1.load(
            ckpt.save_merged(o, params, lora, format="orbax", overwrite=True),
            jax.tree.map(ocp.utils.to_shape_dtype_struct, params),
        ),
        want,
    )


def test_save_merged_orbax_writes_in_chunks(tmp_path, trained, monkeypatch):
    """With a chunk smaller than one weight, every weight goes through its own partial save."""
    from orbax.checkpoint.experimental.v1 import partial

    from jaxlora.checkpoint import _merged

    net, params, ids, config, lora = trained
    calls = []
    real = partial.save
    monkeypatch.setattr(_merged, "CHUNK_BYTES", 1)
    monkeypatch.setattr(
        partial, "save", lambda path, chunk: (calls.append(len(jax.tree.leaves(chunk))), real(path, chunk))
    )
    out = ckpt.save_merged(tmp_path / "orbax", params, lora, format="orbax")
    assert calls == [1] * len(jax.tree.leaves(params))
    assert_trees_close(
        ocp.v1.load(out, jax.tree.map(ocp.utils.to_shape_dtype_struct, params)),
        jaxlora.merge(params, lora),
        rtol=0,
        atol=0,
    )


def test_merge_safetensors_streams_one_tensor_at_a_time(tmp_path):
    """Merging a PEFT adapter into a 32 MB base keeps traced host memory near one 4 MB tensor."""
    import tracemalloc

    from safetensors.numpy import load_file, save_file

    n, d = 8, 1024
    rng = np.random.default_rng(0)
    base = {f"layers.{i}.fc.weight": rng.standard_normal((d, d), np.float32) for i in range(n)}
    base["embed.weight"] = rng.standard_normal((100, d), np.float32)
    save_file(base, str(tmp_path / "base.safetensors"))
    params = {k.replace(".", "/"): v for k, v in base.items()}  # torch layout: "weight" (out, in); "embed" lookup
    params = {"layers": {str(i): {"fc": {"weight": base[f"layers.{i}.fc.weight"]}} for i in range(n)}}
    lora = _random_b(jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=4, alpha=8)))
    ckpt.save_peft(tmp_path / "adapter", lora)
    del params
    tracemalloc.start()
    try:
        ckpt.merge_safetensors(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * d * d * 4, f"peak {peak / 2**20:.1f} MB for a {n * d * d * 4 / 2**20:.0f} MB model"
    got = load_file(str(tmp_path / "out.safetensors"))
    for i in range(n):
        f = lora[f"layers/{i}/fc"]
        ref = base[f"layers.{i}.fc.weight"] + f.scale * (np.asarray(f.a) @ np.asarray(f.b)).T
        np.testing.assert_allclose(got[f"layers.{i}.fc.weight"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["embed.weight"], base["embed.weight"])
    wrong = {"layers": {"0": {"fc": {"weight": jnp.zeros((d, 2 * d))}}}}
    ckpt.save_peft(tmp_path / "wrong", jaxlora.init(jax.random.key(0), wrong, jaxlora.LoraConfig(rank=2)))
    with pytest.raises(ValueError, match=r"'layers.0.fc.weight': base \(1024, 1024\), adapter expects \(1024, 2048\)"):
        ckpt.merge_safetensors(tmp_path / "base.safetensors", tmp_path / "wrong", tmp_path / "o2.safetensors")
