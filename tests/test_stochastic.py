"""SDMGrad and MoDo (mtlopt/_src/methods/stochastic.py) and the skeleton's cross-Gramian
(``build.Method.cross``).

The double-sample weights are checked against an independent float64 transcription of the
papers' updates (as the authors' code, LibMTL and TorchJD run them) over several steps with the
state carried, and against TorchJD 0.18's ``SDMGradWeighting`` / ``MoDoWeighting`` where torch is
installed. One jitted ``lax.scan`` over the steps, vmapped over the problems, per (method, T,
dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt
from mtlopt._src import build

STEPS = 4
P = 24


def project(v):
    """Euclidean projection onto the simplex (sort-based, float64)."""
    v = np.asarray(v, np.float64)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, len(v) + 1)
    r = np.nonzero(u - css / k > 0)[0][-1]
    return np.maximum(v - css[r] / (r + 1), 0.0)


def ref_sdmgrad(pairs, T, lamda=0.3, niter=20, lr=1.0, mu=0.5, masks=None):
    """Float64 SDMGrad (the authors' code without its 1e-8): weights per step."""
    w_state = np.full(T, 1.0 / T)
    out = []
    for i, (J1, J2) in enumerate(pairs):
        act = np.ones(T, bool) if masks is None else masks[i]
        A = (J1 @ J2.T)[np.ix_(act, act)]
        s = np.mean(np.sqrt(np.maximum(np.diag(A), 0.0)))
        An = A / (s * s) if s > 0 else 0.0 * A
        n = act.sum()
        pref = np.full(n, 1.0 / n)
        w = project(w_state[act])
        v = np.zeros(n)
        for _ in range(niter):
            v = mu * v + An @ (w + lamda * pref)
            w = project(w - lr * v)
        full = np.zeros(T)
        full[act] = (w + lamda * pref) / (1 + lamda)
        w_state[act] = w
        out.append(full)
    return np.array(out)


def ref_modo(pairs, T, gamma=1e-3, rho=0.1, masks=None):
    """Float64 MoDo: lambda_{k+1} per step."""
    lam = np.full(T, 1.0 / T)
    out = []
    for i, (J1, J2) in enumerate(pairs):
        act = np.ones(T, bool) if masks is None else masks[i]
        A = (J1 @ J2.T)[np.ix_(act, act)]
        la = project(lam[act])
        la = project(la - gamma * (A @ la + rho * la))
        lam[act] = la
        full = np.zeros(T)
        full[act] = la
        out.append(full)
    return np.array(out)


def problems(T, n=3, seed=0):
    """(n, STEPS, T, P) pairs of samples: two noisy draws around per-task means (random,
    conflicting, and 1000x-spread norms)."""
    r = np.random.default_rng(seed + T)
    J1, J2 = [], []
    for k in range(n):
        mean = r.standard_normal((T, P))
        if k == 1 and T > 1:
            mean[1] = -0.9 * mean[0] + 0.1 * mean[1]
        if k == 2:
            mean *= np.logspace(-1.5, 1.5, T)[:, None]
        size = 0.3 * np.abs(mean).mean(axis=1, keepdims=True)
        J1.append(mean + size * r.standard_normal((STEPS, T, P)))
        J2.append(mean + size * r.standard_normal((STEPS, T, P)))
    return np.array(J1), np.array(J2)


def pairs(a, b):
    return list(zip(np.asarray(a, np.float64), np.asarray(b, np.float64), strict=True))


def run(tx, J1, J2, masks=None, second=True):
    """Weights and updates per step, from init, state carried (one compiled program)."""

    def steps(a, b, m):
        def step(state, x):
            ja, jb, mk = x
            extra = {"second_sample": {"p": jb}} if second else {}
            u, state = tx.update({"p": ja}, state, task_mask=mk, **extra)
            return state, (mtlopt.task_weights(state), u["p"])

        state = tx.init({"p": jnp.zeros(a.shape[-1], a.dtype)})
        return jax.lax.scan(step, state, (a, b, m))

    if masks is None:
        masks = np.ones(J1.shape[:-1], bool)
    return jax.jit(jax.vmap(steps))(J1, J2, masks)


def stable(ref, a, b, want):
    """The problems whose float64 answer moves by less than 1e-6 when the inputs move by 1e-7
    (relative): rounding is amplified at most ~10x there (all of them at SDMGrad's default
    step). At the peers' step (lr=10 on A / s^2) the inner loop bounces between faces of the
    simplex: on one T = 10 problem a 1e-7 change moved the weights by 0.77 within four steps,
    and two float64 runs that differ only in the order of their sums differed by 4e-8."""
    r = np.random.default_rng(0)
    keep = []
    for k in range(len(a)):
        moved = a[k] * (1 + 1e-7 * r.standard_normal(a[k].shape))
        keep.append(np.abs(ref(pairs(moved, b[k])) - want[k]).max() < 1e-6)
    assert sum(keep) >= 1
    return np.array(keep)


def check(got_w, got_u, want_w, J1, rtol, atol):
    np.testing.assert_allclose(got_w, want_w, rtol=rtol, atol=atol)
    want_u = np.einsum("nst,nstp->nsp", want_w, J1)
    scale = np.einsum("nst,nstp->nsp", np.abs(want_w), np.abs(J1))
    assert np.all(np.abs(got_u - want_u) <= rtol * scale + atol * np.abs(J1).max())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("T", [3, 10])
def test_double_sample_matches_float64_transcription(T, dtype):
    """Four steps, the state carried: the weights and updates of the paper's update on the
    cross-Gramian J1 J2^T, for both methods."""
    J1, J2 = problems(T)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == "float32" else dict(rtol=1e-9, atol=1e-11)
    with jax.enable_x64(dtype == "float64"):
        a, b = J1.astype(dtype), J2.astype(dtype)
        for tx, ref in (
            (mtlopt.sdmgrad(num_tasks=T), lambda p: ref_sdmgrad(p, T)),
            (mtlopt.modo(gamma=0.02, rho=0.1, num_tasks=T), lambda p: ref_modo(p, T, 0.02)),
        ):
            _, (w, u) = run(tx, a, b)
            want = np.array([ref(pairs(x, y)) for x, y in zip(a, b, strict=True)])
            check(np.asarray(w), np.asarray(u), want, a.astype(np.float64), **tol)


def test_against_torchjd():
    """TorchJD 0.18's weightings fed A = J1 J2^T over the same four steps (its 1e-8 in SDMGrad's
    normalisation is negligible at these scales), on the stable problems."""
    pytest.importorskip("torchjd")
    import torch
    from torchjd.aggregation import MoDoWeighting, SDMGradWeighting

    T = 5
    J1, J2 = problems(T)
    cases = (
        (mtlopt.sdmgrad(num_tasks=T), SDMGradWeighting, {"lr": 1.0}, lambda p: ref_sdmgrad(p, T)),
        (  # the peers' step: compared on the problems where its answer is stable
            mtlopt.sdmgrad(lr=10.0, num_tasks=T),
            SDMGradWeighting,
            {},
            lambda p: ref_sdmgrad(p, T, lr=10.0),
        ),
        (
            mtlopt.sdmgrad(0.5, 10, lr=1.0, momentum=0.2, num_tasks=T),
            SDMGradWeighting,
            {"lambda_": 0.5, "n_iter": 10, "lr": 1.0, "momentum": 0.2},
            lambda p: ref_sdmgrad(p, T, 0.5, 10, 1.0, 0.2),
        ),
        (
            mtlopt.modo(gamma=0.05, rho=0.1, num_tasks=T),
            MoDoWeighting,
            {"gamma": 0.05, "rho": 0.1},
            lambda p: ref_modo(p, T, 0.05),
        ),
    )
    with jax.enable_x64(True):
        for tx, peer, kw, ref in cases:
            _, (w, _) = run(tx, J1, J2)
            want = np.array([ref(pairs(x, y)) for x, y in zip(J1, J2, strict=True)])
            for k in np.nonzero(stable(ref, J1, J2, want))[0]:
                wt = peer(**kw)
                got = [wt(torch.from_numpy(J1[k, s] @ J2[k, s].T)).numpy() for s in range(STEPS)]
                np.testing.assert_allclose(np.asarray(w)[k], got, rtol=1e-7, atol=1e-9)


def _masked_run(tx, T):
    def steps(a, b, h, m, second):
        def step(state, x):
            ja, jb, jh, mk = x
            nan = jnp.where(mk[:, None], 0.0, jnp.nan)
            g = {"p": ja + nan, "h": jh + nan[:, :, None]}
            extra = {"second_sample": {"p": jb + nan, "h": jh * np.nan}} if second else {}
            u, state = tx.update(g, state, task_mask=mk, **extra)
            return state, (mtlopt.task_weights(state), u, state)

        state = tx.init({"p": jnp.zeros(P), "h": jnp.zeros((T, 3))})
        return jax.lax.scan(step, state, (a, b, h, m))[1]

    return jax.jit(steps, static_argnums=4)


def test_single_sample_is_the_gramian_and_heads_masks():
    """Without second_sample, A = J J^T (the biased fallback) and so the same as passing the
    first sample twice; with heads (not in A) and a task mask (NaN rows of masked tasks in both
    samples): the transcription on the active tasks and the shared leaf, each head its own
    task's gradient, masked state entries kept."""
    T = 4
    J1, J2 = problems(T, n=1, seed=3)
    J1, J2 = J1[0].astype(np.float32), J2[0].astype(np.float32)
    masks = np.ones((STEPS, T), bool)
    masks[1, 2] = masks[2, 0] = masks[2, 3] = False
    H = np.random.default_rng(1).standard_normal((STEPS, T, T, 3)).astype(np.float32)
    spec = {"p": False, "h": True}
    cases = (
        (
            mtlopt.sdmgrad(num_tasks=T, task_specific=spec),
            lambda p: ref_sdmgrad(p, T, masks=masks),
            "inner",
        ),
        (
            mtlopt.modo(0.02, num_tasks=T, task_specific=spec),
            lambda p: ref_modo(p, T, 0.02, masks=masks),
            "lam",
        ),
    )
    for tx, ref, field in cases:
        run2 = _masked_run(tx, T)
        w, u, states = run2(J1, J2, H, masks, True)
        np.testing.assert_allclose(np.asarray(w), ref(pairs(J1, J2)), rtol=2e-4, atol=2e-5)
        head_w = np.asarray(masks, np.float32)
        np.testing.assert_allclose(u["h"], np.einsum("st,stkc->skc", head_w, H), rtol=1e-5)
        kept = np.asarray(getattr(states, field))
        assert kept[1, 2] == kept[0, 2] and kept[2, 0] == kept[1, 0]
        # The fallback: no second sample is the Gramian (the first sample passed twice).
        w1, _, _ = run2(J1, J1, H, masks, True)
        w0, _, _ = run2(J1, J1, H, masks, False)
        np.testing.assert_allclose(np.asarray(w0), np.asarray(w1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(w0), ref(pairs(J1, J1)), rtol=2e-4, atol=2e-5)


def test_scales_and_bad_second_sample():
    """Both samples times 1e30 or 1e-30 (the cross-Gramian pre-scaled): SDMGrad and normalised
    MoDo give the weights of scale 1; MoDo's raw rule gives its limits (all weight on the
    smallest (A lambda)_t for huge grads; only the rho term for tiny ones). A NaN in an active
    row of the second sample skips the step (state kept); a wrong structure is an error."""
    T = 3
    J1, J2 = problems(T, n=1, seed=5)
    a, b = J1[0, 0].astype(np.float32), J2[0, 0].astype(np.float32)
    scales = np.array([1.0, 1e30, 1e-30, 1.0], np.float32)
    bad = np.zeros((4, 1, 1), np.float32)
    bad[3] = np.nan
    for tx, same in (
        (mtlopt.sdmgrad(num_tasks=T), True),
        (mtlopt.modo(normalize=True, num_tasks=T), True),
        (mtlopt.modo(num_tasks=T), False),
    ):
        state0 = tx.init({"p": jnp.zeros(P)})

        def one(s, nan, tx=tx, state0=state0):
            u, st = tx.update({"p": a * s}, state0, second_sample={"p": b * s + nan})
            return mtlopt.task_weights(st), u["p"], st

        w, u, st = jax.jit(jax.vmap(one))(scales, bad)
        w = np.asarray(w)
        assert np.all(np.isfinite(w[:3])) and np.all(np.isfinite(np.asarray(u)))
        np.testing.assert_array_equal(np.asarray(st.skipped), [0, 0, 0, 1])
        np.testing.assert_array_equal(np.asarray(u)[3], 0.0)
        if same:
            np.testing.assert_allclose(w[1:3], w[[0, 0]], rtol=1e-5, atol=1e-6)
        else:
            A = a.astype(float) @ b.astype(float).T
            vertex = np.eye(T)[np.argmin(A @ np.full(T, 1.0 / T))]
            np.testing.assert_allclose(w[1], vertex, atol=1e-6)
            np.testing.assert_allclose(w[2], project(np.full(T, 1 / T) * (1 - 1e-4)), atol=1e-6)
    with pytest.raises(ValueError, match="sdmgrad: second_sample must have the structure"):
        tx = mtlopt.sdmgrad(num_tasks=T)
        tx.update({"p": a}, tx.init(None), second_sample={"q": b})


def test_constructor_errors_and_cross_field():
    with pytest.raises(ValueError, match="sdmgrad: num_tasks is required"):
        mtlopt.sdmgrad()
    with pytest.raises(ValueError, match="modo: num_tasks is required"):
        mtlopt.modo()
    with pytest.raises(ValueError, match="momentum"):
        mtlopt.sdmgrad(momentum=1.0, num_tasks=2)
    with pytest.raises(ValueError, match="niter"):
        mtlopt.sdmgrad(niter=0, num_tasks=2)
    with pytest.raises(ValueError, match="gamma"):
        mtlopt.modo(gamma=0.0, num_tasks=2)
    state_cls = mtlopt.SDMGradState
    fn = lambda ctx: (jnp.ones(ctx.T), {})
    with pytest.raises(ValueError, match="must name an optional task_grads signal"):
        build.aggregator(build.Method("x", state_cls, fn, cross="nope"), num_tasks=2)


def test_groups_and_half_batch_recipe():
    """groups="leaf": one cross-Gramian and one inner loop per leaf (each leaf's transcription).
    The module's recipe (two half-batches in one vmap of task_value_and_grad) gives the two
    samples of a linear model's per-task squared errors."""
    T = 3
    J1, J2 = problems(T, n=1, seed=7)
    a, b = J1[0, :2].astype(np.float32), J2[0, :2].astype(np.float32)
    tx = mtlopt.sdmgrad(num_tasks=T, groups="leaf")
    half = P // 2
    split = lambda x: {"x": x[:, :half], "y": x[:, half:]}
    state = tx.init({"x": jnp.zeros(half), "y": jnp.zeros(P - half)})
    step = jax.jit(lambda g, s, st: tx.update(g, st, second_sample=s))
    for k in range(2):
        u, state = step(split(a[k]), split(b[k]), state)
    for leaf, cols in (("x", slice(0, half)), ("y", slice(half, P))):
        want = ref_sdmgrad(pairs(a[:, :, cols], b[:, :, cols]), T)[-1]
        np.testing.assert_allclose(u[leaf], want @ a[1, :, cols], rtol=2e-4, atol=1e-5)

    # The recipe of the module notes (plain JAX): 2T half-batch losses from one forward pass.
    r = np.random.default_rng(0)
    X, Y = r.standard_normal((8, 4)), r.standard_normal((8, T))
    params = {"W": jnp.asarray(r.standard_normal((4, T)), jnp.float32)}
    x, y = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32)

    def half_losses(p, x, y):
        per_example = (x @ p["W"] - y) ** 2  # (B, T)
        return per_example.reshape(2, -1, T).mean(axis=1).reshape(2 * T)

    tx = mtlopt.modo(gamma=0.1, num_tasks=T)

    @jax.jit
    def recipe(params, x, y):
        _, J = mtlopt.task_value_and_grad(half_losses)(params, x, y)
        first = jax.tree.map(lambda g: g[:T], J)
        second = jax.tree.map(lambda g: g[T:], J)
        return tx.update(first, tx.init(params), params, second_sample=second)[1]

    st = recipe(params, x, y)
    loss = lambda p, x, y: jnp.mean((x @ p["W"] - y) ** 2, axis=0)
    by_half = jax.jit(lambda p, x, y: jax.jacrev(loss)(p, x, y))
    g = [by_half(params, x[h * 4 : h * 4 + 4], y[h * 4 : h * 4 + 4]) for h in (0, 1)]
    j1, j2 = (np.moveaxis(np.asarray(x["W"], float), -1, 0).reshape(T, -1) for x in g)
    want = ref_modo([(j1, j2)], T, 0.1)[0]
    np.testing.assert_allclose(mtlopt.task_weights(st), want, rtol=1e-5, atol=1e-6)


def test_cross_gramian_large_leaves_and_dtypes():
    """The cross-Gramian's CPU loop (a leaf past tree._SMALL_LEAF columns, with a remainder),
    pre-scaled (1e30) and a bfloat16 second sample beside a float32 first: the weights of the
    float64 transcription on the same (rounded) values."""
    T, C = 3, 40_001
    r = np.random.default_rng(11)
    a = r.standard_normal((T, C)).astype(np.float32)
    b = (a + 0.5 * r.standard_normal((T, C))).astype(np.float32)
    b16 = jnp.asarray(b, jnp.bfloat16)
    tx = mtlopt.modo(gamma=0.05, rho=0.0, normalize=True, num_tasks=T)
    state = tx.init({"p": jnp.zeros(C)})

    def one(s):
        _, st = tx.update({"p": a * s}, state, second_sample={"p": b * s})
        _, st16 = tx.update({"p": a}, state, second_sample={"p": b16})
        return mtlopt.task_weights(st), mtlopt.task_weights(st16)

    w, w16 = jax.jit(jax.vmap(one))(np.array([1.0, 1e30], np.float32))
    for got, second in ((w[0], b), (w[1], b), (w16[0], np.asarray(b16, np.float32))):
        A = a.astype(np.float64) @ second.astype(np.float64).T
        s = np.mean(np.sqrt(np.diag(A)))
        lam = np.full(T, 1.0 / T)
        np.testing.assert_allclose(got, project(lam - 0.05 * (A / s**2) @ lam), atol=1e-6)


def test_after_log_transform():
    """Behind a task transform (log_transform's 1 / l_t scales, folded in lazily), the scales
    apply to both samples' rows: A = S J1 J2^T S, and the update combines S J1."""
    T = 3
    J1, J2 = problems(T, n=1, seed=9)
    a, b = J1[0, 0].astype(np.float32), J2[0, 0].astype(np.float32)
    losses = np.array([0.5, 2.0, 8.0], np.float32)
    tx = optax.chain(mtlopt.log_transform(eps=0.0), mtlopt.modo(gamma=0.05, num_tasks=T))
    state = tx.init({"p": jnp.zeros(P)})
    u, state = jax.jit(tx.update)({"p": a}, state, task_losses=losses, second_sample={"p": b})
    S = 1.0 / losses.astype(np.float64)
    A = (S[:, None] * a) @ (S[:, None] * b).T
    lam = np.full(T, 1.0 / T)
    want = project(lam - 0.05 * (A @ lam + 0.1 * lam))
    np.testing.assert_allclose(state[1].lam, want, atol=1e-6)
    np.testing.assert_allclose(u["p"], (want * S) @ a, rtol=1e-5, atol=1e-6)
