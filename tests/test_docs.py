"""Docs that run: every ```python block of README.md and of the documentation site's pages
(docs/), every docstring example (the pages' blocks and the docstrings marked slow: .ci/run's
docs step), and the README's and the site's completeness."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import re
import textwrap

import jax
import pytest

import mtlopt

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "docs").rglob("*.md"))
_BLOCK = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.S | re.M)


def _blocks(path: pathlib.Path) -> list[str]:
    """The ```python blocks of a Markdown file, dedented (a block may sit in a list item)."""
    return [textwrap.dedent(m.group(2)) for m in _BLOCK.finditer(path.read_text())]


README_BLOCKS = _blocks(ROOT / "README.md")
# The pages' blocks, each distinct block once and none that README.md already has (the
# quickstart is on both). They run in the slow step of .ci/run with the site's build, to keep
# the README's test command within its budget.
PAGE_BLOCKS: dict[str, str] = {}
for _path in PAGES:
    for _i, _code in enumerate(_blocks(_path)):
        if _code not in README_BLOCKS:
            PAGE_BLOCKS.setdefault(_code, f"{_path.relative_to(ROOT)} block {_i}")
MODULES = [
    *sorted(m.name for m in pkgutil.walk_packages(mtlopt.__path__, "mtlopt.") if not m.ispkg),
    "mtlopt",
]
# The constructors that the README's method table must list: every public method, and the
# wrappers that act on any method's weights.
METHOD_MODULES = ("mtlopt._src.methods.", "mtlopt._src.modifiers")
METHODS = sorted(
    name
    for name in mtlopt.__all__
    if name[0].islower() and getattr(mtlopt, name).__module__.startswith(METHOD_MODULES)
)


def _run(code: str, name: str) -> None:
    # Users run with jax's default (standard) promotion; optax and flax need it.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(compile(code, name, "exec"), {"__name__": "docs"})


def test_readme_and_pages_have_python_blocks():
    assert README_BLOCKS
    assert len(PAGE_BLOCKS) >= 10


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_block_runs(index):
    _run(README_BLOCKS[index], f"README.md block {index}")


@pytest.mark.slow
@pytest.mark.parametrize("code", list(PAGE_BLOCKS), ids=list(PAGE_BLOCKS.values()))
def test_page_block_runs(code):
    _run(code, PAGE_BLOCKS[code])


# Every module's docstring examples, as doctests (700 small eager programs, ~25 s): with the
# pages' blocks in the docs step of .ci/run, beside the site whose reference pages show them.
@pytest.mark.slow
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_public_names_are_documented():
    for name in mtlopt.__all__:
        obj = getattr(mtlopt, name)
        assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


def test_every_public_name_is_on_a_reference_page():
    import mtlopt.datasets
    import mtlopt.flax

    rendered = set()
    for page in (ROOT / "docs" / "reference").glob("*.md"):
        rendered |= set(re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M))
    public = [f"mtlopt.{n}" for n in mtlopt.__all__]
    public += [f"mtlopt.flax.{n}" for n in mtlopt.flax.__all__]
    public += [f"mtlopt.datasets.{n}" for n in mtlopt.datasets.__all__]
    missing = sorted(set(public) - rendered)
    assert not missing, f"public names on no page of docs/reference/ (add a ::: line): {missing}"


def test_readme_lists_every_method():
    rows = "\n".join(line for line in README.splitlines() if line.startswith("| `"))
    around = README[README.index("**Around any method**") :]
    missing = [m for m in METHODS if f"`{m}(" not in rows and f"`{m}`" not in around.split("##")[0]]
    assert METHODS and not missing, f"methods missing from the README's method table: {missing}"


def test_readme_is_for_users():
    # CI (.ci/run) calls this command line: it stays in the README verbatim.
    assert 'pip install -e ".[test]" && python -m pytest -q -n 2 -m "not slow"' in README
    assert len(README.splitlines()) <= 170
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if "://" in target:
            continue
        path = target.split("#")[0]
        assert (ROOT / path).exists(), f"README links to a missing file: {target}"
