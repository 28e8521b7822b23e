"""The jaxlora command line: ``python -m jaxlora inspect|merge|convert``.

Exit status: 0 on success, 1 when the command fails (the message on stderr names the problem and the
fix), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "python -m jaxlora"


class CliError(Exception):
    """A failure reported to the user as one line on stderr, with exit status 1."""


def _import(where: str, spec: str) -> Any:
    """The module ``where`` names: a ``.py`` file (relative to the current directory) or an importable module."""
    if where.endswith(".py") and Path(where).is_file():
        path = Path(where).resolve()
        loaded = importlib.util.spec_from_file_location(f"_jaxlora_names_{path.stem}", path)
        assert loaded is not None and loaded.loader is not None  # a .py file always has a loader
        module = importlib.util.module_from_spec(loaded)
        sys.modules[loaded.name] = module  # dataclasses look their module up; a private name shadows nothing
        sys.path.insert(0, str(path.parent))  # the file's own sibling imports, as `python FILE.py` would find them
        try:
            loaded.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
        return module
    name = where[: -len(".py")].replace("/", ".").replace("\\", ".") if where.endswith(".py") else where
    try:
        return importlib.import_module(name)
    except ImportError as e:
        tried = f"no file {Path(where).resolve()} and no importable module {name!r}" if name != where else str(e)
        raise CliError(
            f"--names {spec!r}: {tried}; a FILE.py path is relative to the current directory ({Path.cwd()})."
        ) from None


def _names(spec: str | None) -> Any:
    """``--names``: a JSON file with ``{regex: replacement}``, or ``MODULE:ATTR`` / ``path/to/file.py:ATTR``.

    A ``FILE.py`` is read relative to the current directory, or else imported as the module its path
    names (``examples/minilm_bert.py`` -> ``examples.minilm_bert``).
    """
    if spec is None:
        return None
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise CliError(f"--names {spec!r}: no file {Path(spec).resolve()}.")
        try:
            return json.loads(Path(spec).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CliError(
                f"--names {spec!r}: cannot read a JSON object {{regex: replacement}} from it ({e})."
            ) from None
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise CliError(f"--names {spec!r}: expected FILE.json, MODULE:ATTR or FILE.py:ATTR.")
    module = _import(where, spec)
    if not hasattr(module, attr):
        raise CliError(f"--names {spec!r}: {where} has no attribute {attr!r}.")
    return getattr(module, attr)


# Flax's automatic names (Dense_0, MultiHeadDotProductAttention_1) and list items (layers_0), which a torch
# model spells layers.0: a module path holding one is not a torch module name
_FLAX_NAME = re.compile(r"[A-Z][A-Za-z0-9]*_\d+|\w+_\d+")


def _flax_style(paths: Sequence[str]) -> list[str]:
    """The module paths with a part no torch module name has (see `_FLAX_NAME`)."""
    return [p for p in paths if any(_FLAX_NAME.fullmatch(part) for part in p.split("/"))]


def _kind(path: Path) -> str:
    """``"orbax"`` (a jaxlora adapter), ``"peft"``, ``"safetensors"`` or ``"params"`` (an Orbax PyTree)."""
    if not path.exists():
        raise CliError(f"{path} does not exist.")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "safetensors"
        raise CliError(
            f"{path} is a file but not .safetensors; expected a checkpoint directory or a .safetensors file."
        )
    if (path / "lora_meta").is_dir():
        return "orbax"
    if (path / "lora_stack_meta").is_dir():
        return "stack"
    if (path / "adapter_config.json").is_file():
        return "peft"
    if (path / "_CHECKPOINT_METADATA").exists() or (path / "_METADATA").exists():
        return "params"
    raise CliError(f"{path} is neither a jaxlora adapter, a PEFT adapter nor an Orbax checkpoint.")


_WHAT = {"safetensors": "a safetensors file", "params": "an Orbax checkpoint of parameters"}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _inspect_stack(path: Path, as_json: bool) -> None:
    from .checkpoint._stack import read_stack_meta

    _, meta = read_stack_meta(path)
    if as_json:
        print(json.dumps({k: meta[k] for k in ("format", "version", "names", "modules", "base")}, indent=2))
        return
    print(f"stack:      {path}")
    print(f"format:     {meta['format']} (version {meta['version']})")
    print(f"adapters:   {len(meta['names'])}: {', '.join(meta['names'])}")
    print(f"modules:    {len(meta['modules'])}")
    print("base:       " + ("no fingerprint recorded" if not meta["base"] else f"{len(meta['base'])} adapted weights"))
    width = max((len(m["path"]) for m in meta["modules"]), default=6)
    for m in meta["modules"]:
        print(f"  {m['path']:<{width}}  a {str(m['a_shape']):<16} b {str(m['b_shape']):<16} {m['dtype']}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from . import checkpoint

    if (Path(args.dir) / "lora_stack_meta").is_dir():
        return _inspect_stack(Path(args.dir), args.json)
    about = checkpoint.info(args.dir)
    if args.json:
        print(json.dumps(about._asdict() | {"trainable": about.trainable}, indent=2))
        return
    ranks = sorted({m["rank"] for m in about.modules.values()})
    scales = sorted({m["scale"] for m in about.modules.values()})
    print(f"adapter:    {args.dir}")
    version = "" if about.version in (None, "unknown") else f" (version {about.version})"
    print(f"format:     {about.format}{version}")
    print(f"size:       {_human(about.size_bytes)} on disk ({about.size_bytes:,} bytes)")
    print(f"modules:    {len(about.modules)}")
    print(f"rank:       {ranks[0] if len(ranks) == 1 else ranks}")
    print(f"scale:      {scales[0] if len(scales) == 1 else scales}")
    print(f"parameters: {about.trainable:,} (LoRA)")
    if about.config:
        print("config:     " + ", ".join(f"{k}={v!r}" for k, v in about.config.items()))
    if about.base:
        base = sum(int(_prod(b["shape"])) for b in about.base.values())
        print(f"base:       {len(about.base)} adapted weights, {base:,} parameters")
    else:
        print("base:       no fingerprint recorded")
    width = max(len(p) for p in about.modules) if about.modules else 6
    for p, m in about.modules.items():
        shape = about.base[p]["shape"] if about.base and p in about.base else "?"
        dtype = about.base[p]["dtype"] if about.base and p in about.base else m["dtype"]
        print(f"  {p:<{width}}  weight {str(shape):<16} {dtype:<9} rank {m['rank']:<3} scale {m['scale']:g}")


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _load_adapter(
    path: Path, *, params: Any = None, names: Any = None, names_spec: str | None = None
) -> tuple[Any, Any]:
    """The LoRA tree and its info, from either format."""
    from . import checkpoint

    about = checkpoint.info(path)
    if about.format == "orbax":
        return checkpoint.restore(path, params=params), about
    try:
        return checkpoint.load_peft(path, params=params, names=names), about
    except ValueError as e:
        if "pass names=" not in str(e):
            raise
        raise CliError(str(e) + _names_hint(names_spec, torch_adapter=True)) from None


def _restore_params(path: Path) -> Any:
    import jax
    import orbax.checkpoint as ocp

    from .checkpoint import _commit

    def read(commit: _commit.Commit) -> Any:  # all of one commit, as every jaxlora reader
        commit.verify()  # a merged export of jaxlora's: checked before it is read
        root = commit.root
        if (root / "orbax.checkpoint").exists():  # Orbax's v1 layout, e.g. a merged export of jaxlora's
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shapes = ocp.v1.metadata(root).metadata
            is_array = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")  # noqa: E731
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), shapes, is_leaf=is_array
            )
            return ocp.v1.load(root, abstract)
        with ocp.StandardCheckpointer() as c:
            return c.restore(root)

    return _commit.read(path.absolute(), "merged", read)


def _names_hint(names: str | None, *, torch_adapter: bool = False) -> str:
    if names:
        return f"\nCheck that --names {names} maps every module path to the base's tensor names."
    if torch_adapter:
        return (
            "\nThe PEFT adapter names torch modules (e.g. 'encoder.layer.0.attention.self.query'); the base's "
            "module paths are jaxlora's: pass --names (FILE.json, MODULE:ATTR or FILE.py:ATTR) mapping jaxlora "
            "paths to torch names, e.g. --names examples/minilm_bert.py:NAMES."
        )
    return (
        "\nThe adapter's module paths are jaxlora's (e.g. 'encoder/layer_0/query'); a Hugging Face base names "
        "its tensors the torch way: pass --names (FILE.json, MODULE:ATTR or FILE.py:ATTR) to map them, e.g. "
        "--names examples/minilm_bert.py:NAMES."
    )


def _progress(description: str) -> Any:
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr (off when stderr is no terminal)."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit="tensor", disable=None, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _flax_layout(path: Path) -> bool:
    """Whether a safetensors file names its tensors by jaxlora leaf paths (``"up/kernel"``: `save_merged`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        keys = list(f.keys())
    return any("/" in k for k in keys) and not any("." in k for k in keys)


def _read_flax_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors file of leaf paths (as `save_merged` writes) as the nested params dict."""
    from safetensors.numpy import load_file

    params: dict[str, Any] = {}
    for key, array in load_file(str(path)).items():
        *parents, leaf = key.split("/")
        node = params
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = array
    return params


def cmd_merge(args: argparse.Namespace) -> None:
    from . import checkpoint
    from .checkpoint._peft import save_peft_files

    base, adapter, out = Path(args.base), Path(args.adapter), Path(args.out)
    base_kind, adapter_kind, names = _kind(base), _kind(adapter), _names(args.names)
    if adapter_kind not in ("orbax", "peft"):
        raise CliError(f"{adapter} is not an adapter (found {_WHAT[adapter_kind]}); expected jaxlora or PEFT format.")
    progress = _progress("merge")
    if base_kind == "safetensors" and not _flax_layout(base):  # Hugging Face's: PEFT's names and math, streamed
        if adapter_kind == "orbax":
            lora, about = _load_adapter(adapter)
            with tempfile.TemporaryDirectory() as tmp:
                save_peft_files(tmp, lora, base=about.base, names=names, config=about.config)
                try:
                    checkpoint.merge_safetensors(base, tmp, out, overwrite=args.overwrite, progress=progress)
                except ValueError as e:  # name the user's adapter, not the temporary PEFT copy
                    raise CliError(str(e).replace(str(tmp), str(adapter)) + _names_hint(args.names)) from None
        else:
            try:
                checkpoint.merge_safetensors(base, adapter, out, overwrite=args.overwrite, progress=progress)
            except ValueError as e:
                if "does not fit the base" not in str(e):
                    raise
                raise CliError(
                    f"{e}\nIf {adapter} came from `convert` without --names, its module names are jaxlora's: "
                    "convert the jaxlora adapter again with --names mapping them to the base's torch names."
                ) from None
    elif base_kind in ("params", "safetensors"):  # an Orbax checkpoint, or a safetensors file jaxlora wrote
        params = _restore_params(base) if base_kind == "params" else _read_flax_safetensors(base)
        lora, _ = _load_adapter(adapter, params=params, names=names, names_spec=args.names)
        fmt = "safetensors" if out.suffix == ".safetensors" else "orbax"
        checkpoint.save_merged(out, params, lora, format=fmt, overwrite=args.overwrite, progress=progress)
    else:
        raise CliError(
            f"BASE {base} is a {base_kind} adapter; pass the base model (.safetensors or an Orbax checkpoint)."
        )
    print(f"wrote {out}")


def cmd_convert(args: argparse.Namespace) -> None:
    from . import checkpoint
    from .checkpoint._orbax import config_from_json
    from .checkpoint._peft import save_peft_files

    src, dst = Path(args.src), Path(args.dst)
    if args.names and args.keep_names:
        raise CliError("--names and --keep-names contradict each other; pass one.")
    kind, names = _kind(src), _names(args.names)
    if kind not in ("orbax", "peft"):
        raise CliError(f"{src} is not an adapter (it is {_WHAT[kind]}).")
    to = args.to or ("peft" if kind == "orbax" else "orbax")
    if to == kind:
        raise CliError(f"{src} is already in {kind} format; pick --to {'peft' if kind == 'orbax' else 'orbax'}.")
    if dst.exists() and not args.overwrite:  # a PEFT dir is otherwise a slot: refuse to fill any existing one
        same = " (it is SRC itself)" if dst.resolve() == src.resolve() else ""
        raise CliError(f"{dst} already exists{same}; choose another DST, or pass --overwrite to replace it.")
    params = _restore_params(Path(args.base)) if args.base else None
    lora, about = _load_adapter(src, params=params, names=names, names_spec=args.names)
    flax_paths = _flax_style(list(lora)) if to == "peft" and names is None and not args.keep_names else []
    if flax_paths:
        shown = flax_paths[:3] + ([f"... {len(flax_paths) - 3} more"] if len(flax_paths) > 3 else [])
        raise CliError(
            f"module paths such as {shown} are Flax names (automatic names like Dense_0, list items like "
            "layers_0 where torch writes layers.0), which no torch model has, so PEFT would not find these "
            "modules. Pass --names (FILE.json, MODULE:ATTR or FILE.py:ATTR) mapping them to the torch model's "
            "module names, or --keep-names to write them as they are (for jaxlora to read back)."
        )
    if to == "peft":
        save_peft_files(
            dst, lora, base=about.base, names=names, config=about.config, overwrite=args.overwrite,
            experts=args.experts or (),
        )  # fmt: skip
    else:
        config = None
        if about.config and "rank" in about.config:  # written by jaxlora: the LoraConfig fields
            config = config_from_json(about.config)
        checkpoint.save(dst, lora, config=config, params=params, fingerprint=about.base, overwrite=args.overwrite)
    print(f"wrote {dst} ({to})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Inspect, merge and convert jaxlora and PEFT LoRA adapters.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names_help = "module-name mapping: FILE.json ({regex: replacement}), MODULE:ATTR or FILE.py:ATTR"

    s = sub.add_parser("inspect", help="describe an adapter directory (Orbax or PEFT)",
                       description="Print an adapter's format, config, targets, ranks, parameter count, size on disk "
                       "and base fingerprint.")  # fmt: skip
    s.add_argument("dir", help="adapter directory")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(run=cmd_inspect)

    s = sub.add_parser("merge", help="write the base with an adapter merged in",
                       description="Merge ADAPTER into BASE and write the full parameters to OUT. BASE is a Hugging "
                       "Face .safetensors file (merged one tensor at a time with PEFT's math; a jaxlora adapter is "
                       "converted with --names), a .safetensors file jaxlora wrote (leaf paths such as up/kernel), "
                       "or an Orbax checkpoint of the params (OUT: an Orbax directory, or a .safetensors file "
                       "written one weight at a time).")  # fmt: skip
    s.add_argument("base")
    s.add_argument("adapter")
    s.add_argument("out")
    s.add_argument("--names", help=names_help)
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.set_defaults(run=cmd_merge)

    about = "Convert SRC (jaxlora Orbax or PEFT adapter) to the other format at DST."
    s = sub.add_parser("convert", help="convert an adapter between the Orbax and PEFT formats", description=about)
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--to", choices=("peft", "orbax"), help="target format (default: the other one)")
    s.add_argument("--names", help=names_help)
    s.add_argument("--keep-names", action="store_true",
                   help="(to PEFT) write jaxlora's module paths as torch names even where they look like Flax "
                   "names (layers_0, Dense_0) that no torch model has")  # fmt: skip
    s.add_argument("--base", help="Orbax checkpoint of the base params: needed to place an adapter PEFT made")
    s.add_argument("--experts", action="append", metavar="PATTERN",
                   help="(to PEFT) a pattern of expert weights to write as PEFT target_parameters; repeatable; "
                   "--names must map each to its torch parameter's full name")  # fmt: skip
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    s.set_defaults(run=cmd_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status.

    Example:
      >>> main(["inspect", "/nonexistent"])
      1
    """
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (CliError, ValueError, TypeError, OSError) as e:  # OSError: e.g. a read-only output directory
        message = str(e)
        if isinstance(e, FileExistsError):
            message = message.replace("pass overwrite=True", "pass --overwrite")
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly, as shell users expect
    sys.exit(main())
