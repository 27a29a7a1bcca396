"""GradVac and GradDrop against hand-worked cases and float64 numpy transcriptions of the papers.

GradVac (``mtlopt.gradvac``) works in Gramian space; the reference here runs the paper's loop
(Wang et al. 2021, Algorithm 1) on the rows of J themselves, in float64, with the same random
orders: each step's orders are drawn inside the jitted step from the state's key exactly as the
skeleton and the method draw them (split, then one permutation per task; under ``groups=``
``fold_in(key, group)`` first). GradDrop (``mtlopt.graddrop``) is checked against a numpy
transcription of its rule (Chen et al. 2020) fed the same uniforms, re-derived here from the
same keys (``fold_in(key, leaf)``, 16-bit halves of threefry words).

Each program is compiled once per (method, T, dtype): the scenarios are stacked and each is
run through the same jitted step (a host loop: cheaper to compile than ``jax.vmap`` of it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt

# ---------------------------------------------------------------- shared helpers


def _keys(n, seed):
    """``n`` raw threefry key data (any uint32 pair is a key), from numpy: nothing compiles."""
    return np.random.default_rng(seed).integers(0, 2**32, size=(n, 2), dtype=np.uint32)


def _stack_states(state, keys):
    """``state`` repeated per key, each with its own key."""
    n = len(keys)
    leaves, treedef = jax.tree.flatten(state)
    stacked = [np.stack([np.asarray(x)] * n) for x in leaves]
    out = jax.tree.unflatten(treedef, stacked)
    return out._replace(key=np.asarray(keys))


def _batched(fn):
    """``fn`` jitted as it is, mapped over a leading problem axis by a host loop: one compiled
    program, cheaper to compile than its ``jax.vmap`` (where the skeleton's conds become
    selects of both branches: measured 1.2-2.0 s against 2.3-4.5 s of CPU here), and every
    slice taken in numpy (no eager XLA program per shape)."""
    jitted = jax.jit(fn)

    def run(*args):
        host = jax.device_get(args)
        n = len(jax.tree.leaves(host)[0])
        outs = [jitted(*jax.tree.map(lambda x, p=p: x[p], host)) for p in range(n)]
        return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *outs)

    return run


def _split_key(key_data):
    """What the skeleton hands the method: ``ctx.key`` of a step from ``state.key``."""
    _, sub = jax.random.split(jax.random.wrap_key_data(key_data))
    return sub


def _orders(key, T):
    return jax.vmap(lambda k: jax.random.permutation(k, T))(jax.random.split(key, T))


# ---------------------------------------------------------------- GradVac: the reference


def gradvac_reference(J, orders, targets, beta, mask=None, target_update="always"):
    """The paper's loop on the rows of ``J`` (float64): ``(update, new targets)``."""
    J = np.asarray(J, np.float64)
    T = J.shape[0]
    mask = np.ones(T, bool) if mask is None else np.asarray(mask)
    new = np.array(targets, np.float64)
    out = np.zeros(J.shape[1])
    for i in range(T):
        if not mask[i]:
            continue
        g = J[i].copy()
        for j in orders[i]:
            if j == i or not mask[j]:
                continue
            nj = np.linalg.norm(J[j])
            phi = g @ J[j] / (np.linalg.norm(g) * nj)
            hat = targets[i, j]
            altered = phi < hat
            if altered:
                s, s_hat = np.sqrt(1 - phi**2), np.sqrt(1 - hat**2)
                g = g + np.linalg.norm(g) * (hat * s - phi * s_hat) / (nj * s_hat) * J[j]
            if target_update == "always" or altered:
                new[i, j] = (1 - beta) * hat + beta * phi
        out += g
    return out, new


@functools.cache
def _gradvac_program(T, beta, target_update="always", groups=None):
    """``(tx, step)``: one step of ``gradvac`` on a ``{"a": (T, 5), "b": (T, 7)}`` tree per
    problem (see :func:`_batched`), returning the update as a (12,) row, the state, and the
    orders each group drew."""
    tx = mtlopt.gradvac(beta, num_tasks=T, target_update=target_update, groups=groups)
    K = 1 if groups is None else 2

    def step(J, state, mask):
        sub = _split_key(state.key)
        keys = [sub] if groups is None else [jax.random.fold_in(sub, k) for k in range(K)]
        orders = jnp.stack([_orders(k, T) for k in keys])
        u, new = tx.update({"a": J[:, :5], "b": J[:, 5:]}, state, task_mask=mask)
        return jnp.concatenate([u["a"], u["b"]]), new, orders

    return tx, _batched(step)


def _params(dtype=jnp.float32):
    return {"a": jnp.zeros(5, dtype), "b": jnp.zeros(7, dtype)}


def _problems(T, n, seed, dtype=np.float32):
    """``n`` random (T, 12) problems, some tasks pushed against others (conflicts)."""
    rng = np.random.default_rng(seed)
    J = rng.normal(size=(n, T, 12))
    J[:, 1] = -0.8 * J[:, 0] + 0.4 * J[:, 1]
    J *= np.exp(rng.uniform(-2.0, 2.0, size=(n, T, 1)))
    return J.astype(dtype)


# ---------------------------------------------------------------- GradVac: hand-worked


def test_gradvac_hand_worked_two_task_sequence():
    """Two tasks in the plane, four steps, beta = 1/2; worked by hand (T = 2: no order).

    1. g1 = (1, 0), g2 = (-1, 1): cos = -1/sqrt(2) < 0 = targets: each is projected off the
       other (PCGrad): g1' = (1/2, 1/2), g2' = (0, 1); targets -> -1/(2 sqrt(2)) = -0.35355.
    2. Same gradients, cos -0.70711 < -0.35355: g1' = g1 + w1 g2 with
       w1 = (t s - phi s_t) / (|g2| s_t) = (-0.25 + 0.66144) / 1.32288 = 0.31102
       (s = sqrt(1 - phi^2) = 0.70711, s_t = sqrt(7/8) = 0.93541); g2' = g2 + w2 g1 with
       w2 = (|g2| / |g1|)^2 w1 = 0.62204: update (1 + w2) g1 + (1 + w1) g2 = (0.31102, 1.31102);
       targets -> (-0.35355 - 0.70711) / 2 = -0.53033.
    3. g2 = (1, 1): cos 0.70711 above the targets: nothing altered, update (2, 1); targets ->
       (-0.53033 + 0.70711) / 2 = 0.08839.
    4. g2 = (0, 1): cos 0 < 0.08839: w = t / sqrt(1 - t^2) = 0.08874 both ways: update
       (1.08874, 1.08874); targets -> 0.04419.
    """
    steps = [((1.0, 0.0), (-1.0, 1.0)), ((1.0, 0.0), (-1.0, 1.0)), ((1.0, 0.0), (1.0, 1.0))]
    steps.append(((1.0, 0.0), (0.0, 1.0)))
    want_u = [(0.5, 1.5), (0.31102, 1.31102), (2.0, 1.0), (1.08874, 1.08874)]
    want_t = [-0.35355, -0.53033, 0.08839, 0.04419]
    tx = mtlopt.gradvac(0.5, num_tasks=2)
    update = jax.jit(tx.update)
    state = tx.init({"w": jnp.zeros(2)})
    for (g1, g2), u_hand, t_hand in zip(steps, want_u, want_t, strict=True):
        J = np.array([g1, g2], np.float32)
        u, state = update({"w": J}, state)
        np.testing.assert_allclose(u["w"], u_hand, atol=2e-5)
        np.testing.assert_allclose(state.targets, [[0, t_hand], [t_hand, 0]], atol=2e-5)
    # The third step altered nothing: weights (1, 1); the fourth's are (1 + w, 1 + w).
    np.testing.assert_allclose(mtlopt.task_weights(state), [1.08874, 1.08874], atol=2e-5)


# ---------------------------------------------------------------- GradVac: the paper's loop


def _run_against_reference(T, dtype, steps, beta, target_update="always", masks=None, n=7):
    tx, step = _gradvac_program(T, beta, target_update)
    Js = _problems(T, n, seed=T, dtype=dtype)
    masks = np.ones((n, T), bool) if masks is None else masks
    state = _stack_states(tx.init(_params(dtype)), _keys(n, T))
    ref_targets = np.zeros((n, T, T))
    worst = 0.0
    for k in range(steps):
        Jk = Js + (0.4 * k) * np.roll(Js, 1, axis=2)  # the gradients move between steps
        Jk = np.where(masks[:, :, None], Jk, np.nan).astype(dtype)
        u, state, orders = step(Jk, state, masks)
        for p in range(n):
            want, ref_targets[p] = gradvac_reference(
                Jk[p], np.asarray(orders[p, 0]), ref_targets[p], beta, masks[p], target_update
            )
            err = np.linalg.norm(np.asarray(u[p], np.float64) - want) / np.linalg.norm(want)
            worst = max(worst, err)
        np.testing.assert_allclose(state.targets, ref_targets, atol=100 * np.finfo(dtype).eps)
    return worst, state


@pytest.mark.parametrize("T", [3, pytest.param(4, marks=pytest.mark.slow), 6])
def test_gradvac_matches_the_papers_loop_float32(T):
    """Several steps (targets moving), random orders from the state's key, a masked task (its
    row NaN) in two problems: update within 1e-4 relative, targets within 100 ulps."""
    masks = np.ones((7, T), bool)
    masks[4, 2] = masks[5, 0] = False
    worst, state = _run_against_reference(T, np.float32, 3, 0.5, masks=masks)
    assert worst < 1e-4, worst
    assert int(state.skipped.sum()) == 0
    # A masked task's row and column of targets were never written.
    np.testing.assert_array_equal(np.asarray(state.targets)[4, 2, :], 0.0)
    np.testing.assert_array_equal(np.asarray(state.targets)[4, :, 2], 0.0)
    assert np.count_nonzero(np.asarray(state.targets)[4]) == (T - 1) * (T - 2)


def test_gradvac_matches_the_papers_loop_float64():
    with jax.enable_x64(True):
        worst, _ = _run_against_reference(5, np.float64, 4, 0.3)
    assert worst < 1e-11, worst


def test_gradvac_libmtl_targets():
    """``target_update="when_altered"``: a target moves only when its pair was altered
    (LibMTL), so the targets never rise above 0."""
    worst, state = _run_against_reference(4, np.float32, 4, 0.5, "when_altered")
    assert worst < 1e-4, worst
    assert np.all(np.asarray(state.targets) <= 0.0)


def test_gradvac_beta_zero_is_pcgrad_every_step():
    """Targets held at 0 (beta = 0): the alteration is PCGrad's projection, with the same
    keyed orders, at every step."""
    T = 4
    gv, pc = mtlopt.gradvac(0.0, num_tasks=T, seed=3), mtlopt.pcgrad(3, num_tasks=T)
    J = _problems(T, 3, seed=11)

    @jax.jit
    def both(J, s_gv, s_pc):
        u1, s_gv = gv.update({"w": J}, s_gv)
        u2, s_pc = pc.update({"w": J}, s_pc)
        return u1["w"], u2["w"], s_gv, s_pc

    p = {"w": jnp.zeros(12)}
    s_gv, s_pc = gv.init(p), pc.init(p)
    for Jk in J:  # three steps
        u1, u2, s_gv, s_pc = both(Jk, s_gv, s_pc)
        np.testing.assert_allclose(u1, u2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s_gv.targets, 0.0)


def test_gradvac_through_weights_from_gramian():
    """The Gramian route (``mtlopt.weights_from_gramian``, its own state fed back) gives the
    weights of the full path, step after step: same seed, same orders, same targets."""
    T, n = 3, 7
    tx, step = _gradvac_program(T, 0.5)
    Js = _problems(T, n, seed=31)
    keys = _keys(n, 31)
    state = _stack_states(tx.init(_params()), keys)
    route = jax.jit(lambda G, s: mtlopt.weights_from_gramian(tx, G, s))
    gstates = [tx.init({"gramian_factor": jnp.zeros(T)})._replace(key=k) for k in keys]
    for k in range(3):
        Jk = (Js + (0.5 * k) * np.roll(Js, 2, axis=2)).astype(np.float32)
        _, state, _ = step(Jk, state, np.ones((n, T), bool))
        for p in range(n):
            G = Jk[p].astype(np.float64) @ Jk[p].T.astype(np.float64)
            w, gstates[p] = route(G.astype(np.float32), gstates[p])
            np.testing.assert_allclose(w, state.weights[p], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(gstates[p].targets, state.targets[p], atol=1e-5)


# ---------------------------------------------------------------- GradVac: groups


def test_gradvac_per_layer_is_gradvac_on_each_layer():
    """``groups="leaf"``: each leaf is GradVac on that leaf alone, with its own (T, T) targets
    and its own orders (``fold_in(key, leaf)``), over three steps; a masked task (its row NaN)
    takes no part in any group; then a NaN step is skipped: zero update, the state (targets,
    key, weights) kept."""
    T, n = 4, 3
    tx, step = _gradvac_program(T, 0.5, groups="leaf")
    Js = _problems(T, n, seed=21)
    masks = np.ones((n, T), bool)
    masks[2, 1] = False
    state = _stack_states(tx.init(_params()), _keys(n, 21))
    assert state.targets.shape == (n, 2, T, T)
    ref = np.zeros((n, 2, T, T))
    for k in range(3):
        Jk = Js * np.float32(1 + k) + np.float32(0.1 * k)
        Jk = np.where(masks[:, :, None], Jk, np.float32(np.nan))
        u, state, orders = step(Jk, state, masks)
        for p in range(n):
            for g, cols in enumerate((slice(0, 5), slice(5, 12))):
                want, ref[p, g] = gradvac_reference(
                    Jk[p][:, cols], np.asarray(orders[p, g]), ref[p, g], 0.5, masks[p]
                )
                np.testing.assert_allclose(u[p, cols], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state.targets, ref, atol=1e-5)
    assert np.asarray(state.weights).shape == (n, 2, T)
    np.testing.assert_array_equal(np.asarray(state.weights)[2, :, 1], 0.0)
    np.testing.assert_array_equal(ref[2][:, 1, :], 0.0)  # (the reference kept them too)
    bad = Js.copy()
    bad[0, 2, 7] = np.nan
    u, new, _ = step(bad, state, masks)
    np.testing.assert_array_equal(u[0], 0.0)
    for field in ("targets", "key", "weights", "count"):
        np.testing.assert_array_equal(getattr(new, field)[0], getattr(state, field)[0])
    assert new.skipped.tolist() == [1, 0, 0]


@pytest.mark.slow
def test_gradvac_two_tasks_per_layer_equals_layers_alone():
    """With two tasks (no order to draw), the per-leaf update is exactly gradvac on each leaf's
    task grads alone, step after step."""
    J = _problems(2, 1, seed=5)[0]
    grouped = mtlopt.gradvac(num_tasks=2, groups="leaf")
    alone = mtlopt.gradvac(num_tasks=2)

    @jax.jit
    def run(Jk, sg, sa, sb):
        u, sg = grouped.update({"a": Jk[:, :5], "b": Jk[:, 5:]}, sg)
        ua, sa = alone.update({"a": Jk[:, :5]}, sa)
        ub, sb = alone.update({"b": Jk[:, 5:]}, sb)
        return (u["a"], ua["a"], u["b"], ub["b"]), sg, sa, sb

    sg, sa, sb = (
        grouped.init(_params()),
        alone.init({"a": jnp.zeros(5)}),
        alone.init({"b": jnp.zeros(7)}),
    )
    for k in range(3):
        Jk = (J * (1.0 + k) + k * np.roll(J, 1, axis=1)).astype(np.float32)
        (a1, a2, b1, b2), sg, sa, sb = run(Jk, sg, sa, sb)
        np.testing.assert_allclose(a1, a2, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b1, b2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sg.targets, np.stack([sa.targets, sb.targets]), atol=1e-7)


# ---------------------------------------------------------------- GradVac: degenerate inputs


def test_gradvac_degenerate_inputs_over_many_steps():
    """40 steps of: identical tasks (targets reach 1 in float32), exactly opposite tasks
    (targets towards -1), a zero task, tiny and huge gradients, and nearly opposite tasks.
    Never NaN, never skipped; identical tasks always sum, opposite ones always cancel."""
    T = 3
    tx, step = _gradvac_program(T, 0.5)
    rng = np.random.default_rng(7)
    g = rng.normal(size=12).astype(np.float32)
    base = rng.normal(size=(T, 12)).astype(np.float32)
    zero = base.copy()
    zero[1] = 0.0
    near = np.stack([g, -g + 1e-4 * base[0], base[2]]).astype(np.float32)
    cases = {
        "identical": np.stack([g] * T),
        "opposite": np.stack([g, -g, 2 * g]),
        "zero": zero,
        "base": base,
        "tiny": base * np.float32(1e-30),
        "huge": base * np.float32(1e30),
        "near_opposite": near,
    }
    Js = np.stack(list(cases.values()))
    n = len(cases)
    keys = _keys(n, 7)
    keys[4] = keys[5] = keys[3]  # base, tiny and huge draw the same orders
    state = _stack_states(tx.init(_params()), keys)
    ones = np.ones((n, T), bool)
    for _ in range(40):
        u, state, _ = step(Js, state, ones)
        u = np.asarray(u)
        assert np.all(np.isfinite(u))
        assert np.all(np.isfinite(np.asarray(state.targets)))
        np.testing.assert_allclose(u[0], T * g, rtol=1e-5, atol=1e-6)
        # g, -g, 2g: each meets an opposite task, at a cosine of exactly -1 below any target,
        # and is altered to 0 (at every step, whatever the targets have become).
        np.testing.assert_allclose(u[1], 0.0, atol=1e-6 * np.abs(g).max())
        # The zero task is left as it is (weight 1 on a zero row) and alters nothing.
        assert np.all(np.asarray(state.weights)[2, 1] == 1.0)
        # Tiny and huge: the direction of scale 1 (no eps in the cosines), step after step.
        for k in (4, 5):
            a, b = u[k].astype(np.float64), u[3].astype(np.float64)
            a, b = a / np.abs(a).max(), b / np.abs(b).max()
            assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 1 - 1e-5
        np.testing.assert_allclose(state.targets[4], state.targets[3], atol=1e-5)
        np.testing.assert_allclose(state.targets[5], state.targets[3], atol=1e-5)
    targets = np.asarray(state.targets)
    assert np.all(np.abs(targets) <= 1.0)
    assert targets[0, 0, 1] > 1 - 1e-6  # identical: the targets saturate at 1
    np.testing.assert_array_equal(targets[2, 1, :], 0.0)  # a zero task has no cosine
    np.testing.assert_array_equal(targets[2, :, 1], 0.0)
    assert int(state.skipped.sum()) == 0


def test_gradvac_targets_and_guards_directly():
    """``gradvac_weights`` on a hand-made Gramian: a target of exactly +-1 (which the paper's
    formula divides by zero for) gives finite weights; a target of 1 pulls a task strongly
    towards the other, bounded by the 64-ulp clip."""
    from mtlopt._src.methods.projection import gradvac_weights

    G = jnp.asarray([[1.0, 0.0], [0.0, 1.0]], jnp.float32)
    orders = jnp.asarray([[0, 1], [1, 0]])
    mask = jnp.ones(2, bool)
    for t in (1.0, -1.0, 0.999999, -0.999999):
        tgt = jnp.asarray([[0.0, t], [t, 0.0]], jnp.float32)
        w, new = jax.jit(gradvac_weights, static_argnums=5)(G, orders, mask, tgt, 0.5, "always")
        assert np.all(np.isfinite(w)) and np.all(np.isfinite(new))
        np.testing.assert_allclose(new, [[0, t / 2], [t / 2, 0]], atol=1e-6)
        if t > 0:  # orthogonal tasks pulled to cos = min(t, 1 - 64 eps): w = t / sqrt(1 - t^2)
            e = 64 * np.finfo(np.float32).eps
            tc = min(t, 1 - e)
            np.testing.assert_allclose(w, 1 + tc / np.sqrt(1 - tc**2), rtol=1e-3)
        else:  # cos 0 is above a negative target: nothing altered
            np.testing.assert_allclose(w, [1.0, 1.0])


# ---------------------------------------------------------------- GradVac: API


def test_gradvac_traced_beta_and_errors():
    J = _problems(3, 1, seed=2)[0]
    p = _params()
    g = {"a": J[:, :5], "b": J[:, 5:]}
    plain = mtlopt.gradvac(0.3, seed=1, num_tasks=3)
    injected = optax.inject_hyperparams(mtlopt.gradvac, static_args=("num_tasks",))(
        beta=0.3, seed=1, num_tasks=3
    )

    @jax.jit
    def both(s1, s2):
        for _ in range(2):
            u1, s1 = plain.update(g, s1)
            u2, s2 = injected.update(g, s2)
        return u1, u2, s1.targets, s2.inner_state.targets

    u1, u2, t1, t2 = both(plain.init(p), injected.init(p))
    np.testing.assert_allclose(u1["a"], u2["a"], rtol=1e-6)
    np.testing.assert_allclose(t1, t2, rtol=1e-6)
    with pytest.raises(ValueError, match=r"mtlopt\.gradvac: num_tasks is required"):
        mtlopt.gradvac()
    with pytest.raises(ValueError, match=r"mtlopt\.gradvac: beta must be a finite number in"):
        mtlopt.gradvac(1.5, num_tasks=2)
    with pytest.raises(ValueError, match=r"mtlopt\.gradvac: target_update must be one of"):
        mtlopt.gradvac(num_tasks=2, target_update="sometimes")
    with pytest.raises(ValueError, match=r"mtlopt\.gradvac: built with num_tasks=2"):
        tx = mtlopt.gradvac(num_tasks=2)
        jax.eval_shape(tx.update, g, tx.init(p))


# ---------------------------------------------------------------- GradDrop: the reference


def graddrop_reference(J, U, leak):
    """The paper's rule on the columns of ``J`` (T, C) with uniforms ``U`` (C,), float64."""
    J = np.asarray(J, np.float64)
    leak = np.broadcast_to(np.asarray(leak, np.float64), (J.shape[0],))
    with np.errstate(invalid="ignore", divide="ignore"):
        P = 0.5 * (1.0 + J.sum(0) / np.abs(J).sum(0))
    M = (P > U) * (J > 0) + (P <= U) * (J < 0)
    return np.sum((leak[:, None] + (1 - leak[:, None]) * M) * J, axis=0), P


@functools.cache
def _graddrop_program(T, leak_kind):
    """One step of graddrop on ``{"a": (T, 300), "b": (T, 41)}`` per problem (see
    :func:`_batched`), with the integers behind each leaf's uniforms, from the same keys."""
    leak = {"zero": 0.0, "half": 0.5, "one": 1.0, "tasks": np.linspace(0.1, 0.9, T)}[leak_kind]
    tx = mtlopt.graddrop(leak.astype(np.float32) if leak_kind == "tasks" else leak)

    def step(J, state, mask):
        sub = _split_key(state.key)
        U = jnp.concatenate([_uniforms_jax(sub, 0, 300), _uniforms_jax(sub, 1, 41)])
        u, new = tx.update({"a": J[:, :300], "b": J[:, 300:]}, state, task_mask=mask)
        return jnp.concatenate([u["a"], u["b"]]), new, U

    return tx, _batched(step), leak


def _uniforms_jax(key, leaf, n):
    """The 16-bit integers behind GradDrop's uniforms for one leaf, re-derived from the key:
    the high then the low halves of threefry words (``(b + 0.5) / 2**16`` on the host)."""
    words = jax.random.bits(jax.random.fold_in(key, leaf), ((n + 1) // 2,), jnp.uint32)
    return jnp.concatenate([words >> 16, words & 0xFFFF])[:n]


def _graddrop_problems(T, n, seed):
    rng = np.random.default_rng(seed)
    J = rng.normal(size=(n, T, 341)).astype(np.float32)
    J[:, :, :20] = np.abs(J[:, :, :20])  # purity 1: kept whole
    J[:, :, 20:40] = -np.abs(J[:, :, 20:40])  # purity 0: kept whole
    J[:, :, 40:45] = 0.0  # all zero: 0
    J[:, 0, 45:60] = 0.0  # one task without a component there
    return J


@pytest.mark.parametrize(
    "T,leak_kind",
    [(3, "zero"), pytest.param(5, "half", marks=pytest.mark.slow), (4, "tasks"), (20, "zero")],
)
def test_graddrop_matches_the_transcription(T, leak_kind):
    """Per coordinate: purity, the same uniforms, the paper's masks and leak; two steps (new
    uniforms each). T = 20 takes the loop over tasks instead of the unrolled chain."""
    tx, step, leak = _graddrop_program(T, leak_kind)
    n = 4
    Js = _graddrop_problems(T, n, seed=T)
    state = _stack_states(tx.init({"a": jnp.zeros(300), "b": jnp.zeros(41)}), _keys(n, T))
    seen = []
    for k in range(2):
        u, state, bits = step(Js * np.float32(1 + k), state, np.ones((n, T), bool))
        U = (np.asarray(bits, np.float64) + 0.5) / 2**16
        seen.append(U)
        for p in range(n):
            want, P = graddrop_reference(Js[p] * np.float32(1 + k), U[p], leak)
            clear = ~(np.abs(P - U[p]) < 1e-5)  # float32 rounding of P at a near-tie
            assert clear.mean() > 0.99
            np.testing.assert_allclose(np.asarray(u[p])[clear], want[clear], rtol=1e-5, atol=1e-5)
            Jp = Js[p].astype(np.float64) * (1 + k)
            # Purity 1 and 0 coordinates kept whole (whatever the leak), all-zero ones give 0.
            np.testing.assert_allclose(u[p, :40], Jp[:, :40].sum(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(u[p, 40:45], 0.0)
            if leak_kind == "zero":  # one sign per coordinate: the positive or negative sum
                up, down = np.maximum(Jp, 0).sum(0), np.minimum(Jp, 0).sum(0)
                near = np.minimum(np.abs(u[p] - up), np.abs(u[p] - down))
                assert np.all(near <= 1e-5 * (1 + np.abs(Jp).sum(0)))
    assert not np.allclose(seen[0], seen[1])  # a new key every step
    assert int(state.skipped.sum()) == 0
    assert mtlopt.task_weights(state) is None


def test_graddrop_leak_one_is_the_sum():
    tx, step, _ = _graddrop_program(3, "one")
    Js = _graddrop_problems(3, 4, seed=1)
    state = _stack_states(tx.init({"a": jnp.zeros(300), "b": jnp.zeros(41)}), _keys(4, 1))
    u, _, _ = step(Js, state, np.ones((4, 3), bool))
    np.testing.assert_allclose(u, Js.astype(np.float64).sum(1), rtol=1e-5, atol=1e-5)


def test_graddrop_masked_tasks_and_a_nan_step():
    """A (T,) leak with task 2 masked (its row NaN): the rule on the other three tasks with
    their leaks and the same uniforms; a NaN in an active row: zero update, the key kept."""
    T, n = 4, 3
    tx, step, leak = _graddrop_program(T, "tasks")
    Js = _graddrop_problems(T, n, seed=8)
    masks = np.ones((n, T), bool)
    masks[:, 2] = False
    Js[:, 2] = np.nan
    Js[2, 0, 100] = np.nan  # problem 2: a NaN in an active task
    state = _stack_states(tx.init({"a": jnp.zeros(300), "b": jnp.zeros(41)}), _keys(n, 8))
    u, new, bits = step(Js, state, masks)
    U = (np.asarray(bits, np.float64) + 0.5) / 2**16
    keep = masks[0]
    for p in range(2):
        want, P = graddrop_reference(Js[p][keep], U[p], leak[keep])
        clear = ~(np.abs(P - U[p]) < 1e-5)
        np.testing.assert_allclose(u[p][clear], want[clear], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(u[2], 0.0)
    np.testing.assert_array_equal(new.key[2], state.key[2])
    assert new.skipped.tolist() == [0, 0, 1]
    assert not np.array_equal(new.key[0], state.key[0])


def test_graddrop_keeps_each_sign_with_its_purity():
    """Two tasks, +3 and -1 in every coordinate: purity 3/4, so about 3/4 of the coordinates
    keep the +3 (a binomial count within 5 sigma), the others the -1."""
    C = 100_000
    J = np.stack([np.full(C, 3.0), np.full(C, -1.0)]).astype(np.float32)
    tx = mtlopt.graddrop(seed=4)
    u, _ = jax.jit(tx.update)({"w": J}, tx.init({"w": jnp.zeros(C)}))
    u = np.asarray(u["w"])
    assert set(np.unique(u)) <= {3.0, -1.0}
    frac = np.mean(u == 3.0)
    assert abs(frac - 0.75) < 5 * np.sqrt(0.75 * 0.25 / C), frac


def test_graddrop_seeds_heads_and_errors():
    """Seeds repeat and differ; a head follows its own task's gradient; bad leaks are named."""
    rng = np.random.default_rng(3)
    J = rng.normal(size=(3, 64)).astype(np.float32)
    head = rng.normal(size=(3, 4)).astype(np.float32)
    spec = {"w": False, "h": True}
    p = {"w": jnp.zeros(64), "h": jnp.zeros(4)}

    def run(key):
        tx = mtlopt.graddrop(seed=key, task_specific=spec)
        return tx.update({"w": J, "h": head}, tx.init(p))[0]

    keys = jnp.stack([jax.random.key(0), jax.random.key(0), jax.random.key(1)])
    out = jax.jit(jax.vmap(run))(keys)
    np.testing.assert_array_equal(out["w"][0], out["w"][1])
    assert not np.array_equal(out["w"][0], out["w"][2])
    np.testing.assert_allclose(out["h"][0], head.sum(0), rtol=1e-6)
    with pytest.raises(ValueError, match=r"mtlopt\.graddrop: leak must be a finite number in"):
        mtlopt.graddrop(leak=1.5)
    with pytest.raises(ValueError, match=r"mtlopt\.graddrop: leak must be in \[0, 1\]"):
        mtlopt.graddrop(leak=np.array([0.5, -0.1]))
    with pytest.raises(ValueError, match=r"mtlopt\.graddrop: leak has 2 entries but num_tasks=3"):
        mtlopt.graddrop(leak=np.array([0.5, 0.1]), num_tasks=3)
    with pytest.raises(ValueError, match=r"mtlopt\.graddrop: leak has 2 entries but the task"):
        tx = mtlopt.graddrop(leak=np.array([0.5, 0.1]))
        jax.eval_shape(tx.update, {"w": J}, tx.init({"w": jnp.zeros(64)}))
    with pytest.raises(ValueError, match=r"mtlopt\.graddrop: leak must be a scalar or a \(T,\)"):
        mtlopt.graddrop(leak=np.zeros((2, 2)))
