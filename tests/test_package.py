"""The package's namespace: what `dir(jaxlora)` shows, and that the API reference covers every public name."""

import pathlib
import re

import jaxlora
import jaxlora.checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_dir_lists_the_public_names_only():
    assert dir(jaxlora) == sorted([*jaxlora.__all__, "__version__"])
    assert not {"Any", "TYPE_CHECKING", "importlib"} & set(dir(jaxlora))
    jaxlora.init, jaxlora._tree  # noqa: B018 (loading names and private modules does not change it)
    assert dir(jaxlora) == sorted([*jaxlora.__all__, "__version__"])


def test_every_public_name_resolves():
    for name in jaxlora.__all__:
        assert getattr(jaxlora, name) is not None, name
    for name in jaxlora.checkpoint.__all__:
        assert getattr(jaxlora.checkpoint, name) is not None, name


def test_api_reference_documents_every_public_name():
    documented = set(re.findall(r"^::: (\S+)", (ROOT / "docs" / "api.md").read_text(), re.M))
    expected = {f"jaxlora.{n}" for n in jaxlora.__all__ if n not in ("nnx", "checkpoint")}
    expected |= {f"jaxlora._nnx.{n}" for n in jaxlora.nnx.__all__}
    expected |= {f"jaxlora.checkpoint.{n}" for n in jaxlora.checkpoint.__all__}
    assert expected - documented == set(), "public names missing from docs/api.md"


def _module_imports() -> dict[str, set[str]]:
    """jaxlora's modules -> the jaxlora modules each imports (at the top or inside a function)."""
    import ast
    import pathlib

    root = pathlib.Path(jaxlora.__file__).parent
    paths = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        paths[".".join(parts[:-1] if path.name == "__init__.py" else parts)] = path
    graph = {}
    for name, path in paths.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                names = {f"{base}.{a.name}" for a in node.names}
                # `from . import _commit` takes a module, not the package; `from .. import x` takes the package
                deps |= (names & paths.keys()) | ({base} if names - paths.keys() else set())
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    """Each room is a lower one its users import without being called back; no module imports the package
    (or its subpackage) it belongs to, whose ``__init__`` imports it."""
    graph = _module_imports()
    cycles = []

    def visit(module, path):
        for dep in sorted(graph[module]):
            if dep in path:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert cycles == []
    assert "jaxlora._quantized" in graph["jaxlora._quant"]  # the walk sees imports (a test that can fail)
