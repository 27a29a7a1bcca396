"""FAMO and GradNorm (``mtlopt.famo``, ``mtlopt.gradnorm``): their learned parameters step by
step against float64 numpy transcriptions of the papers' rules (and FAMO against TorchJD's
``FAMO`` in a training run, both forms of its "after" losses), masks, bad losses, GradNorm's
``layer=`` (the skeleton's ``gram_leaves``), and traced learning rates.

Every run is one jitted program (the steps unrolled inside it), so the file compiles a handful.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlopt

T = 3
B1, B2, ADAM_EPS = 0.9, 0.999, 1e-8


# ----------------------------------------------------------------------------------------------
# float64 references of the optimizers (rows where ``rows`` is False keep value and moments)


class AdamRef:
    """``torch.optim.Adam(lr, weight_decay=gamma)``: L2 added to the gradient, then Adam."""

    def __init__(self, n, lr, gamma=0.0):
        self.m, self.v, self.t, self.lr, self.gamma = np.zeros(n), np.zeros(n), 0, lr, gamma

    def step(self, x, g, rows):
        self.t += 1
        g = g + self.gamma * x
        m = B1 * self.m + (1 - B1) * g
        v = B2 * self.v + (1 - B2) * g * g
        m_hat, v_hat = m / (1 - B1**self.t), v / (1 - B2**self.t)
        new = x - self.lr * m_hat / (np.sqrt(v_hat) + ADAM_EPS)
        self.m, self.v = np.where(rows, m, self.m), np.where(rows, v, self.v)
        return np.where(rows, new, x)


class SGDRef:
    def __init__(self, n, lr):
        self.lr = lr

    def step(self, x, g, rows):
        return np.where(rows, x - self.lr * g, x)


def softmax_on(x, keep):
    out = np.zeros_like(x)
    if keep.any():
        e = np.exp(x[keep] - x[keep].max())
        out[keep] = e / e.sum()
    return out


def test_adam_with_l2_is_torch_adam_with_weight_decay():
    """FAMO's default optimizer, ``optax.chain(add_decayed_weights(gamma), adam(lr))``, is
    ``torch.optim.Adam(lr, weight_decay=gamma)`` (the authors' and the peers' optimizer)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x0, grads = rng.normal(size=T), rng.normal(size=(6, T))
    opt = optax.chain(optax.add_decayed_weights(0.1), optax.adam(0.05))

    @jax.jit
    def ours():
        x = jnp.asarray(x0, jnp.float32)
        s = opt.init(x)
        for g in grads:
            with jax.numpy_dtype_promotion("standard"):
                u, s = opt.update(jnp.asarray(g, jnp.float32), s, x)
            x = x + u
        return x

    p = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    torch_opt = torch.optim.Adam([p], lr=0.05, weight_decay=0.1)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        torch_opt.step()
    ref = AdamRef(T, 0.05, 0.1)
    x = x0.copy()
    for g in grads:
        x = ref.step(x, g, np.ones(T, bool))
    np.testing.assert_allclose(x, p.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(ours(), x, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# FAMO

LOWER = np.array([0.1, 0.0, 0.2])
# Six steps of losses (task 1 masked at step 2, every task at step 4) and, for the paper's
# form, the previous step's batch after its update. Where a task had no loss at the previous
# step, its "after" value is never used (1e3 here: it would show); NaN where masked now.
_rng = np.random.default_rng(1)
F_LOSSES = LOWER + np.exp(_rng.normal(size=(6, T)) * 0.5) * np.linspace(2.0, 1.0, 6)[:, None]
F_AFTER = LOWER + (F_LOSSES - LOWER) * np.exp(-np.abs(_rng.normal(size=(6, T))) * 0.3)
F_AFTER = np.roll(F_AFTER, 1, axis=0)  # row k: batch k-1 after step k-1's update
F_MASKS = np.ones((6, T), bool)
F_MASKS[2, 1] = False
F_MASKS[4] = False
F_LOSSES[2, 1] = np.nan
F_AFTER[3, 1] = 1e3  # task 1 had no loss at step 2
F_AFTER[2, 1] = np.nan


def famo_reference(losses, masks, after=None, lr=0.025, gamma=1e-3, lower=LOWER):
    """The paper's rule (Algorithm 2, the authors' ``FAMO.update``) in float64, with the
    library's masks: the weights and logits of every step."""
    n = losses.shape[1]
    xi, adam = np.zeros(n), AdamRef(n, lr, gamma)
    prev, prev_active = np.zeros(n), np.zeros(n, bool)
    ws, xis = [], []
    for k, (l, mask) in enumerate(zip(losses, masks, strict=True)):
        both = mask & prev_active
        if both.any():
            a = l if after is None else after[k]
            delta = np.where(both, np.log(prev - lower + 1e-8), 0.0)
            delta -= np.where(both, np.log(np.where(both, a, 1.0) - lower + 1e-8), 0.0)
            z = softmax_on(xi, both)
            xi = adam.step(xi, z * (delta - z @ delta), both)
        z = softmax_on(xi, mask)
        D = np.where(mask, l - lower + 1e-8, 1.0)
        c = np.sum(np.where(mask, z / D, 0.0))
        ws.append(np.where(mask, z / (np.where(mask, c, 1.0) * D), 0.0))
        xis.append(xi.copy())
        if mask.any():
            prev = np.where(mask, l, prev)
            prev_active = mask.copy()
    return np.array(ws), np.array(xis)


@functools.cache
def _famo_runs():
    """Both forms over the six steps (a scan each), in the loss-only mode: weights, states."""
    tx = mtlopt.famo(min_losses=LOWER, num_tasks=T)

    def run(form):
        def body(state, inputs):
            l, m, a = inputs
            extra = {} if form == "lagged" else {"losses_after": a}  # unused at the first step
            w, state = mtlopt.loss_weights(tx, l, state, task_mask=m, **extra)
            return state, (w, state)

        xs = (jnp.asarray(F_LOSSES, jnp.float32), F_MASKS, jnp.asarray(F_AFTER, jnp.float32))
        return jax.lax.scan(body, tx.init(None), xs)[1]

    out = jax.device_get(jax.jit(lambda: {f: run(f) for f in ("lagged", "after")})())
    unstack = lambda tree: [jax.tree.map(lambda x, k=k: x[k], tree) for k in range(len(F_MASKS))]
    return {form: unstack(traj) for form, traj in out.items()}


@pytest.mark.parametrize("form", ["lagged", "after"])
def test_famo_logit_update_matches_the_paper_in_float64(form):
    want_w, want_xi = famo_reference(F_LOSSES, F_MASKS, None if form == "lagged" else F_AFTER)
    traj = _famo_runs()[form]
    for k, (w, state) in enumerate(traj):
        np.testing.assert_allclose(w, want_w[k], rtol=2e-6, atol=1e-7, err_msg=str(k))
        np.testing.assert_allclose(state.logits, want_xi[k], rtol=1e-5, atol=1e-7, err_msg=str(k))
        assert int(state.skipped) == 0
    # The logits moved (from the second step on), and the weights with them.
    assert np.abs(want_xi[1]).min() > 1e-3
    # A masked task keeps its logit and its rows of Adam's moments, at step 2 and at step 3
    # (no loss at step 2 to compare with); an all-masked step changes nothing but the weights.
    for k in (2, 3):
        old, new = traj[k - 1][1], traj[k][1]
        assert new.logits[1] == old.logits[1]
        leaves = zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(old.opt_state), strict=True)
        for a, b in leaves:
            if np.ndim(a) == 1:
                assert a[1] == b[1]
    old, new = traj[3][1], traj[4][1]
    np.testing.assert_array_equal(traj[4][0], 0.0)
    for field in ("count", "logits", "last_losses", "loss_step"):
        np.testing.assert_array_equal(getattr(new, field), getattr(old, field), field)


def test_famo_weights_closed_form():
    """``w = z / (c D)``, ``c = sum z / D``: the gradient of ``sum_t (z_t / c) log D_t`` with
    respect to the losses (``c`` held constant), for given logits."""
    xi = np.array([0.3, -0.2, 0.5])
    l = np.array([0.7, 2.0, 0.4])
    tx = mtlopt.famo(min_losses=LOWER, num_tasks=T)
    state = tx.init(None)._replace(logits=jnp.asarray(xi, jnp.float32))
    w, _ = jax.jit(lambda s: mtlopt.loss_weights(tx, jnp.asarray(l, jnp.float32), s))(state)
    z = np.exp(xi) / np.exp(xi).sum()
    D = l - LOWER + 1e-8
    c = np.sum(z / D)
    objective = lambda losses: np.sum(z / c * np.log(losses - LOWER + 1e-8))
    grad = [(objective(l + h) - objective(l - h)) / 2e-6 for h in np.eye(T) * 1e-6]
    np.testing.assert_allclose(w, z / (c * D), rtol=1e-6)
    np.testing.assert_allclose(w, grad, rtol=1e-6)
    assert abs(float(np.sum(w)) - 1.0) < 1e-6


def test_famo_bad_losses_skip_the_step():
    """``D <= 0`` now, or in the ``losses_after`` of the update: no NaN reaches the update, which
    is 0; the state is left as it was and the step counted. A loss at its bound (``D = 1e-8``)
    and a NaN loss of a masked task are fine."""
    tx = mtlopt.famo(min_losses=LOWER, num_tasks=T)
    params = {"w": jnp.zeros(4)}
    J = np.random.default_rng(2).normal(size=(T, 4)).astype(np.float32)
    good_l, good_a = F_LOSSES[1], F_AFTER[1]
    cases = {
        "good": (good_l, good_a, [True] * T, False),
        "below_bound": (np.where([1, 0, 0], LOWER - 1e-3, good_l), good_a, [True] * T, True),
        "after_below": (good_l, np.where([0, 0, 1], LOWER - 1.0, good_a), [True] * T, True),
        "zero_loss": (np.where([0, 1, 0], 0.0, good_l), good_a, [True] * T, False),  # bound 0
        "masked_nan": (np.where([0, 0, 1], np.nan, good_l), good_a, [True, True, False], False),
    }
    L = np.stack([c[0] for c in cases.values()]).astype(np.float32)
    A = np.stack([c[1] for c in cases.values()]).astype(np.float32)
    M = np.array([c[2] for c in cases.values()])

    @jax.jit
    def run(L, A, M):
        first = jnp.asarray(F_LOSSES[0], jnp.float32)
        start = tx.update({"w": jnp.asarray(J)}, tx.init(params), params, task_losses=first)[1]
        step = lambda l, a, m: tx.update(
            {"w": jnp.asarray(J)}, start, params, task_losses=l, losses_after=a, task_mask=m
        )
        return start, jax.vmap(step)(L, A, M)

    start, (u, states) = jax.device_get(run(L, A, M))
    for i, (name, (_, _, _, bad)) in enumerate(cases.items()):
        new = jax.tree.map(lambda x, i=i: x[i], states)
        assert np.all(np.isfinite(u["w"][i])), name
        if bad:
            np.testing.assert_array_equal(u["w"][i], 0.0, err_msg=name)
            assert int(new.skipped) == 1, name
            for a, b in zip(jax.tree.leaves(new._replace(skipped=start.skipped)),
                            jax.tree.leaves(start), strict=True):  # fmt: skip
                np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert int(new.skipped) == 0 and int(new.count) == 2, name
            np.testing.assert_allclose(
                u["w"][i], mtlopt.task_weights(new) @ J, rtol=1e-5, atol=1e-6, err_msg=name
            )
    # The loss at its bound takes (nearly) all the weight.
    assert float(mtlopt.task_weights(jax.tree.map(lambda x: x[3], states))[1]) > 0.999


def test_famo_against_torchjd_in_a_training_run():
    """A linear model with three outputs (a loss each) trained by SGD with FAMO's weights from
    the one-backward-pass mode: TorchJD's ``FAMO`` (float64) gives the same weights, logits and
    model at every step, with the paper's "after" losses (``losses_after``: the batch recomputed
    after the step) and with the lagged form (TorchJD's ``update`` fed the next step's losses).
    """
    torch = pytest.importorskip("torch")
    scal = pytest.importorskip("torchjd.scalarization")
    rng = np.random.default_rng(3)
    steps, lr = 6, 0.1
    xs = rng.normal(size=(steps, 8, 4))  # a new batch every step
    ys = rng.normal(size=(steps, 8, T)) * np.array([1.0, 3.0, 0.5]) + 1.0
    W0 = rng.normal(size=(4, T)) * 0.1

    def losses_of(W, x, y):
        return jnp.mean((x @ W - y) ** 2, axis=0)

    @jax.jit
    def ours():
        out = {}
        tx = mtlopt.famo(num_tasks=T)
        for form in ("after", "lagged"):
            W, state, after, traj = jnp.asarray(W0, jnp.float32), tx.init(None), None, []
            for k in range(steps):
                x, y = jnp.asarray(xs[k], jnp.float32), jnp.asarray(ys[k], jnp.float32)
                extra = {} if after is None else {"losses_after": after}

                def total(W, state=state, x=x, y=y, extra=extra):
                    losses = losses_of(W, x, y)
                    w, new = mtlopt.loss_weights(tx, jax.lax.stop_gradient(losses), state, **extra)
                    return w @ losses, (w, new)

                g, (w, state) = jax.grad(total, has_aux=True)(W)
                W = W - lr * g
                if form == "after":
                    after = losses_of(W, x, y)  # the extra forward pass
                traj.append((w, state.logits, W))
            out[form] = traj
        return out

    got = jax.device_get(ours())
    for form in ("after", "lagged"):
        famo = scal.FAMO(T, lr=0.025, weight_decay=1e-3).double()
        W = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
        model_opt = torch.optim.SGD([W], lr=lr)
        loss_fn = lambda W, k: ((torch.tensor(xs[k]) @ W - torch.tensor(ys[k])) ** 2).mean(0)
        for k in range(steps):
            losses = loss_fn(W, k)
            if form == "lagged" and k > 0:
                famo.update(losses.detach())  # this step's losses stand in for "after"
            logits = famo._w.detach().clone().numpy()  # those of this step's weights
            values = losses.detach().clone().requires_grad_(True)
            (w,) = torch.autograd.grad(famo(values), values)  # FAMO's weights
            model_opt.zero_grad()
            (w @ losses).backward()
            model_opt.step()
            if form == "after":
                with torch.no_grad():
                    famo.update(loss_fn(W, k))  # the batch again, after the step
            w_k, xi_k, W_k = got[form][k]
            msg = f"{form} step {k}"
            np.testing.assert_allclose(w_k, w.numpy(), rtol=1e-5, err_msg=msg)
            np.testing.assert_allclose(xi_k, logits, rtol=1e-5, atol=1e-7, err_msg=msg)
            np.testing.assert_allclose(W_k, W.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=msg)
        assert np.abs(logits).max() > 1e-2  # the logits did move


# ----------------------------------------------------------------------------------------------
# GradNorm

G_PARAMS = {"trunk": {"a": jnp.zeros(4), "b": jnp.zeros(3)}, "head": jnp.zeros((T, 2))}
G_HEADS = {"trunk": {"a": False, "b": False}, "head": True}
G_LAYER = {"trunk": {"a": False, "b": True}, "head": False}
G_STEPS = 7
_rng = np.random.default_rng(4)
G_GRADS = {
    "trunk": {
        "a": _rng.normal(size=(G_STEPS, T, 4)),
        "b": _rng.normal(size=(G_STEPS, T, 3)) * np.array([1.0, 2.0, 0.5])[:, None],
    },
    "head": _rng.normal(size=(G_STEPS, T, T, 2)),
}
G_LOSSES = np.exp(_rng.normal(size=(G_STEPS, T)) * 0.3) * np.array([1.0, 5.0, 0.2])
G_MASKS = np.ones((G_STEPS, T), bool)
# Step 2: task 2 masked (NaN rows and loss). Step 4: a NaN in the unselected leaf "a" (skipped:
# the norms read only "b"). Step 5: a negative loss (skipped).
G_MASKS[2, 2] = False
G_LOSSES[2, 2] = np.nan
for leaf in (G_GRADS["trunk"]["a"], G_GRADS["trunk"]["b"], G_GRADS["head"]):
    leaf[2, 2] = np.nan
G_GRADS["trunk"]["a"][4, 0, 1] = np.nan
G_LOSSES[5, 1] = -0.5
G_SKIPPED = {4, 5}


def gradnorm_reference(opt, alpha=1.5, softmax=False, warmup=0, floor=1e-6):
    """The paper's Algorithm 1 in float64 (LibMTL's ``T softmax(p)`` with ``softmax``), on
    the norms of leaf "b": per step, the weights used and the learned state after it."""
    n_need = max(warmup, 1)
    theta = np.ones(T)
    L0, taken = np.zeros(T), np.zeros(T, int)
    out, floored = [], False
    for k in range(G_STEPS):
        mask, l = G_MASKS[k], G_LOSSES[k]
        z = softmax_on(theta, np.ones(T, bool))
        w = T * z if softmax else theta.copy()
        if k in G_SKIPPED:
            out.append((None, theta.copy(), L0.copy()))
            continue
        take, taken_before = mask & (taken < n_need), taken.copy()
        L0 = np.where(take, L0 + (np.where(mask, l, 0.0) - L0) / (taken + 1), L0)
        taken = np.where(take, taken + 1, taken)
        if mask.any() and np.all(taken_before[mask] >= warmup):
            ratio = np.where(mask, l / np.where(L0 > 0, L0, 1.0), 0.0)
            r = ratio / ratio[mask].mean()
            b = G_GRADS["trunk"]["b"][k]
            n = np.where(mask, np.sqrt(np.sum(np.where(mask[:, None], b, 0.0) ** 2, axis=1)), 0)
            G = w * n
            target = G[mask].mean() * np.where(mask, r, 0.0) ** alpha
            a = np.where(mask, np.sign(G - target) * n, 0.0)
            grad = T * z * (a - z @ a) if softmax else a
            new = opt.step(theta, grad, mask)
            if not softmax:
                floored |= bool(np.any(new[mask] < floor))
                new = np.where(mask, np.maximum(new, floor), theta)
                budget = T - theta[~mask].sum()
                new = np.where(mask, new * budget / new[mask].sum(), theta)
            theta = new
        out.append((np.where(mask, w, 0.0), theta.copy(), L0.copy()))
    return out, floored


@functools.cache
def _gradnorm_run(kind):
    make = {
        "sgd": lambda: mtlopt.gradnorm(optimizer=optax.sgd(0.5), layer=G_LAYER, **common),
        "adam": lambda: mtlopt.gradnorm(layer=G_LAYER, **common),
        "softmax": lambda: mtlopt.gradnorm(
            alpha=0.5,
            learning_rate=0.1,
            layer=lambda p: {"trunk": {"a": False, "b": True}, "head": False},
            parameterization="softmax",
            warmup_steps=2,
            **common,
        ),
    }
    common = {"num_tasks": T, "task_specific": G_HEADS}
    tx = make[kind]()

    def body(state, inputs):
        g, l, m = inputs
        u, state = tx.update(g, state, G_PARAMS, task_losses=l, task_mask=m)
        return state, (u, state)

    xs = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (G_GRADS, G_LOSSES))
    run = jax.jit(lambda xs, masks: jax.lax.scan(body, tx.init(G_PARAMS), (*xs, masks))[1])
    traj = jax.device_get(run(xs, G_MASKS))
    return [jax.tree.map(lambda x, k=k: x[k], traj) for k in range(G_STEPS)]


@pytest.mark.parametrize(
    "kind,opt,hyper",
    [
        ("sgd", lambda: SGDRef(T, 0.5), {}),
        ("adam", lambda: AdamRef(T, 0.025), {}),
        ("softmax", lambda: AdamRef(T, 0.1), {"alpha": 0.5, "softmax": True, "warmup": 2}),
    ],
)
def test_gradnorm_matches_the_paper_in_float64(kind, opt, hyper):
    """Seven steps: the weights used (before the step's learning), the learned state after it,
    the initial losses kept, the update ``sum_t w_t g_t`` (heads included), a masked task, a
    NaN in a leaf outside ``layer`` and a negative loss (both skipped)."""
    want, floored = gradnorm_reference(opt(), **hyper)
    traj = _gradnorm_run(kind)
    skipped = 0
    for k, ((w, learned, L0), (u, state)) in enumerate(zip(want, traj, strict=True)):
        msg = f"{kind} step {k}"
        np.testing.assert_allclose(state.learned, learned, rtol=1e-5, atol=1e-6, err_msg=msg)
        np.testing.assert_allclose(state.initial_losses, L0, rtol=1e-6, err_msg=msg)
        if w is None:
            skipped += 1
            assert all(np.all(x == 0) for x in jax.tree.leaves(u)), msg
        else:
            np.testing.assert_allclose(mtlopt.task_weights(state), w, rtol=1e-5, err_msg=msg)
            mask = G_MASKS[k]
            for got, g in zip(jax.tree.leaves(u), jax.tree.leaves(G_GRADS), strict=True):
                g = np.where(mask.reshape((T,) + (1,) * (g.ndim - 2)), g[k], 0.0)
                want_u = np.tensordot(w, g, 1)
                scale = np.tensordot(np.abs(w), np.abs(g), 1).max()  # the terms' size
                np.testing.assert_allclose(got, want_u, rtol=1e-5, atol=1e-6 * scale, err_msg=msg)
        assert int(state.skipped) == skipped, msg
    if kind == "sgd":
        assert floored  # a weight was pushed through 0 and clamped
    if kind == "softmax":  # no learning in the two warm-up steps
        np.testing.assert_array_equal(traj[1][1].learned, 1.0)
        assert np.ptp(traj[3][1].learned) > 1e-2
    else:
        assert np.ptp(traj[1][1].learned) > 1e-2
    # The learned weights add up to T (the masked task's kept, the others sharing the rest).
    assert abs(float(np.sum(traj[-1][1].learned)) - T) < 1e-5 or kind == "softmax"
    np.testing.assert_array_equal(traj[2][1].learned[2], traj[1][1].learned[2])


def test_gradnorm_layer_selection_errors():
    """``layer`` marking only heads (or nothing) is a ValueError naming the method; so is one
    whose structure does not match the params, and an empty tree at construction."""
    g = jax.tree.map(lambda x: jnp.zeros((T, *x.shape)), G_PARAMS)
    losses = jnp.ones(T)

    def trace(layer):
        tx = mtlopt.gradnorm(layer=layer, num_tasks=T, task_specific=G_HEADS)
        jax.eval_shape(lambda: tx.update(g, tx.init(G_PARAMS), task_losses=losses))

    heads_only = {"trunk": {"a": False, "b": False}, "head": True}
    with pytest.raises(ValueError, match=r"^mtlopt\.gradnorm: layer selects no shared leaf"):
        trace(heads_only)
    with pytest.raises(ValueError, match=r"^mtlopt\.gradnorm: layer selects no shared leaf"):
        trace(lambda p: jax.tree.map(lambda _: False, p))
    with pytest.raises(ValueError, match=r"^mtlopt\.gradnorm: layer must be a pytree of bools"):
        trace({"trunk": True})
    with pytest.raises(ValueError, match=r"^mtlopt\.gradnorm: layer must mark at least one"):
        mtlopt.gradnorm(layer={}, num_tasks=T)
    with pytest.raises(ValueError, match=r"^mtlopt\.gradnorm: parameterization must be one of"):
        mtlopt.gradnorm(parameterization="libmtl", num_tasks=T)
    with pytest.raises(ValueError, match=r"^mtlopt\.gradnorm: warmup_steps must be an int"):
        mtlopt.gradnorm(warmup_steps=1.5, num_tasks=T)
    with pytest.raises(ValueError, match=r"^mtlopt\.famo: min_losses must be 3 finite"):
        mtlopt.famo(min_losses=[0.0, 1.0], num_tasks=T)
    with pytest.raises(ValueError, match=r"^mtlopt\.famo: w_lr must be a finite number"):
        mtlopt.famo(w_lr=-1.0, num_tasks=T)
    # A selected leaf: fine (traced only).
    trace(G_LAYER)


def test_traced_learning_rates():
    """``optax.inject_hyperparams`` on FAMO's ``w_lr`` and GradNorm's ``learning_rate`` gives
    the plain transformations' weights and learned parameters, step after step."""
    losses = jnp.asarray(F_LOSSES[:3] * np.array([1.0, 0.5, 0.25])[:, None], jnp.float32)
    g = jax.tree.map(lambda x: jnp.asarray(x[0], jnp.float32), G_GRADS)
    kw = {"num_tasks": T, "task_specific": G_HEADS}
    pairs = {
        "famo": (
            mtlopt.famo(w_lr=0.1, num_tasks=T),
            optax.inject_hyperparams(mtlopt.famo, static_args=("num_tasks",))(
                w_lr=0.1, num_tasks=T
            ),
        ),
        "gradnorm": (
            mtlopt.gradnorm(learning_rate=0.1, **kw),
            optax.inject_hyperparams(mtlopt.gradnorm, static_args=("num_tasks", "task_specific"))(
                learning_rate=0.1, **kw
            ),
        ),
    }

    @jax.jit
    def run():
        out = {}
        for name, (plain, injected) in pairs.items():
            res = []
            for tx in (plain, injected):
                state, traj = tx.init(G_PARAMS), []
                for l in losses:
                    u, state = tx.update(g, state, G_PARAMS, task_losses=l)
                    traj.append((u, mtlopt.task_weights(state)))
                res.append((traj, state))
            out[name] = res
        return out

    out = jax.device_get(run())
    for name, ((plain, s1), (injected, s2)) in out.items():
        for (u1, w1), (u2, w2) in zip(plain, injected, strict=True):
            np.testing.assert_allclose(w2, w1, rtol=1e-6, err_msg=name)
            for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=name)
        learned = s1.logits if name == "famo" else s1.learned
        learned_inj = s2.inner_state.logits if name == "famo" else s2.inner_state.learned
        np.testing.assert_allclose(learned_inj, learned, rtol=1e-6, err_msg=name)
        assert np.ptp(learned) > 1e-2, name  # they did learn
