"""Methods that solve a small problem on the simplex: MGDA and CAGrad (and CAGrad-Fast)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlopt._src import build, checks, solvers
from mtlopt._src.solvers import SolverInfo


class MGDAState(NamedTuple):
    """State of :func:`mgda`. ``dual`` is the last min-norm weights (the warm start)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    dual: jax.Array | None
    solver: SolverInfo | None


class CAGradState(NamedTuple):
    """State of :func:`cagrad`. ``dual`` is the last dual solution w* (the warm start)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    dual: jax.Array | None
    solver: SolverInfo | None


def _solver_state(T: int | None) -> dict:
    if T is None:
        return {"dual": None, "solver": None}
    info = SolverInfo(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), jnp.array(True))
    return {"dual": jnp.full((T,), 1.0 / T, jnp.float32), "solver": info}


def _warm_start(ctx: build.Context) -> jax.Array:
    cold = solvers.uniform(ctx.mask, ctx.dtype)
    if ctx.state.dual is None:
        return cold
    # After a skipped or all-masked step the stored dual may be all zero: start cold then.
    dual = ctx.state.dual.astype(ctx.dtype)
    return jnp.where(jnp.sum(jnp.where(ctx.mask, dual, 0.0)) > 0, dual, cold)


def _solver_extras(ctx: build.Context, w: jax.Array, info: SolverInfo) -> dict:
    if ctx.state.dual is None:
        return {}
    return {"dual": w, "solver": info}


def _check_solver_args(name: str, tol: float, max_iters: int) -> None:
    checks.positive_int(name, "max_iters", max_iters)
    checks.positive(name, "tol", tol)


_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def mgda(
    normalization: str = "none",
    *,
    num_tasks: int | None = None,
    eps: float = 1e-8,
    tol: float = 1e-6,
    max_iters: int = 500,
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""MGDA: the min-norm point of the convex hull of the (normalised) task gradients.

    Task → params. Scale: a convex combination (like the mean when all tasks agree).

    .. math::
       w^\star = \arg\min_{w \in \Delta_T} \Big\|\sum_t w_t \frac{g_t}{n_t}\Big\|^2, \qquad
       d = \sum_t \frac{w^\star_t}{n_t} g_t

    The update is zero exactly when the point is Pareto-stationary (0 in the hull); otherwise
    it decreases every task's loss to first order (``<g_t, d> >= ||d||^2 > 0``).

    Args:
      normalization: how each gradient is divided before the solve: ``"none"`` (n_t = 1),
        ``"l2"`` (its norm), ``"loss"`` (its loss), ``"loss+"`` (loss times norm). The loss
        variants need ``task_losses``; ``task_weights`` returns ``w_t / n_t``, the weights on
        the raw gradients.
      num_tasks: optional; given, the state keeps the weights, the warm start and the solver's
        report (``solver.num_steps``, ``solver.gap``, ``solver.converged``).
      eps: a norm or loss below ``eps`` counts as ``eps`` in ``n_t`` (no division by zero).
      tol: relative: the solver stops when its duality gap, an upper bound on the excess
        squared norm ``|d_w|^2 - |d*|^2``, is at most ``tol * |d_w|^2`` (or at the rounding of
        ``|d_w|^2`` in the Gramian's dtype); ``d`` is then within ``sqrt(tol) |d|`` of the
        min-norm point (1e-3 at the default), whatever the gradients' scales.
      max_iters: the solver's iteration cap. (Two tasks take a closed form: no loop, exact;
        ``tol`` and ``max_iters`` are then unused.)
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`).
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).
      groups: per-group Gramians (see :func:`mtlopt.cagrad`).

    Cost:
      Two passes over the task grads (Gramian, combination); an active-set (Newton) solve on
      the ``(T, T)`` Gramian with a FISTA fallback, warm-started; O(T) state with ``num_tasks``.

    Deviations:
      Sener & Koltun solve with Frank-Wolfe; we use an active-set (Newton) method with a
      FISTA fallback and a relative duality-gap stop (same problem, judged by the update in
      the tests). LibMTL's
      ``"loss+"`` multiplies the loss by the norm as here.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.mgda()
      >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates["w"].round(4)
      Array([0.5, 0.5], dtype=float32)

    References:
      Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
      <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.
    """
    name = "mgda"
    checks.choice(name, "normalization", normalization, _NORMALIZATIONS)
    _check_solver_args(name, tol, max_iters)
    eps = checks.nonnegative(name, "eps", eps)

    def scales(ctx: build.Context) -> jax.Array:
        # 1 / n_t, folded into the Gramian by the skeleton (G / (n n^T), in its pre-scaled
        # units, so huge or tiny norms cannot over- or underflow) and into the weights (w / n).
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(ctx.gram), 0.0)) * ctx.gram_scale
        losses = ctx.losses
        if losses is not None:
            # A loss below 0 has no meaning as a scale: the step is skipped (NaN), not floored.
            losses = jnp.where(losses >= 0, losses, jnp.nan)
        by = {"l2": norms, "loss": losses, "loss+": losses * norms if losses is not None else None}
        n = jnp.maximum(by[normalization], eps)  # a NaN loss stays NaN: the step is then skipped
        n = jnp.where(n == 0, 1.0, n)  # eps == 0 and a zero norm: leave that gradient as it is
        return 1.0 / n

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        Gn = solvers.normalize(ctx.gram, ctx.mask)
        w, info = solvers.min_norm(Gn, _warm_start(ctx), ctx.mask, tol=tol, max_iters=max_iters)
        return w, _solver_extras(ctx, w, info)

    method = build.Method(
        name,
        MGDAState,
        weights_fn,
        init_extra=lambda T, shared: _solver_state(T),
        needs_losses=normalization in ("loss", "loss+"),
        scales=None if normalization == "none" else scales,
        per_group=("dual", "solver"),
    )
    return build.aggregator(
        method,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        groups=groups,
    )


# Below this many ulps of (sum_t w_t ||g_t||)^2, ||g_w*||^2 (computed from the Gramian) is
# rounding: each entry G_st is known to about eps ||g_s|| ||g_t||, so w^T G w is known to about
# eps (sum_t w_t ||g_t||)^2, and ||g_w*|| (whose inverse scales the update's second term) to a
# relative 1 / (2 * _STATIONARY) at the threshold. Relative to the weighted norms, not to
# trace(G) / T: on badly scaled tasks CAGrad's optimum sits near the smallest gradient, where
# ||g_w*||^2 is far below trace(G) / T yet well determined.
_STATIONARY = 64.0


def cagrad(
    c: float = 0.4,
    rescale: int = 1,
    *,
    num_tasks: int | None = None,
    g0_weights: Sequence[float] | np.ndarray | jax.Array | None = None,
    tol: float = 1e-6,
    max_iters: int = 500,
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""CAGrad: descend the mean loss while keeping the worst task's improvement up.

    Task → params. Scale: averages (``rescale=0`` gives ``g0`` plus a term of norm
    ``c ||g0||``; 1 and 2 divide by ``1 + c**2`` and ``1 + c``). Weights are constants with
    respect to the gradients (``stop_gradient``).

    .. math::
       w^\star = \arg\min_{w \in \Delta_T} w^\top G b + c\|g_0\|\sqrt{w^\top G w}, \quad
       d = g_0 + \frac{c\|g_0\|}{\|g_{w^\star}\|}\, g_{w^\star}, \quad g_0 = \sum_t b_t g_t

    with ``b = 1/T`` (the mean) unless ``g0_weights`` is given (CAGrad-Fast, see
    :func:`mtlopt.cagrad_fast_weights`). This is the dual of ``max_d min_t <g_t, d>`` subject
    to ``||d - g0|| <= c ||g0||``.

    Args:
      c: the ball's radius relative to ``||g0||``, ``c >= 0``. 0 is gradient descent on the
        mean; large c approaches MGDA. The paper's convergence guarantee needs ``c < 1``.
      rescale: 0 returns ``d``; 1 returns ``d / (1 + c**2)``; 2 returns ``d / (1 + c)``.
      num_tasks: optional; given, the state keeps the weights, the dual w* (warm start of the
        next solve) and the solver's report (``solver.num_steps``, ``gap``, ``converged``).
      g0_weights: ``(T,)`` weights that make ``g0`` from the given gradients; default ``1/T``.
      tol: relative: the solver stops when its duality gap (an upper bound on ``F(w) - F*``)
        is at most ``tol * c ||g0|| ||g_w|| / 2`` (or at the rounding of F in the Gramian's
        dtype); ``d`` is then within ``sqrt(tol) * c ||g0||`` of the exact update (1e-3 of
        the ball's radius at the default), whatever the gradients' scales.
      max_iters: the solver's iteration cap. (Two tasks take a closed form: no loop, exact;
        ``tol`` and ``max_iters`` are then unused.)
      task_specific: which leaves are task-specific (per-task heads): a pytree of bools shaped
        like the params, or a callable mapping such a tree to one. Those leaves stay out of the
        Gramian and the solve; each follows its own task's gradient (``sum_t`` of its rows).
        Every method takes this argument.
      nonfinite: what a step with NaN or inf in the task grads, losses, weights or update
        does. Either way the state is left as it was and ``state.skipped`` counts the step;
        the update is zeros with ``"skip"`` (default), or NaN with ``"propagate"``, so
        that ``optax.apply_if_finite`` further down the chain skips the optimizer too.
        Every method takes this argument.
      groups: solve the method per group of leaves (e.g. per layer, as GradVac and TorchJD's
        grouping do) instead of once for the whole model: ``"leaf"`` (every shared leaf its
        own group), a pytree of hashable group ids shaped like the params, or a callable that
        maps a params-shaped tree of ``jax.ShapeDtypeStruct`` to one. Pass 1 then gives a
        ``(K, T, T)`` block Gramian, the K problems are solved in one batched call, each leaf
        is combined with its group's weights, and ``task_weights`` returns ``(K, T)``. Every
        Gramian method takes this argument.

    Cost:
      Two passes over the task grads (Gramian, combination); an active-set (Newton) solve on
      the ``(T, T)`` Gramian with a FISTA fallback (warm-started with ``num_tasks``); O(T)
      state.

    Deviations:
      ``rescale`` comes from the authors' code, not the paper (whose update is ``rescale=0``).
      When ``||g_w*||^2 <= 64 eps (sum_t w*_t ||g_t||)^2`` (``eps`` the precision's: 0 is in
      the hull up to rounding, a Pareto-stationary point) the direction of ``g_w*`` is
      rounding noise, and we return the (rescaled) ``g0`` instead of NaN: a convention, not
      the primal optimum. The authors' code solves the dual with
      scipy's SLSQP on the host; LibMTL calls ``c`` ``calpha``.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.cagrad(c=0.5, rescale=0)
      >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates["w"].round(4)
      Array([0.75, 0.75], dtype=float32)

    References:
      Liu et al., `Conflict-Averse Gradient Descent for Multi-task Learning
      <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
    """
    name = "cagrad"
    c = checks.nonnegative(name, "c", c)
    if checks.concrete(rescale):
        checks.choice(
            name, "rescale", int(rescale) if np.ndim(rescale) == 0 else rescale, (0, 1, 2)
        )
    _check_solver_args(name, tol, max_iters)
    b_given = None
    if g0_weights is not None:
        num_tasks, b_given = checks.weight_vector(name, "g0_weights", g0_weights, num_tasks)
    # c == 0 is gradient descent on g0: skip the solve where c is known now (a traced c, as
    # under optax.inject_hyperparams, solves; rho = 0 then gives the same weights).
    plain = checks.concrete(c) and float(np.asarray(c)) == 0.0

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        mask, dtype = ctx.mask, ctx.dtype
        cc = jnp.asarray(c).astype(dtype)
        r = jnp.asarray(rescale)
        divisor = jnp.where(r == 0, 1.0, jnp.where(r == 1, 1.0 + cc * cc, 1.0 + cc)).astype(dtype)
        b = solvers.preference(b_given, mask, dtype)  # keeps its total when tasks are masked
        if plain:
            return b / divisor, {}
        Gn = solvers.normalize(ctx.gram, mask)
        rho = cc * jnp.sqrt(jnp.maximum(solvers.quad(Gn, b), 0.0))
        w, info = solvers.cagrad_dual(
            Gn, b, rho, _warm_start(ctx), mask, tol=tol, max_iters=max_iters
        )
        gw2 = solvers.quad(Gn, w)
        size = jnp.dot(w, jnp.sqrt(jnp.maximum(jnp.diagonal(Gn), 0.0)))
        far = gw2 > _STATIONARY * jnp.finfo(dtype).eps * size * size
        coef = jnp.where(far, rho / jnp.sqrt(jnp.where(far, gw2, 1.0)), 0.0)
        return (b + coef * w) / divisor, _solver_extras(ctx, w, info)

    method = build.Method(
        name,
        CAGradState,
        weights_fn,
        init_extra=lambda T, shared: _solver_state(T),
        per_group=("dual", "solver"),
    )
    return build.aggregator(
        method,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        groups=groups,
    )
