"""RLW's six distributions (the law of the weights, seeds, masks, both modes) and DWA's step
form (``window=``), against numpy transcriptions and TorchJD's DWA.

Compile budget: every check below runs from a handful of jitted programs (the draws of all six
distributions in one program, the DWA runs with the window as a traced argument)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtlopt
from mtlopt._src.methods.loss_weighting import RLW_DISTRIBUTIONS

scipy_stats = pytest.importorskip("scipy.stats")

# ------------------------------------------------------------------------------------- RLW

T = 5
MASK = np.array([True, True, False, True, True])  # four active tasks: the law is RLW on 4
N = 20_000  # draws per distribution (one key stream, as in training)
SHORT = 8  # steps of the unmasked twin run (the mask rule)


def _run(distribution, steps, mask, seed=0):
    tx = mtlopt.rlw(seed, distribution, num_tasks=T)

    def body(state, _):
        w, state = mtlopt.loss_weights(tx, jnp.ones(T), state, task_mask=mask)
        return state, w

    return jax.lax.scan(body, tx.init(None), None, length=steps)


@pytest.fixture(scope="module")
def draws():
    """Per distribution: N masked draws, the final state, and SHORT draws of the same stream
    without the mask. One program for all."""

    @jax.jit
    def run():
        out = {}
        for d in RLW_DISTRIBUTIONS:
            state, w = _run(d, N, jnp.asarray(MASK))
            _, full = _run(d, SHORT, jnp.ones(T, bool))
            out[d] = (w, state, full)
        return out

    return jax.tree.map(np.asarray, run())


def _active(w):
    return np.asarray(w, np.float64)[:, MASK]


def _reference_softmax(sample):
    """Monte Carlo moments of softmax over rows of ``sample`` (numpy, float64)."""
    e = np.exp(sample - sample.max(axis=1, keepdims=True))
    w = e / e.sum(axis=1, keepdims=True)
    return w.mean(0), (w**2).mean(0)


def _close_moments(w, mean, second, err=""):
    """The sample's mean and second moment within 5 standard errors of the reference."""
    n = w.shape[0]
    se1 = w.std(0) / np.sqrt(n)
    se2 = (w**2).std(0) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(w.mean(0) - mean), 5 * se1 + 1e-9, err_msg=err)
    np.testing.assert_array_less(np.abs((w**2).mean(0) - second), 5 * se2 + 1e-9, err_msg=err)


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_softmax_distributions_have_the_papers_law(draws, distribution):
    w = _active(draws[distribution][0])
    n = w.shape[1]
    ref = np.random.default_rng(1)
    size = (400_000, n)
    sample = ref.standard_normal(size) if distribution == "normal" else ref.uniform(size=size)
    mean, second = _reference_softmax(sample)
    _close_moments(w, np.full(n, 1 / n), second, distribution)
    np.testing.assert_allclose(mean, 1 / n, atol=1e-3)  # the reference itself
    assert np.all(w > 0)


def test_random_normal_keeps_its_means_and_spreads(draws):
    w, state, _ = draws["random_normal"]
    # The per-task (mu, sigma), drawn once from the seed (RLWState.spread), fixed over steps.
    mu, sd = np.asarray(
        jax.random.uniform(jax.random.wrap_key_data(state.spread), (2, T)), np.float64
    )
    ref = np.random.default_rng(2).standard_normal((400_000, T)) * sd + mu
    mean, second = _reference_softmax(ref[:, MASK])
    _close_moments(_active(w), mean, second, "random_normal")
    # Another seed, other means: not the same law.
    other = mtlopt.rlw(1, "random_normal").init(None).spread
    assert not np.array_equal(np.asarray(other), np.asarray(state.spread))


def test_dirichlet_is_uniform_on_the_simplex(draws):
    w = _active(draws["dirichlet"][0])
    n = w.shape[1]
    # Dir(1, ..., 1): each marginal is Beta(1, n - 1).
    var = (n - 1) / (n**2 * (n + 1))
    _close_moments(w, np.full(n, 1 / n), np.full(n, var + 1 / n**2), "dirichlet")
    for t in range(n):
        assert scipy_stats.kstest(w[:, t], scipy_stats.beta(1, n - 1).cdf).pvalue > 1e-3


def test_bernoulli_is_uniform_over_non_empty_subsets(draws):
    w = _active(draws["bernoulli"][0])
    n = w.shape[1]
    assert set(np.unique(w)) <= {0.0, 1.0}
    assert np.all(w.sum(1) >= 1)  # never all zero
    codes = (w @ (2 ** np.arange(n))).astype(int)
    counts = np.bincount(codes, minlength=2**n)
    assert counts[0] == 0
    assert scipy_stats.chisquare(counts[1:]).pvalue > 1e-3
    # P(w_t = 1) = 2^(n-1) / (2^n - 1).
    p = 2 ** (n - 1) / (2**n - 1)
    np.testing.assert_allclose(w.mean(0), p, atol=5 * np.sqrt(p * (1 - p) / w.shape[0]))


def test_constrained_bernoulli_trains_one_task_at_a_time(draws):
    w = _active(draws["constrained_bernoulli"][0])
    n = w.shape[1]
    np.testing.assert_array_equal(w.sum(1), 1.0)
    assert set(np.unique(w)) <= {0.0, 1.0}
    assert scipy_stats.chisquare(w.sum(0)).pvalue > 1e-3
    assert w.sum(0).min() > 0 and n == 4


@pytest.mark.parametrize("distribution", RLW_DISTRIBUTIONS)
def test_masked_tasks_get_zero_and_the_rest_are_renormalised(draws, distribution):
    w, state, full = draws[distribution]
    assert np.all(w[:, ~MASK] == 0.0)
    if distribution != "bernoulli":
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
    assert int(state.count) == N and int(state.skipped) == 0
    np.testing.assert_array_equal(state.weights, w[-1])
    if distribution in ("normal", "uniform", "random_normal", "dirichlet"):
        # The same draws with and without the mask: the active weights are the unmasked ones,
        # renormalised over the active tasks (the masked task does not move them otherwise).
        kept = full[:, MASK] / full[:, MASK].sum(1, keepdims=True)
        np.testing.assert_allclose(w[:SHORT, MASK], kept, rtol=2e-5, atol=1e-7)
    assert full.shape == (SHORT, T) and np.all(np.isfinite(full))


def test_seeds_repeat_and_vmap_over_keys():
    keys = jax.random.split(jax.random.key(7), 4)

    def three_steps(seed):
        tx = mtlopt.rlw(seed=seed)
        state = tx.init(None)
        out = []
        for _ in range(3):
            w, state = mtlopt.loss_weights(tx, jnp.ones(3), state)
            out.append(w)
        return jnp.stack(out)

    batched = np.asarray(jax.jit(jax.vmap(three_steps))(keys))
    single = jax.jit(three_steps)
    for i in range(4):
        np.testing.assert_array_equal(batched[i], np.asarray(single(keys[i])))
    assert len({tuple(b.ravel().round(6)) for b in batched}) == 4  # independent streams
    assert len({tuple(b.round(6)) for b in batched[0]}) == 3  # fresh weights every step
    # An int seed and its key are the same seed; the same seed repeats.
    np.testing.assert_array_equal(single(jax.random.key(3)), single(jax.random.key(3)))
    np.testing.assert_array_equal(
        single(jnp.asarray(jax.random.key_data(jax.random.key(3)))), single(jax.random.key(3))
    )
    a = mtlopt.rlw(seed=3).init(None).key
    np.testing.assert_array_equal(a, jax.random.key_data(jax.random.key(3)))


def test_both_modes_give_the_same_weights_and_update_for_every_distribution():
    """Over task grads (heads included) and in the loss-only mode, 3 steps, a mask on step 2:
    the same weights, the update is sum_t w_t g_t, the same states. One program."""
    rng = np.random.default_rng(0)
    J = jnp.asarray(rng.normal(size=(T, 6)), jnp.float32)
    H = jnp.asarray(rng.normal(size=(T, T, 2)), jnp.float32)  # head t is row t of leaf "h"
    grads = {"w": J, "h": H}
    params = {"w": jnp.zeros(6), "h": jnp.zeros((T, 2))}
    heads = {"w": False, "h": True}
    masks = jnp.asarray([[True] * T, MASK, [True] * T])

    @jax.jit
    def run():
        out = {}
        for d in RLW_DISTRIBUTIONS:
            tx = mtlopt.rlw(5, d, num_tasks=T, task_specific=heads)

            def body(carry, m, tx=tx):
                s1, s2 = carry
                w, s1 = mtlopt.loss_weights(tx, jnp.ones(T), s1, task_mask=m)
                u, s2 = tx.update(grads, s2, params, task_mask=m)
                return (s1, s2), (w, u)

            (s1, s2), (ws, us) = jax.lax.scan(body, (tx.init(params), tx.init(params)), masks)
            out[d] = (ws, us, s1, s2)
        return out

    for d, (ws, us, s1, s2) in jax.tree.map(np.asarray, run()).items():
        np.testing.assert_allclose(us["w"], ws @ np.asarray(J), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            us["h"], np.einsum("kt,tij->kij", ws, np.asarray(H)), rtol=1e-5, atol=1e-6
        )
        assert np.all(ws[1][~MASK] == 0.0)
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=d)
        np.testing.assert_array_equal(mtlopt.task_weights(s2), ws[-1])


def test_rlw_float64_and_all_masked():
    with jax.enable_x64(True):
        # The loss-only mode works in the dtype of the state's weights (num_tasks, float64
        # params); over float64 task grads, in float64 too.
        tx = mtlopt.rlw(0, "dirichlet", num_tasks=3)

        @jax.jit
        def run(state):
            w, state = mtlopt.loss_weights(tx, jnp.ones(3, jnp.float64), state)
            z, after = mtlopt.loss_weights(tx, jnp.ones(3), state, task_mask=jnp.zeros(3, bool))
            return w, z, state, after

        w, z, state, after = run(tx.init({"w": jnp.zeros(2, jnp.float64)}))
        assert w.dtype == jnp.float64
        assert abs(float(w.sum()) - 1.0) < 1e-12
        np.testing.assert_array_equal(z, 0.0)  # nothing to weigh: zeros, the step not counted
        assert int(after.count) == int(state.count) == 1


def test_rlw_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"mtlopt\.rlw: distribution must be one of"):
        mtlopt.rlw(0, "gaussian")
    with pytest.raises(ValueError, match=r"mtlopt\.rlw: seed must be an int or a PRNG key"):
        mtlopt.rlw(seed=1.5)
    with pytest.raises(ValueError, match=r"mtlopt\.rlw: the loss-only mode needs task_losses"):
        tx = mtlopt.rlw()
        mtlopt.loss_weights(tx, None, tx.init(None))


# ------------------------------------------------------------------------------------- DWA


def _dwa_numpy(steps, T, window=None, temp=2.0):
    """DWA over (losses, mask, new_epoch or None) steps, written from the docstring's rule: an
    epoch closes at the start of a step where new_epoch is True or the running epoch already
    has ``window`` steps (steps where some task took part), if any loss was counted in it; a
    step with a non-finite active loss is skipped (it counts nowhere)."""
    sums, counts, means, out = np.zeros(T), np.zeros(T), [], []
    length = 0
    for losses, mask, new in steps:
        if not np.all(np.isfinite(np.where(mask, losses, 0.0))):
            out.append(np.zeros(T))  # skipped: zero weights, nothing recorded
            continue
        close = bool(new) or (window is not None and length >= window)
        if close and counts.sum() > 0:
            last = means[-1] if means else np.zeros(T)
            means.append(np.where(counts > 0, sums / np.maximum(counts, 1), last))
            sums, counts, length = np.zeros(T), np.zeros(T), 0
        sums += np.where(mask, losses, 0)
        counts += mask
        length += int(mask.any())
        if len(means) >= 2 and mask.any():
            r = np.where(means[-2] > 0, means[-1] / np.where(means[-2] > 0, means[-2], 1), 1)
            e = np.where(mask, np.exp(r / temp), 0)
            out.append(mask.sum() * e / e.sum())
        else:
            out.append(mask.astype(float))
    return out


def _dwa_steps(n, T, seed, with_flags):
    rng = np.random.default_rng(seed)
    steps = []
    for i in range(n):
        mask = np.ones(T, bool)
        losses = rng.uniform(0.5, 3.0, T).astype(np.float32)
        if i % 7 == 3:
            mask[1] = False
            losses[1] = np.nan  # a masked task's NaN loss takes no part
        if i == 9:
            mask[:] = False  # all masked: neither counts nor closes
        if i == 12:
            losses[0] = np.nan  # skipped step
        flag = (i % 5 == 0) if with_flags else None
        steps.append((losses, mask, flag))
    return steps


def _dwa_run(steps, window, flags):
    """The weights of ``dwa(window=window)`` over ``steps`` (window a traced argument: one
    program for every window), with or without the new_epoch argument."""
    T = len(steps[0][0])
    L = jnp.asarray(np.stack([s[0] for s in steps]))
    M = jnp.asarray(np.stack([s[1] for s in steps]))
    F = jnp.asarray(np.array([bool(s[2]) for s in steps]))
    return np.asarray(_dwa_program(T, flags)(jnp.asarray(window, jnp.int32), L, M, F))


_PROGRAMS: dict = {}


def _dwa_program(T, flags):
    if (T, flags) not in _PROGRAMS:

        @jax.jit
        def run(window, L, M, F):
            tx = mtlopt.dwa(window=window, num_tasks=T)

            def body(state, x):
                losses, mask, flag = x
                extra = {"new_epoch": flag} if flags else {}
                w, state = mtlopt.loss_weights(tx, losses, state, task_mask=mask, **extra)
                return state, w

            return jax.lax.scan(body, tx.init(None), (L, M, F))[1]

        _PROGRAMS[T, flags] = run
    return _PROGRAMS[T, flags]


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_dwa_window_matches_numpy(window):
    steps = _dwa_steps(30, 3, seed=window, with_flags=False)
    got = _dwa_run(steps, window, flags=False)
    want = _dwa_numpy(steps, 3, window=window)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {i}")
    assert not np.allclose(got[-1], 1.0)  # the weights moved


@pytest.mark.parametrize("window", [2, 4])
def test_dwa_window_and_new_epoch_together(window):
    """Either closes the running epoch; new_epoch restarts the window."""
    steps = _dwa_steps(30, 3, seed=10 + window, with_flags=True)
    got = _dwa_run(steps, window, flags=True)
    want = _dwa_numpy(steps, 3, window=window)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {i}")
    # Not what either signal alone gives.
    alone = _dwa_numpy([(loss, m, None) for loss, m, _ in steps], 3, window=window)
    flags_only = _dwa_numpy(steps, 3)
    assert not np.allclose(np.stack(got), np.stack(alone))
    assert not np.allclose(np.stack(got), np.stack(flags_only))


def test_dwa_window_both_modes_agree():
    """window=2 over task grads (heads included) and in the loss-only mode: same weights,
    update and state over 7 steps. One program."""
    rng = np.random.default_rng(3)
    J = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    H = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)
    grads, params = {"w": J, "h": H}, {"w": jnp.zeros(4), "h": jnp.zeros(3)}
    L = jnp.asarray(rng.uniform(0.5, 2.0, (7, 3)), jnp.float32)
    tx = mtlopt.dwa(window=2, num_tasks=3, task_specific={"w": False, "h": True})

    @jax.jit
    def run():
        def body(carry, losses):
            s1, s2 = carry
            w, s1 = mtlopt.loss_weights(tx, losses, s1)
            u, s2 = tx.update(grads, s2, params, task_losses=losses)
            return (s1, s2), (w, u)

        return jax.lax.scan(body, (tx.init(params), tx.init(params)), L)

    (s1, s2), (w, u) = jax.tree.map(np.asarray, run())
    np.testing.assert_allclose(u["w"], w @ np.asarray(J), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u["h"], w @ np.asarray(H), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(s1.epochs) == 3 and not np.allclose(w[-1], 1.0)


def test_dwa_matches_torchjd_step_form():
    """TorchJD's DWA with step() after every batch is window=1; with step() after every third
    batch, window=3 (and new_epoch on every third step)."""
    torch = pytest.importorskip("torch")
    tjd = pytest.importorskip("torchjd.scalarization")
    rng = np.random.default_rng(4)
    losses = rng.uniform(0.5, 3.0, (12, 3)).astype(np.float32)
    steps = [(loss, np.ones(3, bool), None) for loss in losses]
    for k in (1, 3):
        peer = tjd.DWA(temperature=2.0)
        want = []
        for i, loss in enumerate(losses):
            v = torch.tensor(loss, requires_grad=True)
            peer(v).backward()
            want.append(v.grad.numpy().copy())  # d/dl of sum_t w_t l_t: the weights
            if (i + 1) % k == 0:
                peer.step()
        got = _dwa_run(steps, k, flags=False)
        np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-5, atol=1e-6)


def test_dwa_window_errors():
    with pytest.raises(ValueError, match=r"mtlopt\.dwa: window must be an int >= 1"):
        mtlopt.dwa(window=0, num_tasks=2)
    with pytest.raises(ValueError, match=r"mtlopt\.dwa: window must be an int >= 1"):
        mtlopt.dwa(window=1.5, num_tasks=2)
    tx = mtlopt.dwa(num_tasks=2)
    with pytest.raises(ValueError, match=r"mtlopt\.dwa: .*new_epoch.*or window=k"):
        mtlopt.loss_weights(tx, jnp.ones(2), tx.init(None))
    # With a window, new_epoch is optional and still checked where given.
    tx = mtlopt.dwa(window=2, num_tasks=2)
    with pytest.raises(ValueError, match=r"mtlopt\.dwa: new_epoch must be a bool scalar"):
        mtlopt.loss_weights(tx, jnp.ones(2), tx.init(None), new_epoch=jnp.ones(2, bool))


def test_numpy_transcriptions_agree_with_the_epoch_form():
    """The numpy rule above with new_epoch alone is the one tests/test_skeleton.py uses."""
    steps = [
        (np.array(v, np.float32), np.ones(2, bool), i % 2 == 0)
        for i, v in enumerate(itertools.islice(itertools.cycle([[1.0, 2.0], [2.0, 1.0]]), 8))
    ]
    out = _dwa_numpy(steps, 2)
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[-1].sum(), 2.0)
