"""NTKMTL (``mtlopt.ntkmtl``) against a float64 numpy transcription of the authors' rule.

The authors' code (github.com/jianke0604/NTKMTL, ``methods/weight_methods.py``, ``NTKMTL``):
with ``G = J J^T``, ``w = (trace(G) / diag(G)) ** ntk_exp``, ``g = T * (J^T w)``, then
``clip_grad_norm_(shared, max_norm)``. mtlopt keeps the weighted sum without the factor T (see
the docstring); the recipe ``ntkmtl(max_norm=m / T)`` then ``optax.scale(T)`` reproduces the
authors' update, and is tested here against the transcription itself.

The rule is a closed form, so the update is judged tightly: ``|d - d*| <= RTOL |d*| + floor``
with ``floor = FLOOR * eps * sum_t w*_t |g_t|`` (the rounding of the squared norms, carried
through the weights, and of the combination, where the weighted gradients cancel).

Compiled programs (``-m "not slow"``): one per (T, dtype, clip or not) in the accuracy
tests, each a ``jax.vmap`` over every problem; one each for the authors' recipe, ``groups=``,
``weights_from_gramian`` and the traced hyperparameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt

KINDS = ("random", "conflicting", "collinear", "scaled3", "scaled5", "zero", "masked")
SEEDS = range(3)
P = (7, 9)  # two leaves: 16 parameters
RTOL = {"float32": 1e-5, "float64": 1e-12}
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}
FLOOR = 16.0


# ----------------------------------------------------------------------------------------------
# The reference (float64 numpy)


def ref(J, ntk_exp=0.5, max_norm=1.0, mask=None, times_T=False):
    """``(d, w)``: the update and the weights on the raw gradients (the clip folded in).

    ``times_T``: the authors' update, ``clip(T * J^T w)``. Masked rows (``mask`` False) are
    dropped, as the authors' code never saw them; a zero gradient gets weight 0 (their code:
    NaN)."""
    J = np.asarray(J, np.float64)
    T = J.shape[0]
    mask = np.ones(T, bool) if mask is None else np.asarray(mask)
    Ja = np.where(mask[:, None], J, 0.0)
    diag = np.einsum("tp,tp->t", Ja, Ja)
    trace = diag.sum()
    w = np.zeros(T)
    live = diag > 0
    w[live] = (trace / diag[live]) ** ntk_exp
    d = (T if times_T else 1) * (w @ Ja)
    n = np.linalg.norm(d)
    f = max_norm / n if max_norm and n > max_norm else 1.0
    return d * f, w * f * (T if times_T else 1)


def problem(kind, T, seed):
    """``(J, mask)``: task gradients ``(T, sum(P))`` float64 and the task mask."""
    rng = np.random.default_rng([seed, T, sum(map(ord, kind))])
    n = sum(P)
    mask = np.ones(T, bool)
    J = rng.normal(size=(T, n))
    if kind == "conflicting":
        for k in range(0, T - 1, 2):
            J[k + 1] = -rng.uniform(0.3, 3.0) * J[k] + 0.05 * rng.normal(size=n)
    elif kind == "collinear":
        s = rng.uniform(0.2, 2.0, size=T) * rng.choice([-1.0, 1.0], size=T)
        J = np.outer(s, rng.normal(size=n)) + 1e-3 * rng.normal(size=(T, n))
    elif kind.startswith("scaled"):  # norms spread over 10^span, both ends hit
        span = float(kind[len("scaled") :])
        J /= np.linalg.norm(J, axis=1, keepdims=True)
        e = rng.uniform(0.0, span, size=T)
        e[rng.permutation(T)[: min(T, 2)]] = [0.0, span][: min(T, 2)]
        J *= (10.0 ** (e - span / 2))[:, None]
    elif kind == "zero":  # one task's gradient is exactly zero
        J[rng.integers(T)] = 0.0
    elif kind == "masked" and T > 1:  # a masked task whose row is NaN
        t = rng.integers(T)
        J[t] = np.nan
        mask[t] = False
    return J, mask


def cases(T, kinds=KINDS, seeds=SEEDS):
    out = [(k, s) for k in kinds for s in seeds]
    return out, [problem(k, T, s) for k, s in out]


def batched(T, dtype, ntk_exp=0.5, max_norm=1.0):
    """``(J, mask) -> (d, w, skipped)`` over a leading batch axis: one compiled program per
    (T, dtype, hyperparameters), shared by the tests."""
    return _batched(T, dtype, ntk_exp, max_norm)


@functools.cache
def _batched(T, dtype, ntk_exp, max_norm):
    tx = mtlopt.ntkmtl(ntk_exp, max_norm, num_tasks=T)
    params = {"a": jnp.zeros(P[0], dtype), "b": jnp.zeros(P[1], dtype)}

    def one(J, mask):
        grads = {"a": J[:, : P[0]], "b": J[:, P[0] :]}
        u, s = tx.update(grads, tx.init(params), task_mask=mask)
        return jnp.concatenate([u["a"], u["b"]]), mtlopt.task_weights(s), s.skipped

    return jax.jit(jax.vmap(one))


def run(T, dtype, problems, **kw):
    J = np.stack([p[0] for p in problems])
    M = np.stack([p[1] for p in problems])
    with jax.enable_x64(dtype == "float64"):
        d, w, skipped = batched(T, dtype, **kw)(np.asarray(J, dtype), M)
        assert d.dtype == jnp.dtype(dtype)
        return np.asarray(d, np.float64), np.asarray(w, np.float64), np.asarray(skipped)


def worst(T, dtype, ntk_exp=0.5, max_norm=1.0, kinds=KINDS, seeds=SEEDS):
    """Checks every case; returns the worst ``|d - d*| / |d*|`` per kind."""
    names, problems = cases(T, kinds, seeds)
    d, w, skipped = run(T, dtype, problems, ntk_exp=ntk_exp, max_norm=max_norm)
    assert not skipped.any()
    out = {}
    for i, ((kind, seed), (J, mask)) in enumerate(zip(names, problems, strict=True)):
        J32 = np.where(mask[:, None], J, 0.0).astype(dtype).astype(np.float64)  # what it saw
        d_star, w_star = ref(J32, ntk_exp, max_norm, mask)
        err = np.linalg.norm(d[i] - d_star)
        size = np.linalg.norm(d_star)
        floor = FLOOR * EPS[dtype] * float(w_star @ np.linalg.norm(J32, axis=1))
        assert err <= RTOL[dtype] * size + floor, (kind, seed, err, size, floor)
        # The clip's factor 1 / |d| carries the update's own rounding into the weights.
        wtol = 64 * EPS[dtype] + (bool(max_norm and size) and (RTOL[dtype] * size + floor) / size)
        np.testing.assert_allclose(w[i], w_star, rtol=wtol, atol=0, err_msg=kind)
        assert np.all(w[i][~mask] == 0)
        rel = err / size if size > 0 else float(err > 0)
        out[kind] = max(out.get(kind, 0.0), rel)
    return out


# ----------------------------------------------------------------------------------------------
# Accuracy against the transcription


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_matches_the_rule(dtype, max_norm):
    """T = 5, every kind, with and without the clip (two programs: squared norms only, and the
    full Gramian for the clip's norm)."""
    errs = worst(5, dtype, max_norm=max_norm)
    print(dtype, max_norm, {k: f"{v:.1e}" for k, v in errs.items()})


@pytest.mark.parametrize("T", [1, 2])
def test_few_tasks(T):
    worst(T, "float32", max_norm=0.0, kinds=("random", "conflicting", "scaled3", "zero"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("T", [3, 16, 64])
def test_matches_the_rule_more_tasks(T, dtype):
    for max_norm in (0.0, 1.0):
        worst(T, dtype, max_norm=max_norm, seeds=range(6))


@pytest.mark.slow
def test_other_exponents():
    for p in (0.0, 0.75, 1.0):
        worst(5, "float32", ntk_exp=p, max_norm=0.0, kinds=("random", "scaled3", "zero"))


def test_the_authors_update_by_the_documented_recipe():
    """``ntkmtl(max_norm=m / T)`` then ``optax.scale(T)`` is the authors' ``clip(T J^T w, m)``,
    clipped or not (small gradients stay below the clip after the factor T)."""
    T = 4
    names, problems = cases(T, kinds=("random", "conflicting", "scaled3"))
    J = np.stack([p[0] for p in problems])
    J[::2] *= 1e-3  # half of them below the clip
    tx = optax.chain(mtlopt.ntkmtl(max_norm=1.0 / T), optax.scale(float(T)))
    params = {"w": jnp.zeros(J.shape[-1])}
    u = jax.jit(jax.vmap(lambda g: tx.update({"w": g}, tx.init(params))[0]["w"]))(
        jnp.asarray(J, jnp.float32)
    )
    clipped = 0
    for i in range(len(names)):
        d_star, _ = ref(J[i].astype(np.float32), 0.5, 1.0, times_T=True)
        clipped += np.isclose(np.linalg.norm(d_star), 1.0)
        err = np.linalg.norm(np.asarray(u[i], np.float64) - d_star)
        assert err <= 1e-5 * np.linalg.norm(d_star), (names[i], err)
    assert 0 < clipped < len(names)


# ----------------------------------------------------------------------------------------------
# Hand-worked cases, edges


def test_two_tasks_by_hand():
    """g1 = (3, 0), g2 = (0, 4): trace 25, w = (5/3, 5/4), d = (5, 5) of norm 5 sqrt(2); the
    clip at 1 gives (1, 1) / sqrt(2) and the weights times 1 / (5 sqrt(2)); ntk_exp = 1 gives
    w = (25/9, 25/16), d = (25/3, 25/4)."""
    J = np.zeros((1, 2, 16), np.float32)
    J[0, 0, 0], J[0, 1, 1] = 3.0, 4.0
    mask = np.ones((1, 2), bool)

    def go(**kw):
        d, w, _ = batched(2, "float32", **kw)(J, mask)
        return np.asarray(d, np.float64)[0, :2], np.asarray(w, np.float64)[0]

    u, w = go(max_norm=0.0)
    np.testing.assert_allclose(u, [5.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(w, [5 / 3, 5 / 4], rtol=1e-6)
    u, w = go(max_norm=1.0)
    np.testing.assert_allclose(u, [0.5**0.5, 0.5**0.5], rtol=1e-6)
    np.testing.assert_allclose(w, np.array([5 / 3, 5 / 4]) / (5 * 2**0.5), rtol=1e-6)
    u, w = go(ntk_exp=1.0, max_norm=None)
    np.testing.assert_allclose(u, [25 / 3, 25 / 4], rtol=1e-6)
    np.testing.assert_allclose(w, [25 / 9, 25 / 16], rtol=1e-6)


def test_edges_single_task_zero_tiny_huge_identical():
    """One program (T = 3, clip on) over: one task (two masked), a small single task (under
    the clip), a zero task, all zero, all tiny (1e-30) and huge (1e30), identical tasks,
    opposite tasks."""
    rng = np.random.default_rng(5)
    g = rng.normal(size=16).astype(np.float32)
    base = rng.normal(size=(3, 16)).astype(np.float32)
    on, one = np.ones(3, bool), np.array([True, False, False])
    nan_rows = np.where(one[:, None], base, np.nan).astype(np.float32)
    small = np.where(one[:, None], 1e-3 * base, np.nan).astype(np.float32)
    zero_one = base.copy()
    zero_one[1] = 0.0
    cases_ = {
        "single": (nan_rows, one),
        "single_small": (small, one),
        "zero_task": (zero_one, on),
        "all_zero": (np.zeros_like(base), on),
        "tiny": (1e-30 * base, on),
        "huge": (1e30 * base, on),
        "identical": (np.stack([g, g, g]), on),
        "opposite": (np.stack([g, -g, g * 0]), on),
    }
    J = np.stack([c[0] for c in cases_.values()]).astype(np.float32)
    M = np.stack([c[1] for c in cases_.values()])
    d, w, skipped = batched(3, "float32", max_norm=1.0)(J, M)
    d, w = np.asarray(d, np.float64), np.asarray(w, np.float64)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(w)) and not np.asarray(skipped).any()
    r = {k: i for i, k in enumerate(cases_)}
    b0 = base[0].astype(np.float64)
    np.testing.assert_allclose(d[r["single"]], b0 / np.linalg.norm(b0), rtol=1e-5)  # clipped
    np.testing.assert_allclose(d[r["single_small"]], 1e-3 * b0, rtol=1e-5)  # T = 1: g itself
    np.testing.assert_array_equal(w[r["zero_task"]][1], 0.0)
    np.testing.assert_allclose(d[r["zero_task"]], ref(zero_one)[0], rtol=1e-5)
    np.testing.assert_array_equal(d[r["all_zero"]], 0.0)
    unit = ref(base)[0]  # clipped to norm 1: the same update at every scale
    np.testing.assert_allclose(d[r["huge"]], unit, rtol=1e-5)
    tiny = 1e-30 * ref(base, max_norm=0.0)[0]  # far below the clip: scales with the grads
    np.testing.assert_allclose(d[r["tiny"]] / 1e-30, tiny / 1e-30, rtol=1e-5)
    np.testing.assert_allclose(w[r["tiny"]], ref(base, max_norm=0.0)[1], rtol=1e-5)
    # Identical: w_t = sqrt(3), d = 3 sqrt(3) g before the clip; opposite: cancels exactly.
    gg = g.astype(np.float64)
    np.testing.assert_allclose(d[r["identical"]], gg / np.linalg.norm(gg), rtol=1e-5)
    np.testing.assert_allclose(w[r["identical"]], 1 / (3 * np.linalg.norm(gg)), rtol=1e-5)
    np.testing.assert_allclose(d[r["opposite"]], 0.0, atol=1e-6)


def test_norms_decades_apart_stay_finite():
    """Task norms 1e-15, 1 and 1e15: the ratio trace / |g_t|^2 (1e60) is beyond float32, the
    weights (its square root, up to 1e30) are not; computed in logs they are exact, and with
    ntk_exp = 1/2 every task contributes a vector of norm sqrt(trace) = 1e15. Norms 1e-20, 1
    and 1e20: the Gramian is pre-scaled near 1e40, where 1e-40 and 1 underflow: those tasks
    count as zero (documented), the step is not skipped."""
    rng = np.random.default_rng(6)
    J = rng.normal(size=(2, 3, 16))
    J /= np.linalg.norm(J, axis=-1, keepdims=True)
    J[0] *= np.array([1e-15, 1.0, 1e15])[:, None]
    J[1] *= np.array([1e-20, 1.0, 1e20])[:, None]
    d, w, skipped = batched(3, "float32", max_norm=0.0)(J.astype(np.float32), np.ones((2, 3), bool))
    d, w = np.asarray(d, np.float64), np.asarray(w, np.float64)
    assert np.all(np.isfinite(d)) and not np.asarray(skipped).any()
    np.testing.assert_allclose(w[0], [1e30, 1e15, 1.0], rtol=1e-5)
    d_star = 1e15 * (J[0] / np.linalg.norm(J[0], axis=1, keepdims=True)).sum(0)
    np.testing.assert_allclose(d[0], d_star, rtol=1e-4)
    np.testing.assert_array_equal(w[1], [0.0, 0.0, 1.0])


def test_groups_per_leaf():
    """``groups="leaf"``: each leaf's weights from its own squared norms; the clip on the whole
    shared update; heads follow their own gradient, unweighted and unclipped."""
    rng = np.random.default_rng(7)
    J = rng.normal(size=(3, 12)).astype(np.float32)
    J[:, 5:] *= np.array([[0.1], [1.0], [10.0]], np.float32)
    grads = {"a": J[:, :5], "b": J[:, 5:10], "h": J[:, 10:]}
    params = jax.tree.map(lambda x: np.zeros(x.shape[1:], np.float32), grads)
    heads = {"a": False, "b": False, "h": True}
    tx = mtlopt.ntkmtl(num_tasks=3, groups="leaf", task_specific=heads)
    u, s = jax.jit(tx.update)(grads, tx.init(params))
    Jd = J.astype(np.float64)
    da, wa = ref(Jd[:, :5], max_norm=0.0)
    db, wb = ref(Jd[:, 5:10], max_norm=0.0)
    f = min(1.0, 1.0 / np.linalg.norm(np.concatenate([da, db])))
    assert f < 1.0
    np.testing.assert_allclose(u["a"], f * da, rtol=1e-5)
    np.testing.assert_allclose(u["b"], f * db, rtol=1e-5)
    np.testing.assert_allclose(u["h"], Jd[:, 10:].sum(0), rtol=1e-5)
    np.testing.assert_allclose(mtlopt.task_weights(s), f * np.stack([wa, wb]), rtol=1e-5)


def test_weights_from_gramian():
    """The Gramian route gives the weights of the task-grads route (the clip factor included),
    from any factor of the same Gramian."""
    rng = np.random.default_rng(8)
    J = rng.normal(size=(4, 30)).astype(np.float32)
    J[1] = -0.5 * J[0] + 0.2 * J[1]
    G = J.astype(np.float64) @ J.T.astype(np.float64)
    tx = mtlopt.ntkmtl(num_tasks=4)
    route = jax.jit(lambda G: mtlopt.weights_from_gramian(tx, G)[0])
    np.testing.assert_allclose(route(jnp.asarray(G, jnp.float32)), ref(J)[1], rtol=1e-4)


def test_traced_hyperparameters():
    """``ntk_exp`` and ``max_norm`` traced: a vmap over both, and ``optax.inject_hyperparams``
    (a traced ``max_norm = 0`` clips nothing)."""
    rng = np.random.default_rng(9)
    J = rng.normal(size=(3, 16)).astype(np.float32)
    grads = {"w": jnp.asarray(J)}
    params = {"w": jnp.zeros(16)}
    ps = np.array([0.0, 0.5, 0.75, 1.0, 0.5], np.float32)
    ms = np.array([0.0, 0.0, 2.0, 1.0, 1e9], np.float32)

    def one(p, m):
        tx = mtlopt.ntkmtl(ntk_exp=p, max_norm=m)
        return tx.update(grads, tx.init(params))[0]["w"]

    out = jax.jit(jax.vmap(one))(jnp.asarray(ps), jnp.asarray(ms))
    for i in range(len(ps)):
        want = ref(J.astype(np.float64), float(ps[i]), float(ms[i]))[0]
        np.testing.assert_allclose(np.asarray(out[i], np.float64), want, rtol=1e-5)
    injected = optax.inject_hyperparams(mtlopt.ntkmtl)(ntk_exp=0.75, max_norm=1.0)
    u, _ = jax.jit(injected.update)(grads, injected.init(params))
    np.testing.assert_allclose(u["w"], ref(J.astype(np.float64), 0.75, 1.0)[0], rtol=1e-5)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"mtlopt\.ntkmtl: ntk_exp must be a finite number >= 0"):
        mtlopt.ntkmtl(ntk_exp=-0.5)
    with pytest.raises(ValueError, match=r"mtlopt\.ntkmtl: max_norm must be a finite number >= 0"):
        mtlopt.ntkmtl(max_norm=-1.0)
    with pytest.raises(ValueError, match=r"mtlopt\.ntkmtl: num_tasks must be a positive int"):
        mtlopt.ntkmtl(num_tasks=0)


def _near_max():
    """Squared norms 2e38 (float32's largest is 3.4e38): the trace overflows, no entry does."""
    J = np.zeros((2, 3, 16), np.float32)
    J[0, 0, :2] = 1e19
    J[0, 1, :2] = -1e19  # opposite
    J[1, 0, :2] = [1e19, 1e19]
    J[1, 1, :2] = [1e19, -1e19]  # orthogonal
    return J


def test_trace_beyond_float32():
    """The weights take log(trace) as log(top) + log(sum(diag / top)): finite (sqrt(2) each),
    not skipped, where the trace itself (4e38) overflows float32."""
    d, w, skipped = batched(3, "float32", max_norm=0.0)(_near_max(), np.ones((2, 3), bool))
    assert not np.asarray(skipped).any()
    np.testing.assert_allclose(np.asarray(w), [[2**0.5, 2**0.5, 0.0]] * 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(d[0]), 0.0, atol=1e-6 * 1e19)
    np.testing.assert_allclose(np.asarray(d[1])[:2], [2**0.5 * 2e19, 0.0], rtol=1e-6, atol=1e13)


def test_clip_of_an_update_near_float32_max():
    d, _, skipped = batched(3, "float32", max_norm=1.0)(_near_max(), np.ones((2, 3), bool))
    assert not np.asarray(skipped).any()
    np.testing.assert_allclose(np.asarray(d[1])[:2], [1.0, 0.0], rtol=1e-5, atol=1e-6)
