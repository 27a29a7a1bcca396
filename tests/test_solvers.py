"""Accuracy of the in-jit simplex solvers against independent float64 references.

``solvers.min_norm`` (MGDA: ``min_w w^T G w``) and ``solvers.cagrad_dual`` (CAGrad:
``min_w w^T G b + c ||g0|| sqrt(w^T G w)``, ``b = 1/T``, ``||g0||^2 = b^T G b``) over the simplex,
on trace-normalised Gramians ``G = J J^T`` (trace = T, so ``trace(G) / T = 1`` and the errors
below are in units of ``trace(G) / T``). The issue's requirement: ``F(w) - F* <= rtol`` with
``rtol = 1e-6`` in float64 and ``1e-4`` in float32. The solvers' ``tol`` is relative to F's own
scale (``F(w)`` for MGDA, ``rho |g_w| / 2`` for CAGrad), with a floor at F's rounding; these
scales are at most a few units of ``trace(G) / T``, so the default ``tol = 1e-6`` meets the
requirement here. The update itself is judged in ``test_accuracy.py``.

References (scipy; jaxopt as a cross-check), all float64, each with a certificate:

* MGDA: ``scipy.optimize.nnls`` solves the min-norm problem exactly (Lawson-Hanson active set):
  ``min_{u >= 0} |J^T u|^2 + (1^T u - 1)^2`` at ``u = s w`` (w in the simplex) is minimised over
  s at ``q / (1 + q)``, ``q = |J^T w|^2``, increasing in q, so ``u / sum(u)`` is the min-norm
  point.
* CAGrad: for ``mu > 0`` the QP ``min <g_w, g0> + mu/2 |g_w|^2`` is the min-norm point of the
  shifted rows ``g_t + g0 / mu`` (NNLS again), and ``mu |g_w(mu)|`` increases with mu and equals
  ``c |g0|`` at the optimum: a root-find in ``log mu`` (``scipy.optimize.brentq``), then the exact
  minimiser on the face of that support (closed form, least squares on J).
* Certificates: F* is bracketed by ``[lb, ub]``: ``ub`` is the best F found, ``lb`` a lower bound
  from duality (Frank-Wolfe gap for MGDA; for CAGrad ``min_t <g_t, d>`` for d in the ball
  ``|d - g0| <= c |g0|``, the primal). Every test asserts ``ub - lb <= rtol / 10`` before it
  judges the solver by ``F(w) - lb``, a bound on ``F(w) - F*`` that holds whatever the reference's
  own error.

The Gramian kinds: random, conflicting (pairs nearly opposite), nearly collinear (rank 1 plus
1e-3 noise; odd seeds mix signs, so 0 is nearly in the hull), badly scaled (unit rows scaled by
10^U(-span, span), both ends hit; odd seeds add a shared component), rank-deficient (rank
``T // 3`` in ``P = 2T + 8`` dimensions; odd seeds add a shared component, even seeds have 0 in
the hull for most T).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtlopt._src import solvers

KINDS = ("random", "conflicting", "collinear", "scaled", "deficient")
TS = (2, 3, 5, 10, 32, 64)
CS = (0.1, 0.4, 1.0, 5.0)
RTOL = {"float32": 1e-4, "float64": 1e-6}
TOL, MAX_ITERS = 1e-6, 500  # the defaults of mtlopt.mgda and mtlopt.cagrad
SPAN = 2.0  # badly scaled: norms from 1e-2 to 1e2


# ----------------------------------------------------------------------------------------------
# Problems and float64 references (numpy / scipy)


@functools.cache
def gradients(kind: str, T: int, seed: int, span: float = SPAN) -> np.ndarray:
    """``J`` (T, P), float64, scaled so that ``trace(J J^T) = T``."""
    rng = np.random.default_rng([seed, T, sum(map(ord, kind))])
    P = 2 * T + 8
    if kind == "random":
        J = rng.normal(size=(T, P))
    elif kind == "conflicting":
        J = rng.normal(size=(T, P))
        for k in range(0, T - 1, 2):
            J[k + 1] = -rng.uniform(0.3, 3.0) * J[k] + 0.05 * rng.normal(size=P)
    elif kind == "collinear":
        s = rng.uniform(0.2, 2.0, size=T)
        if seed % 2:
            s *= rng.choice([-1.0, 1.0], size=T)
        J = np.outer(s, rng.normal(size=P)) + 1e-3 * rng.normal(size=(T, P))
    elif kind == "scaled":
        J = rng.normal(size=(T, P)) + (rng.normal(size=P) if seed % 2 else 0.0)
        J /= np.linalg.norm(J, axis=1, keepdims=True)
        e = rng.uniform(-span, span, size=T)
        e[0], e[-1] = -span, span
        J *= (10.0**e)[:, None]
    elif kind == "deficient":
        J = rng.normal(size=(T, max(1, T // 3))) @ rng.normal(size=(max(1, T // 3), P))
        if seed % 2:
            J += rng.normal(size=P)
    else:
        raise ValueError(kind)
    return J * np.sqrt(T / np.sum(J * J))


def f_mgda(J, w):
    g = J.T @ w
    return float(g @ g)


def f_cagrad(J, c, w):
    g0 = J.T @ np.full(len(J), 1.0 / len(J))
    gw = J.T @ w
    return float(gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw))


def lb_mgda(J, w):
    """F(w) minus the Frank-Wolfe gap: a lower bound on F* (F convex)."""
    grad = 2.0 * J @ (J.T @ w)
    return f_mgda(J, w) - float(grad @ w - grad.min())


def lb_cagrad(J, c, w):
    """min_t <g_t, d> <= F* for any d in the ball |d - g0| <= c |g0| (weak duality)."""
    g0 = J.T @ np.full(len(J), 1.0 / len(J))
    r = c * np.linalg.norm(g0)
    bound = max(1.0 - c, 0.0) * float(np.min(J @ g0))  # d = max(1 - c, 0) g0
    gw = J.T @ w
    s = np.linalg.norm(gw)
    if s > 0:  # d = g0 + r g_w / |g_w|: tight at the optimum
        bound = max(bound, float(np.min(J @ (g0 + (r / s) * gw))))
    return bound


def nnls_min_norm(J):
    T = len(J)
    A = np.vstack([J.T, np.ones((1, T))])
    rhs = np.zeros(len(A))
    rhs[-1] = 1.0
    u = optimize.nnls(A, rhs, maxiter=50 * T)[0]
    return u / u.sum()


def face_minimiser(J, c, w):
    """The exact minimiser of CAGrad's dual on the affine hull of w's support (or w).

    KKT on the face: ``w = x0 + t x1`` (t = 1/mu) with x0 the face's min-norm point and x1 the
    least-squares step for ``-g0`` (both by lstsq on J, not on the Gramian); then
    ``F(t) = const + l1 t + r sqrt(q0 + q11 t^2)`` is minimised in closed form.
    """
    S = np.flatnonzero(w > 0)
    n = len(S)
    if n < 2:
        return w
    JS = J[S]
    g0 = J.T @ np.full(len(J), 1.0 / len(J))
    r = c * np.linalg.norm(g0)
    N = np.vstack([np.eye(n - 1), -np.ones((1, n - 1))])  # a basis of {sum = 0}
    A = JS.T @ N
    e = np.zeros(n)
    e[-1] = 1.0
    x0 = e + N @ np.linalg.lstsq(A, -JS.T @ e, rcond=None)[0]
    x1 = N @ np.linalg.lstsq(A, -g0, rcond=None)[0]
    v0, v1 = JS.T @ x0, JS.T @ x1
    q0, q11, l1 = v0 @ v0, v1 @ v1, v1 @ g0
    den = r * r * q11 - l1 * l1
    if q11 <= 0 or den <= 0:
        return w
    ws = x0 - np.sign(l1) * np.sqrt(l1 * l1 * q0 / (q11 * den)) * x1
    if np.any(ws < 0):
        return w
    out = np.zeros(len(w))
    out[S] = ws / ws.sum()
    return out


def cagrad_path(J, c):
    """argmin over the QP path w(mu) = min-norm point of {g_t + g0/mu}: root of mu|g_w| = r."""
    g0 = J.T @ np.full(len(J), 1.0 / len(J))
    r = c * np.linalg.norm(g0)

    def w_of(log_mu):
        return nnls_min_norm(J + g0[None, :] / np.exp(log_mu))

    def h(log_mu):
        return log_mu + np.log(max(np.linalg.norm(J.T @ w_of(log_mu)), 1e-300)) - np.log(r)

    lo, hi = -5.0, 5.0
    while h(lo) > 0 and lo > -60:
        lo -= 5.0
    while h(hi) < 0 and hi < 60:
        hi += 5.0
    if h(hi) < 0:  # 0 in the hull and c large: g_w = 0 (the min-norm point) is optimal
        return nnls_min_norm(J)
    return w_of(optimize.brentq(h, lo, hi, xtol=1e-13, rtol=1e-15))


@functools.cache
def reference(method: str, kind: str, T: int, seed: int, c: float = 0.0, span: float = SPAN):
    """(ub, lb, w): the best F found, a certified lower bound on F*, and its argmin."""
    J = gradients(kind, T, seed, span)
    if method == "mgda":
        w = nnls_min_norm(J)
        return f_mgda(J, w), lb_mgda(J, w), w
    cands = [cagrad_path(J, c)]
    cands.append(face_minimiser(J, c, cands[0]))
    fs = [f_cagrad(J, c, w) for w in cands]
    i = int(np.argmin(fs))
    return fs[i], max(lb_cagrad(J, c, w) for w in cands), cands[i]


def objective(method, J, c, w):
    return f_mgda(J, w) if method == "mgda" else f_cagrad(J, c, w)


def lower_bound(method, J, c, w):
    return lb_mgda(J, w) if method == "mgda" else lb_cagrad(J, c, w)


# ----------------------------------------------------------------------------------------------
# The solver under test


@functools.partial(jax.jit, static_argnames="method")
def _solve(G, w0, mask, rho, tol, max_iters, *, method):
    # tol and max_iters are traced here (the library passes Python numbers): one compilation
    # per (method, dtype, T) serves every test.
    if method == "mgda":
        return solvers.min_norm(G, w0, mask, tol=tol, max_iters=max_iters)
    b = solvers.uniform(mask, G.dtype)
    return solvers.cagrad_dual(G, b, rho, w0, mask, tol=tol, max_iters=max_iters)


def solve(method, J, c=0.0, dtype="float32", w0=None, mask=None, tol=TOL, max_iters=MAX_ITERS):
    """Our solve on ``G = J J^T`` (computed in float64, then cast); ``rho = c |g0|`` with ``g0``
    the mean of the active rows, as :func:`mtlopt.cagrad` does."""
    T = len(J)
    mask = np.ones((T,), bool) if mask is None else np.asarray(mask)
    b = mask / max(mask.sum(), 1)
    G = jnp.asarray(J @ J.T, dtype)
    rho = jnp.asarray(c * np.linalg.norm(J.T @ b), dtype)
    w0 = jnp.asarray(b if w0 is None else w0, dtype)
    tol, max_iters = jnp.asarray(tol, dtype), jnp.asarray(max_iters, jnp.int32)
    w, info = _solve(G, w0, jnp.asarray(mask), rho, tol, max_iters, method=method)
    assert w.dtype == jnp.dtype(dtype) and info.gap.dtype == jnp.dtype(dtype)
    return np.asarray(w, np.float64), jax.tree.map(np.asarray, info)


def x64(dtype):
    """jax.enable_x64 for float64 tests, scoped to the test (nothing leaks: see conftest)."""
    return jax.enable_x64(dtype == "float64")


def check_accuracy(method, dtype, T, seeds, kinds=KINDS, span=SPAN):
    """Solves every case from the uniform weights; returns the worst F - F* and step counts."""
    rtol = RTOL[dtype]
    worst, steps, failures = -np.inf, [], []
    with x64(dtype):
        for kind in kinds:
            for seed in seeds:
                for c in CS if method == "cagrad" else (0.0,):
                    J = gradients(kind, T, seed, span)
                    ub, lb, _ = reference(method, kind, T, seed, c, span)
                    assert ub - lb <= 0.1 * rtol, f"reference: {kind} {T=} {seed=} {c=}"
                    w, info = solve(method, J, c, dtype)
                    assert np.all(w >= 0) and abs(w.sum() - 1.0) <= 10 * T * np.finfo(dtype).eps
                    assert info.num_steps <= MAX_ITERS
                    err = objective(method, J, c, w) - lb  # >= F(w) - F*
                    worst = max(worst, err)
                    steps.append(int(info.num_steps))
                    if err > rtol:
                        failures.append(f"{kind} {T=} {seed=} {c=}: F - F* <= {err:.2e} {info}")
                    if info.converged and dtype == "float64":  # gap <= tol * F's scale
                        assert err <= TOL + 1e-3 * rtol, f"{kind} {T=} {seed=} {c=}: {err=:.2e}"
    assert not failures, "\n".join(failures)
    return worst, steps


# ----------------------------------------------------------------------------------------------
# Accuracy against the references


# Every compilation (method, dtype, T) costs ~1.3 s: the default run covers all T in float32
# and three in float64 (the other tests use those shapes too); the slow sweep has the rest.
SLOW = pytest.mark.slow
DEFAULT_GRID = [("float32", T) for T in TS] + [
    ("float64", T) if T in (2, 10, 64) else pytest.param("float64", T, marks=SLOW) for T in TS
]


@pytest.mark.parametrize(("dtype", "T"), DEFAULT_GRID)
@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_accuracy(method, dtype, T):
    check_accuracy(method, dtype, T, seeds=(0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_accuracy_more_seeds(method, dtype, T):
    check_accuracy(method, dtype, T, seeds=range(2, 8))


@pytest.mark.slow
@pytest.mark.parametrize("span", [3.0, 4.0, 6.0, 8.0])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_accuracy_badly_scaled_wider(method, dtype, span):
    """Norms from 10^-span to 10^span (the default sweep has span 2): squared norms, the
    Gramian's diagonal, span 32 orders of magnitude at span 8."""
    for T in TS:
        check_accuracy(method, dtype, T, seeds=range(4), kinds=("scaled",), span=span)


def _pg_value(w, G, b, r):
    return w @ G @ b + r * jnp.sqrt(w @ G @ w)


def test_references_agree_with_jaxopt_and_slsqp():
    """No other solver beats the references: jaxopt's projected gradient and scipy's SLSQP
    (best of two starts) never go below the certified lower bounds, and the better of the two
    reaches the upper bound."""
    import jaxopt
    from jaxopt.projection import projection_simplex

    T = 10
    b = np.full(T, 1.0 / T)
    cons = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}
    pg = jaxopt.ProjectedGradient(_pg_value, projection_simplex, maxiter=4000, tol=1e-12)
    run_pg = jax.jit(lambda w0, *args: pg.run(w0, None, *args).params)  # compiled once
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        for kind in KINDS:
            J = gradients(kind, T, 0)
            G = jnp.asarray(J @ J.T)
            for method, c in [("mgda", 0.0), ("cagrad", 0.4), ("cagrad", 5.0)]:
                ub, lb, _ = reference(method, kind, T, 0, c)
                # MGDA is the same function with b = 0, r = 1: |g_w| instead of |g_w|^2.
                if method == "mgda":
                    args = (jnp.zeros(T), jnp.asarray(1.0))
                else:
                    args = (jnp.asarray(b), jnp.asarray(c * np.linalg.norm(J.T @ b)))
                w_pg = np.asarray(run_pg(jnp.asarray(b), G, *args))

                def f(w, method=method, J=J, c=c):
                    return objective(method, J, c, np.clip(w, 0, None) / np.clip(w, 0, None).sum())

                starts = (b, np.eye(T)[np.argmin(np.diag(J @ J.T))])
                runs = [
                    optimize.minimize(
                        f,
                        w0,
                        method="SLSQP",
                        bounds=[(0.0, 1.0)] * T,
                        constraints=cons,
                        options={"ftol": 1e-15, "maxiter": 1000},
                    ).x
                    for w0 in starts
                ]
                w_sq = min(runs, key=f)
                values = [f(w_pg), f(w_sq)]
                assert min(values) >= lb - 1e-12, (kind, method, c, values)  # lb is sound
                # ... and one of them reaches ub (jaxopt stalls at the kink g_w = 0, where
                # F* = 0 for c >= 1 and deficient Gramians; SLSQP is not always that tight).
                assert min(values) - ub <= 1e-6, (kind, method, c, values, ub)


# ----------------------------------------------------------------------------------------------
# Warm starts, the iteration cap, masks, degenerate inputs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_warm_start_from_the_solution_stops_at_once(method, dtype):
    """At most 1 step (0 where the gap at the solution is below tol), except in float32 where
    the gap cannot certify the solution: CAGrad near Pareto-stationary points (conflicting,
    deficient; its gradient carries ``rho / |g_w|`` times the rounding of ``G w``). There the
    solver stops once F has not fallen beyond rounding for ``patience`` (8) steps (within ~20
    steps; steps that only lower the gap count as no progress), staying within the tolerance."""
    with x64(dtype):
        for kind in KINDS:
            for T in (2, 10, 64):
                for c in CS if method == "cagrad" else (0.0,):
                    J = gradients(kind, T, 0)
                    _, lb, w_star = reference(method, kind, T, 0, c)
                    w, info = solve(method, J, c, dtype, w0=w_star)
                    assert objective(method, J, c, w) - lb <= RTOL[dtype]
                    noisy = dtype == "float32" and kind in ("conflicting", "deficient")
                    assert info.num_steps <= (32 if noisy else 1), (kind, T, c, info)


@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_warm_start_after_a_small_change_is_cheap(method):
    """Training: the Gramian moves a little between steps; the last solution starts the next."""
    T, steps_cold, steps_warm = 10, [], []
    for seed in range(8):
        J = gradients("random", T, seed)
        J2 = J + 1e-2 * np.random.default_rng(seed).normal(size=J.shape)
        J2 *= np.sqrt(T / np.sum(J2 * J2))
        for c in CS if method == "cagrad" else (0.0,):
            w_prev, info = solve(method, J, c)
            steps_cold.append(int(info.num_steps))
            w, info = solve(method, J2, c, w0=w_prev)
            steps_warm.append(int(info.num_steps))
            assert objective(method, J2, c, w) - lower_bound(method, J2, c, w) <= 2e-6
    assert np.mean(steps_warm) <= 2 and max(steps_warm) <= 5, steps_warm
    assert np.mean(steps_cold) <= 5, steps_cold


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_iteration_cap_is_respected_and_reported(method, dtype):
    with x64(dtype):
        J = gradients("scaled", 64, 0)
        for max_iters in (1, 2, 3):
            _, info = solve(method, J, 5.0, dtype, tol=1e-30, max_iters=max_iters)
            assert info.num_steps == max_iters
            assert not info.converged and info.gap > 1e-30
        _, info = solve(method, J, 5.0, dtype)
        assert info.converged and info.gap <= TOL and info.num_steps < MAX_ITERS


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_masked_tasks_get_zero_and_match_the_sub_gramian(method, dtype):
    rng = np.random.default_rng(0)
    T, active = 10, 6
    with x64(dtype):
        for kind in KINDS:
            J = gradients(kind, T, 1)
            mask = rng.permutation(np.arange(T) < active)
            sub = J[mask] * np.sqrt(active / np.sum(J[mask] ** 2))  # normalised like the callers
            full = np.zeros_like(J)
            full[mask] = sub
            for c in CS if method == "cagrad" else (0.0,):
                w, _ = solve(method, full, c, dtype, mask=mask)
                w_sub, _ = solve(method, sub, c, dtype)
                assert np.all(w[~mask] == 0.0)
                f, f_sub = objective(method, sub, c, w[mask]), objective(method, sub, c, w_sub)
                assert abs(f - f_sub) <= RTOL[dtype], (kind, c, f, f_sub)
                if kind == "random":  # a unique minimiser
                    np.testing.assert_allclose(w[mask], w_sub, atol=10 * RTOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_degenerate_gramians_give_finite_weights(method, dtype):
    with x64(dtype):
        for T in (1, 2, 10) if dtype == "float32" else (2, 10):
            for J in (np.zeros((T, 3)), np.ones((T, 3))):  # all zero; all equal
                w, info = solve(method, J, 0.4, dtype)
                assert np.all(np.isfinite(w)) and np.all(w >= 0)
                assert abs(w.sum() - 1.0) < 1e-6 and info.converged
        w, info = solve(method, np.ones((10, 3)), 0.4, dtype, mask=np.zeros(10, bool))
        assert np.all(w == 0.0) and info.num_steps == 0


@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_two_tasks_closed_form_masks_and_edges(method):
    """T = 2 takes a closed form (no loop): one active task gets weight 1, none gives 0, equal
    gradients keep the start, exactly opposite ones meet at 0 (MGDA's 1/2, 1/2), and a task
    whose gradient contains the other's direction at a larger norm yields (MGDA) to it."""
    J = gradients("random", 2, 3)
    for mask, expected in (([True, False], [1.0, 0.0]), ([False, True], [0.0, 1.0])):
        w, info = solve(method, J, 0.4, mask=mask)
        np.testing.assert_array_equal(w, expected)
        assert info.num_steps == 0 and info.converged
    w, info = solve(method, J, 0.4, mask=[False, False])
    np.testing.assert_array_equal(w, 0.0)
    w, info = solve(method, np.ones((2, 3)), 0.4, w0=np.array([0.3, 0.7]))
    np.testing.assert_allclose(w, [0.3, 0.7], atol=1e-6)
    assert info.converged
    if method == "mgda":
        w, _ = solve(method, np.array([[1.0, 2.0], [-1.0, -2.0]]))
        np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-6)
        w, _ = solve(method, np.array([[1.0, 0.0], [3.0, 0.0]]))
        np.testing.assert_allclose(w, [1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_nonfinite_gramian_stops(method):
    """A NaN Gramian: the loop ends at once, unconverged (the callers skip such steps: the
    update is NaN whatever the weights)."""
    J = gradients("random", 10, 0).copy()
    J[2, 0] = np.nan
    _, info = solve(method, J, 0.4)
    assert info.num_steps == 0 and not info.converged and np.isnan(info.gap)


@pytest.mark.slow
def test_vmap_over_many_problems_does_not_hang():
    """jaxlib 0.10's batched CPU LU deadlocks when two run at once on a small thread pool;
    the solver batches its KKT systems into one call. In a subprocess, with a timeout."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from mtlopt._src import solvers
        T, B = 64, 16
        J = np.random.default_rng(0).normal(size=(B, T, 2 * T))
        G = jnp.asarray(J @ J.transpose(0, 2, 1) / (2 * T), jnp.float32)
        w0 = jnp.full((B, T), 1.0 / T)
        mask = jnp.ones((T,), bool)
        f = lambda G, w0: solvers.cagrad_dual(G, w0, 0.1, w0, mask, tol=1e-6, max_iters=50)
        g = lambda G, w0: solvers.min_norm(G, w0, mask, tol=1e-6, max_iters=50)
        for h in (f, g):
            w, info = jax.jit(jax.vmap(h))(G, w0)
            print(bool(jnp.all(jnp.isfinite(w))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0 and out.stdout.split() == ["True", "True"], out.stderr[-2000:]
