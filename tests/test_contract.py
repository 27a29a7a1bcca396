"""The contract of API.md, run for every method of the registry.

Per row, the numbers come from a few compiled programs (``tests/batch.py``: the plain jitted
update, one vmapped program over every scenario, one side program), and every property is
checked on the host from them; shapes, dtypes, state stability, errors and compile-once are
checked by tracing (``jax.eval_shape``, ``jax.make_jaxpr``, counting traces), which compiles
nothing.

Skeleton-only checks run on the representative rows (``Row.representative``: ``mean`` for
the no-Gramian path, ``cagrad`` for the Gramian and solver path, ``db_mtl`` for the T x P
state and prepare step, ``pcgrad`` for a PRNG key in the state), and on every other
aggregator with -m slow:

* a real run chained with Adam (every row: the chained update's shapes and
  ``task_weights`` by tracing, and its own update's finiteness from the batch);
* ``optax.apply_if_finite`` after ``nonfinite="propagate"`` (every row: the propagate
  semantics in the batch, on low-precision leaves);
* ``weights_from_gramian`` (every row claiming ``gramian_only``: rotated task grads, with the
  same Gramian, give the same weights in the batch);
* the memory temporaries of a jitted step;
* ``init`` after a donated update (every row: ``init`` builds fresh buffers, checked without
  compiling);
* eager runs equal jitted ones (every row with -m slow).

Elsewhere: training, bfloat16 training and checkpoints (``test_training.py``), a NaN in a
large leaf (``test_degenerate.py``) and sharding (``test_sharding.py``) run on the same
representative rows.
"""

from __future__ import annotations

import functools
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt
from tests import batch, inputs
from tests.batch import T, close, cos
from tests.registry import AGGREGATORS, ORDER_FREE, ROWS, cached, params, skeleton, traces

# Every test here reads the batched programs: build the shared eager ops once per worker.
pytestmark = pytest.mark.usefixtures("batch_warm_up")

ALL = params(ROWS)
AGG = params(AGGREGATORS)


def _extra(row, losses=None, mask=None):
    return batch.extra(row, inputs.losses(T) if losses is None else losses, mask)


def _output_like(row, dtype=jnp.float32):
    """What the update is shaped like: params for aggregators, task grads for transforms."""
    if row.kind == "aggregator":
        return inputs.params(dtype)
    return inputs.from_matrix(np.zeros((T, inputs.SIZE), np.float32), dtype)


def _leaves_equal(a, b, err_msg=""):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b), err_msg
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=err_msg)


def _kept(new, old, err_msg=""):
    """The state was left as it was, but for ``skipped`` (one more). (A weight modifier's
    state holds the method's: its ``skipped`` is a property, the method's field.)"""
    if "skipped" not in new._fields:
        _leaves_equal(new._replace(inner_state=old.inner_state), old, err_msg)
        _kept(new.inner_state, old.inner_state, err_msg)
        return
    _leaves_equal(new._replace(skipped=old.skipped), old, err_msg)
    assert int(new.skipped) == int(old.skipped) + 1, err_msg


# ---------------------------------------------------------------- by tracing (no compile)


@pytest.mark.parametrize("row", ALL)
def test_shapes_dtypes_and_state_stable_by_tracing(row):
    """Update shaped like params; the state after an update has init's structure, shapes,
    dtypes and weak types (a ``lax.scan`` carry, traced); init works from shape structs; no
    host callbacks; chained with Adam, task_weights finds (T,) weights."""
    tx = row.make(T)
    p = inputs.params()
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)
    state0 = tx.init(p)
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(tx.init, structs), state0)
    grads = inputs.host_tree(inputs.random_matrix(T))  # numpy: nothing compiles
    kw = _extra(row)
    u, state1 = jax.eval_shape(functools.partial(tx.update, **kw), grads, state0, p)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, _output_like(row))
    chex.assert_trees_all_equal_structs(state1, jax.eval_shape(lambda: state0))
    avals = lambda t: [
        (x.shape, x.dtype, getattr(x, "weak_type", False)) for x in jax.tree.leaves(t)
    ]
    assert avals(state1) == avals(jax.eval_shape(lambda: state0))
    stacked = jax.tree.map(lambda x: np.stack([x, x]), grads)
    step = lambda s, g: (tx.update(g, s, p, **kw)[1], None)
    jax.eval_shape(lambda s: jax.lax.scan(step, s, stacked), state0)  # carry type checked
    jaxpr = str(jax.make_jaxpr(lambda g, s: tx.update(g, s, p, **kw))(grads, state0))
    assert "callback" not in jaxpr
    if row.kind == "aggregator":
        chained = optax.chain(tx, optax.adam(1e-2))
        with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-clean
            cs0 = jax.eval_shape(chained.init, p)
            cu, cs = jax.eval_shape(functools.partial(chained.update, **kw), grads, cs0, p)
        chex.assert_trees_all_equal_shapes_and_dtypes(cu, p)
        w = mtlopt.task_weights(cs)
        assert (w is not None and w.shape == (T,)) == row.stateful_weights


@pytest.mark.parametrize("row", ALL)
def test_shape_errors_name_the_method(row):
    tx = row.make(T)
    state = tx.init(inputs.params())
    kw = _extra(row)
    named = rf"^mtlopt\.{row.method}: "
    shape = lambda g, s=state, **k: jax.eval_shape(functools.partial(tx.update, **k), g, s)
    f32 = np.float32
    bad = {"a": np.zeros((3, 2), f32), "b": np.zeros((4, 2), f32)}  # numpy: nothing compiles
    with pytest.raises(ValueError, match=named + r"task_grads leaves disagree .*3 .*4 "):
        shape(bad, **kw)
    grads = inputs.host_tree(inputs.random_matrix(T))
    with pytest.raises(ValueError, match=named + r"task_losses must have shape \(3,\).*got \(4,\)"):
        shape(grads, task_losses=np.ones(4, f32))
    with pytest.raises(ValueError, match=named + r"task_mask must have shape \(3,\)"):
        shape(grads, task_mask=np.ones(2, bool), **kw)
    with pytest.raises(ValueError, match=named + r".*scalar"):
        shape({"a": np.zeros((), f32)}, **kw)
    if row.kind == "aggregator":
        wrong_t = inputs.host_tree(inputs.random_matrix(T + 1))
        with pytest.raises(
            ValueError, match=named + r"built with num_tasks=3 but task_grads has 4"
        ):
            shape(wrong_t, **batch.extra(row, np.ones(4, f32)))


@pytest.mark.parametrize("row", params([r for r in ROWS if r.needs_losses]))
def test_missing_losses_is_an_error(row):
    tx = row.make(T)
    grads = inputs.from_matrix(inputs.random_matrix(T))
    with pytest.raises(ValueError, match=rf"^mtlopt\.{row.method}: this method needs task_losses"):
        jax.eval_shape(tx.update, grads, tx.init(inputs.params()))


@pytest.mark.parametrize("row", ALL)
def test_init_builds_fresh_buffers(row):
    """Every ``init`` builds new arrays: a state donated to a jitted step (as training steps
    do) deletes its buffers, and a later ``init`` (a restart) must not hand them out again.
    (The donation itself runs on the representative rows.)"""
    tx = row.make(T)
    a, b = tx.init(inputs.params()), tx.init(inputs.params())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x is not y
        if isinstance(x, jax.Array):
            assert x.unsafe_buffer_pointer() != y.unsafe_buffer_pointer()


@pytest.mark.parametrize("row", ALL)
def test_num_tasks(row):
    """Required where the state has a task axis (a ValueError naming the method); elsewhere
    optional, and then no weights are kept (unless the method's weights are fixed)."""
    if row.needs_num_tasks and row.wrapper:
        with pytest.raises(ValueError, match=rf"mtlopt\.{row.wrapper}: num_tasks is required"):
            row.make(T, num_tasks=None).init(batch.LEAF_PARAMS)
        return
    if row.needs_num_tasks:
        with pytest.raises(ValueError, match=rf"mtlopt\.{row.method}: num_tasks is required"):
            row.make(T, num_tasks=None)
        return
    u, state = batch.get(batch.results(row).side["t2"])
    assert np.all(np.isfinite(batch.flat_rows(u)))
    w = mtlopt.task_weights(state)
    assert (w is not None) == (row.weights_without_num_tasks and row.stateful_weights)


# ---------------------------------------------------------------- from the batched programs


@pytest.mark.parametrize("row", params([r for r in ROWS if r.split_invariant]))
def test_plain_jit_matches_the_vmapped_batch(row):
    """The plain jitted update (one leaf, no mask, unbatched) equals the vmapped one (four
    leaves, all-True mask) on every scenario with all tasks present: split invariance, vmap
    and the mask path at once. (jit is compared with jit: eager runs compile every op.)"""
    res = batch.results(row)
    assert res.plain, "no scenario with every task present"
    for name, (u, state, _) in res.plain.items():
        # Solver methods see Gramians that differ in rounding: allow the solver's tolerance.
        close(res.u(name), u, rtol=1e-4, atol=2e-5, err_msg=name)
        w = mtlopt.task_weights(state)
        if w is not None:
            close(res.weights(name), w, rtol=1e-4, atol=1e-5, err_msg=name)
        if row.skips_nonfinite:
            assert int(state.skipped) == int(res.state(name).skipped), name
            assert int(state.count) == int(res.state(name).count), name


@pytest.mark.slow
@pytest.mark.parametrize("row", ALL)
def test_eager_matches_jit(row):
    res = batch.results(row)
    u, state = row.make(T).update(inputs.from_matrix(batch.BASE), res.s0, **_extra(row))
    close(inputs.flat(u), res.u("random"), rtol=1e-5, atol=1e-6)
    w = mtlopt.task_weights(state)
    if w is not None:
        close(w, res.weights("random"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row", ALL)
def test_compiles_once_and_state_round_trips(row):
    """The plain update was traced once for every call above (values, states and losses
    changed, shapes did not); 100 more steps do not trace it again; the state pickles."""
    res = batch.results(row)
    assert traces(row, T) == 1
    tx, update = cached(row, T)
    grads = batch.leaf(inputs.random_matrix(T, seed=12))
    state = tx.init(batch.LEAF_PARAMS)
    for _ in range(100):
        _, state = update(grads, state, batch.LEAF_PARAMS, **_extra(row))
    assert traces(row, T) == 1
    if row.skips_nonfinite:
        assert int(state.count) == 100
    for s in (state, res.s1):
        host = jax.tree.map(np.asarray, s)
        chex.assert_trees_all_equal(pickle.loads(pickle.dumps(host)), host)


@pytest.mark.parametrize("row", params(ORDER_FREE))
def test_task_permutation(row):
    res = batch.results(row)
    close(res.u("permuted"), res.u("random"), rtol=1e-4, atol=1e-5)
    if row.stateful_weights:
        close(res.weights("permuted"), res.weights("random")[batch.PERM], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("row", AGG)
def test_single_task_returns_its_gradient(row):
    """T = 1, as a T = 3 problem with two tasks masked out (their rows NaN)."""
    res = batch.results(row)
    u, g = res.u("one_task"), batch.BASE[0].astype(np.float64)
    assert cos(u, g) > 1 - 1e-5
    if row.t1_scale is not None:
        close(u, row.t1_scale(float(batch.LOSSES[0])) * g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("row", ALL)
def test_zero_tiny_huge_gradients(row):
    """Finite, never skipped; zero gives zero; huge (1e20, 1e30) gives the direction of scale 1
    (the pre-scaled pass 1), and so does tiny (1e-30, 1e-20) where the method claims it (no
    eps in its normalization)."""
    res = batch.results(row)
    u1 = res.u("random")
    for s in batch.SCALES:
        name = f"scale_{s:g}"
        u = res.u(name)
        assert np.all(np.isfinite(u)), name
        if row.skips_nonfinite:
            assert int(res.state(name).skipped) == 0, name
        if s == 0.0:
            np.testing.assert_array_equal(u, 0.0)
        elif s > 1.0 or row.scale_invariant_direction:
            assert cos(u, u1) > 1 - 1e-4, name


@pytest.mark.parametrize("row", ALL)
def test_low_precision_leaves_and_propagate(row):
    """bfloat16 and float16 leaves (one tree, two tasks): each leaf's dtype out, float32
    accuracy of the rounded inputs. With nonfinite="propagate", a NaN step's update is not
    finite (it goes on down the chain) and the state is kept, the step counted in skipped."""
    res = batch.results(row)
    u, state, init = batch.get(res.side["lowp"])
    good = batch.index(u, 0)
    like = _output_like(row) if row.kind == "aggregator" else batch.index(u, 0)
    want = jax.tree.map(lambda x, d: jax.ShapeDtypeStruct(x.shape, d), like, batch.LOWP_DTYPES)
    chex.assert_trees_all_equal_shapes_and_dtypes(good, want)
    got = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(good)])
    ref = batch.flat_rows(batch.get(res.side["t2"])[0])[batch.T2_ROWS.index("lowp_ref")]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2
    assert not np.all(np.isfinite(batch.flat_rows(u)[1]))
    if row.skips_nonfinite:
        _kept(batch.index(state, 1), init)
        assert int(batch.index(state, 0).skipped) == 0


@pytest.mark.parametrize("row", ALL)
def test_no_gradient_through_the_weights(row):
    """Differentiating an update (reverse mode) works and is finite; with the weights held fixed
    (stop_gradient), d/ds sum(update(s * J)) = sum(update(J)) from the initial state."""
    res = batch.results(row)
    checked = 0
    for s in res.scen:
        i = res.index[s.name]
        if s.start != "init" or not np.all(np.isfinite(s.J)):
            continue
        if row.needs_losses and not np.all(np.isfinite(s.losses)):
            continue
        if row.skips_nonfinite and int(res.state(s.name).skipped) > 0:
            continue  # a skipped step's vmapped select differentiates 0 * inf
        ds, total = res.main_ds[i], res.main_u[i].sum()
        assert np.isfinite(ds), s.name
        if row.grad_linear:
            # Plus the rounding of the combination itself: where the update cancels to nearly
            # 0 (a one-coordinate group with 0 in its hull), forward and backward round apart.
            w = res.weights(s.name)
            w = np.ones(T) if w is None else np.abs(np.reshape(w, (-1, T))).max(axis=0)
            terms = float(w @ np.abs(np.asarray(s.J, np.float64)).sum(axis=1))
            tol = 1e-4 * np.abs(res.main_u[i]).sum() + 64 * np.finfo(np.float32).eps * terms
            assert abs(ds - total) <= tol, (s.name, ds, total)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("row", params([r for r in ROWS if r.skips_nonfinite]))
def test_nonfinite_inputs_skip_the_step(row):
    """NaN, inf or -inf in the task grads (or a NaN loss): zero update, the state (after a
    first step) left as it was, the step counted in skipped. Batched and plain."""
    res = batch.results(row)
    names = [f"bad_{b}" for b in batch.BAD] + (["nan_loss"] if row.needs_losses else [])
    for name in names:
        np.testing.assert_array_equal(res.u(name), 0.0, err_msg=name)
        _kept(res.state(name), res.start(name), name)
        u, new, start = res.plain[name]
        np.testing.assert_array_equal(u, 0.0, err_msg=name)
        _kept(new, start, name)


@pytest.mark.parametrize("row", ALL)
def test_task_mask(row):
    """Masked tasks take no part (even with NaN rows and losses): the update equals the method
    on the remaining tasks (order-free methods), their weight is 0, their state rows are kept;
    all masked: zero update, count unchanged."""
    res = batch.results(row)
    u2 = batch.get(res.side["t2"])[0]
    t2 = batch.flat_rows(u2)
    for k, name in enumerate(batch.T2):
        u = res.u(name)
        assert np.all(np.isfinite(u)), name
        if row.skips_nonfinite:
            assert int(res.state(name).skipped) == 0, name
        w = res.weights(name)
        if w is not None:  # (T,), or (K, T) with groups: the task's column
            assert np.all(np.take(w, int(name[-1]), axis=-1) == 0.0), name
        if row.order_free and row.kind == "aggregator":
            close(u, t2[k], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(res.u("all_masked"), 0.0)
    if row.skips_nonfinite:
        assert int(res.state("all_masked").count) == int(res.start("all_masked").count)
    new, old = res.state("mask_1_step1"), res.start("mask_1_step1")
    for field in row.task_state:
        for cur, was in zip(jax.tree.leaves(getattr(new, field)),
                            jax.tree.leaves(getattr(old, field)), strict=True):  # fmt: skip
            np.testing.assert_array_equal(cur[1], was[1], err_msg=field)
            assert not np.array_equal(cur[0], was[0]), field


@pytest.mark.parametrize("row", params([r for r in ROWS if r.fixed_weights is not None]))
def test_fixed_weights_everywhere(row):
    """A fixed scalarization is sum_t w_t g_t on every scenario (masked tasks: w_t = 0)."""
    res = batch.results(row)
    w = row.fixed_weights(T).astype(np.float64)
    checked = 0
    for s in res.scen:
        Jz = np.where(s.mask[:, None], s.J, 0.0).astype(np.float64)
        if not np.all(np.isfinite(Jz)) or (row.needs_losses and not np.isfinite(s.losses).all()):
            continue
        close(res.u(s.name), (w * s.mask) @ Jz, rtol=1e-5, atol=1e-6, err_msg=s.name)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("row", params([r for r in ROWS if r.gramian_only]))
def test_weights_depend_on_the_gramian_only(row):
    """Task grads rotated by an orthogonal Q (the same Gramian) give the same weights, so the
    update is rotated too: what mtlopt.weights_from_gramian relies on."""
    res = batch.results(row)
    if row.stateful_weights:
        close(res.weights("rotated"), res.weights("random"), rtol=1e-4, atol=1e-5)
    if row.kind == "aggregator":
        Q, _ = np.linalg.qr(np.random.default_rng(9).normal(size=(inputs.SIZE, inputs.SIZE)))
        close(res.u("rotated"), res.u("random") @ Q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("row", params([r for r in ROWS if r.needs_losses]))
def test_losses_out_of_the_log_domain_stay_finite(row):
    res = batch.results(row)
    assert np.all(np.isfinite(res.u("losses_out_of_domain")))


# ---------------------------------------------------------------- skeleton-only, representatives


@pytest.mark.parametrize("row", skeleton())
def test_chains_with_adam_and_reports_weights(row):
    tx = optax.chain(row.make(T), optax.adam(1e-2))
    grads = inputs.from_matrix(inputs.random_matrix(T))
    with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-promotion clean
        state = jax.jit(tx.init)(inputs.params())
        u, state = jax.jit(tx.update)(grads, state, inputs.params(), **_extra(row))
    chex.assert_trees_all_equal_shapes_and_dtypes(u, inputs.params())
    assert np.all(np.isfinite(inputs.flat(u)))
    w = mtlopt.task_weights(state)
    if row.stateful_weights:
        assert w is not None and w.shape == (T,) and np.all(np.isfinite(w))


@pytest.mark.parametrize("row", skeleton([r for r in AGGREGATORS if r.gramian_only]))
def test_weights_from_gramian_match_the_full_path(row):
    res = batch.results(row)
    tx = row.make(T)
    J = batch.BASE
    G = jnp.asarray(J.astype(np.float64) @ J.T.astype(np.float64), jnp.float32)
    w, _ = jax.jit(lambda G: mtlopt.weights_from_gramian(tx, G, **_extra(row)))(G)
    close(w, res.weights("random"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("row", skeleton())
def test_composes_with_apply_if_finite(row):
    """With nonfinite="propagate", optax.apply_if_finite after the aggregator skips Adam."""
    tx = optax.chain(row.make(T, nonfinite="propagate"), optax.apply_if_finite(optax.adam(1e-2), 3))
    J = inputs.random_matrix(T, seed=10)
    Jn = J.copy()
    Jn[0, 0] = np.nan
    with jax.numpy_dtype_promotion("standard"):
        state = jax.jit(tx.init)(inputs.params())
        update = jax.jit(tx.update)
        _, state = update(inputs.from_matrix(J), state, inputs.params(), **_extra(row))
        u, bad = update(inputs.from_matrix(Jn), state, inputs.params(), **_extra(row))
    np.testing.assert_array_equal(inputs.flat(u), 0.0)
    assert int(bad[1].notfinite_count) == 1
    chex.assert_trees_all_equal(bad[1].inner_state, state[1].inner_state)  # Adam untouched
    _equal_but_skipped(bad[0], state[0])


def _equal_but_skipped(new, old):
    """The states are equal but for ``skipped`` (a weight modifier's: inside its inner state)."""
    if "skipped" not in new._fields:
        chex.assert_trees_all_equal(new._replace(inner_state=old.inner_state), old)
        _equal_but_skipped(new.inner_state, old.inner_state)
        return
    chex.assert_trees_all_equal(new._replace(skipped=old.skipped), old)


@pytest.mark.parametrize("row", skeleton())
def test_no_extra_copy_of_the_task_grads_in_a_step(row):
    """In a jitted step (task grads from autodiff, then the method), the method's temporaries
    stay within one parameter copy of those of the task grads alone: no T x P copy, even when
    autodiff leaves a leaf in a transposed layout (vmap of a matmul's VJP does)."""
    T, batch_size, width = 4, 8, 96
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (16, width)),
        "w2": jax.random.normal(k2, (width, width)),
        "heads": jax.random.normal(k3, (T, width)),
    }
    n = sum(x.size for x in jax.tree.leaves(params))
    x = jnp.ones((batch_size, 16))

    def losses(p):
        z = jax.nn.relu(jax.nn.relu(x @ p["w1"]) @ p["w2"])
        return jnp.mean((z @ p["heads"].T) ** 2, axis=0)

    tx = row.make(T)
    state = tx.init(params)
    extra = lambda ls: batch.extra(row, ls + 1.0)

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


@pytest.mark.parametrize("row", skeleton())
def test_init_after_a_donated_update(row):
    """Donating one state to a jitted update (as training steps do) leaves the transformation
    able to ``init`` again (a restart)."""
    tx = row.make(T)
    grads = inputs.from_matrix(inputs.random_matrix(T))
    update = jax.jit(lambda g, s: tx.update(g, s, inputs.params(), **_extra(row)), donate_argnums=1)
    jax.block_until_ready(update(grads, tx.init(inputs.params())))
    state = tx.init(inputs.params())
    jax.block_until_ready(update(grads, state))
