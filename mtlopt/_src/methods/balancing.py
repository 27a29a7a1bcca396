"""Loss-scale and gradient-magnitude balancing: ``log_transform`` and DB-MTL."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtlopt._src import build, checks, tree


def log_scales(losses: jax.Array, eps: float) -> jax.Array:
    """``1 / (max(l, 0) + eps)``: the factor that turns grad l into grad log(l + eps).

    Losses must be positive for the log; a loss at or below 0 is out of the log's domain and is
    clamped to 0, which gives the largest scale ``1 / eps`` (finite, never NaN). A NaN loss
    gives a NaN scale, so the step is skipped under ``nonfinite="skip"``.
    """
    return 1.0 / (jnp.maximum(losses, 0.0) + eps)


class LogTransformState(NamedTuple):
    """State of :func:`log_transform`: the number of steps seen."""

    count: jax.Array


def log_transform(eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    r"""DB-MTL's loss-scale balancing alone: each task's gradient of ``log(loss + eps)``.

    Task → task: the leading T axis is kept, so it goes in front of any aggregator, e.g.
    ``optax.chain(mtlopt.log_transform(), mtlopt.cagrad(), optax.adam(1e-3))``.

    .. math:: g_t \leftarrow \frac{g_t}{\max(\ell_t, 0) + \epsilon}

    Args:
      eps: added to the loss. A loss ``<= 0`` (outside the log's domain) is clamped to 0, so it
        is scaled by ``1 / eps``: finite, but large; shift such losses to be positive.

    Cost:
      One elementwise pass over the task grads; needs ``task_losses``; no state but a count.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.log_transform(eps=0.0)
      >>> grads = {"w": jnp.array([[2.0, 4.0], [3.0, 3.0]])}
      >>> out, _ = tx.update(grads, tx.init(None), task_losses=jnp.array([2.0, 3.0]))
      >>> out["w"]
      Array([[1., 2.],
             [1., 1.]], dtype=float32)

    References:
      Lin et al., `Dual-Balancing for Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_.
    """
    name = "log_transform"
    eps = checks.nonnegative(name, "eps", eps)

    def init_fn(params):
        del params
        return LogTransformState(count=jnp.zeros((), jnp.int32))

    def update_fn(task_grads, state, params=None, *, task_losses=None, **extra):
        del params, extra
        T = checks.num_tasks(name, task_grads)
        losses = checks.task_vector(
            name,
            "task_losses",
            task_losses,
            T,
            required=True,
            why=" (it divides each task's gradient by its loss)",
        )
        scales = jax.lax.stop_gradient(log_scales(losses, eps))
        return tree.scale_tasks(scales, task_grads), LogTransformState(count=state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DBMTLState(NamedTuple):
    """State of :func:`db_mtl`: ``ema_grads`` holds the EMA of each task's log-loss gradient
    for every shared (not task-specific) leaf, a list of ``(T, *leaf_shape)`` arrays."""

    count: jax.Array
    skipped: jax.Array
    weights: jax.Array | None
    ema_grads: list


def db_mtl(
    num_tasks: int,
    beta: float = 0.9,
    beta_sigma: float = 0.0,
    eps: float = 1e-8,
    *,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""DB-MTL: log losses (scale balance), then every EMA gradient scaled to the largest norm.

    Task → params. Scale: sums (the update's size is T times the largest EMA norm when the
    tasks agree). There is no bias correction, so the first update has ``1 - beta`` of the
    scale (a tenth by default), as in the reference code.

    .. math::
       \hat g_t \leftarrow \frac{g_t}{\ell_t + \epsilon} + \beta_k\Big(\hat g_t -
       \frac{g_t}{\ell_t + \epsilon}\Big),\ \beta_k = \frac{\beta}{k^{\sigma}}, \qquad
       d = \max_s \|\hat g_s\| \sum_t \frac{\hat g_t}{\|\hat g_t\|}

    at step ``k = 1, 2, ...``, with ``g_hat`` starting at 0.

    Args:
      num_tasks: T (required: the EMA state has a task axis).
      beta: the EMA's decay.
      beta_sigma: ``sigma``, the decay's power-law schedule in the step count (0: constant).
      eps: added to each loss inside the log (see :func:`mtlopt.log_transform` for losses
        ``<= 0``).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); they
        follow the gradient of their own task's log loss, with no EMA and no balancing.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Cost:
      Reads the task grads once and the EMA (T x P, in the params' dtype) twice: the EMA update
      with the squared norms, and the combination. State: one T x P copy.

    Deviations:
      ``task_weights`` returns the coefficients on the EMA gradients,
      ``max_s ||g_hat_s|| / ||g_hat_t||`` (LibMTL reports ones). A task whose EMA is zero gets
      weight 0.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.db_mtl(num_tasks=2, beta=0.0)
      >>> grads = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]])}
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> updates, state = tx.update(grads, state, task_losses=jnp.array([1.0, 1.0]))
      >>> updates["w"].round(4)
      Array([3., 3.], dtype=float32)
      >>> mtlopt.task_weights(state).round(4)
      Array([1., 3.], dtype=float32)

    References:
      Lin et al., `Dual-Balancing for Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_.
    """
    name = "db_mtl"
    if num_tasks is None:
        raise checks.fail(
            name,
            "num_tasks is required (the EMA of each task's gradient is "
            "state shaped by T); e.g. mtlopt.db_mtl(num_tasks=3).",
        )
    beta = checks.nonnegative(name, "beta", beta, upper=1.0)
    beta_sigma = checks.nonnegative(name, "beta_sigma", beta_sigma)
    eps = checks.nonnegative(name, "eps", eps)

    def init_extra(T, shared):
        return {"ema_grads": [jnp.zeros((T, *jnp.shape(x)), jnp.result_type(x)) for x in shared]}

    def prepare(shared, ctx: build.Context):
        scales = log_scales(ctx.losses, eps)
        k = (ctx.state.count + 1).astype(jnp.float32)
        beta_k = beta / k**beta_sigma
        keep = ctx.mask
        # Decide before writing the EMA, from the inputs (one reduction over the grads),
        # rather than select between the old and new EMA afterwards (a T x P copy).
        ok = jnp.all(jnp.isfinite(jnp.where(keep, scales, 0.0))) & tree.all_finite(shared)
        keep = keep & ok

        def leaf(g, old):
            rows = (-1,) + (1,) * (g.ndim - 1)
            g = g.astype(jnp.float32) * scales.reshape(rows)
            new = (g + beta_k * (old.astype(jnp.float32) - g)).astype(old.dtype)
            return jnp.where(keep.reshape(rows), new, old)

        ema = [leaf(g, old) for g, old in zip(shared, ctx.state.ema_grads, strict=True)]
        return ema, {"ema_grads": ema}, ok

    def weights_fn(ctx: build.Context):
        norms = jnp.sqrt(jnp.maximum(ctx.gram, 0.0))
        active = ctx.mask & (norms > 0)
        top = jnp.max(jnp.where(active, norms, 0.0))
        return jnp.where(active, top / jnp.where(active, norms, 1.0), 0.0), {}

    method = build.Method(
        name,
        DBMTLState,
        weights_fn,
        init_extra=init_extra,
        gram="diag",
        needs_losses=True,
        prepare=prepare,
        head_scales=lambda losses: log_scales(losses, eps),
        guarded=("ema_grads",),
    )
    return build.aggregator(
        method, num_tasks=num_tasks, task_specific=task_specific, nonfinite=nonfinite
    )
