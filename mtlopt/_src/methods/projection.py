"""Gradient surgery by projection: PCGrad, computed in Gramian space."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mtlopt._src import build, rng, solvers


class PCGradState(NamedTuple):
    """State of :func:`pcgrad`. ``key`` is raw PRNG key data (uint32), split every step."""

    count: jax.Array
    skipped: jax.Array
    weights: jax.Array | None
    key: jax.Array


def pcgrad_weights(G: jax.Array, orders: jax.Array, mask: jax.Array) -> jax.Array:
    """PCGrad's weights on the raw gradients, from the Gramian alone.

    Task i's projected gradient is tracked as coefficients ``c_i`` (``g_i' = sum_k c_ik g_k``):
    for each other task j in ``orders[i]``, if ``<g_i', g_j> < 0`` then ``c_i -= (<g_i', g_j> /
    ||g_j||^2) e_j``. The update is ``sum_i g_i'``, so the weights are ``sum_i c_i``. O(T^3)
    flops on the ``(T, T)`` Gramian, no pass over the gradients.
    """
    T = G.shape[0]
    C0 = jnp.eye(T, dtype=G.dtype)
    rows = jnp.arange(T)

    def body(p, C):
        j = orders[:, p]  # (T,) the task each i projects against at position p
        Gj = G[:, j].T  # (T, T): row i is the column G[:, j_i]
        dots = jnp.sum(C * Gj, axis=1)  # <g_i', g_{j_i}>
        gjj = G[j, j]
        hit = (j != rows) & (dots < 0) & (gjj > 0) & mask[j]
        coef = jnp.where(hit, dots / jnp.where(gjj > 0, gjj, 1.0), 0.0)
        return C - coef[:, None] * jax.nn.one_hot(j, T, dtype=G.dtype)

    C = lax.fori_loop(0, T, body, C0)
    return jnp.sum(jnp.where(mask[:, None], C, 0.0), axis=0)


def pcgrad(
    seed: int | jax.Array = 0,
    *,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""PCGrad: project each task gradient off the others it conflicts with, then sum.

    Task → params. Scale: sums (T = 1 returns the gradient; orthogonal gradients give their
    sum).

    For each task i, in a random order of the other tasks j:
    if :math:`\langle g_i', g_j\rangle < 0` then
    :math:`g_i' \leftarrow g_i' - \frac{\langle g_i', g_j\rangle}{\|g_j\|^2} g_j`;
    the update is :math:`\sum_i g_i'`.

    Args:
      seed: an int or a PRNG key; the key lives in the state and is split every step (each
        task i draws its own order); a skipped step keeps it. Works under ``jax.vmap`` over
        keys.
      num_tasks: optional; given, the state keeps the last weights (``task_weights``).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`).
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).
      groups: per-group Gramians (see :func:`mtlopt.cagrad`); each group draws its own orders.

    Cost:
      Two passes over the task grads (Gramian, combination): the projections are tracked as
      coefficients on the ``(T, T)`` Gramian (O(T^3) flops), never as T^2 passes over the
      gradients.

    Deviations:
      The authors' code shuffles with Python's unseeded ``random`` and also compares a task with
      itself; we follow the paper (only j != i) with a keyed order.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.pcgrad(seed=0)
      >>> grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
      >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates["w"].round(4)
      Array([0.5, 1.5], dtype=float32)

    References:
      Yu et al., `Gradient Surgery for Multi-Task Learning
      <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
    """
    name = "pcgrad"
    rng.key_data(name, seed)  # checked now

    def weights_fn(ctx: build.Context):
        T = ctx.T
        others = jax.vmap(lambda k: jax.random.permutation(k, T))(jax.random.split(ctx.key, T))
        Gn = solvers.normalize(ctx.gram, ctx.mask)
        return pcgrad_weights(Gn, others, ctx.mask), {}

    method = build.Method(name, PCGradState, weights_fn, random=True)
    return build.aggregator(
        method,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        groups=groups,
        seed=seed,
    )
