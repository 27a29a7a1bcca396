"""Fairness and priority between the tasks: FairGrad (alpha-fair weights) and PCD."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlopt._src import build, checks, solvers, tree
from mtlopt._src.solvers import FairInfo


class FairGradState(NamedTuple):
    """State of :func:`fairgrad`.

    ``weights``: the weights of the last update (``task_weights``); ``unit_weights``: the same
    solution in units of each task's natural scale, ``w_t |g_t|^(2 alpha / (1 + alpha))`` (the
    solution for orthogonal tasks is all ones): the warm start of the next solve, which does
    not depend on the gradients' norms (``alpha = 1``: Nash-MTL's ``unit_weights``);
    ``solver``: the last solve's report (:class:`~mtlopt._src.solvers.FairInfo`:
    ``num_steps``, ``residual``, ``converged``, ``ridge``). ``unit_weights`` and ``solver`` are
    None without ``num_tasks``.
    """

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    unit_weights: jax.Array | None
    solver: FairInfo | None


def _ridge_factor(T: int) -> float:
    """The default ``ridge`` in ulps of the Gramian's dtype: 16 sqrt(T) (as Nash-MTL's)."""
    return 16.0 * float(np.sqrt(T))


def fairgrad(
    alpha: float = 1.0,
    *,
    num_tasks: int | None = None,
    tol: float = 1e-5,
    max_iters: int = 50,
    ridge: float | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""FairGrad: the update of the alpha-fair allocation of progress between the tasks.

    Task → params. Scale: not normalised. The update scales as
    :math:`c^{(1-\alpha)/(1+\alpha)}` when every gradient is multiplied by ``c``: for
    ``alpha = 1`` (the default, proportional fairness) it does not depend on the gradients'
    norms (each task enters at unit norm, ``|d| = sqrt(T)`` for identical or orthogonal tasks,
    as Nash-MTL without its clip); for one task ``d = |g|^{(1-\alpha)/(1+\alpha)} g / |g|``.

    .. math::
       G w = w^{-1/\alpha}, \quad w > 0, \qquad d = \sum_t w_t g_t

    ``G`` the Gramian. Then :math:`\langle g_t, d\rangle = w_t^{-1/\alpha}`: the utilities
    :math:`u_t = \langle g_t, d\rangle` are the ones that maximise the alpha-fair welfare
    :math:`\sum_t u_t^{1-\alpha} / (1 - \alpha)` (``log u_t`` at ``alpha = 1``) for a step of
    bounded norm (Ban & Ji, Eq. 4 and Algorithm 1). ``alpha -> 0`` favours the sum of the
    utilities (the mean's direction), ``alpha = 1`` is Nash-MTL's bargaining system
    (:func:`mtlopt.nash_mtl`, ``max_norm=0``), large ``alpha`` approaches max-min fairness
    (``G w = 1``).

    The system is the stationarity condition of the strictly convex
    :math:`\tfrac12 w^\top G w - \sum_t w_t^{1-1/\alpha} / (1 - 1/\alpha)`; it is solved exactly
    (to ``tol`` in the residual ``max_t |(G w)_t w_t^{1/\alpha} - 1|``) by damped Newton in
    relative steps, warm-started from the last solution (:func:`mtlopt._src.solvers.fair`).

    No positive solution exists where a non-negative combination of the gradients is 0 (a zero
    task, two exactly opposed tasks, more tasks than the gradients' rank with 0 in their cone):
    the same rule as :func:`mtlopt.nash_mtl`. A zero gradient (or one whose squared norm
    underflows the precision) takes no part and gets weight 0, as a masked task does (the limit
    of the system, where its weight goes to infinity but multiplies a zero gradient). Otherwise
    ``G + sigma diag(G)`` is solved, ``sigma`` the smallest of ``ridge * 4**k`` that lifts the
    cosine matrix's eigenvalues above ``ridge`` (0 in the usual case): as ``ridge -> 0`` the
    update tends to the limit of the system, opposed tasks cancel (``g, -g`` give 0, up to the
    rounding of the large weights ``~ ridge^{-\alpha/(1+\alpha)} / |g|`` times ``eps``).

    Args:
      alpha: the fairness parameter, ``>= 0``. ``alpha = 0`` gives equal weights ``1/T`` (the
        utilitarian limit, TorchJD's special case). Tested from 0.5 to 5 (the powers
        ``w^{1/alpha}`` grow steep as ``alpha -> 0``).
      num_tasks: optional; given, the state keeps the weights, the solution in units of the
        gradients' norms (the warm start) and the solver's report.
      tol: the solve stops when ``max_t |(G w)_t w_t^{1/alpha} - 1| <= tol``, or at the
        rounding of that residual in the Gramian's dtype where the last Newton step no longer
        halves it (in float32 on nearly opposed tasks, where ``G w`` cancels: measured up to
        2e-3 at T = 10; the update is then still within 2e-3 of the exact one).
      max_iters: the Newton iteration cap.
      ridge: the least eigenvalue the cosine matrix may have before the system is regularised
        (see above); default ``16 sqrt(T) eps`` of the Gramian's dtype.
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        follows its own task's gradient, unweighted.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).
      groups: per-group Gramians (see :func:`mtlopt.cagrad`): one solve per group, batched.

    Cost:
      Two passes over the task grads (Gramian, combination); on the ``(T, T)`` Gramian a
      batched Cholesky factorisation (the regularisation test) and Newton steps (a ``T x T``
      Cholesky each): measured 3 to 10 from a cold start, up to ~30 on conflicting tasks or
      T = 64, 0 from the warm start on the same problem. O(T) state with ``num_tasks``.

    Bad values:
      For ``alpha != 1`` the weights scale as ``|g|^{-2 alpha / (1 + alpha)}``: where they leave
      the dtype's range (float32 gradients of norm ~1e-30 with ``alpha > 1``), the weights are
      not finite and the step is handled by ``nonfinite=`` (skipped by default).

    Deviations:
      The authors' code and both peers (TorchJD 0.18 ``FairGrad``, LibMTL ``FairGrad``) solve
      ``G w - w^{-1/alpha} = 0`` by ``scipy.optimize.least_squares`` on the host, from
      ``1/T``, with ``w >= 0`` as a bound and scipy's default tolerances (``1e-8`` on the change
      of the cost): on scaled or conflicting tasks that stops short of the solution, and with
      no positive solution it returns whatever the bound gives. Here the system is solved to
      ``tol`` and regularised (``ridge``) where it has no solution. LibMTL back-propagates
      ``sum_t w_t l_t``, so each head gets ``w_t`` times its gradient; here (and in TorchJD)
      heads follow their own gradient. ``alpha = 0``: equal weights ``1/T``, as TorchJD.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.fairgrad(alpha=1.0)
      >>> grads = {"w": jnp.array([[3.0, 0.0], [0.0, 0.5]])}
      >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates["w"].round(4)  # orthogonal tasks, alpha = 1: sum_t g_t / |g_t|
      Array([1., 1.], dtype=float32)
      >>> tx = mtlopt.fairgrad(alpha=2.0)  # orthogonal: w_t = |g_t|^(-4/3)
      >>> tx.update(grads, tx.init({"w": jnp.zeros(2)}))[0]["w"].round(2)  # |g_t|^(-1/3)
      Array([0.69, 1.26], dtype=float32)

    References:
      Ban & Ji, `Fair Resource Allocation in Multi-Task Learning
      <https://arxiv.org/abs/2402.15638>`_, ICML 2024.
    """
    name = "fairgrad"
    alpha = checks.nonnegative(name, "alpha", alpha)
    tol = checks.positive(name, "tol", tol)
    checks.positive_int(name, "max_iters", max_iters)
    if ridge is not None:
        ridge = checks.positive(name, "ridge", ridge)
    zero_alpha = checks.concrete(alpha) and float(alpha) == 0.0

    def init_extra(T: int | None, shared: Any) -> dict:
        if T is None:
            return {"unit_weights": None, "solver": None}
        leaves = jax.tree.leaves(shared)
        dtype = tree.acc_dtype(*(jnp.result_type(x) for x in leaves)) if leaves else jnp.float32
        info = FairInfo(
            jnp.zeros((), jnp.int32),
            jnp.zeros((), dtype),
            jnp.array(True),
            jnp.zeros((), dtype),
        )
        return {"unit_weights": jnp.zeros((T,), dtype), "solver": info}

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        dtype = ctx.dtype
        stateful = ctx.state.unit_weights is not None
        if zero_alpha:
            w = solvers.uniform(ctx.mask, dtype)
            extras = {}
            if stateful:
                extras = {"unit_weights": w * ctx.T, "solver": ctx.state.solver}
            return w, extras
        gram = ctx.gram.astype(dtype)
        scale = ctx.gram_scale.astype(dtype)  # the true Gramian is gram * scale**2
        a = jnp.asarray(alpha, dtype)
        pos = a > 0
        p = jnp.where(pos, 1.0 / jnp.where(pos, a, 1.0), 1.0)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)) * scale
        fi = jnp.finfo(dtype)
        big_enough = norms * (fi.max * fi.eps) > 1.0
        C, _, active = solvers.bargaining_cosines(gram, ctx.mask & big_enough)
        r = _ridge_factor(ctx.T) * float(fi.eps) if ridge is None else ridge
        sigma = solvers._bargaining_ridge(C, active, jnp.asarray(r, dtype))
        # The true weights are the pre-scaled solution times k = scale^(-2 / (1 + p)); the
        # unit weights are w_t n_t^(2 / (1 + p)) in either units (n_t = |g_t|).
        e = 2.0 / (1.0 + p)
        log_k = -e * jnp.log(scale)
        log_n = 0.5 * jnp.log(jnp.where(active, jnp.diagonal(gram), 1.0))  # pre-scaled
        w0 = jnp.zeros((ctx.T,), dtype)
        if stateful:
            last = ctx.state.unit_weights.astype(dtype)
            ok = last > 0
            w0 = jnp.where(ok, jnp.exp(jnp.log(jnp.where(ok, last, 1.0)) - e * log_n), 0.0)
        w, info = solvers.fair(gram, w0, active, p, sigma=sigma, tol=tol, max_iters=max_iters)
        ok = active & (w > 0)
        log_w = jnp.log(jnp.where(ok, w, 1.0))
        unit = jnp.where(ok, jnp.exp(log_w + e * log_n), 0.0)
        w = jnp.where(ok, jnp.exp(log_w + log_k), 0.0)
        w = jnp.where(pos, w, solvers.uniform(ctx.mask, dtype))  # a traced alpha = 0
        extras = {"unit_weights": unit, "solver": info} if stateful else {}
        return w, extras

    method = build.Method(
        name,
        FairGradState,
        weights_fn,
        init_extra=init_extra,
        per_group=("unit_weights", "solver"),
    )
    return build.aggregator(
        method,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        groups=groups,
    )


class PCDState(NamedTuple):
    """State of :func:`pcd`.

    ``weights``: the weights of the last update (``task_weights``); ``sq_norm_ema``: the moving
    average of each task's squared gradient norm, in units of ``4**ema_exp`` (a power of two
    kept beside it, so the average neither over- nor underflows for gradients of 1e-30 or
    1e30 in float32); ``ema_steps``: each task's number of averaged steps (the bias
    correction; masked steps are not counted); ``solver``: the last QP's report
    (:class:`~mtlopt._src.solvers.PriorityInfo`: ``num_steps``, ``violation``, ``feasible``).
    """

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    sq_norm_ema: jax.Array
    ema_exp: jax.Array
    ema_steps: jax.Array
    solver: solvers.PriorityInfo


def pcd(
    tau: Any = 0.02,
    beta: float = 0.999,
    eps: float = 1e-8,
    *,
    num_tasks: int | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""PCD (Priority-Constrained Descent): follow the primary task, guarantee the others progress.

    Task → params. Scale: the update has the primary task's gradient norm ``|g_0|`` (identical
    tasks, or one task: ``d = g_0``). Task 0 (the first row of the task grads) is the primary
    objective; the order of the tasks matters.

    .. math::
       \tilde d = \arg\min_d \tfrac12 |d - \tilde g_0|^2 \ \text{s.t.}\
       \tilde g_j^\top d \ge \tau_j |\tilde g_j|^2 \ (j \ge 1), \qquad
       d = |g_0| \, \tilde d / |\tilde d|

    with :math:`\tilde g_i = g_i / \sqrt{\hat v_i + \epsilon}`, :math:`\hat v_i` the
    bias-corrected moving average of :math:`|g_i|^2` (decay ``beta``) kept in the state: every
    secondary task gets at least a fraction ``tau`` of the first-order progress a step along
    its own normalised gradient would give. The moving average is part of the method (with the
    current norms instead, the update moves by 5-24% on sequences of scaled gradients).

    The QP is solved exactly in its dual, ``d~ = g~_0 + sum_j mu_j g~_j``, ``mu >= 0`` the
    constraints' multipliers, by the dual active-set method of Goldfarb & Idnani on the
    ``(T, T)`` Gramian (:func:`mtlopt._src.solvers.priority_qp`; finitely many steps, about T).

    Special cases (as TorchJD): a zero (or masked) primary gradient gives a zero update; where
    the constraints cannot all hold (T >= 3, e.g. two exactly opposed secondary tasks, or a
    secondary task whose normalised gradient is a negative combination of the others'), they
    are dropped and the update is ``g_0``; where ``d~`` is 0 up to the Gramian's rounding
    (``|d~|^2 <= 10 eps (sum_i |w_i| |g~_i|)^2``), the update is 0. A zero secondary task's
    constraint always holds (``0 >= 0``). Two opposed tasks ``g, -g``: ``d~ = -tau g~``,
    rescaled: ``d = -g`` (the secondary's guarantee wins over the primary).

    Args:
      tau: the guaranteed fraction, in ``[0, 1]``: one number for every secondary task, or a
        ``(T - 1,)`` vector (one per secondary task).
      beta: the moving average's decay, in ``[0, 1)``.
      eps: added to the bias-corrected average before its inverse square root (``>= 0``), in
        the units of the squared gradients: it dominates for gradients of norm below
        ``sqrt(eps)`` (the normalisation then stops equalising them).
      num_tasks: T (required: the state keeps the moving average).
      tol: a constraint counts as satisfied when violated by at most ``tol`` times the largest
        normalised squared norm; default 1e-9 in float64, 1e-6 in float32 (a few ulps: the
        slacks are computed from the float32 Gramian).
      max_iters: the active-set step cap (default 10 T), a guard against cycling under
        rounding (the iterate is then returned).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        follows its own task's gradient, unweighted.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`); a skipped
        step leaves the moving average as it was.
      groups: per-group Gramians (see :func:`mtlopt.cagrad`): one QP and one moving average per
        group.

    Cost:
      Two passes over the task grads (Gramian, combination); the QP on the ``(T, T)`` Gramian:
      about T active-set steps, each a ``(T - 1)`` linear solve (no warm start: the exact
      method needs none). O(T) state.

    Deviations:
      TorchJD 0.18 ``PCD`` (the reference; no LibMTL counterpart) solves the same QP by the
      same method on the host in float64; here it runs in the Gramian's dtype inside the jitted
      step. TorchJD keeps the moving average in float64 and counts every call (masking is not
      defined there); here the average is counted per task (a masked task's average and count
      are left as they were) and kept with a power-of-two exponent. The paper's reference code
      enumerates the working sets (exponential in T); the minimiser is the same.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.pcd(tau=0.5, num_tasks=2)
      >>> grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
      >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> # d~ = g~_0 + mu g~_1 with <g~_1, d~> = tau |g~_1|^2 (mu = 0.5 + 1/sqrt(2)), norm |g_0|
      >>> updates["w"].round(4)
      Array([0.1691, 0.9856], dtype=float32)

    References:
      Varam et al., `Not All Objectives Are Born Equal: Priority-Constrained Descent for
      Hierarchical Multi-Objective Optimization <https://openreview.net/forum?id=HT01yGHLEt>`_,
      TMLR 2026.
    """
    name = "pcd"
    if num_tasks is None:
        raise checks.fail(
            name,
            "num_tasks is required (the state keeps the moving average of the squared gradient "
            "norms); e.g. mtlopt.pcd(num_tasks=3).",
        )
    T0: Any = checks.positive_int(name, "num_tasks", num_tasks)
    if np.ndim(tau) == 0:
        tau = checks.nonnegative(name, "tau", tau, upper=1.0)
    else:
        if np.ndim(tau) != 1 or np.shape(tau)[0] != T0 - 1:
            raise checks.fail(
                name,
                f"tau must be a number or a vector of num_tasks - 1 = {T0 - 1} values (one per "
                f"secondary task); got shape {np.shape(tau)}.",
            )
        if checks.concrete(tau):
            v = np.asarray(tau, np.float64)
            if not np.all((v >= 0) & (v <= 1)):
                raise checks.fail(name, f"tau must hold values in [0, 1]; got {tau!r}.")
            tau = np.asarray(tau, np.float32)
    beta = checks.nonnegative(name, "beta", beta)
    if checks.concrete(beta) and not float(beta) < 1.0:
        raise checks.fail(name, f"beta must be in [0, 1); got {beta!r}.")
    eps = checks.nonnegative(name, "eps", eps)
    if tol is not None:
        tol = checks.positive(name, "tol", tol)
    if max_iters is not None:
        checks.positive_int(name, "max_iters", max_iters)

    def init_extra(T: int | None, shared: Any) -> dict:
        leaves = jax.tree.leaves(shared)
        dtype = tree.acc_dtype(*(jnp.result_type(x) for x in leaves)) if leaves else jnp.float32
        info = solvers.PriorityInfo(jnp.zeros((), jnp.int32), jnp.zeros((), dtype), jnp.array(True))
        return {
            "sq_norm_ema": jnp.zeros((T,), dtype),
            "ema_exp": jnp.zeros((), jnp.int32),
            "ema_steps": jnp.zeros((T,), jnp.int32),
            "solver": info,
        }

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        dtype = ctx.dtype
        T = ctx.T
        fi = jnp.finfo(dtype)
        gram = ctx.gram.astype(dtype)
        diag = jnp.maximum(jnp.diagonal(gram), 0.0)
        mask = ctx.mask
        st = ctx.state
        # The moving average in units of 4**e: this step's squared norms are diag * 4**k.
        _, k = jnp.frexp(ctx.gram_scale.astype(dtype))
        k = (k - 1).astype(jnp.int32)
        old = st.sq_norm_ema.astype(dtype)
        e_old = st.ema_exp.astype(jnp.int32)
        e = jnp.where(jnp.any(old > 0), jnp.maximum(e_old, k), k)
        b = jnp.asarray(beta, dtype)
        old_e = jnp.ldexp(old, 2 * (e_old - e))
        ema = jnp.where(mask, b * old_e + (1.0 - b) * jnp.ldexp(diag, 2 * (k - e)), old_e)
        steps = st.ema_steps + mask.astype(jnp.int32)
        debias = -jnp.expm1(steps.astype(dtype) * jnp.log(b))  # 1 - beta**n
        debias = jnp.where(steps > 0, debias, 1.0)
        eps_e = jnp.minimum(jnp.ldexp(jnp.asarray(eps, dtype), -2 * e), fi.max / 4)
        D = jnp.where(debias > 0, ema / jnp.where(debias > 0, debias, 1.0), 0.0) + eps_e
        s = jnp.where(D > 0, 1.0 / jnp.sqrt(jnp.where(D > 0, D, 1.0)), 0.0)
        live = mask & (diag > 0)
        s = jnp.where(live, s, 0.0)
        # A common factor of the scales changes nothing (d~ is rescaled to |g_0|): t = s / max s
        # (over the nonzero gradients: a zero one's scale, 1 / sqrt(eps), would shrink the rest).
        smax = jnp.max(s)
        t = jnp.where(smax > 0, s / jnp.where(smax > 0, smax, 1.0), 0.0)
        Gn = gram * t[:, None] * t[None, :]
        taus = jnp.broadcast_to(jnp.asarray(tau, dtype), (T - 1,))
        taus = jnp.concatenate([jnp.zeros((1,), dtype), taus])
        precision = 10.0 * float(fi.eps)
        qp_tol = (1e-9 if dtype == jnp.float64 else 1e-6) if tol is None else tol
        w, info = solvers.priority_qp(
            Gn,
            taus[1:],
            live,
            tol=qp_tol,
            dependence_tol=max(1e-9, precision),
            max_iters=10 * T if max_iters is None else max_iters,
        )
        dsq = solvers.quad(Gn, w)
        mag = jnp.sum(jnp.abs(w) * jnp.sqrt(jnp.diagonal(Gn))) ** 2
        primary = mask[0] & (diag[0] > 0)
        moves = dsq > precision * mag
        factor = jnp.sqrt(diag[0]) / jnp.sqrt(jnp.where(moves, dsq, 1.0))
        weights = jnp.where(primary & moves, w * t * factor, 0.0)
        extras = {"sq_norm_ema": ema, "ema_exp": e, "ema_steps": steps, "solver": info}
        return weights, extras

    method = build.Method(
        name,
        PCDState,
        weights_fn,
        init_extra=init_extra,
        per_group=("sq_norm_ema", "ema_exp", "ema_steps", "solver"),
    )
    return build.aggregator(
        method,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        groups=groups,
    )
