"""UPGrad and DualProj (``mtlopt.upgrad``, ``mtlopt.dualproj``) against exact float64 projections.

The reference projects ``J^T u`` onto the dual cone ``{x : J x >= 0}`` by its dual,
``v = argmin_{v >= u} |J^T v|^2`` (Quinton & Rey, Prop. 1), solved as a non-negative least-squares
problem on the rows of J themselves, ``scipy.optimize.nnls(J^T, -J^T u)`` for the shift
``x = v - u`` (never on the Gramian, never with the library's solver), and certified: the
projection ``d*`` is in the cone (``J d* >= 0``) and complementary (``x^T J d* = 0``) to 1e-12.
UPGrad's update is ``sum_i p_i d*_i`` (``d*_i`` the projection of ``g_i``), DualProj's the
projection of ``sum_t p_t g_t``.

The standard: ``|d - d*| <= RTOL |d*| + floor``, ``floor = FLOOR (sqrt(eps) s + eps s_abs)`` with
``s = sum_i p_i sum_t v*_it |g_t|`` (the size of the weighted gradients: rounding each Gramian
entry by ``eps |g_s| |g_t|`` moves ``|J^T v|^2`` by about ``eps s^2``, hence the projection by
``sqrt(eps) s``, since ``|J^T v - d*|^2 <= |J^T v|^2 - |d*|^2``) and ``s_abs`` the mean norm
(the rounding of the combination itself, all there is where ``d* = 0``).
Measured (T = 2 to 64, 64 tasks of rank 16 and 100 included): in float32 ``|d - d*| / |d*|`` at
most 7e-5 where ``|d*|`` is not itself at the floor, and every error at most 0.08 of its
allowance; in float64 at most 4e-10 (nearly collinear tasks), 2e-12 elsewhere.

TorchJD 0.18's UPGrad and DualProj (with its quadprog projector where qpsolvers is installed,
else the same regularised QP solved exactly by NNLS) are the reference for the peers' options.

Compiled programs (``-m "not slow"``): one per (T, dtype) for the accuracy tests, each a
``jax.vmap`` over every problem holding both methods (and, for T = 5, their warm-started second
step); one for the peers' options with the Gramian route; one for ``groups=`` with a preference
vector.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import mtlopt

pytestmark = pytest.mark.xdist_group("dual_cone")

KINDS = ("random", "conflicting", "collinear", "scaled3", "zero", "agree", "opposite")
SEEDS = range(3)
SPLIT = 9  # two leaves: J[:, :SPLIT] and J[:, SPLIT:]
RTOL = {"float32": 1e-3, "float64": 1e-6}
TOL = {"float32": 1e-6, "float64": 1e-12}
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}
FLOOR = 8.0
METHODS = ("upgrad", "dualproj")


# ----------------------------------------------------------------------------------------------
# Problems and the exact reference (float64)


def problem(kind: str, T: int, seed: int, P: int = 24) -> np.ndarray:
    """Task gradients ``(T, P)``, float64."""
    rng = np.random.default_rng([seed, T, P, sum(map(ord, kind))])
    if kind == "random":
        J = rng.normal(size=(T, P))
    elif kind == "conflicting":
        J = rng.normal(size=(T, P))
        for k in range(0, T - 1, 2):
            J[k + 1] = -rng.uniform(0.3, 3.0) * J[k] + 0.05 * rng.normal(size=P)
    elif kind == "collinear":
        s = rng.uniform(0.2, 2.0, size=T) * (rng.choice([-1.0, 1.0], size=T) if seed % 2 else 1.0)
        J = np.outer(s, rng.normal(size=P)) + 1e-3 * rng.normal(size=(T, P))
    elif kind.startswith("scaled"):  # norms spread 10^span (1000x), both ends hit
        span = float(kind[len("scaled") :])
        J = rng.normal(size=(T, P)) + (rng.normal(size=P) if seed % 2 else 0.0)
        J /= np.linalg.norm(J, axis=1, keepdims=True)
        e = rng.uniform(0.0, span, size=T)
        e[rng.permutation(T)[: min(T, 2)]] = [0.0, span][: min(T, 2)]
        J *= (10.0 ** (e - span / 2))[:, None]
    elif kind == "zero":  # one task's gradient is exactly zero, others conflicting
        J = rng.normal(size=(T, P))
        if T >= 2:
            J[1] = -0.5 * J[0] + 0.1 * rng.normal(size=P)
        J[rng.integers(T)] = 0.0
    elif kind == "agree":  # no two tasks conflict: both methods give the mean
        J = np.abs(rng.normal(size=(T, P)))
    elif kind == "opposite":  # an exactly opposite pair
        J = rng.normal(size=(T, P))
        if T >= 2:
            J[1] = -J[0] * rng.uniform(0.5, 2.0)
    else:
        raise ValueError(kind)
    return J


def project(J: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d*, v*)``: the projection of ``J^T u`` onto ``{x : J x >= 0}`` and its weights."""
    T = len(J)
    x = optimize.nnls(J.T, -J.T @ u, maxiter=100 * T)[0]
    v = u + x
    d = J.T @ v
    scale = np.sum(v * np.linalg.norm(J, axis=1)) ** 2 + 1e-300
    Jd = J @ d
    assert np.min(Jd) >= -1e-12 * scale, "reference: not in the cone"
    assert abs(x @ Jd) <= 1e-12 * scale, "reference: not complementary"
    return d, v


def pref(T: int, given=None) -> np.ndarray:
    return np.full(T, 1.0 / T) if given is None else np.asarray(given, np.float64)


@functools.cache
def reference(method: str, kind: str, T: int, seed: int, P: int = 24, p=None):
    """``(d*, s, s_abs)`` (see the module docstring)."""
    J = problem(kind, T, seed, P)
    return exact(method, J, p)


def exact(method: str, J: np.ndarray, p=None):
    T = len(J)
    p = pref(T, p)
    norms = np.linalg.norm(J, axis=1)
    if method == "upgrad":
        d, s = np.zeros(J.shape[1]), 0.0
        for i in range(T):
            di, vi = project(J, np.eye(T)[i])
            d += p[i] * di
            s += p[i] * np.sum(vi * norms)
    else:
        d, v = project(J, p)
        s = np.sum(v * norms)
    return d, s, np.mean(norms)


def judge(d, ref, dtype):
    """``(passed, |d - d*| / |d*|, |d - d*| / floor)``."""
    d_star, s, s_abs = ref
    eps = EPS[dtype]
    err = float(np.linalg.norm(d - d_star))
    size = float(np.linalg.norm(d_star))
    floor = FLOOR * (np.sqrt(eps) * s + eps * s_abs)
    rel = err / size if size > 0 else (0.0 if err == 0 else np.inf)
    return err <= RTOL[dtype] * size + floor, rel, err / floor if floor > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# The library, batched: one jitted vmap per (T, dtype) over every problem, both methods


def _grads(J):
    return {"a": J[:, :SPLIT], "b": J[:, SPLIT:]}


def _flat(u):
    return jnp.concatenate([u["a"], u["b"]])


@functools.cache
def _batched(T: int, tol: float, warm: bool):
    txs = [mtlopt.upgrad(num_tasks=T, tol=tol), mtlopt.dualproj(num_tasks=T, tol=tol)]

    def one(J, J2):
        grads = _grads(J)
        params = {k: jnp.zeros(v.shape[1:], v.dtype) for k, v in grads.items()}
        ds, ws, steps, conv, ds2, steps2 = [], [], [], [], [], []
        for tx in txs:
            u, state = tx.update(grads, tx.init(params))
            ds.append(_flat(u))
            ws.append(state.weights)
            steps.append(state.solver.num_steps)
            conv.append(state.solver.converged)
            if warm:  # from the state, a perturbed problem
                u2, s2 = tx.update(_grads(J2), state)
                ds2.append(_flat(u2))
                steps2.append(s2.solver.num_steps)
        out = [jnp.stack(ds), jnp.stack(ws), jnp.stack(steps), jnp.stack(conv)]
        if warm:
            out += [jnp.stack(ds2), jnp.stack(steps2)]
        return tuple(out)

    return jax.jit(jax.vmap(one))


def perturbed(J, seed=0):
    rng = np.random.default_rng(seed)
    return J + 1e-2 * np.linalg.norm(J, axis=1, keepdims=True) * rng.normal(size=J.shape) / 5


WARM = (5, "float32")  # the program that also takes warm-started steps


def run(T, dtype, kinds=KINDS, seeds=SEEDS, P=24):
    warm = (T, dtype) == WARM
    cases = [(k, s) for k in kinds for s in seeds]
    J = np.stack([problem(k, T, s, P) for k, s in cases])
    J2 = np.stack([perturbed(j) for j in J])
    with jax.enable_x64(dtype == "float64"):
        out = _batched(T, TOL[dtype], warm)(jnp.asarray(J, dtype), jnp.asarray(J2, dtype))
        assert out[0].dtype == jnp.dtype(dtype)
        out = [np.asarray(o, np.float64) if o.dtype != bool else np.asarray(o) for o in out]
    return cases, J, J2, out


def check_all(T, dtype, P=24, seeds=SEEDS):
    cases, J, _, (d, _, steps, conv, *_) = run(T, dtype, P=P, seeds=seeds)
    failed, worst = [], {}
    for i, (kind, seed) in enumerate(cases):
        for j, m in enumerate(METHODS):
            ok, rel, fl = judge(d[i, j], reference(m, kind, T, seed, P), dtype)
            key = (m, kind)
            worst[key] = max(worst.get(key, 0.0), min(rel, fl))
            if not ok:
                failed.append(f"{m} {kind} seed {seed}: rel {rel:.2e}, /floor {fl:.2f}")
    assert not failed, "\n".join(failed)
    assert conv.all(), [c for c, ok in zip(cases, conv.all(axis=1), strict=True) if not ok]
    return cases, J, d, steps, worst


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize(
    ("T", "dtype"),
    [
        *[(T, "float32") for T in (1, 2, 3, 5, 10)],
        (10, "float64"),
        pytest.param(3, "float64", marks=pytest.mark.slow),
    ],
)
def test_update_matches_the_exact_projection(T, dtype):
    cases, J, d, _, _ = check_all(T, dtype)
    eps = EPS[dtype]
    for i, (kind, _) in enumerate(cases):
        norms = np.linalg.norm(J[i], axis=1)
        for j in range(2):
            # In the dual cone: <g_t, d> >= 0 up to the rounding of the combination.
            inner = J[i] @ d[i, j]
            assert np.all(inner >= -64 * eps * norms * np.sum(norms) / T), (kind, METHODS[j])
            if kind == "agree":  # no conflict: the projections change nothing
                np.testing.assert_allclose(d[i, j], J[i].mean(0), rtol=1e-5, atol=1e-6)
            if kind == "opposite" and T == 2:  # cancel exactly
                assert np.linalg.norm(d[i, j]) <= 1e-5 * np.max(norms)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("P", [16, 100])  # rank 16 < T (the cone is often {0}); full rank
def test_update_matches_the_exact_projection_64_tasks(dtype, P):
    check_all(64, dtype, P=P, seeds=range(2))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("T", [3, 5, 10])
def test_update_matches_the_exact_projection_more_seeds(T, dtype):
    check_all(T, dtype, seeds=range(3, 12))


def test_hand_worked_two_tasks():
    """By hand. g1 = (1, 0), g2 = (-1, 1): pi(g1) = g1 + g2 / 2 = (1/2, 1/2) (orthogonal to
    g2), pi(g2) = g2 + g1 = (0, 1) (orthogonal to g1); UPGrad is their mean (1/4, 3/4), weights
    ((1 + 1) / 2, (1/2 + 1) / 2). The mean (0, 1/2) is in the cone: DualProj keeps it.
    g1 = (1, 0), g2 = (-3, 1): pi(g1) = g1 + (3/10) g2 = (1/10, 3/10), pi(g2) = g2 + 3 g1 =
    (0, 1), UPGrad (1/20, 13/20); the mean (-1, 1/2) is not in the cone: DualProj's
    v = (3/2, 1/2) makes <g1, d> = 0, d = (0, 1/2). Exactly opposed tasks: both give 0."""
    J = np.zeros((3, 2, 24))
    J[0, :, :2] = [[1.0, 0.0], [-1.0, 1.0]]
    J[1, :, :2] = [[1.0, 0.0], [-3.0, 1.0]]
    J[2, :, :2] = [[2.0, 0.0], [-2.0, 0.0]]  # exactly opposed: both give 0
    _, _, _, (d, w, _, _) = _run_direct(J)
    np.testing.assert_allclose(d[0, 0, :2], [0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(w[0, 0], [1.0, 0.75], atol=1e-6)
    np.testing.assert_allclose(d[0, 1, :2], [0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(d[1, 1, :2], [0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(w[1, 1], [1.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(d[1, 0, :2], [0.05, 0.65], atol=1e-6)
    np.testing.assert_allclose(d[2], 0.0, atol=1e-6)


def _run_direct(J):
    """The T = 2 program of the accuracy test (the same batch size) on given task gradients."""
    n = len(KINDS) * len(SEEDS)
    J = np.concatenate([J, np.zeros((n - len(J), *J.shape[1:]))])
    J = jnp.asarray(J, jnp.float32)
    out = _batched(2, TOL["float32"], False)(J, J)
    return None, None, None, [np.asarray(o) for o in out]


def test_warm_start_takes_at_most_one_step_and_stays_exact():
    """From the state of a first step, the problem perturbed by 1% of each gradient's norm."""
    T, dtype = WARM
    cases, _, J2, (_, _, steps, conv, d_warm, steps_warm) = run(T, dtype)
    assert conv.all()
    # Usually one Newton step on the face kept from the state (measured: mean 0.8, max 2,
    # against 1.0 and 3 from the cold start).
    assert steps_warm.max() <= 2 and np.mean(steps_warm) <= np.mean(steps), (steps_warm, steps)
    for i in range(len(cases)):
        for j, m in enumerate(METHODS):
            ok, rel, fl = judge(d_warm[i, j], exact(m, J2[i]), dtype)
            assert ok, (cases[i], m, rel, fl)


# ----------------------------------------------------------------------------------------------
# The peers' options (TorchJD 0.18), preference vectors, groups, the Gramian route

PEER_T = 5
PREF = (0.1, 0.4, 0.2, 0.2, 0.1)
OPTION_KINDS = ("random", "conflicting", "collinear", "scaled3", "zero", "opposite")


@functools.cache
def _options_program():
    """One program: the peers' options (task grads) and the Gramian route (exact defaults)."""
    T = PEER_T
    peers = [
        mtlopt.upgrad(num_tasks=T, reg_eps=1e-4, norm_eps=1e-4),
        mtlopt.dualproj(PREF, reg_eps=1e-4, norm_eps=1e-4),
    ]
    exact_txs = [mtlopt.upgrad(num_tasks=T), mtlopt.dualproj(num_tasks=T)]

    def one(J):
        grads = _grads(J)
        params = {k: jnp.zeros(v.shape[1:], v.dtype) for k, v in grads.items()}
        d = jnp.stack([_flat(tx.update(grads, tx.init(params))[0]) for tx in peers])
        G = mtlopt.gramian(grads)
        w = jnp.stack([mtlopt.weights_from_gramian(tx, G)[0] for tx in exact_txs])
        return d, w

    return jax.jit(jax.vmap(one))


@functools.cache
def _options_run():
    cases = [(k, s) for k in OPTION_KINDS for s in range(2)]
    J = np.stack([problem(k, PEER_T, s) for k, s in cases])
    J = np.concatenate([J, 1e-3 * J[:2]])  # trace(G) below norm_eps: the peers give the mean
    cases += [("tiny", 0), ("tiny", 1)]
    d, w = _options_program()(jnp.asarray(J, jnp.float32))
    return cases, J, np.asarray(d, np.float64), np.asarray(w, np.float64)


def test_weights_from_gramian_give_the_same_update():
    """The Gramian route (``mtlopt.weights_from_gramian``): the same weights, judged on the
    update they give."""
    cases, J, _, w = _options_run()
    for i, case in enumerate(cases):
        for j, m in enumerate(METHODS):
            ok, rel, fl = judge(J[i].T @ w[i, j], exact(m, J[i]), "float32")
            assert ok, (case, m, rel, fl)


def _scipy_projector(base):
    """TorchJD's projector with its quadprog call replaced by an exact NNLS solve of the same
    (regularised, hence positive definite) QP, where qpsolvers/quadprog are not installed:
    TorchJD's own normalisation, regularisation and combination are kept."""

    class ScipyProjector(base):
        _REQUIRED_DEPS = ("numpy", "scipy")

        def _project_weight_vector(self, u, G):
            L = np.linalg.cholesky(G)
            x = optimize.nnls(L.T, -L.T @ u, maxiter=1000)[0]
            return u + x

    return ScipyProjector()


def test_peer_options_match_torchjd():
    """``reg_eps=1e-4, norm_eps=1e-4`` reproduce TorchJD 0.18's UPGrad and DualProj (the latter
    with a preference vector; same inputs, TorchJD in float64), including its zeroed Gramian
    where ``trace(G) < norm_eps``; and the exact default differs from them on conflicting or
    scaled tasks (the peers' error)."""
    torch = pytest.importorskip("torch")
    tjd = pytest.importorskip("torchjd.aggregation")
    linalg = pytest.importorskip("torchjd._linalg")
    try:
        projector = linalg.QuadprogProjector()
    except ImportError:
        projector = _scipy_projector(linalg.QuadprogProjector)
    pref_t = torch.tensor(PREF, dtype=torch.float64)
    peers = [tjd.UPGrad(projector=projector), tjd.DualProj(pref_t, projector=projector)]
    cases, J, d, _ = _options_run()
    moved = []
    for i, case in enumerate(cases):
        Jt = torch.as_tensor(J[i], dtype=torch.float64)
        for j, m in enumerate(METHODS):
            want = peers[j](Jt).numpy()
            p = None if m == "upgrad" else PREF
            d_star, s, s_abs = exact(m, J[i], p)
            floor = FLOOR * (np.sqrt(EPS["float32"]) * s + EPS["float32"] * s_abs)
            err = np.linalg.norm(d[i, j] - want)
            assert err <= 1e-3 * np.linalg.norm(want) + floor, (case, m, err)
            if case[0] != "tiny" and np.linalg.norm(d_star) > 0:
                moved.append(np.linalg.norm(want - d_star) / np.linalg.norm(d_star))
    assert max(moved) > 0.01  # the regularisation moves the update by more than 1% somewhere


def test_groups_and_pref_vector_match_the_exact_projection():
    """``groups=`` with a preference vector: each leaf's update is the exact projection (with
    those preferences) on that leaf's gradients. (DualProj's preference vector: against
    TorchJD's in :func:`test_peer_options_match_torchjd`; both methods build the same ``p``.)"""
    T = PEER_T
    tx = mtlopt.upgrad(PREF, groups="leaf")
    cases = [(k, s) for k in ("random", "conflicting", "scaled3", "zero") for s in range(2)]
    J = np.stack([problem(k, T, s) for k, s in cases])

    def one(J):
        grads = _grads(J)
        u, state = tx.update(grads, tx.init({k: v[0] for k, v in grads.items()}))
        return u["a"], u["b"], state.weights

    a, b, w = jax.jit(jax.vmap(one))(jnp.asarray(J, jnp.float32))
    assert w.shape == (len(cases), 2, T)
    for i, case in enumerate(cases):
        for got, part in ((a[i], J[i][:, :SPLIT]), (b[i], J[i][:, SPLIT:])):
            ok, rel, fl = judge(np.asarray(got, np.float64), exact("upgrad", part, PREF), "float32")
            assert ok, (case, rel, fl)


def test_constructor_errors():
    for make in (mtlopt.upgrad, mtlopt.dualproj):
        name = make.__name__
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: pref_vector must hold finite"):
            make([1.0, -1.0])
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: num_tasks=3 but pref_vector"):
            make([1.0, 1.0], num_tasks=3)
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: reg_eps must be a finite"):
            make(reg_eps=-1.0)
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: norm_eps must be a finite"):
            make(norm_eps=float("nan"))
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: tol must be a finite"):
            make(tol=0.0)
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: max_iters must be a positive"):
            make(max_iters=0)
