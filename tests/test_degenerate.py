"""Degenerate geometry for every method: identical, opposite, zero and rank-deficient tasks,
norms from 1e-20 to 1e20, many tasks. Finite updates that match each paper's limit.

The scenarios run in the batched programs of ``tests/batch.py`` (one compilation for all of a
row's scenarios); the hypothesis properties call the row's plain jitted update (compiled
once, shared with the contract suite). A NaN in a large leaf runs on the representative rows
(``Row.representative``), every other aggregator with -m slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import mtlopt
from tests import batch
from tests.batch import T, close, cos
from tests.registry import AGGREGATORS, ROWS, cached, heavy, params, skeleton

# Every test here reads the batched programs: build the shared eager ops once per worker.
pytestmark = pytest.mark.usefixtures("batch_warm_up")

ALL = params(ROWS)
AGG = params(AGGREGATORS)


def _finite_not_skipped(res, name):
    u = res.u(name)
    assert np.all(np.isfinite(u)), (name, u)
    if res.row.skips_nonfinite:
        assert int(res.state(name).skipped) == 0, name
    return u


@pytest.mark.parametrize("row", AGG)
def test_identical_tasks(row):
    """Every task with the same gradient g (losses all 1): each paper's multiple of g."""
    res = batch.results(row)
    u = _finite_not_skipped(res, "identical")
    g = res.scen[res.index["identical"]].J[0].astype(np.float64)
    if row.identical_scale is None:  # only the direction is fixed
        assert cos(u, g) > 1 - 1e-5
    else:
        close(u, row.identical_scale(T, 1.0) * g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("row", AGG)
def test_exactly_opposite_tasks(row):
    """Two tasks, g and -g: as two tasks of three (the third masked) and as T = 2."""
    res = batch.results(row)
    s = res.scen[res.index["opposite"]]
    u2 = batch.flat_rows(batch.get(res.side["t2"])[0])[batch.T2_ROWS.index("opposite")]
    for u, J, w in (
        (_finite_not_skipped(res, "opposite"), s.J[:2], None),
        (u2, s.J[:2], None if row.fixed_weights is None else row.fixed_weights(2)),
    ):
        assert np.all(np.isfinite(u))
        if row.cancels_opposite:  # mean, CAGrad (g0 = 0), MGDA (0 in the hull), PCGrad, DB-MTL
            np.testing.assert_allclose(u, 0.0, atol=1e-6 * np.abs(J).max())
        elif row.fixed_weights is not None:
            w = row.fixed_weights(T)[:2] if w is None else w
            close(u, w.astype(np.float64) @ J.astype(np.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row", ALL)
def test_one_zero_task_and_all_zero(row):
    res = batch.results(row)
    u = _finite_not_skipped(res, "one_zero")
    if row.zero_task_stationary:  # 0 is in the hull: Pareto-stationary
        np.testing.assert_allclose(u, 0.0, atol=1e-6)
    np.testing.assert_array_equal(_finite_not_skipped(res, "scale_0"), 0.0)


@pytest.mark.parametrize("row", ALL)
def test_rank_deficient_many_tasks(row):
    """64 tasks of rank 3."""
    u, state = batch.get(batch.results(row).side["t64"])
    assert np.all(np.isfinite(batch.flat_rows(jax.tree.map(lambda x: x[None], u))))
    if row.skips_nonfinite:
        assert int(state.skipped) == 0


@pytest.mark.slow
@pytest.mark.parametrize("row", ALL)
def test_256_tasks(row):
    rng = np.random.default_rng(4)
    tx = row.make(256)
    kw = batch.extra(row, jnp.ones(256))
    J = jnp.asarray(rng.normal(size=(256, 40)), jnp.float32)
    update = jax.jit(lambda g, s: tx.update(g, s, **kw))
    u, _ = update({"p": J}, tx.init({"p": jnp.zeros(40)}))
    assert np.all(np.isfinite(np.asarray(u["p"])))


@pytest.mark.parametrize("row", ALL)
def test_norms_from_1e_minus_20_to_1e20(row):
    res = batch.results(row)
    u = _finite_not_skipped(res, "norms_20")
    _finite_not_skipped(res, "norms_10")
    if row.non_conflicting:
        # The min-norm point sits at the tiniest gradients. In float32 the Gramian is
        # pre-scaled by the largest norm (1e20), so tasks more than ~1e19 below it count as
        # zero (documented): the answer is then in the hull of those, here the first two.
        J = res.scen[res.index["norms_20"]].J.astype(np.float64)
        assert np.linalg.norm(u) <= 1.01 * np.linalg.norm(J[1])


@st.composite
def task_matrices(draw):
    """(T, SIZE) task grads: entries in [-1, 1] times 10**e per task, some rows opposite,
    duplicated or zero. One shape: the row's plain jitted update compiles once."""
    P = batch.inputs.SIZE
    entries = draw(st.lists(st.floats(-1.0, 1.0, width=32), min_size=T * P, max_size=T * P))
    J = np.asarray(entries, np.float64).reshape(T, P)
    exps = draw(st.lists(st.integers(-20, 20), min_size=T, max_size=T))
    J = J * (10.0 ** np.asarray(exps, np.float64))[:, None]
    kind = draw(st.sampled_from(["plain", "opposite", "duplicate", "zero_row", "zero_rows"]))
    if kind == "opposite":
        J[1] = -J[0]
    elif kind == "duplicate":
        J[1] = J[0]
    elif kind == "zero_row":
        J[0] = 0.0
    elif kind == "zero_rows":
        J[1:] = 0.0
    return J.astype(np.float32)


def _plain(row, J):
    tx, update = cached(row, T)
    kw = batch.extra(row, jnp.ones(T))
    u, state = update(batch.leaf(J), tx.init(batch.LEAF_PARAMS), batch.LEAF_PARAMS, **kw)
    u = np.asarray(u["all"], np.float64)
    assert np.all(np.isfinite(u)), (row, u)
    if row.skips_nonfinite:
        assert int(state.skipped) == 0
    return u, state


@pytest.mark.parametrize("row", heavy(ROWS))
@given(J=task_matrices())
def test_property_finite_never_nan(row, J):
    _u, state = _plain(row, J)
    w = mtlopt.task_weights(state)
    if w is not None:
        assert np.all(np.isfinite(np.asarray(w)))


_FOUND = np.array([[0, 0, 0, 1e19, 1e19], [0] * 5, [0] * 5], np.float32)


@pytest.mark.parametrize("row", params([r for r in ROWS if r.non_conflicting]))
@given(J=task_matrices())
# Found by hypothesis: a trace of 2e38 made the normalising factor 1e-38, subnormal, flushed to
# zero on XLA:CPU; the zero Gramian then gave the uniform weights instead of the zero task's.
@example(J=np.pad(_FOUND, ((0, 0), (0, batch.inputs.SIZE - 5))))
def test_property_non_conflicting(row, J):
    u, _ = _plain(row, J)
    G = J.astype(np.float64) @ J.T.astype(np.float64)
    scale = np.trace(G) / len(J) + 1e-300
    # <g_t, d> >= ||d||^2 up to the solver's tolerance in units of trace(G) / T.
    assert np.all(J.astype(np.float64) @ u >= u @ u - 1e-3 * scale)


def test_all_finite_is_exact_at_the_float32_limits():
    """No false alarm on the largest finite values (a plain sum would overflow), and any NaN,
    inf or -inf (alone, or inf and -inf together) is caught, in float32 and bfloat16 leaves."""
    from mtlopt._src import tree

    check = jax.jit(tree.all_finite)
    big = np.full((1000, 1000), np.finfo(np.float32).max, np.float32)
    assert bool(check({"a": big, "b": -big[0]}))
    bf_max = jnp.full((1000, 1000), jnp.finfo(jnp.bfloat16).max, jnp.bfloat16)
    assert bool(check([bf_max, -bf_max]))
    assert bool(check([np.zeros(3, np.float32), np.full(2, 1e-45, np.float32)]))
    for bad in ([np.nan], [np.inf], [-np.inf], [np.inf, -np.inf]):
        x = big.copy()
        x.flat[: len(bad)] = bad
        assert not bool(check({"a": np.ones(4, np.float32), "b": x}))
        y = np.asarray(bf_max, np.float32)
        y.flat[: len(bad)] = bad
        assert not bool(check([jnp.asarray(y, jnp.bfloat16)]))


@pytest.mark.parametrize("row", skeleton())
def test_a_nan_in_a_large_leaf_skips_the_step(row):
    """A NaN in a 2**14-column leaf: XLA:CPU's vectorised max reduction dropped it, and mean()
    let the NaN update through, while the small leaves of the contract tests caught it.
    (Skeleton-only: the finiteness checks of the no-Gramian, Gramian and prepare paths.)"""
    T, P = 3, 1 << 14
    J = np.random.default_rng(0).standard_normal((T, P)).astype(np.float32)
    tx = row.make(T)
    state = tx.init(jnp.zeros(P))
    kw = batch.extra(row, jnp.ones(T))
    update = jax.jit(lambda g, s: tx.update(g, s, **kw))
    for pos in (0, 5, P - 1):
        Jb = J.copy()
        Jb[1, pos] = np.nan
        u, new = update(jnp.asarray(Jb), state)
        np.testing.assert_array_equal(np.asarray(u), 0.0)
        assert int(new.skipped) == int(state.skipped) + 1
