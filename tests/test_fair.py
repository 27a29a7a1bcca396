"""FairGrad (``mtlopt.fairgrad``): the update against an independent float64 solve of
``G w = w^(-1/alpha)``, the residual, the limit alpha -> 1 (Nash-MTL's system), the problems
without a positive solution, the warm start and the peers.

The reference (numpy/scipy, float64, never the library's solver) minimises the strictly convex
``f(w) = 0.5 w^T G w - sum_t w_t^(1-p) / (1-p)`` (``p = 1/alpha``; ``log`` at ``p = 1``) over
the nonzero rows by ``scipy.optimize.minimize`` (trust-exact) from the orthogonal-task solution
``G_tt^(-1/(1+p))``, polishes the root of ``w^p (G w) = 1`` in log coordinates, and checks the
residual ``max_t |(G w)_t w_t^p - 1|`` at most 1e-9 plus its rounding.

The accuracy standard: ``|d - d*| <= RTOL |d*| + floor``, ``floor = FLOOR * eps * |b*| *
sum_t b*_t`` with ``b*_t = w*_t |g_t|`` (the rounding of the cosines carried to the update, as
in tests/test_nash_mtl.py: it binds only on nearly singular problems), plus the regularisation's
own move ``sigma |b*|^2`` where the library reports ``sigma > 0``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import mtlopt

KINDS = ("random", "conflicting", "collinear", "scaled", "zero")
ALPHAS = (0.5, 1.0, 2.0, 5.0)
RTOL = {"float32": 1e-3, "float64": 1e-6}
TOL = {"float32": 1e-5, "float64": 1e-10}
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}
FLOOR = 8.0
P = 24  # columns: more than the tasks of the fast tests


def problem(kind: str, T: int, seed: int) -> np.ndarray:
    n = max(P, 2 * T)  # more columns than tasks (no rank deficiency in the accuracy problems)
    rng = np.random.default_rng([seed, T, sum(map(ord, kind))])
    J = rng.normal(size=(T, n))
    if kind == "conflicting":  # pairs nearly opposed
        for k in range(0, T - 1, 2):
            J[k + 1] = -rng.uniform(0.3, 3.0) * J[k] + 0.05 * rng.normal(size=n)
    elif kind == "collinear":  # one direction plus 1e-3 noise, all signs positive
        J = np.outer(rng.uniform(0.2, 2.0, size=T), rng.normal(size=n))
        J += 1e-3 * rng.normal(size=(T, n))
    elif kind == "scaled":  # norms from 1e-3 to 1e3 (1000x either way)
        J /= np.linalg.norm(J, axis=1, keepdims=True)
        J *= 10.0 ** rng.uniform(-3.0, 3.0, size=(T, 1))
    elif kind == "zero":
        J[rng.integers(T)] = 0.0
    return J


def reference(J: np.ndarray, alpha: float, ridge: float = 0.0) -> np.ndarray:
    """``w*``: ``(G w)_t w_t^(1/alpha) = 1`` over the nonzero rows (``G`` plus ``ridge
    diag(G)``), 0 on zero rows; float64."""
    T = len(J)
    p = 1.0 / alpha
    norms = np.linalg.norm(J, axis=1)
    keep = norms > 0
    w = np.zeros(T)
    if not keep.any():
        return w
    Jk = J[keep]
    G = Jk @ Jk.T
    G = G + ridge * np.diag(np.diag(G))

    def h(x):
        return np.log(x) if p == 1.0 else x ** (1.0 - p) / (1.0 - p)

    def f(x):
        return 0.5 * x @ G @ x - np.sum(h(x)) if np.all(x > 0) else np.inf

    # Damped Newton with backtracking (Armijo), staying in w > 0, from the orthogonal solution.
    x = np.diag(G) ** (-1.0 / (1.0 + p))
    for _ in range(500):
        g = G @ x - x ** (-p)
        dx = -np.linalg.solve(G + np.diag(p * x ** (-p - 1.0)), g)
        if -(g @ dx) < 1e-28:
            break
        t = 1.0
        while np.any(x + t * dx <= 0) or f(x + t * dx) > f(x) + 0.25 * t * (g @ dx):
            t *= 0.5
            if t < 1e-30:
                break
        x = x + t * dx
    # Polish: Newton on y = log w for r(y) = w^p (G w) - 1.
    for _ in range(20):
        r = x**p * (G @ x) - 1.0
        Jac = np.diag(p * r + p) + (x**p)[:, None] * G * x[None, :]
        x = x * np.exp(np.clip(-np.linalg.solve(Jac, r), -1.0, 1.0))
    res = np.max(np.abs(x**p * (G @ x) - 1.0))
    allow = 64 * EPS["float64"] * np.max(x**p * (np.abs(G) @ x))
    assert res <= 1e-9 + allow, f"reference residual {res:.2e}"
    w[keep] = x
    return w


@functools.cache
def _program(T: int, dtype: str):
    """One update per (problem, alpha), vmapped; alpha traced (one compilation per T, dtype);
    two steps, the second from the first's state (the warm start)."""

    def one(J, alpha):
        tx = mtlopt.fairgrad(alpha=alpha, num_tasks=T, tol=TOL[dtype])
        params = {"w": jnp.zeros(J.shape[1], J.dtype)}
        s0 = tx.init(params)
        u, s1 = tx.update({"w": J}, s0)
        u2, s2 = tx.update({"w": J}, s1)
        return u["w"], s1, u2["w"], s2

    return jax.jit(jax.vmap(one))


BATCH = 40  # problems per call, the last chunk padded: one compilation per (T, dtype)


def run(Js, alphas, dtype):
    T, n = Js[0].shape[0], len(Js)
    Js, alphas = np.asarray(Js, dtype), np.asarray(alphas, dtype)
    outs = []
    with jax.enable_x64(dtype == "float64"):
        for lo in range(0, n, BATCH):
            k = min(BATCH, n - lo)
            idx = np.concatenate([np.arange(lo, lo + k), np.full(BATCH - k, lo)])
            out = _program(T, dtype)(Js[idx], alphas[idx])
            outs.append(jax.tree.map(lambda x, k=k: np.asarray(x)[:k], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _errors(T, dtype, seeds):
    cases = [(k, a, s) for k in KINDS for a in ALPHAS for s in seeds]
    Js = [problem(k, T, s) for k, _, s in cases]
    u, s1, u2, s2 = run(Js, [a for _, a, _ in cases], dtype)
    eps = EPS[dtype]
    rows = []
    for i, (kind, alpha, seed) in enumerate(cases):
        J = Js[i]
        sigma = float(s1.solver.ridge[i])
        w = reference(J, alpha, sigma)
        d = w @ J
        b = w * np.linalg.norm(J, axis=1)
        floor = FLOOR * eps * np.linalg.norm(b) * np.sum(b) + sigma * np.sum(b**2)
        for step, upd in ((1, u[i]), (2, u2[i])):
            err = np.linalg.norm(upd - d)
            ok = err <= RTOL[dtype] * np.linalg.norm(d) + floor
            rows.append((kind, alpha, seed, step, err / max(np.linalg.norm(d), 1e-300), ok))
    return rows, s1, s2


# (T, dtype) pairs of the default suite, each a compilation of the vmapped Newton solve (2-5 s);
# the other pairs, and T = 2, 5, 64, run with -m slow.
FAST = [(1, "float32"), (3, "float64"), (10, "float32")]
SLOW = [(1, "float64"), (3, "float32"), (10, "float64")]


@pytest.mark.parametrize("T,dtype", FAST)
def test_update_against_float64_solve(T, dtype):
    rows, s1, s2 = _errors(T, dtype, range(2))
    bad = [r for r in rows if not r[-1]]
    assert not bad, bad
    assert np.all(s1.solver.converged) and np.all(s2.solver.converged)
    # The warm start: the second step on the same problem takes at most one Newton step.
    assert np.max(s2.solver.num_steps) <= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "T,dtype", SLOW + [(T, d) for T in (2, 5, 64) for d in ("float32", "float64")]
)
def test_update_against_float64_solve_slow(T, dtype):
    rows, _, _ = _errors(T, dtype, range(4))
    bad = [r for r in rows if not r[-1]]
    assert not bad, bad


def test_residual():
    """The issue's residual ``max |(G w) * w^(1/alpha) - 1|`` on the float32 Gramian of the
    problem, in float64, for the weights the library returns (non-singular problems)."""
    T = 10
    cases = [(k, a, s) for k in ("random", "scaled") for a in ALPHAS for s in range(2)]
    Js = [problem(k, T, s) for k, _, s in cases]
    _, s1, _, _ = run(Js, [a for _, a, _ in cases], "float32")
    worst = 0.0
    for i, (_, alpha, _) in enumerate(cases):
        J = Js[i].astype(np.float32).astype(np.float64)
        w = s1.weights[i].astype(np.float64)
        res = np.max(np.abs((J @ J.T @ w) * w ** (1.0 / alpha) - 1.0))
        worst = max(worst, res)
        assert s1.solver.residual[i] <= 1e-3
    assert worst <= 1e-3, worst


def test_alpha_one_is_nash_mtl():
    """alpha = 1 gives Nash-MTL's bargaining solution (``max_norm=0``); alpha -> 1 tends to it
    (the weights move by O(|alpha - 1|))."""
    T = 3
    Js = [problem(k, T, 0) for k in ("random", "scaled", "conflicting")]
    nash = mtlopt.nash_mtl(max_norm=0.0, num_tasks=T)
    for J in Js:
        g = {"w": jnp.asarray(J, jnp.float32)}
        _, sn = jax.jit(nash.update)(g, nash.init({"w": jnp.zeros(P)}))
        wn = np.asarray(sn.weights, np.float64)
        _, s1, _, _ = run([J] * 3, [1.0, 1.0 - 1e-3, 1.0 + 1e-3], "float32")
        np.testing.assert_allclose(s1.weights[0], wn, rtol=1e-3)
        for i in (1, 2):
            rel = np.max(np.abs(s1.weights[i] / wn - 1.0))
            assert 1e-6 < rel < 1e-2, rel


def test_no_positive_solution():
    """A zero task: weight 0, the others solved without it. Two opposed tasks: they cancel
    (update 0 up to the rounding of their large weights); ``g, -g, h`` with ``h`` orthogonal to
    ``g``: the limit ``|h|^(-2/(1+p)) h``."""
    e1, e2 = np.eye(P)[0], np.eye(P)[1]
    h = 0.5 * e2
    cases = [
        np.stack([e1 + e2, np.zeros(P), 2.0 * e2]),
        np.stack([3.0 * e1, -3.0 * e1, np.zeros(P)]),
        np.stack([3.0 * e1, -3.0 * e1, h]),
    ]
    for alpha in (0.5, 1.0, 2.0):
        p = 1.0 / alpha
        u, s1, _, _ = run(cases, [alpha] * 3, "float32")
        assert np.all(np.isfinite(s1.weights))
        assert s1.weights[0][1] == 0.0
        ref = reference(cases[0], alpha)
        np.testing.assert_allclose(u[0], ref @ cases[0], rtol=1e-4, atol=1e-6)
        assert np.linalg.norm(u[1]) <= 1e-3 * 3.0
        limit = 0.5 ** (-2.0 / (1.0 + p)) * h
        assert np.linalg.norm(u[2] - limit) <= 1e-2 * np.linalg.norm(limit)
        assert np.all(s1.solver.ridge[1:] > 0) and s1.solver.ridge[0] == 0


def test_scale_and_alpha_zero():
    """Every gradient times c: the update times ``c^((1-alpha)/(1+alpha))``; alpha = 0: the
    mean's weights 1/T; no num_tasks: the same update, no solver state."""
    J = problem("random", 3, 0)
    for alpha in (0.5, 2.0):
        u, *_ = run([J, 100.0 * J], [alpha] * 2, "float32")
        np.testing.assert_allclose(u[1], 100.0 ** ((1 - alpha) / (1 + alpha)) * u[0], rtol=1e-4)
    tx = mtlopt.fairgrad(alpha=0.0, num_tasks=3)
    _, s = jax.jit(tx.update)({"w": jnp.asarray(J, jnp.float32)}, tx.init({"w": jnp.zeros(P)}))
    np.testing.assert_allclose(s.weights, np.full(3, 1.0 / 3.0), rtol=1e-6)
    tx = mtlopt.fairgrad(alpha=2.0)
    u0, s = jax.jit(tx.update)({"w": jnp.asarray(J, jnp.float32)}, tx.init({"w": jnp.zeros(P)}))
    assert s.unit_weights is None and s.solver is None
    u1, *_ = run([J], [2.0], "float32")
    np.testing.assert_allclose(u0["w"], u1[0], rtol=1e-4, atol=1e-6)


def test_bad_arguments():
    for kw in ({"alpha": -1.0}, {"tol": 0.0}, {"max_iters": 0}, {"ridge": -1.0}):
        with pytest.raises(ValueError, match="fairgrad"):
            mtlopt.fairgrad(**kw)


def test_against_torchjd():
    """On well-conditioned problems TorchJD 0.18's FairGrad (scipy least_squares from 1/T)
    reaches the same weights (it stops short on scaled or conflicting ones: not compared)."""
    torch = pytest.importorskip("torch")
    agg = pytest.importorskip("torchjd.aggregation")
    for seed in range(2):
        J = problem("random", 3, seed)
        for alpha in (0.5, 1.0, 2.0):
            peer = agg.FairGradWeighting(alpha=alpha)(torch.tensor(J @ J.T)).numpy()
            ref = reference(J, alpha)
            np.testing.assert_allclose(peer, ref, rtol=1e-4)
            _, s1, _, _ = run([J], [alpha], "float32")
            np.testing.assert_allclose(s1.weights[0], ref, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# PCD


def pcd_reference(J: np.ndarray, tau: float, v_hat: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """The update of PCD in float64 (scipy): normalise by ``1 / sqrt(v_hat + eps)``, solve the
    primal QP by SLSQP where ``linprog`` finds the constraints feasible (else ``g_0``), rescale
    to ``|g_0|`` (0 where ``g_0 = 0`` or ``d~ = 0``)."""
    g0 = J[0]
    if not np.any(g0):
        return np.zeros_like(g0)
    s = 1.0 / np.sqrt(v_hat + eps)
    Jn = J * s[:, None]
    Jn = Jn / np.max(np.linalg.norm(Jn, axis=1))  # a common factor: the same update
    A, c = Jn[1:], tau * np.sum(Jn[1:] ** 2, axis=1)
    if len(A):
        lp = scipy.optimize.linprog(
            np.zeros(J.shape[1]), A_ub=-A, b_ub=-c, bounds=(None, None), method="highs"
        )
        if lp.status != 0:
            return g0

        # The primal in the span of the gradients (d = Q x plus g~_0's component outside it) by
        # SLSQP from linprog's point, then polished: the equality-constrained problem on the
        # constraints found tight, solved exactly, kept if its multipliers are >= 0.
        U, S, _ = np.linalg.svd(Jn.T, full_matrices=False)
        Q = U[:, 1e-12 * S[0] < S]
        AQ, x0 = A @ Q, Q.T @ Jn[0]
        out = scipy.optimize.minimize(
            lambda x: 0.5 * np.sum((x - x0) ** 2),
            Q.T @ lp.x,
            jac=lambda x: x - x0,
            constraints=[{"type": "ineq", "fun": lambda x: AQ @ x - c, "jac": lambda x: AQ}],
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 5000},
        )
        size = np.max(np.sum(Jn**2, axis=1))
        mu = np.zeros(len(A))
        tight = AQ @ out.x - c <= 1e-6 * size
        if np.any(tight):
            Aa = A[tight]
            nu = np.linalg.lstsq(Aa @ Aa.T, c[tight] - Aa @ Jn[0], rcond=1e-13)[0]
            cand = Jn[0] + Aa.T @ nu
            if np.all(nu >= -1e-12 * np.max(np.abs(nu))) and np.min(A @ cand - c) >= -1e-10 * size:
                mu[tight] = nu
            else:
                mu = None
        dt = Jn[0] + A.T @ mu if mu is not None else Jn[0] - Q @ x0 + Q @ out.x
        assert np.min(A @ dt - c) >= -1e-8 * np.max(np.sum(Jn**2, axis=1))
    else:
        dt = Jn[0]
    if np.linalg.norm(dt) <= 1e-12 * np.linalg.norm(Jn[0]):
        return np.zeros_like(g0)
    return dt * np.linalg.norm(g0) / np.linalg.norm(dt)


PCD_KINDS = ("random", "conflicting", "scaled", "rank", "duplicate", "zero", "infeasible")


def pcd_problem(kind: str, T: int, seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([seed, T, sum(map(ord, kind)), 7])
    J = rng.normal(size=(T, n))
    if kind == "conflicting":  # secondaries against the primary
        J[1:] -= 1.5 * J[0]
    elif kind == "scaled":
        J *= 10.0 ** rng.uniform(-3.0, 3.0, size=(T, 1))
    elif kind == "rank":  # more tasks than the rank: r = max(2, T // 3)
        J = rng.normal(size=(T, max(2, T // 3))) @ rng.normal(size=(max(2, T // 3), n))
    elif kind == "duplicate" and T >= 3:  # a secondary repeated, another opposed to the primary
        J[2] = J[1]
        J[-1] = -J[0]
    elif kind == "zero" and T >= 2:
        J[rng.integers(1, T)] = 0.0
    elif kind == "infeasible" and T >= 3:  # two exactly opposed secondaries
        J[2] = -2.0 * J[1]
    return J


@functools.cache
def _pcd_program(T: int, dtype: str, tau: float):
    def one(J):
        tx = mtlopt.pcd(tau=tau, num_tasks=T)
        u, s = tx.update({"w": J}, tx.init({"w": jnp.zeros(J.shape[1], J.dtype)}))
        return u["w"], s

    return jax.jit(jax.vmap(one))


def _pcd_errors(T, dtype, seeds, tau=0.2):
    n = max(P, 2 * T)
    cases = [(k, s) for k in PCD_KINDS for s in seeds]
    Js = np.stack([pcd_problem(k, T, s, n) for k, s in cases])
    with jax.enable_x64(dtype == "float64"):
        u, st = _pcd_program(T, dtype, tau)(Js.astype(dtype))
        u, st = np.asarray(u, np.float64), jax.tree.map(np.asarray, st)
    eps = EPS[dtype]
    bad, worst = [], {}
    for i, (kind, seed) in enumerate(cases):
        # The exact problem (float64): the library sees its rounding to the dtype.
        J = Js[i]
        d = pcd_reference(J, tau, np.sum(J**2, axis=1))  # one step: v_hat = |g|^2
        err = np.linalg.norm(u[i] - d)
        floor = 64 * np.sqrt(eps) * np.linalg.norm(J[0])
        worst[kind] = max(worst.get(kind, 0.0), err / max(np.linalg.norm(d), 1e-300))
        if not err <= RTOL[dtype] * np.linalg.norm(d) + floor:
            bad.append((kind, seed, err, np.linalg.norm(d)))
    return bad, worst, st


@pytest.mark.parametrize("T,dtype", FAST)
def test_pcd_against_scipy(T, dtype):
    bad, _, _ = _pcd_errors(T, dtype, range(2))
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize(
    "T,dtype", SLOW + [(T, d) for T in (2, 5, 64) for d in ("float32", "float64")]
)
def test_pcd_against_scipy_slow(T, dtype):
    bad, _, _ = _pcd_errors(T, dtype, range(3))
    assert not bad, bad


def _pcd_sequence(Js, tau, beta, eps, mask=None):
    """A float64 transcription of PCD over steps (the moving average, bias-corrected)."""
    T = Js[0].shape[0]
    ema, n, out = np.zeros(T), np.zeros(T), []
    for k, J in enumerate(Js):
        m = np.ones(T, bool) if mask is None else mask[k]
        ema = np.where(m, beta * ema + (1 - beta) * np.sum(J**2, axis=1), ema)
        n = n + m
        v_hat = ema / np.where(n > 0, 1 - beta**n, 1.0)
        keep = np.flatnonzero(m)
        d = pcd_reference(J[keep], tau, v_hat[keep], eps) if m[0] else np.zeros(J.shape[1])
        out.append(d)
    return out


def test_pcd_moving_average_sequence():
    """Three steps of gradients whose norms change by 100x: the update follows the float64
    transcription with the bias-corrected moving average (and differs from the one with the
    current norms); a masked task's average and count are left as they were."""
    rng = np.random.default_rng(3)
    T, beta, tau = 3, 0.5, 0.3
    Js = [rng.normal(size=(T, P)) * np.array([[1.0], [100.0**k], [0.1]]) for k in range(3)]
    mask = np.array([[True, True, True], [True, False, True], [True, True, True]])
    for m in (None, mask):
        ref = _pcd_sequence(Js, tau, beta, 1e-8, m)
        tx = mtlopt.pcd(tau=tau, beta=beta, num_tasks=T)
        st = tx.init({"w": jnp.zeros(P)})
        up = jax.jit(tx.update)
        for k, J in enumerate(Js):
            extra = {} if m is None else {"task_mask": jnp.asarray(m[k])}
            u, st = up({"w": jnp.asarray(J, jnp.float32)}, st, **extra)
            np.testing.assert_allclose(u["w"], ref[k], rtol=1e-4, atol=1e-5 * np.linalg.norm(J[0]))
        assert list(st.ema_steps) == ([3, 3, 3] if m is None else [3, 2, 3])
    # Without the moving average (beta = 0: the current norms) the last step differs.
    now = _pcd_sequence(Js, tau, 0.0, 1e-8)[-1]
    ref = _pcd_sequence(Js, tau, beta, 1e-8)[-1]
    assert np.linalg.norm(now - ref) > 0.05 * np.linalg.norm(ref)


def test_pcd_special_cases():
    """A zero primary: zero update; ``g, -g``: ``-g``; two exactly opposed secondaries
    (infeasible): ``g_0``, reported; huge gradients: the update scales with them; tiny ones
    (1e-30, where eps dominates the normalisation): finite, as the float64 transcription."""
    e = np.eye(P)
    cases = [
        np.stack([np.zeros(P), e[0], e[1]]),
        np.stack([e[0] + e[1], -(e[0] + e[1]), np.zeros(P)]),
        np.stack([e[0], e[1], -3.0 * e[1]]),
    ]
    u, st = _pcd_program(3, "float32", 0.2)(np.stack(cases).astype(np.float32))
    u = np.asarray(u)
    assert np.all(u[0] == 0.0)
    np.testing.assert_allclose(u[1], -(e[0] + e[1]), atol=1e-6)
    np.testing.assert_allclose(u[2], e[0], atol=1e-6)
    assert list(np.asarray(st.solver.feasible)) == [True, True, False]
    J = pcd_problem("random", 3, 0, P)
    u, _ = _pcd_program(3, "float32", 0.2)(np.stack([J, 1e15 * J, 1e-30 * J]).astype(np.float32))
    u = np.asarray(u, np.float64)
    assert np.all(np.isfinite(u))
    np.testing.assert_allclose(u[1], 1e15 * u[0], rtol=1e-4)
    # 1e-30: eps dominates the normalisation (equal scales), the update still has norm |g_0|.
    Jt = 1e-30 * J.astype(np.float32).astype(np.float64)
    ref = pcd_reference(Jt, 0.2, np.sum(Jt**2, axis=1))
    np.testing.assert_allclose(u[2], ref, rtol=1e-4, atol=1e-5 * np.linalg.norm(ref))


def test_pcd_tau_vector_and_bad_arguments():
    J = pcd_problem("conflicting", 3, 0, P).astype(np.float32)
    tx = mtlopt.pcd(tau=[0.2, 0.2], num_tasks=3)
    u, _ = jax.jit(tx.update)({"w": jnp.asarray(J)}, tx.init({"w": jnp.zeros(P)}))
    np.testing.assert_allclose(u["w"], _pcd_program(3, "float32", 0.2)(J[None])[0][0], rtol=1e-5)
    for kw in (
        {"tau": 1.5},
        {"tau": [0.1]},
        {"tau": [0.1, -0.1]},
        {"beta": 1.0},
        {"eps": -1.0},
        {"num_tasks": None},
    ):
        with pytest.raises(ValueError, match="pcd"):
            mtlopt.pcd(**{"num_tasks": 3, **kw})


def test_pcd_against_torchjd():
    """TorchJD 0.18's PCD over a sequence of scaled steps (its moving average included)."""
    torch = pytest.importorskip("torch")
    agg = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(5)
    T = 3
    tx = mtlopt.pcd(tau=0.3, beta=0.9, num_tasks=T)
    st = tx.init({"w": jnp.zeros(P)})
    up = jax.jit(tx.update)
    peer = agg.PCD(tau=0.3, beta=0.9)
    for _ in range(4):
        J = rng.normal(size=(T, P)) * 10.0 ** rng.uniform(-2, 2, size=(T, 1))
        u, st = up({"w": jnp.asarray(J, jnp.float32)}, st)
        d = peer(torch.tensor(J)).numpy()
        np.testing.assert_allclose(u["w"], d, rtol=1e-4, atol=1e-5 * np.linalg.norm(d))
