"""``with_diagnostics``: the diagnostics in the state match numpy's, over the shared leaves, for
every route (the aggregator's own Gramian, a pass of its own, a plain optax transformation);
the Gramian methods pay no extra pass; masks, non-finite and huge gradients behave."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt

T = 3
HEADS = {"trunk": False, "bias": False, "head": True}


def _grads(J, head):
    return {"trunk": J[:, :6].reshape(T, 2, 3), "bias": J[:, 6:], "head": head}


def _expected(J):
    """Norms, cosines and conflicts of the rows of J, in float64."""
    J = np.asarray(J, np.float64)
    n = np.linalg.norm(J, axis=1)
    safe = np.where(n > 0, n, 1.0)
    cos = (J @ J.T) / np.outer(safe, safe)
    cos = np.where(np.outer(n > 0, n > 0), cos, 0.0)
    np.fill_diagonal(cos, (n > 0).astype(float))
    conflicts = int(np.sum(np.triu(cos < 0, k=1)))
    return n, cos, conflicts


def _problems():
    rng = np.random.default_rng(0)
    J = rng.normal(size=(4, T, 8)).astype(np.float32)
    J[1, 2] = -J[1, 0]  # an opposed pair
    J[2] *= np.float32(1e30) / np.abs(J[2]).max()  # float32's Gramian overflows: pre-scaled
    J[3, 1] = 0.0  # a zero task
    head = rng.normal(size=(4, T, 5)).astype(np.float32)
    return jnp.asarray(J), jnp.asarray(head)


@pytest.mark.parametrize(
    "make",
    [
        lambda: mtlopt.cagrad(num_tasks=T, task_specific=HEADS),  # its own Gramian
        lambda: mtlopt.cagrad(num_tasks=T, task_specific=HEADS, groups="leaf"),  # per group
        lambda: optax.chain(
            mtlopt.log_transform(), mtlopt.mgda(num_tasks=T, task_specific=HEADS)
        ),  # folded scales: the diagnostics are of the raw grads
        lambda: mtlopt.db_mtl(num_tasks=T, task_specific=HEADS),  # Gramian of its EMA: a pass
        lambda: mtlopt.famo(num_tasks=T, task_specific=HEADS),  # no Gramian: a pass
        lambda: mtlopt.trimmed_mean(1, task_specific=HEADS),  # per coordinate: a pass
        lambda: mtlopt.nash_mtl(num_tasks=T, task_specific=HEADS, update_weights_every=2),
    ],
    ids=["cagrad", "groups", "log_transform", "db_mtl", "famo", "trimmed_mean", "nash_periodic"],
)
def test_diagnostics_match_numpy(make):
    tx = mtlopt.with_diagnostics(make(), num_tasks=T)
    J, head = _problems()
    losses = jnp.array([0.5, 2.0, 1.0])
    state = tx.init({"trunk": jnp.zeros((2, 3)), "bias": jnp.zeros(2), "head": jnp.zeros(5)})

    @jax.jit
    @jax.vmap
    def run(J, head):
        _, s = tx.update(_grads(J, head), state, None, task_losses=losses)
        return mtlopt.task_diagnostics(s)

    got = run(J, head)
    for i in range(J.shape[0]):
        n, cos, conflicts = _expected(J[i])
        np.testing.assert_allclose(got.norms[i], n, rtol=1e-5)
        np.testing.assert_allclose(got.cosines[i], cos, rtol=1e-5, atol=1e-6)
        assert int(got.conflicts[i]) == conflicts


def _passes(tx, grads, state):
    """The Gramian-like reductions of the task grads in one traced update."""
    text = str(jax.make_jaxpr(lambda g, s: tx.update(g, s)[0])(grads, state))
    return text.count("dot_general") + text.count("ffi_call") + text.count("custom_call")


def test_gramian_methods_pay_no_extra_pass():
    """The wrapped update of a Gramian method reduces the task grads as often as the plain one
    (no second Gramian); a method without a Gramian (mean) computes one more."""
    J, head = _problems()
    grads = _grads(J[0], head[0])
    params = jax.tree.map(lambda x: x[0], grads)
    for method, more in [(mtlopt.cagrad, False), (mtlopt.upgrad, False), (mtlopt.mean, True)]:
        plain = method(num_tasks=T, task_specific=HEADS)
        wrapped = mtlopt.with_diagnostics(plain, num_tasks=T)
        n_plain = _passes(plain, grads, plain.init(params))
        n_wrapped = _passes(wrapped, grads, wrapped.init(params))
        assert (n_wrapped > n_plain) if more else (n_wrapped == n_plain), method.__name__


def test_plain_optax_mask_nonfinite_and_loss_only():
    """A transformation that is not an mtlopt aggregator (all leaves, computed by the wrapper);
    a masked task; a NaN step (diagnostics show it, the method skips it, the next step is
    clean); the loss-only mode keeps the diagnostics."""
    J, head = _problems()
    params = {"trunk": jnp.zeros((2, 3)), "bias": jnp.zeros(2), "head": jnp.zeros(5)}
    plain = mtlopt.with_diagnostics(
        optax.GradientTransformation(lambda p: optax.EmptyState(), lambda g, s, p=None: (g, s)),
        num_tasks=T,
    )
    _, s = jax.jit(plain.update)(_grads(J[0], head[0]), plain.init(params))
    whole = np.concatenate([J[0], head[0]], axis=1)
    np.testing.assert_allclose(mtlopt.task_diagnostics(s).norms, _expected(whole)[0], rtol=1e-5)

    tx = mtlopt.with_diagnostics(optax.chain(mtlopt.upgrad(num_tasks=T), optax.sgd(1.0)), T)
    state = tx.init(params)
    mask = jnp.array([True, False, True])

    @jax.jit
    def step(g, state, mask):
        return tx.update(g, state, task_mask=mask)

    bad = J[0].at[1, 0].set(jnp.nan)
    u, s1 = step(_grads(bad, head[0]), state, jnp.array([True, True, True]))
    d = mtlopt.task_diagnostics(s1)
    assert np.isnan(d.norms[1])  # (the others may show NaN too: the Gramian's path decides)
    assert np.all(np.asarray(jax.tree.leaves(u)[0]) == 0)  # skipped by upgrad
    u, s2 = step(_grads(bad, head[0]), s1, mask)  # the NaN row is masked: a clean step
    d = mtlopt.task_diagnostics(s2)
    whole = np.concatenate([J[0], head[0]], axis=1)
    n = _expected(whole)[0]
    np.testing.assert_allclose(d.norms, [n[0], 0.0, n[2]], rtol=1e-5)
    assert d.cosines[0, 1] == 0 and d.cosines[1, 1] == 0
    assert int(mtlopt.task_weights(s2)[1]) == 0

    lw = mtlopt.with_diagnostics(mtlopt.famo(num_tasks=T), T)
    s = lw.init(params)
    _, s3 = mtlopt.loss_weights(lw, jnp.array([1.0, 2.0, 3.0]), s)
    np.testing.assert_array_equal(mtlopt.task_diagnostics(s3).norms, jnp.zeros(T))


def test_diagnostics_function_and_errors():
    d = mtlopt.diagnostics(jnp.array([[4.0, -2.0], [-2.0, 1.0]]), scale=2.0)
    np.testing.assert_allclose(d.norms, [4.0, 2.0])
    np.testing.assert_allclose(d.cosines, [[1.0, -1.0], [-1.0, 1.0]])
    assert int(d.conflicts) == 1
    with pytest.raises(ValueError, match=r"diagnostics.*\(T, T\)"):
        mtlopt.diagnostics(jnp.ones(3))
    with pytest.raises(ValueError, match=r"with_diagnostics.*num_tasks"):
        mtlopt.with_diagnostics(mtlopt.mean(), num_tasks=None)
    tx = mtlopt.with_diagnostics(mtlopt.mean(), num_tasks=2)
    with pytest.raises(ValueError, match="with_diagnostics"):
        tx.update({"w": jnp.ones((3, 2))}, tx.init({"w": jnp.zeros(2)}))
    assert mtlopt.task_diagnostics(optax.adam(1.0).init({"w": jnp.zeros(2)})) is None


def test_with_accumulate_either_order():
    """Outside accumulate (the method runs under its lax.cond: the wrapper computes the Gramian
    of the micro-batch, every leaf) and inside it (the method's own Gramian of the means)."""
    J, head = _problems()
    params = {"trunk": jnp.zeros((2, 3)), "bias": jnp.zeros(2), "head": jnp.zeros(5)}
    chain = optax.chain(mtlopt.cagrad(num_tasks=T, task_specific=HEADS), optax.sgd(1.0))
    outer = mtlopt.with_diagnostics(mtlopt.accumulate(chain, every_k=2, num_tasks=T), T)
    inner = mtlopt.accumulate(mtlopt.with_diagnostics(chain, T), every_k=2, num_tasks=T)

    @jax.jit
    def run(s_outer, s_inner):
        for i in range(2):
            g = _grads(J[i], head[i])
            s_outer = outer.update(g, s_outer)[1]
            s_inner = inner.update(g, s_inner)[1]
        return mtlopt.task_diagnostics(s_outer), mtlopt.task_diagnostics(s_inner)

    d_outer, d_inner = run(outer.init(params), inner.init(params))
    whole = np.concatenate([J[1], head[1]], axis=1)
    np.testing.assert_allclose(d_outer.norms, _expected(whole)[0], rtol=1e-5)
    np.testing.assert_allclose(d_inner.norms, _expected((J[0] + J[1]) / 2)[0], rtol=1e-5)
