"""``by_path``: choose leaves (task-specific heads, a layer) by their path in the params."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

from mtlopt._src import checks


def _component(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_string(path: tuple) -> str:
    """A leaf's key path as ``"a/b/c"`` (a final ``value`` attribute, the array inside a Flax
    ``nnx`` Variable, left out: ``"trunk/kernel"``, as in the Variable's own path)."""
    parts = [_component(k) for k in path]
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def by_path(pattern: str | Callable[[str], bool]) -> Callable[[Any], Any]:
    """A ``task_specific=`` (or ``layer=``) spec: True for the leaves whose path matches.

    Each leaf's path is written ``"a/b/c"`` from its keys (dict keys, attribute names, list
    indices): ``"heads/kernel"`` in an ``nnx.State`` (Flax ``nnx``; the Variable's ``.value`` is
    left out) or in a linen params dict, ``"0/w"`` in a list of dicts. ``pattern`` is a regular
    expression searched in that string (``re.search``: ``"head"`` matches ``"head_a/bias"``;
    anchor with ``^`` and ``$``, or use ``(^|/)heads/``, for a whole component), or a predicate
    on it. The result is a function of a params-shaped tree, which is what mtlopt methods call
    it with (a tree of ``jax.ShapeDtypeStruct``, in ``init`` and ``update`` alike), so it needs
    no params when the method is built.

    Args:
      pattern: a regular expression, or a callable from the path string to bool.

    Returns:
      ``spec(tree) -> tree of bool`` with the structure of ``tree``.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> params = {"trunk": {"w": jnp.ones(3)}, "head_a": {"w": jnp.ones(3)}}
      >>> mtlopt.by_path("^head")(params)
      {'head_a': {'w': True}, 'trunk': {'w': False}}
      >>> tx = mtlopt.cagrad(task_specific=mtlopt.by_path("^head"))
    """
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern)
        except re.error as e:
            msg = f"pattern {pattern!r} is not a regular expression: {e}"
            raise checks.fail("by_path", msg) from None
        match = lambda s: regex.search(s) is not None
    elif callable(pattern):
        match = pattern
    else:
        raise checks.fail(
            "by_path",
            f"pattern must be a regular expression (str) or a callable on the path string; got "
            f"{type(pattern).__name__}.",
        )

    def spec(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda p, _: bool(match(path_string(p))), tree)

    return spec
