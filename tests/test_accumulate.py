"""Gradient accumulation over micro-batches of task grads (``mtlopt.accumulate``): the same
update as one step on the union of the micro-batches, task masks per micro-batch, non-finite
micro-batches, and the helpers reading the wrapped state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt

T, K, M = 2, 3, 4  # tasks, micro-batches per update, samples per micro-batch
HEADS = {"trunk": False, "head": True}


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"trunk": 0.5 * jax.random.normal(k1, (3, 4)), "head": jax.random.normal(k2, (T, 4))}


def _losses(params, x, y):
    """(T,) per-task mean squared errors of a trunk and one head row per task."""
    h = jnp.tanh(x @ params["trunk"])  # (n, 4)
    pred = h @ params["head"].T  # (n, T)
    return jnp.mean((pred - y) ** 2, axis=0)


def _data(batches):
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batches * K * M, 3))
    y = jnp.stack([x[:, 0], 10.0 * jnp.sin(x[:, 1])], axis=1) + 0.1 * jax.random.normal(
        ky, (batches * K * M, T)
    )
    return x, y


_METHODS = {
    "db_mtl": lambda: mtlopt.db_mtl(num_tasks=T, task_specific=HEADS),
    "cagrad": lambda: mtlopt.cagrad(c=0.4, num_tasks=T, task_specific=HEADS),
    "famo": lambda: mtlopt.famo(num_tasks=T, task_specific=HEADS),
}


def _both_routes(make):
    """Two updates of a method: from K micro-batches each (accumulated), and from their union
    (one plain step each). SGD after the method, the heads task-specific."""
    x, y = _data(2)
    tx = optax.chain(make(), optax.sgd(0.1))
    acc = mtlopt.accumulate(tx, every_k=K, num_tasks=T)

    def run(tx, xs, ys):
        def step(carry, batch):
            params, state = carry
            losses, grads = mtlopt.task_value_and_grad(_losses)(params, *batch)
            updates, state = tx.update(grads, state, params, task_losses=losses)
            return (optax.apply_updates(params, updates), state), updates

        params = _params()
        return jax.lax.scan(step, (params, tx.init(params)), (xs, ys))

    (p_acc, s_acc), u_acc = run(acc, x.reshape(2 * K, M, 3), y.reshape(2 * K, M, T))
    (p_big, s_big), _ = run(tx, x.reshape(2, K * M, 3), y.reshape(2, K * M, T))
    return p_acc, s_acc, u_acc, p_big, s_big


def _check_routes(p_acc, s_acc, u_acc, p_big, s_big):
    for leaf in ("trunk", "head"):
        np.testing.assert_allclose(p_acc[leaf], p_big[leaf], rtol=2e-5, atol=2e-6)
        # The micro-steps in between apply nothing; the K-th applies the whole update.
        steps = np.asarray(u_acc[leaf]).reshape(2, K, -1)
        assert not np.any(steps[:, : K - 1]) and np.all(np.any(steps[:, K - 1], axis=-1))
    np.testing.assert_allclose(
        mtlopt.task_weights(s_acc), mtlopt.task_weights(s_big), rtol=2e-5, atol=1e-6
    )
    assert int(s_acc.mini_step) == 0 and int(s_acc.gradient_step) == 2
    np.testing.assert_array_equal(s_acc.grad_count, [K] * T)  # the cycle just applied


@pytest.fixture(scope="module")
def results():
    """Everything the fast tests check, from one compiled program."""
    return jax.jit(
        lambda: {"db_mtl": _both_routes(_METHODS["db_mtl"]), "mask": _mask_run(), "bf16": _bf16()}
    )()


def test_micro_batches_match_one_big_batch(results):
    """DB-MTL (task losses, a T x P state of its own): equal micro-batches give the update of
    one step on their union."""
    _check_routes(*results["db_mtl"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cagrad", "famo"])
def test_micro_batches_match_one_big_batch_more_methods(name):
    _check_routes(*jax.jit(lambda: _both_routes(_METHODS[name]))())


def _linear_tx(every_k, nonfinite="skip"):
    """The sum of the task grads (linear with unit weights) and SGD(1): the update is minus
    what the inner transformation received, summed over the active tasks."""
    inner = optax.chain(mtlopt.linear(jnp.ones(3), num_tasks=3, nonfinite=nonfinite), optax.sgd(1))
    return mtlopt.accumulate(inner, every_k=every_k, num_tasks=3)


# Three tasks, three cycles of three micro-batches: task 1 is absent from micro-batch 1 (its
# mean is over the other two), task 2 from all (masked in the update; its rows are NaN).
_G = np.arange(1.0, 1.0 + 9 * 3 * 2, dtype=np.float32).reshape(9, 3, 2)  # (micro, task, P)
_G[:, 2] = np.nan
_MASK = np.ones((9, 3), bool)
_MASK[1, 1] = False
_MASK[:, 2] = False


def _mask_run():
    """Under ``jax.vmap`` (two copies, the second with a NaN in a present task's grads in cycle
    2) and ``lax.scan``; then ``nonfinite="propagate"`` with an inf in cycle 1."""
    params = {"w": jnp.zeros(2)}

    def run(tx, grads, mask, losses):
        def body(state, inputs):
            gi, mi, li = inputs
            u, state = tx.update({"w": gi}, state, params, task_mask=mi, task_losses=li)
            return state, (u["w"], mtlopt.task_weights(state), state.inner_state[0].skipped)

        return jax.lax.scan(body, tx.init(params), (grads, mask, losses))

    g = jnp.asarray(_G)
    grads = jnp.stack([g, g.at[4, 0, 1].set(jnp.nan)])
    losses = jnp.ones((9, 3))
    skip = jax.vmap(lambda gr: run(_linear_tx(3), gr, jnp.asarray(_MASK), losses))(grads)
    ones = jnp.ones((4, 3, 2)).at[0, 0, 0].set(jnp.inf).at[3].multiply(2.0)
    prop = run(_linear_tx(2, "propagate"), ones, jnp.ones((4, 3), bool), jnp.ones((4, 3)))
    return skip, prop


def test_task_mask_per_micro_batch_and_a_nan_cycle(results):
    """Present tasks are averaged over their own micro-batches; a NaN in a present task skips
    that cycle's inner update (zero update, ``skipped`` counted), and the next cycle is clean."""
    state, (u, w, skipped) = results["mask"][0]
    want = []
    for c in range(3):
        block = _G[3 * c : 3 * c + 3]
        m0 = block[:, 0].mean(0)
        m1 = (block[0, 1] + block[2, 1]) / 2  # present in micro-batches 0 and 2
        want.append(-(m0 + m1))
    u = np.asarray(u)
    for b in range(2):
        for c in range(3):
            assert not np.any(u[b, 3 * c : 3 * c + 2])
        np.testing.assert_allclose(u[b, 2], want[0], rtol=1e-6)
        np.testing.assert_allclose(u[b, 8], want[2], rtol=1e-6)
    np.testing.assert_allclose(u[0, 5], want[1], rtol=1e-6)
    assert np.all(u[1, 5] == 0)
    np.testing.assert_array_equal(np.asarray(skipped)[:, -1], [0, 1])
    np.testing.assert_array_equal(np.asarray(w)[:, -1], [[1.0, 1.0, 0.0]] * 2)
    np.testing.assert_array_equal(state.gradient_step, [3, 3])


def test_nan_propagates_under_the_inner_policy_and_the_next_cycle_is_clean(results):
    _, (u, _, _) = results["mask"][1]
    u = np.asarray(u)
    assert np.all(u[0] == 0) and np.all(np.isnan(u[1]))
    np.testing.assert_allclose(u[3], [-4.5, -4.5])  # (1 + 2) / 2 summed over 3 tasks


def _bf16():
    """bfloat16 params under ``lax.scan``: a float32 accumulator, bfloat16 updates."""
    tx = mtlopt.accumulate(optax.chain(mtlopt.mean(), optax.sgd(1.0)), 2, num_tasks=2)
    params = {"w": jnp.zeros(3, jnp.bfloat16)}
    # 1 + 2**-8 needs 9 significant bits: a bfloat16 sum would round it to 1.
    grads = jnp.ones((4, 2, 3), jnp.bfloat16).at[1::2].set(2.0**-8)

    def body(state, g):
        u, state = tx.update({"w": g}, state, params)
        return state, u["w"]

    return jax.lax.scan(body, tx.init(params), grads)


def test_bfloat16_params_keep_a_float32_accumulator(results):
    state, u = results["bf16"]
    assert state.grad_sum["w"].dtype == jnp.float32 and u.dtype == jnp.bfloat16
    np.testing.assert_array_equal(state.grad_sum["w"], (1.0 + 2.0**-8) / 2)  # the last means
    want = np.asarray(jnp.asarray(-(1.0 + 2.0**-8) / 2, jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(u, np.float32)[1::2], want)
    assert not np.any(np.asarray(u, np.float32)[0::2])


def test_state_is_arrays_and_task_weights_reads_the_inner_method():
    tx = mtlopt.accumulate(optax.chain(mtlopt.mean(num_tasks=2), optax.sgd(1.0)), 2, num_tasks=2)
    params = {"w": jnp.zeros(3, jnp.bfloat16), "b": jnp.zeros((), jnp.float32)}
    state = tx.init(params)
    assert isinstance(state, mtlopt.AccumulateState)
    assert state.grad_sum["w"].shape == (2, 3) and state.grad_sum["w"].dtype == jnp.float32
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    np.testing.assert_array_equal(mtlopt.task_weights(state), [0.0, 0.0])


def test_bad_input_is_a_value_error_naming_accumulate():
    inner = optax.chain(mtlopt.mean(), optax.sgd(1.0))
    with pytest.raises(ValueError, match=r"mtlopt.accumulate: num_tasks is required"):
        mtlopt.accumulate(inner, every_k=2, num_tasks=None)
    with pytest.raises(ValueError, match=r"mtlopt.accumulate: every_k must be a positive int"):
        mtlopt.accumulate(inner, every_k=0, num_tasks=2)
    tx = mtlopt.accumulate(inner, every_k=2, num_tasks=2)
    state = tx.init({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"mtlopt.accumulate: .*num_tasks=2 but task_grads has 3"):
        tx.update({"w": jnp.zeros((3, 3))}, state)
    with pytest.raises(ValueError, match=r"mtlopt.accumulate: task_grads must have the structure"):
        tx.update({"v": jnp.zeros((2, 3))}, state)
