"""The weight modifiers, ``mtlopt.smooth_weights`` (CR-MOGM) and ``mtlopt.refresh_weights``.

* smoothing against a float64 transcription of ``lambda_k = a lambda_{k-1} + (1 - a)
  lambda_hat_k`` over a sequence with a masked task, a skipped (NaN) step and heads, where
  ``lambda_hat_k`` are the wrapped method's own weights (its state evolves as without the
  wrapper: CAGrad's warm start, UW's learned log-variances);
* the loss-only mode, ``groups=``, ``initial_weights``, schedules and vmap over ``alpha``;
* the refresh: updates of the steps in between combine the stored weights; skipped steps are
  not counted; the in-between branch reads no Gramian; vmap over ``every``;
* composition (with each other, ``with_diagnostics``, ``accumulate``) and the errors.

Each sequence is one jitted ``lax.scan`` (tests/test_tracking.py's ``run``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt
from tests.test_tracking import run

T, P, K = 3, 8, 5


def _sequence(seed=0):
    r = np.random.default_rng(seed)
    J = r.standard_normal((K, T, P)).astype(np.float32)
    J[:, 1] = -0.6 * J[:, 0] + 0.5 * J[:, 1]  # conflicting tasks: the weights move
    losses = r.uniform(0.5, 2.0, (K, T)).astype(np.float32)
    masks = np.ones((K, T), bool)
    masks[2, 1] = False  # task 1 absent at step 2
    return J, losses, masks


def _ema(raw, masks, ok, alpha, initial=None):
    """float64 transcription: the smoothed weights applied at each step (0 where masked)."""
    avg = None if initial is None else np.asarray(initial, np.float64)
    started = np.zeros(raw.shape[1], bool) if initial is None else np.ones(raw.shape[1], bool)
    out = []
    for w, m, good in zip(raw, masks, ok, strict=True):
        prev = np.where(started, avg if avg is not None else 0.0, w)
        lam = alpha * prev + (1 - alpha) * w
        out.append(np.where(m, lam, 0.0))
        if good:
            avg = np.where(m, lam, prev)
            started = started | m
    return np.array(out)


@pytest.mark.parametrize(
    "make,needs",
    [
        (lambda: mtlopt.cagrad(c=0.5, num_tasks=T), "grads"),
        (lambda: mtlopt.uw(num_tasks=T), "losses"),
    ],
    ids=["cagrad", "uw"],
)
def test_smoothing_matches_the_transcription(make, needs):
    J, losses, masks = _sequence()
    J[3, 2, 0] = np.nan  # step 3 is skipped: the average is kept
    alpha = 0.7
    _, w_raw, _ = run(make(), J, losses, masks)
    u, w, state = run(mtlopt.smooth_weights(make(), alpha=alpha), J, losses, masks)
    ok = np.ones(K, bool)
    ok[3] = False
    want = _ema(w_raw, masks, ok, alpha)
    good = [0, 1, 2, 4]
    # task_weights: the smoothed weights applied, the skipped step keeping the last ones.
    np.testing.assert_allclose(w[good], want[good], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w[3], w[2], rtol=0, atol=0)
    # The update combines the task grads with them (and the skipped step gives zeros).
    for k in good:
        np.testing.assert_allclose(u[k], want[k] @ J[k], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(u[3], 0.0)
    assert int(state.skipped) == 1 and int(state.count) == K - 1
    # The method's own weights, as without the wrapper (its state is untouched by smoothing).
    np.testing.assert_allclose(state.raw_weights, w_raw[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state.started, True)
    del needs


def test_loss_only_heads_groups_and_initial_weights():
    J, losses, _ = _sequence(1)
    alpha = 0.5
    # The loss-only mode gives the smoothed weights, as the task-grads mode; heads get them.
    tx = mtlopt.smooth_weights(
        mtlopt.uw(num_tasks=T, task_specific={"trunk": False, "head": True}), alpha=alpha
    )
    params = {"trunk": jnp.zeros(P - 2), "head": jnp.zeros(2)}
    split = lambda j: {"trunk": j[:, : P - 2], "head": j[:, P - 2 :]}

    @jax.jit
    def both(state_g, state_l, j, loss):
        u, state_g = tx.update(split(j), state_g, params, task_losses=loss)
        w, state_l = mtlopt.loss_weights(tx, loss, state_l)
        return u, state_g, w, state_l

    sg, sl = tx.init(params), tx.init(None)
    for k in range(3):
        u, sg, w, sl = both(sg, sl, J[k], losses[k])
        np.testing.assert_allclose(w, mtlopt.task_weights(sg), rtol=1e-6)
        np.testing.assert_allclose(u["head"], np.asarray(w) @ J[k][:, P - 2 :], rtol=1e-5)
        np.testing.assert_allclose(u["trunk"], np.asarray(w) @ J[k][:, : P - 2], rtol=1e-5)

    # groups="leaf": (K, T) averages, one per group; initial_weights as lambda_0.
    init = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], np.float32)
    grouped = mtlopt.smooth_weights(
        mtlopt.mgda(num_tasks=T, groups="leaf"), alpha=alpha, initial_weights=init
    )
    leaves = lambda j: {"a": j[:, :4], "b": j[:, 4:]}
    g_params = {"a": jnp.zeros(4), "b": jnp.zeros(P - 4)}
    s = grouped.init(g_params)
    u, s = jax.jit(grouped.update)(leaves(J[0]), s, g_params)
    raw = np.asarray(s.raw_weights)
    assert raw.shape == (2, T)
    want = alpha * init + (1 - alpha) * raw
    np.testing.assert_allclose(mtlopt.task_weights(s), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u["a"], want[0] @ J[0][:, :4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u["b"], want[1] @ J[0][:, 4:], rtol=1e-5, atol=1e-6)


def test_alpha_traced_schedules_and_limits():
    J, _, _ = _sequence(2)
    params = {"w": jnp.zeros(P)}

    def two_steps(alpha):
        tx = mtlopt.smooth_weights(mtlopt.mgda(num_tasks=T), alpha=alpha)
        s = tx.init(params)
        _, s = tx.update({"w": J[0]}, s)
        first = mtlopt.task_weights(s)  # the method's own at step 0, whatever alpha
        u, s = tx.update({"w": J[1]}, s)
        return u["w"], mtlopt.task_weights(s), s.raw_weights, first

    u, w, raw, first = jax.jit(jax.vmap(two_steps))(jnp.array([0.0, 1.0, 0.25]))
    first = first[0]
    np.testing.assert_allclose(w[0], raw[0], rtol=1e-6)  # alpha = 0: the method itself
    np.testing.assert_allclose(w[1], first, rtol=1e-5, atol=1e-6)  # alpha = 1: frozen
    np.testing.assert_allclose(w[2], 0.25 * first + 0.75 * raw[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u[2], np.asarray(w[2]) @ J[1], rtol=1e-5, atol=1e-6)
    # A schedule (the paper's alpha_k growing towards 1) through inject_hyperparams.
    sched = optax.inject_hyperparams(mtlopt.smooth_weights, static_args="tx")(
        tx=mtlopt.mgda(num_tasks=T), alpha=optax.linear_schedule(0.0, 1.0, 4)
    )
    s = sched.init(params)
    for k in range(3):
        _, s = jax.jit(sched.update)({"w": J[k]}, s)
    assert float(s.hyperparams["alpha"]) == pytest.approx(0.5)  # schedule(2), at step 2


def test_refresh_reuses_the_weights_in_between():
    J, _, masks = _sequence(3)
    J[2, 0, 0] = np.nan  # step 2 is skipped and not counted: step 3 is the refresh
    masks[1, 2] = False  # a masked task in between gets weight 0
    u, w, state = run(mtlopt.refresh_weights(mtlopt.mgda(num_tasks=T), every=2), J, None, masks)
    # MGDA's own weights at each step, with the masks and without (one vmapped program).
    mgda = mtlopt.mgda(num_tasks=T)
    one = lambda j, m: mtlopt.task_weights(mgda.update(j, mgda.init(j[0]), task_mask=m)[1])
    own, unmasked = jax.jit(lambda J, M: (jax.vmap(one)(J, M), jax.vmap(one)(J, M | True)))(
        jnp.asarray(J), jnp.asarray(masks)
    )
    w0, w3 = own[0], own[3]
    np.testing.assert_allclose(w[0], w0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w[1], np.where(masks[1], w0, 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(u[2], 0.0)
    np.testing.assert_allclose(w[3], w3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w[4], w3, rtol=1e-5, atol=1e-6)
    for k in (0, 1, 3, 4):
        np.testing.assert_allclose(u[k], w[k] @ J[k], rtol=1e-4, atol=1e-5)
    assert int(state.count) == K - 1 and int(state.skipped) == 1

    # The in-between branch of the cond reads no Gramian: its only dot is the combination.
    tx = mtlopt.refresh_weights(mtlopt.mgda(num_tasks=T), every=4)
    jaxpr = jax.make_jaxpr(tx.update)({"w": jnp.asarray(J[0])}, tx.init({"w": jnp.zeros(P)}))
    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    dots = [str(b).count("dot_general") for e in conds[:1] for b in e.params["branches"]]
    assert len(dots) == 2 and min(dots) == 0 and max(dots) >= 1, dots

    # every traced (vmap): 1 is the method itself at every step.
    def second(every):
        t = mtlopt.refresh_weights(mtlopt.mgda(num_tasks=T), every=every)
        s = t.init({"w": jnp.zeros(P)})
        _, s = t.update({"w": J[0]}, s)
        return mtlopt.task_weights(t.update({"w": J[1]}, s)[1])

    ws = jax.jit(jax.vmap(second))(jnp.array([1, 2]))
    np.testing.assert_allclose(ws[0], unmasked[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ws[1], w0, rtol=1e-5, atol=1e-6)


def test_compositions():
    J, _, _ = _sequence(4)
    params = {"w": jnp.zeros(P)}
    # Smoothing around a refresh: the weights reused in between are the smoothed ones.
    tx = mtlopt.smooth_weights(
        mtlopt.refresh_weights(mtlopt.cagrad(num_tasks=T), every=2), alpha=0.5
    )
    _, w, _ = run(tx, J[:3])
    np.testing.assert_allclose(w[1], w[0], rtol=1e-6)
    assert not np.allclose(w[2], w[1])
    # Inside with_diagnostics (same diagnostics as the method alone) and inside accumulate.
    diag = mtlopt.with_diagnostics(mtlopt.smooth_weights(mtlopt.cagrad(num_tasks=T)), T)
    alone = mtlopt.with_diagnostics(mtlopt.cagrad(num_tasks=T), T)
    acc = mtlopt.accumulate(mtlopt.smooth_weights(mtlopt.mgda(num_tasks=T)), 2, num_tasks=T)

    @jax.jit
    def go(j0, j1):
        d1 = diag.update({"w": j0}, diag.init(params))[1]
        d2 = alone.update({"w": j0}, alone.init(params))[1]
        s = acc.init(params)
        _, s = acc.update({"w": j0}, s)
        u, s = acc.update({"w": j1}, s)
        return d1, d2, u, s

    d1, d2, u, s = go(jnp.asarray(J[0]), jnp.asarray(J[1]))
    np.testing.assert_allclose(
        mtlopt.task_diagnostics(d1).cosines, mtlopt.task_diagnostics(d2).cosines, rtol=1e-6
    )
    w = mtlopt.task_weights(s)
    np.testing.assert_allclose(u["w"], w @ ((J[0] + J[1]) / 2), rtol=1e-5, atol=1e-6)


def test_errors_name_the_modifier_and_the_method():
    params = {"w": jnp.zeros(P)}
    g = {"w": jnp.ones((T, P))}
    with pytest.raises(ValueError, match=r"mtlopt\.smooth_weights: alpha must be"):
        mtlopt.smooth_weights(mtlopt.mgda(num_tasks=T), alpha=1.5)
    with pytest.raises(ValueError, match=r"mtlopt\.refresh_weights: every must be an int >= 1"):
        mtlopt.refresh_weights(mtlopt.mgda(num_tasks=T), every=0)
    with pytest.raises(ValueError, match=r"mtlopt\.smooth_weights: initial_weights has shape"):
        mtlopt.smooth_weights(mtlopt.mgda(num_tasks=T), initial_weights=[1.0, 0.0]).init(params)
    for wrap in (mtlopt.smooth_weights, lambda t: mtlopt.refresh_weights(t, 2)):
        # A per-coordinate method, a plain optax transformation, a method without num_tasks.
        for inner in (mtlopt.trimmed_mean(1, num_tasks=T), optax.sgd(0.1), mtlopt.mgda()):
            with pytest.raises(ValueError, match=r"num_tasks is required"):
                wrap(inner).init(params)
        # Outside accumulate (whose inner update runs under lax.cond).
        tx = wrap(mtlopt.accumulate(mtlopt.mgda(num_tasks=T), 1, num_tasks=T))
        with pytest.raises(ValueError, match="put the modifier inside accumulate"):
            tx.update(g, tx.init(params))
    tx = mtlopt.refresh_weights(mtlopt.nash_mtl(num_tasks=T, update_weights_every=2), 3)
    with pytest.raises(ValueError, match=r"mtlopt\.nash_mtl: refresh_weights: .* not both"):
        tx.update(g, tx.init(params))
    tx = mtlopt.smooth_weights(mtlopt.smooth_weights(mtlopt.mgda(num_tasks=T)))
    with pytest.raises(ValueError, match="already smoothed"):
        tx.update(g, tx.init(params))
