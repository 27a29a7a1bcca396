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
    sizes: dict[int, str] = {}
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
    name: str,
    arg: str,
    value: Any,
    T: int,
    *,
    required: bool,
    why: str = "",
    dtype: Any = jnp.float32,
) -> jax.Array | None:
    """Checks a per-task vector such as ``task_losses``: shape ``(T,)``; returned in ``dtype``."""
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
    return jnp.asarray(value).astype(dtype)


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


def concrete(value: Any) -> bool:
    """Whether ``value`` is known now (not a tracer): hyperparameters are validated only then.

    ``optax.inject_hyperparams`` and ``jax.vmap`` over hyperparameters hand constructors traced
    arrays; their values are checked where they are concrete (at construction outside ``jit``).
    """
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(value))


def positive_int(name: str, arg: str, value: Any) -> int | None:
    """A positive int, or None; a traced value (``inject_hyperparams``) is returned as None:
    it cannot shape anything, and what it shaped was fixed when it was concrete (``init``)."""
    if value is None:
        return None
    if not concrete(value):
        return None
    if hasattr(value, "shape") and np.shape(value) == () and not isinstance(value, bool):
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.integer):
            value = int(arr)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise fail(name, f"{arg} must be a positive int; got {value!r}.")
    return int(value)


def count(name: str, arg: str, value: Any, minimum: int = 0) -> Any:
    """An int ``>= minimum`` (a count of steps, tasks, ...), checked when concrete; a traced
    scalar (``inject_hyperparams``, ``jax.vmap``) is returned as given."""
    if not concrete(value):
        if np.ndim(value) != 0:
            raise fail(name, f"{arg} must be a scalar int; got shape {np.shape(value)}.")
        return value
    ok = not isinstance(value, bool) and np.ndim(value) == 0
    ok = ok and np.issubdtype(np.asarray(value).dtype, np.integer) and int(value) >= minimum
    if not ok:
        raise fail(name, f"{arg} must be an int >= {minimum}; got {value!r}.")
    return int(value)


def nonnegative(name: str, arg: str, value: Any, *, upper: float | None = None) -> Any:
    """A number ``>= 0`` (and ``<= upper``): checked when concrete, returned as given.

    Floats stay Python floats (weakly typed: they take the dtype of the arrays they meet), arrays
    stay arrays, so ``optax.inject_hyperparams`` schedules and ``jax.vmap`` sweeps work.
    """
    if not concrete(value):
        if np.ndim(value) != 0:
            raise fail(name, f"{arg} must be a scalar; got shape {np.shape(value)}.")
        return value
    ok = isinstance(value, (int, float, np.number, np.ndarray, jax.Array))
    ok = ok and not isinstance(value, bool) and np.ndim(value) == 0
    if ok:
        v = np.asarray(value)
        ok = bool(np.issubdtype(v.dtype, np.number) and np.isfinite(v) and v >= 0)
        ok = ok and (upper is None or bool(v <= upper))
    if not ok:
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise fail(name, f"{arg} must be a finite number {bound}; got {value!r}.")
    return float(value) if isinstance(value, (int, float, np.number)) else value


def positive(name: str, arg: str, value: Any) -> Any:
    """A finite number ``> 0`` (checked when concrete), returned as given."""
    value = nonnegative(name, arg, value)
    if concrete(value) and not float(np.asarray(value)) > 0:
        raise fail(name, f"{arg} must be a finite number > 0; got {value!r}.")
    return value


def choice(name: str, arg: str, value: Any, options: tuple) -> Any:
    if value not in options:
        raise fail(name, f"{arg} must be one of {options}; got {value!r}.")
    return value


def weight_vector(name: str, arg: str, value: Any, num_tasks: int | None) -> tuple[int, Any]:
    """A constructor's ``(T,)`` vector of weights >= 0 (``cagrad``'s ``g0_weights``, UPGrad's
    ``pref_vector``): ``(its size, the vector as float32 numpy, or the traced array)``, checked
    against ``num_tasks`` where that is known."""
    if np.ndim(value) != 1 or np.shape(value)[0] == 0:
        raise fail(name, f"{arg} must be a non-empty 1-D sequence of weights; got {value!r}.")
    if concrete(value):
        v = np.asarray(value, np.float64)
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise fail(name, f"{arg} must hold finite weights >= 0; got {value!r}.")
        value = np.asarray(value, np.float32)
    size = np.shape(value)[0]
    if num_tasks is not None and concrete(num_tasks) and num_tasks != size:
        raise fail(name, f"num_tasks={num_tasks} but {arg} has {size} entries.")
    return size, value
