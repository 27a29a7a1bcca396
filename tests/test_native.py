"""The optional native CPU Gramian kernel (mtlopt/_src/csrc, mtlopt/_src/native.py): built
where a C++ compiler is found, and then equal (to float32 rounding) to the pure-JAX Gramian it
replaces, for every method, under jit, vmap and autodiff, with NaN, inf and huge entries."""

from __future__ import annotations

import shutil
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import AGGREGATORS, skeleton

import mtlopt
from mtlopt._src import native
from mtlopt._src import tree as tr

_COMPILER = (sysconfig.get_config_var("CXX") or "c++").split()[0]
needs_kernel = pytest.mark.skipif(
    shutil.which(_COMPILER) is None, reason=f"no C++ compiler ({_COMPILER}): kernel not built"
)


def _f64_gram(x, scale=1.0):
    x = np.asarray(x, np.float64) * scale
    return x @ np.swapaxes(x, -1, -2)


@needs_kernel
def test_the_kernel_is_built_and_used_on_one_cpu_device():
    # pip install built it here (a compiler is on PATH): a broken build must fail this test,
    # not fall back unseen.
    assert native.available()
    lowered = jax.jit(mtlopt.gramian).lower(jnp.zeros((4, tr._SMALL_LEAF + 1)))
    assert native._TARGET in lowered.as_text()
    # Small leaves (one XLA dot), bfloat16 leaves (no float32 copy) and too many tasks: no kernel.
    for x in (
        jnp.zeros((4, tr._SMALL_LEAF)),
        jnp.zeros((4, tr._SMALL_LEAF + 1), jnp.bfloat16),
        jnp.zeros((native.MAX_TASKS + 1, tr._SMALL_LEAF + 1)),
    ):
        assert native._TARGET not in jax.jit(mtlopt.gramian).lower(x).as_text()


@needs_kernel
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 10, 17, 64])
def test_kernel_matches_float64(T):
    # Column counts around the 16-lane vectors, the 256-column panels, the 4096-column flushes
    # and the split into ranges (one per 2**15 columns and thread).
    rng = np.random.default_rng(T)
    for C in (1, 15, 16, 255, 256, 257, 4097, 70001):
        x = rng.standard_normal((T, C)).astype(np.float32)
        for scale in (1.0, 0.25):
            got = jax.jit(native.call)(x, jnp.full((1,), scale, jnp.float32))
            assert got.dtype == jnp.float32 and got.shape == (T, T)
            want = _f64_gram(x, scale)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * C, err_msg=f"C={C}")
            np.testing.assert_array_equal(got, np.asarray(got).T)


@needs_kernel
def test_kernel_is_deterministic_and_handles_empty_arrays():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((10, 300001)), jnp.float32)
    one = jnp.ones((1,), jnp.float32)
    f = jax.jit(native.call)
    first = np.asarray(f(x, one))
    for _ in range(5):
        np.testing.assert_array_equal(f(x, one), first)
    np.testing.assert_array_equal(f(jnp.zeros((3, 0)), one), np.zeros((3, 3)))
    assert f(jnp.zeros((0, 5)), one).shape == (0, 0)


@needs_kernel
def test_kernel_propagates_nan_and_inf_to_their_rows():
    x = np.random.default_rng(1).standard_normal((4, 50000)).astype(np.float32)
    x[1, 40000] = np.nan
    x[3, 7] = np.inf
    G = np.asarray(jax.jit(native.call)(x, jnp.ones((1,), jnp.float32)))
    assert np.isnan(G[1]).all() and np.isnan(G[:, 1]).all()
    assert G[3, 3] == np.inf and not np.isfinite(G[3, [0, 2]]).any()
    np.testing.assert_allclose(G[0, 2], _f64_gram(x)[0, 2], rtol=1e-6)


@needs_kernel
def test_kernel_under_vmap_and_with_batched_scales():
    rng = np.random.default_rng(2)
    xs = jnp.asarray(rng.standard_normal((3, 5, 20000)), jnp.float32)
    scales = jnp.array([1.0, 0.5, 2.0], jnp.float32)
    want = np.stack([_f64_gram(x, float(s)) for x, s in zip(xs, scales, strict=True)])
    got = jax.jit(jax.vmap(mtlopt.gramian))(xs, scales)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)
    unbatched_scale = jax.jit(jax.vmap(mtlopt.gramian, in_axes=(0, None)))(xs, scales[1])
    want_half = np.stack([_f64_gram(x, 0.5) for x in xs])
    np.testing.assert_allclose(unbatched_scale, want_half, rtol=1e-6, atol=1e-3)
    nested = jax.vmap(jax.vmap(mtlopt.gramian))(xs[None])
    np.testing.assert_allclose(nested[0], [_f64_gram(x) for x in xs], rtol=1e-6, atol=1e-3)


@needs_kernel
def test_kernel_gramian_differentiates_like_the_pure_one():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 20000)), jnp.float32)
    W = jnp.asarray(np.random.default_rng(4).standard_normal((3, 3)), jnp.float32)

    def loss(x, s, use_native):
        G = tr._cpu_gramian([x], s, use_native=use_native)
        return jnp.sum(W * G) + jnp.sum(G**2) * 1e-9

    for s in (None, jnp.float32(0.5)):
        for argnums in ((0,), (0, 1)) if s is not None else ((0,),):
            got = jax.grad(loss, argnums)(x, s, True)
            want = jax.grad(loss, argnums)(x, s, False)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def _run_method(row, Js, monkeypatch, enabled: str):
    """Two steps of ``row``'s method on each stacked problem ``Js[c]``, all cases in one vmapped
    program (one compile per setting of the kernel, not one per case)."""
    monkeypatch.setenv(native.NATIVE_ENV, enabled)
    C, T = Js.shape[:2]
    tx = row.make(T)
    state = tx.init(jnp.zeros(Js.shape[2:]))
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (C, *jnp.shape(x))), state)
    kw = {"task_losses": jnp.linspace(1.0, 2.0, T)} if row.needs_losses else {}
    kw.update(dict(row.signals))

    update = jax.jit(jax.vmap(lambda g, s: tx.update(g, s, **kw)))
    outs = []
    for _ in range(2):  # a second step, from the first's state (warm starts, EMAs)
        u, state = update(Js, state)
        outs.append(u)
    weights = [mtlopt.task_weights(jax.tree.map(lambda x, c=c: x[c], state)) for c in range(C)]
    return [np.asarray(u) for u in outs], weights


CASES = ("normal", "huge", "nan")


@needs_kernel
# A skeleton-only test: the kernel computes the Gramian and the combination of the skeleton's
# passes, which every method reads alike. The representative rows (one per skeleton path) by
# default, every aggregator with -m slow (.ci/run's slow step runs them all).
@pytest.mark.parametrize("row", skeleton(AGGREGATORS))
def test_every_method_agrees_with_and_without_the_kernel(row, monkeypatch):
    # A leaf past the one-dot limit takes the kernel. "huge" rows overflow float32 products and
    # take the rescaled pass (the kernel's scale argument); "nan" must skip the step. The three
    # cases run under one vmap (the kernel's batching rule is then exercised too).
    rng = np.random.default_rng(5)
    T, P = 4, 3 * tr._SMALL_LEAF + 5
    J = rng.standard_normal((T, P)).astype(np.float32)
    J[1] *= -0.3
    huge = J * np.float32(1e25)
    nan = J.copy()
    nan[2, P - 2] = np.nan
    Js = jnp.asarray(np.stack([J, huge, nan]))
    with_kernel, w_kernel = _run_method(row, Js, monkeypatch, "1")
    without, w_pure = _run_method(row, Js, monkeypatch, "0")
    for c, case in enumerate(CASES):
        for a, b in zip(with_kernel, without, strict=True):
            a, b = a[c], b[c]
            assert np.isfinite(a).all(), case
            scale = np.abs(b).max() if case != "nan" else 1.0
            np.testing.assert_allclose(a / scale, b / scale, rtol=1e-4, atol=1e-5, err_msg=case)
        if case == "nan":
            np.testing.assert_array_equal(with_kernel[0][c], 0.0)
        if w_kernel[c] is not None:
            np.testing.assert_allclose(w_kernel[c], w_pure[c], rtol=1e-4, atol=1e-5, err_msg=case)


def test_native_env_is_checked(monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "yes")
    with pytest.raises(ValueError, match=f"mtlopt.gramian: {native.NATIVE_ENV}"):
        mtlopt.gramian(jnp.ones((3, tr._SMALL_LEAF + 1)))
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert not native.available()
    # (read at trace time: a new function, so that jit does not reuse an earlier trace)
    lowered = jax.jit(lambda x: mtlopt.gramian(x)).lower(jnp.zeros((4, tr._SMALL_LEAF + 1)))
    assert native._TARGET not in lowered.as_text()


@needs_kernel
def test_export_needs_the_kernel_off_on_cpu(monkeypatch):
    # jax.export refuses custom calls without a stability guarantee: the README tells users to
    # set MTLOPT_NATIVE=0 for a CPU export; GPU/TPU exports never hold the kernel.
    x = jnp.zeros((4, tr._SMALL_LEAF + 1))
    for platform in ("cuda", "tpu"):
        exported = jax.export.export(jax.jit(lambda g: mtlopt.gramian(g)), platforms=[platform])
        assert native._TARGET not in exported(x).mlir_module()
    with pytest.raises(ValueError, match=native._TARGET):
        jax.export.export(jax.jit(lambda g: mtlopt.gramian(g)), platforms=["cpu"])(x)
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    exported = jax.export.export(jax.jit(lambda g: mtlopt.gramian(g)), platforms=["cpu"])(x)
    np.testing.assert_array_equal(exported.call(x), np.zeros((4, 4)))


# --------------------------------------------------------------------------------------------
# The combination kernel (native.combine_call, measured and off by default: tree._COMBINE_KERNEL)
# and the in-place fill of the non-finite guard (native.fill_unless_call, tree.fill_unless).


@needs_kernel
@pytest.mark.parametrize("T", [1, 2, 3, 10, 17, 64])
def test_combine_kernel_matches_float64(T):
    # Column counts around the 16-lane vectors, the 32-column blocks, the prefetch distance and
    # the 2**15-column chunks claimed by the threads.
    assert native.available()
    rng = np.random.default_rng(100 + T)
    f = jax.jit(native.combine_call)
    for C in (1, 15, 16, 31, 32, 33, 1057, 32767, 32768, 32769, 70001):
        x = rng.standard_normal((T, C)).astype(np.float32)
        w = rng.standard_normal(T).astype(np.float32)
        out, check = f(x, w)
        want = w.astype(np.float64) @ x.astype(np.float64)
        assert out.dtype == jnp.float32 and out.shape == (C,) and check.shape == ()
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.sqrt(T), err_msg=f"C={C}")
        assert float(check) == 0.0
        # through tree.combine_checked, forced onto the kernel
        (got,), ok = tr.combine_checked(w, [x], use_native=True)
        np.testing.assert_array_equal(got, out)
        assert bool(ok)


@needs_kernel
def test_combine_kernel_flags_nan_and_inf_and_handles_empty_arrays():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 40000)).astype(np.float32)
    w = np.array([0.5, 0.0, 1.0, 2.0, -1.0], np.float32)
    f = jax.jit(native.combine_call)
    for pos, bad in (((1, 39999), np.nan), ((3, 0), np.inf), ((0, 32768), -np.inf)):
        y = x.copy()
        y[pos] = bad
        out, check = f(y, w)
        assert np.isnan(check)
        assert not np.isfinite(np.asarray(out)[pos[1]])  # (0 * inf is NaN: row 1 too)
        assert np.isfinite(np.delete(np.asarray(out), pos[1])).all()
        (_,), ok = tr.combine_checked(w, [y], use_native=True)
        assert not bool(ok)
    big = np.full((2, 100), 3e38, np.float32)  # finite inputs, an output that overflows
    assert np.isnan(f(big, np.ones(2, np.float32))[1])
    out, check = f(np.zeros((3, 0), np.float32), np.ones(3, np.float32))
    assert out.shape == (0,) and float(check) == 0.0
    out, check = f(np.zeros((0, 7), np.float32), np.zeros(0, np.float32))
    np.testing.assert_array_equal(out, np.zeros(7))
    got = mtlopt.combine(jnp.ones(3), {"a": jnp.zeros((3, 0, 4)), "b": jnp.ones((3, 2))})
    assert got["a"].shape == (0, 4) and np.asarray(got["b"]).tolist() == [3.0, 3.0]


@needs_kernel
def test_combine_kernel_under_vmap_jit_and_autodiff():
    rng = np.random.default_rng(8)
    xs = jnp.asarray(rng.standard_normal((3, 4, 50001)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    f = lambda w, x: tr.combine_checked(w, [x], use_native=True)[0][0]
    want = np.einsum("bt,btc->bc", np.asarray(ws, np.float64), np.asarray(xs, np.float64))
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(ws, xs), want, rtol=1e-5, atol=1e-5)
    # batched weights, one array (read once per weight vector, not copied)
    got = jax.jit(jax.vmap(f, in_axes=(0, None)))(ws, xs[0])
    np.testing.assert_allclose(
        got, np.asarray(ws, np.float64) @ np.asarray(xs[0]), rtol=1e-5, atol=1e-5
    )
    got = jax.jit(jax.vmap(f, in_axes=(None, 0)))(ws[1], xs)
    np.testing.assert_allclose(got, np.einsum("t,btc->bc", ws[1], xs), rtol=1e-5, atol=1e-5)
    nested = jax.vmap(jax.vmap(f, in_axes=(0, None)), in_axes=(None, 0))(ws, xs)
    np.testing.assert_allclose(nested, np.einsum("at,btc->bac", ws, xs), rtol=1e-5, atol=1e-5)
    # JVP and grad w.r.t. the task grads and the weights, as the pure-JAX combination
    pure = lambda w, x: tr.combine_checked(w, [x], use_native=False)[0][0]
    v = jnp.asarray(rng.standard_normal(50001), jnp.float32)
    for fn in (f, pure):
        loss = lambda w, x, fn=fn: jnp.sum(fn(w, x) * v) + 1e-3 * jnp.sum(fn(w, x) ** 2)
        g = jax.grad(loss, (0, 1))(ws[0], xs[0])
        if fn is f:
            kernel_grads = g
    for a, b in zip(kernel_grads, g, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    t_out = jax.jvp(f, (ws[0], xs[0]), (ws[1], xs[1]))[1]
    np.testing.assert_allclose(
        t_out, jax.jvp(pure, (ws[0], xs[0]), (ws[1], xs[1]))[1], rtol=1e-5, atol=1e-5
    )


@needs_kernel
def test_fill_unless_is_in_place_and_fills_every_leaf():
    rng = np.random.default_rng(9)
    tree_ = {
        "a": jnp.asarray(rng.standard_normal((300, 7)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(5), jnp.bfloat16),  # the cond path
        "c": jnp.zeros((0, 3), jnp.float32),
    }
    f = jax.jit(tr.fill_unless)
    for ok, fill in ((True, 0.0), (False, 0.0), (False, np.nan)):
        got = f(ok, tree_, fill)
        for k, x in tree_.items():
            assert got[k].dtype == x.dtype and got[k].shape == x.shape
            want = np.asarray(x, np.float32) if ok else np.full(x.shape, fill, np.float32)
            np.testing.assert_array_equal(np.asarray(got[k], np.float32), want)
    # the combination kernel's output and check, then the fill: in place, no copy of the update
    # (after an XLA dot, whose output all_finite also reads, XLA copies it first)
    w, m = jnp.ones(4), jnp.ones((4, 50000))

    def guard(w, m, use_native):
        (out,), ok = tr.combine_checked(w, [m], use_native=use_native)
        return tr.fill_unless(ok, [out], 0.0)[0]

    hlo = jax.jit(guard, static_argnums=2).lower(w, m, True).compile().as_text()
    assert native.FILL_TARGET in hlo and "output_to_operand_aliasing" in hlo
    assert "copy" not in hlo.split("ENTRY")[1] and "conditional(" not in hlo
    m_bad = m.at[2, 7].set(jnp.inf)
    for use_native in (True, False):
        got = jax.jit(guard, static_argnums=2)(w, m_bad, use_native)
        np.testing.assert_array_equal(got, np.zeros(50000))
        np.testing.assert_array_equal(jax.jit(guard, static_argnums=2)(w, m, use_native), 4.0)
    # vmap (a batched flag), grad through the filled update
    oks = jnp.array([True, False, True])
    xs = jnp.asarray(rng.standard_normal((3, 1000)), jnp.float32)
    got = jax.vmap(lambda ok, x: tr.fill_unless(ok, x, -1.0))(oks, xs)
    np.testing.assert_array_equal(got, np.where(np.asarray(oks)[:, None], xs, -1.0))
    got = jax.vmap(lambda ok: tr.fill_unless(ok, xs[0], -1.0))(oks)
    np.testing.assert_array_equal(got, np.where(np.asarray(oks)[:, None], xs[0], -1.0))
    for ok in (True, False):
        g = jax.grad(lambda x, ok=ok: jnp.sum(tr.fill_unless(ok, x, 0.0) * 2.0))(xs[0])
        np.testing.assert_array_equal(g, np.full(1000, 2.0 if ok else 0.0))


def test_combine_float64_and_half_precision_leaves():
    rng = np.random.default_rng(10)
    J = rng.standard_normal((3, 40000))
    w = np.array([0.3, -1.7, 2.0])
    half = mtlopt.combine(jnp.asarray(w), {"h": jnp.asarray(J, jnp.bfloat16)})["h"]
    assert half.dtype == jnp.bfloat16
    ref = w @ np.asarray(jnp.asarray(J, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(half, np.float64), ref, rtol=1e-2, atol=1e-2)
    with jax.enable_x64(True):
        got = mtlopt.combine(jnp.asarray(w), {"d": jnp.asarray(J)})["d"]
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, w @ J, rtol=1e-13, atol=1e-13)
        (got2,), ok = tr.combine_checked(jnp.asarray(w, jnp.float32), [jnp.asarray(J)])
        assert got2.dtype == jnp.float64 and bool(ok)


def test_native_env_one_requires_the_kernel(monkeypatch):
    # MTLOPT_NATIVE=1: the kernel or a clear error, never a silent fallback.
    monkeypatch.setattr(native, "unusable_reason", lambda: "the kernel library was not built")
    monkeypatch.setenv(native.NATIVE_ENV, "1")
    with pytest.raises(RuntimeError, match=r"mtlopt: MTLOPT_NATIVE=1 requires .* not built"):
        jax.jit(lambda x: mtlopt.gramian(x)).lower(jnp.zeros((4, tr._SMALL_LEAF + 1)))
    assert not mtlopt.native_kernel_available()  # the question itself does not raise
    monkeypatch.delenv(native.NATIVE_ENV)
    assert not native.available() and not mtlopt.native_kernel_available()
    lowered = jax.jit(lambda x: mtlopt.gramian(x)).lower(jnp.zeros((4, tr._SMALL_LEAF + 1)))
    assert native._TARGET not in lowered.as_text()
    monkeypatch.setenv(native.NATIVE_ENV, "on")
    with pytest.raises(ValueError, match=native.NATIVE_ENV):
        mtlopt.native_kernel_available()


@needs_kernel
def test_native_kernel_available_is_public_and_follows_the_env(monkeypatch):
    assert "native_kernel_available" in mtlopt.__all__
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    assert mtlopt.native_kernel_available() is True
    monkeypatch.setenv(native.NATIVE_ENV, "1")
    assert mtlopt.native_kernel_available() is True and native.available()
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert mtlopt.native_kernel_available() is False
