"""The one-backward-pass mode (``mtlopt.loss_weights``) of every loss-weighting row: the weights
computed from the losses before the backward pass, and one gradient of ``sum_t w_t l_t``, give
the update (and the state) of the same method run over the T task grads, step after step,
heads included. Rows claim it with ``one_pass=True``; every other aggregator must refuse the
loss-only mode with a ValueError (checked by tracing only)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtlopt
from tests.registry import AGGREGATORS, params

T = 3
STEPS = 4
ONE_PASS = [r for r in AGGREGATORS if r.one_pass]
OTHERS = [r for r in AGGREGATORS if not r.one_pass]


def _problem():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"trunk": jax.random.normal(k1, (4, 6)), "heads": jax.random.normal(k2, (T, 6))}
    x = jax.random.normal(jax.random.key(1), (8, 4))

    def task_losses(p):
        z = jnp.tanh(x @ p["trunk"])
        # Positive losses of different sizes (log-based methods need l > 0).
        return jnp.mean((z @ p["heads"].T - 1.0) ** 2, axis=0) + jnp.array([0.1, 1.0, 2.0])

    return params, task_losses


@pytest.mark.parametrize("row", params(ONE_PASS))
def test_one_pass_matches_the_task_grads_mode(row):
    params, task_losses = _problem()
    tx = row.make(T, task_specific={"trunk": False, "heads": True})
    extra = dict(row.signals)

    def one_pass(p, state):
        def total(p):
            losses = task_losses(p)
            w, new = mtlopt.loss_weights(tx, jax.lax.stop_gradient(losses), state, **extra)
            return jnp.dot(w, losses), new

        return jax.grad(total, has_aux=True)(p)

    def many_passes(p, state):
        losses, g = mtlopt.task_value_and_grad(task_losses)(p)
        return tx.update(g, state, p, task_losses=losses, **extra)

    def run(step):
        def body(carry, i):
            p = jax.tree.map(lambda a: a * (1.0 - 0.1 * i.astype(a.dtype)), params)
            out, state = step(p, carry)
            return state, out

        return jax.jit(lambda: jax.lax.scan(body, tx.init(params), jnp.arange(STEPS)))()

    s1, g1 = run(one_pass)
    s2, g2 = run(many_passes)
    chex.assert_trees_all_close(g1, g2, rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_close(s1, s2, rtol=2e-5, atol=1e-6)
    w1, w2 = mtlopt.task_weights(s1), mtlopt.task_weights(s2)
    if w2 is not None:
        np.testing.assert_allclose(w1, w2, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("row", params(OTHERS))
def test_other_methods_refuse_the_loss_only_mode(row):
    tx = row.make(T)
    state = jax.eval_shape(tx.init, {"w": jnp.zeros(5)})
    extra = dict(row.signals)
    with pytest.raises(ValueError, match=rf"mtlopt\.{row.method}: task_grads=None"):
        jax.eval_shape(lambda s: mtlopt.loss_weights(tx, jnp.ones(T), s, **extra), state)
