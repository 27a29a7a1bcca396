"""Per-method tests: closed forms, independent references (scipy, numpy), frozen numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import mtlopt
from mtlopt._src import native
from mtlopt._src.methods.projection import pcgrad_weights


def _update(tx, G, **extra):
    """One update on a single-leaf task-grads matrix G (T, P); returns (update, state)."""
    G = jnp.asarray(G, jnp.float32)
    state = tx.init(jnp.zeros(G.shape[1]))
    return jax.jit(tx.update)(G, state, **extra)


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- mean, linear


def test_mean_and_linear_closed_form():
    J = _rng().normal(size=(4, 7)).astype(np.float32)
    u, _ = _update(mtlopt.mean(), J)
    np.testing.assert_allclose(u, J.mean(0), rtol=1e-6, atol=1e-6)
    w = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    u, s = _update(mtlopt.linear(w), J)
    np.testing.assert_allclose(u, w @ J, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mtlopt.task_weights(s), w)


def test_linear_rejects_bad_weights():
    with pytest.raises(ValueError, match=r"mtlopt\.linear: weights must be"):
        mtlopt.linear([])
    with pytest.raises(ValueError, match=r"mtlopt\.linear: num_tasks=3 but 2 weights"):
        mtlopt.linear([1.0, 2.0], num_tasks=3)


# ---------------------------------------------------------------- MGDA


def _mgda_two(g1, g2):
    """Closed form of the min-norm point of the segment [g1, g2]."""
    diff = g1 - g2
    a = np.clip(((g2 - g1) @ g2) / (diff @ diff), 0.0, 1.0)
    return a * g1 + (1 - a) * g2, np.array([a, 1 - a])


@pytest.mark.parametrize("seed", range(5))
def test_mgda_two_tasks_closed_form(seed):
    J = _rng(seed).normal(size=(2, 9))
    ref, w = _mgda_two(J[0], J[1])
    u, s = _update(mtlopt.mgda(num_tasks=2), J)
    np.testing.assert_allclose(u, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mtlopt.task_weights(s), w, atol=1e-4)


def test_mgda_opposite_tasks_give_zero():
    g = _rng(1).normal(size=9)
    u, _ = _update(mtlopt.mgda(), np.stack([g, -g]))
    np.testing.assert_allclose(u, 0.0, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_mgda_is_non_conflicting(seed):
    J = _rng(seed).normal(size=(5, 30)).astype(np.float32)
    u, _ = _update(mtlopt.mgda(), J)
    u = np.asarray(u, np.float64)
    # Optimality of the min-norm point d: <g_t, d> >= ||d||^2 for every t.
    assert np.all(J @ u >= u @ u - 1e-4 * np.trace(J @ J.T) / 5)


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgda_normalizations_match_scipy(normalization):
    rng = _rng(3)
    J = rng.normal(size=(4, 12)) * np.array([[0.1], [1.0], [3.0], [10.0]])
    losses = rng.uniform(0.5, 3.0, 4)
    norms = np.linalg.norm(J, axis=1)
    n = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    D = J / n[:, None]
    GD = D @ D.T
    res = scipy.optimize.minimize(
        lambda w: w @ GD @ w,
        np.ones(4) / 4,
        jac=lambda w: 2 * GD @ w,
        method="SLSQP",
        bounds=[(0, 1)] * 4,
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    u, s = _update(
        mtlopt.mgda(normalization, num_tasks=4), J, task_losses=jnp.asarray(losses, jnp.float32)
    )
    ref = res.x @ D
    np.testing.assert_allclose(u, ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())
    np.testing.assert_allclose(mtlopt.task_weights(s), res.x / n, rtol=2e-3, atol=1e-4)


def test_mgda_rejects_unknown_normalization():
    with pytest.raises(ValueError, match=r"mtlopt\.mgda: normalization must be one of"):
        mtlopt.mgda("l1")


# ---------------------------------------------------------------- CAGrad


def _cagrad_primal(J, c, b=None):
    """Independent reference: the primal max_d min_t <g_t, d> s.t. ||d - g0|| <= c ||g0||."""
    T, P = J.shape
    b = np.full(T, 1.0 / T) if b is None else b
    g0 = b @ J
    r = c * np.linalg.norm(g0)
    # Variables (d, s); maximise s subject to <g_t, d> >= s and the ball.
    cons = [{"type": "ineq", "fun": lambda x, t=t: J[t] @ x[:P] - x[P]} for t in range(T)]
    cons.append({"type": "ineq", "fun": lambda x: r * r - np.sum((x[:P] - g0) ** 2)})
    x0 = np.concatenate([g0, [np.min(J @ g0)]])
    res = scipy.optimize.minimize(
        lambda x: -x[P],
        x0,
        method="SLSQP",
        constraints=cons,
        options={"ftol": 1e-14, "maxiter": 2000},
    )
    return res.x[:P]


def test_cagrad_matches_primal_solve():
    # Twelve problems (4 seeds x 3 values of c) in one vmapped program, c traced.
    cases = [(seed, c) for seed in range(4) for c in (0.2, 0.5, 0.9)]
    Js = []
    for seed, _ in cases:
        J = _rng(seed).normal(size=(3, 6))
        J[1] = -0.8 * J[0] + 0.4 * J[1]
        Js.append(J)

    def one(J, c):
        tx = mtlopt.cagrad(c=c, rescale=0, num_tasks=3)
        u, s = tx.update(J, tx.init(J[0]))
        return u, s.solver.converged

    us, converged = jax.jit(jax.vmap(one))(
        jnp.asarray(np.stack(Js), jnp.float32), jnp.asarray([c for _, c in cases], jnp.float32)
    )
    for i, (J, (seed, c)) in enumerate(zip(Js, cases, strict=True)):
        d_ref = _cagrad_primal(J, c)
        u = np.asarray(us[i])
        err = f"seed {seed}, c {c}"
        np.testing.assert_allclose(
            u, d_ref, rtol=2e-3, atol=2e-3 * np.linalg.norm(d_ref), err_msg=err
        )
        # The worst task's improvement matches the primal optimum's.
        assert np.min(J @ u) == pytest.approx(np.min(J @ d_ref), rel=1e-3, abs=1e-5), err
        assert bool(converged[i]), err


def test_cagrad_rescale_and_ball():
    J = jnp.asarray(_rng(5).normal(size=(4, 8)), jnp.float32)
    c = 0.5

    @jax.jit  # the three rescalings in one program
    def all_rescales(J):
        out = []
        for rescale in (0, 1, 2):
            tx = mtlopt.cagrad(c=c, rescale=rescale)
            out.append(tx.update(J, tx.init(J[0]))[0])
        return out

    u0, u1, u2 = (np.asarray(u) for u in all_rescales(J))
    for u, div in ((u0, 1.0), (u1, 1.25), (u2, 1.5)):
        np.testing.assert_allclose(u * div, u0, rtol=1e-5, atol=1e-6)
    g0 = np.asarray(J).mean(0)
    # The correction term has norm exactly c ||g0|| away from stationarity.
    assert np.linalg.norm(u0 - g0) == pytest.approx(c * np.linalg.norm(g0), rel=1e-4)


def test_cagrad_c0_is_the_mean():
    J = _rng(6).normal(size=(3, 5))
    u, _ = _update(mtlopt.cagrad(c=0.0), J)
    np.testing.assert_allclose(u, J.mean(0), rtol=1e-5, atol=1e-6)


def test_cagrad_two_tasks_closed_form():
    # Two tasks: the dual is one-dimensional, w = (p, 1 - p); solve it on a fine grid.
    J = _rng(7).normal(size=(2, 5))
    c = 0.6
    G = J @ J.T
    b = np.array([0.5, 0.5])
    rho = c * np.sqrt(b @ G @ b)
    p = np.linspace(0, 1, 200001)
    W = np.stack([p, 1 - p], 1)
    F = W @ G @ b + rho * np.sqrt(np.einsum("ij,jk,ik->i", W, G, W))
    w = W[np.argmin(F)]
    gw = w @ J
    d = J.mean(0) + rho / np.linalg.norm(gw) * gw
    u, _ = _update(mtlopt.cagrad(c=c, rescale=0), J)
    np.testing.assert_allclose(u, d, rtol=1e-3, atol=1e-4)


def test_cagrad_pareto_stationary_falls_back_to_rescaled_mean():
    g = _rng(8).normal(size=6)
    J = np.stack([g, -g, 0.5 * g - 0.5 * g])  # 0 in the hull: stationary
    J[2] = 0.0
    u, s = _update(mtlopt.cagrad(c=0.4, rescale=1, num_tasks=3), J)
    np.testing.assert_allclose(u, J.mean(0) / 1.16, atol=1e-6)
    assert np.all(np.isfinite(mtlopt.task_weights(s)))


def test_cagrad_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"mtlopt\.cagrad: c must be a finite number >= 0"):
        mtlopt.cagrad(c=-1.0)
    with pytest.raises(ValueError, match=r"mtlopt\.cagrad: rescale must be one of"):
        mtlopt.cagrad(rescale=3)
    with pytest.raises(ValueError, match=r"mtlopt\.cagrad: g0_weights"):
        mtlopt.cagrad(g0_weights=[0.5, -0.5])


def test_cagrad_warm_start_cuts_iterations():
    # The next step's problem solved from the last step's answer vs from scratch, summed over
    # several problems (one problem alone can go either way by a step).
    tx = mtlopt.cagrad(num_tasks=10)
    update = jax.jit(tx.update)
    warm = cold = 0
    for seed in range(8):
        rng = _rng(seed)
        J = rng.normal(size=(10, 40)).astype(np.float32)
        J2 = jnp.asarray(J + 0.01 * rng.normal(size=J.shape).astype(np.float32))
        _, state = update(jnp.asarray(J), tx.init(jnp.zeros(40)))
        warm += int(update(J2, state)[1].solver.num_steps)
        cold += int(update(J2, tx.init(jnp.zeros(40)))[1].solver.num_steps)
    assert warm < cold


# ---------------------------------------------------------------- CAGrad-Fast


@pytest.mark.parametrize("T,n", [(5, 1), (5, 2), (5, 5), (8, 3)])
def test_cagrad_fast_groups_cover_every_task_once(T, n):
    for seed in range(5):
        M = np.asarray(mtlopt.cagrad_fast_groups(jax.random.key(seed), T, n))
        assert M.shape == (n, T)
        assert np.all((M > 0).sum(axis=0) == 1)  # every task in exactly one group
        np.testing.assert_allclose(M.sum(axis=1), 1.0, rtol=1e-6)  # each group averages
        b = mtlopt.cagrad_fast_weights(T, n)
        # b^T M is the mean over all T tasks: the grouped g0 is the true g0.
        np.testing.assert_allclose(b @ M, np.full(T, 1.0 / T), rtol=1e-6)


def test_cagrad_fast_end_to_end_keeps_g0():
    T, n = 6, 3
    J = _rng(11).normal(size=(T, 10))
    M = np.asarray(mtlopt.cagrad_fast_groups(jax.random.key(1), T, n))
    grouped = M @ J  # the gradients of the grouped losses
    u, _ = _update(mtlopt.cagrad(c=0.0, g0_weights=mtlopt.cagrad_fast_weights(T, n)), grouped)
    np.testing.assert_allclose(u, J.mean(0), rtol=1e-5, atol=1e-6)
    u, _ = _update(mtlopt.cagrad(c=0.4, g0_weights=mtlopt.cagrad_fast_weights(T, n)), grouped)
    assert np.all(np.isfinite(u))


def test_cagrad_fast_rejects_too_many_groups():
    with pytest.raises(ValueError, match=r"n must be at most num_tasks=3"):
        mtlopt.cagrad_fast_groups(jax.random.key(0), 3, 4)


# ---------------------------------------------------------------- PCGrad


def _pcgrad_numpy(J, orders):
    out = []
    for i in range(len(J)):
        g = J[i].copy()
        for j in orders[i]:
            if j == i:
                continue
            dot = g @ J[j]
            if dot < 0:
                g = g - dot / (J[j] @ J[j]) * J[j]
        out.append(g)
    return np.sum(out, axis=0)


def test_pcgrad_two_tasks_closed_form():
    g1 = np.array([1.0, 0.0, 0.0])
    g2 = np.array([-1.0, 1.0, 0.0])
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    u, _ = _update(mtlopt.pcgrad(), np.stack([g1, g2]))
    np.testing.assert_allclose(u, p1 + p2, rtol=1e-5, atol=1e-6)


def test_pcgrad_orthogonal_is_the_sum():
    J = np.eye(3, 5)
    u, _ = _update(mtlopt.pcgrad(), J)
    np.testing.assert_allclose(u, J.sum(0), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_gramian_space_matches_explicit_projections(seed):
    rng = _rng(seed)
    T = 5
    J = rng.normal(size=(T, 8))
    J[1] = -J[0] + 0.1 * J[1]
    orders = np.stack([rng.permutation(T) for _ in range(T)])
    w = pcgrad_weights(jnp.asarray(J @ J.T, jnp.float32), jnp.asarray(orders), jnp.ones(T, bool))
    np.testing.assert_allclose(np.asarray(w) @ J, _pcgrad_numpy(J, orders), rtol=1e-4, atol=1e-5)


def test_pcgrad_seeds_differ_and_repeat():
    J = _rng(12).normal(size=(4, 6))
    J[1] = -J[0] + 0.2 * J[1]
    J[2] = -J[3] + 0.2 * J[2]
    a = [np.asarray(_update(mtlopt.pcgrad(seed=s), J)[0]) for s in range(6)]
    again = np.asarray(_update(mtlopt.pcgrad(seed=0), J)[0])
    np.testing.assert_array_equal(a[0], again)
    assert any(not np.allclose(a[0], x) for x in a[1:])


def test_pcgrad_vmap_over_keys():
    J = jnp.asarray(_rng(13).normal(size=(4, 6)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3)

    def run(key):
        tx = mtlopt.pcgrad(seed=key)
        return tx.update(J, tx.init(jnp.zeros(6)))[0]

    out = jax.jit(jax.vmap(run))(keys)
    one = jax.jit(run)
    for i in range(3):
        np.testing.assert_allclose(out[i], one(keys[i]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DB-MTL and log_transform


def test_log_transform_divides_by_losses():
    J = _rng(14).normal(size=(3, 4)).astype(np.float32)
    losses = np.array([0.5, 2.0, 4.0], np.float32)
    tx = mtlopt.log_transform(eps=1e-8)
    out, _ = tx.update(jnp.asarray(J), tx.init(None), task_losses=jnp.asarray(losses))
    assert isinstance(out, mtlopt.TaskScaled)  # lazy: the aggregator after it folds the scales
    np.testing.assert_allclose(out.materialize(), J / (losses[:, None] + 1e-8), rtol=1e-6)
    # A loss of 0: the scale 1 / eps. Below 0 (out of the log's domain): a bad step, marked.
    out, s = tx.update(jnp.asarray(J), tx.init(None), task_losses=jnp.array([2.0, 0.0, 1.0]))
    np.testing.assert_allclose(out.scales, [0.5, 1e8, 1.0], rtol=1e-6)
    out, s = tx.update(jnp.asarray(J), tx.init(None), task_losses=jnp.array([-1.0, 0.0, 1.0]))
    assert not bool(out.ok) and int(s.skipped) == 1
    np.testing.assert_array_equal(out.materialize(), 0.0)


def test_log_transform_chains_in_front_of_any_method():
    J = _rng(15).normal(size=(3, 4)).astype(np.float32)
    losses = jnp.array([0.5, 2.0, 4.0])
    import optax

    tx = optax.chain(mtlopt.log_transform(), mtlopt.cagrad())
    state = tx.init(jnp.zeros(4))
    with jax.numpy_dtype_promotion("standard"):
        u, _ = jax.jit(tx.update)(jnp.asarray(J), state, task_losses=losses)
    ref, _ = _update(mtlopt.cagrad(), J / (np.asarray(losses)[:, None] + 1e-8))
    np.testing.assert_allclose(u, ref, rtol=1e-4, atol=1e-5)


def test_db_mtl_matches_numpy_recurrence():
    rng = _rng(16)
    T, P = 3, 7
    beta, sigma, eps = 0.8, 0.5, 1e-8
    tx = mtlopt.db_mtl(T, beta=beta, beta_sigma=sigma, eps=eps)
    state = tx.init(jnp.zeros(P))
    ema = np.zeros((T, P))
    update = jax.jit(tx.update)
    for k in range(1, 5):
        J = rng.normal(size=(T, P)) * np.array([[0.1], [1.0], [10.0]])
        losses = rng.uniform(0.1, 5.0, T)
        u, state = update(
            jnp.asarray(J, jnp.float32), state, task_losses=jnp.asarray(losses, jnp.float32)
        )
        g = J / (losses[:, None] + eps)
        bk = beta / k**sigma
        ema = g + bk * (ema - g)
        norms = np.linalg.norm(ema, axis=1)
        ref = norms.max() * (ema / norms[:, None]).sum(0)
        np.testing.assert_allclose(u, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
        np.testing.assert_allclose(mtlopt.task_weights(state), norms.max() / norms, rtol=1e-4)
        # Every scaled EMA gradient has the largest norm.
        scaled = np.asarray(mtlopt.task_weights(state))[:, None] * ema
        np.testing.assert_allclose(np.linalg.norm(scaled, axis=1), norms.max(), rtol=1e-4)


def test_db_mtl_first_update_has_one_minus_beta_scale():
    J = _rng(17).normal(size=(1, 5)).astype(np.float32)
    u, _ = _update(mtlopt.db_mtl(1, beta=0.9), J, task_losses=jnp.array([1.0]))
    np.testing.assert_allclose(u, 0.1 * J[0], rtol=1e-5)


# ---------------------------------------------------------------- task-specific leaves


@pytest.mark.parametrize(
    "ctor,kwargs,head_scale",
    [
        (mtlopt.cagrad, {"num_tasks": 2}, lambda losses: np.ones(2)),
        (mtlopt.mgda, {"num_tasks": 2}, lambda losses: np.ones(2)),
        (mtlopt.pcgrad, {"num_tasks": 2}, lambda losses: np.ones(2)),
        # Loss weightings: heads get the trunk's loss weights (the gradient of sum_t w_t l_t).
        (mtlopt.mean, {"num_tasks": 2}, lambda losses: np.full(2, 0.5)),
        (mtlopt.linear, {"weights": [0.3, 2.0]}, lambda losses: np.array([0.3, 2.0])),
        # DB-MTL: heads follow the gradient of their log loss.
        (mtlopt.db_mtl, {"num_tasks": 2, "beta": 0.0}, lambda losses: 1.0 / (losses + 1e-8)),
    ],
    ids=["cagrad", "mgda", "pcgrad", "mean", "linear", "db_mtl"],
)
def test_task_specific_leaves(ctor, kwargs, head_scale):
    rng = _rng(18)
    trunk = rng.normal(size=(2, 6)).astype(np.float32)
    trunk[1] = -0.5 * trunk[0] + trunk[1]
    head_a = np.stack([rng.normal(size=3), np.zeros(3)]).astype(np.float32)
    head_b = np.stack([np.zeros(3), rng.normal(size=3)]).astype(np.float32)
    grads = {
        "trunk": jnp.asarray(trunk),
        "head_a": jnp.asarray(head_a),
        "head_b": jnp.asarray(head_b),
    }
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), grads)
    mask = {"trunk": False, "head_a": True, "head_b": True}
    losses = jnp.array([2.0, 0.5])
    full = ctor(**kwargs)
    with_heads = ctor(**kwargs, task_specific=mask)
    u, _ = jax.jit(with_heads.update)(grads, with_heads.init(params), task_losses=losses)
    # Shared part: as if only the trunk existed.
    ref, _ = jax.jit(full.update)(
        {"trunk": grads["trunk"]}, full.init({"trunk": params["trunk"]}), task_losses=losses
    )
    np.testing.assert_allclose(u["trunk"], ref["trunk"], rtol=1e-5, atol=1e-6)
    # Heads: their own task's gradient, times the method's head scale.
    scale = head_scale(np.asarray(losses))
    np.testing.assert_allclose(u["head_a"], head_a[0] * scale[0], rtol=1e-5)
    np.testing.assert_allclose(u["head_b"], head_b[1] * scale[1], rtol=1e-5)


def test_task_specific_callable_and_bad_structure():
    grads = {"trunk": jnp.ones((2, 3)), "head": jnp.ones((2, 2))}
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), grads)
    tx = mtlopt.mean(task_specific=lambda tree: {"trunk": False, "head": True})
    u, _ = tx.update(grads, tx.init(params))
    np.testing.assert_allclose(u["head"], 1.0)  # each task's head row, times its weight 1/2
    np.testing.assert_allclose(u["trunk"], 1.0)
    tx = mtlopt.mean(task_specific={"trunk": False})
    with pytest.raises(ValueError, match=r"mtlopt\.mean: task_specific must be a pytree"):
        tx.init(params)


# ---------------------------------------------------------------- helpers


def test_task_value_and_grad_matches_jacrev():
    def losses(p, x):
        return jnp.stack([jnp.sum(jnp.sin(p["w"] * x)), jnp.sum(p["w"] ** 2) + p["b"]])

    p = {"w": jnp.array([0.3, -1.2, 2.0]), "b": jnp.array(0.5)}
    x = jnp.array([1.0, 2.0, 3.0])
    l, g = mtlopt.task_value_and_grad(losses)(p, x)
    np.testing.assert_allclose(l, losses(p, x))
    jac = jax.jacrev(losses)(p, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g, jac)

    def with_aux(p, x):
        return losses(p, x), {"n": 3}

    (_l2, aux), _g2 = mtlopt.task_value_and_grad(with_aux, has_aux=True)(p, x)
    assert aux == {"n": 3}
    (_gp, gx) = mtlopt.task_value_and_grad(losses, argnums=(0, 1))(p, x)[1]
    np.testing.assert_allclose(gx, jax.jacrev(losses, argnums=1)(p, x), rtol=1e-6)
    with pytest.raises(ValueError, match=r"mtlopt\.task_value_and_grad: fun must return a 1-D"):
        mtlopt.task_value_and_grad(lambda p, x: jnp.sum(p["w"]))(p, x)


def test_gramian_and_combine():
    J = _rng(19).normal(size=(3, 50000)).astype(np.float32)  # big enough for the chunked path
    tree = {"a": jnp.asarray(J[:, :20000].reshape(3, 100, 200)), "b": jnp.asarray(J[:, 20000:])}
    np.testing.assert_allclose(
        mtlopt.gramian(tree), J.astype(np.float64) @ J.T.astype(np.float64), rtol=1e-5
    )
    w = np.array([0.2, -1.0, 3.0], np.float32)
    out = mtlopt.combine(jnp.asarray(w), tree)
    np.testing.assert_allclose(out["b"], w @ J[:, 20000:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_gramian_formulation_matches_float64(T, dtype):
    # gramian() picks one of these per platform (GPU/TPU: one dot) and, on CPU, the native
    # kernel where built, else by T and a measurement: test each directly, on leaves that are
    # tiny, a few slices, and past the one-dot limit (two such leaves share the outer loop's
    # accumulator; one ends in 2.3 slices, one in whole loop steps); with and without a scale.
    from mtlopt._src import tree as tr

    big = tr._SMALL_LEAF + tr._OUTER_COLUMNS
    sizes = [(7,), (300, 3), (tr._OUTER_COLUMNS * 2 + 5,), (big + 600,), (big // 8, 8)]
    rng = _rng(31)
    leaves = [jnp.asarray(rng.normal(size=(T, *s)), dtype) for s in sizes]
    M = np.concatenate([np.asarray(x, np.float64).reshape(T, -1) for x in leaves], axis=1)
    mats = [tr.as_matrix(x) for x in leaves]

    @jax.jit  # every formulation in one program (eagerly, each loop step compiles on its own)
    def all_forms(mats, leaves, scale):
        forms = {
            "outer": tr._cpu_gramian(mats, scale, outer=True, small_leaf=0, use_native=False),
            "dot loop": tr._cpu_gramian(mats, scale, outer=False, small_leaf=0, use_native=False),
            "cpu": tr._cpu_gramian(mats, scale),
            "one dot": tr._one_dot_gramian(mats, scale),
            "public": mtlopt.gramian(leaves, scale),
        }
        if native.available():  # (float32 leaves only; bfloat16 ones still take the loops)
            forms["native"] = tr._cpu_gramian(mats, scale, small_leaf=0, use_native=True)
            forms["native, outer"] = tr._cpu_gramian(
                mats, scale, outer=True, small_leaf=0, use_native=True
            )
        return forms

    for scale in (None, jnp.float32(0.25)):
        ref = (M @ M.T) * (1.0 if scale is None else 0.0625)
        for name, got in all_forms(mats, leaves, scale).items():
            assert got.dtype == jnp.float32, name
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3, err_msg=name)


def test_cpu_gramian_loop_is_measured_or_pinned(monkeypatch):
    # The default is the dot loop, chosen without any timing (two processes compile the same
    # program; eval_shape and lowering pay nothing); MTLOPT_CPU_GRAMIAN_LOOP=outer pins the
    # outer-product loop, =measure times both (once per process and T); the variable is read and
    # checked on every trace; past _OUTER_MAX_T the dot loop always runs.
    from mtlopt._src import tree as tr

    def no_probe(T):
        raise AssertionError("the default must not time anything")

    monkeypatch.delenv(tr.GRAMIAN_LOOP_ENV, raising=False)
    monkeypatch.setattr(tr, "_probe_outer_wins", no_probe)
    x = jnp.zeros((6, tr._SMALL_LEAF + 1))

    def lowered():  # a new function each time: jit would reuse an earlier trace of the same one
        return jax.jit(lambda g: tr._cpu_gramian([g], None, use_native=False)).lower(x).as_text()

    dot_hlo = lowered()
    assert tr._outer_loop_wins(6) is False and tr._outer_loop_wins(2) is False
    monkeypatch.setenv(tr.GRAMIAN_LOOP_ENV, "outer")  # read again on the next trace
    outer_hlo = lowered()
    assert outer_hlo != dot_hlo and tr._outer_loop_wins(6) is True
    assert tr._outer_loop_wins(tr._OUTER_MAX_T + 1) is False
    monkeypatch.setenv(tr.GRAMIAN_LOOP_ENV, "dot")
    assert lowered() == dot_hlo
    monkeypatch.setenv(tr.GRAMIAN_LOOP_ENV, "measure")
    monkeypatch.setattr(tr, "_probe_outer_wins", lambda T: True)
    assert tr._outer_loop_wins(6) is True
    assert tr._outer_loop_wins(tr._OUTER_MAX_T + 1) is False
    monkeypatch.setenv(tr.GRAMIAN_LOOP_ENV, "fast")
    with pytest.raises(ValueError, match=f"mtlopt.gramian: {tr.GRAMIAN_LOOP_ENV}"):
        mtlopt.gramian(jnp.ones((6, 3)))
    # Two fresh processes, the default environment: the same compiled program.
    import os
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp; from mtlopt._src import tree as tr;"
        "x = jnp.zeros((6, tr._SMALL_LEAF + 1), jnp.bfloat16);"
        "print(jax.jit(lambda g: tr._cpu_gramian([g], None)).lower(x).as_text())"
    )
    env = {k: v for k, v in os.environ.items() if k != tr.GRAMIAN_LOOP_ENV}
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and "while" in runs[0].stdout


def test_task_weights_searches_nested_states():
    import optax

    with jax.numpy_dtype_promotion("standard"):
        tx = optax.chain(mtlopt.log_transform(), mtlopt.mgda(num_tasks=2), optax.adam(1e-3))
        state = tx.init(jnp.zeros(3))
        _, state = tx.update(jnp.eye(2, 3), state, jnp.zeros(3), task_losses=jnp.ones(2))
    np.testing.assert_allclose(mtlopt.task_weights(state), [0.5, 0.5], atol=1e-5)
    assert mtlopt.task_weights((optax.EmptyState(),)) is None


def test_gramian_of_bfloat16_is_exact_float32_accumulation():
    rng = _rng(20)
    J = jnp.asarray(rng.normal(size=(4, 30000)), jnp.bfloat16)  # chunked path included
    ref = np.asarray(J, np.float64) @ np.asarray(J, np.float64).T
    got = mtlopt.gramian({"a": J[:, :1000], "b": J[:, 1000:]})
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-3)
    w = jnp.array([0.1, -0.2, 0.3, 0.4])
    out = mtlopt.combine(w, {"a": J})["a"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float64),
        np.asarray(w, np.float64) @ np.asarray(J, np.float64),
        rtol=1e-2,
        atol=1e-2,
    )
