"""UW, IMTL-L and the hybrid IMTL: learned per-task s, stepped inside ``update``.

Against hand-worked values and float64 numpy transcriptions of each rule (weights from ``s``
before the step, then one optimizer step on the gradient of the paper's objective), TorchJD
0.18's ``UW`` and ``IMTLL`` trained with torch's SGD (same weights, same trajectory of the
model and of ``s``), and a float64 transcription of LibMTL's ``IMTL`` (IMTL-G's ``D U^T`` solve
on the gradients of the scaled losses, heads following their scaled gradients). Then masks
(``s`` and the optimizer's moments kept), non-positive and extreme losses (no NaN reaches the
params, the state never jams), ``inject_hyperparams`` and ``vmap`` over learning rates.

Each test builds one jitted program (several methods inside it where it can).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt

LR = 0.1
STEPS = 3
# (T,) losses of three steps: positive, of different sizes.
LOSSES = np.array([[1.0, 3.0, 0.5], [0.8, 2.0, 0.7], [0.5, 1.5, 0.9]], np.float32)


def _run_loss_only(tx, losses_seq, masks=None):
    """Weights and states of ``len(losses_seq)`` steps of the loss-only mode (traced: call
    inside jit)."""
    state = tx.init(None)
    ws, ss = [], []
    for k, losses in enumerate(losses_seq):
        kw = {} if masks is None else {"task_mask": masks[k]}
        w, state = mtlopt.loss_weights(tx, losses, state, **kw)
        ws.append(w)
        ss.append(state)
    return jnp.stack(ws), ss


def _numpy_rule(kind, losses_seq, lr, init=0.0):
    """float64 transcription: (weights per step, s after each step) for plain SGD on s."""
    s = np.full(losses_seq.shape[1], init, np.float64)
    ws, ss = [], []
    for l in losses_seq.astype(np.float64):
        if kind == "kendall":
            w, g = 0.5 * np.exp(-s), 0.5 * (1.0 - np.exp(-s) * l)
        elif kind == "simplified":
            w, g = np.exp(-s), 1.0 - np.exp(-s) * l
        else:  # imtl_l
            w, g = np.exp(s), np.exp(s) * l - 1.0
        ws.append(w)
        s = s - lr * g
        ss.append(s.copy())
    return np.array(ws), np.array(ss)


def test_hand_worked_weights_and_sgd_steps():
    """Three SGD steps on s, both UW forms (and LibMTL's init -0.5) and IMTL-L: the weights use
    s before each step, s follows the gradient of the paper's objective."""
    sgd = lambda: optax.sgd(LR)
    txs = {
        "kendall": mtlopt.uw(optimizer=sgd(), num_tasks=3),
        "simplified": mtlopt.uw(form="simplified", optimizer=sgd(), num_tasks=3),
        "libmtl": mtlopt.uw(init=-0.5, optimizer=sgd(), num_tasks=3),
        "imtl_l": mtlopt.imtl_l(optimizer=sgd(), num_tasks=3),
    }

    @jax.jit
    def run():
        out = {}
        for name, tx in txs.items():
            ws, ss = _run_loss_only(tx, jnp.asarray(LOSSES))
            field = "log_scales" if name == "imtl_l" else "log_vars"
            out[name] = (ws, jnp.stack([getattr(s, field) for s in ss]), ss[-1])
        return out

    out = jax.device_get(run())
    # By hand, step 1 (s = 0): kendall w = 0.5, grad 0.5 (1 - l), so s = -0.05 (1 - l).
    np.testing.assert_allclose(out["kendall"][0][0], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(out["kendall"][1][0], [0.0, 0.1, -0.025], atol=1e-7)
    # Step 2: w = 0.5 exp(-s1).
    np.testing.assert_allclose(out["kendall"][0][1], 0.5 * np.exp([0.0, -0.1, 0.025]), rtol=1e-6)
    # IMTL-L step 1: w = 1, grad l - 1, s = -0.1 (l - 1); step 2: w = exp(s1).
    np.testing.assert_allclose(out["imtl_l"][0][0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(out["imtl_l"][1][0], [0.0, -0.2, 0.05], atol=1e-7)
    np.testing.assert_allclose(out["imtl_l"][0][1], np.exp([0.0, -0.2, 0.05]), rtol=1e-6)
    for name, kind, init in (
        ("kendall", "kendall", 0.0),
        ("simplified", "simplified", 0.0),
        ("libmtl", "kendall", -0.5),
        ("imtl_l", "imtl_l", 0.0),
    ):
        ws, ss, last = out[name]
        want_w, want_s = _numpy_rule(kind, LOSSES, LR, init)
        np.testing.assert_allclose(ws, want_w, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(ss, want_s, rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(mtlopt.task_weights(last), want_w[-1], rtol=1e-6)
        assert int(last.count) == STEPS and int(last.skipped) == 0


def test_against_torchjd_uw_and_imtll_with_sgd():
    """A linear model with two outputs (a loss each), trained jointly with s by SGD: the
    one-backward-pass mode gives TorchJD's weights, model and s at every step."""
    torch = pytest.importorskip("torch")
    scal = pytest.importorskip("torchjd.scalarization")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3))
    y = rng.normal(size=(8, 2)) * np.array([1.0, 3.0])
    W0, b0 = rng.normal(size=(3, 2)), rng.normal(size=2)

    def jax_run(tx):
        xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

        def task_losses(p):
            return jnp.mean((xj @ p["W"] + p["b"][None] - yj) ** 2, axis=0)

        p = {"W": jnp.asarray(W0, jnp.float32), "b": jnp.asarray(b0, jnp.float32)}
        state = tx.init(p)
        traj = []
        for _ in range(STEPS):

            def total(p, state=state):
                losses = task_losses(p)
                w, new = mtlopt.loss_weights(tx, jax.lax.stop_gradient(losses), state)
                return w @ losses, (w, new)

            g, (w, state) = jax.grad(total, has_aux=True)(p)
            p = jax.tree.map(lambda a, b: a - LR * b, p, g)
            traj.append((w, p, state))
        return traj

    @jax.jit
    def ours():
        uw = jax_run(mtlopt.uw(optimizer=optax.sgd(LR), num_tasks=2))
        il = jax_run(mtlopt.imtl_l(optimizer=optax.sgd(LR), num_tasks=2))
        return uw, il

    uw_traj, il_traj = jax.device_get(ours())

    def torch_run(scalarizer, param, weight):
        f64 = torch.float64
        W = torch.tensor(W0, dtype=f64, requires_grad=True)
        b = torch.tensor(b0, dtype=f64, requires_grad=True)
        xt, yt = torch.tensor(x, dtype=f64), torch.tensor(y, dtype=f64)
        scalarizer = scalarizer.double()
        opt = torch.optim.SGD([W, b, *scalarizer.parameters()], lr=LR)
        traj = []
        for _ in range(STEPS):
            opt.zero_grad()
            losses = ((xt @ W + b - yt) ** 2).mean(0)
            w = weight(getattr(scalarizer, param).detach()).numpy().copy()
            scalarizer(losses).backward()
            opt.step()
            s = getattr(scalarizer, param).detach().numpy().copy()
            traj.append((w, W.detach().numpy().copy(), b.detach().numpy().copy(), s))
        return traj

    ref_uw = torch_run(scal.UW(2), "log_var", lambda s: 0.5 * torch.exp(-s))
    ref_il = torch_run(scal.IMTLL(2), "log_scale", torch.exp)
    for ours_, ref, field in ((uw_traj, ref_uw, "log_vars"), (il_traj, ref_il, "log_scales")):
        for k, ((w, p, state), (w_t, W_t, b_t, s_t)) in enumerate(zip(ours_, ref, strict=True)):
            msg = f"{field} step {k}"
            np.testing.assert_allclose(w, w_t, rtol=2e-6, err_msg=msg)
            np.testing.assert_allclose(p["W"], W_t, rtol=1e-5, atol=1e-6, err_msg=msg)
            np.testing.assert_allclose(p["b"], b_t, rtol=1e-5, atol=1e-6, err_msg=msg)
            np.testing.assert_allclose(getattr(state, field), s_t, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The hybrid IMTL against LibMTL's IMTL, transcribed in float64


def _libmtl_imtl(J, H, s, losses, lr):
    """One step of LibMTL's ``IMTL`` (``weighting/IMTL.py``) with SGD on s, in float64.

    ``J`` (T, P) shared task grads, ``H`` (T, Q) head grads. Zero task gradients (NaN there)
    are left out, as IMTL-G's weight 0 for them: the rule on the other tasks."""
    scaled = np.exp(s)[:, None] * J
    live = np.linalg.norm(J, axis=1) > 0
    alpha = np.zeros(len(s))
    G = scaled[live]
    if len(G) == 1:
        alpha[live] = 1.0
    else:
        unit = G / np.linalg.norm(G, axis=1, keepdims=True)
        D = G[:1] - G[1:]
        U = unit[:1] - unit[1:]
        a = (G[0] @ U.T) @ np.linalg.inv(D @ U.T)
        alpha[live] = np.concatenate([[1.0 - a.sum()], a])
    shared = alpha @ scaled
    heads = np.exp(s) @ H
    new_s = s - lr * (np.exp(s) * losses - 1.0)
    return shared, heads, np.exp(s) * alpha, new_s


def _imtl_problems(T, P, rng):
    """(name, J) float64: random, conflicting, norms spread 1000x, one zero task."""
    J = rng.normal(size=(T, P))
    conflicting = J.copy()
    conflicting[1] = -0.8 * conflicting[0] + 0.2 * conflicting[1]
    scaled = J * np.logspace(-1.5, 1.5, T)[:, None]
    zero = rng.normal(size=(T, P))
    zero[1] = 0.0
    return [("random", J), ("conflicting", conflicting), ("scaled1000", scaled), ("zero", zero)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_imtl_against_libmtl(dtype):
    """Three SGD steps on s from s = (0.3, -0.2, 0.1) over four problem classes (one vmapped
    program): the shared update, the heads (each its scaled gradient), the reported weights
    ``exp(s) alpha`` and s after each step."""
    T, P, Q = 3, 11, 4
    rng = np.random.default_rng(7)
    problems = _imtl_problems(T, P, rng)
    heads = rng.normal(size=(T, T, Q))  # task t's gradient on the (T, Q) heads
    losses = np.array([[0.7, 2.0, 1.2], [0.6, 1.5, 1.4], [0.5, 1.0, 1.9]])
    s0 = np.array([0.3, -0.2, 0.1])
    f = np.float64 if dtype == "float64" else np.float32
    with jax.enable_x64(dtype == "float64"):
        tx = mtlopt.imtl(
            optimizer=optax.sgd(LR), num_tasks=T, task_specific={"trunk": False, "heads": True}
        )
        params = {"trunk": jnp.zeros(P, f), "heads": jnp.zeros((T, Q), f)}

        def run(J):
            state = tx.init(params)
            state = state._replace(log_scales=jnp.asarray(s0, jnp.float32))
            out = []
            for k in range(STEPS):
                grads = {"trunk": J * (1.0 + 0.1 * k), "heads": jnp.asarray(heads, f)}
                u, state = tx.update(grads, state, params, task_losses=jnp.asarray(losses[k], f))
                out.append((u, mtlopt.task_weights(state), state.log_scales))
            return out

        Js = jnp.asarray(np.stack([J for _, J in problems]), f)
        got = jax.device_get(jax.jit(jax.vmap(run))(Js))
    tol = {"float32": 1e-5, "float64": 1e-7}[dtype]  # s itself is kept in float32
    worst = {}
    for i, (name, J) in enumerate(problems):
        s = s0.astype(np.float32).astype(np.float64)
        for k in range(STEPS):
            d, h, w, s = _libmtl_imtl(J * (1.0 + 0.1 * k), heads.reshape(T, -1), s, losses[k], LR)
            s = s.astype(np.float32).astype(np.float64)  # the state is float32
            u, w_got, s_got = (jax.tree.map(lambda x, i=i: x[i], part) for part in got[k])
            err = np.linalg.norm(u["trunk"] - d) / np.linalg.norm(d)
            worst[name] = max(worst.get(name, 0.0), err)
            assert err <= tol, (name, k, err)
            np.testing.assert_allclose(u["heads"].reshape(-1), h, rtol=tol, atol=tol)
            np.testing.assert_allclose(w_got, w, rtol=tol, atol=tol, err_msg=name)
            np.testing.assert_allclose(s_got, s, rtol=1e-6, atol=1e-7, err_msg=name)
    print(dtype, {k: f"{v:.1e}" for k, v in worst.items()})


# ----------------------------------------------------------------------------------------------
# Masks, bad and extreme losses


def test_masked_tasks_keep_s_and_optimizer_moments():
    """Adam (the default): a step with task 1 masked (its grads and loss NaN) leaves its s and
    its rows of Adam's moments as they were; the others move; its weight is 0."""
    T, P = 3, 5
    rng = np.random.default_rng(3)
    J = jnp.asarray(rng.normal(size=(T, P)), jnp.float32)
    Jn = J.at[1].set(jnp.nan)
    L = jnp.asarray([0.5, 2.0, 1.5], jnp.float32)
    Ln = L.at[1].set(jnp.nan)
    mask = jnp.asarray([True, False, True])
    txs = {
        "uw": (mtlopt.uw(0.1, num_tasks=T), "log_vars"),
        "imtl_l": (mtlopt.imtl_l(0.1, num_tasks=T), "log_scales"),
        "imtl": (mtlopt.imtl(0.1, num_tasks=T), "log_scales"),
    }

    @jax.jit
    def run():
        out = {}
        for name, (tx, _) in txs.items():
            p = {"w": jnp.zeros(P)}
            s0 = tx.init(p)
            _, s1 = tx.update({"w": J}, s0, p, task_losses=L)
            u, s2 = tx.update({"w": Jn}, s1, p, task_losses=Ln, task_mask=mask)
            out[name] = (s1, s2, u["w"])
        return out

    out = jax.device_get(run())
    for name, (_, field) in txs.items():
        s1, s2, u = out[name]
        assert np.all(np.isfinite(u)), name
        assert int(s2.skipped) == 0 and int(s2.count) == 2, name
        v1, v2 = getattr(s1, field), getattr(s2, field)
        assert v2[1] == v1[1] and np.all(v2[[0, 2]] != v1[[0, 2]]), name
        adam1, adam2 = s1.opt_state[0], s2.opt_state[0]  # ScaleByAdamState
        for m1, m2 in ((adam1.mu, adam2.mu), (adam1.nu, adam2.nu)):
            assert m2[1] == m1[1] and np.all(m2[[0, 2]] != m1[[0, 2]]), name
        assert int(adam2.count) == 2
        assert mtlopt.task_weights(s2)[1] == 0.0


def test_non_positive_losses():
    """IMTL-L and IMTL: an active loss <= 0 skips the step (zero update with "skip", NaN with
    "propagate", state kept, counted); masked, it is ignored. UW takes any finite loss."""
    T, P = 3, 4
    J = jnp.asarray(np.random.default_rng(1).normal(size=(T, P)), jnp.float32)
    p = {"w": jnp.zeros(P)}
    good = jnp.asarray([1.0, 2.0, 0.5], jnp.float32)
    bads = jnp.asarray([[1.0, 0.0, 0.5], [1.0, -2.0, 0.5]], jnp.float32)
    skip_mask = jnp.asarray([True, False, True])

    def cases(make):
        tx, txp = make("skip"), make("propagate")
        s1 = tx.update({"w": J}, tx.init(p), p, task_losses=good)[1]
        s1p = txp.update({"w": J}, txp.init(p), p, task_losses=good)[1]
        bad = [tx.update({"w": J}, s1, p, task_losses=b) for b in bads]
        prop = [txp.update({"w": J}, s1p, p, task_losses=b) for b in bads]
        masked = tx.update({"w": J}, s1, p, task_losses=bads[0], task_mask=skip_mask)
        return s1, bad, prop, masked

    makers = {
        "imtl_l": lambda nf: mtlopt.imtl_l(num_tasks=T, nonfinite=nf),
        "imtl": lambda nf: mtlopt.imtl(num_tasks=T, nonfinite=nf),
        "uw": lambda nf: mtlopt.uw(num_tasks=T, nonfinite=nf),
    }
    out = jax.device_get(jax.jit(lambda: {k: cases(m) for k, m in makers.items()})())
    for name, (s1, bad, prop, masked) in out.items():
        for (u, s), (up, _) in zip(bad, prop, strict=True):
            if name == "uw":
                assert np.all(np.isfinite(u["w"])) and int(s.skipped) == 0
                # s moves down for l <= 0 (the objective falls as s -> -inf).
                assert np.all(s.log_vars[1] < s1.log_vars[1])
                continue
            np.testing.assert_array_equal(u["w"], 0.0)
            assert np.all(np.isnan(up["w"]))
            assert int(s.skipped) == 1 and int(s.count) == int(s1.count)
            jax.tree.map(np.testing.assert_array_equal, s._replace(skipped=s1.skipped), s1)
        u, s = masked
        assert np.all(np.isfinite(u["w"])) and np.any(u["w"] != 0.0) and int(s.skipped) == 0


def test_extreme_losses_keep_the_state_finite_and_free():
    """UW with a zero loss for 60 SGD (and Adam) steps: s stops at -bound (weight 0.5 e^20,
    finite); then a huge loss (1e30: the gradient on s overflows float32 and is clipped) and
    ordinary ones: s comes back, nothing non-finite anywhere, no step skipped. IMTL-L with a
    tiny loss (1e-30) stops at +bound."""
    zero = jnp.zeros((60, 2), jnp.float32).at[:, 1].set(1.0)
    after = jnp.asarray([[1e30, 1.0]] + [[1.0, 1.0]] * 5, jnp.float32)
    tiny = jnp.full((60, 2), 1e-30, jnp.float32)
    txs = {
        "uw_sgd": mtlopt.uw(optimizer=optax.sgd(1.0), num_tasks=2),
        "uw_adam": mtlopt.uw(1.0, num_tasks=2),
        "imtl_l_adam": mtlopt.imtl_l(1.0, num_tasks=2),
    }

    def scan(tx, state, losses):
        def body(state, l):
            w, state = mtlopt.loss_weights(tx, l, state)
            field = state.log_vars if hasattr(state, "log_vars") else state.log_scales
            return state, (w, field)

        return jax.lax.scan(body, state, losses)

    @jax.jit
    def run():
        out = {}
        for name, tx in txs.items():
            first = tiny if name.startswith("imtl") else zero
            state, (w1, s1) = scan(tx, tx.init(None), first)
            state, (w2, s2) = scan(tx, state, after)
            out[name] = (w1, s1, w2, s2, state)
        return out

    out = jax.device_get(run())
    for name, (w1, s1, w2, s2, state) in out.items():
        for x in (w1, s1, w2, s2, *jax.tree.leaves(state)):
            assert np.all(np.isfinite(np.asarray(x, np.float64))), name
        assert int(state.skipped) == 0, name
        if name.startswith("imtl"):
            np.testing.assert_allclose(s1[-1, 0], 20.0)
            np.testing.assert_allclose(w1[-1, 0], np.exp(20.0), rtol=1e-6)
            assert s2[-1, 0] < 20.0  # ordinary losses bring it back
            continue
        np.testing.assert_allclose(s1[-1, 0], -20.0)
        np.testing.assert_allclose(w1[-1, 0], 0.5 * np.exp(20.0), rtol=1e-6)
        assert s2[-1, 0] > -20.0
    # SGD: the clipped huge gradient sends s to +bound at once; it then falls towards log 1.
    s2 = out["uw_sgd"][3]
    np.testing.assert_allclose(s2[0, 0], 20.0)
    assert np.all(np.diff(s2[:, 0]) < 0)


# ----------------------------------------------------------------------------------------------
# Hyperparameters traced


def _numpy_adam(losses_seq, lr, b1=0.9, b2=0.999, eps=1e-8):
    """UW (kendall) with optax.adam(lr) on s, in float64: s after each step."""
    s = np.zeros(losses_seq.shape[1])
    m, v = np.zeros_like(s), np.zeros_like(s)
    out = []
    for k, l in enumerate(losses_seq.astype(np.float64), start=1):
        g = 0.5 * (1.0 - np.exp(-s) * l)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        s = s - lr * (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
        out.append(s.copy())
    return np.array(out)


def test_vmap_over_learning_rates_and_inject_hyperparams():
    """The default optimizer is Adam at ``learning_rate``: a vmap over three learning rates
    gives numpy's Adam trajectories; ``optax.inject_hyperparams`` on ``learning_rate`` gives the
    plain transformation's updates, and a changed injected rate changes the step."""
    lrs = np.array([1e-3, 1e-2, 0.3], np.float32)
    T, P = 3, 4
    J = jnp.asarray(np.random.default_rng(2).normal(size=(T, P)), jnp.float32)
    p = {"w": jnp.zeros(P)}

    def sweep(lr):
        tx = mtlopt.uw(lr, num_tasks=T)
        _, ss = _run_loss_only(tx, jnp.asarray(LOSSES))
        return jnp.stack([s.log_vars for s in ss])

    make = lambda: optax.inject_hyperparams(mtlopt.imtl, static_args=("num_tasks",))(
        learning_rate=0.05, num_tasks=T
    )
    plain = mtlopt.imtl(0.05, num_tasks=T)

    @jax.jit
    def run():
        swept = jax.vmap(sweep)(jnp.asarray(lrs))
        injected = make()
        si, sp = injected.init(p), plain.init(p)
        outs = []
        for k in range(STEPS):
            ui, si = injected.update({"w": J}, si, p, task_losses=jnp.asarray(LOSSES[k]))
            up, sp = plain.update({"w": J}, sp, p, task_losses=jnp.asarray(LOSSES[k]))
            outs.append((ui["w"], up["w"]))
        # The injected rate changed: another step size on s.
        si = si._replace(hyperparams={**si.hyperparams, "learning_rate": jnp.float32(0.5)})
        _, sj = injected.update({"w": J}, si, p, task_losses=jnp.asarray(LOSSES[0]))
        _, sq = plain.update({"w": J}, sp, p, task_losses=jnp.asarray(LOSSES[0]))
        return swept, outs, si.inner_state, sj.inner_state, sq

    swept, outs, before, changed, fixed = jax.device_get(run())
    for i, lr in enumerate(lrs):
        np.testing.assert_allclose(swept[i], _numpy_adam(LOSSES, float(lr)), rtol=1e-5, atol=1e-7)
    for ui, up in outs:
        np.testing.assert_allclose(ui, up, rtol=1e-6, atol=1e-7)
    step_changed = changed.log_scales - before.log_scales
    step_fixed = fixed.log_scales - before.log_scales
    np.testing.assert_allclose(step_changed, 10.0 * step_fixed, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Construction


def test_rejects_bad_arguments():
    for make, name in ((mtlopt.uw, "uw"), (mtlopt.imtl_l, "imtl_l"), (mtlopt.imtl, "imtl")):
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: num_tasks is required"):
            make(num_tasks=None)
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: bound must be a finite number"):
            make(bound=0.0, num_tasks=2)
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: init=25.0 is outside"):
            make(init=25.0, num_tasks=2)
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: init must be a finite number"):
            make(init=float("nan"), num_tasks=2)
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: learning_rate must be"):
            make(-1.0, num_tasks=2)
        with pytest.raises(ValueError, match=rf"mtlopt\.{name}: optimizer must be an optax"):
            make(optimizer="adam", num_tasks=2)
        make(init=25.0, bound=None, num_tasks=2)  # no bound: any finite init
    with pytest.raises(ValueError, match=r"mtlopt\.uw: form must be one of"):
        mtlopt.uw(form="libmtl", num_tasks=2)
    with pytest.raises(ValueError, match=r"mtlopt\.imtl: task_grads=None"):
        mtlopt.loss_weights(
            mtlopt.imtl(num_tasks=2), jnp.ones(2), mtlopt.imtl(num_tasks=2).init(None)
        )
