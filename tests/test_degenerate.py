"""Degenerate geometry for every method: identical, opposite, zero and rank-deficient tasks,
norms from 1e-20 to 1e20, many tasks. Finite updates that match each paper's limit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import mtlopt
from tests.registry import HEAVY, ROWS, cached


def _run(row, J, losses=None):
    T, P = J.shape
    tx, update = cached(row, T)
    extra = {}
    if row.needs_losses:
        extra["task_losses"] = jnp.ones(T) if losses is None else losses
    u, state = update({"p": jnp.asarray(J, jnp.float32)}, tx.init({"p": jnp.zeros(P)}), **extra)
    u = np.asarray(u["p"], np.float64)
    assert np.all(np.isfinite(u)), (row, u)
    assert int(state.skipped) == 0
    return u, state


# The update each method gives when every task has the same gradient g (losses all 1).
IDENTICAL = {
    "mean": 1.0,
    "linear": None,
    "cagrad": 1.4 / 1.16,
    "cagrad_rescale0": 1.5,
    "cagrad_c0": 1.0,
    "mgda": 1.0,
    "mgda_l2": None,
    "mgda_loss+": None,
    "pcgrad": "T",
    "db_mtl": "0.1T",
}


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_identical_tasks(row):
    g = np.random.default_rng(0).normal(size=8)
    J = np.stack([g] * 3)
    u, _ = _run(row, J)
    factor = IDENTICAL[row.name]
    if factor == "T":
        factor = 3.0
    elif factor == "0.1T":
        factor = 0.3 / (1 + 1e-8)
    if factor is None:  # only the direction is fixed
        assert u @ g / (np.linalg.norm(u) * np.linalg.norm(g)) > 1 - 1e-5
    else:
        np.testing.assert_allclose(u, factor * g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_exactly_opposite_tasks(row):
    g = np.random.default_rng(1).normal(size=8).astype(np.float32)
    u, _ = _run(row, np.stack([g, -g]))
    if row.name == "linear":  # weights (1, 2): the update is -g
        np.testing.assert_allclose(u, -g, rtol=1e-5)
    else:  # mean, CAGrad (g0 = 0), MGDA (0 in the hull), PCGrad, DB-MTL: all cancel
        np.testing.assert_allclose(u, 0.0, atol=1e-6)


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_one_zero_task_and_all_zero(row):
    J = np.random.default_rng(2).normal(size=(3, 8))
    J[1] = 0.0
    u, _ = _run(row, J)
    if row.name.startswith("mgda") and row.name != "mgda_loss+" and row.name != "mgda_l2":
        np.testing.assert_allclose(u, 0.0, atol=1e-6)  # 0 is in the hull: Pareto-stationary
    u, _ = _run(row, np.zeros((3, 8)))
    np.testing.assert_array_equal(u, 0.0)


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_rank_deficient_many_tasks(row):
    rng = np.random.default_rng(3)
    J = rng.normal(size=(64, 3)) @ rng.normal(size=(3, 10))  # rank 3, 64 tasks
    _run(row, J)


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_256_tasks(row):
    rng = np.random.default_rng(4)
    _run(row, rng.normal(size=(256, 40)))


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_norms_from_1e_minus_20_to_1e20(row):
    rng = np.random.default_rng(5)
    scales = np.logspace(-20, 20, 5)
    J = rng.normal(size=(5, 8)) * scales[:, None]
    u, _ = _run(row, J)
    if row.name == "mgda":
        # The min-norm point sits at the tiniest gradients. In float32 the Gramian is
        # pre-scaled by the largest norm (1e20), so tasks more than ~1e19 below it count as
        # zero (documented): the answer is then in the hull of those, here the first three.
        assert np.linalg.norm(u) <= 1.01 * np.linalg.norm(J[2])


@st.composite
def task_matrices(draw):
    T = draw(st.sampled_from([1, 2, 3, 5]))  # few shapes: one compilation each
    P = 5  # fixed, so each method compiles once per T (the cache in registry.cached)
    entries = draw(st.lists(st.floats(-1.0, 1.0, width=32), min_size=T * P, max_size=T * P))
    J = np.asarray(entries, np.float64).reshape(T, P)
    exps = draw(st.lists(st.integers(-20, 20), min_size=T, max_size=T))
    J = J * (10.0 ** np.asarray(exps, np.float64))[:, None]
    kind = draw(st.sampled_from(["plain", "opposite", "duplicate", "zero_row"]))
    if T >= 2 and kind == "opposite":
        J[1] = -J[0]
    elif T >= 2 and kind == "duplicate":
        J[1] = J[0]
    elif kind == "zero_row":
        J[0] = 0.0
    return J.astype(np.float32)


@pytest.mark.parametrize("row", HEAVY, ids=repr)
@given(J=task_matrices())
def test_property_finite_never_nan(row, J):
    _u, state = _run(row, J, losses=jnp.ones(J.shape[0]))
    w = mtlopt.task_weights(state)
    assert np.all(np.isfinite(np.asarray(w)))


@pytest.mark.parametrize("row", [r for r in ROWS if r.name in ("mgda",)], ids=repr)
@given(J=task_matrices())
# Found by hypothesis: a trace of 2e38 made the normalising factor 1e-38, subnormal, flushed to
# zero on XLA:CPU; the zero Gramian then gave the uniform weights instead of the zero task's.
@example(J=np.array([[0, 0, 0, 1e19, 1e19], [0, 0, 0, 0, 0]], np.float32))
def test_property_mgda_non_conflicting(row, J):
    u, _ = _run(row, J)
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


@pytest.mark.parametrize("row", [r for r in ROWS if r.kind == "aggregator"], ids=repr)
def test_a_nan_in_a_large_leaf_skips_the_step(row):
    """A NaN in a 2**14-column leaf: XLA:CPU's vectorised max reduction dropped it, and mean()
    let the NaN update through, while the small leaves of the contract tests caught it."""
    T, P = 3, 1 << 14
    J = np.random.default_rng(0).standard_normal((T, P)).astype(np.float32)
    tx = row.make(T)
    state = tx.init(jnp.zeros(P))
    kw = {"task_losses": jnp.ones(T)} if row.needs_losses else {}
    update = jax.jit(lambda g, s: tx.update(g, s, **kw))
    for pos in (0, 5, P - 1):
        Jb = J.copy()
        Jb[1, pos] = np.nan
        u, new = update(jnp.asarray(Jb), state)
        np.testing.assert_array_equal(np.asarray(u), 0.0)
        assert int(new.skipped) == int(state.skipped) + 1
