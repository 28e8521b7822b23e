"""The one write protocol of every jaxlora writer: write beside, checksum, then rename into place.

A directory (adapter, stack, PEFT files, merged Orbax export) is written whole into a fresh staging
directory beside the target, ``<name>.jaxlora-new-<host>-<pid>-<token>``. When the writer returns,
`committing` lists every file it wrote, with its size and SHA-256, in ``jaxlora_manifest.json``
(written last, so a staging directory with a valid manifest is complete), fsyncs, and commits by
rename: one rename onto an absent target; for an existing one, the target is renamed aside
(``<name>.jaxlora-old-...``), the staging directory in, and the old one deleted. POSIX cannot rename
a directory over a non-empty one, so a kill between those two renames leaves no ``<name>`` but
complete leftovers beside it: readers then use the newest complete one (`locate`, with a warning)
and the next save removes them. A single file (a merged ``.safetensors``) is written to a staging
file beside the target, fsynced and ``os.replace``d: one atomic rename; its checksum lives in the
safetensors header (`seal_safetensors`).

A PEFT directory may also hold files jaxlora did not write (a hub repo's ``README.md``, a training run's
logs): that directory is never replaced, since a copy would lose what is written to it after the copy
(through a log file's open handle, by another process). The new files go into it instead, one rename
each, the manifest last; the files they replace are kept beside it (hard links, a complete ``old``
leftover) until all are in place, and put back if a rename fails. A kill between those renames leaves
the directory's manifest disagreeing with its files, which every reader refuses (never a silent mix).

Concurrent writers to one path each write their own staging path and hold an ``fcntl`` lock on the
parent directory while renaming; the clean-up removes only superseded ``old`` leftovers and the
staging paths of processes on this host that no longer run, never another live writer's work.

A reader may race such a writer: it reads the manifest, and the files it opens next may already be the
next commit's. Every reader therefore reads through `read`: it notes what identifies the commit at the
path (the directory, its entries' inodes, the manifest's bytes, which hold a random ``commit`` id), reads
the files it parses itself through `Commit.read_bytes` (checked against that manifest's checksums), and
keeps the result only if the same commit is still there afterwards; otherwise it reads again, and after
`READ_ATTEMPTS` raises `CheckpointReplacedError`. A committed file or directory is never changed in
place, so a commit still in place after the read is the one every file came from. A single file (a
merged ``.safetensors``) is read through one handle, checked through it (`verify_safetensors`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

MANIFEST = "jaxlora_manifest.json"
MANIFEST_FORMAT = "jaxlora.manifest"
MANIFEST_VERSION = 1
SHA_KEY = "jaxlora_sha256"  # in a safetensors file's __metadata__
_CHUNK = 1 << 20
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_SIBLING = re.compile(  # ".jaxlora-new-<host>-<pid>-<token>" (or "-<pid>" alone before this protocol), then any suffix
    r"\.jaxlora-(?P<role>new|old)-(?:(?P<host>[^-]+)-)?(?P<pid>\d+)(?:-(?P<token>[0-9a-f]{8}))?(?P<rest>.*)"
)
_LEGACY_TMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")
KINDS = {
    "adapter": "a jaxlora adapter checkpoint",
    "stack": "a jaxlora stack checkpoint",
    "peft": "a PEFT adapter directory",
    "merged": "an Orbax checkpoint (a merged export)",
    "safetensors": "a .safetensors file",
}
# what looks like a kind but was not written by jaxlora (no manifest, no checksum in the header):
# never a kind a save may replace, so overwrite=True cannot take a user's own Orbax state or weights
FOREIGN = {
    "orbax": f"an Orbax checkpoint jaxlora did not write (it has no {MANIFEST})",
    "foreign_safetensors": f"a .safetensors file jaxlora did not write (no {SHA_KEY} in its header)",
}
READERS = {
    "adapter": "read it with jaxlora.checkpoint.restore",
    "stack": "read it with jaxlora.checkpoint.restore_stack",
    "peft": "read it with jaxlora.checkpoint.load_peft",
    "merged": "read it with orbax.checkpoint.v1.load",
    "safetensors": "read it with safetensors",
}
READ_ATTEMPTS = 3  # reads of a checkpoint that saves keep replacing, before `read` gives up
_warned: set[str] = set()
T = TypeVar("T")


class CorruptCheckpointError(ValueError):
    """A checkpoint or export whose files do not match what was written: damaged on disk, never data."""


class CheckpointReplacedError(OSError):
    """A checkpoint that another save replaced while it was read, every time it was read: nothing is
    returned rather than a mix of two checkpoints."""


def replaced(path: Path, attempts: int = 1) -> CheckpointReplacedError:
    """The error for a checkpoint at ``path`` that a save replaced during each of ``attempts`` reads."""
    during = "while it was being read" if attempts == 1 else f"during each of {attempts} attempts to read it"
    return CheckpointReplacedError(
        f"{path} was replaced while being read: another save (overwrite=True) committed a new checkpoint there "
        f"{during}, so nothing was returned rather than a mix of the two. Retry, or do not save to a path you are "
        "loading from (save each checkpoint to a new path and read only finished ones)."
    )


@contextlib.contextmanager
def _opened(src: Path | BinaryIO) -> Iterator[BinaryIO]:
    """``src`` opened for reading (a file already open: rewound, and left open)."""
    if isinstance(src, Path):
        with open(src, "rb") as f:
            yield f
    else:
        src.seek(0)
        yield src


def _sha256(src: Path | BinaryIO, *, skip: tuple[int, int] | None = None) -> str:
    """SHA-256 of a file read in chunks; ``skip=(start, stop)`` hashes those bytes as zeros."""
    h = hashlib.sha256()
    with _opened(src) as f:
        pos = 0
        while chunk := f.read(_CHUNK):
            if skip and pos < skip[1] and pos + len(chunk) > skip[0]:
                buf = bytearray(chunk)
                lo, hi = max(skip[0] - pos, 0), min(skip[1] - pos, len(chunk))
                buf[lo:hi] = b"0" * (hi - lo)
                chunk = bytes(buf)
            h.update(chunk)
            pos += len(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path, skip: Sequence[str] = ()) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            if rel != MANIFEST and rel.split(os.sep)[0] not in skip:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_manifest(root: Path, kind: str, *, skip: Sequence[str] = ()) -> None:
    """List every file under ``root`` (but ``skip``ped top-level entries) with its size and SHA-256,
    fsync them and write the manifest last."""
    files = {}
    for rel in _files(root, skip):
        f = root / rel
        files[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        _fsync(f)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "kind": kind,
        "commit": secrets.token_hex(8),  # no two commits' manifests alike, even of the same files (`read`)
        "files": files,
    }
    with open(root / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    for dirpath, _, _ in os.walk(root):
        _fsync(Path(dirpath))


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of ``root`` (``None`` if it has none); a damaged one raises."""
    f = root / MANIFEST
    return _parse_manifest(root, f.read_bytes()) if f.is_file() else None


def _parse_manifest(root: Path, raw: bytes) -> dict[str, Any]:
    try:
        m = json.loads(raw)
        ok = (
            m["format"] == MANIFEST_FORMAT
            and m["version"] == MANIFEST_VERSION
            and m["kind"] in KINDS
            and all(
                isinstance(k, str) and type(v["size"]) is int and re.fullmatch(r"[0-9a-f]{64}", v["sha256"])
                for k, v in m["files"].items()
            )
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CorruptCheckpointError(
            f"{root} is damaged: its {MANIFEST} is not a valid jaxlora manifest (a newer jaxlora's, or damaged "
            "on disk); restore an earlier checkpoint or save again."
        )
    return m


def verify(root: Path, kind: str) -> bool:
    """Check every file ``root``'s manifest lists (presence, size, SHA-256) before anything is read.

    Returns whether ``root`` has a manifest (``False``: written before jaxlora checksummed, unverified).

    Raises:
      CorruptCheckpointError: naming every damaged or missing file.
    """
    return Commit(root, kind).verify()


def _check_files(root: Path, kind: str, m: dict[str, Any]) -> None:
    if m["kind"] != kind:
        raise ValueError(f"{root} is {KINDS[m['kind']]}, not {KINDS[kind]}: {READERS[m['kind']]}.")
    problems = []
    for rel, want in m["files"].items():
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif (size := f.stat().st_size) != want["size"]:
            problems.append(f"{rel}: {size} bytes, {want['size']} written")
        elif _sha256(f) != want["sha256"]:
            problems.append(f"{rel}: SHA-256 differs from the one recorded at save (the file is damaged)")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise CorruptCheckpointError(
            f"{root} is damaged; restore an earlier checkpoint or save again (if you changed a file on purpose, "
            f"delete {MANIFEST} to read it unverified):\n  " + "\n  ".join(shown)
        )


def _stamp(root: Path) -> tuple[Any, ...] | None:
    """What tells the commit at ``root`` from any other: the directory (a file: its size and time too), the
    inodes of its entries and its manifest's bytes; ``None`` if nothing is there."""
    try:
        st = os.stat(root)
        if not os.path.isdir(root):
            return st.st_dev, st.st_ino, (st.st_size, st.st_mtime_ns), None
        entries = tuple(sorted((e.name, e.inode()) for e in os.scandir(root)))
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        manifest: bytes | None = (root / MANIFEST).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        manifest = None
    return st.st_dev, st.st_ino, entries, manifest


class Commit:
    """The checkpoint of ``kind`` at ``root`` as a reader found it: its manifest then (`manifest`), its files
    read checked against that manifest (`read_bytes`), and whether ``root`` still holds it (`current`)."""

    def __init__(self, root: Path, kind: str):
        self.root, self.kind = root, kind
        self.stamp = _stamp(root)

    @functools.cached_property
    def manifest(self) -> dict[str, Any] | None:
        """The manifest ``root`` held when this read began (``None``: none); a damaged one raises."""
        raw = None if self.stamp is None else self.stamp[3]
        return None if raw is None else _parse_manifest(self.root, raw)

    def verify(self) -> bool:
        """`verify`, against `manifest`."""
        if (m := self.manifest) is None:
            return False
        _check_files(self.root, self.kind, m)
        return True

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of ``root / rel``, checked against `manifest` where it lists the file.

        Raises:
          CorruptCheckpointError: if they differ from what the manifest records (damaged, or the next commit's).
        """
        data = (self.root / rel).read_bytes()
        want = (self.manifest or {"files": {}})["files"].get(rel)
        if want is not None and (len(data) != want["size"] or hashlib.sha256(data).hexdigest() != want["sha256"]):
            raise CorruptCheckpointError(
                f"{self.root / rel} differs from the file recorded in {MANIFEST} (SHA-256 at save); restore an "
                "earlier checkpoint or save again."
            )
        return data

    def current(self) -> bool:
        """Whether ``root`` still holds this commit."""
        return _stamp(self.root) == self.stamp


def read(path: Path, kind: str, reader: Callable[[Commit], T], legacy: Callable[[Path], bool] | None = None) -> T:
    """``reader(commit)`` for the checkpoint of ``kind`` at ``path`` (`locate`), returned only if the same commit
    is still in place once it has read: what another save (overwrite=True) committed meanwhile is read again.
    An error raised while the same commit stays in place is the checkpoint's own, and propagates.

    Raises:
      CheckpointReplacedError: if a save replaced it during each of `READ_ATTEMPTS` reads.
    """
    last: BaseException | None = None
    for _ in range(READ_ATTEMPTS):
        commit = Commit(locate(path, kind, legacy), kind)
        try:
            out = reader(commit)
        except Exception as e:
            _settle(commit.root)  # a save renaming there now: its error is not the checkpoint's
            if commit.current():
                raise
            last = e
            continue
        if commit.current():
            return out
        last = None
    raise replaced(path, READ_ATTEMPTS) from last


def _settle(path: Path) -> None:
    """Wait until no save is renaming beside ``path`` (each holds the parent's lock while it does)."""
    try:
        fd = os.open(resolve(path).parent, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        pass  # a file system without locks: `read` still sees the commit change
    finally:
        os.close(fd)  # the lock with it


def warn_unverified(root: Path, what: str) -> None:
    """Warn, once per path, that a jaxlora checkpoint without a manifest is read unverified."""
    if str(root) not in _warned:
        _warned.add(str(root))
        warnings.warn(
            f"{root} has no {MANIFEST} (written by jaxlora before checkpoints were checksummed): {what} is read "
            "unverified, so damage on disk may go unnoticed; save it again to add checksums.",
            stacklevel=3,
        )


def kind_of(path: Path) -> str | None:
    """The kind of checkpoint at ``path`` (see ``KINDS``), from its manifest or, for one written before
    manifests, its layout; ``None`` for anything else (a missing or empty path is ``"empty"``). An
    Orbax directory without a manifest or a safetensors file without jaxlora's checksum is one of
    `FOREIGN`'s kinds: jaxlora did not write it, so no save replaces it."""
    if not path.exists() and not path.is_symlink():
        return "empty"
    if path.is_file():
        if path.suffix != ".safetensors":
            return None
        try:
            return "safetensors" if sealed_offsets(path) is not None else "foreign_safetensors"
        except CorruptCheckpointError:
            return "safetensors"  # jaxlora's, its checksum entry damaged: replaceable by a new export
        except OSError:
            return None
    if not path.is_dir():
        return None
    names = set(os.listdir(path))
    if not names:
        return "empty"
    try:
        if (m := read_manifest(path)) is not None:
            return m["kind"]
    except CorruptCheckpointError:
        pass  # fall back on the layout
    if "lora_meta" in names:
        return "adapter"
    if "lora_stack_meta" in names:
        return "stack"
    if names & {"adapter_config.json", "adapter_model.safetensors"}:
        return "peft"
    if names & {"_CHECKPOINT_METADATA", "_METADATA", "orbax.checkpoint"}:
        return "orbax"  # jaxlora's merged exports carry a manifest (read above)
    return None


def _what(path: Path, found: str | None) -> str:
    """What is at ``path``, whose `kind_of` is ``found``, in words."""
    return KINDS.get(found) or FOREIGN.get(found) or _describe(path)


def _describe(path: Path) -> str:
    if path.is_dir():
        entries = sorted(os.listdir(path))
        return f"a directory holding {entries[:6]}{' ...' if len(entries) > 6 else ''}"
    return "a file" if path.is_file() else "something that is neither a file nor a directory"


def check_replaceable(path: Path, kind: str, *, overwrite: bool, slot: bool = False) -> None:
    """Raise unless ``path`` may be written: absent, or (with ``overwrite``) a checkpoint of ``kind``.

    ``slot``: an existing directory that holds no checkpoint may receive one (PEFT files into a repo);
    its files stay where they are (`_place`).
    """
    found = kind_of(path)
    if found == "empty" and not path.exists() and not leftovers(path, kind):
        return
    if slot and found is None and path.is_dir():
        return
    if not overwrite:
        if slot and found == "empty" and path.exists():
            return
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another path.")
    if found in (kind, "empty"):
        return
    what = _what(path, found)
    raise ValueError(
        f"{path} is {what}, not {KINDS[kind]}: overwrite=True replaces only {KINDS[kind]}, so nothing was "
        "written. Choose another path, or move it away yourself if it may go."
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(path: Path) -> Iterator[tuple[Path, re.Match[str]]]:
    for p in path.parent.glob(f"{glob.escape(path.name)}.jaxlora-*"):
        if m := _SIBLING.fullmatch(p.name[len(path.name) :]):
            yield p, m


def _remove(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _ours(m: re.Match[str]) -> bool:
    return m["host"] in (None, _HOST)


def clean_up(path: Path) -> None:
    """Remove the leftovers beside ``path`` that no writer can still need: superseded ``old`` copies, and
    staging paths of processes on this host that have died (never a live writer's work in progress)."""
    for p, m in _siblings(path):
        if (m["role"] == "old" and not m["rest"]) or (_ours(m) and not _alive(int(m["pid"]))):
            _remove(p)
    for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):  # single-file staging before this protocol
        if (m := _LEGACY_TMP.fullmatch(p.name)) and not _alive(int(m["pid"])):
            _remove(p)


def complete(p: Path, kind: str) -> bool:
    """Whether ``p`` (a leftover) is a whole checkpoint of ``kind``: its manifest valid and every file intact."""
    try:
        return verify(p, kind)
    except (ValueError, OSError):
        return False


def leftovers(path: Path, kind: str, legacy: Callable[[Path], bool] | None = None) -> list[Path]:
    """The complete checkpoints that interrupted writes left beside ``path``, newest first.

    ``legacy(p)`` judges one written before manifests (the caller knows its layout)."""
    found: list[tuple[int, Path]] = []
    for p, m in _siblings(path):
        if m["rest"] or not p.is_dir():
            continue
        if (p / MANIFEST).is_file():
            if complete(p, kind):
                found.append(((p / MANIFEST).stat().st_mtime_ns, p))
        elif legacy is not None and legacy(p):
            found.append((max(f.stat().st_mtime_ns for f in p.iterdir()), p))
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def locate(path: Path, kind: str, legacy: Callable[[Path], bool] | None = None) -> Path:
    """``path``, or where a write interrupted between its two renames left no ``path``, the newest
    complete leftover beside it (with a warning); likewise where a write into a directory of other
    files (`_place`) was interrupted between its renames, leaving ``path``'s files disagreeing with its
    manifest beside the complete copy of the files it replaced. A symlink whose target is missing is
    followed to it: a save through the link (``latest -> step_100``) left its leftovers beside the target.
    A save renaming there right now is waited for first: its leftovers are gone once it is done."""
    if not path.exists() and path.is_symlink():
        path = resolve(path)
    for settled in (False, True):
        found = [] if path.exists() and not path.is_dir() else leftovers(path, kind, legacy)
        if not found or (path.exists() and complete(path, kind)):
            return path  # (the reader verifies path itself, and names what is damaged)
        if not settled:
            _settle(path)
    if path.exists():
        warnings.warn(
            f"{path} disagrees with its {MANIFEST}: a save into it was interrupted between its renames. Using "
            f"the complete checkpoint it left at {found[0]}; save to {path} again to repair it.",
            stacklevel=4,
        )
        return found[0]
    others = "".join(f", {p}" for p in found[1:])
    warnings.warn(
        f"{path} does not exist: a save(..., overwrite=True) was interrupted between its two renames. Using the "
        f"complete checkpoint it left at {found[0]} (the newest of {len(found)}: {found[0]}{others}); "
        f"save to {path} again, or rename {found[0].name} to {path.name}, to put it back in place.",
        stacklevel=4,
    )
    return found[0]


def resolve(path: str | os.PathLike) -> Path:
    """The absolute path a write goes to: through a symlink (``latest -> step_100``) to its target."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _token() -> tuple[str, str]:
    """This writer's pid and a random token; under several JAX processes, process 0's for all."""
    import jax

    pid, token = os.getpid(), secrets.randbits(31)
    if jax.process_count() > 1:  # every process writes into process 0's staging path
        import numpy as np
        from jax.experimental import multihost_utils

        pid, token = (int(x) for x in multihost_utils.broadcast_one_to_all(np.array([pid, token], np.int64)))
    return str(pid), f"{token:08x}"


def _sync(collective: bool, name: str) -> None:
    import jax

    if collective and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def committing(
    path: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool,
    collective: bool = False,
    slot: bool = False,
    carry: Sequence[str] = (),
) -> Iterator[Path]:
    """Write a checkpoint directory of ``kind`` at ``path`` with the protocol above.

    Yields the staging path (not yet created) that the caller writes the whole directory into. On
    success the manifest is written, and the directory renamed into place; on any exception,
    ``KeyboardInterrupt`` included, the staging path is removed and ``path`` left as it was.

    Args:
      path: the target (a symlink is followed: its target is replaced).
      kind: one of ``KINDS``; an existing target must be of this kind.
      overwrite: replace an existing target.
      collective: every JAX process writes (Orbax); process 0 alone checksums and renames, after a barrier.
        slot: see `check_replaceable`. An existing directory holding entries other than ``carry`` (the
        names jaxlora writes) and the manifest is kept: the new files are renamed into it (`_place`),
        so a hub repo's ``README.md`` or a run's open log file is untouched; they are left out of the
        manifest (jaxlora does not vouch for them).
      carry: with ``slot``, the names that the writer writes itself.
    """
    import jax

    target = resolve(path)
    check_replaceable(target, kind, overwrite=overwrite, slot=slot)
    pid, token = _token() if collective else (str(os.getpid()), secrets.token_hex(4))
    staging = target.with_name(f"{target.name}.jaxlora-new-{_HOST}-{pid}-{token}")
    aside = target.with_name(f"{target.name}.jaxlora-old-{_HOST}-{pid}-{token}")
    lead = not collective or jax.process_index() == 0
    try:
        yield staging
        _sync(collective, f"jaxlora wrote {staging}")
        if lead:
            write_manifest(staging, kind)
            # what may be at target when the rename runs (another save may have finished meanwhile)
            allowed = {"empty"} | ({kind} if overwrite else set()) | ({None} if slot else set())
            if slot and target.is_dir() and set(os.listdir(target)) - set(carry) - {MANIFEST}:
                _place(target, staging, aside, allowed)  # others' files there: the directory stays
            else:
                _swap(target, staging, aside, allowed)
    except BaseException:
        if lead:
            for p in target.parent.glob(f"{glob.escape(staging.name)}*"):
                _remove(p)
        raise
    _sync(collective, f"jaxlora committed {staging}")


def _still_replaceable(target: Path, allowed: set[str | None]) -> None:
    """Raise unless what is at ``target`` now (under the rename lock) is ``allowed`` to be replaced: a save
    without ``overwrite`` found nothing there when it began, and must not replace what another save put there."""
    if (found := kind_of(target)) in allowed:
        return
    if found in KINDS:
        raise FileExistsError(
            f"{target} was written by another save while this save ran; nothing written. Pass overwrite=True to "
            "replace it, or choose another path."
        )
    raise ValueError(f"{target} became {_what(target, found)} while this save ran; nothing written.")


def _swap(target: Path, staging: Path, aside: Path, allowed: set[str | None]) -> None:
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one writer renames at a time
        if target.exists():
            _still_replaceable(target, allowed)
            os.replace(target, aside)  # killed from here ...
        try:
            os.replace(staging, target)  # ... to here, readers fall back on `staging` (complete) and warn
        except BaseException:
            if aside.exists() and not target.exists():
                os.replace(aside, target)  # the old one back in place
            raise
        os.fsync(fd)
        _remove(aside)
        clean_up(target)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _place(target: Path, staging: Path, aside: Path, allowed: set[str | None]) -> None:
    """Rename each file of ``staging`` into the existing directory ``target``, the manifest last, leaving its
    other entries alone. The files replaced are hard-linked into ``aside`` first (a complete leftover while
    the renames run), put back if one fails, and deleted once all are in place."""
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one writer renames at a time
        _still_replaceable(target, allowed)
        names = sorted(os.listdir(staging), key=lambda n: (n == MANIFEST, n))
        old = [n for n in names if os.path.lexists(target / n) and not (target / n).is_dir()]
        if old:
            aside.mkdir()
            for n in old:
                try:
                    os.link(target / n, aside / n, follow_symlinks=False)
                except OSError:  # a file system without hard links
                    shutil.copy2(target / n, aside / n, follow_symlinks=False)
            for dirpath, _, _ in os.walk(aside):
                _fsync(Path(dirpath))
        done: list[str] = []
        try:
            for n in names:
                os.replace(staging / n, target / n)
                done.append(n)
        except BaseException:
            for n in reversed(done):  # the old files back in place; a new one where there was none removed
                if n in old:
                    os.replace(aside / n, target / n)
                else:
                    _remove(target / n)
            _remove(aside)
            raise
        os.fsync(fd)
        _fsync(target)
        _remove(staging)
        _remove(aside)
        clean_up(target)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def committing_file(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Write one ``.safetensors`` file at ``path``: into a staging file beside it, fsynced, then
    ``os.replace``d (one atomic rename). Yields the staging path; on an exception it is removed."""
    target = resolve(path)
    check_replaceable(target, "safetensors", overwrite=overwrite)
    staging = target.with_name(f"{target.name}.jaxlora-new-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield staging
        _fsync(staging)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one writer renames at a time, as `_swap`
            if target.exists() or target.is_symlink():
                _still_replaceable(target, {"empty"} | ({"safetensors"} if overwrite else set()))
            os.replace(staging, target)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    except BaseException:
        _remove(staging)
        raise
    clean_up(target)


# A safetensors file checksums itself: its __metadata__ holds the SHA-256 of the whole file with the
# 64 hex digits of that value read as "0" * 64 (header and data covered, the checksum itself not).
PLACEHOLDER = "0" * 64


def sealed_offsets(path: Path, handle: BinaryIO | None = None) -> tuple[int, int] | None:
    """Where the checksum's hex digits sit in a sealed safetensors file (``None``: not sealed), read through
    ``handle`` (an open file of ``path``) if given.

    Raises:
      CorruptCheckpointError: for a file jaxlora wrote whose checksum entry is itself damaged.
    """
    with _opened(handle or path) as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        raw = f.read(min(max(n, 1 << 16), 100 * 2**20))  # a damaged length still finds the entry
    key = f'"{SHA_KEY}":"'.encode()
    at = raw.find(key)
    if at < 0:
        if b"jaxlora" in raw and re.search(rb'":"[0-9a-f]{64}"', raw):  # the entry's name is damaged
            raise CorruptCheckpointError(f"{path} is damaged: its header's {SHA_KEY} entry is unreadable.")
        return None
    start = 8 + at + len(key)
    return start, start + 64


def seal(path: Path) -> None:
    """Write the checksum into a safetensors file written with ``{SHA_KEY: PLACEHOLDER}`` metadata."""
    where = sealed_offsets(path)
    if where is None:
        raise ValueError(f"{path}: written without the {SHA_KEY} placeholder, so it cannot be sealed.")
    digest = _sha256(path, skip=where)
    with open(path, "r+b") as f:
        f.seek(where[0])
        f.write(digest.encode())
        f.flush()
        os.fsync(f.fileno())


def verify_safetensors(path: Path, handle: BinaryIO | None = None) -> bool:
    """Check a safetensors file jaxlora wrote against its checksum (``False``: not sealed, unverified).

    Through ``handle``, an open file of ``path``, if given: what is read from it afterwards is the file checked,
    even if a save replaces ``path`` meanwhile.

    Raises:
      CorruptCheckpointError: if the file does not match.
    """
    if handle is None and not path.is_file():
        return False  # the reader names what is missing
    try:
        where = sealed_offsets(path, handle)
    except OSError as e:
        raise CorruptCheckpointError(f"{path} cannot be read ({e}).") from None
    if where is None:
        return False
    with _opened(handle or path) as f:
        f.seek(where[0])
        recorded = f.read(64).decode("ascii", "replace")
    if _sha256(handle or path, skip=where) != recorded:
        raise CorruptCheckpointError(
            f"{path} is damaged: its SHA-256 differs from the one jaxlora recorded when it wrote it "
            f"({SHA_KEY} in its header); export it again."
        )
    return True
