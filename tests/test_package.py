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
