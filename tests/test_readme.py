"""Every ```python block of README.md and of the documentation pages (docs/) runs as written.

A block's first line is a comment that names the block and says how it runs:

    # NAME: runs as pasted
    # NAME: continues OTHER[, OTHER2]     after those blocks of the same page, each exactly as written
    # NAME: excerpt of examples/FILE.py   not run here; the example exists and a test runs it

A trailing ``(torch)`` marks a block that needs torch and peft: it is skipped where they are absent.
Each block runs in a fresh namespace, in an empty working directory, with the system temporary
directory pointed at an empty folder that must still be empty afterwards (snippets leave no litter).
There is no other set-up: what a block needs, it makes or names. docs/design.md has no blocks of this
kind (its code spans are prose) and is checked only for that.
"""

import pathlib
import re
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# blocks that take over ~5 s on two cores (their jit compilations): CI runs them once, on Python 3.12
SLOW = {"docs/guides/many_adapters.md:stack", "docs/guides/qlora.md:qlora"}
BLOCK = re.compile(r"^```python\n(?P<code>.*?)^```", re.S | re.M)
HEADER = re.compile(
    r"# (?P<name>[\w-]+): (?:(?P<pasted>runs as pasted)|continues (?P<after>[\w-]+(?:, [\w-]+)*)"
    r"|excerpt of (?P<example>examples/\w+\.py))(?P<torch> \(torch\))?\n"
)


def _blocks(page: pathlib.Path) -> dict[str, tuple[re.Match, str]]:
    """``{name: (header, code)}`` of one page's python blocks, in order; a bad header fails here."""
    blocks = {}
    for m in BLOCK.finditer(page.read_text()):
        header = HEADER.match(m["code"])
        first = m["code"].splitlines()[0]
        assert header, f"{page.name}: python block starting {first!r} has no '# NAME: runs as pasted' header"
        assert header["name"] not in blocks, f"{page.name}: two blocks named {header['name']!r}"
        blocks[header["name"]] = (header, m["code"])
    return blocks


def _cases():
    for page in PAGES:
        for name, (header, _) in _blocks(page).items():
            if header["example"]:
                continue
            case = f"{page.relative_to(ROOT)}:{name}"
            marks = [pytest.mark.torch] * bool(header["torch"]) + [pytest.mark.slow] * (case in SLOW)
            yield pytest.param(page, name, id=case, marks=marks)


def _chain(blocks: dict, name: str, seen: tuple[str, ...] = ()) -> list[str]:
    """The blocks to run for ``name``: what it continues (recursively, each once), then itself."""
    assert name in blocks, f"block {seen[-1]!r} continues {name!r}, which is not a block of the same page"
    assert name not in seen, f"blocks continue each other in a cycle: {seen + (name,)}"
    header = blocks[name][0]
    order: list[str] = []
    for before in (header["after"] or "").split(", ") if header["after"] else ():
        order += [b for b in _chain(blocks, before, seen + (name,)) if b not in order]
    return order + [name]


def test_readme_and_docs_have_blocks():
    cases = {p.id for p in _cases()}
    assert SLOW <= cases, f"SLOW names blocks that do not exist: {SLOW - cases}"
    readme = _blocks(ROOT / "README.md")
    assert readme["tour"][0]["pasted"], "the README's first block runs as pasted"
    assert next(iter(readme)) == "tour"
    assert not BLOCK.search((ROOT / "docs" / "design.md").read_text())


def test_excerpts_name_a_tested_example():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for page in PAGES:
        for name, (header, _) in _blocks(page).items():
            if header["example"]:
                example = ROOT / header["example"]
                assert example.is_file(), f"{page.name} block {name!r}: no {header['example']}"
                assert example.stem in tests, f"{page.name} block {name!r}: no test runs {header['example']}"


@pytest.mark.parametrize("page, name", list(_cases()))
def test_block_runs(page, name, tmp_path, monkeypatch):
    blocks = _blocks(page)
    order = _chain(blocks, name)
    if any(blocks[b][0]["torch"] for b in order):
        pytest.importorskip("torch")
        pytest.importorskip("peft")
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)  # blocks may write files under the current directory
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where tempfile.mkdtemp() and friends write
    namespace = {"__name__": "__main__"}
    for b in order:
        exec(compile(blocks[b][1], f"{page.name} block {b!r}", "exec"), namespace)
    assert not list(temp.iterdir()), f"{page.name} block {name!r} left files in the temporary directory"


def test_chain_errors():
    blocks = {"a": (HEADER.match("# a: continues b\n"), ""), "b": (HEADER.match("# b: continues a\n"), "")}
    with pytest.raises(AssertionError, match="cycle"):
        _chain(blocks, "a")
    with pytest.raises(AssertionError, match="not a block of the same page"):
        _chain({"a": (HEADER.match("# a: continues c\n"), "")}, "a")


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links, "the README links its guides"
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    anchors = re.findall(r"\]\(#([^)]+)\)", text)
    headings = {
        re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)
    }
    assert set(anchors) <= headings, f"README table of contents names missing sections: {set(anchors) - headings}"
