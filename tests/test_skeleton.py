"""The skeleton's hooks (mtlopt/_src/build.py), each through a method that uses it, and the
defects a review found in it. One representative method per hook; the registry's shared suite
runs every method through the rest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt
from mtlopt._src import build, solvers, tree


def _rng(seed=0):
    return np.random.default_rng(seed)


def _tree(J, split=(7,)):
    """A (T, P) matrix as a two-leaf pytree {"a": (T, 7), "b": (T, P - 7)}."""
    J = jnp.asarray(J)
    return {"a": J[:, : split[0]], "b": J[:, split[0] :]}


def _params(g):
    return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), g)


def _flat(u):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(u)])


# ------------------------------------------------------------------ per-coordinate pass 2


def test_trimmed_mean_per_coordinate_masks_heads_and_nan():
    rng = _rng(1)
    J = rng.normal(size=(5, 12)).astype(np.float32)
    J[2, 3] = 50.0  # an outlier that trimming drops
    heads = {"a": False, "b": True}
    tx = mtlopt.trimmed_mean(1, num_tasks=5, task_specific=heads)
    g = _tree(J)
    update = jax.jit(tx.update)
    state = tx.init(_params(g))
    u, s = update(g, state)
    np.testing.assert_allclose(u["a"], np.sort(J[:, :7], 0)[1:4].mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(u["b"], J[:, 7:].sum(0), rtol=1e-6, atol=1e-6)  # own gradients
    assert mtlopt.task_weights(s) is None  # no single (T,) weight vector
    # A masked task takes no part, even with NaN; 4 left: trim 1 each end, mean of the middle 2.
    Jn = J.copy()
    Jn[4] = np.nan
    mask = jnp.array([True, True, True, True, False])
    u, s = update(_tree(Jn), state, task_mask=mask)
    np.testing.assert_allclose(u["a"], np.sort(J[:4, :7], 0)[1:3].mean(0), rtol=1e-6, atol=1e-6)
    assert int(s.skipped) == 0
    # A NaN that trimming would drop still makes the step bad.
    Jn = J.copy()
    Jn[2, 3] = np.nan
    u, s = update(_tree(Jn), state)
    assert int(s.skipped) == 1 and np.all(_flat(u) == 0.0)
    with pytest.raises(ValueError, match=r"mtlopt\.trimmed_mean: needs num_tasks > 2"):
        mtlopt.trimmed_mean(2, num_tasks=4)


# ------------------------------------------------------------------ per-group Gramians


@pytest.mark.parametrize(
    "make",
    [
        lambda **k: mtlopt.mgda(num_tasks=3, **k),
        lambda **k: mtlopt.cagrad(num_tasks=3, **k),
        lambda **k: mtlopt.pcgrad(num_tasks=3, **k),
        lambda **k: mtlopt.db_mtl(3, beta=0.0, **k),
    ],
    ids=["mgda", "cagrad", "pcgrad", "db_mtl"],
)
def test_groups_solve_each_group_alone_in_one_batched_call(make):
    J = _rng(2).normal(size=(3, 20)).astype(np.float32)
    J[1, :7] = -0.8 * J[0, :7] + 0.2 * J[1, :7]
    g = _tree(J)
    losses = jnp.array([1.0, 2.0, 0.5])
    extra = {"task_losses": losses}
    grouped = make(groups="leaf")
    variants = {
        "leaf": grouped,
        # The same groups as a pytree of ids and as a callable on the params' shapes.
        "ids": make(groups={"a": "x", "b": "y"}),
        "callable": make(groups=lambda p: {"a": 0, "b": p["b"].shape[0]}),
        "one group": make(groups={"a": 0, "b": 0}),  # one group is the whole model
        "plain": make(),
        # The reference for groups="leaf": the method run on each leaf alone.
        "a alone": make(),
        "b alone": make(),
    }

    @jax.jit  # every variant in one program
    def run_all(g):
        out = {}
        for name, tx in variants.items():
            sub = {name[0]: g[name[0]]} if name.endswith("alone") else g
            out[name] = tx.update(sub, tx.init(_params(sub)), **extra)
        return out

    out = run_all(g)
    u, s = out["leaf"]
    w = mtlopt.task_weights(s)
    assert w.shape == (2, 3)
    pcgrad = "PCGrad" in type(s).__name__  # (pcgrad draws its orders per group from one key)
    if not pcgrad:
        for k in g:
            np.testing.assert_allclose(u[k], out[f"{k} alone"][0][k], rtol=2e-4, atol=1e-5)
    for name in ("ids", "callable"):
        chex.assert_trees_all_close(out[name][0], u, rtol=1e-6, atol=1e-7)
    u1, s1 = out["one group"]
    if not pcgrad:
        chex.assert_trees_all_close(u1, out["plain"][0], rtol=1e-5, atol=1e-6)
    assert mtlopt.task_weights(s1).shape == (1, 3)
    # One solver loop for all groups, not one per group.
    jaxpr = str(jax.make_jaxpr(lambda g: grouped.update(g, grouped.init(_params(g)), **extra))(g))
    assert jaxpr.count("while[") <= 1


def test_groups_prescale_each_group_on_its_own():
    """A layer of tiny gradients (its float32 Gramian underflows) beside a layer of normal ones:
    each group is pre-scaled by its own power of two, so the tiny layer keeps its own weights."""
    J = _rng(12).normal(size=(3, 20)).astype(np.float32)
    J[1] = -0.6 * J[0] + 0.4 * J[1]
    tiny = {"a": jnp.asarray(J[:, :7]) * 1e-25, "b": jnp.asarray(J[:, 7:])}
    tx = mtlopt.mgda(num_tasks=3, groups="leaf")
    u, s = jax.jit(tx.update)(tiny, tx.init(_params(tiny)))
    alone = mtlopt.mgda(num_tasks=3)
    ua, sa = jax.jit(alone.update)({"a": tiny["a"]}, alone.init({"a": tiny["a"][0]}))
    np.testing.assert_allclose(mtlopt.task_weights(s)[0], mtlopt.task_weights(sa), rtol=1e-4)
    np.testing.assert_allclose(u["a"], ua["a"], rtol=1e-4, atol=1e-35)


def test_prescale_at_the_edges_of_float32():
    """Gradients whose largest entry is float32's smallest normal number (or a subnormal), or
    near its largest: the pre-scale is an exact power of two whose inverse is finite too (XLA's
    exp2 gave 0 for 2**-126 and the step was skipped), so the step is taken, with MGDA's
    weights of the scaled problem."""
    from mtlopt._src import tree

    e = jnp.arange(-130.0, 130.0)
    np.testing.assert_array_equal(tree.pow2(e, jnp.float32), np.exp2(np.clip(e, -125, 125)))
    J = _rng(3).normal(size=(3, 20)).astype(np.float32)
    J[1] = -0.6 * J[0] + 0.4 * J[1]
    J /= np.abs(J).max()
    tx = mtlopt.mgda(num_tasks=3)
    step = jax.jit(jax.vmap(tx.update, in_axes=(0, None)))
    # 2**-100: the Gramian underflows, the entries do not (the same weights); at 1.2e-38 and
    # 1e-40 most entries are subnormal and the CPU flushes them (another problem: no skip).
    tiny = [np.float32(2.0**-100), np.float32(1.1754944e-38), np.float32(1e-40)]
    cases = np.stack([J] + [J * t for t in tiny] + [J * np.float32(3e38)])
    u, s = step({"w": jnp.asarray(cases)}, tx.init({"w": jnp.zeros(20)}))
    assert np.all(np.asarray(s.skipped) == 0)
    w = np.asarray(mtlopt.task_weights(s))
    np.testing.assert_allclose(w[1], w[0], rtol=1e-4)
    np.testing.assert_allclose(w[4], w[0], rtol=1e-4)
    assert np.all(np.isfinite(np.asarray(u["w"])))


def test_groups_errors():
    g = _tree(np.ones((2, 9), np.float32))
    from mtlopt._src import build
    from mtlopt._src.methods.scalarization import MeanState

    with pytest.raises(ValueError, match=r"mtlopt\.mean: groups= is for methods"):
        build.aggregator(
            build.Method("mean", MeanState, lambda c: (None, {}), gram=None),
            num_tasks=None,
            groups="leaf",
        )
    tx = mtlopt.mgda(groups={"a": 0})
    with pytest.raises(ValueError, match=r"mtlopt\.mgda: groups must be a pytree"):
        tx.init(_params(g))


# ------------------------------------------------------------------ folded per-task scales


def test_log_transform_is_folded_not_materialized():
    J = _rng(3).normal(size=(4, 30)).astype(np.float32)
    losses = jnp.array([0.5, 2.0, 4.0, 1e-3])
    g = _tree(J)
    scaled = jax.tree.map(lambda x: x / (losses[:, None] + 1e-8), g)
    aggs = (mtlopt.cagrad(num_tasks=4), mtlopt.mgda("l2", num_tasks=4), mtlopt.mean())

    @jax.jit  # every pair in one program
    def pairs(g, scaled):
        out = []
        for agg in aggs:
            chain = optax.chain(mtlopt.log_transform(), agg)
            out.append(chain.update(g, chain.init(_params(g)), task_losses=losses))
            out.append(agg.update(scaled, agg.init(_params(g)), task_losses=losses))
        return out

    out = pairs(g, scaled)
    for i in range(len(aggs)):
        (u, s), (ref, rs) = out[2 * i], out[2 * i + 1]
        chex.assert_trees_all_close(u, ref, rtol=2e-4, atol=1e-5)
        if mtlopt.task_weights(rs) is not None:  # the weights on what the aggregator received
            np.testing.assert_allclose(mtlopt.task_weights(s), mtlopt.task_weights(rs), rtol=2e-4)
    # No T x P product in the program: the scales meet only the (T, T) Gramian and (T,) weights.
    chain = optax.chain(mtlopt.log_transform(), mtlopt.cagrad())
    jaxpr = jax.make_jaxpr(lambda g: chain.update(g, chain.init(_params(g)), task_losses=losses))
    for eqn in jaxpr(g).jaxpr.eqns:
        if eqn.primitive.name == "mul":
            assert all(v.aval.shape != (4, 23) for v in eqn.outvars), eqn


def test_log_transform_checks_masks_and_bad_losses():
    g = _tree(_rng(4).normal(size=(3, 10)).astype(np.float32))
    with pytest.raises(ValueError, match=r"mtlopt\.log_transform: built with num_tasks=2"):
        mtlopt.log_transform(num_tasks=2).update(g, None, task_losses=jnp.ones(3))
    tx = optax.chain(mtlopt.log_transform(), mtlopt.mean())
    update = jax.jit(tx.update)
    state = tx.init(_params(g))
    # A masked task's NaN loss is ignored.
    u, s = update(
        g,
        state,
        task_losses=jnp.array([1.0, jnp.nan, 2.0]),
        task_mask=jnp.array([True, False, True]),
    )
    ref = (g["a"][0] / 1.0 + g["a"][2] / 2.0) / 2
    np.testing.assert_allclose(u["a"], ref, rtol=1e-6)
    assert int(s[0].skipped) == 0 and int(s[1].skipped) == 0
    # A loss below 0 (outside the log's domain) or inf: both links skip; the states stay.
    for bad in (-1.0, np.inf):
        u, s2 = update(g, state, task_losses=jnp.array([1.0, bad, 2.0]))
        assert np.all(_flat(u) == 0.0)
        assert int(s2[0].skipped) == 1 and int(s2[1].skipped) == 1
        assert int(s2[0].count) == 0 and int(s2[1].count) == 0


# ------------------------------------------------------------------ loss-only mode


# The one-pass mode of every loss-weighting row against its task-grads mode: test_one_pass.py.


# ------------------------------------------------------------------ extra signals: DWA


def _dwa_numpy(steps, T, temp=2.0):
    """DWA as the paper states it, over (losses, mask, new_epoch) steps."""
    sums, counts, means, out = np.zeros(T), np.zeros(T), [], []
    for losses, mask, new in steps:
        if new and counts.sum() > 0:
            means.append(
                np.where(counts > 0, sums / np.maximum(counts, 1), means[-1] if means else 0)
            )
            sums, counts = np.zeros(T), np.zeros(T)
        sums += np.where(mask, losses, 0)
        counts += mask
        if len(means) >= 2:
            r = np.where(means[-2] > 0, means[-1] / np.where(means[-2] > 0, means[-2], 1), 1)
            e = np.where(mask, np.exp(r / temp), 0)
            out.append(mask.sum() * e / e.sum())
        else:
            out.append(mask.astype(float))
    return out


def test_dwa_matches_the_paper_over_epochs_with_masks():
    T = 3
    rng = _rng(5)
    steps = []
    for epoch in range(5):
        for i in range(3):
            mask = np.ones(T, bool)
            if epoch == 3 and i == 1:
                mask[2] = False
            steps.append((rng.uniform(0.5, 3.0, T).astype(np.float32), mask, i == 0))
    tx = mtlopt.dwa(num_tasks=T)
    update = jax.jit(lambda l, s, m, e: mtlopt.loss_weights(tx, l, s, task_mask=m, new_epoch=e))
    state = tx.init(None)
    got = []
    for losses, mask, new in steps:
        w, state = update(jnp.asarray(losses), state, jnp.asarray(mask), jnp.asarray(new))
        got.append(np.asarray(w))
    for a, b in zip(got, _dwa_numpy(steps, T), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_signals_are_checked_at_trace_time():
    tx = mtlopt.dwa(num_tasks=2)
    with pytest.raises(
        ValueError,
        match=r"mtlopt\.dwa: this method needs the extra argument "
        r"new_epoch",
    ):
        mtlopt.loss_weights(tx, jnp.ones(2), tx.init(None))
    with pytest.raises(ValueError, match=r"mtlopt\.dwa: new_epoch must be a bool scalar"):
        mtlopt.loss_weights(tx, jnp.ones(2), tx.init(None), new_epoch=jnp.ones(2, bool))
    # Undeclared extra arguments are ignored (optax chains pass every one to every link).
    mtlopt.loss_weights(tx, jnp.ones(2), tx.init(None), new_epoch=True, unrelated=3)


# ------------------------------------------------------------------ randomness


def test_key_advances_and_is_kept_on_a_skipped_step():
    J = _rng(6).normal(size=(4, 9)).astype(np.float32)
    tx = mtlopt.pcgrad(seed=3, num_tasks=4)
    update = jax.jit(tx.update)
    s0 = tx.init({"a": jnp.zeros(9)})
    _, s1 = update({"a": jnp.asarray(J)}, s0)
    assert not np.array_equal(s1.key, s0.key)
    J[0, 0] = np.nan
    _, s2 = update({"a": jnp.asarray(J)}, s1)
    np.testing.assert_array_equal(s2.key, s1.key)
    assert int(s2.skipped) == 1


# ------------------------------------------------------------------ state before the weighting


def test_db_mtl_skipped_step_leaves_every_float_of_the_state():
    """An inf (or negative) loss: the EMA is not written (it was, before this fix)."""
    J = _rng(7).normal(size=(3, 10)).astype(np.float32)
    tx = mtlopt.db_mtl(3)
    g = _tree(J)
    update = jax.jit(tx.update)
    _, state = update(g, tx.init(_params(g)), task_losses=jnp.ones(3))
    for bad in (np.inf, -np.inf, np.nan, -0.5):
        u, new = update(g, state, task_losses=jnp.array([1.0, bad, 2.0]))
        assert np.all(_flat(u) == 0.0)
        chex.assert_trees_all_equal(new._replace(skipped=state.skipped), state)
        assert int(new.skipped) == int(state.skipped) + 1


def test_db_mtl_float16_state_does_not_overflow_and_jam():
    """float16 params, a loss of 1e-4 and gradients of 100 (log-gradients of 1e6, beyond
    float16): the EMA (float32 by default, or saturating with ema_dtype=float16) never becomes
    inf. That step's float16 update overflows and is skipped (the output is checked for float16
    leaves), and once the losses are back to normal the steps go through again: no jam."""
    g = {"w": jnp.full((2, 5), 100.0, jnp.float16)}
    for ema_dtype in (None, jnp.float16):
        tx = mtlopt.db_mtl(2, beta=0.5, ema_dtype=ema_dtype)
        state = tx.init({"w": jnp.zeros(5, jnp.float16)})
        assert state.ema_grads["w"].dtype == (ema_dtype or jnp.float32)
        update = jax.jit(tx.update)
        u, state = update(g, state, task_losses=jnp.array([1e-4, 1.0]))
        assert int(state.skipped) == 1 and np.all(np.asarray(u["w"], np.float32) == 0.0)
        assert np.all(np.isfinite(np.asarray(state.ema_grads["w"], np.float32)))
        for _ in range(20):
            u, state = update(g, state, task_losses=jnp.array([1.0, 1.0]))
        assert np.all(np.isfinite(np.asarray(state.ema_grads["w"], np.float32)))
        assert np.all(np.isfinite(np.asarray(u["w"], np.float32)))
        assert np.any(np.asarray(u["w"], np.float32) != 0.0)


def test_task_state_is_a_params_shaped_tree_with_none_at_heads():
    params = {"trunk": {"w": jnp.zeros((3, 2))}, "head": jnp.zeros(4)}
    tx = mtlopt.db_mtl(5, task_specific={"trunk": {"w": False}, "head": True})
    state = tx.init(params)
    assert state.ema_grads["head"] is None
    assert state.ema_grads["trunk"]["w"].shape == (5, 3, 2)


def test_task_state_is_sharded_like_the_params():
    """tx.init and jax.jit(tx.init) of sharded params give a T x P state sharded like them."""
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np, mtlopt
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        mesh = Mesh(np.array(jax.devices()), ("x",))
        params = {"w": jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P(None, "x")))}
        tx = mtlopt.db_mtl(3)
        for init in (tx.init, jax.jit(tx.init)):
            ema = init(params).ema_grads["w"]
            assert ema.shape == (3, 8, 16)
            spec = tuple(ema.sharding.spec) + (None,) * 3
            assert ema.sharding.num_devices == 4 and spec[:3] == (None, None, "x"), ema.sharding
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------ hyperparameters as arrays


def _outer_vjp_check(tx, g, state, extra, factor=1.0):
    """The update's VJP with respect to the task grads is the outer product of the weights with
    the cotangent: the weights are constants (a missing stop_gradient adds terms). ``factor``:
    what each task's row is multiplied by before the weighting (DB-MTL's first EMA step)."""

    @jax.jit  # one program (eagerly, every op of the update and its VJP compiles on its own)
    def check(g, state):
        _, new = tx.update(g, state, **extra)
        fn = lambda g: tx.update(g, state, **extra)[0]
        out, pullback = jax.vjp(fn, g)
        cot = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, out)
        (grad,) = pullback(cot)
        return grad, cot, new

    grad, cot, new = check(g, state)
    w = mtlopt.task_weights(new) * factor
    want = jax.tree.map(lambda c: w.reshape((-1,) + (1,) * c.ndim) * c[None], cot)
    chex.assert_trees_all_close(grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make,hyper",
    [
        (mtlopt.cagrad, {"c": 0.4, "num_tasks": 3}),
        (mtlopt.mgda, {"eps": 1e-8, "num_tasks": 3}),
        (mtlopt.db_mtl, {"num_tasks": 3, "beta": 0.5, "beta_sigma": 0.5}),
        (mtlopt.linear, {"weights": jnp.array([1.0, 2.0, 0.5])}),
        (mtlopt.pcgrad, {"seed": 1, "num_tasks": 3}),
    ],
    ids=["cagrad", "mgda", "db_mtl", "linear", "pcgrad"],
)
def test_inject_hyperparams_and_weights_are_constants(make, hyper):
    J = _rng(8).normal(size=(3, 12)).astype(np.float32)
    J[1] = -0.7 * J[0] + 0.3 * J[1]
    g = _tree(J)
    p = _params(g)
    extra = {"task_losses": jnp.array([1.0, 2.0, 0.5])}
    plain = make(**hyper)
    ref, _ = jax.jit(plain.update)(g, plain.init(p), p, **extra)
    injected = optax.inject_hyperparams(make, static_args=("num_tasks",))(**hyper)
    u, _ = jax.jit(injected.update)(g, injected.init(p), p, **extra)
    chex.assert_trees_all_close(u, ref, rtol=1e-5, atol=1e-6)
    factor = 1.0
    if "beta" in hyper:  # DB-MTL combines its EMA: (1 - beta) g_t / (l_t + eps) at step 1
        factor = (1.0 - hyper["beta"]) / (extra["task_losses"] + 1e-8)
    _outer_vjp_check(plain, g, plain.init(p), extra, factor)


def test_schedules_and_vmap_over_hyperparameters():
    J = _rng(9).normal(size=(3, 12)).astype(np.float32)
    J[1] = -0.7 * J[0] + 0.3 * J[1]
    g = _tree(J)
    p = _params(g)
    cs = jnp.array([0.0, 0.3, 0.9])

    def run(c):
        tx = mtlopt.cagrad(c=c)
        return tx.update(g, tx.init(p))[0]

    swept = jax.jit(jax.vmap(run))(cs)
    for i, c in enumerate([0.0, 0.3, 0.9]):
        tx = mtlopt.cagrad(c=c)
        one = jax.jit(tx.update)(g, tx.init(p))[0]
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], swept), one, rtol=1e-5, atol=1e-6
        )
    # A schedule on c, and linear's weights traced (a vmap over preference vectors).
    sched = optax.inject_hyperparams(mtlopt.cagrad)(c=optax.linear_schedule(0.0, 0.8, 4))
    state = sched.init(p)
    for _ in range(3):
        _, state = jax.jit(sched.update)(g, state, p)
    prefs = jnp.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    out = jax.jit(jax.vmap(lambda w: mtlopt.linear(w).update(g, mtlopt.linear(w).init(p))[0]))(
        prefs
    )
    np.testing.assert_allclose(out["b"][1], np.asarray(prefs[1]) @ J[:, 7:], rtol=1e-5)
    with pytest.raises(ValueError, match=r"mtlopt\.cagrad: c must be a finite number >= 0"):
        mtlopt.cagrad(c=jnp.array(-1.0))


# ------------------------------------------------------------------ other defects


def test_zero_size_leaves_and_empty_gramian():
    g = {"w": jnp.asarray(_rng(10).normal(size=(3, 6)), jnp.float32), "empty": jnp.zeros((3, 0, 4))}
    txs = (
        mtlopt.cagrad(),
        mtlopt.mgda(),
        mtlopt.pcgrad(),
        mtlopt.mean(),
        mtlopt.db_mtl(3),
        mtlopt.trimmed_mean(1),
    )
    # Every method in one program.
    run = jax.jit(
        lambda g: [tx.update(g, tx.init(_params(g)), task_losses=jnp.ones(3)) for tx in txs]
    )
    for u, s in run(g):
        assert u["empty"].shape == (0, 4) and np.all(np.isfinite(u["w"]))
        assert int(s.skipped) == 0
    np.testing.assert_allclose(
        mtlopt.gramian(g), np.asarray(g["w"]) @ np.asarray(g["w"]).T, rtol=1e-5
    )
    with pytest.raises(ValueError, match=r"mtlopt\.gramian: task_grads has no array leaves"):
        mtlopt.gramian({})


def test_task_weights_passes_over_states_without_weights():
    # The state of chain(pcgrad(), mgda(num_tasks=2)): pcgrad's weights are None.
    first, second = mtlopt.pcgrad(), mtlopt.mgda(num_tasks=2)
    _, s2 = second.update(jnp.eye(2, 3), second.init(jnp.zeros(3)))
    state = (first.init(jnp.zeros(3)), s2)
    assert state[0].weights is None
    np.testing.assert_allclose(mtlopt.task_weights(state), [0.5, 0.5], atol=1e-5)


def test_task_specific_callable_sees_param_shapes_in_init_and_update():
    seen = []

    def heads(tree_):
        seen.append(jax.tree.map(lambda x: x.shape, tree_))
        return jax.tree.map(lambda x: x.ndim == 1, tree_)

    g = {"w": jnp.ones((2, 3, 4)), "b": jnp.ones((2, 4))}
    tx = mtlopt.mean(task_specific=heads)
    u, _ = tx.update(g, tx.init(_params(g)))
    assert seen[0] == seen[1] == {"w": (3, 4), "b": (4,)}
    np.testing.assert_allclose(u["b"], 1.0)  # a head: its task's weight 1/2, times 2 tasks


def test_mgda_loss_normalization_skips_a_negative_loss():
    tx = mtlopt.mgda("loss", num_tasks=2)
    g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    u, s = jax.jit(tx.update)(g, tx.init({"w": jnp.zeros(2)}), task_losses=jnp.array([1.0, -1.0]))
    assert int(s.skipped) == 1 and np.all(np.asarray(u["w"]) == 0.0)


def test_float64_leaves_are_reduced_in_float64():
    with jax.enable_x64(True):
        rng = _rng(11)
        J = rng.normal(size=(3, 40)) * np.array([[1e-4], [1.0], [1e4]])
        g = {"w": jnp.asarray(J, jnp.float64)}
        assert mtlopt.gramian(g).dtype == jnp.float64
        np.testing.assert_allclose(mtlopt.gramian(g), J @ J.T, rtol=1e-13)
        for tx in (
            mtlopt.mean(num_tasks=3),
            mtlopt.mgda("l2", num_tasks=3),
            mtlopt.cagrad(num_tasks=3),
        ):
            state = tx.init({"w": jnp.zeros(40, jnp.float64)})
            u, s = jax.jit(tx.update)(g, state)
            assert u["w"].dtype == jnp.float64 and s.weights.dtype == jnp.float64
            w = np.asarray(mtlopt.task_weights(s))
            np.testing.assert_allclose(np.asarray(u["w"]), w @ J, rtol=1e-12, atol=1e-15)
        with jax.numpy_dtype_promotion("standard"):
            tx = mtlopt.mean(num_tasks=3)
            u, _ = tx.update(g, tx.init({"w": jnp.zeros(40, jnp.float64)}))
        np.testing.assert_allclose(np.asarray(u["w"]), J.mean(0), rtol=1e-14)


def test_sampling_module_holds_cagrad_fast():
    from mtlopt._src import sampling

    assert mtlopt.cagrad_fast_groups is sampling.cagrad_fast_groups
    assert mtlopt.cagrad_fast_weights is sampling.cagrad_fast_weights
    M = np.asarray(sampling.cagrad_fast_groups(jax.random.key(0), 6, 3))
    assert np.all((M > 0).sum(0) == 1)


def test_task_zeros_fresh_buffers_and_dtype_policy():
    params = {"a": jnp.zeros(3, jnp.bfloat16), "b": jnp.zeros(2, jnp.float32), "h": None}
    z = tree.task_zeros(params, 4)
    assert z["a"].dtype == jnp.float32 and z["b"].dtype == jnp.float32 and z["h"] is None
    assert z["a"].shape == (4, 3)
    s = tree.saturate(jnp.array([1e6, -1e6, jnp.nan]), jnp.float16)
    assert np.isfinite(np.asarray(s[:2], np.float32)).all() and np.isnan(np.asarray(s[2]))


class _ProbeState(NamedTuple):
    count: jax.Array
    skipped: jax.Array
    weights: jax.Array | None
    calls: jax.Array
    raw: jax.Array


def _probe(every, max_norm, groups=None, reuse=True):
    """Weights 2/T from a weighting that counts its calls; ``raw`` keeps the unclipped ones."""

    def weights_fn(ctx):
        w = 2.0 * solvers.uniform(ctx.mask, ctx.dtype)
        return w, {"calls": ctx.state.calls + 1, "raw": w}

    method = build.Method(
        "probe",
        _ProbeState,
        weights_fn,
        init_extra=lambda T, shared: {
            "calls": jnp.zeros((), jnp.int32),
            "raw": jnp.zeros((T,), jnp.float32),
        },
        per_group=("calls", "raw"),
        refresh_every=every,
        reuse=(lambda ctx: (ctx.state.raw, {})) if reuse else None,
        max_norm=max_norm,
    )
    return build.aggregator(method, num_tasks=2, groups=groups)


def test_refresh_every_reuses_weights_and_skips_the_gramian_pass():
    J = jnp.array([[3.0, 0.0, 1.0], [0.0, 4.0, -1.0]])
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    grads = lambda s: {"a": s * J[:, :2], "b": s * J[:, 2:]}
    for every, max_norm, groups in [
        (3, None, None),
        (3, 1.0, None),
        (1, 1.0, None),
        (2, 1.0, "leaf"),
    ]:
        tx = _probe(every, max_norm, groups)
        state, step = tx.init(params), jax.jit(tx.update)
        for k in range(5):
            s = float(k + 1)
            u, state = step(grads(s), state)
            full = np.concatenate([np.asarray(u["a"]), np.asarray(u["b"])])
            d = s * np.asarray(J).sum(0)  # weights 1, 1
            if max_norm is not None:
                d = d * min(1.0, max_norm / np.linalg.norm(d))
            np.testing.assert_allclose(full, d, rtol=1e-5, atol=1e-6 * np.abs(d).max())
            calls = np.asarray(state.calls)
            np.testing.assert_array_equal(calls, k // every + 1)
            # The reported weights include the clip.
            w = np.asarray(mtlopt.task_weights(state))
            np.testing.assert_allclose(
                w.reshape(-1, 2)[0],
                np.linalg.norm(d) / np.linalg.norm(s * np.asarray(J).sum(0)),
                rtol=1e-5,
            )
    # Between refreshes no Gramian: the jaxpr's Gramian sits in one branch of a cond.
    tx = _probe(3, None)
    jaxpr = str(jax.make_jaxpr(tx.update)(grads(1.0), tx.init(params)))
    assert "cond" in jaxpr
    # A NaN on a reuse step is caught by the update's check: state kept, counted.
    state = tx.init(params)
    _, state = tx.update(grads(1.0), state)
    bad = {"a": J[:, :2] * jnp.nan, "b": J[:, 2:]}
    u, state2 = tx.update(bad, state)
    assert not np.any(np.asarray(u["a"])) and int(state2.skipped) == 1
    assert int(state2.count) == int(state.count)


def test_gram_leaves_reads_the_chosen_leaves_and_clips_the_whole_update():
    """Pass 1 over the chosen leaves only (GradNorm's last shared layer); max_norm then
    measures the whole update (the partial Gramian does not know its norm), and a NaN outside
    the chosen leaves still skips the step."""
    J = jnp.array([[3.0, 0.0, 10.0], [0.0, 4.0, -20.0]])
    grads = {"a": J[:, :2], "b": J[:, 2:]}
    seen = {}

    def weights_fn(ctx):
        seen["gram"] = ctx.gram
        return 2.0 * solvers.uniform(ctx.mask, ctx.dtype), {}

    def make(max_norm):
        method = build.Method(
            "probe",
            _ProbeState,
            weights_fn,
            init_extra=lambda T, shared: {"calls": jnp.zeros(()), "raw": jnp.zeros((T,))},
            max_norm=max_norm,
            gram_leaves=("layer", {"a": True, "b": False}),
        )
        return build.aggregator(method, num_tasks=2)

    tx = make(None)
    state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(1)})
    u, _ = tx.update(grads, state)
    np.testing.assert_allclose(seen["gram"], [[9.0, 0.0], [0.0, 16.0]])
    d = np.asarray(J).sum(0)
    np.testing.assert_allclose(np.concatenate([u["a"], u["b"]]), d, rtol=1e-6)
    u, _ = make(1.0).update(grads, state)
    np.testing.assert_allclose(np.concatenate([u["a"], u["b"]]), d / np.linalg.norm(d), rtol=1e-5)
    bad = {"a": J[:, :2], "b": J[:, 2:] * jnp.nan}
    u, state2 = tx.update(bad, state)
    assert not np.any(np.asarray(u["b"])) and int(state2.skipped) == 1
    with pytest.raises(ValueError, match=r"probe: layer selects no shared leaf"):
        method = build.Method(
            "probe",
            _ProbeState,
            weights_fn,
            init_extra=lambda T, shared: {"calls": jnp.zeros(()), "raw": jnp.zeros((T,))},
            gram_leaves=("layer", {"a": False, "b": False}),
        )
        build.aggregator(method, num_tasks=2).update(grads, state)


def test_refresh_every_without_stored_weights_is_an_error():
    method = build.Method(
        "probe",
        _ProbeState,
        lambda ctx: (ctx.mask * 1.0, {}),
        init_extra=lambda T, shared: {"calls": jnp.zeros(()), "raw": None},
        refresh_every=2,
    )
    tx = build.aggregator(method, num_tasks=None)
    with pytest.raises(ValueError, match=r"probe.*num_tasks"):
        tx.update({"w": jnp.ones((2, 3))}, tx.init({"w": jnp.zeros(3)}))


def test_trimmed_mean_extraction_and_sort_agree_with_numpy_ties_and_masks():
    from mtlopt._src.methods import coordinate

    rng = np.random.default_rng(0)
    for T, b in [(5, 1), (7, 3), (40, 2)]:  # (40, 2) is past the extraction limit: the sort
        x = rng.integers(-3, 4, size=(T, 50)).astype(np.float32)  # many ties
        x[0, :3] = 1e30  # a huge value trimmed away: no cancellation
        mask = np.ones(T, bool)
        mask[1] = False
        got = np.asarray(coordinate.trimmed_mean_rows(jnp.asarray(x), jnp.asarray(mask), b))
        act = np.sort(x[mask], axis=0)
        n = act.shape[0]
        k = min(b, (n - 1) // 2)
        np.testing.assert_allclose(got, act[k : n - k].mean(0), rtol=1e-6, atol=1e-6)
