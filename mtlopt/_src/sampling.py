"""Sampling before the backward pass: choices made on the losses, so fewer backward passes run.

CAGrad-Fast's random grouping lives here; later sampling methods (task sampling, ...) join it.
"""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from mtlopt._src import checks


def cagrad_fast_groups(key: jax.Array, num_tasks: int, n: int) -> jax.Array:
    r"""CAGrad-Fast's random grouping of T tasks into ``n`` groups, as an ``(n, T)`` matrix.

    Each step, the tasks are shuffled; the first ``n - 1`` stay alone, the remaining
    ``T - n + 1`` are merged into one averaged loss. Every task lands in exactly one group.
    Apply it to the loss vector *before* differentiating, so only ``n`` backward passes run:
    ``grouped = M @ losses``; then hand :func:`mtlopt.cagrad` the matching
    ``g0_weights=cagrad_fast_weights(T, n)``.

    Args:
      key: a PRNG key (split it every step).
      num_tasks: T.
      n: the number of groups, ``1 <= n <= T``.

    Returns:
      ``M``, ``(n, T)`` float32: row ``i < n-1`` is one-hot on a task, the last row averages
      the merged tasks (``1 / (T - n + 1)`` on each).

    Examples:
      >>> import jax, mtlopt
      >>> M = mtlopt.cagrad_fast_groups(jax.random.key(0), 4, 2)
      >>> (M > 0).sum(axis=0)  # every task in exactly one group
      Array([1, 1, 1, 1], dtype=int32)

    References:
      Liu et al. 2021, Sec. 3 (the reference code's ``cagrad_fast{n}``).
    """
    # Both shape the result, so they are concrete here: positive_int gives ints (None only for
    # None or a traced value).
    T = cast(int, checks.positive_int("cagrad_fast_groups", "num_tasks", num_tasks))
    n = cast(int, checks.positive_int("cagrad_fast_groups", "n", n))
    if n > T:
        raise checks.fail("cagrad_fast_groups", f"n must be at most num_tasks={T}; got n={n}.")
    order = jax.random.permutation(key, T)
    group_of_position = jnp.minimum(jnp.arange(T), n - 1)  # positions >= n-1 share the last group
    group = jnp.zeros((T,), jnp.int32).at[order].set(group_of_position)
    sizes = np.array([1.0] * (n - 1) + [T - n + 1.0], np.float32)
    onehot = jax.nn.one_hot(group, n, dtype=jnp.float32).T  # (n, T)
    return onehot / sizes[:, None]


def cagrad_fast_weights(num_tasks: int, n: int) -> np.ndarray:
    """The ``g0_weights`` that CAGrad-Fast's grouping implies: ``(1/T, ..., 1/T, (T-n+1)/T)``.

    With ``M = cagrad_fast_groups(key, T, n)``, ``sum_i b_i grad(M @ losses)_i`` is the gradient
    of the mean loss, so ``cagrad(g0_weights=b)`` keeps the true ``g0``.

    Args:
      num_tasks: T, the number of tasks.
      n: the number of groups, ``1 <= n <= T`` (as given to :func:`cagrad_fast_groups`).

    Examples:
      >>> import mtlopt
      >>> mtlopt.cagrad_fast_weights(5, 3)
      array([0.2, 0.2, 0.6], dtype=float32)
    """
    T = cast(int, checks.positive_int("cagrad_fast_weights", "num_tasks", num_tasks))
    n = cast(int, checks.positive_int("cagrad_fast_weights", "n", n))
    if n > T:
        raise checks.fail("cagrad_fast_weights", f"n must be at most num_tasks={T}; got n={n}.")
    return np.array([1.0] * (n - 1) + [T - n + 1.0], np.float32) / T
