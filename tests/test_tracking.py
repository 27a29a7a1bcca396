"""MoCo and ExcessMTL (``mtlopt.moco``, ``mtlopt.excess_mtl``): T x P state across steps.

* A hand-worked three-step sequence each (the numbers derived in the comments);
* float64 numpy transcriptions of the peers' updates over several steps: LibMTL's ``MoCo``
  (``normalization="loss", projection="softmax"``), the paper's MoCo (Euclidean projection,
  raw gradients, with a projection written here by sorting), LibMTL's ``ExcessMTL``
  (``reduction="sum"``) and TorchJD's ``ExcessMTL`` with a warm-up (and TorchJD itself, where
  installed), each judged on the update, in float32 and float64;
* the options' edge cases: masked steps, zero, tiny and huge gradients for the raw MoCo,
  float16 params, traced hyperparameters.

Every multi-step run is one ``lax.scan`` over the steps: one compiled program per
(configuration, dtype).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt

# ----------------------------------------------------------------------------------------------
# Running a method over a sequence of steps (one program)


def run(tx, J, losses=None, masks=None, dtype=jnp.float32):
    """``tx`` over the steps of ``J`` ``(K, T, P)`` (one leaf, plus the same columns split as a
    second leaf), from ``init``: the updates ``(K, P)``, the weights ``(K, T)`` and the final
    state. One jitted ``lax.scan``."""
    J = np.asarray(J)
    K, T, P = J.shape
    cut = P // 2
    params = {"a": jnp.zeros(cut, dtype), "b": jnp.zeros(P - cut, dtype)}
    L = np.ones((K, T)) if losses is None else np.asarray(losses)
    M = np.ones((K, T), bool) if masks is None else np.asarray(masks)

    def step(state, xs):
        j, loss, mask = xs
        grads = {"a": j[:, :cut], "b": j[:, cut:]}
        u, state = tx.update(grads, state, params, task_losses=loss, task_mask=mask)
        return state, (jnp.concatenate([u["a"], u["b"]]), mtlopt.task_weights(state))

    @jax.jit
    def go(J, L, M):
        return jax.lax.scan(step, tx.init(params), (J, L, M))

    state, (u, w) = go(jnp.asarray(J, dtype), jnp.asarray(L, dtype), jnp.asarray(M))
    return np.asarray(u, np.float64), np.asarray(w, np.float64), state


def close_updates(u, ref, dtype, err=""):
    """``|d - d*| <= rtol |d*| + floor`` per step (floor: the rounding of the combination)."""
    rtol = 2e-5 if dtype == jnp.float32 else 1e-11
    for k, (a, b) in enumerate(zip(u, ref, strict=True)):
        bound = rtol * np.linalg.norm(b) + 1e3 * rtol * 1e-3
        assert np.linalg.norm(a - b) <= bound, (err, k, np.linalg.norm(a - b), np.linalg.norm(b))


# ----------------------------------------------------------------------------------------------
# MoCo


def test_moco_hand_worked_three_steps():
    """Raw gradients, beta = gamma = 0.5, constant steps, two tasks, two parameters.

    Step 1: g = (2, 0), (0, 4). y = 0.5 g = (1, 0), (0, 2); Y Y^T = diag(1, 4); lambda = 1/2:
      x = lambda - 0.5 (0.5, 2) = (0.25, -0.5); the projection shifts both by +0.625:
      lambda = (0.875, 0.125); d = 0.875 (1, 0) + 0.125 (0, 2) = (0.875, 0.25).
    Step 2: the same g. y = 0.5 y + 0.5 g = (1.5, 0), (0, 3); Y Y^T = diag(2.25, 9);
      G lambda = (1.96875, 1.125); x = (-0.109375, -0.4375); shifted by +0.7734375:
      lambda = (0.6640625, 0.3359375); d = (0.99609375, 1.0078125).
    Step 3: g = (-2, 0), (0, 4). y = (-0.25, 0), (0, 3.5); Y Y^T = diag(0.0625, 12.25);
      G lambda = (0.041503906.., 4.115234375); x = (0.643310546875, -1.7216796875): the second
      falls more than 1 below the first, so lambda = (1, 0) and d = y_1 = (-0.25, 0).
    """
    tx = mtlopt.moco(
        beta=0.5, gamma=0.5, num_tasks=2, beta_sigma=0.0, gamma_sigma=0.0, normalization="none"
    )
    J = np.array([[[2.0, 0.0], [0.0, 4.0]], [[2.0, 0.0], [0.0, 4.0]], [[-2.0, 0.0], [0.0, 4.0]]])
    u, w, state = run(tx, J)
    np.testing.assert_allclose(w, [[0.875, 0.125], [0.6640625, 0.3359375], [1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(u, [[0.875, 0.25], [0.99609375, 1.0078125], [-0.25, 0.0]], atol=1e-6)
    tracked = np.concatenate([state.tracked["a"], state.tracked["b"]], axis=1)
    np.testing.assert_allclose(tracked, [[-0.25, 0.0], [0.0, 3.5]], atol=1e-6)
    np.testing.assert_allclose(state.lam, [1.0, 0.0], atol=1e-6)
    assert int(state.count) == 3


def simplex_projection(v):
    """Euclidean projection onto the simplex, by sorting (Held, Wolfe & Crowder; Duchi et al.)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    k = np.arange(1, len(v) + 1)
    rho = np.nonzero(u * k > css - 1.0)[0][-1]
    return np.maximum(v - (css[rho] - 1.0) / (rho + 1.0), 0.0)


def moco_reference(J, losses, beta, gamma, rho, beta_sigma, gamma_sigma, normalization, proj):
    """MoCo in float64: LibMTL's ``MoCo.backward`` (normalization "loss", softmax) or the
    paper's Algorithm 1 (raw gradients, Euclidean projection). Returns the updates, weights."""
    K, T, P = J.shape
    y = np.zeros((T, P))
    lam = np.full(T, 1.0 / T)
    us, ws = [], []
    for k in range(1, K + 1):
        g = J[k - 1].astype(np.float64)
        if normalization == "loss":
            n = np.linalg.norm(g, axis=1)
            g = g / (n + 1e-8)[:, None] * losses[k - 1][:, None]
        y = y - beta / k**beta_sigma * (y - g)
        x = lam - gamma / k**gamma_sigma * (y @ y.T + rho * np.eye(T)) @ lam
        if proj == "softmax":
            e = np.exp(x - x.max())
            lam = e / e.sum()
        else:
            lam = simplex_projection(x)
        us.append(y.T @ lam)
        ws.append(lam)
    return np.array(us), np.array(ws)


def _problem(K, T, P, seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(T, P))
    base[1] = -0.8 * base[0] + 0.2 * base[1]  # conflicting
    scale = np.exp(rng.uniform(-1.5, 1.5, T))[:, None]  # norms a decade or more apart
    J = (base + 0.3 * rng.normal(size=(K, T, P))) * scale
    losses = rng.uniform(0.2, 3.0, (K, T))
    return J, losses


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_moco_matches_libmtl_and_the_paper(dtype):
    """LibMTL's update (loss-normalised, softmax, LibMTL's defaults, rho = 0.1) and the paper's
    (raw gradients, Euclidean projection; gradients of norm ~1 so that the projection meets
    faces and vertices), six steps each, against float64 transcriptions."""
    J, L = _problem(6, 4, 11, seed=0)
    J_raw = J / np.linalg.norm(J, axis=2, keepdims=True).max()
    cases = [
        (dict(rho=0.1, projection="softmax"), (0.5, 0.1, 0.1, 0.5, 0.5, "loss", "softmax"), J),
        (dict(rho=0.1), (0.5, 0.1, 0.1, 0.5, 0.5, "loss", "simplex"), J),
        (
            dict(gamma=30.0, normalization="none"),
            (0.5, 30.0, 0.0, 0.5, 0.5, "none", "simplex"),
            J_raw,
        ),
    ]
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        for kwargs, ref_args, Jc in cases:
            u, w, _ = run(mtlopt.moco(num_tasks=4, **kwargs), Jc, L, dtype=dt)
            ref_u, ref_w = moco_reference(Jc, L, *ref_args)
            close_updates(u, ref_u, dt, err=kwargs)
            np.testing.assert_allclose(w, ref_w, atol=1e-5 if dtype == "float32" else 1e-12)
    # The paper's form really met the simplex's boundary (a weight exactly 0 at some step).
    assert np.any(ref_w == 0.0)


def test_moco_masked_task_keeps_its_state_and_the_rest_runs_alone():
    """Step 2 masks task 1 (NaN row): its tracked gradient and lambda are kept, and the update
    is MoCo's on tasks 0 and 2 with their lambdas renormalised onto their simplex."""
    J, L = _problem(3, 3, 6, seed=1)
    J[1, 1] = np.nan
    L[1, 1] = np.nan
    masks = np.ones((3, 3), bool)
    masks[1, 1] = False
    tx = mtlopt.moco(num_tasks=3, rho=0.05)
    u, w, state = run(tx, J[:2], L[:2], masks[:2])
    assert np.all(np.isfinite(u)) and w[1, 1] == 0.0
    # The reference: step 1 on all tasks, step 2 on tasks 0 and 2 from their renormalised
    # lambdas and tracked gradients, task 1's row kept.
    _, w1 = moco_reference(J[:1], L[:1], 0.5, 0.1, 0.05, 0.5, 0.5, "loss", "simplex")
    y = 0.5 * J[0] / (np.linalg.norm(J[0], axis=1) + 1e-8)[:, None] * L[0][:, None]
    keep = [0, 2]
    lam = w1[0][keep] / w1[0][keep].sum()
    g = J[1][keep] / (np.linalg.norm(J[1][keep], axis=1) + 1e-8)[:, None] * L[1][keep][:, None]
    b = 0.5 / 2**0.5
    y2 = y[keep] - b * (y[keep] - g)
    lam2 = simplex_projection(lam - 0.1 / 2**0.5 * (y2 @ y2.T + 0.05 * np.eye(2)) @ lam)
    close_updates(u[1:2], (y2.T @ lam2)[None], jnp.float32)
    np.testing.assert_allclose(w[1][keep], lam2, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.lam)[1], w1[0][1], rtol=1e-6)


def test_moco_raw_gradients_of_any_scale_stay_finite():
    """normalization="none": zero, tiny and huge gradients (beyond float32's range once
    squared) give finite updates and weights, never a skipped step; huge ones put all the
    weight on the tasks of smallest (Y Y^T lambda)_t (the limit of the projected step)."""
    J, _ = _problem(2, 3, 5, seed=2)
    tx = mtlopt.moco(num_tasks=3, normalization="none")
    go = jax.jit(lambda J: run_plain(tx, J))
    for s in (0.0, 1e-30, 1e-20, 1e20, 1e30):
        u, w, skipped = go(jnp.asarray(J * s, jnp.float32))
        assert np.all(np.isfinite(u)) and np.all(np.isfinite(w)) and int(skipped) == 0, s
        if s == 0.0:
            np.testing.assert_array_equal(u, 0.0)
        if s >= 1e20:
            assert np.sum(np.asarray(w) > 0) == 1, (s, w)


def run_plain(tx, J):
    params = {"w": jnp.zeros(J.shape[-1], J.dtype)}
    state = tx.init(params)
    for k in range(J.shape[0]):
        u, state = tx.update({"w": J[k]}, state, params)
    return u["w"], state.weights, state.skipped


# ----------------------------------------------------------------------------------------------
# ExcessMTL


def test_excess_mtl_hand_worked_three_steps():
    """eta = 1, eps negligible (1e-30), two tasks, two parameters.

    Step 1: g_0 = (3, 4), g_1 = (1, 0). S_0 = (9, 16), S_1 = (1, 0);
      e_0 = 9/3 + 16/4 = 7, e_1 = 1/1 = 1 (a zero entry adds 0): the baselines. Every
      e_t / e_t^0 = 1, the weights stay (1/2, 1/2): d = (2, 2).
    Step 2: g_0 = (0, 3), g_1 = (3, 0). S_0 = (9, 25), S_1 = (10, 0); e_0 = 9/5 = 1.8,
      e_1 = 9/sqrt(10); r = (1.8/7, 9/sqrt(10)); alpha_0 = 1 / (1 + exp(r_1 - r_0)),
      d = alpha_0 g_0 + alpha_1 g_1.
    Step 3: task 1 masked (NaN row): S_0 = (25, 25), e_0 = 16/5; alone on its simplex,
      alpha_0 = 1 and d = g_0 = (4, 0); task 1 keeps its alpha, second moments and baseline.
    """
    tx = mtlopt.excess_mtl(num_tasks=2, eps=1e-30)
    J = np.array(
        [[[3.0, 4.0], [1.0, 0.0]], [[0.0, 3.0], [3.0, 0.0]], [[4.0, 0.0], [np.nan, np.nan]]]
    )
    masks = np.array([[True, True], [True, True], [True, False]])
    u, w, state = run(tx, J, masks=masks)
    r0, r1 = 1.8 / 7.0, 9.0 / math.sqrt(10.0)
    a0 = 1.0 / (1.0 + math.exp(r1 - r0))
    np.testing.assert_allclose(w, [[0.5, 0.5], [a0, 1.0 - a0], [1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(
        u, [[2.0, 2.0], [3.0 * (1.0 - a0), 3.0 * a0], [4.0, 0.0]], rtol=1e-6, atol=1e-7
    )
    sq = np.concatenate([state.sq_sum["a"], state.sq_sum["b"]], axis=1)
    np.testing.assert_allclose(sq, [[25.0, 25.0], [10.0, 0.0]])
    np.testing.assert_allclose(state.alpha, [1.0, 1.0 - a0], rtol=1e-6)
    np.testing.assert_allclose(state.baseline, [7.0, 1.0])
    np.testing.assert_allclose(state.excess, [3.2, 9.0 / math.sqrt(10.0)], rtol=1e-6)


def excess_libmtl(J, eta):
    """LibMTL's (and the authors') ``ExcessMTL.backward`` in float64: the loss weights
    (summing to T) of each step; the update is ``weights @ J``."""
    K, T, P = J.shape
    weight = np.ones(T)
    S = np.zeros((T, P))
    initial = None
    ws = []
    for k in range(K):
        g = J[k].astype(np.float64)
        S = S + g**2
        w = np.array([g[i] * (1.0 / np.sqrt(S[i] + 1e-7)) @ g[i] for i in range(T)])
        if initial is None:
            initial = w
        else:
            weight = weight * np.exp(w / initial * eta)
            weight = weight / weight.sum() * T
        ws.append(weight.copy())
    return np.array(ws)


def excess_torchjd(J, eta, warmup):
    """TorchJD 0.18's ``ExcessMTLWeighting.forward`` in float64 (``n_warmup_steps >= 1``)."""
    K, T, P = J.shape
    S = np.zeros((T, P))
    weights = np.full(T, 1.0 / T)
    warm_sum = np.zeros(T)
    initial = None
    ws = []
    for k in range(K):
        g = J[k].astype(np.float64)
        S = S + g**2
        w = (g**2 / np.sqrt(S + 1e-7)).sum(axis=1)
        if k < warmup:
            warm_sum += w
            ws.append(weights.copy())
            continue
        if initial is None:
            initial = warm_sum / warmup
        w = w / (initial + 1e-7)
        x = np.log(weights) + w * eta
        weights = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        ws.append(weights.copy())
    return np.array(ws)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_excess_mtl_matches_libmtl_and_torchjd(dtype):
    """LibMTL's weights (``reduction="sum"``: they sum to T, its first update skipped, which
    our first normalised estimates of 1 leave uniform anyway) and TorchJD's with a warm-up of
    two steps, over seven steps with norms a decade apart, against float64 transcriptions."""
    J, _ = _problem(7, 4, 11, seed=3)
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        for eta in (1.5,):
            u, w, _ = run(mtlopt.excess_mtl(eta, num_tasks=4, reduction="sum"), J, dtype=dt)
            ref = excess_libmtl(J, eta)
            np.testing.assert_allclose(w, ref, rtol=2e-5 if dtype == "float32" else 1e-11)
            close_updates(u, np.einsum("kt,ktp->kp", ref, J), dt, err=("libmtl", eta))
            u, w, _ = run(mtlopt.excess_mtl(eta, num_tasks=4, warmup_steps=2), J, dtype=dt)
            ref = excess_torchjd(J, eta, 2)
            # TorchJD adds 1e-7 to the baseline (~10 here): a relative 1e-8.
            np.testing.assert_allclose(w, ref, rtol=2e-5 if dtype == "float32" else 1e-6)
            close_updates(u, np.einsum("kt,ktp->kp", ref, J), jnp.float32, err=("tjd", eta))


def test_excess_mtl_matches_torchjd_itself():
    torch = pytest.importorskip("torch")
    tjd = pytest.importorskip("torchjd.aggregation")
    J, _ = _problem(6, 3, 9, seed=4)
    agg = tjd.ExcessMTLWeighting(robust_step_size=1.5, n_warmup_steps=1)
    ref = []
    for k in range(J.shape[0]):
        m = torch.from_numpy(J[k])
        ref.append(agg(m).numpy().copy())
    _, w, _ = run(mtlopt.excess_mtl(1.5, num_tasks=3, warmup_steps=1), J, dtype=jnp.float32)
    np.testing.assert_allclose(w, np.array(ref), rtol=2e-5)


def test_excess_mtl_zero_first_gradient_takes_its_first_positive_estimate():
    """A task whose gradient is 0 at its first step has no scale yet: e/e0 counts as 0 (its
    weight falls behind), and its first positive estimate becomes its baseline."""
    J = np.array([[[1.0, 2.0], [0.0, 0.0]], [[1.0, 2.0], [2.0, 0.0]], [[1.0, 2.0], [2.0, 0.0]]])
    _, w, state = run(mtlopt.excess_mtl(num_tasks=2), J)
    assert np.all(np.isfinite(w))
    # The first step: r = (1, 0), so alpha = softmax(log(1/2) + (1, 0)).
    np.testing.assert_allclose(w[0], [math.e / (1 + math.e), 1 / (1 + math.e)], rtol=1e-6)
    np.testing.assert_allclose(state.baseline, [3.0, 2.0], rtol=1e-5)
    np.testing.assert_array_equal(state.samples, [1, 1])


def test_low_precision_params_keep_float32_state_and_traced_hyperparameters():
    """float16 params: the T x P states are float32; the step sizes may be traced (a vmap
    over them, as optax.inject_hyperparams or a sweep does), one program for both methods."""
    params = {"w": jnp.zeros(4, jnp.float16)}
    grads = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)), jnp.float16)}
    losses = jnp.array([1.0, 2.0, 0.5])

    def both(gamma, eta):
        out = []
        for tx in (mtlopt.moco(gamma=gamma, num_tasks=3), mtlopt.excess_mtl(eta, num_tasks=3)):
            state = tx.init(params)
            for k in range(2):  # the second step's grads scaled per task: the ratios differ
                g = (
                    grads
                    if k == 0
                    else {"w": grads["w"] * jnp.array([[1], [2], [0.5]], jnp.float16)}
                )
                u, state = tx.update(g, state, params, task_losses=losses)
            out.append((u["w"], state))
        return out

    (u1, s1), (u2, s2) = jax.jit(jax.vmap(both))(jnp.array([0.1, 1.0]), jnp.array([0.5, 3.0]))
    assert u1.dtype == jnp.float16 and s1.tracked["w"].dtype == jnp.float32
    assert u2.dtype == jnp.float16 and s2.sq_sum["w"].dtype == jnp.float32
    assert not np.allclose(s1.lam[0], s1.lam[1])  # the two gammas gave different weights
    assert not np.allclose(s2.alpha[0], s2.alpha[1])
    # optax.inject_hyperparams (float32 params: optax itself mixes float32 into float16 leaves).
    params, grads = {"w": jnp.zeros(4)}, {"w": grads["w"].astype(jnp.float32)}
    tx = optax.inject_hyperparams(mtlopt.excess_mtl)(robust_step_size=0.5, num_tasks=3)
    state = tx.init(params)
    u, state = jax.jit(tx.update)(grads, state, params, task_losses=losses)
    assert np.all(np.isfinite(np.asarray(u["w"])))


def test_constructor_errors_name_the_method():
    with pytest.raises(ValueError, match=r"^mtlopt\.moco: num_tasks is required"):
        mtlopt.moco()
    with pytest.raises(ValueError, match=r"^mtlopt\.moco: normalization must be one of"):
        mtlopt.moco(num_tasks=2, normalization="l2")
    with pytest.raises(ValueError, match=r"^mtlopt\.moco: beta must be"):
        mtlopt.moco(beta=1.5, num_tasks=2)
    with pytest.raises(ValueError, match=r"^mtlopt\.excess_mtl: num_tasks is required"):
        mtlopt.excess_mtl()
    with pytest.raises(ValueError, match=r"^mtlopt\.excess_mtl: eps must be"):
        mtlopt.excess_mtl(num_tasks=2, eps=0.0)
    with pytest.raises(ValueError, match=r"^mtlopt\.excess_mtl: warmup_steps must be"):
        mtlopt.excess_mtl(num_tasks=2, warmup_steps=-1)
