"""Fault injection for every checkpoint writer: SIGKILLs during overwrites, flipped bits and truncations.

    python tests/faults.py --kills 20 --flips 8 --size 512 --rank 16   # every kind; prints the counts

`tests/test_commit.py` runs a few of each in CI. A kill campaign starts a process that overwrites one
path again and again (versions 1 and 2 in turn) and SIGKILLs it at a random moment; the path must then
read back exactly version 1 or 2 (``lost``: nothing readable, ``torn``: something else). A corruption
campaign flips one bit at sampled offsets of every file of a checkpoint, and truncates every file; the
reader must raise or return exactly what was saved (``silently_wrong`` must be 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxlora
from jaxlora import checkpoint as ckpt

KINDS = ("adapter", "dora", "modules_to_save", "stack", "peft", "merged", "safetensors")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Writer:
    """Writes and reads one kind of checkpoint, in versions whose every value differs."""

    def __init__(self, kind: str, *, size: int = 8, rank: int = 2):
        self.kind, self.size, self.rank = kind, size, rank
        self.name = kind + (".safetensors" if kind == "safetensors" else "")
        n = size
        self.params = {"params": {"w": {"kernel": jnp.zeros((n, n))}, "head": {"kernel": jnp.ones((n, 3))}}}
        saved = ["head"] if kind == "modules_to_save" else []
        self.config = jaxlora.LoraConfig(
            rank=rank, alpha=1.5 * rank, targets="w", dora=kind == "dora", modules_to_save=saved
        )

    def lora(self, v: int) -> dict:
        lora = jaxlora.init(jax.random.key(v), self.params, self.config)
        out = {}
        for p, f in lora.items():
            if isinstance(f, jaxlora.LoraFactors):
                b = jax.random.normal(jax.random.key(100 + v), f.b.shape)
                m = None if f.m is None else f.m + v
                out[p] = dataclasses.replace(f, b=b, m=m)
            else:
                out[p] = jax.tree.map(lambda x: x + v, f)
        return out

    def save(self, path, v: int, overwrite: bool = False) -> Path:
        lora, path = self.lora(v), Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "stack":
            stk = jaxlora.stack({"one": lora, "two": self.lora(v + 10)})
            return ckpt.save_stack(path, stk, params=self.params, overwrite=overwrite)
        if self.kind == "peft":
            return ckpt.save_peft(path, lora, params=self.params, config=self.config, overwrite=overwrite)
        if self.kind == "merged":
            return ckpt.save_merged(path, self.params, lora, format="orbax", overwrite=overwrite)
        if self.kind == "safetensors":
            return ckpt.save_merged(path, self.params, lora, overwrite=overwrite)
        return ckpt.save(path, lora, config=self.config, params=self.params, overwrite=overwrite)

    def load(self, path) -> dict[str, np.ndarray]:
        """Read ``path`` back with jaxlora's reader, as flat ``{name: array}``."""
        path = Path(path)
        if self.kind == "stack":
            stk = ckpt.restore_stack(path, params=self.params)
            return {f"{k}/{p}": np.asarray(getattr(stk, k)[p]) for k in ("a", "b", "scale", "rank") for p in stk.a}
        if self.kind == "merged":
            from jaxlora.__main__ import _restore_params

            return _flat(_restore_params(path))
        if self.kind == "safetensors":
            from safetensors.numpy import load_file

            from jaxlora.checkpoint import _commit

            _commit.verify_safetensors(path)  # as merge_safetensors does for a base jaxlora wrote
            return load_file(str(path))
        if self.kind == "peft":
            lora = ckpt.load_peft(path, params=self.params)
        else:
            lora = ckpt.restore(path, params=self.params)
        return _flat(lora)

    def expected(self, v: int) -> dict[str, np.ndarray]:
        """What `load` must return for version ``v``, computed without the writers."""
        lora = self.lora(v)
        if self.kind == "stack":
            stk = jaxlora.stack({"one": lora, "two": self.lora(v + 10)})
            return {f"{k}/{p}": np.asarray(getattr(stk, k)[p]) for k in ("a", "b", "scale", "rank") for p in stk.a}
        if self.kind in ("merged", "safetensors"):
            merged = jaxlora.merge(self.params, lora)
            if self.kind == "safetensors":
                from jaxlora.checkpoint._merged import leaf_paths

                return {k: np.asarray(x) for k, x in zip(leaf_paths(merged), jax.tree.leaves(merged))}
            return _flat(merged)
        return _flat(lora)

    def break_writer(self, m, fail) -> None:
        """Make the array writer of this kind write part of its output, then call ``fail``."""

        def partial(path, *a, **k):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "half_written").write_bytes(b"\0" * 100)
            fail()

        if self.kind == "merged":
            from orbax.checkpoint.experimental.v1 import partial as orbax_partial

            m.setattr(orbax_partial, "save", partial)
        elif self.kind == "peft":
            import safetensors.numpy

            m.setattr(safetensors.numpy, "save_file", lambda t, f, **k: (Path(f).write_bytes(b"\0" * 100), fail()))
        elif self.kind == "safetensors":
            import jaxlora._core

            m.setattr(jaxlora._core, "merged_weight", lambda *a, **k: fail())
        else:
            import orbax.checkpoint as ocp

            m.setattr(ocp.Checkpointer, "save", lambda self, path, *a, **k: partial(path))


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {jax.tree_util.keystr(k): np.asarray(x) for k, x in leaves}
    if isinstance(tree, dict):  # LoraFactors' static fields are part of what must come back
        for p, f in tree.items():
            if isinstance(f, jaxlora.LoraFactors):
                out[f"{p}.static"] = np.asarray([f.scale, f.dropout, len(f.roles)])
    return out


def _equal(got, want) -> bool:
    return sorted(got) == sorted(want) and all(
        got[k].shape == want[k].shape and got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
        for k in want
    )


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def corrupt(w: Writer, tmp: Path, *, flips_per_file: int = 4, seed: int = 0) -> dict[str, int]:
    """Flip one bit at ``flips_per_file`` sampled offsets of every file, and truncate every file; count."""
    rng = random.Random(seed)
    pristine = w.save(tmp / "pristine" / w.name, 1)
    want = w.load(pristine)
    assert _equal(want, w.expected(1)), "the writer does not round-trip"
    counts = dict(corruptions=0, raised=0, restored_right=0, silently_wrong=0, raw_errors=0)
    damages = []
    for f in _files(pristine):
        rel, size = f.relative_to(pristine.parent), f.stat().st_size
        if size == 0:
            continue
        offsets = {rng.randrange(size) for _ in range(flips_per_file)} | {rng.randrange(min(size, 64))}
        damages += [(rel, "flip", o, rng.randrange(8)) for o in sorted(offsets)]
        damages += [(rel, "truncate", rng.randrange(size), 0)]
    for i, (rel, how, offset, bit) in enumerate(damages):
        case = tmp / f"case{i}"
        shutil.copytree(pristine.parent, case)
        target = case / rel
        with open(target, "r+b") as fh:
            if how == "flip":
                fh.seek(offset)
                byte = fh.read(1)[0]
                fh.seek(offset)
                fh.write(bytes([byte ^ (1 << bit)]))
            else:
                fh.truncate(offset)
        counts["corruptions"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = w.load(case / w.name)
        except ValueError:
            counts["raised"] += 1
        except Exception as e:  # raised, but not the clear error
            counts["raised"] += 1
            counts["raw_errors"] += 1
            print(f"raw error for {rel} {how}@{offset}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
        else:
            if _equal(got, want):
                counts["restored_right"] += 1
            else:
                counts["silently_wrong"] += 1
                print(f"SILENTLY WRONG: {w.kind} {rel} {how}@{offset} bit {bit}", file=sys.stderr)
        shutil.rmtree(case)
    return counts


def spawn(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def kill(w: Writer, tmp: Path, *, kills: int = 4, seed: int = 0) -> dict[str, int]:
    """SIGKILL a process that overwrites one path in a loop, ``kills`` times; count what survives."""
    rng = random.Random(seed)
    path = w.save(tmp / w.name, 1)
    versions = {1: w.expected(1), 2: w.expected(2)}
    counts = dict(kills=0, lost=0, torn=0, old=0, new=0, recovered_leftover=0)
    for _ in range(kills):
        proc = spawn(["loop", w.kind, str(path), str(w.size), str(w.rank)])
        try:
            line = proc.stdout.readline().split()  # "saved SECONDS" after its first overwrite
            if not line or line[0] != "saved":
                raise RuntimeError(f"the writer failed: {proc.stderr.read()[-3000:]}")
            time.sleep(rng.uniform(0, 2 * float(line[1])))
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        counts["kills"] += 1
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = w.load(path)
            counts["recovered_leftover"] += any("interrupted" in str(c.message) for c in caught)
        except Exception as e:
            counts["lost"] += 1
            print(f"LOST {w.kind}: {type(e).__name__}: {e}"[:400], file=sys.stderr)
            return counts
        match = [v for v, want in versions.items() if _equal(got, want)]
        if not match:
            counts["torn"] += 1
            print(f"TORN {w.kind}", file=sys.stderr)
            return counts
        counts["old" if match[0] == 1 else "new"] += 1
    w.save(path, 1, overwrite=True)  # the next save cleans up whatever the kills left
    left = sorted(p.name for p in tmp.iterdir() if p.name != w.name)
    if left:
        raise AssertionError(f"{w.kind}: litter after the next save: {left}")
    return counts


def _child(argv: list[str]) -> None:
    what, kind, path = argv[:3]
    if what == "loop":  # overwrite forever, versions 2 and 1 in turn, reporting each save's duration
        w = Writer(kind, size=int(argv[3]), rank=int(argv[4]))
        v = 2
        while True:
            t = time.perf_counter()
            w.save(path, v, overwrite=True)
            print(f"saved {time.perf_counter() - t:.3f}", flush=True)
            v = 3 - v
    if what == "overwrite":  # overwrite N times with one version (the concurrency test)
        w = Writer(kind)
        for _ in range(int(argv[4])):
            w.save(path, int(argv[3]), overwrite=True)
        return
    raise SystemExit(f"unknown command {what}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="*", default=list(KINDS))
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs per kind")
    p.add_argument("--flips", type=int, default=4, help="sampled bit flips per file")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    import tempfile

    base = Path(args.dir or tempfile.mkdtemp(prefix="jaxlora-faults-"))
    total: dict[str, dict[str, int]] = {}
    for kind in args.kinds:
        w = Writer(kind, size=args.size, rank=args.rank)
        row = {}
        if args.flips:
            (base / f"c-{kind}").mkdir(parents=True, exist_ok=True)
            row |= corrupt(w, base / f"c-{kind}", flips_per_file=args.flips)
        if args.kills:
            (base / f"k-{kind}").mkdir(parents=True, exist_ok=True)
            row |= kill(w, base / f"k-{kind}", kills=args.kills)
        total[kind] = row
        print(kind, json.dumps(row), flush=True)
    sums = {k: sum(r.get(k, 0) for r in total.values()) for k in {k for r in total.values() for k in r}}
    print("total", json.dumps(dict(sorted(sums.items()))))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("loop", "overwrite"):
        _child(sys.argv[1:])
    else:
        main()
