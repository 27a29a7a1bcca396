"""Docs that run: every ```python block of README.md, and every docstring example."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import re

import jax
import pytest

import mtlopt

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
MODULES = [
    *sorted(m.name for m in pkgutil.walk_packages(mtlopt.__path__, "mtlopt.") if not m.ispkg),
    "mtlopt",
]


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    # Users run with jax's default (standard) promotion; optax and flax need it.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})


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
