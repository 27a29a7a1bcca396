"""The public API is fully annotated, for users' type checkers (the package ships py.typed).

Every name in ``mtlopt.__all__``, ``mtlopt.datasets.__all__`` and ``mtlopt.flax.__all__``: a
function has an annotation on every parameter and on its return; a class on the parameters of
its constructor and on every parameter and return of the public methods it defines itself
(NamedTuples: on every field). The annotations must also evaluate (``typing.get_type_hints``),
as tools that read them at run time need. ``mypy`` (``.ci/run``) checks the code against them.
"""

from __future__ import annotations

import inspect
import os
import types
import typing

import pytest

import mtlopt
import mtlopt.datasets

flax = pytest.importorskip("flax")
import mtlopt.flax  # noqa: E402

MODULES = (mtlopt, mtlopt.datasets, mtlopt.flax)
_EMPTY = inspect.Parameter.empty
_OPTIONAL_SELF = ("self", "cls")
_SOURCE = os.path.dirname(mtlopt.__file__)


def _public() -> list[tuple[str, object]]:
    return [(f"{m.__name__}.{n}", getattr(m, n)) for m in MODULES for n in m.__all__]


def _callable_gaps(fn: object, *, needs_return: bool = True) -> list[str]:
    """The unannotated parameters of ``fn`` (and "return" where its return is not)."""
    sig = inspect.signature(fn)
    gaps = [
        p.name
        for p in sig.parameters.values()
        if p.annotation is _EMPTY and p.name not in _OPTIONAL_SELF
    ]
    if needs_return and sig.return_annotation is inspect.Signature.empty:
        gaps.append("return")
    return gaps


def _ours(fn: object) -> bool:
    """Whether ``fn`` is a function written in mtlopt's source (a dataclass's generated
    ``__init__`` carries the class's module name, but no source file)."""
    return isinstance(fn, types.FunctionType) and fn.__code__.co_filename.startswith(_SOURCE)


def _own_methods(cls: type) -> list[tuple[str, object]]:
    """The public methods and properties that mtlopt's code defines in ``cls`` (not those it
    inherits, nor those a base class generates in it, as Flax's ``replace``)."""
    out = []
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, (classmethod, staticmethod)):
            fn = attr.__func__
        elif isinstance(attr, property):
            fn = attr.fget
        else:
            fn = attr
        if _ours(fn):
            out.append((name, fn))
    return out


def _own_init(cls: type) -> object | None:
    """``cls.__init__`` where mtlopt's code defines it (not a generated dataclass one)."""
    init = vars(cls).get("__init__")
    return init if _ours(init) else None


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and hasattr(cls, "_fields")


def test_public_names_are_annotated():
    gaps = {}
    for qualname, obj in _public():
        if inspect.isclass(obj):
            if _is_namedtuple(obj):
                missing = [f for f in obj._fields if f not in obj.__annotations__]
            else:
                init = _own_init(obj)
                missing = _callable_gaps(init, needs_return=False) if init else []
            for name, method in _own_methods(obj):
                missing += [f"{name}: {g}" for g in _callable_gaps(method)]
        elif callable(obj):
            missing = _callable_gaps(obj)
        else:
            continue
        if missing:
            gaps[qualname] = missing
    assert not gaps, f"public names with unannotated parameters or returns: {gaps}"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_public_annotations_evaluate(module):
    for name in module.__all__:
        obj = getattr(module, name)
        if not inspect.isclass(obj):
            targets = [obj]
        else:
            targets = [m for _, m in _own_methods(obj)]
            targets += [init] if (init := _own_init(obj)) else []
            targets += [obj] if _is_namedtuple(obj) else []  # its fields
        for target in targets:
            typing.get_type_hints(target)  # a NameError names the bad annotation
