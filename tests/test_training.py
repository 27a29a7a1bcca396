"""Whole training runs on real data (scikit-learn's bundled digits): float32 vs bfloat16,
checkpoint round trips (orbax and pickle), determinism.

Skeleton-only: by default on the representative rows (``Row.representative``: ``mean``,
``cagrad``, ``db_mtl``, ``pcgrad``), every other aggregator with -m slow; the determinism and
independent seeds of every row that takes a seed (``Row.seeded``)."""

from __future__ import annotations

import functools
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt
from tests.registry import AGGREGATORS, params, skeleton

T = 3  # digit class (10-way), digit value (regression), parity (binary)


@functools.cache
def digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return jnp.asarray(x[:512]), jnp.asarray(y[:512])


@functools.partial(jax.jit, static_argnums=0)  # one program, not one per eager op
def init_params(dtype):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    glorot = jax.nn.initializers.glorot_normal()
    return {
        "trunk": {"w": glorot(k1, (64, 32), dtype), "b": jnp.zeros(32, dtype)},
        "cls": {"w": glorot(k2, (32, 10), dtype), "b": jnp.zeros(10, dtype)},
        "reg": {"w": glorot(k3, (32, 1), dtype), "b": jnp.zeros(1, dtype)},
        "par": {"w": glorot(k4, (32, 1), dtype), "b": jnp.zeros(1, dtype)},
    }


def task_losses(params, x, y):
    x = x.astype(params["trunk"]["w"].dtype)
    h = jax.nn.relu(x @ params["trunk"]["w"] + params["trunk"]["b"])
    logits = (h @ params["cls"]["w"] + params["cls"]["b"]).astype(jnp.float32)
    value = (h @ params["reg"]["w"] + params["reg"]["b"]).astype(jnp.float32)[:, 0]
    parity = (h @ params["par"]["w"] + params["par"]["b"]).astype(jnp.float32)[:, 0]
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    mse = jnp.mean((value - y.astype(jnp.float32) / 9.0) ** 2)
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(parity, (y % 2).astype(jnp.float32)))
    return jnp.stack([ce, mse, bce])


@functools.cache
def make_tx(row):
    heads = {"trunk": {"w": False, "b": False}}
    heads.update({k: {"w": True, "b": True} for k in ("cls", "reg", "par")})
    return optax.chain(row.make(T, task_specific=heads), optax.adam(1e-2))


@functools.cache
def compiled_run(row, steps):
    """One jitted ``lax.scan`` of ``steps`` training steps, shared by the tests of a row."""
    tx = make_tx(row)
    x, y = digits()

    def step(carry, _):
        params, opt_state = carry
        losses, grads = mtlopt.task_value_and_grad(task_losses)(params, x, y)
        updates, opt_state = tx.update(
            grads, opt_state, params, task_losses=losses, **dict(row.signals)
        )
        return (optax.apply_updates(params, updates), opt_state), losses

    return jax.jit(lambda p, s: jax.lax.scan(step, (p, s), length=steps))


def train(row, dtype, steps, params=None, opt_state=None):
    params = init_params(dtype) if params is None else params
    opt_state = jax.jit(make_tx(row).init)(params) if opt_state is None else opt_state
    # The model and optax are user code here: jax's default promotion rules.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        (params, opt_state), losses = compiled_run(row, steps)(params, opt_state)
    return params, opt_state, np.asarray(losses)


@pytest.mark.parametrize("row", skeleton())
def test_bfloat16_trains_like_float32(row):
    steps = 60
    _, _, l32 = train(row, jnp.float32, steps)
    p16, _, l16 = train(row, jnp.bfloat16, steps)
    assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
    assert np.all(np.isfinite(l16))
    first, last32, last16 = l32[0].sum(), l32[-5:].sum(1).mean(), l16[-5:].sum(1).mean()
    assert last32 < 0.6 * first  # float32 learns
    assert last16 < 0.6 * first  # bfloat16 learns
    assert last16 < 1.5 * last32 + 0.05  # ... comparably


def _save_restore_orbax(state, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    path = os.path.join(tmp_path, "state")
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, state)
    ckpt.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return ckpt.restore(path, target)


def _save_restore_pickle(state, tmp_path):
    leaves, treedef = jax.tree.flatten(state)
    blob = pickle.dumps([np.asarray(x) for x in leaves])
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in pickle.loads(blob)])


@pytest.mark.parametrize("row", skeleton())
@pytest.mark.parametrize("how", ["orbax", "pickle"])
def test_checkpoint_round_trip_is_bit_identical(row, how, tmp_path):
    params, opt_state, _ = train(row, jnp.float32, 5)
    saver = _save_restore_orbax if how == "orbax" else _save_restore_pickle
    restored = saver(opt_state, str(tmp_path))
    a_params, _a_state, a_losses = train(row, jnp.float32, 5, params, opt_state)
    b_params, _b_state, b_losses = train(row, jnp.float32, 5, params, restored)
    np.testing.assert_array_equal(a_losses, b_losses)
    for a, b in zip(jax.tree.leaves(a_params), jax.tree.leaves(b_params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("row", params([r for r in AGGREGATORS if r.seeded]))
def test_determinism_and_independent_seeds(row):
    _, _, a = train(row, jnp.float32, 5)
    _, _, b = train(row, jnp.float32, 5)
    np.testing.assert_array_equal(a, b)
    # Independence under vmap over keys, on gradients that conflict (orders matter).
    rng = np.random.default_rng(0)
    J = rng.normal(size=(4, 6)).astype(np.float32)
    J[1], J[3] = -J[0] + 0.3 * J[1], -J[2] + 0.3 * J[3]
    grads, params = {"w": jnp.asarray(J)}, {"w": jnp.zeros(6)}

    def one(key):
        tx = row.make(4, seed=key)
        return tx.update(grads, tx.init(params))[0]

    keys = jax.random.split(jax.random.key(3), 4)
    out = jax.jit(jax.vmap(one))(keys)  # jitted: eager runs compile every op
    flat = np.asarray(jnp.concatenate([x.reshape(4, -1) for x in jax.tree.leaves(out)], 1))
    single = jax.jit(one)
    for i in range(4):
        ref = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(single(keys[i]))])
        np.testing.assert_allclose(flat[i], ref, rtol=1e-5, atol=1e-7)
    assert len({tuple(np.round(f, 5)) for f in flat}) > 1  # different keys, different orders
