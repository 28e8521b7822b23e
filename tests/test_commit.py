"""The write protocol of every checkpoint writer (jaxlora/checkpoint/_commit.py), on real files.

``faults.py`` (next to this file) runs the kill and corruption campaigns at large counts.
"""

import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jaxlora import checkpoint as ckpt
from jaxlora.checkpoint import _commit

sys.path.insert(0, os.path.dirname(__file__))
import faults  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("kind", faults.KINDS)
def test_overwrite_keeps_old_or_new_when_the_write_fails(tmp_path, kind, monkeypatch):
    w = faults.Writer(kind, size=8, rank=2)
    path = w.save(tmp_path / w.name, 1)
    old = w.load(path)
    last = "seal" if kind == "safetensors" else "write_manifest"  # the step before the rename
    real = getattr(_commit, last)

    def fail_late(*a, **k):  # every file written, the manifest (the checksum) not: no commit
        raise KeyboardInterrupt

    def fail_early(*a, **k):  # the array writer itself fails part way
        raise OSError(28, "No space left on device")

    for fail, exc in ((fail_late, KeyboardInterrupt), (fail_early, OSError)):
        with monkeypatch.context() as m:
            if fail is fail_late:
                m.setattr(_commit, last, fail)
            else:
                w.break_writer(m, fail)
            with pytest.raises(exc):
                w.save(path, 2, overwrite=True)
        _same(w.load(path), old)
        assert sorted(os.listdir(tmp_path)) == [w.name], os.listdir(tmp_path)  # no staging left behind
    assert getattr(_commit, last) is real
    w.save(path, 2, overwrite=True)
    _same(w.load(path), w.expected(2))


def test_peft_files_swap_together_when_the_config_write_fails(tmp_path, monkeypatch):
    """Issue 22 item 5: a failed adapter_config.json write (disk full) never leaves new factors beside
    the old lora_alpha."""
    w = faults.Writer("peft", size=8, rank=2)
    path = w.save(tmp_path / "peft", 1)
    real = type(path).write_text

    def full(self, *a, **k):
        if self.name == "adapter_config.json":
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(type(path), "write_text", full)
    with pytest.raises(OSError, match="No space"):
        w.save(path, 2, overwrite=True)
    monkeypatch.undo()
    _same(w.load(path), w.expected(1))


@pytest.mark.parametrize("kind", faults.KINDS)
def test_corruption_is_raised_or_restored_right(tmp_path, kind):
    """One bit flipped at sampled offsets of every file, and every file truncated: never silently wrong."""
    counts = faults.corrupt(faults.Writer(kind, size=16, rank=4), tmp_path, flips_per_file=2, seed=0)
    assert counts["silently_wrong"] == 0, counts
    assert counts["corruptions"] > 0 and counts["raised"] > 0, counts


@pytest.mark.parametrize("kind", ["adapter", "stack", "merged", "safetensors"])
def test_overwrite_refuses_what_is_not_its_kind(tmp_path, kind):
    w = faults.Writer(kind, size=8, rank=2)
    project = tmp_path / ("project.safetensors" if kind == "safetensors" else "project")
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("print('hello')\n")
    with pytest.raises(ValueError, match=r"project(\.safetensors)? is a directory holding \['src'\], not .*nothing"):
        w.save(project, 1, overwrite=True)
    assert (project / "src" / "train.py").read_text() == "print('hello')\n"
    other = "stack" if kind == "adapter" else "adapter"
    theirs = faults.Writer(other, size=8, rank=2).save(
        tmp_path / ("x.safetensors" if kind == "safetensors" else "x"), 1
    )
    with pytest.raises(ValueError, match=f"is a jaxlora {other} checkpoint, not "):
        w.save(theirs, 1, overwrite=True)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        w.save(theirs, 1)


def test_overwrite_never_replaces_an_orbax_checkpoint_or_safetensors_file_jaxlora_did_not_write(tmp_path):
    """A user's own Orbax state or weights file has a merged export's layout but no manifest (no checksum in
    the header): overwrite=True once replaced them; it now refuses, naming what is there, and keeps them."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file, save_file

    state = {"w": np.arange(6.0).reshape(2, 3)}
    theirs = tmp_path / "train_state"
    with ocp.StandardCheckpointer() as c:
        c.save(theirs, state)
    weights = tmp_path / "base.safetensors"
    save_file(state, weights)
    for kind, path, what in (("merged", theirs, "Orbax checkpoint"), ("safetensors", weights, ".safetensors file")):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        with pytest.raises(ValueError, match=f"is an? {what} jaxlora did not write .*nothing was written"):
            faults.Writer(kind, size=8, rank=2).save(path, 1, overwrite=True)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing removed, nothing left behind
    with ocp.StandardCheckpointer() as c:
        np.testing.assert_array_equal(c.restore(theirs)["w"], state["w"])
    np.testing.assert_array_equal(load_file(weights)["w"], state["w"])
    ours = faults.Writer("merged", size=8, rank=2).save(tmp_path / "export", 1)  # jaxlora's own: replaced
    faults.Writer("merged", size=8, rank=2).save(ours, 2, overwrite=True)


def test_peft_carries_files_it_did_not_write(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# my adapter\n")
    w = faults.Writer("peft", size=8, rank=2)
    w.save(repo, 1)  # an existing directory without an adapter is a place to write one, as before
    w.save(repo, 2, overwrite=True)
    assert (repo / "README.md").read_text() == "# my adapter\n"
    assert "README.md" not in _commit.read_manifest(repo)["files"]  # carried, not vouched for
    _same(w.load(repo), w.expected(2))
    adapter = faults.Writer("adapter", size=8, rank=2).save(tmp_path / "orbax", 1)
    with pytest.raises(ValueError, match="is a jaxlora adapter checkpoint, not a PEFT adapter directory"):
        w.save(adapter, 1, overwrite=True)


def test_peft_into_a_directory_of_other_files_keeps_that_directory(tmp_path, monkeypatch):
    """save_peft into a run's output directory (no checkpoint there) once copied the directory and deleted
    the original: a log file open in it kept writing into the deleted copy, and every line after the save
    was lost without a word. The directory must stay (same inode); its files are untouched."""
    run = tmp_path / "run"
    run.mkdir()
    log = open(run / "train.log", "w")
    log.write("step 1\n")
    log.flush()
    inode = os.stat(run).st_ino
    w = faults.Writer("peft", size=8, rank=2)
    w.save(run, 1)
    log.write("step 2\n")
    log.flush()
    assert os.stat(run).st_ino == inode
    assert (run / "train.log").read_text() == "step 1\nstep 2\n"
    _same(w.load(run), w.expected(1))
    w.save(run, 2, overwrite=True)  # replacing the adapter there: in place too
    log.write("step 3\n")
    log.close()
    assert (run / "train.log").read_text() == "step 1\nstep 2\nstep 3\n"
    assert os.stat(run).st_ino == inode and sorted(os.listdir(tmp_path)) == ["run"]
    assert "train.log" not in _commit.read_manifest(run)["files"]  # not vouched for
    _same(w.load(run), w.expected(2))
    # the weights renamed in, the config's rename fails: the old adapter back
    _fail_replace(monkeypatch, 2, OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        w.save(run, 3, overwrite=True)
    monkeypatch.undo()
    _same(w.load(run), w.expected(2))
    assert sorted(os.listdir(tmp_path)) == ["run"] and sorted(os.listdir(run)) == sorted(
        ["train.log", "adapter_config.json", "adapter_model.safetensors", _commit.MANIFEST]
    )


def test_a_kill_between_the_renames_into_a_directory_of_other_files_keeps_the_old_adapter(tmp_path):
    """The worst moment of a save into a directory jaxlora does not replace: killed before its last rename
    (the manifest's). The reader then refuses the mix and reads the old adapter kept beside (with a warning); the
    next save repairs the directory and removes the litter."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("log\n")
    w = faults.Writer("peft", size=8, rank=2)
    w.save(run, 1)
    code = f"""
import os, signal, sys
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
import faults
real, calls = os.replace, []
def replace(src, dst):
    calls.append(src)
    if len(calls) == 3:  # the config and the weights renamed in, the manifest not yet
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
faults.Writer("peft", size=8, rank=2).save({str(run)!r}, 2, overwrite=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    with pytest.warns(UserWarning, match="disagrees with its jaxlora_manifest.json.*interrupted.*jaxlora-old"):
        _same(w.load(run), w.expected(1))
    assert (run / "train.log").read_text() == "log\n"
    w.save(run, 3, overwrite=True)
    _same(w.load(run), w.expected(3))
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_save_through_a_symlink_replaces_its_target(tmp_path):
    w = faults.Writer("adapter", size=8, rank=2)
    step = w.save(tmp_path / "step_100", 1)
    (tmp_path / "latest").symlink_to("step_100")
    w.save(tmp_path / "latest", 2, overwrite=True)
    assert os.readlink(tmp_path / "latest") == "step_100"
    _same(w.load(step), w.expected(2))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_100"]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_up_spares_live_writers_and_removes_dead_ones(tmp_path):
    w = faults.Writer("safetensors", size=8, rank=2)
    out = w.save(tmp_path / "m.safetensors", 1)
    host, dead = _commit._HOST, _dead_pid()
    litter = [f"m.safetensors.jaxlora-new-{host}-{dead}-0badc0de", f".m.safetensors.tmp-{dead}"]  # killed writers
    live = [f"m.safetensors.jaxlora-new-{host}-{os.getppid()}-0000abcd", "m.safetensors.jaxlora-new-otherhost-1-12"]
    for name in litter + live:
        (tmp_path / name).write_bytes(b"partial")
    w.save(out, 2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.safetensors", *live])
    _same(w.load(out), w.expected(2))


@pytest.mark.parametrize("kind", ["stack", "peft"])
def test_leftovers_after_a_kill_between_the_renames(tmp_path, kind):
    w = faults.Writer(kind, size=8, rank=2)
    path = tmp_path / kind
    old, new = (w.save(tmp_path / f"v{v}", v) for v in (1, 2))
    dead = _dead_pid()  # the state a kill between the renames leaves
    os.rename(old, tmp_path / f"{kind}.jaxlora-old-{_commit._HOST}-{dead}-aaaaaaaa")
    os.rename(new, tmp_path / f"{kind}.jaxlora-new-{_commit._HOST}-{dead}-bbbbbbbb")
    os.utime(tmp_path / f"{kind}.jaxlora-new-{_commit._HOST}-{dead}-bbbbbbbb" / _commit.MANIFEST)
    with pytest.warns(UserWarning, match=f"{path} does not exist.*interrupted.*jaxlora-new.*newest of 2"):
        _same(w.load(path), w.expected(2))
    with pytest.raises(FileExistsError, match="already exists"):
        w.save(path, 3)
    w.save(path, 3, overwrite=True)
    assert os.listdir(tmp_path) == [kind]


@pytest.mark.parametrize("kind", ["adapter", "peft"])
def test_leftovers_of_a_save_through_a_symlink_are_found_through_it(tmp_path, kind):
    """A kill between the renames of a save through ``latest -> step`` leaves the checkpoints beside ``step``."""
    w = faults.Writer(kind, size=8, rank=2)
    old, new = (w.save(tmp_path / f"v{v}", v) for v in (1, 2))
    (tmp_path / "latest").symlink_to("step")
    dead = _dead_pid()
    os.rename(old, tmp_path / f"step.jaxlora-old-{_commit._HOST}-{dead}-aaaaaaaa")
    os.rename(new, tmp_path / f"step.jaxlora-new-{_commit._HOST}-{dead}-bbbbbbbb")
    os.utime(tmp_path / f"step.jaxlora-new-{_commit._HOST}-{dead}-bbbbbbbb" / _commit.MANIFEST)
    with pytest.warns(UserWarning, match=f"{tmp_path / 'step'} does not exist.*interrupted.*jaxlora-new"):
        _same(w.load(tmp_path / "latest"), w.expected(2))
    with pytest.warns(UserWarning, match="interrupted"):
        assert ckpt.info(tmp_path / "latest").format == ("peft" if kind == "peft" else "orbax")
    w.save(tmp_path / "latest", 3, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step"]
    _same(w.load(tmp_path / "latest"), w.expected(3))


def test_manifest_and_metadata_errors(tmp_path):
    w = faults.Writer("adapter", size=8, rank=2)
    path = w.save(tmp_path / "a", 1)
    (path / _commit.MANIFEST).write_text("{}")
    with pytest.raises(ckpt.CorruptCheckpointError, match="jaxlora_manifest.json is not a valid jaxlora manifest"):
        w.load(path)
    (path / _commit.MANIFEST).unlink()
    with pytest.warns(UserWarning, match="has no jaxlora_manifest.json.*read unverified"):
        w.load(path)
    meta = path / "lora_meta" / "metadata"
    import json

    good = json.loads(meta.read_text())
    m = good["modules"]["w"]
    for change, match in [
        ({"roles": "ix"}, "roles 'ix' are not axes from"),
        ({"dropout": 1.5}, r"dropout 1.5 is not in \[0, 1\)"),
        ({"scale": 6.0}, r"rank 2 and scale 6.0 were saved as the config's, which gives \(2, 1.5\)"),
        ({"a_shape": [8, 3]}, "disagree on the rank"),
        ({"b_shape": [2]}, "do not have the axes roles 'io' give"),
    ]:
        meta.write_text(json.dumps({**good, "modules": {"w": {**m, **change}}}))
        with pytest.raises(ckpt.CorruptCheckpointError, match=match):
            ckpt.restore(path)
    meta.write_text(json.dumps({k: v for k, v in good.items() if k != "modules"}))
    with pytest.raises(ckpt.CorruptCheckpointError, match="'modules' is NoneType"):
        ckpt.restore(path)


def test_stack_metadata_errors(tmp_path):
    import json

    w = faults.Writer("stack", size=8, rank=2)
    path = w.save(tmp_path / "s", 1)
    meta = path / "lora_stack_meta" / "metadata"
    good = json.loads(meta.read_text())
    for bad, match in [
        ('{"format": "jaxlora.st', "is corrupt: lora_stack_meta/metadata is not valid JSON"),
        (json.dumps({k: v for k, v in good.items() if k != "modules"}), "'modules' is NoneType, not a list"),
        (json.dumps({**good, "modules": [{"path": "w"}]}), "module 'w': 'roles' missing"),
        (json.dumps({**good, "names": ["a", "a"]}), "is not a list of distinct adapter names"),
    ]:
        meta.write_text(bad)
        with pytest.raises(ckpt.CorruptCheckpointError, match="is damaged"):  # the manifest first
            ckpt.restore_stack(path)
        _commit.write_manifest(path, "stack")
        with pytest.raises(ckpt.CorruptCheckpointError, match=match):
            ckpt.restore_stack(path)


@pytest.mark.slow
def test_concurrent_overwrites_all_succeed(tmp_path):
    """Two processes overwriting one path 10 times each: every save succeeds, the result is whole."""
    w = faults.Writer("adapter", size=8, rank=2)
    path = w.save(tmp_path / "a", 1)
    procs = [faults.spawn(["overwrite", "adapter", str(path), str(v), "10"]) for v in (2, 3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    got = w.load(path)
    assert any(_equal(got, w.expected(v)) for v in (2, 3))
    assert os.listdir(tmp_path) == ["a"]


def _equal(got, want):
    return sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
@pytest.mark.parametrize("kind", faults.KINDS)
def test_sigkill_during_overwrites(tmp_path, kind):
    """A few kills per writer here (each costs a process start); ``tests/faults.py --kills N`` runs many."""
    kills = 2 if kind in ("adapter", "stack", "peft", "merged") else 1  # the four issue 22 found losing data
    counts = faults.kill(faults.Writer(kind, size=64, rank=8), tmp_path, kills=kills, seed=1)
    assert counts["lost"] == 0 and counts["torn"] == 0, counts


def test_cli_read_only_output_and_convert_into_existing(tmp_path, capsys, monkeypatch):
    from jaxlora.__main__ import main

    w = faults.Writer("adapter", size=8, rank=2)
    src = w.save(tmp_path / "src", 1)
    real = type(src).mkdir

    def read_only(self, *a, **k):  # a directory the user may not write in (root may write anywhere)
        if self.parent.name == "ro":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    (tmp_path / "ro").mkdir()
    with monkeypatch.context() as m:
        m.setattr(type(src), "mkdir", read_only)
        assert main(["convert", str(src), str(tmp_path / "ro" / "peft")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m jaxlora convert: error: ") and "Permission denied" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path / "ro") == []
    assert main(["convert", str(src), str(src)]) == 1
    assert "already exists (it is SRC itself); choose another DST, or pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(src), str(src), "--overwrite"]) == 1
    assert "is a jaxlora adapter checkpoint, not a PEFT adapter directory" in capsys.readouterr().err
    _same(w.load(src), w.expected(1))
    base = faults.Writer("merged", size=8, rank=2).save(tmp_path / "base", 1)  # a merged export is a base too
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("x = 1\n")
    assert main(["merge", str(base), str(src), str(project), "--overwrite"]) == 1
    assert "project is a directory holding ['src'], not an Orbax checkpoint" in capsys.readouterr().err
    assert (project / "src" / "train.py").read_text() == "x = 1\n"


def test_cli_inspect_a_stack(tmp_path, capsys):
    from jaxlora.__main__ import main

    path = faults.Writer("stack", size=8, rank=2).save(tmp_path / "s", 1)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "adapters:   2: one, two" in out and "modules:    1" in out
    assert main(["inspect", str(path), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["names"] == ["one", "two"]


def _fail_replace(monkeypatch, n: int, error: OSError) -> None:
    """Make the ``n``-th ``os.replace`` from now raise ``error`` (the others rename as usual)."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == n:
            raise error
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_a_failed_second_rename_puts_the_old_one_back(tmp_path, monkeypatch):
    w = faults.Writer("adapter", size=8, rank=2)
    path = w.save(tmp_path / "a", 1)
    _fail_replace(monkeypatch, 2, OSError(18, "Invalid cross-device link"))  # the second: staging -> target
    with pytest.raises(OSError, match="cross-device"):
        w.save(path, 2, overwrite=True)
    monkeypatch.undo()
    _same(w.load(path), w.expected(1))
    assert os.listdir(tmp_path) == ["a"]


def test_merge_bases_jaxlora_exported_are_verified(tmp_path):
    base = faults.Writer("safetensors", size=8, rank=2).save(tmp_path / "base.safetensors", 1)
    adapter = faults.Writer("peft", size=8, rank=2).save(tmp_path / "adapter", 1)
    data = bytearray(base.read_bytes())
    data[-5] ^= 1  # one bit of the last weight
    base.write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match="base.safetensors is damaged: its SHA-256 differs"):
        ckpt.merge_safetensors(base, adapter, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kind", ["adapter", "peft", "safetensors"])
def test_overwrite_false_never_replaces_what_another_save_committed_while_it_wrote(tmp_path, kind):
    """Two saves without overwrite to one absent path: the second to rename must refuse, not replace the first."""
    w = faults.Writer(kind, size=8, rank=2)
    path, mine = tmp_path / w.name, w.save(tmp_path / "mine" / w.name, 2)
    if kind == "safetensors":
        writing = _commit.committing_file(path, overwrite=False)
    else:
        slot = dict(slot=True, carry=("adapter_config.json", "adapter_model.safetensors")) if kind == "peft" else {}
        writing = _commit.committing(path, kind=kind, overwrite=False, **slot)
    with pytest.raises(FileExistsError, match="while this save ran.*overwrite=True"):
        with writing as staging:  # the check passed: nothing at path yet
            w.save(path, 1)  # another process's save finishes first
            (shutil.copy if kind == "safetensors" else shutil.copytree)(mine, staging)
    _same(w.load(path), w.expected(1))
    assert sorted(os.listdir(tmp_path)) == sorted(["mine", w.name])


# A function each reader calls after it read the manifest and its metadata (config, JSON item) and before it
# reads the arrays: another process's save that commits there is the race a reader must survive.
RACE_POINTS = {
    "adapter": ("jaxlora.checkpoint._orbax", "_checkpointer"),
    "stack": ("jaxlora.checkpoint._stack", "_checkpointer"),
    "peft": ("jaxlora.checkpoint._peft", "config_problems"),
}


def _race(monkeypatch, kind, writer, path, versions):
    """From now on, the reader of ``kind`` lets ``writer`` save the next of ``versions`` at ``path``
    (overwrite=True, committed) between its metadata and its arrays, once per read attempt."""
    module, name = RACE_POINTS[kind]
    module = importlib.import_module(module)
    real, pending, saving = getattr(module, name), list(versions), []

    def between(*a, **k):
        if pending and not saving:  # the writer's own calls pass through
            saving.append(True)
            try:
                writer.save(path, pending.pop(0), overwrite=True)
            finally:
                saving.pop()
        return real(*a, **k)

    monkeypatch.setattr(module, name, between)
    return pending


def _racing_writers(kind):
    old, new = faults.Writer(kind, size=8, rank=2), faults.Writer(kind, size=8, rank=2)
    new.config = dataclasses.replace(new.config, alpha=5.0)  # other scales too: a mix of metadata and arrays shows
    return old, new


@pytest.mark.parametrize("kind", sorted(RACE_POINTS))
def test_a_read_racing_an_overwrite_returns_one_commit_never_a_mix(tmp_path, kind, monkeypatch):
    """Another process saves (overwrite=True) to the path while it is read: between the manifest and the arrays."""
    old, new = _racing_writers(kind)
    path = old.save(tmp_path / kind, 1)
    left = _race(monkeypatch, kind, new, path, [2])
    got = old.load(path)
    assert not left  # the save did run inside the read
    assert _equal(got, old.expected(1)) or _equal(got, new.expected(2)), "a mix of the two adapters"
    assert _equal(got, new.expected(2))  # read again, whole, once the save had replaced it
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [kind]


@pytest.mark.parametrize("kind", sorted(RACE_POINTS))
def test_a_read_that_every_save_overtakes_raises_replaced_while_read(tmp_path, kind, monkeypatch):
    """A save commits inside every attempt of the read: the reader gives up with a clear error, never a mix."""
    old, new = _racing_writers(kind)
    path = old.save(tmp_path / kind, 1)
    _race(monkeypatch, kind, new, path, range(2, 12))
    with pytest.raises(ckpt.CheckpointReplacedError, match=f"{path} was replaced while being read.*do not save to"):
        old.load(path)


def test_a_read_racing_a_save_into_a_directory_of_other_files_never_mixes(tmp_path, monkeypatch):
    """The PEFT files of a repo are renamed into it one by one (the directory stays): the same race."""
    old, new = _racing_writers("peft")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# adapter\n")
    old.save(repo, 1)
    left = _race(monkeypatch, "peft", new, repo, [2])
    got = old.load(repo)
    assert not left and _equal(got, new.expected(2))
    _race(monkeypatch, "peft", new, repo, range(3, 13))
    with pytest.raises(ckpt.CheckpointReplacedError, match=f"{repo} was replaced while being read"):
        old.load(repo)


def test_a_read_during_a_live_save_between_its_renames_waits_for_it(tmp_path, monkeypatch):
    """A save into a directory of other files, paused after its first rename (the directory then disagrees
    with its manifest): the read waits for the rename lock and reads the new adapter, with no warning that
    a save was interrupted."""
    old, new = _racing_writers("peft")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.log").write_text("log\n")
    old.save(repo, 1)
    real, paused = os.replace, threading.Event()

    def replace(src, dst):
        real(src, dst)
        if threading.current_thread() is not threading.main_thread() and not paused.is_set():
            paused.set()  # the new config is in, the old weights and manifest still there
            time.sleep(0.5)

    monkeypatch.setattr(os, "replace", replace)
    writer = threading.Thread(target=new.save, args=(repo, 2), kwargs=dict(overwrite=True))
    writer.start()
    assert paused.wait(60)
    got = old.load(repo)
    writer.join()
    assert _equal(got, new.expected(2))


def test_merge_safetensors_never_reads_two_bases(tmp_path, monkeypatch):
    """The base replaced by a new export after its header was read: refused, never its header with the other's data."""
    import safetensors
    from safetensors.numpy import load_file

    from jaxlora.checkpoint._merged import write_safetensors

    def export(v, **k):  # a sealed base with the torch name the PEFT adapter's "w" gets
        write_safetensors(base, [("w.weight", (8, 8), "F32")], lambda i: np.full((8, 8), v, np.float32), **k)

    base, w = tmp_path / "base.safetensors", faults.Writer("peft", size=8, rank=2)
    adapter = w.save(tmp_path / "adapter", 1)
    export(1.0)
    real = safetensors.safe_open

    def then_replaced(*a, **k):
        f = real(*a, **k)
        export(2.0, overwrite=True)
        return f

    monkeypatch.setattr(safetensors, "safe_open", then_replaced)
    with pytest.raises(ckpt.CheckpointReplacedError, match="base.safetensors was replaced while being read"):
        ckpt.merge_safetensors(base, adapter, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    monkeypatch.undo()
    out = load_file(str(ckpt.merge_safetensors(base, adapter, tmp_path / "out.safetensors")))["w.weight"]
    f = w.lora(1)["w"]
    np.testing.assert_allclose(out, 2.0 + f.scale * np.asarray(f.a @ f.b).T, rtol=1e-5, atol=1e-6)
