"""Flax ``nnx`` as users write it: ``nnx.Optimizer`` over a chain with an mtlopt method, task
grads of an ``nnx.Module``, heads chosen by their path, and the helpers (task weights,
diagnostics) reading the optimizer's Flax-wrapped state (run with warnings as errors: no
deprecated Flax access)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt

nnx = pytest.importorskip("flax.nnx")


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.trunk = nnx.Linear(4, 8, rngs=rngs)
        self.heads = nnx.Linear(8, 2, rngs=rngs)  # output t is task t's head

    def __call__(self, x):
        return self.heads(jax.nn.relu(self.trunk(x)))


def _heads(tree):
    """Every leaf under ``heads``, by path."""
    return jax.tree.map_with_path(lambda path, _: "heads" in jax.tree_util.keystr(path), tree)


def test_nnx_optimizer_task_weights_and_heads_by_path():
    model = _Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (16, 4))
    y = jnp.stack([x[:, 0], 10.0 * x[:, 1]], axis=1)

    def task_losses(m):
        return jnp.mean((m(x) - y) ** 2, axis=0)

    tx = optax.chain(mtlopt.cagrad(num_tasks=2, task_specific=_heads), optax.sgd(1.0))
    opt = nnx.Optimizer(model, mtlopt.with_diagnostics(tx, num_tasks=2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        losses, task_grads = mtlopt.task_value_and_grad(task_losses)(model)
        opt.update(model, task_grads, task_losses=losses)
        return task_grads

    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = step(model, opt)
        w = mtlopt.task_weights(opt.opt_state)
        diag = mtlopt.task_diagnostics(opt.opt_state)
    assert isinstance(w, jax.Array) and w.shape == (2,)
    assert np.all(np.isfinite(np.asarray(w)))
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    grads = jax.tree.map(np.asarray, nnx.state(g, nnx.Param))
    # Each head follows its own task's gradient (scale 1), out of CAGrad's solve ...
    for leaf in ("kernel", "bias"):
        want = before["heads"][leaf] - grads["heads"][leaf].sum(0)
        np.testing.assert_allclose(after["heads"][leaf], want, rtol=1e-5, atol=1e-6)
    # ... and the trunk takes CAGrad's combination, with the weights task_weights reports.
    for leaf in ("kernel", "bias"):
        d = np.tensordot(np.asarray(w), grads["trunk"][leaf], axes=1)
        np.testing.assert_allclose(
            after["trunk"][leaf], before["trunk"][leaf] - d, rtol=1e-4, atol=1e-5
        )
    # The diagnostics of the trunk's task grads (heads are not in the Gramian), read through
    # Flax's wrappers.
    J = np.concatenate([grads["trunk"][k].reshape(2, -1) for k in ("kernel", "bias")], axis=1)
    assert isinstance(diag.norms, jax.Array)
    np.testing.assert_allclose(diag.norms, np.linalg.norm(J, axis=1), rtol=1e-5)
    cos = J[0] @ J[1] / np.prod(np.linalg.norm(J, axis=1))
    np.testing.assert_allclose(diag.cosines[0, 1], cos, rtol=1e-4, atol=1e-6)
    assert int(diag.conflicts) == int(cos < 0)
