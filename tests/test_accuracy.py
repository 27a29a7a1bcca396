"""The updates of ``mgda`` and ``cagrad``, judged against exact float64 updates.

The solvers are tested on their objective in ``test_solvers.py``; here the test is the
update itself, ``||d - d*|| <= RTOL ||d*|| + floor``, through the public API on badly scaled
problems (task-gradient norms spread 1e3 to 1e5, a task whose gradient is exactly zero, ...).

The references (numpy, float64) enumerate the faces of the simplex, which is cheap for the
few tasks used here (``T <= 6``: at most 63 faces), and do not use the library's solver:

* MGDA: on each face S, the min-norm point of the affine hull of ``{a_t, t in S}``
  (``a_t = g_t / n_t``, the normalised gradients) by a least-squares solve on the rows
  themselves (never on their Gramian, which would square the condition number). Among the
  faces whose weights are positive, the min-norm point ``d*`` is the one certified by the
  Frank-Wolfe gap: ``||d||^2 - min_t <a_t, d> = 0``.
* CAGrad (``rescale=0``): the minimiser of ``h(v) = <v, g0> + rho ||v||`` over the hull of the
  gradients (``rho = c ||g0||``, the dual in terms of ``v = g_w``) lies in the relative interior
  of some face, where it is the minimiser over the face's affine hull, in closed form
  (``v = v0 + t v1``: ``v0`` the face's min-norm point, ``v1`` the projection of ``-g0`` on its
  directions, ``t = sqrt(|v0|^2 / (rho^2 - |v1|^2))``), or it is ``v = 0`` when 0 lies in the
  hull. The lowest of these candidates is the optimum, certified by weak duality:
  ``d = g0 + rho v / |v|`` lies in CAGrad's ball and ``min_t <g_t, d> = h(v)``. The direction
  ``v* / |v*|`` is unique even where ``v*`` is not, so ``d*`` is too. Where ``|v*|^2`` is at
  most ``STATIONARY * eps * (sum_t w*_t |g_t|)^2`` (rounding) the library returns ``g0`` (its
  documented convention at Pareto-stationary points), and so does the reference; problems
  within a factor 100 of that threshold are left out, since there the two may round to
  different sides.

The floor is the rounding of the Gramian carried to the update, ``FLOOR * sqrt(eps) * s``
(plus ``FLOOR * eps * sum_t |a_t|``, the rounding of the weights, which is all that is left
where ``d* = 0``), ``FLOOR = 8``:
for MGDA ``s = sum_t w*_t |a_t|``; rounding every entry ``G_st`` by ``eps |a_s| |a_t|`` moves
``F(w) = |d_w|^2`` by at most ``eps s^2``, hence (``|d_w - d*|^2 <= F(w) - F*``) the update by
``sqrt(2 eps) s``, and the solver's stop at F's rounding adds a few ulps more. For CAGrad,
``s = s_b + rho s_w / |v| + 2 sqrt(rho s_w s_b / |v|)`` (``s_w = sum_t w*_t |g_t|``, ``s_b`` the
mean norm; F moves by ``eps (s_w s_b + rho s_w^2 / (2 |v|))`` and
``|d - d*|^2 <= 2 rho (F(w) - F*) / |v|``), or ``s_b`` where ``d* = g0``. This floor is far
below ``sqrt(eps * trace(G))`` on badly scaled problems, whose optimum is near the small
gradients; it binds only where ``d*`` is itself at the rounding of the Gramian (nearly
collinear gradients with 0 nearly in the hull: there float32 cannot resolve ``d*``).
Measured in float32: ``|d - d*| / |d*|`` below 1e-6 on the scaled and zero-task problems, below
1e-3 on the conflicting ones; up to ~6 sqrt(eps) s on the nearly collinear ones (T = 6).

The solvers' ``tol`` is relative to F (``TOL``): the default 1e-6 guarantees 1e-3 on d, so the
float64 tests ask for ``tol=1e-12`` to get 1e-6.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtlopt

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
CS = (0.4, 1.0, 3.0)
KINDS = ("random", "conflicting", "collinear", "scaled3", "scaled5", "zero")
T = 5
SEEDS = range(3)
P = (7, 9)  # two leaves: 16 parameters
RTOL = {"float32": 1e-3, "float64": 1e-6}
# The solvers' tol is relative to F (for MGDA, |d - d*|^2 <= F(w) - F* <= tol F): 1e-6 puts d
# within 1e-3 of d*; 1e-12 within 1e-6.
TOL = {"float32": 1e-6, "float64": 1e-12}
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}
# mtlopt.cagrad's threshold: |g_w*|^2 <= STATIONARY * eps * (sum_t w_t |g_t|)^2 gives g0.
STATIONARY = 64.0
FLOOR = 8.0


# ----------------------------------------------------------------------------------------------
# Problems (float64)


def problem(kind: str, T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(J, losses)``: task gradients ``(T, sum(P))`` and positive losses, float64."""
    rng = np.random.default_rng([seed, T, sum(map(ord, kind))])
    n = sum(P)
    if kind == "random":
        J = rng.normal(size=(T, n))
    elif kind == "conflicting":
        J = rng.normal(size=(T, n))
        for k in range(0, T - 1, 2):
            J[k + 1] = -rng.uniform(0.3, 3.0) * J[k] + 0.05 * rng.normal(size=n)
    elif kind == "collinear":
        s = rng.uniform(0.2, 2.0, size=T) * (rng.choice([-1.0, 1.0], size=T) if seed % 2 else 1.0)
        J = np.outer(s, rng.normal(size=n)) + 1e-3 * rng.normal(size=(T, n))
    elif kind.startswith("scaled"):  # norms spread 10^span, both ends hit
        span = float(kind[len("scaled") :])
        J = rng.normal(size=(T, n)) + (rng.normal(size=n) if seed % 2 else 0.0)
        J /= np.linalg.norm(J, axis=1, keepdims=True)
        e = rng.uniform(0.0, span, size=T)
        e[rng.permutation(T)[:2]] = [0.0, span]
        J *= (10.0 ** (e - span / 2))[:, None]
    elif kind == "zero":  # one task's gradient is exactly zero
        J = rng.normal(size=(T, n))
        if seed % 2:  # and some conflict: CAGrad's optimum is then away from g_w = 0
            J[1] = -0.5 * J[0] + 0.1 * rng.normal(size=n)
        J[rng.integers(T)] = 0.0
    else:
        raise ValueError(kind)
    losses = 10.0 ** rng.uniform(-1.5, 1.5, size=T)
    return J, losses


# ----------------------------------------------------------------------------------------------
# Exact references (float64, by enumeration of the faces)


def _faces(T):
    for k in range(1, T + 1):
        yield from itertools.combinations(range(T), k)


def _affine_min_norm(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The min-norm point of the affine hull of A's rows, its weights x (sum 1), and the
    orthogonal projector's basis N: ``v = A^T x``. Least squares on A, not on A A^T."""
    k = len(A)
    if k == 1:
        return np.ones(1), np.zeros((1, 0))
    N = np.vstack([np.eye(k - 1), -np.ones((1, k - 1))])  # a basis of {x : sum(x) = 0}
    e = np.zeros(k)
    e[-1] = 1.0
    x = e + N @ np.linalg.lstsq(A.T @ N, -A[-1], rcond=None)[0]
    return x, N


def ref_mgda(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(w*, d*)``: the min-norm point of the hull of A's rows."""
    T = len(A)
    best = None
    for S in _faces(T):
        x, _ = _affine_min_norm(A[list(S)])
        if np.any(x <= 0):
            continue
        w = np.zeros(T)
        w[list(S)] = x
        d = A.T @ w
        gap = d @ d - np.min(A @ d)  # >= |d - d*|^2 / 2 ... 0 at the optimum
        if best is None or gap < best[0]:
            best = (gap, w, d)
    gap, w, d = best
    scale = np.max(np.sum(A * A, axis=1))
    assert gap <= 1e-13 * scale, f"reference: gap {gap:.2e}"
    return w, d


def ref_cagrad(J: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """``(d*, w*, |g_w*|, certified)``: CAGrad's exact update (``rescale=0``; ``g0`` where
    ``g_w* = 0``), a dual solution, the norm of ``g_w*``, and whether weak duality certifies it
    to 1e-12 (not where the optimum sits on the boundary of two faces to within rounding)."""
    T = len(J)
    g0 = J.mean(axis=0)
    rho = c * np.linalg.norm(g0)
    cands = []  # (h(v), v, w)
    w_min, v_min = ref_mgda(J)
    if v_min @ v_min <= 1e-28 * np.max(np.sum(J * J, axis=1)):
        cands.append((0.0, np.zeros_like(g0), w_min))
    for S in _faces(T):
        AS = J[list(S)]
        x0, N = _affine_min_norm(AS)
        v0 = AS.T @ x0
        if N.shape[1]:
            D = AS.T @ N  # the face's directions
            y = np.linalg.lstsq(D, -g0, rcond=None)[0]
            x1, v1 = N @ y, D @ y
        else:
            x1, v1 = np.zeros(1), np.zeros_like(g0)
        q0, q11 = v0 @ v0, v1 @ v1
        if rho * rho <= q11 or q0 <= 0:
            continue  # unbounded below on the affine hull (the optimum is on a sub-face), or v = 0
        x = x0 + np.sqrt(q0 / (rho * rho - q11)) * x1
        if np.any(x <= 0):
            continue
        v = AS.T @ x
        w = np.zeros(T)
        w[list(S)] = x
        cands.append((v @ g0 + rho * np.linalg.norm(v), v, w))
    h, v, w = min(cands, key=lambda hvw: hvw[0])
    nv = np.linalg.norm(v)
    d = g0 + (rho / nv) * v if nv > 0 else g0
    # Weak duality: d in the ball gives min_t <g_t, d> <= F*; for v* = 0 and c >= 1, d = 0.
    # (For v* = 0 and c < 1 the enumeration alone is the proof.)
    lb = np.min(J @ d) if nv > 0 else (0.0 if c >= 1 else h)
    certified = h - lb <= 1e-12 * np.max(np.sum(J * J, axis=1))
    return d, w, nv, certified


def mgda_norms(J, losses, normalization, eps=1e-8):
    norms = np.linalg.norm(J, axis=1)
    n = {"none": np.ones(len(J)), "l2": norms, "loss": losses, "loss+": losses * norms}
    n = np.maximum(n[normalization], eps)
    return np.where(n > 0, n, 1.0)


def cagrad_floor_scale(J, c, w, nv):
    """``s_sqrt`` for CAGrad (see :func:`reference`): the Gramian's rounding moves F by at most
    ``eps (s_w s_b + rho s_w^2 / (2 |v|))`` (``s_w = sum_t w_t |g_t|``, ``s_b`` the mean norm),
    and ``|d - d*|^2 <= 2 rho (F(w) - F*) / |v|``."""
    norms = np.linalg.norm(J, axis=1)
    s_b = np.mean(norms)
    if nv == 0:
        return s_b
    rho = c * np.linalg.norm(J.mean(axis=0))
    s_w = np.sum(w * norms)
    return s_b + rho * s_w / nv + 2.0 * np.sqrt(rho * s_w * s_b / nv)


@functools.cache
def reference(
    method: str, kind: str, T: int, seed: int, option, convention: bool = True, dtype="float32"
):
    """``(d*, s_sqrt, s_abs)``, or None where the case sits on the library's convention (or
    the reference is not certified).

    ``FLOOR * sqrt(eps) * s_sqrt`` bounds the move of ``d*`` under a rounding of each Gramian
    entry by ``eps |g_s| |g_t|`` (see the module docstring); ``FLOOR * eps * s_abs``, with
    ``s_abs = sum_t |g_t|``, is the rounding of the weights themselves (it is all there is
    where ``d* = 0``: a zero task, for MGDA). ``convention``: CAGrad's update is
    ``g0`` where ``|g_w*|^2`` is at rounding level (see ``STATIONARY``), as the library does.
    """
    J, losses = problem(kind, T, seed)
    if method == "mgda":
        A = J / mgda_norms(J, losses, option)[:, None]
        w, d = ref_mgda(A)
        norms = np.linalg.norm(A, axis=1)
        return d, np.sum(w * norms), np.sum(norms)
    d, w, nv, certified = ref_cagrad(J, option)
    if not certified:
        return None
    if convention:
        size = np.sum(w * np.linalg.norm(J, axis=1))
        ratio = nv * nv / (STATIONARY * EPS[dtype] * size * size) if size > 0 else 0.0
        if 0.01 < ratio < 100.0:
            return None  # the library and the reference may round to different sides
        if ratio <= 0.01:
            d, nv = J.mean(axis=0), 0.0
    return d, cagrad_floor_scale(J, option, w, nv), np.sum(np.linalg.norm(J, axis=1))


# ----------------------------------------------------------------------------------------------
# The library, batched: one jitted, vmapped update per (method, T, dtype) for all problems and
# all options (the normalisations, or the values of c)


def _transforms(method, T, tol):
    if method == "mgda":
        return [mtlopt.mgda(nz, num_tasks=T, tol=tol) for nz in NORMALIZATIONS]
    return [mtlopt.cagrad(c=c, rescale=0, num_tasks=T, tol=tol) for c in CS]


@functools.cache
def _batched(method, T, tol):
    txs = _transforms(method, T, tol)

    def one(grads, losses):
        params = {k: jnp.zeros(v.shape[1:], v.dtype) for k, v in grads.items()}
        ds, duals, steps = [], [], []
        for tx in txs:
            u, state = tx.update(grads, tx.init(params), task_losses=losses)
            ds.append(jnp.concatenate([u["a"], u["b"]]))
            duals.append(state.dual.astype(ds[-1].dtype))
            steps.append(state.solver.num_steps)
        return jnp.stack(ds), jnp.stack(duals), jnp.stack(steps)

    return jax.jit(jax.vmap(one))


def run(method, T, dtype, kinds=KINDS, seeds=SEEDS):
    """The updates ``(cases, options, P)``, duals ``(cases, options, T)`` and solver steps of the
    library on every (kind, seed), float64 numpy, with the cases."""
    cases = [(k, s) for k in kinds for s in seeds]
    J = np.stack([problem(k, T, s)[0] for k, s in cases])
    L = np.stack([problem(k, T, s)[1] for k, s in cases])
    with jax.enable_x64(dtype == "float64"):
        grads = {"a": jnp.asarray(J[:, :, : P[0]], dtype), "b": jnp.asarray(J[:, :, P[0] :], dtype)}
        d, dual, steps = _batched(method, T, TOL[dtype])(grads, jnp.asarray(L, dtype))
        assert d.dtype == jnp.dtype(dtype), d.dtype  # the whole reduction in the leaves' dtype
        return cases, np.asarray(d, np.float64), np.asarray(dual, np.float64), np.asarray(steps)


def errors(method, T, dtype, d, cases, convention=True):
    """``[(case, option, |d - d*| / |d*|, |d - d*| / floor, passed)]``."""
    out = []
    options = NORMALIZATIONS if method == "mgda" else CS
    eps = EPS[dtype]
    for i, (kind, seed) in enumerate(cases):
        for j, option in enumerate(options):
            ref = reference(method, kind, T, seed, option, convention, dtype)
            if ref is None:
                continue
            d_star, s_sqrt, s_abs = ref
            err = float(np.linalg.norm(d[i, j] - d_star))
            size = float(np.linalg.norm(d_star))
            floor = FLOOR * (np.sqrt(eps) * s_sqrt + eps * s_abs)
            ok = err <= RTOL[dtype] * size + floor
            rel = err / size if size > 0 else (0.0 if err == 0 else np.inf)
            out.append(((kind, seed), option, rel, err / floor if floor > 0 else 0.0, ok))
    return out


def report(rows):
    failed = [r for r in rows if not r[4]]
    lines = [
        f"{c} {o}: |d - d*| / |d*| = {rel:.2e}, / floor = {fl:.2f}" for c, o, rel, fl, _ in failed
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_update_matches_the_exact_update(method, dtype):
    """Every kind, every normalisation (MGDA) or c (CAGrad), T = 5: the loop."""
    cases, d, _, _ = run(method, T, dtype)
    rows = errors(method, T, dtype, d, cases)
    assert len(rows) >= 0.8 * len(cases) * (4 if method == "mgda" else len(CS))
    assert all(r[4] for r in rows), report(rows)


@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_two_tasks_update_matches_the_exact_update(method):
    """T = 2: the closed forms."""
    cases, d, _, _ = run(method, 2, "float32")
    rows = errors(method, 2, "float32", d, cases)
    assert all(r[4] for r in rows), report(rows)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cagrad_dual_is_exact_on_scaled_problems(dtype):
    """The dual solution itself, judged on the update it implies, ``g0 + rho g_w / |g_w|``
    (float64 here), on the badly scaled and zero-task cases, where ``|g_w*|^2`` is far below
    ``trace(G) / T`` (CAGrad's optimum sits near the smallest gradient)."""
    kinds = ("scaled3", "scaled5", "zero")
    cases, _, dual, _ = run("cagrad", T, dtype)  # all kinds: the same compilation as above
    keep = [i for i, (kind, _) in enumerate(cases) if kind in kinds]
    cases, dual = [cases[i] for i in keep], dual[keep]
    implied = np.zeros((*dual.shape[:2], sum(P)))
    for i, (kind, seed) in enumerate(cases):
        J, _ = problem(kind, T, seed)
        g0 = J.mean(axis=0)
        for j, c in enumerate(CS):
            v = J.T @ dual[i, j]
            nv = np.linalg.norm(v)
            implied[i, j] = g0 + (c * np.linalg.norm(g0) / nv) * v if nv > 0 else g0
    rows = errors("cagrad", T, dtype, implied, cases, convention=False)
    # Where g_w* = 0 (a zero task, c >= 1), the implied direction is undefined: left out.
    rows = [r for r in rows if ref_cagrad(problem(r[0][0], T, r[0][1])[0], r[1])[2] > 0]
    assert len(rows) >= 15
    assert all(r[4] for r in rows), report(rows)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["mgda", "cagrad"])
@pytest.mark.parametrize("num_tasks", [3, 6])
def test_update_matches_the_exact_update_more(method, dtype, num_tasks):
    """More seeds, and T = 3 and 6."""
    cases, d, _, _ = run(method, num_tasks, dtype, seeds=range(3, 11))
    rows = errors(method, num_tasks, dtype, d, cases)
    assert all(r[4] for r in rows), report(rows)
