"""Gradient surgery in Gramian space: PCGrad (projection) and GradVac (cosine targets)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mtlopt._src import build, checks, rng, solvers, tree


class PCGradState(NamedTuple):
    """State of :func:`pcgrad`. ``key`` is raw PRNG key data (uint32), split every step."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
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

    def body(p: jax.Array, C: jax.Array) -> jax.Array:
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

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
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


# ---------------------------------------------------------------------------------------------
# GradVac


class GradVacState(NamedTuple):
    """State of :func:`gradvac`. ``targets[i, j]`` is the EMA target of the cosine between task
    i's altered gradient and task j's (``(T, T)``, ``(K, T, T)`` under ``groups=``); ``key`` is
    raw PRNG key data (uint32), split every step."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    targets: jax.Array
    key: jax.Array


# Guards of gradvac_weights, in ulps of the Gramian's dtype (see gradvac's Deviations).
_GRADVAC_ULPS = 64.0
_GRADVAC_SNAP_ULPS = 16.0
HIGHEST = lax.Precision.HIGHEST  # (no TF32 or bfloat16 passes for these small matmuls)
_TARGET_UPDATES = ("always", "when_altered")


def gradvac_weights(
    G: jax.Array,
    orders: jax.Array,
    mask: jax.Array,
    targets: jax.Array,
    beta: Any,
    target_update: str = "always",
) -> tuple[jax.Array, jax.Array]:
    """GradVac's weights on the raw gradients and the new targets, from the Gramian alone.

    Task i's altered gradient is tracked as coefficients ``c_i`` (``g_i' = sum_k c_ik g_k``),
    with ``d_i = C G`` (``d_ik = <g_i', g_k>``) updated alongside: for each other task j in
    ``orders[i]``, ``phi = d_ij / (||g_i'|| ||g_j||)``; if ``phi`` is below the target ``t``,
    ``c_ij += ||g_i'|| (t sqrt(1 - phi^2) - phi sqrt(1 - t^2)) / (||g_j|| sqrt(1 - t^2))``;
    then ``targets[i, j]`` moves to ``(1 - beta) targets[i, j] + beta phi``. The weights are
    ``sum_i c_i`` over the active tasks. All tasks i run at once (each reads only its own row of
    targets and the original gradients): T steps of O(T^2) flops, no pass over the gradients.

    Guards (``e`` = ``64 * eps`` of ``G``'s dtype): a cosine with a zero gradient is undefined,
    so a pair where ``||g_j||^2`` is at most the dtype's smallest normal, or where
    ``||g_i'||^2 <= e (sum_k |c_ik| ||g_k||)^2`` (zero up to the rounding of ``C G C^T``, e.g.
    after an exact projection off an opposite task), is skipped and its target kept; ``phi`` is
    clipped to ``[-1, 1]`` and the target used in the test and the correction to
    ``[-1 + e, 1 - e]``, so that ``sqrt(1 - t^2) > 0`` (a target of exactly 1 would need an
    infinite correction); a cosine within ``16 eps`` of +-1 counts as +-1 (the Gramian cannot
    tell such gradients from (anti)parallel ones, and ``sqrt(1 - phi^2)`` would turn the
    cosine's last-ulp rounding into a 3e-4 sine in float32): exactly opposite tasks then
    cancel at any target.
    """
    T = G.shape[0]
    dtype = G.dtype
    info = jnp.finfo(dtype)
    e = _GRADVAC_ULPS * info.eps
    snap = _GRADVAC_SNAP_ULPS * info.eps
    rows = jnp.arange(T)
    sq = jnp.maximum(jnp.diagonal(G), 0.0)
    norms = jnp.sqrt(sq)
    live = mask & (sq > info.tiny)  # gradients with a direction
    targets = targets.astype(dtype)
    beta = jnp.asarray(beta, dtype)

    def body(
        p: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        C, D, tgt = carry
        j = orders[:, p]  # (T,) the task each i meets at position p
        # Row i of `hot` picks task j_i (one-hot selects rather than gathers and a scatter:
        # batched cleanly under groups=, and a little cheaper to compile).
        hot = j[:, None] == rows[None, :]
        pick = lambda M: jnp.sum(jnp.where(hot, M, 0.0), axis=1)
        dot = pick(D)  # <g_i', g_j>
        n2 = jnp.sum(C * D, axis=1)  # ||g_i'||^2
        size = jnp.dot(jnp.abs(C), norms, precision=HIGHEST)  # the rounding scale of n2
        has_dir = (n2 > e * size * size) & (n2 > 0)
        ok = (j != rows) & mask & jnp.any(hot & live[None, :], axis=1) & has_dir
        ni = jnp.sqrt(jnp.where(ok, n2, 1.0))
        nj = jnp.where(ok, pick(norms[None, :]), 1.0)
        phi = jnp.clip(dot / ni / nj, -1.0, 1.0)
        phi = jnp.where(jnp.abs(phi) >= 1.0 - snap, jnp.sign(phi), phi)
        hat = pick(tgt)
        t = jnp.clip(hat, -1.0 + e, 1.0 - e)
        alter = ok & (phi < t)
        s = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
        s_hat = jnp.sqrt((1.0 - t) * (1.0 + t))
        w = jnp.where(alter, ni * (t * s - phi * s_hat) / (nj * s_hat), 0.0)
        step = jnp.where(hot, w[:, None], 0.0)  # w_i at (i, j_i)
        C = C + step
        D = D + jnp.dot(step, G, precision=HIGHEST)  # w_i G[j_i, :]
        moves = alter if target_update == "when_altered" else ok
        new = jnp.where(moves, hat + beta * (phi - hat), hat)
        tgt = jnp.where(hot, new[:, None], tgt)
        return C, D, tgt

    C0 = jnp.eye(T, dtype=dtype)
    C, _, targets = lax.fori_loop(0, T, body, (C0, G, targets))
    return jnp.sum(jnp.where(mask[:, None], C, 0.0), axis=0), targets


def gradvac(
    beta: float = 0.5,
    seed: int | jax.Array = 0,
    *,
    num_tasks: int | None = None,
    target_update: str = "always",
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient Vaccine: pull each task gradient towards an adaptive cosine target, then sum.

    Task → params. Scale: sums (T = 1 returns the gradient; identical tasks give T times it;
    the first step, with all targets 0, is PCGrad's).

    For each task i and each other task j, in a random order, with
    :math:`\phi = \cos(g_i', g_j)` and :math:`\hat\phi_{ij}` the target kept in the state:

    .. math::
       \text{if } \phi < \hat\phi_{ij}:\quad
       g_i' \leftarrow g_i' + \frac{\|g_i'\| \big(\hat\phi_{ij}\sqrt{1-\phi^2}
       - \phi\sqrt{1-\hat\phi_{ij}^2}\big)}{\|g_j\|\sqrt{1-\hat\phi_{ij}^2}}\, g_j, \qquad
       \hat\phi_{ij} \leftarrow (1-\beta)\,\hat\phi_{ij} + \beta\,\phi,

    starting from :math:`g_i' = g_i` and :math:`\hat\phi = 0`; the update is
    :math:`\sum_i g_i'`. The correction makes :math:`\cos(g_i', g_j) = \hat\phi_{ij}` exactly
    (in the plane of :math:`g_i', g_j`); the target is an EMA of the cosines met before the
    correction (the paper's Algorithm 1), for every visited pair.

    Args:
      beta: the EMA rate of the targets, in ``[0, 1]`` (0 keeps them at 0: PCGrad at every
        step; 1 sets each to the last cosine). May be traced.
      seed: an int or a PRNG key; the key lives in the state and is split every step (each
        task i draws its own order of the others; under ``groups=`` each group its own); a
        skipped step keeps it. Works under ``jax.vmap`` over keys.
      num_tasks: required: the targets are ``(T, T)`` state (``(K, T, T)`` under ``groups=``).
        The state also keeps the last weights (``task_weights``).
      target_update: ``"always"`` (default, the paper and TorchJD: every visited pair's target
        moves) or ``"when_altered"`` (LibMTL's ``GradVac``: only pairs whose gradient was
        altered this step move, so targets starting at 0 never rise above 0).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`).
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).
      groups: per-group Gramians (see :func:`mtlopt.cagrad`): GradVac per layer (the paper's
        per-layer variant, LibMTL's ``GradVac_group_type`` 1 and 2, TorchJD's grouping), with
        one ``(T, T)`` target table per group.

    A masked task (``task_mask``) takes no part: it is neither altered nor used to alter, and
    its row and column of targets are kept.

    Cost:
      Two passes over the task grads (Gramian, combination): the alterations are tracked as
      coefficients on the ``(T, T)`` Gramian (T steps of O(T^2) flops), never as passes over
      the gradients. O(T^2) state (per group).

    Deviations:
      Exactly the paper's loop, with guards where it would divide by zero or where float
      rounding decides: a pair whose cosine is undefined (``g_j = 0``, or ``g_i'`` zero up to
      the rounding of the Gramian, ``||g_i'||^2 <= 64 eps (sum_k |c_ik| ||g_k||)^2``, e.g.
      after the exact projection off an opposite task) is skipped and its target kept; the
      cosine is clipped to ``[-1, 1]``, and one within ``16 eps`` of +-1 counts as +-1 (float32
      cannot resolve angles below ~2e-3 rad from the Gramian: exactly opposite tasks then cancel
      whatever their target, as at the first step); the target, where it is compared and used,
      is clipped to ``[-1 + 64 eps, 1 - 64 eps]`` (a target of exactly 1, reached in float32
      after ~24 steps of identical tasks, would ask for an infinite correction). LibMTL and
      TorchJD add ``1e-8`` to the denominators instead (of the raw gradients' cosines, so tiny
      gradients change the answer); here the Gramian is normalised first and no constant is
      added, so the update's direction does not depend on the gradients' scale. LibMTL moves a
      target only when its pair was altered (offered as ``target_update="when_altered"``).
      Both peers shuffle with an unseeded global RNG; here the order comes from the keyed
      state (the same orders as :func:`mtlopt.pcgrad` with the same seed: ``beta=0`` is
      PCGrad step for step).

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.gradvac(beta=0.5, num_tasks=2)
      >>> grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> updates, state = tx.update(grads, state)  # targets 0: PCGrad's update
      >>> updates["w"].round(4)
      Array([0.5, 1.5], dtype=float32)
      >>> state.targets.round(4)  # beta * cos
      Array([[ 0.    , -0.3536],
             [-0.3536,  0.    ]], dtype=float32)
      >>> updates, state = tx.update(grads, state)  # now pulled to cos = -0.3536 only
      >>> updates["w"].round(4)
      Array([0.311, 1.311], dtype=float32)

    References:
      Wang, Tsvetkov, Firat & Cao, `Gradient Vaccine: Investigating and Improving Multi-task
      Optimization in Massively Multilingual Models <https://arxiv.org/abs/2010.05874>`_,
      ICLR 2021.
    """
    name = "gradvac"
    if num_tasks is None:
        raise checks.fail(
            name,
            "num_tasks is required (the cosine targets are (T, T) state); e.g. "
            "mtlopt.gradvac(num_tasks=3).",
        )
    rng.key_data(name, seed)  # checked now
    beta = checks.nonnegative(name, "beta", beta, upper=1.0)
    checks.choice(name, "target_update", target_update, _TARGET_UPDATES)

    def init_extra(T: int | None, shared: Any) -> dict:
        leaves = jax.tree.leaves(shared)
        dtype = tree.acc_dtype(*(jnp.result_type(x) for x in leaves)) if leaves else jnp.float32
        # From the host: a new buffer every call (donation), and no eager XLA program per shape
        # (jnp.zeros and jnp.asarray compile one each).
        return {"targets": jax.device_put(np.zeros((T, T), dtype))}

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        T = ctx.T
        orders = jax.vmap(lambda k: jax.random.permutation(k, T))(jax.random.split(ctx.key, T))
        Gn = solvers.normalize(ctx.gram, ctx.mask)
        w, targets = gradvac_weights(
            Gn, orders, ctx.mask, ctx.state.targets, beta, target_update=target_update
        )
        return w, {"targets": targets}

    method = build.Method(
        name,
        GradVacState,
        weights_fn,
        init_extra=init_extra,
        random=True,
        per_group=("targets",),
    )
    return build.aggregator(
        method,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        groups=groups,
        seed=seed,
    )
