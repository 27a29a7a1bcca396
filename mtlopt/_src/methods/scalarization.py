"""Fixed scalarizations: the mean of the task gradients and a fixed weighted sum."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlopt._src import build, checks, solvers


class MeanState(NamedTuple):
    """State of :func:`mean`."""

    count: jax.Array
    skipped: jax.Array
    weights: jax.Array | None


class LinearState(NamedTuple):
    """State of :func:`linear`."""

    count: jax.Array
    skipped: jax.Array
    weights: jax.Array | None


def mean(
    *, num_tasks: int | None = None, task_specific: Any = None, nonfinite: str = "skip"
) -> optax.GradientTransformationExtraArgs:
    r"""Equal weighting: the update is the mean of the task gradients.

    Task → params. Scale: averages (``1/T``), the gradient of the mean loss.

    .. math:: d = \tfrac1T \sum_t g_t

    Args:
      num_tasks: optional; given, the state keeps the weights (``task_weights``).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        gets its task's weight ``1/T``, as the gradient of the mean loss does.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Cost:
      One pass over the task grads (``w @ J`` per leaf); no Gramian, no solver. A loss
      weighting: :func:`mtlopt.loss_weights` gives its weights without task grads (one
      backward pass of ``sum_t w_t l_t`` instead of T).

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.mean()
      >>> grads = {"w": jnp.array([[1.0, 2.0], [3.0, 0.0]])}
      >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates
      {'w': Array([2., 1.], dtype=float32)}
    """

    def weights_fn(ctx):
        return solvers.uniform(ctx.mask, ctx.dtype), {}

    method = build.Method(
        "mean", MeanState, weights_fn, gram=None, loss_weighting=True, head_scales=_same_weights
    )
    return build.aggregator(
        method, num_tasks=num_tasks, task_specific=task_specific, nonfinite=nonfinite
    )


def linear(
    weights: Sequence[float] | jax.Array,
    *,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Fixed linear scalarization: the update is ``sum_t weights[t] * g_t``.

    Task → params. Scale: as given (weights summing to 1 average, ones sum).

    .. math:: d = \sum_t w_t g_t

    Args:
      weights: ``(T,)`` fixed weights, one per task (any real numbers).
      num_tasks: optional; must equal ``len(weights)`` if given.
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        gets its task's weight, as the gradient of ``sum_t w_t l_t`` does.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Cost:
      One pass over the task grads; no Gramian, no solver. A loss weighting: see
      :func:`mtlopt.loss_weights` for one backward pass instead of T.

    ``weights`` may be an array, traced too (``jax.vmap`` over preference vectors,
    ``optax.inject_hyperparams``): its values are checked when they are concrete.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.linear([1.0, 0.5])
      >>> grads = {"w": jnp.array([[1.0, 2.0], [4.0, 0.0]])}
      >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates
      {'w': Array([3., 2.], dtype=float32)}
    """
    name = "linear"
    if np.ndim(weights) != 1 or np.shape(weights)[0] == 0:
        raise checks.fail(
            name, f"weights must be a non-empty finite 1-D sequence; got {weights!r}."
        )
    T = np.shape(weights)[0]
    if checks.concrete(weights):
        w = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(w)):
            raise checks.fail(
                name, f"weights must be a non-empty finite 1-D sequence; got {weights!r}."
            )
        weights = np.asarray(weights, np.float32) if not hasattr(weights, "dtype") else weights
    if num_tasks is not None and checks.concrete(num_tasks) and num_tasks != T:
        raise checks.fail(name, f"num_tasks={num_tasks} but {T} weights were given.")

    def weights_fn(ctx):
        return jnp.asarray(weights).astype(ctx.dtype), {}

    method = build.Method(
        name, LinearState, weights_fn, gram=None, loss_weighting=True, head_scales=_same_weights
    )
    return build.aggregator(method, num_tasks=T, task_specific=task_specific, nonfinite=nonfinite)


def _same_weights(ctx, w):
    """Loss weighting: each head gets its task's loss weight, as the trunk does (the gradient of
    ``sum_t w_t l_t`` with respect to task t's head is ``w_t g_t``)."""
    del ctx
    return w
