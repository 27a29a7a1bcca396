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
from registry import AGGREGATORS

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


def _run_method(row, J, monkeypatch, enabled: str):
    monkeypatch.setenv(native.NATIVE_ENV, enabled)
    T = J.shape[0]
    tx = row.make(T)
    state = tx.init(jnp.zeros(J.shape[1:]))
    kw = {"task_losses": jnp.linspace(1.0, 2.0, T)} if row.needs_losses else {}
    update = jax.jit(lambda g, s: tx.update(g, s, **kw))
    outs = []
    for _ in range(2):  # a second step, from the first's state (warm starts, EMAs)
        u, state = update(J, state)
        outs.append(np.asarray(u))
    return outs, mtlopt.task_weights(state)


@needs_kernel
@pytest.mark.parametrize("row", AGGREGATORS, ids=repr)
@pytest.mark.parametrize("case", ["normal", "huge", "nan"])
def test_every_method_agrees_with_and_without_the_kernel(row, case, monkeypatch):
    # A leaf past the one-dot limit takes the kernel. "huge" rows overflow float32 products and
    # take the rescaled pass (the kernel's scale argument); "nan" must skip the step.
    rng = np.random.default_rng(5)
    T, P = 4, 3 * tr._SMALL_LEAF + 5
    J = rng.standard_normal((T, P)).astype(np.float32)
    J[1] *= -0.3
    if case == "huge":
        J *= np.float32(1e25)
    if case == "nan":
        J[2, P - 2] = np.nan
    J = jnp.asarray(J)
    with_kernel, w_kernel = _run_method(row, J, monkeypatch, "1")
    without, w_pure = _run_method(row, J, monkeypatch, "0")
    for a, b in zip(with_kernel, without, strict=True):
        assert np.isfinite(a).all()
        scale = np.abs(b).max() if case != "nan" else 1.0
        np.testing.assert_allclose(a / scale, b / scale, rtol=1e-4, atol=1e-5)
    if case == "nan":
        np.testing.assert_array_equal(with_kernel[0], 0.0)
    if w_kernel is not None:
        np.testing.assert_allclose(w_kernel, w_pure, rtol=1e-4, atol=1e-5)


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
