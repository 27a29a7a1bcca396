"""GLS, STCH, COSMOS and PBI: scalarizations of the losses, whose weights are dF/dl_t.

Checked here: hand-worked two-task values; TorchJD 0.18's scalarizers (the gradient of each by
torch autograd gives the weights) on random positive losses in float64, with the
hyperparameters traced (vmap over mu, theta, preferences, reference points); STCH's warm-up and
nadir over step sequences (step form, epoch form against LibMTL's rule, a fixed nadir); the
per-step preference; masked tasks; losses outside the log's domain; tiny and huge losses. The
shared suite (tests/registry.py) runs the rest. Every group of cases is one jitted program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtlopt

# ---------------------------------------------------------------------------------------------
# Helpers


def _weights(tx, losses, state=None, **extra):
    """The method's weights through the task-grads mode: task grads = I give update = w, in
    the dtype of the losses (float64 under x64)."""
    T = losses.shape[0]
    eye = {"w": jnp.eye(T, dtype=losses.dtype)}
    if state is None:
        state = tx.init({"w": jnp.zeros(T, losses.dtype)})
    u, new = tx.update(eye, state, task_losses=losses, **extra)
    return u["w"], new


def _torch_grad(fn, values):
    torch = pytest.importorskip("torch")
    v = torch.tensor(np.asarray(values, np.float64), requires_grad=True)
    fn(v).backward()
    return v.grad.numpy()


def _f64(x):
    return np.asarray(x, np.float32).astype(np.float64)  # what the constructors keep


# ---------------------------------------------------------------------------------------------
# Hand-worked two-task values (float32), and closed forms on the degenerate points


def test_hand_worked_two_tasks():
    def run():
        l = jnp.array([1.0, 4.0])
        m = jnp.array([1.0, 3.0])
        f = jnp.array([3.0, 4.0])
        out = {
            "gls": _weights(mtlopt.gls(), l)[0],
            "stch_mu1": _weights(mtlopt.stch(1.0), m)[0],
            "stch_mu05": _weights(mtlopt.stch(0.5), m)[0],
            "stch_raw": _weights(mtlopt.stch(1.0, form="raw"), m)[0],
            "stch_nadir": _weights(mtlopt.stch(1.0, nadir=[1.0, 3.0]), m)[0],
            "cosmos": _weights(mtlopt.cosmos([1.0, 0.0], mu=1.0), f)[0],
            "cosmos_zero": _weights(mtlopt.cosmos([0.3, 0.7]), jnp.zeros(2))[0],
            "cosmos_mu0": _weights(mtlopt.cosmos([0.3, 0.7], mu=0.0), f)[0],
            "pbi": _weights(mtlopt.pbi([1.0, 0.0], theta=2.0), f)[0],
            "pbi_ray": _weights(mtlopt.pbi([1.0, 2.0], theta=5.0), jnp.array([0.5, 1.0]))[0],
            "pbi_t1": _weights(mtlopt.pbi([0.3], theta=5.0), jnp.array([0.7]))[0],
            "pbi_ref": _weights(
                mtlopt.pbi([1.0, 1.0], theta=1.0, reference=[1.0, 0.0]), jnp.array([1.0, 2.0])
            )[0],
        }
        return out

    out = jax.jit(run)()
    want = {
        "gls": [2.0 / 2.0, 2.0 / 8.0],  # F = sqrt(1 * 4) = 2; F / (2 l_t)
        "stch_mu1": [0.5, 0.5],  # softmax(log l) = l / sum l; 2 * (1/4, 3/4) / l
        "stch_mu05": [0.2, 0.6],  # softmax(2 log l) = l^2 / sum l^2 = (0.1, 0.9)
        "stch_raw": np.array([1.0, np.e]) / (1.0 + np.e) * 0.5,  # softmax(l / 2) / 2
        "stch_nadir": [1.0, 1.0 / 3.0],  # f = 0: 2 * (1/2) / l
        # r_hat = (1, 0), u = (0.6, 0.8), cos = 0.6, |l| = 5: r - (r_hat - cos u) / |l|
        "cosmos": [1.0 - (1.0 - 0.36) / 5.0, 0.48 / 5.0],
        "cosmos_zero": [0.3, 0.7],  # l = 0: the cosine term is left out
        "cosmos_mu0": [0.3, 0.7],
        # w_hat = (1, 0), d1 = 3, f - d1 w_hat = (0, 4), d2 = 4: w_hat + 2 (0, 1)
        "pbi": [1.0, 2.0],
        "pbi_ray": np.array([1.0, 2.0]) / np.sqrt(5.0),  # on the ray: w_hat
        "pbi_t1": [1.0],
        # f = (0, 2), w_hat = (1, 1)/sqrt2, d1 = sqrt2, perp = (-1, 1), d2 = sqrt2
        "pbi_ref": np.array([1.0 - 1.0, 1.0 + 1.0]) / np.sqrt(2.0),
    }
    for k, v in want.items():
        np.testing.assert_allclose(out[k], v, rtol=2e-6, atol=1e-7, err_msg=k)


# ---------------------------------------------------------------------------------------------
# Against TorchJD 0.18 (float64), hyperparameters traced


B = 6  # random problems per T


def _problems(T, seed):
    rng = np.random.default_rng(seed)
    L = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), (B, T)))
    L[: B // 2] = rng.uniform(0.05, 3.0, (B // 2, T))  # half of them on one scale
    mu = np.array([0.01, 0.1, 0.5, 1.0, 2.0, 8.0])[:B]
    theta = np.array([0.0, 0.5, 5.0, 5.0, 10.0, 1.0])[:B]
    pref = _f64(rng.dirichlet(np.full(T, 1.2), B))
    ref = _f64(L.min(axis=1, keepdims=True) * rng.uniform(0.0, 0.9, (B, T)))
    nadir = _f64(L * rng.uniform(0.5, 2.0, (B, T)))
    return L, mu, theta, pref, ref, nadir


def _ours(L, mu, theta, pref, ref, nadir):
    """Every method's weights on B problems; the hyperparameters are traced (vmap)."""

    def one(l, mu, theta, pref, ref, nadir):
        return {
            "gls": _weights(mtlopt.gls(), l)[0],
            "stch_raw": _weights(mtlopt.stch(mu, form="raw"), l)[0],
            "stch_raw_pref_ref": _weights(
                mtlopt.stch(mu, form="raw", preference=pref, reference=ref), l
            )[0],
            "stch_log_nadir": _weights(mtlopt.stch(mu, nadir=nadir), l)[0],
            "stch_log_nadir_pref": _weights(mtlopt.stch(mu, nadir=nadir, preference=pref), l)[0],
            "stch_log": _weights(mtlopt.stch(mu), l)[0],
            "cosmos": _weights(mtlopt.cosmos(pref, mu), l)[0],
            "pbi": _weights(mtlopt.pbi(pref, theta), l)[0],
            "pbi_ref": _weights(mtlopt.pbi(pref, theta, reference=ref), l)[0],
        }

    return jax.vmap(one)(L, mu, theta, pref, ref, nadir)


def _torchjd(name, l, mu, theta, pref, ref, nadir):
    tj = pytest.importorskip("torchjd.scalarization")
    torch = pytest.importorskip("torch")
    t = lambda x: torch.tensor(np.asarray(x, np.float64))
    mu, theta, T = float(mu), float(theta), len(l)
    ones = torch.ones(T, dtype=torch.float64)
    # The multi-task form: n * STCH(log l; lambda, reference log nadir) (the authors' code).
    log_form = lambda lam, z: lambda v: T * tj.STCH(mu, lam, torch.log(z))(torch.log(v))
    fns = {
        "gls": tj.GeometricMean(),
        "stch_raw": tj.STCH(mu),
        "stch_raw_pref_ref": tj.STCH(mu, t(pref), t(ref)),
        "stch_log_nadir": log_form(ones, t(nadir)),
        "stch_log_nadir_pref": log_form(t(pref), t(nadir)),
        "stch_log": log_form(ones, ones),
        "cosmos": tj.COSMOS(mu, t(pref)),
        "pbi": tj.PBI(theta, t(pref)),
        "pbi_ref": tj.PBI(theta, t(pref), t(ref)),
    }
    return _torch_grad(fns[name], l)


def _pbi_shift(l, theta, pref, ref=None):
    """How far TorchJD's PBI weights are from the exact ones: it adds 1e-12 under d2's root,
    which scales the penalty's gradient by d2 / sqrt(d2^2 + 1e-12), ~1 - 5e-13 / d2^2."""
    f = l - (0.0 if ref is None else ref)
    w_hat = pref / np.linalg.norm(pref)
    d2 = np.linalg.norm(f - (f @ w_hat) * w_hat)
    return theta * 5e-13 / d2**2


@pytest.mark.parametrize("T", [2, 5, pytest.param(64, marks=pytest.mark.slow)])
def test_matches_torchjd_float64(T):
    pytest.importorskip("torchjd")
    args = _problems(T, seed=T)
    with jax.enable_x64(True):
        out = jax.jit(_ours)(*(jnp.asarray(a) for a in args))
        out = jax.tree.map(np.asarray, out)
    worst = {}
    for name, got in out.items():
        assert got.dtype == np.float64
        for b in range(B):
            ref = _torchjd(name, *(a[b] for a in args))
            rtol, scale = 1e-11, np.max(np.abs(ref))
            if name.startswith("pbi"):
                l, _, theta, pref, refp, _ = (a[b] for a in args)
                rtol += 2 * _pbi_shift(l, theta, pref, refp if name == "pbi_ref" else None)
            np.testing.assert_allclose(
                got[b], ref, rtol=rtol, atol=rtol * scale, err_msg=f"{name}[{b}]"
            )
            err = np.max(np.abs(got[b] - ref)) / scale
            worst[name] = max(worst.get(name, 0.0), err)
    print(f"T={T} worst relative error against TorchJD:", worst)


def test_matches_torchjd_float32():
    """Float32 on T = 5: within a few float32 roundings of TorchJD's float64 weights."""
    pytest.importorskip("torchjd")
    T = 5
    args = _problems(T, seed=1)
    out = jax.tree.map(np.asarray, jax.jit(_ours)(*(jnp.asarray(a, jnp.float32) for a in args)))
    worst = {}
    for name, got in out.items():
        assert got.dtype == np.float32
        for b in range(B):
            ref = _torchjd(name, *(_f64(a[b]) for a in args))
            scale = np.max(np.abs(ref))
            tol = 5e-6
            np.testing.assert_allclose(
                got[b], ref, rtol=tol, atol=tol * scale, err_msg=f"{name}[{b}]"
            )
            err = np.max(np.abs(got[b] - ref)) / scale
            worst[name] = max(worst.get(name, 0.0), err)
    print("float32, T=5, worst error against TorchJD (relative to max |w|):", worst)


# ---------------------------------------------------------------------------------------------
# STCH's warm-up and nadir over step sequences


def _stch_rule(losses, mu, *, warm, counts, nadir=None, pref=None):
    """STCH's documented rule, step by step, in numpy: ``warm[k]``, ``counts[k]`` say whether
    step k is a warm-up step and whether its losses join the nadir's means."""
    K, T = losses.shape
    lam = np.ones(T) if pref is None else np.asarray(pref, np.float64)
    total, seen = np.zeros(T), np.zeros(T)
    out = []
    for k in range(K):
        l = losses[k].astype(np.float64)
        z = nadir if nadir is not None else np.where(seen > 0, total / np.maximum(seen, 1), 1.0)
        if warm[k]:
            w = 1.0 / l
        else:
            y = lam * np.log(l / z) / mu
            soft = np.exp(y - y.max()) / np.exp(y - y.max()).sum()
            w = T * soft * lam / l
        if counts[k]:
            total, seen = total + l, seen + 1
        out.append(w)
    return np.array(out)


def _scan(tx, losses, masks=None, flags=None):
    """Runs ``tx`` in the loss-only mode over a sequence; returns (weights, states)."""
    K, T = losses.shape
    masks = jnp.ones((K, T), bool) if masks is None else masks
    flags = jnp.zeros((K,), bool) if flags is None else flags

    def body(state, xs):
        l, m, f = xs
        w, state = mtlopt.loss_weights(tx, l, state, task_mask=m, new_epoch=f)
        return state, (w, state)

    _, (w, states) = jax.lax.scan(body, tx.init(None), (losses, masks, flags))
    return w, states


def test_stch_warmup_and_nadir_sequences():
    rng = np.random.default_rng(7)
    T, K = 3, 8
    L = rng.uniform(0.2, 2.0, (K, T)).astype(np.float32)
    flags = np.array([1, 0, 0, 1, 0, 1, 0, 0], bool)  # epochs of 3, 2 and 3 steps
    bad = L.copy()
    bad[2, 1] = -1.0  # step 2 is skipped: it counts neither as a step nor into the nadir
    mask = np.ones((K, T), bool)
    mask[1, 2] = False  # task 2 is absent at step 1: its nadir averages the other steps
    nadir = np.array([0.5, 1.0, 2.0], np.float32)
    pref = np.array([0.2, 0.3, 0.5], np.float32)

    def run(L, bad, mask, flags):
        return {
            # Step form: 4 warm-up steps, the nadir from the last 2.
            "steps": _scan(mtlopt.stch(0.5, 4, nadir_steps=2, num_tasks=T), L),
            "steps_all": _scan(mtlopt.stch(0.5, 4, num_tasks=T, preference=pref), L),
            "masked": _scan(mtlopt.stch(0.5, 3, num_tasks=T), L, masks=mask),
            "skipped": _scan(mtlopt.stch(0.5, 3, num_tasks=T), bad),
            # Epoch form: 2 warm-up epochs (LibMTL's STCH_warmup_epoch = 1).
            "epochs": _scan(mtlopt.stch(0.5, warmup_epochs=2, num_tasks=T), L, flags=flags),
            "fixed": _scan(mtlopt.stch(0.5, 2, nadir=nadir), L),
        }

    out = jax.jit(run)(L, bad, mask, flags)
    w = {k: np.asarray(v[0], np.float64) for k, v in out.items()}
    first4 = np.arange(K) < 4
    rule = lambda **kw: _stch_rule(L, 0.5, **kw)
    np.testing.assert_allclose(
        w["steps"], rule(warm=first4, counts=(np.arange(K) >= 2) & first4), rtol=1e-5
    )
    np.testing.assert_allclose(
        w["steps_all"], rule(warm=first4, counts=first4, pref=pref), rtol=1e-5
    )
    np.testing.assert_allclose(
        w["fixed"], rule(warm=np.arange(K) < 2, counts=np.zeros(K, bool), nadir=nadir), rtol=1e-5
    )
    # The masked task: its nadir is the mean of its losses at steps 0 and 2 only.
    states = out["masked"][1]
    both = (L[0, 2] + L[2, 2]) / 2
    want = [L[0, 2], L[0, 2]] + [both] * (K - 2)
    np.testing.assert_allclose(np.asarray(states.nadir)[:, 2], want, rtol=1e-6)
    np.testing.assert_array_equal(states.nadir_count[-1], [3, 3, 2])
    assert w["masked"][1, 2] == 0.0
    z = np.array([L[:3, 0].mean(), L[:3, 1].mean(), both])
    want = _stch_rule(L[3:], 0.5, warm=np.zeros(K - 3, bool), counts=np.zeros(K - 3), nadir=z)
    np.testing.assert_allclose(w["masked"][3:], want, rtol=1e-5)
    # The skipped step: zero weights, state kept; the warm-up runs one step longer.
    ws, ss = w["skipped"], out["skipped"][1]
    np.testing.assert_array_equal(ws[2], 0.0)
    np.testing.assert_array_equal(np.asarray(ss.skipped), [0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(ss.count), [1, 2, 2, 3, 4, 5, 6, 7])
    good = np.array([0, 1, 3, 4, 5, 6, 7])
    want = _stch_rule(L[good], 0.5, warm=np.arange(7) < 3, counts=np.arange(7) < 3)
    np.testing.assert_allclose(ws[good], want, rtol=1e-5)
    # The epoch form equals LibMTL's rule (epoch index e: e < 1 warm-up; e == 1 warm-up and
    # averaged; then the smooth max against that average).
    epoch = np.cumsum(flags) - 1
    want = _stch_rule(L, 0.5, warm=epoch <= 1, counts=epoch == 1)
    np.testing.assert_allclose(w["epochs"], want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["epochs"][1].epochs), epoch)


# ---------------------------------------------------------------------------------------------
# Preferences, masks, bad and extreme losses


def test_preference_override_and_masked_tasks():
    rng = np.random.default_rng(3)
    T = 4
    l = jnp.asarray(rng.uniform(0.3, 2.0, T), jnp.float32)
    p = jnp.asarray(rng.dirichlet(np.ones(T)), jnp.float32)
    q = jnp.asarray(rng.dirichlet(np.ones(T)), jnp.float32)
    mask = jnp.array([True, False, True, True])
    keep = np.array([0, 2, 3])

    def run(l, p, q):
        out = {}
        for name, make in (
            ("cosmos", lambda r: mtlopt.cosmos(r, mu=1.5)),
            ("pbi", lambda r: mtlopt.pbi(r, theta=3.0)),
            ("stch", lambda r: mtlopt.stch(0.5, preference=r)),
            ("stch_raw", lambda r: mtlopt.stch(0.5, preference=r, form="raw")),
        ):
            out[name, "given"] = _weights(make(q), l)[0]
            out[name, "override"] = _weights(make(p), l, preference=q)[0]
            out[name, "masked"] = _weights(make(q), l, task_mask=mask)[0]
            out[name, "dropped"] = _weights(make(q[keep]), l[keep])[0]
        out["cosmos", "none"] = _weights(mtlopt.cosmos(None, mu=1.5), l, preference=q)[0]
        out["pbi", "none"] = _weights(mtlopt.pbi(None, theta=3.0), l, preference=q)[0]
        out["gls", "masked"] = _weights(mtlopt.gls(), l.at[1].set(jnp.nan), task_mask=mask)[0]
        out["gls", "dropped"] = _weights(mtlopt.gls(), l[keep])[0]
        return out

    out = jax.jit(run)(l, p, q)
    for name in ("cosmos", "pbi", "stch", "stch_raw"):
        np.testing.assert_allclose(out[name, "override"], out[name, "given"], rtol=1e-6)
        masked = np.asarray(out[name, "masked"])
        assert masked[1] == 0.0, name
        np.testing.assert_allclose(masked[keep], out[name, "dropped"], rtol=1e-5, err_msg=name)
    for name in ("cosmos", "pbi"):
        np.testing.assert_allclose(out[name, "none"], out[name, "given"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["gls", "masked"])[keep], out["gls", "dropped"])


def test_preference_errors():
    grads = {"w": jnp.eye(2)}
    for tx, name in ((mtlopt.cosmos(None), "cosmos"), (mtlopt.pbi(None), "pbi")):
        state = tx.init({"w": jnp.zeros(2)})
        with pytest.raises(ValueError, match=rf"^mtlopt\.{name}: .*needs the extra argument pref"):
            jax.eval_shape(lambda s, tx=tx: tx.update(grads, s, task_losses=jnp.ones(2)), state)
        with pytest.raises(ValueError, match=rf"^mtlopt\.{name}: preference must have shape"):
            jax.eval_shape(
                lambda s, tx=tx: tx.update(
                    grads, s, task_losses=jnp.ones(2), preference=jnp.ones(3)
                ),
                state,
            )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: mtlopt.gls(num_tasks=0), "num_tasks must be a positive int"),
        (lambda: mtlopt.stch(mu=0.0), "mu must be a finite number > 0"),
        (lambda: mtlopt.stch(warmup_steps=-1), "warmup_steps must be an int >= 0"),
        (lambda: mtlopt.stch(warmup_steps=2), "num_tasks is required"),
        (lambda: mtlopt.stch(warmup_epochs=2), "num_tasks is required"),
        (lambda: mtlopt.stch(warmup_epochs=0, num_tasks=2), "warmup_epochs must be an int >= 1"),
        (lambda: mtlopt.stch(2.0, 3, warmup_epochs=1, num_tasks=2), "either in steps"),
        (lambda: mtlopt.stch(form="raw", warmup_steps=3), 'form="raw".*warmup_steps'),
        (lambda: mtlopt.stch(form="raw", nadir=[1.0, 2.0]), 'form="raw".*nadir'),
        (lambda: mtlopt.stch(reference=[0.0, 0.0]), "reference= is the ideal point"),
        (lambda: mtlopt.stch(nadir=[1.0, 0.0]), "nadir must hold finite numbers > 0"),
        (lambda: mtlopt.stch(nadir=[1.0, 2.0], num_tasks=3), "nadir has 2 entries but T = 3"),
        (lambda: mtlopt.stch(nadir=[1.0], nadir_steps=2), "nadir_steps has no use"),
        (lambda: mtlopt.stch(0.5, 2, nadir_steps=3, num_tasks=2), "must be <= warmup_steps"),
        (lambda: mtlopt.stch(form="cubic"), "form must be one of"),
        (lambda: mtlopt.stch(preference=[1.0, -1.0]), "preference must hold finite weights"),
        (lambda: mtlopt.cosmos([1.0, -0.5]), "preference must hold finite weights >= 0"),
        (lambda: mtlopt.cosmos([0.0, 0.0]), "at least one entry > 0"),
        (lambda: mtlopt.cosmos([0.5, 0.5], mu=-1.0), "mu must be a finite number >= 0"),
        (lambda: mtlopt.cosmos([0.5, 0.5], num_tasks=3), "num_tasks=3 but preference has 2"),
        (lambda: mtlopt.pbi([0.5, 0.5], theta=-1.0), "theta must be a finite number >= 0"),
        (lambda: mtlopt.pbi([0.5, 0.5], reference=[0.0, np.inf]), "reference must hold"),
        (lambda: mtlopt.pbi([0.5, 0.5], reference=[0.0]), "reference has 1 entries but T = 2"),
    ],
)
def test_bad_hyperparameters(make, message):
    with pytest.raises(ValueError, match=rf"^mtlopt\.\w+: .*{message}"):
        make()


def test_non_positive_losses_skip_the_log_methods():
    """GLS and STCH (log form) take logs: an active loss <= 0 skips the step (zero update,
    state after a first step kept, counted in skipped). The others accept any finite loss."""
    J = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    good = np.array([0.5, 1.0, 2.0], np.float32)
    cases = {
        "gls": mtlopt.gls(num_tasks=3),
        "stch": mtlopt.stch(num_tasks=3),
        "stch_warmup": mtlopt.stch(warmup_steps=3, num_tasks=3),
        "stch_raw": mtlopt.stch(form="raw", num_tasks=3),
        "cosmos": mtlopt.cosmos(np.ones(3)),
        "pbi": mtlopt.pbi(np.ones(3)),
    }
    bads = np.array([[-1.0, 0.0, 2.0], [0.5, 0.0, 2.0], [0.5, 1.0, -3.0]], np.float32)
    params = {"w": jnp.zeros(5)}

    def run(J, good, bads):
        out = {}
        for name, tx in cases.items():
            _, s1 = tx.update({"w": J}, tx.init(params), task_losses=good)
            step = lambda l, tx=tx, s1=s1: tx.update({"w": J}, s1, task_losses=l)
            u, s2 = jax.vmap(step)(bads)
            out[name] = (s1, u["w"], s2)
        return out

    out = jax.jit(run)(J, good, bads)
    for name, (s1, u, s2) in out.items():
        u = np.asarray(u)
        assert np.all(np.isfinite(u)), name
        skipped = np.asarray(s2.skipped)
        if name in ("gls", "stch", "stch_warmup"):
            np.testing.assert_array_equal(u, 0.0, err_msg=name)
            np.testing.assert_array_equal(skipped, 1, err_msg=name)
            for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
                if a.dtype != np.int32 or a.shape:  # every field but skipped
                    np.testing.assert_array_equal(np.broadcast_to(a, b.shape), b, err_msg=name)
            np.testing.assert_array_equal(np.asarray(s2.count), np.asarray(s1.count))
        else:
            np.testing.assert_array_equal(skipped, 0, err_msg=name)
            assert np.all(np.abs(u).sum(axis=1) > 0), name
    # A masked non-positive loss is not checked (the task takes no part).
    tx = mtlopt.gls()
    w, s = jax.jit(lambda l: mtlopt.loss_weights(tx, l, tx.init(None), task_mask=l > 0))(
        jnp.array([-1.0, 1.0, 4.0])
    )
    np.testing.assert_allclose(w, [0.0, 1.0, 0.25])
    assert int(s.skipped) == 0


def test_tiny_and_huge_losses_stay_finite():
    """Losses of 1e-30 and 1e30 (equal, mixed, and 64 tasks): finite weights, not skipped,
    equal to the closed forms where those are simple."""
    r = np.array([0.2, 0.3, 0.5], np.float32)
    cases = {
        "gls": (mtlopt.gls(), mtlopt.gls()),
        "stch": (mtlopt.stch(0.1), mtlopt.stch(0.1)),
        "stch_raw": (mtlopt.stch(0.1, form="raw"), mtlopt.stch(0.1, form="raw")),
        "cosmos": (mtlopt.cosmos(r), mtlopt.cosmos(np.ones(64))),
        "pbi": (mtlopt.pbi(r), mtlopt.pbi(np.ones(64))),
    }
    three = np.array([[1e-30] * 3, [1e30] * 3, [1e-30, 1.0, 1e30], [1e-20, 1e-25, 1e-30]])
    rng = np.random.default_rng(0)
    many = np.stack([10.0 ** rng.uniform(-30, -20, 64), 10.0 ** rng.uniform(20, 30, 64)])

    def run(three, many):
        out = {}
        for name, (tx3, tx64) in cases.items():
            out[name, 3] = jax.vmap(lambda l, tx=tx3: _weights(tx, l))(three)
            out[name, 64] = jax.vmap(lambda l, tx=tx64: _weights(tx, l))(many)
        return out

    out = jax.jit(run)(jnp.asarray(three, jnp.float32), jnp.asarray(many, jnp.float32))
    for key, (w, state) in out.items():
        w = np.asarray(w)
        assert np.all(np.isfinite(w)), key
        np.testing.assert_array_equal(np.asarray(state.skipped), 0, err_msg=str(key))
    w = lambda name: np.asarray(out[name, 3][0], np.float64)
    np.testing.assert_allclose(w("gls")[:2], 1.0 / 3.0, rtol=1e-6)  # equal losses: 1/T
    np.testing.assert_allclose(w("gls")[2], [1.0 / 3e-30, 1.0 / 3.0, 1.0 / 3e30], rtol=1e-5)
    np.testing.assert_allclose(w("stch")[0], 1e30, rtol=1e-5)  # equal losses: 1 / l
    np.testing.assert_allclose(w("stch")[1], 1e-30, rtol=1e-5)
    pbi_equal = r / np.linalg.norm(r) + 5.0 * _perp(r)
    np.testing.assert_allclose(w("pbi")[:2], np.stack([pbi_equal] * 2), rtol=1e-5)
    np.testing.assert_allclose(w("cosmos")[1], r, rtol=1e-6)  # mu / |l| = 2e-30: w = r


def _perp(r):
    """PBI's penalty direction for equal losses f = (1, 1, 1) and preference r."""
    w_hat = r / np.linalg.norm(r)
    f = np.ones_like(r, np.float64)
    p = f - (f @ w_hat) * w_hat
    return p / np.linalg.norm(p)


def test_pbi_on_the_ray_and_near_it():
    """On the preference ray the penalty's zero subgradient is taken (w = w_hat, rounding of
    the projection ignored); just off it (1e-3 relative), the penalty's direction is exact."""
    r = np.array([0.2, 0.3, 0.5], np.float32)
    on = np.stack([s * r for s in (1e-20, 0.7, 3.0, 1e20)])
    off = (2.0 * r * np.array([1.0, 1.0 + 1e-3, 1.0])).astype(np.float32)

    def run(on, off):
        tx = mtlopt.pbi(r, theta=5.0)
        return jax.vmap(lambda l: _weights(tx, l)[0])(on), _weights(tx, off)[0]

    w_on, w_off = jax.jit(run)(jnp.asarray(on), jnp.asarray(off, jnp.float32))
    w_hat = r / np.linalg.norm(r.astype(np.float64))
    np.testing.assert_allclose(w_on, np.broadcast_to(w_hat, on.shape), rtol=1e-6)
    f = off.astype(np.float64)
    p = f - (f @ w_hat) * w_hat
    np.testing.assert_allclose(w_off, w_hat + 5.0 * p / np.linalg.norm(p), rtol=2e-3)


def test_stch_raw_small_mu_is_the_max():
    """mu -> 0: the smooth max becomes the weighted max (its weight lambda_t on the argmax)."""
    l = jnp.array([1.0, 3.0, 2.0])
    tx = mtlopt.stch(1e-4, form="raw", preference=[1.0, 0.5, 1.0])
    w = jax.jit(lambda l: _weights(tx, l)[0])(l)
    np.testing.assert_allclose(w, [0.0, 0.0, 1.0], atol=1e-6)


def test_inject_hyperparams():
    """optax.inject_hyperparams traces every numeric argument (defaults included): the state
    keeps its structure, and the weights equal those of the plain constructors."""
    optax = pytest.importorskip("optax")
    r = np.array([0.2, 0.3, 0.5], np.float32)
    l = jnp.array([0.5, 1.0, 2.0])
    params = {"w": jnp.zeros(3)}
    made = {
        "gls": (optax.inject_hyperparams(mtlopt.gls)(), mtlopt.gls()),
        "stch": (optax.inject_hyperparams(mtlopt.stch)(mu=0.5), mtlopt.stch(0.5)),
        "stch_warmup": (
            optax.inject_hyperparams(mtlopt.stch)(mu=0.5, warmup_steps=1, num_tasks=3),
            mtlopt.stch(0.5, 1, num_tasks=3),
        ),
        "cosmos": (optax.inject_hyperparams(mtlopt.cosmos)(r, mu=1.0), mtlopt.cosmos(r, 1.0)),
        "pbi": (optax.inject_hyperparams(mtlopt.pbi)(r, theta=2.0), mtlopt.pbi(r, 2.0)),
    }

    # init outside jit: inside it, optax turns num_tasks into a tracer (jnp.asarray traces
    # there), which then shapes nothing (pass static_args=("num_tasks",) to init under jit).
    states = {name: (tx.init(params), plain.init(params)) for name, (tx, plain) in made.items()}

    def run(l, states):
        out = {}
        for name, (tx, plain) in made.items():
            s, p = states[name]
            for k in range(2):  # the warm-up step, then one against the measured nadir
                u, s = tx.update({"w": jnp.eye(3)}, s, task_losses=l * 0.5**k)
                v, p = plain.update({"w": jnp.eye(3)}, p, task_losses=l * 0.5**k)
            out[name] = (u["w"], v["w"])
        return out

    with jax.numpy_dtype_promotion("standard"):  # optax's injection casts with standard rules
        out = jax.jit(run)(l, states)
    for name, (u, v) in out.items():
        np.testing.assert_allclose(u, v, rtol=1e-6, err_msg=name)
