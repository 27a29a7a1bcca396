"""Per-coordinate aggregation: each coordinate of the update is a function of its T values
(TrimmedMean, GradDrop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mtlopt._src import build, checks, rng


class TrimmedMeanState(NamedTuple):
    """State of :func:`trimmed_mean` (``weights`` is always None: see the docstring)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: None


def trimmed_mean_rows(x: jax.Array, mask: jax.Array, trim_number: Any) -> jax.Array:
    """The coordinate-wise trimmed mean of the active rows of ``x`` (T, C): per column, drop the
    ``trim_number`` smallest and largest active values and average the rest. With fewer than
    ``2 * trim_number + 1`` active rows, as many are dropped from each end as still leaves one
    (or two) in the middle."""
    T = x.shape[0]
    n = jnp.sum(mask).astype(jnp.int32)
    k = jnp.minimum(jnp.asarray(trim_number, jnp.int32), jnp.maximum(n - 1, 0) // 2)
    count = jnp.maximum(n - 2 * k, 1).astype(x.dtype)
    if isinstance(trim_number, int) and 2 * trim_number * T <= _EXTRACT_LIMIT:
        return _trim_by_extraction(x, mask, trim_number, k) / count
    x = jnp.where(mask[:, None], x, jnp.inf)  # inactive rows sort last
    ordered = jnp.sort(x, axis=0)
    rank = jnp.arange(T, dtype=jnp.int32)[:, None]
    keep = (rank >= k) & (rank < n - k)
    return jnp.sum(jnp.where(keep, ordered, 0.0), axis=0) / count


# A sort along the task axis is slow on XLA:CPU: measured at T = 10, C = 1e6 (2 cores, under
# load), jnp.sort 1070-1290 ms against 13.5 / 22.5 / 40 ms for b = 1 / 2 / 4 by extraction (the
# b smallest and largest values found by elementwise passes over the T rows, which XLA fuses
# into one loop). Extraction costs ~2 b T elementwise steps: its compile time grows with them
# (T = 64, b = 1: 1.5 s; T = 10, b = 4: 0.55 s), so beyond this many the sort is used.
_EXTRACT_LIMIT = 128


def _trim_by_extraction(x: jax.Array, mask: jax.Array, b: int, k: jax.Array) -> jax.Array:
    """The sum of the active values of each column of ``x`` (T, C) but its ``k <= b`` smallest
    and ``k`` largest (one instance of each: ties are removed one at a time), without a sort.
    Only the values kept are summed (no cancellation against a huge value removed)."""
    T = x.shape[0]
    rows = [x[t] for t in range(T)]
    out = [jnp.broadcast_to(~mask[t], rows[t].shape) for t in range(T)]
    for r in range(b):
        use = r < k
        for pick, start in ((jnp.less, jnp.inf), (jnp.greater, -jnp.inf)):
            best = jnp.full(rows[0].shape, start, x.dtype)
            index = jnp.full(rows[0].shape, -1, jnp.int32)
            for t in range(T):
                better = ~out[t] & pick(rows[t], best)
                best = jnp.where(better, rows[t], best)
                index = jnp.where(better, t, index)
            out = [o | ((index == t) & use) for t, o in enumerate(out)]
    return cast(jax.Array, sum(jnp.where(o, 0.0, v) for o, v in zip(out, rows, strict=True)))


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
      One fused pass over the task grads finding each coordinate's ``trim_number`` smallest
      and largest values (O(trim_number * T) per coordinate; where ``2 * trim_number * T >
      128``, or ``trim_number`` is traced, a sort of the T values instead, far slower on
      XLA:CPU), and one check over the task grads; no Gramian, no state but counters.

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


# ---------------------------------------------------------------------------------------------
# GradDrop


class GradDropState(NamedTuple):
    """State of :func:`graddrop` (``weights`` is always None; ``key`` is raw PRNG key data,
    split every step)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: None
    key: jax.Array


# Random bits per uniform: two uniforms from each 32-bit word of the threefry stream (the
# generator is most of graddrop's cost on CPU: 1e6 float32 uniforms 2.5-3.5 ms, 5e5 words
# 1.2 ms, against 0.9-1.1 ms for the whole of mean()). Keep-probabilities are then multiples of
# 2**-16 (off by at most 2**-17 from the purity), and exactly 0 and 1 stay exact.
_UNIFORM_BITS = 16
# Up to this many tasks the sums over tasks are one unrolled elementwise chain (one fusion, one
# read of the T x C block); past it a loop over the tasks (less code to compile). A reduction
# over the task axis (jnp.sum(x, axis=0)) was measured 30-90x slower on XLA:CPU.
_UNROLL_TASKS = 16


def graddrop_uniforms(key: jax.Array, n: int, dtype: Any = jnp.float32) -> jax.Array:
    """The ``(n,)`` uniforms of one leaf: ``(b + 0.5) / 2**16`` for 16-bit integers ``b``, the
    high halves of ``jax.random.bits(key, (ceil(n / 2),), uint32)`` then the low halves. Never
    0 or 1."""
    words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
    b = jnp.concatenate([words >> 16, words & 0xFFFF])[:n]
    return (b.astype(dtype) + 0.5) * (2.0**-_UNIFORM_BITS)


def _task_sum(x: jax.Array, term: Callable[[jax.Array, Any], Any]) -> Any:
    """``sum_t term(x[t], t)`` over the rows of ``x`` (T, C), per column, for ``term`` returning
    an array or a tuple of arrays (C,): one elementwise chain (one read of x) up to
    ``_UNROLL_TASKS`` tasks, a loop over the tasks past it."""
    T = x.shape[0]
    add = lambda acc, t: jax.tree.map(jnp.add, acc, term(x[t], t))
    zero = jax.tree.map(jnp.zeros_like, term(x[0], 0))
    if T <= _UNROLL_TASKS:
        acc = zero
        for t in range(T):
            acc = add(acc, t)
        return acc
    return lax.fori_loop(0, T, lambda t, acc: add(acc, t), zero, unroll=4)


def graddrop_rows(x: jax.Array, u: jax.Array, leak: Any) -> jax.Array:
    """GradDrop of the rows of ``x`` (T, C) with the uniforms ``u`` (C,): per column, positive
    components kept where ``u < P`` (``P`` the positive sign purity), negative ones elsewhere,
    each row's dropped part leaking by ``leak`` (a scalar or ``(T,)``), the rows summed."""
    lk = jnp.asarray(leak, x.dtype)
    if lk.ndim == 0:

        def term(r: jax.Array, t: Any) -> tuple[jax.Array, ...]:
            return jnp.maximum(r, 0.0), jnp.minimum(r, 0.0)

    else:  # and each row's leak of its positive and negative parts

        def term(r: jax.Array, t: Any) -> tuple[jax.Array, ...]:
            pos, neg = jnp.maximum(r, 0.0), jnp.minimum(r, 0.0)
            return pos, neg, lk[t] * pos, lk[t] * neg

    # One fusion: the sums and the select. (A (T,) leak's four sums ran ~2x slower than the
    # scalar leak's two here, T = 10, P = 1e6; an optimization barrier on the sums changed
    # nothing.)
    sums = _task_sum(x, term)
    up, down = sums[0], sums[1]
    # u < P = up / (up - down), without the division (an all-zero column keeps the negatives,
    # which sum to 0).
    keep_up = u * -down < (1.0 - u) * up
    if lk.ndim == 0:
        return jnp.where(keep_up, up + lk * down, down + lk * up)
    return jnp.where(keep_up, up + sums[3], down + sums[2])


def graddrop(
    leak: Any = 0.0,
    seed: int | jax.Array = 0,
    *,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""GradDrop: per coordinate, keep one sign at random by its purity, drop the other, sum.

    Task → params. Scale: sums (T = 1 returns the gradient; identical tasks give T times it;
    ``leak=1`` is the plain sum).

    Per coordinate c, with :math:`g_{t,c}` the tasks' components, the positive sign purity
    :math:`P_c = \frac12\big(1 + \sum_t g_{t,c} / \sum_t |g_{t,c}|\big)` and a uniform
    :math:`U_c` drawn afresh every step:

    .. math::
       M_{t,c} = [U_c < P_c]\,[g_{t,c} > 0] + [U_c \ge P_c]\,[g_{t,c} < 0], \qquad
       d_c = \sum_t \big(\ell_t + (1 - \ell_t) M_{t,c}\big)\, g_{t,c}

    so with ``leak=0`` each coordinate of the update is the sum of either the positive or the
    negative components, the positive ones with probability :math:`P_c` (a coordinate where
    all tasks agree is kept whole).

    The paper applies the mask to the gradient with respect to a layer's activations (summed
    over the batch after multiplying by the sign of the inputs) and backpropagates the masked
    sum further; here it is applied directly to the parameters' task gradients, coordinate by
    coordinate (what TorchJD's ``GradDrop`` does to the rows of the Jacobian it is handed).

    Args:
      leak: :math:`\ell`, in ``[0, 1]``: a scalar, or a ``(T,)`` array with one per task; the
        fraction of each task's dropped components kept anyway (1: nothing dropped, the sum of
        the gradients). May be traced.
      seed: an int or a PRNG key; the key lives in the state and is split every step (leaf k
        draws its uniforms from ``fold_in(key, k)``); a skipped step keeps it. Works under
        ``jax.vmap`` over keys.
      num_tasks: optional, checked against the task grads (and a ``(T,)`` leak).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`): they
        follow their own task's gradient.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`). A NaN or
        inf anywhere in the task grads makes the step bad.

    ``task_weights`` returns None: the update is no single weighted sum of the task gradients.
    A masked task (``task_mask``) takes no part (its components count as 0). The update
    depends on how the params are split into leaves (each leaf draws its own uniforms).

    Cost:
      One read of the task grads (the sums over tasks of the positive and of the negative
      components, and the select, in one fusion; a ``(T,)`` leak adds two more sums, ~2x the
      arithmetic), 16 random bits per coordinate, and the skeleton's non-finite check of the
      inputs; no Gramian, no state but counters and the key. Measured at T = 10, P = 1e6
      float32 (2 busy CPU cores): about 2.5x ``mean()`` (a ``(T,)`` leak about 5x), 75-175x
      faster than TorchJD's ``GradDrop``.

    Deviations:
      Ties: :math:`U_c = P_c` keeps the negative components (the peers keep neither, which
      can drop a coordinate whole); an all-zero coordinate gives 0 (TorchJD computes a NaN
      purity there, LibMTL adds ``1e-7`` to the denominator). The uniforms carry 16 random
      bits (two per 32-bit word: half the generator's cost), so the keep probability is
      :math:`P_c` rounded to a multiple of :math:`2^{-16}` (exact at 0 and 1). Both peers
      sum, as here; LibMTL's ``leak`` is a scalar, TorchJD's a ``(T,)`` tensor (both
      accepted). TorchJD's purity transform ``f`` is the identity here.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.graddrop(seed=0)
      >>> grads = {"w": jnp.array([[1.0, 2.0, -1.0], [3.0, -2.0, -1.0]])}
      >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(3)}))
      >>> updates["w"][jnp.array([0, 2])]  # one sign in the two tasks: kept whole
      Array([ 4., -2.], dtype=float32)
      >>> bool(updates["w"][1] in (2.0, -2.0))  # one sign or the other
      True

    References:
      Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, `Just Pick a Sign: Optimizing
      Deep Multitask Models with Gradient Sign Dropout <https://arxiv.org/abs/2010.06808>`_,
      NeurIPS 2020.
    """
    name = "graddrop"
    rng.key_data(name, seed)  # checked now
    if np.ndim(leak) == 0:
        leak = checks.nonnegative(name, "leak", leak, upper=1.0)
    elif np.ndim(leak) != 1:
        raise checks.fail(
            name, f"leak must be a scalar or a (T,) array; got shape {np.shape(leak)}."
        )
    elif checks.concrete(leak):
        v = np.asarray(leak, np.float64)
        if not np.all(np.isfinite(v) & (v >= 0.0) & (v <= 1.0)):
            raise checks.fail(name, f"leak must be in [0, 1] for every task; got {leak!r}.")
        if num_tasks is not None and checks.concrete(num_tasks) and v.shape[0] != num_tasks:
            raise checks.fail(
                name,
                f"leak has {v.shape[0]} entries but num_tasks={num_tasks}; expected one per task.",
            )

    def coordinate(ctx: build.Context, m: jax.Array, index: int) -> jax.Array:
        if np.ndim(leak) == 1 and np.shape(leak)[0] != ctx.T:
            raise checks.fail(
                name,
                f"leak has {np.shape(leak)[0]} entries but the task grads have {ctx.T} tasks.",
            )
        u = graddrop_uniforms(jax.random.fold_in(ctx.key, index), m.shape[1], ctx.dtype)
        return graddrop_rows(m.astype(ctx.dtype), u, leak)

    method = build.Method(name, GradDropState, None, gram=None, coordinate=coordinate, random=True)
    return build.aggregator(
        method, num_tasks=num_tasks, task_specific=task_specific, nonfinite=nonfinite, seed=seed
    )
