"""``task_value_and_grad``: the vector of task losses and one gradient per task."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mtlopt._src import checks


def task_value_and_grad(
    fun: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Like ``jax.value_and_grad``, for a ``fun`` that returns the ``(T,)`` task losses.

    Returns a function that gives ``(losses, task_grads)`` (or ``((losses, aux), task_grads)``
    with ``has_aux``), where every leaf of ``task_grads`` has a leading axis of size T: row
    ``t`` is the gradient of ``losses[t]``. It runs one forward pass and T backward passes,
    batched with ``jax.vmap`` over the rows of the identity (reverse mode, as ``jax.jacrev``).

    Performance: for a weight used as ``x @ W`` with ``W`` of shape ``(in, out)``, the per-task
    gradients come out of ``vmap`` transposed and XLA copies them (T parameter copies) into
    row-major order; storing such weights ``(out, in)`` (``x @ W.T``, as torch does) avoids the
    copy (27% less time for the task grads of a 1e6-parameter MLP, ``benchmarks/train_step.py``).

    Args:
      fun: returns a 1-D float array of task losses (and an aux value with ``has_aux``).
      argnums: which positional argument(s) to differentiate; a tuple gives a tuple of trees.
      has_aux: whether ``fun`` returns ``(losses, aux)``.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> def losses(p):
      ...     return jnp.stack([jnp.sum(p["w"] ** 2), jnp.sum(p["w"])])
      >>> l, g = mtlopt.task_value_and_grad(losses)({"w": jnp.array([1.0, 2.0])})
      >>> l, g["w"]
      (Array([5., 3.], dtype=float32), Array([[2., 4.],
             [1., 1.]], dtype=float32))
    """
    single = isinstance(argnums, int)
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if any(not isinstance(i, int) or not -len(args) <= i < len(args) for i in nums):
            raise checks.fail(
                "task_value_and_grad",
                f"argnums={argnums!r} does not fit the {len(args)} positional arguments given.",
            )

        def f(*diff: Any) -> Any:
            full = list(args)
            for i, d in zip(nums, diff, strict=True):
                full[i] = d
            return fun(*full, **kwargs)

        primals = tuple(args[i] for i in nums)
        if has_aux:
            losses, vjp, aux = jax.vjp(f, *primals, has_aux=True)
        else:
            losses, vjp = jax.vjp(f, *primals)
        if jnp.ndim(losses) != 1:
            raise checks.fail(
                "task_value_and_grad",
                "fun must return a 1-D array of task "
                f"losses, shape (T,); got shape {jnp.shape(losses)}.",
            )
        eye = jnp.eye(losses.shape[0], dtype=losses.dtype)
        grads = jax.vmap(vjp)(eye)
        grads = grads[0] if single else grads
        return ((losses, aux), grads) if has_aux else (losses, grads)

    return wrapped
