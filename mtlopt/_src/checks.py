"""Trace-time validation shared by every method.

Every error starts with ``mtlopt.<method>:`` and says what was expected and what came, so a
user who passes a wrong shape sees the fix in the message. All checks here read static
information only (shapes, dtypes, tree structure): they run while tracing and cost nothing
at run time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def fail(name: str, message: str) -> ValueError:
    return ValueError(f"mtlopt.{name}: {message}")


def num_tasks(name: str, task_grads: Any, expected: int | None = None) -> int:
    """The number of tasks T: the common leading size of every leaf of ``task_grads``."""
    leaves = jax.tree_util.tree_leaves_with_path(task_grads)
    if not leaves:
        raise fail(
            name,
            "task_grads has no array leaves; expected a pytree of arrays with a "
            "leading task axis of size T.",
        )
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise fail(
                name,
                f"task_grads leaf {jax.tree_util.keystr(path)} is a scalar; every leaf "
                "needs a leading task axis of size T (shape (T, *param_shape)).",
            )
        sizes.setdefault(shape[0], jax.tree_util.keystr(path))
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise fail(
                name,
                f"task_grads leaf {jax.tree_util.keystr(path)} has dtype {dtype}; "
                "expected a floating dtype (float32, bfloat16, float16 or float64).",
            )
    if len(sizes) > 1:
        found = ", ".join(f"{size} (leaf {where})" for size, where in sizes.items())
        raise fail(
            name, f"task_grads leaves disagree on the number of tasks (leading axis): {found}."
        )
    (T,) = sizes
    if T == 0:
        raise fail(
            name, "task_grads has a leading task axis of size 0; expected at least one task."
        )
    if expected is not None and expected != T:
        raise fail(
            name,
            f"built with num_tasks={expected} but task_grads has {T} tasks "
            f"(leading axis of leaf {sizes[T]}).",
        )
    return T


def task_vector(
    name: str, arg: str, value: Any, T: int, *, required: bool, why: str = ""
) -> jax.Array | None:
    """Checks a per-task vector such as ``task_losses``: shape ``(T,)``, floating."""
    if value is None:
        if required:
            raise fail(
                name,
                f"this method needs {arg}, a ({T},) array with one value per task{why}; "
                f"pass it as tx.update(task_grads, state, params, {arg}=...).",
            )
        return None
    shape = jnp.shape(value)
    if shape != (T,):
        raise fail(name, f"{arg} must have shape ({T},), one per task; got {shape}.")
    return jnp.asarray(value, jnp.float32)


def task_mask(name: str, mask: Any, T: int) -> jax.Array | None:
    """Checks ``task_mask``: a ``(T,)`` bool array (True = the task takes part), or None."""
    if mask is None:
        return None
    shape = jnp.shape(mask)
    if shape != (T,):
        raise fail(name, f"task_mask must have shape ({T},), one bool per task; got {shape}.")
    dtype = jnp.result_type(mask)
    if dtype != jnp.bool_:
        raise fail(name, f"task_mask must be a bool array; got dtype {dtype}.")
    return jnp.asarray(mask)


def positive_int(name: str, arg: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise fail(name, f"{arg} must be a positive int; got {value!r}.")
    return int(value)


def nonnegative(name: str, arg: str, value: Any, *, upper: float | None = None) -> float:
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and value >= 0 and (upper is None or value <= upper)
    if not ok:
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise fail(name, f"{arg} must be a finite number {bound}; got {value!r}.")
    return float(value)


def choice(name: str, arg: str, value: Any, options: tuple) -> Any:
    if value not in options:
        raise fail(name, f"{arg} must be one of {options}; got {value!r}.")
    return value
