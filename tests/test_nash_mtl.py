"""Nash-MTL (``mtlopt.nash_mtl``): the update against an independent float64 solve of the
bargaining system ``G a = 1/a``, its regularised limits, the clip, the reuse between refreshes
and the warm start.

The reference (scipy, float64, never the library's solver) minimises the strictly convex
``f(b) = 0.5 b^T C b - sum_t log b_t`` on the cosine matrix ``C`` of J (``a_t = b_t / |g_t|``;
zero rows take no part and get weight 0) by ``scipy.optimize.minimize`` (trust-exact), polishes
the root of ``b (C b) = 1`` with ``scipy.optimize.root``, and checks the solution on the raw
system: ``max_t |a_t (G a)_t - 1|`` at most 1e-10 plus its own rounding (``G = J J^T`` in
float64).

The accuracy standard: ``|d - d*| <= RTOL |d*| + floor``. The floor is the rounding of the
Gramian carried to the update: with every cosine rounded by ``eps`` (a perturbation E,
``|E_st| <= eps``), the solution moves by ``db = -H^{-1} E b`` (``H = C + diag(1/b^2) >=
diag(1/b^2)``), so ``|dd|^2 = db^T C db <= (E b)^T H^{-1} (E b) <= sum_t b_t^2 (E b)_t^2 <=
eps^2 |b|^2 (sum_t b_t)^2``: ``floor = FLOOR * eps * |b*| * sum_t b*_t`` (FLOOR = 8), plus
the regularisation's own move ``sigma |b*|^2`` where the library reports ``sigma > 0`` (the
same bound with ``E = sigma I``). It binds only where the problem is nearly singular (nearly
collinear tasks of mixed signs: ``b*`` in the thousands), where float32 cannot resolve ``d*``.
Measured, ``|d - d*| / |d*|`` over 8 seeds, T = 1 to 64: float32 below 3e-6 on random, scaled
(1e-3 to 1e3) and zero-task problems, 1.1e-3 on conflicting ones (nearly opposed pairs: the
float32 cosines' rounding, amplified; inside the floor), up to 0.9 on collinear ones of mixed
signs (floor ~10: unresolvable in float32); float64 (``tol=1e-10``) below 3e-11, 3e-9 collinear.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import mtlopt

KINDS = ("random", "conflicting", "collinear", "scaled3", "scaled6", "zero")
SEEDS = range(3)
RTOL = {"float32": 1e-3, "float64": 1e-6}
TOL = {"float32": 1e-5, "float64": 1e-10}
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}
FLOOR = 8.0


# ----------------------------------------------------------------------------------------------
# Problems and the float64 reference


def columns(T: int) -> tuple[int, int]:
    """Two leaves; more columns than tasks (no rank deficiency in the accuracy problems)."""
    return (7, 9) if T <= 10 else (70, 90)


def problem(kind: str, T: int, seed: int) -> np.ndarray:
    """``(T, P)`` task gradients, float64."""
    rng = np.random.default_rng([seed, T, sum(map(ord, kind))])
    n = sum(columns(T))
    if kind == "random":
        J = rng.normal(size=(T, n))
    elif kind == "conflicting":  # pairs nearly opposed (cosines near -1)
        J = rng.normal(size=(T, n))
        for k in range(0, T - 1, 2):
            J[k + 1] = -rng.uniform(0.3, 3.0) * J[k] + 0.05 * rng.normal(size=n)
    elif kind == "collinear":  # one direction plus 1e-3 noise, signs mixed on odd seeds
        s = rng.uniform(0.2, 2.0, size=T) * (rng.choice([-1.0, 1.0], size=T) if seed % 2 else 1.0)
        J = np.outer(s, rng.normal(size=n)) + 1e-3 * rng.normal(size=(T, n))
    elif kind.startswith("scaled"):  # norms spread over 10**span (3: 1000x; 6: 1e-3..1e3)
        span = float(kind[len("scaled") :])
        J = rng.normal(size=(T, n)) + (rng.normal(size=n) if seed % 2 else 0.0)
        J /= np.linalg.norm(J, axis=1, keepdims=True)
        e = rng.uniform(0.0, span, size=T)
        e[rng.permutation(T)[: min(T, 2)]] = [0.0, span][: min(T, 2)]
        J *= (10.0 ** (e - span / 2))[:, None]
    elif kind == "zero":  # one task's gradient is exactly zero
        J = rng.normal(size=(T, n))
        if seed % 2 and T > 2:
            J[1] = -0.5 * J[0] + 0.1 * rng.normal(size=n)
        J[rng.integers(T)] = 0.0
    else:
        raise ValueError(kind)
    return J


def reference(J: np.ndarray, ridge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(a*, b*)``: ``a_t (G a)_t + ridge |g_t|^2 a_t^2 = 1`` over the nonzero rows (weight 0
    on zero rows), ``b* = a* |g|``; float64, scipy."""
    T = len(J)
    norms = np.linalg.norm(J, axis=1)
    keep = norms > 0
    a, b_full = np.zeros(T), np.zeros(T)
    m = int(keep.sum())
    if m == 0:
        return a, b_full
    U = J[keep] / norms[keep, None]
    C = U @ U.T + ridge * np.eye(m)

    def f(b):
        return 0.5 * b @ C @ b - np.sum(np.log(b)) if np.all(b > 0) else np.inf

    out = scipy.optimize.minimize(
        f,
        np.full(m, 1.0 / np.sqrt(m)),
        jac=lambda b: C @ b - 1.0 / b,
        hess=lambda b: C + np.diag(1.0 / b**2),
        method="trust-exact",
        options={"gtol": 1e-13, "maxiter": 5000},
    )
    b = out.x
    root = scipy.optimize.root(
        lambda b: b * (C @ b) - 1.0,
        b,
        jac=lambda b: np.diag(C @ b) + b[:, None] * C,
        method="hybr",
        options={"xtol": 1e-15},
    )
    if np.max(np.abs(root.x * (C @ root.x) - 1.0)) < np.max(np.abs(b * (C @ b) - 1.0)):
        b = root.x
    a[keep] = b / norms[keep]
    b_full[keep] = b
    # Checked on the raw system, with the float64 Gramian of J itself.
    G = J @ J.T + ridge * np.diag(norms**2)
    res = np.max(np.abs(a[keep] * (G @ a)[keep] - 1.0))
    allow = 64 * EPS["float64"] * np.max(b * (np.abs(C) @ b))
    assert res <= 1e-10 + allow, f"reference residual {res:.2e}"
    return a, b_full


@functools.cache
def cached_reference(kind, T, seed):
    J = problem(kind, T, seed)
    a, b = reference(J)
    return J, a, b


# ----------------------------------------------------------------------------------------------
# The library, batched: one program per (T, dtype), vmapped over problems, masks and states
# (the first call from tx.init's state, the warm start from the state it returns)


def _split(J, T):
    p0 = columns(T)[0]
    return {"a": J[..., :p0], "b": J[..., p0:]}


def default_ridge(T: int, dtype: str) -> float:
    return 16.0 * np.sqrt(T) * EPS[dtype]


@functools.cache
def _program(T: int, dtype: str):
    """One update per problem, vmapped over problems, masks, ridges and start states."""

    def one(J, mask, ridge, state):
        tx = mtlopt.nash_mtl(max_norm=0.0, num_tasks=T, tol=TOL[dtype], ridge=ridge)
        u, state = tx.update(_split(J, T), state, task_mask=mask)
        return jnp.concatenate([u["a"], u["b"]]), state

    return jax.jit(jax.vmap(one))


BATCH = 24  # problems per call (the last chunk padded): one compilation per (T, dtype)


def _pad(x, lo, n):
    x = np.asarray(x)[lo : lo + n]
    return np.concatenate([x, np.repeat(x[:1], BATCH - n, axis=0)])


def _head(x, n):
    return np.asarray(x)[:n]


def solve(J, dtype, mask=None, ridge=None, state=None, T=None):
    """The library's updates ``(B, P)`` and states on problems ``(B, T_i, P)`` (or a list of
    ``(T_i, P)``), each padded to T tasks (the padding masked out: the same problem) unless
    T is the problems' own: one compiled program serves every smaller T."""
    J = [np.asarray(x) for x in J]
    T = max(len(x) for x in J) if T is None else T
    B, P = len(J), J[0].shape[1]
    Jp, mp = np.zeros((B, T, P)), np.zeros((B, T), bool)
    for i, x in enumerate(J):
        Jp[i, : len(x)] = x
        mp[i, : len(x)] = True if mask is None else mask[i]
    ridge = np.full(B, default_ridge(T, dtype)) if ridge is None else np.asarray(ridge)
    with jax.enable_x64(dtype == "float64"):
        if state is None:
            p0, p1 = columns(T)
            params = {"a": np.zeros(p0, dtype), "b": np.zeros(p1, dtype)}
            init = mtlopt.nash_mtl(num_tasks=T).init(params)
            state = jax.tree.map(lambda x: np.stack([np.asarray(x)] * B), init)
        args = (Jp.astype(dtype), mp, ridge.astype(dtype), state)
        us, states = [], []
        for lo in range(0, B, BATCH):  # fixed-size chunks (the last one padded)
            n = min(BATCH, B - lo)
            pad = functools.partial(_pad, lo=lo, n=n)
            u, state = _program(T, dtype)(*jax.tree.map(pad, args))
            assert u.dtype == jnp.dtype(dtype)
            us.append(np.asarray(u[:n], np.float64))
            states.append(jax.tree.map(functools.partial(_head, n=n), state))
    return np.concatenate(us), jax.tree.map(lambda *x: np.concatenate(x), *states)


def check(Ts, dtype: str, kinds=KINDS, seeds=SEEDS, program_T=None) -> list[str]:
    """Every (T, kind, seed), solved in one program (the problems padded to ``program_T``)."""
    cases = [(T, k, s) for T in Ts for k in kinds for s in seeds]
    refs = [cached_reference(k, T, s) for T, k, s in cases]
    J = [r[0] for r in refs]
    u1, s1 = solve(J, dtype, T=program_T)
    # The warm start, from the states just returned: the same problems, every gradient 2x
    # (the same cosines: 0 steps), and 1.7x (the cosines' rounding differs: at most 2 steps).
    u2, s2 = solve([2.0 * x for x in J], dtype, state=s1, T=program_T)
    u3, s3 = solve([1.7 * x for x in J], dtype, state=s1, T=program_T)
    eps = EPS[dtype]
    failed = []
    for i, ((T, kind, seed), (Ji, a_ref, b_ref)) in enumerate(zip(cases, refs, strict=True)):
        name = f"T={T} {kind} {seed}"
        d_ref = Ji.T @ a_ref
        sigma = float(s1.solver.ridge[i])
        nb = np.linalg.norm(b_ref)
        floor = FLOOR * eps * nb * b_ref.sum() + sigma * nb * nb
        size = np.linalg.norm(d_ref)
        for which, d in (("first", u1[i]), ("2x", u2[i]), ("1.7x", u3[i])):
            err = np.linalg.norm(d - d_ref)
            if not err <= RTOL[dtype] * size + floor:
                failed.append(
                    f"{name} {which}: |d - d*| / |d*| = {err / size:.2e}, "
                    f"floor / |d*| = {floor / size:.2e}"
                )
        if not bool(s1.solver.converged[i]):
            failed.append(f"{name}: not converged, residual {s1.solver.residual[i]:.2e}")
        if int(s2.solver.num_steps[i]) > 1 or int(s3.solver.num_steps[i]) > 2:
            failed.append(
                f"{name}: warm starts took {s2.solver.num_steps[i]}, {s3.solver.num_steps[i]}"
            )
        zero = np.linalg.norm(Ji, axis=1) == 0
        if np.any(s1.alpha[i][: len(Ji)][zero] != 0) or np.any(s1.weights[i][: len(Ji)][zero] != 0):
            failed.append(f"{name}: a zero task has a nonzero weight")
    return failed


# ----------------------------------------------------------------------------------------------
# Tests: accuracy


def test_update_matches_the_exact_update_float32():
    """T = 3, 5, 10 in one program (padded to 10 tasks, masked), T = 1 and 2 (closed forms)."""
    failed = check([3, 5, 10], "float32") + check([1], "float32") + check([2], "float32")
    assert not failed, "\n".join(failed)


def test_update_matches_the_exact_update_float64():
    failed = check([5, 10], "float64")
    assert not failed, "\n".join(failed)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_update_matches_the_exact_update_more(dtype):
    """More seeds; T = 3 and 64 as their own programs, T = 2 in float64."""
    failed = []
    for T in (2, 3, 64):
        failed += check([T], dtype, seeds=range(3, 8), program_T=T)
    assert not failed, "\n".join(failed)


def test_two_tasks_closed_form():
    """``b_1 = b_2 = 1 / sqrt(1 + cos)``: ``d = (u_1 + u_2) / sqrt(1 + cos)``, ``|d|^2 = 2``."""
    rng = np.random.default_rng(3)
    J = rng.normal(size=(2, 16)) * np.array([[1e-3], [1e3]])
    n = np.linalg.norm(J, axis=1)
    U = J / n[:, None]
    c = U[0] @ U[1]
    u, s = solve([J], "float32")
    np.testing.assert_allclose(u[0], (U[0] + U[1]) / np.sqrt(1.0 + c), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(s.alpha[0], 1.0 / (n * np.sqrt(1.0 + c)), rtol=2e-5)
    assert int(s.solver.num_steps[0]) == 0 and bool(s.solver.converged[0])


def test_tiny_and_huge_gradients_give_the_same_update():
    """All gradients times 1e-30 or 1e30 (the skeleton's pre-scaled Gramian): the update does
    not depend on the gradients' scale (``max_norm=0``: no clip); ``<g_t, d> = 1 / a_t``."""
    J = problem("scaled3", 5, 0).astype(np.float32)
    u, s = solve([J, J * np.float32(1e-30), J * np.float32(1e30)], "float32", T=10)
    assert np.all(np.isfinite(u)) and np.all(s.skipped == 0)
    np.testing.assert_allclose(u[1], u[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u[2], u[0], rtol=1e-5, atol=1e-6)
    alpha = s.alpha[0, :5].astype(np.float64)
    np.testing.assert_allclose((J.astype(np.float64) @ u[0]) * alpha, 1.0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Tests: no positive solution (the regularised limit)


def _degenerate_problems():
    """``{name: (J, limit)}``: problems without a positive solution (16 columns), and the
    update's limit as the ridge goes to 0."""
    rng = np.random.default_rng(11)
    g, h = rng.normal(size=16), rng.normal(size=16)
    e1, e2 = np.eye(16)[:2]
    u = g / np.linalg.norm(g)
    h_perp = h - (h @ u) * u
    B, W = rng.normal(size=(3, 16)), rng.normal(size=(10, 3))
    return {
        # Two exactly opposed tasks and a third: the unit part of h orthogonal to g.
        "opposed_and_third": (np.stack([g, -2.0 * g, h]), h_perp / np.linalg.norm(h_perp)),
        # 0 in the cone of three tasks of rank 2 (every weight goes to infinity): 0.
        "cone": (np.stack([e1, e2, -(e1 + e2) / np.sqrt(2.0)]), np.zeros(16)),
        # More tasks (10) than the rank (3), 0 in their cone: 0.
        "rank3": (W @ B, np.zeros(16)),
        # One coordinate (a scalar bias), mixed signs: 0.
        "scalar": (np.pad(rng.normal(size=(5, 1)), ((0, 0), (0, 15))), np.zeros(16)),
    }


RIDGES = (1e-2, 1e-4, 1e-6, 1e-8, 1e-10)


def test_regularised_update_tends_to_the_limit():
    """float64, the ridge swept down to 1e-10 (an input of the program): the update is within
    ``16 sqrt(ridge)`` of the limit (the regularisation is ``sigma <= 4 ridge``, and the update
    moves as ``sqrt(sigma)``), and the solve converges in a few steps."""
    problems = _degenerate_problems()
    J = [Ji for Ji, _ in problems.values() for _ in RIDGES]
    u, s = solve(J, "float64", ridge=np.tile(RIDGES, len(problems)), T=10)
    for k, (name, (Ji, limit)) in enumerate(problems.items()):
        rows = slice(k * len(RIDGES), (k + 1) * len(RIDGES))
        err = np.linalg.norm(u[rows] - limit, axis=1)
        assert np.all(err <= 16.0 * np.sqrt(RIDGES)), (name, err)
        assert np.all(np.diff(err) < 0), (name, err)
        steps = s.solver.num_steps[rows]
        assert np.all(s.solver.converged[rows]) and steps.max() <= 12, (name, steps)
        assert np.all(s.solver.ridge[rows] > 0), name
        assert np.all(s.alpha[rows, : len(Ji)] > 0) and np.all(s.alpha[rows, len(Ji) :] == 0)


def test_default_ridge_float32():
    """The default ridge (16 sqrt(T) eps of the dtype) in float32: each limit to within 1e-3
    (0 within 16 sqrt(ridge)), finite, converged; two exactly opposed tasks (T = 2, the closed
    form) cancel up to the combination's rounding of their large weights."""
    problems = _degenerate_problems()
    u, s = solve([Ji for Ji, _ in problems.values()], "float32", T=10)
    ridge = default_ridge(10, "float32")
    for i, (name, (_, limit)) in enumerate(problems.items()):
        err = np.linalg.norm(u[i] - limit)
        assert err <= (1e-3 if np.any(limit) else 16 * np.sqrt(ridge)), (name, err)
        steps = int(s.solver.num_steps[i])
        assert bool(s.solver.converged[i]) and steps <= 12, (name, steps)
    g = np.random.default_rng(0).normal(size=16).astype(np.float32)
    u, s = solve([np.stack([g, -3.0 * g])], "float32")
    rounding = 4 * EPS["float32"] * np.abs(s.alpha[0, 0] * g).max()
    assert np.abs(u).max() <= rounding, (np.abs(u).max(), rounding)


# ----------------------------------------------------------------------------------------------
# Tests: max_norm, heads, update_weights_every


def test_max_norm_clips_the_shared_update_only():
    """max_norm (traced: one program for 0, 0.5, 1 and 100): the shared update scaled to at most
    max_norm (0: no clip), heads follow their own task's gradient; the reported weights carry
    the factor, alpha does not. (Two tasks: the closed form, a cheap compilation.)"""
    T = 2
    J, a_ref, _ = cached_reference("random", T, 0)
    heads = np.random.default_rng(5).normal(size=(T, 4))
    grads = {"trunk": jnp.asarray(J, jnp.float32), "head": jnp.asarray(heads, jnp.float32)}
    params = {"trunk": jnp.zeros(16), "head": jnp.zeros(4)}
    spec = {"trunk": False, "head": True}
    limits = jnp.asarray([0.0, 0.5, 1.0, 100.0])

    def one(m):
        tx = mtlopt.nash_mtl(max_norm=m, num_tasks=T, task_specific=spec)
        return tx.update(grads, tx.init(params))

    u, s = jax.jit(jax.vmap(one))(limits)
    d = J.T @ a_ref
    nd = np.linalg.norm(d)
    for i, m in enumerate(np.asarray(limits)):
        f = 1.0 if m == 0 or nd <= m else m / nd
        np.testing.assert_allclose(u["trunk"][i], f * d, rtol=1e-4, atol=1e-5 * f * nd)
        np.testing.assert_allclose(u["head"][i], heads.sum(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.weights[i], f * a_ref, rtol=1e-4)
        np.testing.assert_allclose(s.alpha[i], a_ref, rtol=1e-4)


def test_update_weights_every_reuses_the_weights():
    """update_weights_every=3 over 7 steps (one lax.scan): the weights are solved at counts 0,
    3, 6 (each the exact solution of that step's gradients) and reused in between, clipped
    from that step's own update. (Two tasks: the closed form, a cheap compilation.)"""
    T, k, steps = 2, 3, 7
    Js = np.stack([problem("random", T, s) * 10.0 ** (s - 3) for s in range(steps)])
    tx = mtlopt.nash_mtl(max_norm=1.0, update_weights_every=k, num_tasks=T)

    def step(state, J):
        u, state = tx.update(J, state)
        return state, (u, state.alpha, state.weights, state.solver.num_steps)

    s0 = tx.init(jnp.zeros(16))
    _, (u, alpha, w, _) = jax.jit(lambda J: jax.lax.scan(step, s0, J))(jnp.asarray(Js, jnp.float32))
    u, alpha, w = (np.asarray(x, np.float64) for x in (u, alpha, w))
    for i in range(steps):
        last = (i // k) * k
        np.testing.assert_allclose(alpha[i], alpha[last], rtol=0, atol=0)
        np.testing.assert_allclose(alpha[i], reference(Js[last])[0], rtol=1e-4)
        d = Js[i].T @ alpha[i]
        f = min(1.0, 1.0 / np.linalg.norm(d))
        np.testing.assert_allclose(u[i], f * d, rtol=1e-4, atol=1e-5 * f * np.linalg.norm(d))
        np.testing.assert_allclose(w[i], f * alpha[i], rtol=1e-4)


def test_groups_and_reuse_per_group():
    """groups="leaf": one bargaining solution per leaf (the closed form on each), max_norm on
    the whole shared update; with update_weights_every=2 the second step reuses the (K, T)
    solutions, clipped from the update itself."""
    T = 2
    rng = np.random.default_rng(8)
    Ja, Jb = rng.normal(size=(T, 5)), 100.0 * rng.normal(size=(T, 3))
    tx = mtlopt.nash_mtl(max_norm=1.0, update_weights_every=2, num_tasks=T, groups="leaf")
    params = {"a": jnp.zeros(5), "b": jnp.zeros(3)}
    step = jax.jit(tx.update)
    state = tx.init(params)
    alphas = np.stack([reference(Ja)[0], reference(Jb)[0]])
    for s in (1.0, 3.0):  # a refresh, then a reuse on grads 3x
        g = {"a": jnp.asarray(s * Ja, jnp.float32), "b": jnp.asarray(s * Jb, jnp.float32)}
        u, state = step(g, state)
        np.testing.assert_allclose(state.alpha, alphas, rtol=1e-4)  # reused on the 2nd step
        d = np.concatenate([s * Ja.T @ alphas[0], s * Jb.T @ alphas[1]])
        f = min(1.0, 1.0 / np.linalg.norm(d))
        got = np.concatenate([np.asarray(u["a"]), np.asarray(u["b"])])
        np.testing.assert_allclose(got, f * d, rtol=1e-4, atol=1e-5 * f * np.linalg.norm(d))
        np.testing.assert_allclose(mtlopt.task_weights(state), f * alphas, rtol=1e-4)


def test_inject_hyperparams():
    """max_norm and update_weights_every injected (traced): the same updates as the plain
    transformation over three steps (a refresh, a reuse, a refresh)."""
    optax = pytest.importorskip("optax")
    T = 2
    rng = np.random.default_rng(9)
    Js = [jnp.asarray(rng.normal(size=(T, 6)), jnp.float32) for _ in range(3)]
    hyper = {"max_norm": 0.7, "update_weights_every": 2, "num_tasks": T}
    plain = mtlopt.nash_mtl(**hyper)
    injected = optax.inject_hyperparams(mtlopt.nash_mtl, static_args=("num_tasks",))(**hyper)
    sp, si = plain.init(jnp.zeros(6)), injected.init(jnp.zeros(6))
    up, ui = jax.jit(plain.update), jax.jit(injected.update)
    for J in Js:
        a, sp = up(J, sp)
        b, si = ui(J, si)
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Tests: construction


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"mtlopt\.nash_mtl: num_tasks is required"):
        mtlopt.nash_mtl()
    for kw, msg in (
        ({"max_norm": -1.0}, "max_norm"),
        ({"update_weights_every": 0}, "update_weights_every"),
        ({"update_weights_every": 1.5}, "update_weights_every"),
        ({"tol": 0.0}, "tol"),
        ({"max_iters": 0}, "max_iters"),
        ({"ridge": 0.0}, "ridge"),
    ):
        with pytest.raises(ValueError, match=rf"mtlopt\.nash_mtl: {msg}"):
            mtlopt.nash_mtl(num_tasks=2, **kw)


# ----------------------------------------------------------------------------------------------
# TorchJD 0.18's NashMTL (cvxpy, on the host), where cvxpy is installed


@pytest.mark.filterwarnings("ignore::UserWarning")  # cvxpy's notes on ECOS and DPP
def test_against_torchjd_nash_mtl():
    """TorchJD's 20 convex-concave cvxpy steps agree with the exact solve on a well-conditioned
    problem, and stop far from ``G a = 1/a`` on a scaled one; ours is within 1e-5 on both."""
    pytest.importorskip("cvxpy")
    torch = pytest.importorskip("torch")
    from torchjd.aggregation import NashMTL

    rows = []
    for kind in ("random", "scaled6"):
        J, a_ref, _ = cached_reference(kind, 3, 0)
        agg = NashMTL(n_tasks=3, max_norm=0.0)
        d_torchjd = agg(torch.tensor(J, dtype=torch.float64)).numpy()
        u, s = solve([J], "float32", T=10)
        G = J @ J.T
        a = s.alpha[0, :3].astype(np.float64)
        d_ref = J.T @ a_ref
        ours, theirs = (
            np.linalg.norm(d - d_ref) / np.linalg.norm(d_ref) for d in (u[0], d_torchjd)
        )
        rows.append((kind, ours, theirs, np.abs(a * (G @ a) - 1).max()))
    (_, ours_good, theirs_good, _), (_, ours_scaled, theirs_scaled, res) = rows
    assert ours_good < 1e-4 and ours_scaled < 1e-4 and res < 1e-4, rows
    assert theirs_good < 1e-2, rows
    assert theirs_scaled > 100 * ours_scaled, rows
