"""The contract of API.md, run for every method of the registry."""

from __future__ import annotations

import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt
from tests import inputs
from tests.registry import AGGREGATORS, HEAVY, ORDER_FREE, ROWS, cached

T = 3


def _step(row, J, T=T, jit=True, state=None, tx=None, **kw):
    if tx is None:
        tx, update = cached(row, T)
    else:
        update = jax.jit(tx.update)
    grads = inputs.from_matrix(J)
    state = tx.init(inputs.params()) if state is None else state
    extra = {"task_losses": inputs.losses(J.shape[0])} if row.needs_losses else {}
    extra.update(kw)
    update = update if jit else tx.update
    return update(grads, state, inputs.params(), **extra)


@pytest.mark.parametrize("row", HEAVY, ids=repr)
def test_jit_matches_eager(row):
    J = inputs.random_matrix(T)
    u1, s1 = _step(row, J, jit=True)
    u2, s2 = _step(row, J, jit=False)
    np.testing.assert_allclose(inputs.flat(u1), inputs.flat(u2), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s1, s2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_update_shaped_like_params_and_state_stable(row):
    J = inputs.random_matrix(T)
    tx, _ = cached(row, T)
    state0 = tx.init(inputs.params())
    updates, state1 = _step(row, J, state=state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, inputs.params())
    chex.assert_trees_all_equal_structs(state0, state1)
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1)


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_split_invariance(row):
    """The same vectors split into one leaf or into many give the same update."""
    J = inputs.random_matrix(T, seed=1)
    tx, _ = cached(row, T)
    u_many, _ = _step(row, J)
    one = {"all": jnp.asarray(J)}
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}
    u_one, _ = jax.jit(tx.update)(one, tx.init({"all": jnp.zeros(J.shape[1])}), **extra)
    # Solver methods see Gramians that differ in rounding: allow the solver's tolerance.
    np.testing.assert_allclose(inputs.flat(u_many), np.asarray(u_one["all"]), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("row", ORDER_FREE, ids=repr)
def test_task_permutation(row):
    J = inputs.random_matrix(4, seed=2)
    perm = np.array([2, 0, 3, 1])
    tx = row.make(4)
    losses = inputs.losses(4)
    extra = lambda p: {"task_losses": losses[p]} if row.needs_losses else {}
    g = inputs.from_matrix(J)
    gp = inputs.from_matrix(J[perm])
    s = tx.init(inputs.params())
    u, s1 = jax.jit(tx.update)(g, s, **extra(np.arange(4)))
    up, s1p = jax.jit(tx.update)(gp, s, **extra(perm))
    np.testing.assert_allclose(inputs.flat(u), inputs.flat(up), rtol=1e-4, atol=1e-5)
    w, wp = mtlopt.task_weights(s1), mtlopt.task_weights(s1p)
    np.testing.assert_allclose(np.asarray(w)[perm], np.asarray(wp), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("row", AGGREGATORS, ids=repr)
def test_single_task_returns_its_gradient(row):
    J = inputs.random_matrix(1, seed=3)
    u, _ = _step(row, J, T=1)
    u, g = inputs.flat(u), J[0].astype(np.float64)
    cos = u @ g / (np.linalg.norm(u) * np.linalg.norm(g))
    assert cos > 1 - 1e-5
    if row.t1_scale is not None:
        scale = row.t1_scale(float(inputs.losses(1)[0]))
        np.testing.assert_allclose(u, scale * g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("row", ROWS, ids=repr)
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-20, 1.0, 1e20, 1e30])
def test_zero_tiny_huge_gradients_are_finite(row, scale):
    J = inputs.random_matrix(T, seed=4) * np.float32(scale)
    u, state = _step(row, J)
    u = inputs.flat(u)
    assert np.all(np.isfinite(u))
    assert int(state.skipped) == 0
    if scale == 0.0:
        np.testing.assert_array_equal(u, 0.0)
    elif scale >= 1e20:  # the pre-scaled path gives the same direction as scale 1
        u1 = inputs.flat(_step(row, inputs.random_matrix(T, seed=4))[0])
        cos = u @ u1 / (np.linalg.norm(u) * np.linalg.norm(u1))
        assert cos > 1 - 1e-4


@pytest.mark.parametrize("row", ROWS, ids=repr)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_leaves(row, dtype):
    J = inputs.random_matrix(T, seed=5)
    tx = row.make(T)
    grads = inputs.from_matrix(J, dtype)
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}
    u, _ = jax.jit(tx.update)(grads, tx.init(inputs.params(dtype)), **extra)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, inputs.params(dtype))
    ref, _ = _step(row, np.asarray(inputs.to_matrix(grads).astype(jnp.float32)))
    ref = inputs.flat(ref)
    err = np.linalg.norm(inputs.flat(u) - ref) / np.linalg.norm(ref)
    assert err < 2e-2


@pytest.mark.parametrize("row", HEAVY, ids=repr)
def test_vmap_over_problems(row):
    Js = np.stack([inputs.random_matrix(T, seed=s) for s in range(3)])
    tx = row.make(T)
    state = tx.init(inputs.params())
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}

    def one(J):
        return tx.update(inputs.from_matrix(J), state, **extra)[0]

    batched = jax.jit(jax.vmap(one))(jnp.asarray(Js))
    for i in range(3):
        np.testing.assert_allclose(
            inputs.flat(jax.tree.map(lambda x, i=i: x[i], batched)),
            inputs.flat(one(Js[i])),
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_shape_errors_name_the_method(row):
    tx = row.make(T)
    state = tx.init(inputs.params())
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}
    named = rf"^mtlopt\.{row.method}: "
    bad = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((4, 2))}
    with pytest.raises(ValueError, match=named + r"task_grads leaves disagree .*3 .*4 "):
        tx.update(bad, state, **extra)
    grads = inputs.from_matrix(inputs.random_matrix(T))
    with pytest.raises(ValueError, match=named + r"task_losses must have shape \(3,\).*got \(4,\)"):
        tx.update(grads, state, task_losses=jnp.ones(4))
    with pytest.raises(ValueError, match=named + r"task_mask must have shape \(3,\)"):
        tx.update(grads, state, task_mask=jnp.ones(2, bool), **extra)
    with pytest.raises(ValueError, match=named + r".*scalar"):
        tx.update({"a": jnp.zeros(())}, state, **extra)
    wrong_t = inputs.from_matrix(inputs.random_matrix(T + 1))
    with pytest.raises(ValueError, match=named + r"built with num_tasks=3 but task_grads has 4"):
        tx.update(wrong_t, state, **({"task_losses": jnp.ones(4)} if row.needs_losses else {}))


@pytest.mark.parametrize("row", [r for r in ROWS if r.needs_losses], ids=repr)
def test_missing_losses_is_an_error(row):
    tx = row.make(T)
    grads = inputs.from_matrix(inputs.random_matrix(T))
    with pytest.raises(ValueError, match=r"^mtlopt\.\w+: this method needs task_losses"):
        tx.update(grads, tx.init(inputs.params()))


def test_num_tasks_required_where_state_has_a_task_axis():
    with pytest.raises(ValueError, match=r"mtlopt\.db_mtl: num_tasks is required"):
        mtlopt.db_mtl(None)


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_compiles_once_and_state_round_trips(row):
    tx = row.make(T)
    traces = []
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}

    @jax.jit
    def step(grads, state):
        traces.append(1)
        return tx.update(grads, state, **extra)

    state = tx.init(inputs.params())
    for s in range(4):
        _, state = step(inputs.from_matrix(inputs.random_matrix(T, seed=s)), state)
    assert len(traces) == 1
    restored = pickle.loads(pickle.dumps(jax.tree.map(np.asarray, state)))
    chex.assert_trees_all_equal(restored, jax.tree.map(np.asarray, state))


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_init_from_shape_structs_and_no_host_callbacks(row):
    tx = row.make(T)
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs.params())
    state = jax.eval_shape(tx.init, structs)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(inputs.params()))
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}
    grads = inputs.from_matrix(inputs.random_matrix(T))
    jaxpr = str(
        jax.make_jaxpr(lambda g, s: tx.update(g, s, **extra))(grads, tx.init(inputs.params()))
    )
    assert "callback" not in jaxpr


@pytest.mark.parametrize("row", AGGREGATORS, ids=repr)
def test_chains_with_adam_and_reports_weights(row):
    tx = optax.chain(row.make(T), optax.adam(1e-2))
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}
    grads = inputs.from_matrix(inputs.random_matrix(T))
    with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-promotion clean
        state = tx.init(inputs.params())
        u, state = jax.jit(tx.update)(grads, state, inputs.params(), **extra)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, inputs.params())
    w = mtlopt.task_weights(state)
    assert w is not None and w.shape == (T,) and np.all(np.isfinite(w))


# linear's weights fix T, and db_mtl's state needs it: both always keep their weights.
@pytest.mark.parametrize(
    "row", [r for r in ROWS if not r.needs_num_tasks and r.name != "linear"], ids=repr
)
def test_without_num_tasks_no_weights(row):
    ctor = {
        "mean": mtlopt.mean,
        "cagrad": mtlopt.cagrad,
        "mgda": mtlopt.mgda,
        "pcgrad": mtlopt.pcgrad,
    }[row.method]
    tx = ctor()
    state = tx.init(inputs.params())
    grads = inputs.from_matrix(inputs.random_matrix(T))
    u, state = jax.jit(tx.update)(grads, state, task_losses=inputs.losses(T))
    assert mtlopt.task_weights(state) is None
    assert np.all(np.isfinite(inputs.flat(u)))


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_inject_hyperparams_and_no_gradient_through_weights(row):
    J = inputs.random_matrix(T, seed=6)
    tx = row.make(T)
    state = tx.init(inputs.params())
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}

    def f(scale):
        u, _ = tx.update(inputs.from_matrix(J * scale), state, **extra)
        return sum(jnp.sum(x) for x in jax.tree.leaves(u))

    # Weights are stop_gradient'ed: d/dscale equals the update's sum at scale 1 divided by 1
    # for methods whose weights do not change with a common scale of the gradients.
    g = jax.grad(f)(jnp.float32(1.0))
    assert np.isfinite(g)


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_nonfinite_inputs_skip_the_step(row):
    J = inputs.random_matrix(T, seed=7)
    tx, _ = cached(row, T)
    state = tx.init(inputs.params())
    _, state = _step(row, J, state=state)
    for bad in (np.nan, np.inf, -np.inf):
        Jb = J.copy()
        Jb[1, 3] = bad
        u, new = _step(row, Jb, state=state)
        np.testing.assert_array_equal(inputs.flat(u), 0.0)
        chex.assert_trees_all_equal(new._replace(skipped=state.skipped), state)
        assert int(new.skipped) == int(state.skipped) + 1
    tx_p = row.make(T, nonfinite="propagate")
    state_p = tx_p.init(inputs.params())
    _, state_p = _step(row, J, tx=tx_p, state=state_p)
    Jb = J.copy()
    Jb[1, 3] = np.nan
    u, new_p = _step(row, Jb, tx=tx_p, state=state_p)
    assert not np.all(np.isfinite(inputs.flat(u)))  # the NaN goes on down the chain
    chex.assert_trees_all_equal(new_p._replace(skipped=state_p.skipped), state_p)
    assert int(new_p.skipped) == int(state_p.skipped) + 1


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_task_mask(row):
    """Masked tasks take no part (even with NaN rows and losses); all masked: zero update."""
    J = inputs.random_matrix(T, seed=8)
    Jn = J.copy()
    Jn[1] = np.nan
    mask = jnp.array([True, False, True])
    tx, update = cached(row, T)
    state = tx.init(inputs.params())
    losses = inputs.losses(T).at[1].set(jnp.nan)
    extra = {"task_losses": losses} if row.needs_losses else {}
    u, new = update(inputs.from_matrix(Jn), state, task_mask=mask, **extra)
    u = inputs.flat(u)
    assert np.all(np.isfinite(u)) and int(new.skipped) == 0
    w = np.asarray(mtlopt.task_weights(new))
    assert w[1] == 0.0
    if row.order_free:  # the same as the method run on the two remaining tasks
        sub, sub_update = cached(row, 2)
        keep = np.array([0, 2])
        sub_extra = {"task_losses": inputs.losses(T)[keep]} if row.needs_losses else {}
        ref, _ = sub_update(inputs.from_matrix(J[keep]), sub.init(inputs.params()), **sub_extra)
        np.testing.assert_allclose(u, inputs.flat(ref), rtol=1e-4, atol=1e-5)
    u0, new0 = update(inputs.from_matrix(Jn), state, task_mask=jnp.zeros(T, bool), **extra)
    np.testing.assert_array_equal(inputs.flat(u0), 0.0)
    assert int(new0.count) == int(state.count)


def test_task_mask_leaves_masked_state_alone():
    tx = mtlopt.db_mtl(T)
    state = tx.init(inputs.params())
    update = jax.jit(tx.update)
    _, state = update(
        inputs.from_matrix(inputs.random_matrix(T)), state, task_losses=inputs.losses(T)
    )
    _, new = update(
        inputs.from_matrix(inputs.random_matrix(T, seed=3)),
        state,
        task_losses=inputs.losses(T),
        task_mask=jnp.array([True, False, True]),
    )
    for old, cur in zip(state.ema_grads, new.ema_grads, strict=True):
        np.testing.assert_array_equal(cur[1], old[1])
        assert not np.array_equal(cur[0], old[0])


@pytest.mark.parametrize("row", [r for r in ROWS if r.name != "db_mtl"], ids=repr)
def test_weights_from_gramian_match_the_full_path(row):
    J = inputs.random_matrix(T, seed=9)
    tx, update = cached(row, T)
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}
    _, state = update(inputs.from_matrix(J), tx.init(inputs.params()), **extra)
    G = jnp.asarray(J.astype(np.float64) @ J.T.astype(np.float64), jnp.float32)
    w, _ = jax.jit(lambda G: mtlopt.weights_from_gramian(tx, G, **extra))(G)
    np.testing.assert_allclose(w, mtlopt.task_weights(state), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("row", [r for r in ROWS if not r.variant], ids=repr)
def test_composes_with_apply_if_finite(row):
    """With nonfinite="propagate", optax.apply_if_finite after the aggregator skips Adam."""
    tx = optax.chain(row.make(T, nonfinite="propagate"), optax.apply_if_finite(optax.adam(1e-2), 3))
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}
    J = inputs.random_matrix(T, seed=10)
    Jn = J.copy()
    Jn[0, 0] = np.nan
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(inputs.params())
        update = jax.jit(tx.update)
        _, state = update(inputs.from_matrix(J), state, inputs.params(), **extra)
        u, bad = update(inputs.from_matrix(Jn), state, inputs.params(), **extra)
    np.testing.assert_array_equal(inputs.flat(u), 0.0)
    assert int(bad[1].notfinite_count) == 1
    chex.assert_trees_all_equal(bad[1].inner_state, state[1].inner_state)  # Adam untouched
    chex.assert_trees_all_equal(bad[0]._replace(skipped=state[0].skipped), state[0])


@pytest.mark.parametrize("row", [r for r in ROWS if r.needs_losses], ids=repr)
def test_losses_out_of_the_log_domain_stay_finite(row):
    J = inputs.random_matrix(T, seed=11)
    tx, update = cached(row, T)
    u, _ = update(
        inputs.from_matrix(J), tx.init(inputs.params()), task_losses=jnp.array([-1.0, 0.0, 2.0])
    )
    assert np.all(np.isfinite(inputs.flat(u)))


@pytest.mark.parametrize("row", [r for r in ROWS if not r.variant], ids=repr)
def test_hundred_step_loop_traces_update_once(row):
    tx, _ = cached(row, T)
    traces = []
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}

    def update(grads, state):
        traces.append(1)
        return tx.update(grads, state, **extra)

    step = jax.jit(update)
    state = tx.init(inputs.params())
    grads = inputs.from_matrix(inputs.random_matrix(T, seed=12))
    for _ in range(100):
        _, state = step(grads, state)
    assert len(traces) == 1
    assert int(state.count) == 100


@pytest.mark.parametrize("row", HEAVY, ids=repr)
def test_no_extra_copy_of_the_task_grads_in_a_step(row):
    """In a jitted step (task grads from autodiff, then the method), the method's temporaries
    stay within one parameter copy of those of the task grads alone: no T x P copy, even when
    autodiff leaves a leaf in a transposed layout (vmap of a matmul's VJP does)."""
    T, batch, width = 4, 8, 96
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (16, width)),
        "w2": jax.random.normal(k2, (width, width)),
        "heads": jax.random.normal(k3, (T, width)),
    }
    n = sum(x.size for x in jax.tree.leaves(params))
    x = jnp.ones((batch, 16))

    def losses(p):
        z = jax.nn.relu(jax.nn.relu(x @ p["w1"]) @ p["w2"])
        return jnp.mean((z @ p["heads"].T) ** 2, axis=0)

    tx = row.make(T)
    state = tx.init(params)
    extra = lambda ls: {"task_losses": ls + 1.0} if row.needs_losses else {}

    def grads_only(p):
        return mtlopt.task_value_and_grad(losses)(p)

    def step(p, s):
        ls, g = mtlopt.task_value_and_grad(losses)(p)
        return tx.update(g, s, p, **extra(ls))

    def temp(f, *args):
        mem = jax.jit(f).lower(*args).compile().memory_analysis()
        if mem is None:
            pytest.fail("this backend reports no memory analysis")
        return mem.temp_size_in_bytes / (4 * n)

    # grads_only returns the T copies; step keeps them as temporaries: T more.
    assert temp(step, params, state) <= temp(grads_only, params) + T + 1.0


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_init_after_a_donated_update(row):
    """Every ``init`` builds fresh buffers: donating one state to a jitted update (as training
    steps do) leaves the transformation able to ``init`` again (a restart)."""
    tx = row.make(T)
    grads = inputs.from_matrix(inputs.random_matrix(T))
    extra = {"task_losses": inputs.losses(T)} if row.needs_losses else {}
    update = jax.jit(lambda g, s: tx.update(g, s, inputs.params(), **extra), donate_argnums=1)
    jax.block_until_ready(update(grads, tx.init(inputs.params())))
    state = tx.init(inputs.params())
    jax.block_until_ready(update(grads, state))
