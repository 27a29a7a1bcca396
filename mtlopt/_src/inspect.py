"""``task_weights``: the weights of the most recent update, found anywhere in a state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax


def _is_state(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _unwrap(x: Any) -> Any:
    """The array inside a framework's variable wrapper (Flax ``nnx.Optimizer`` keeps its optax
    state as ``OptArray`` variables), without importing the framework."""
    if x is None or isinstance(x, jax.Array):
        return x
    get_value = getattr(x, "get_value", None)  # Flax >= 0.12 (``.value`` is deprecated there)
    if callable(get_value):
        return get_value()
    value = getattr(x, "value", None)
    return value if value is not None else x


def task_weights(opt_state: Any) -> jax.Array | None:
    """The ``(T,)`` weights the aggregator applied in its most recent update.

    Searches ``opt_state`` (a chain, a wrapper, any nesting of tuples, lists and dicts)
    breadth-first for a state with a ``weights`` field that holds an array, so a wrapper's own
    weights win over those of a method inside it, and a state whose ``weights`` is None (a
    method built without ``num_tasks``, or a per-coordinate one) is passed over. Returns
    ``None`` when no state keeps weights. Under ``groups=`` the weights are ``(K, T)``, one row
    per group. States kept by Flax's ``nnx.Optimizer`` (``opt.opt_state``, whose arrays are
    ``OptArray`` variables) are read through: the result is the array itself.

    Args:
      opt_state: an optimizer state (a method's own, a chain's, a wrapper's).

    Examples:
      >>> import jax.numpy as jnp, optax, mtlopt
      >>> tx = optax.chain(mtlopt.mean(num_tasks=2), optax.sgd(0.1))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.ones((2, 2))}, state)
      >>> mtlopt.task_weights(state)
      Array([0.5, 0.5], dtype=float32)
    """
    for node in nodes(opt_state):
        if _is_state(node) and "weights" in node._fields:
            weights = _unwrap(node.weights)
            if weights is not None:
                return weights
    return None


def nodes(opt_state: Any) -> Iterator[Any]:
    """Every node of a state, breadth-first (tuples, lists, dicts, ``inner_state`` wrappers)."""
    level = [opt_state]
    while level:
        yield from level
        nxt: list[Any] = []
        for node in level:
            if isinstance(node, dict):
                nxt.extend(node.values())
            elif isinstance(node, (tuple, list)):
                nxt.extend(node)
            elif hasattr(node, "inner_state"):
                nxt.append(node.inner_state)
        level = nxt
