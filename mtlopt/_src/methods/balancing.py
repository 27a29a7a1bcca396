"""Loss-scale and gradient-magnitude balancing: ``log_transform``, DB-MTL and NTKMTL."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlopt._src import build, checks, tree


def log_scales(losses: jax.Array, eps: Any) -> jax.Array:
    """``1 / (l + eps)``: the factor that turns grad l into grad log(l + eps).

    A loss of 0 gives the largest scale ``1 / eps`` (finite for ``eps > 0``). A loss below 0 is
    outside the log's domain: its scale is NaN, so the step is skipped (``nonfinite``) rather
    than trained on a made-up scale; so is a NaN or inf loss.
    """
    return 1.0 / (jnp.where(losses >= 0, losses, jnp.nan) + eps)


class LogTransformState(NamedTuple):
    """State of :func:`log_transform`: steps seen (any task active) and steps skipped."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array


def log_transform(
    eps: float = 1e-8, *, num_tasks: int | None = None, nonfinite: str = "skip"
) -> optax.GradientTransformationExtraArgs:
    r"""DB-MTL's loss-scale balancing alone: each task's gradient of ``log(loss + eps)``.

    Task → task: it goes in front of any aggregator, e.g.
    ``optax.chain(mtlopt.log_transform(), mtlopt.cagrad(), optax.adam(1e-3))``.

    .. math:: g_t \leftarrow \frac{g_t}{\ell_t + \epsilon}

    The output is a lazy :class:`mtlopt.TaskScaled` (the task grads and the ``(T,)`` scales): the
    aggregator after it folds the scales into its Gramian (``S G S``) and its weights (``S w``),
    so the transform costs no pass over the task grads (``.materialize()`` gives the scaled
    grads for code outside mtlopt).

    Args:
      eps: added to the loss. A loss of 0 is scaled by ``1 / eps``: finite, but large. A loss
        below 0 (outside the log's domain), NaN or inf makes the step bad: this transform's
        state is kept (``skipped`` counts it) and the aggregator after it skips its step.
      num_tasks: optional; checked against the task grads.
      nonfinite: ``"skip"`` (default) or ``"propagate"``: on a bad step the output is marked
        bad either way, so the aggregator after it applies its own policy; ``.materialize()``
        gives zeros (``"skip"``) or NaN (``"propagate"``).

    Masked tasks (``task_mask``) keep scale 1 (their losses may be NaN).

    Cost:
      No pass over the task grads (``O(T)``); needs ``task_losses``; state: two counters.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.log_transform(eps=0.0)
      >>> grads = {"w": jnp.array([[2.0, 4.0], [3.0, 3.0]])}
      >>> out, _ = tx.update(grads, tx.init(None), task_losses=jnp.array([2.0, 3.0]))
      >>> out.materialize()["w"]
      Array([[1., 2.],
             [1., 1.]], dtype=float32)

    References:
      Lin et al., `Dual-Balancing for Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_.
    """
    name = "log_transform"
    eps = checks.nonnegative(name, "eps", eps)
    method = build.Method(
        name,
        LogTransformState,
        None,
        gram=None,
        needs_losses=True,
        scales=lambda ctx: log_scales(ctx.losses, eps),
    )
    return build.task_transform(method, num_tasks=num_tasks, nonfinite=nonfinite)


class DBMTLState(NamedTuple):
    """State of :func:`db_mtl`: ``ema_grads`` holds the EMA of each task's log-loss gradient, a
    params-shaped tree of ``(T, *leaf_shape)`` arrays (``None`` at task-specific leaves)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    ema_grads: Any


def db_mtl(
    num_tasks: int,
    beta: float = 0.9,
    beta_sigma: float = 0.0,
    eps: float = 1e-8,
    *,
    ema_dtype: Any = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
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
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`). A step
        skipped for bad inputs (a NaN, inf or negative loss, a non-finite gradient) leaves the
        EMA as it was; the EMA is written once, before the weighting, so a step whose update
        alone turns out non-finite (a float16 update beyond float16's range) still keeps it.
      ema_dtype: the EMA's dtype: None (default) keeps float32/float64 params' dtype and uses
        float32 for float16/bfloat16 params (log-gradients of small losses overflow float16);
        or an explicit dtype. Writes saturate at the dtype's largest finite value, never inf.
      groups: per-group gradient-magnitude balancing (see :func:`mtlopt.cagrad`).

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

    def init_extra(T: int, shared: Any) -> dict:
        if shared is None:
            raise checks.fail(name, "init needs the params: the EMA state is shaped like them.")
        return {"ema_grads": tree.task_zeros(shared, T, ema_dtype)}

    def prepare(shared: list, ctx: build.Context) -> build.Prepared:
        dtype = ctx.dtype
        scales = log_scales(ctx.losses, eps).astype(dtype)
        if ctx.scales is not None:
            scales = scales * ctx.scales
        k = (ctx.state.count + 1).astype(dtype)
        beta_k = (beta / k**beta_sigma).astype(dtype)
        # Decide before writing the EMA, from the inputs (the skeleton's checks of the losses,
        # then one reduction over the grads), rather than select between the old and new EMA
        # afterwards (a T x P copy): a step skipped for bad inputs leaves the EMA as it was.
        ok = ctx.ok & jnp.all(jnp.isfinite(jnp.where(ctx.mask, scales, 0.0)))
        ok &= tree.all_finite(shared)
        keep = ctx.mask & ok
        treedef: Any  # (jax's PyTreeDef does not resolve for mypy)
        old_leaves, treedef = jax.tree.flatten(ctx.state.ema_grads)

        def leaf(g: jax.Array, old: jax.Array) -> tuple[jax.Array, jax.Array]:
            rows = (-1,) + (1,) * (g.ndim - 1)
            g = g.astype(dtype) * scales.reshape(rows)
            new = tree.saturate(g + beta_k * (old.astype(dtype) - g), old.dtype)  # never inf
            new = jnp.where(keep.reshape(rows), new, old)
            # The squared norms in the same pass (handed on: no second read for pass 1).
            m = new.reshape(new.shape[0], -1).astype(dtype)
            return new, jnp.sum(m * m, axis=1)

        pairs = [leaf(g, old) for g, old in zip(shared, old_leaves, strict=True)]
        ema = [p[0] for p in pairs]
        sq = cast(jax.Array, sum(p[1] for p in pairs)) if pairs else None
        return build.Prepared(ema, {"ema_grads": treedef.unflatten(ema)}, ok, sq)

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
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
        head_scales=lambda ctx, w: log_scales(ctx.losses, eps),
        guarded=("ema_grads",),
    )
    return build.aggregator(
        method,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        groups=groups,
    )


# --- ntkmtl ---


class NTKMTLState(NamedTuple):
    """State of :func:`ntkmtl`: the step counters and, with ``num_tasks``, the last weights."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None


def ntkmtl_weights(diag: jax.Array, mask: jax.Array, ntk_exp: Any) -> jax.Array:
    """NTKMTL's weights ``(trace / diag_t) ** ntk_exp`` from the Gramian's diagonal ``(T,)``.

    The trace is over the active tasks; a masked task, or one whose squared norm is 0 (a zero
    gradient has no direction), gets weight 0. Computed as ``exp(ntk_exp * log(ratio))``, so a
    ratio beyond the dtype's range (a tiny task beside large ones) does not overflow. The
    weights do not depend on the Gramian's units: a pre-scaled one gives the same.
    """
    diag = jnp.where(mask, jnp.maximum(diag, 0.0), 0.0)
    live = diag > 0
    # log(trace) by logsumexp: the trace itself may overflow (squared norms near the dtype's
    # largest value) where no entry does, and dividing by the largest entry instead would need
    # its reciprocal, subnormal there (flushed to zero on XLA:CPU).
    log_diag = jnp.log(jnp.where(live, diag, 1.0))
    log_trace = jax.nn.logsumexp(jnp.where(live, log_diag, -jnp.inf))
    log_ratio = log_trace - log_diag
    p = jnp.asarray(ntk_exp, diag.dtype)
    return jnp.where(live, jnp.exp(p * log_ratio), 0.0)


def ntkmtl(
    ntk_exp: float = 0.5,
    max_norm: float = 1.0,
    *,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""NTKMTL: each task weighted by the NTK's trace over its own NTK eigenvalue, to a power.

    Task → params. Scale: sums, and more: every weight is at least 1 (``T = 1`` returns the
    gradient; T identical tasks give ``T**(1 + ntk_exp)`` times it). With ``ntk_exp = 1/2``
    each task contributes a vector of the same norm, ``sqrt(trace G)``. Then, as in the
    authors' code, the shared update is clipped to norm ``max_norm`` (1 by default).

    .. math::
       w_t = \Big(\frac{\operatorname{tr} G}{G_{tt}}\Big)^{p}
           = \Big(\frac{\sum_s \|g_s\|^2}{\|g_t\|^2}\Big)^{p}, \qquad
       d = \min\Big(1, \frac{m}{\|g_w\|}\Big)\, g_w, \quad g_w = \sum_t w_t g_t

    with ``p = ntk_exp`` and ``m = max_norm``. This is the paper's NTKMTL with one NTK sample
    per task (its ``n = 1``, used in all of its NTKMTL experiments): task t's NTK is then the
    scalar ``||g_t||^2``, its largest eigenvalue, and the tasks' convergence speeds are
    balanced by weighting each against their sum.

    Args:
      ntk_exp: ``p``, the exponent on the NTK ratio, ``>= 0``. The paper takes the square
        root (0.5, the default); the authors' README suggests trying slightly larger values
        (their NYUv2 script uses 0.75), which favour the slow (small-gradient) tasks more.
        0 gives the plain sum of the tasks with a non-zero gradient.
      max_norm: the shared part of the update (not the heads) is scaled down to at most this
        norm, as the authors' ``clip_grad_norm_`` on the shared parameters does; the factor
        is known from the Gramian (no extra pass) and included in ``task_weights``. 0 (or
        None): no clip, and only the squared norms are read in pass 1 (no off-diagonal).
      num_tasks: optional; given, the state keeps the last weights (``task_weights``).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); they
        follow their own task's gradient, unweighted, as in the authors' code.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).
      groups: weights per group of leaves (see :func:`mtlopt.cagrad`), each from its
        group's squared norms; the clip then applies to the whole shared update. The
        authors weight the whole shared model at once (no groups).

    Masked tasks (``task_mask``) take no part: they are left out of the trace and get
    weight 0. A task with a zero gradient gets weight 0 (it has no direction), and so does one
    whose squared norm is 0 in the Gramian's dtype beside the largest (float32: norms more than
    ~1e19 apart, where pass 1 pre-scales); the weights are computed in logs, so ratios beyond
    the dtype's range (a tiny task beside large ones) stay finite.

    Cost:
      Two passes over the task grads: squared norms (``max_norm=0``) or the Gramian (with the
      clip, whose norm ``sqrt(w^T G w)`` needs the off-diagonal), then the combination;
      O(T) work on them, no solver; no state beyond the last weights.

    Deviations:
      Neither LibMTL nor TorchJD has NTKMTL. From the authors' code: a task with a zero
      gradient gets weight 0 (their code divides by its zero squared norm: NaN); masked tasks
      and ``groups=`` are ours. Their code multiplies the weighted sum by T before the clip
      (a factor copied from their CAGrad, "to match the sum loss"; their NTKMTL-SR weights
      the loss sum without it); we keep the weighted sum, ``sum_t w_t g_t``. To reproduce
      their update exactly, chain ``mtlopt.ntkmtl(max_norm=max_norm / T)`` and
      ``optax.scale(T)``. The paper's general NTKMTL (``n > 1`` samples per task: the largest
      eigenvalue of each task's per-sample NTK) and NTKMTL-SR (the NTK of the shared
      representation) need per-sample gradients, which the task grads do not carry: not
      implemented.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.ntkmtl(max_norm=0.0)
      >>> grads = {"w": jnp.array([[3.0, 0.0], [0.0, 4.0]])}
      >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates["w"].round(4)  # sqrt(25 / 9) * g_1 + sqrt(25 / 16) * g_2
      Array([5., 5.], dtype=float32)

    References:
      Qin et al., `NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from Neural
      Tangent Kernel Perspective <https://arxiv.org/abs/2510.18258>`_, NeurIPS 2025; code:
      https://github.com/jianke0604/NTKMTL.
    """
    name = "ntkmtl"
    ntk_exp = checks.nonnegative(name, "ntk_exp", ntk_exp)
    if max_norm is not None:
        max_norm = checks.nonnegative(name, "max_norm", max_norm)
    clip = max_norm is not None and not (
        checks.concrete(max_norm) and float(np.asarray(max_norm)) == 0.0
    )

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        diag = jnp.diagonal(ctx.gram) if ctx.gram.ndim == 2 else ctx.gram
        return ntkmtl_weights(diag, ctx.mask, ntk_exp), {}

    method = build.Method(
        name,
        NTKMTLState,
        weights_fn,
        gram="full" if clip else "diag",
        max_norm=max_norm if clip else None,
    )
    return build.aggregator(
        method,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        groups=groups,
    )
