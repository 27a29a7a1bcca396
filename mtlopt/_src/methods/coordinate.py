"""Per-coordinate aggregation: each coordinate of the update is a function of its T values."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlopt._src import build, checks


class TrimmedMeanState(NamedTuple):
    """State of :func:`trimmed_mean` (``weights`` is always None: see the docstring)."""

    count: jax.Array
    skipped: jax.Array
    weights: None


def trimmed_mean_rows(x: jax.Array, mask: jax.Array, trim_number: Any) -> jax.Array:
    """The coordinate-wise trimmed mean of the active rows of ``x`` (T, C): per column, drop the
    ``trim_number`` smallest and largest active values and average the rest. With fewer than
    ``2 * trim_number + 1`` active rows, as many are dropped from each end as still leaves one
    (or two) in the middle."""
    T = x.shape[0]
    x = jnp.where(mask[:, None], x, jnp.inf)  # inactive rows sort last
    ordered = jnp.sort(x, axis=0)
    n = jnp.sum(mask).astype(jnp.int32)
    k = jnp.minimum(jnp.asarray(trim_number, jnp.int32), jnp.maximum(n - 1, 0) // 2)
    rank = jnp.arange(T, dtype=jnp.int32)[:, None]
    keep = (rank >= k) & (rank < n - k)
    total = jnp.sum(jnp.where(keep, ordered, 0.0), axis=0)
    return total / jnp.maximum(n - 2 * k, 1).astype(x.dtype)


def trimmed_mean(
    trim_number: int,
    *,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Coordinate-wise trimmed mean: per coordinate, drop the extremes, average the rest.

    Task → params. Scale: averages (a mean over the ``T - 2 * trim_number`` values kept). Robust
    to a few tasks (or Byzantine workers, in the paper's setting) whose gradients are far off in
    some coordinates.

    .. math::
       d_j = \frac{1}{T - 2b} \sum_{i=b+1}^{T-b} g_{(i), j}

    where :math:`g_{(1), j} \le \dots \le g_{(T), j}` are the T values of coordinate j sorted and
    :math:`b` is ``trim_number``.

    Args:
      trim_number: b, how many of the smallest and of the largest values each coordinate drops;
        ``0 <= 2 * b < T`` (checked at trace time). With tasks masked out (``task_mask``) and
        fewer than ``2b + 1`` left, each end drops as many as still leaves the middle.
      num_tasks: optional, checked against the task grads.
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`): they
        follow their own task's gradient.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`). A NaN or
        inf anywhere in the task grads makes the step bad, even where trimming would drop it.

    ``task_weights`` returns None: the update is no single weighted sum of the task gradients
    (each coordinate keeps different tasks).

    Cost:
      A sort of the T values of every coordinate (O(T log T) per coordinate) and one check
      over the task grads; no Gramian, no state but counters.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.trimmed_mean(1)
      >>> grads = {"w": jnp.array([[1.0, -5.0], [2.0, 0.0], [100.0, 1.0]])}
      >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates["w"]
      Array([2., 0.], dtype=float32)

    References:
      Yin, Chen, Kannan & Bartlett, `Byzantine-Robust Distributed Learning: Towards Optimal
      Statistical Rates <https://arxiv.org/abs/1803.01498>`_, ICML 2018 (TorchJD's
      ``TrimmedMean``).
    """
    name = "trimmed_mean"
    if checks.concrete(trim_number):
        if np.ndim(trim_number) != 0 or int(trim_number) != trim_number or trim_number < 0:
            raise checks.fail(name, f"trim_number must be an int >= 0; got {trim_number!r}.")
        trim_number = int(trim_number)
        if num_tasks is not None and checks.concrete(num_tasks) and 2 * trim_number >= num_tasks:
            raise checks.fail(
                name,
                f"needs num_tasks > 2 * trim_number; got num_tasks={num_tasks}, "
                f"trim_number={trim_number}.",
            )

    def coordinate(ctx: build.Context, m: jax.Array, index: int) -> jax.Array:
        del index
        if isinstance(trim_number, int) and 2 * trim_number >= ctx.T:
            raise checks.fail(
                name,
                f"needs more than 2 * trim_number = {2 * trim_number} tasks; the task "
                f"grads have {ctx.T}.",
            )
        return trimmed_mean_rows(m.astype(ctx.dtype), ctx.mask, trim_number)

    method = build.Method(name, TrimmedMeanState, None, gram=None, coordinate=coordinate)
    return build.aggregator(
        method, num_tasks=num_tasks, task_specific=task_specific, nonfinite=nonfinite
    )
