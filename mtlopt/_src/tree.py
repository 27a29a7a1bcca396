"""All per-leaf maths over task grads: the only code that reads the big arrays.

A task-grads pytree has leaves of shape ``(T, *param_shape)``. Methods never loop over
leaves themselves: they call :func:`gramian` (pass 1), solve a small problem on the
``(T, T)`` result, then call :func:`combine` (pass 2). Reductions run in float32
(``preferred_element_type``), results come back in each leaf's dtype.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mtlopt._src import checks, native

HIGHEST = lax.Precision.HIGHEST

# Public, with a batching rule, in later jax. The oldest jax we support (0.4.30) has it only
# under a private name and without one (vmap fails): there the chain in _cpu_gramian is left out.
_optimization_barrier = getattr(lax, "optimization_barrier", lambda x: x)

# How the Gramian is computed on XLA:CPU. GPU/TPU take one dot per leaf (cuBLAS/MXU are right).
#
# XLA:CPU hands f32 dots (and sum reductions) to its YNNPACK fusion, whose speed depends on the
# CPU. Medians on three 2-core AMD EPYC machines, jax 0.10.2, a (10, 1e6) float32 leaf:
#   machine A: one dot 28.7-37.3 ms; fori_loop over 4096-column slices, one small dot each,
#              6.5-8.3 ms; numpy J @ J.T 10.8-11.0, torch 14.5.
#   machine B (Zen 1, no AVX-512): one dot 70 ms; the 4096-column dot loop 38-40 ms, because a
#              (10, C) x (C, 10) dot runs at 2.7 GFMA/s there (9.6 at T=32, 13.3 at T=64); dot
#              loops over slices transposed first, batched dots over a (T, b, C/b) reshape:
#              34-40; numpy 14-15, torch 23-27.
#   machine C (Zen 4, AVX-512): one dot 42 ms; the dot loop 7.4-9.1; the outer-product loop
#              below 11.5-12.5 (its best over 128-1024 lanes, 4-32 slices a step); numpy 11.1,
#              torch 13.2. At T = 40: dot loop 45, outer loop 72.
# On machine B, for small T (the dot loop's 9.4 / 5.2 / 39 / 30 / 47 / 130 ms at T = 2 / 4 / 10 /
# 16 / 24 / 40) a loop body without dots or reductions wins: it adds the outer products of
# L-column slices, s[:, None, :] * s[None, :, :], into a (T, T, L) accumulator, a plain
# elementwise fusion that XLA vectorises itself (1.9 / 4.3 / 13-22 / 27 / 50 / 141 ms at those
# T), and one small reduction over L ends it. On machines A and C the dot loop wins. The dot
# loop is the default everywhere, so that every process compiles the same program (a timing probe
# at trace time let two processes on one machine compile different ones, and made
# jax.eval_shape and cross-platform lowering pay for it): MTLOPT_CPU_GRAMIAN_LOOP=outer takes
# the outer-product loop, =measure times both once per process and T (_outer_loop_wins); past
# _OUTER_MAX_T the dot loop always runs.
# Forms measured and dropped on machine B: the symmetric half via rolled or concatenated rows
# (52-100 ms: the concatenates become selects), a broadcast-multiply-reduce (XLA rewrites it into
# the same dot), two independent loops over halves (no gain: the loop body's fusion is already
# split across both cores), 512 / 1024 / 4096 / 8192-column slices (slower or equal).
_OUTER_MAX_T = 16
_LANES = 256  # L, the accumulator's last axis: (10, 10, 256) float32 is 100 KB
_OUTER_COLUMNS = 8 * _LANES  # columns per loop step: 8 outer products per fused add
# The dot loop (T > _OUTER_MAX_T): columns per step. Leaves of at most _SMALL_LEAF columns take
# one dot on either path (see _cpu_gramian).
_CHUNK_COLUMNS = 4096
_SMALL_LEAF = 4 * _CHUNK_COLUMNS


def as_matrix(x: jax.Array) -> jax.Array:
    """A ``(T, *shape)`` leaf as a ``(T, prod(shape))`` matrix (also for zero-size leaves)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def acc_dtype(*dtypes: Any) -> Any:
    """The dtype reductions run in: float64 if any input is float64 (``jax_enable_x64``),
    else float32 (for float32, bfloat16 and float16 inputs alike)."""
    return jnp.float64 if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.float32


def _self_gram(m: jax.Array, scale: jax.Array | None) -> jax.Array:
    """(T, C) -> (T, T) by one dot, of ``scale * m`` with a scale, at full precision, in float32
    (float64 for float64 leaves)."""
    acc = acc_dtype(m.dtype)
    s = m if scale is None else m.astype(acc) * scale.astype(acc)
    return lax.dot_general(
        s, s, (((1,), (1,)), ((), ())), precision=HIGHEST, preferred_element_type=acc
    )


def _add_outer(acc: jax.Array, m: jax.Array, scale: jax.Array | None) -> jax.Array:
    """acc (T, T, L) + the outer products of m's L-column slices (the last one zero-padded)."""
    for start in range(0, m.shape[1], _LANES):
        s = m[:, start : start + _LANES].astype(jnp.float32)
        s = s if scale is None else s * scale
        if s.shape[1] < _LANES:
            s = jnp.pad(s, ((0, 0), (0, _LANES - s.shape[1])))
        acc = acc + s[:, None, :] * s[None, :, :]
    return acc


def _outer_leaf(acc: jax.Array, m: jax.Array, scale: jax.Array | None) -> jax.Array:
    """acc (T, T, L) + one leaf's outer products: a loop of 8 slices per step, then the tail."""
    n = m.shape[1] // _OUTER_COLUMNS

    def body(i: jax.Array, acc: jax.Array) -> jax.Array:
        chunk = lax.dynamic_slice_in_dim(m, i * _OUTER_COLUMNS, _OUTER_COLUMNS, axis=1)
        return _add_outer(acc, chunk, scale)

    if n:  # (the body's slice must fit in m even when it would run no step)
        acc = lax.fori_loop(0, n, body, acc)
    if m.shape[1] % _OUTER_COLUMNS:
        acc = _add_outer(acc, m[:, n * _OUTER_COLUMNS :], scale)
    return acc


def _dot_loop_leaf(acc: jax.Array, m: jax.Array, scale: jax.Array | None) -> jax.Array:
    """acc (T, T) + one leaf's Gramian by small dots over column slices, then the tail."""
    n = m.shape[1] // _CHUNK_COLUMNS

    def body(i: jax.Array, acc: jax.Array) -> jax.Array:
        chunk = lax.dynamic_slice_in_dim(m, i * _CHUNK_COLUMNS, _CHUNK_COLUMNS, axis=1)
        return acc + _self_gram(chunk, scale)

    acc = acc + _self_gram(m[:, n * _CHUNK_COLUMNS :], scale)
    return lax.fori_loop(0, n, body, acc) if n else acc


# The measurement behind MTLOPT_CPU_GRAMIAN_LOOP=measure: a (T, _PROBE_COLUMNS) float32 array,
# the fastest of _PROBE_CALLS calls of each loop. The outer-product loop must win by
# _PROBE_MARGIN, so that machines where the two are close always take the dot loop instead of
# a choice that timing noise could flip from one process to the next (machine B: 2-3x at
# T = 10, 1.1x at T = 16).
_PROBE_COLUMNS = 1 << 18
_PROBE_CALLS = 5
_PROBE_MARGIN = 1.3
# Read (and checked) on every trace: "" or "dot" (the default: the dot loop), "outer", "measure".
GRAMIAN_LOOP_ENV = "MTLOPT_CPU_GRAMIAN_LOOP"


def _pinned_loop() -> str:
    """``MTLOPT_CPU_GRAMIAN_LOOP``, checked: "", "dot", "outer" or "measure"."""
    value = os.environ.get(GRAMIAN_LOOP_ENV, "")
    return checks.choice("gramian", GRAMIAN_LOOP_ENV, value, ("", "dot", "outer", "measure"))


def _outer_loop_wins(T: int) -> bool:
    """Whether the CPU Gramian's loop for ``T`` tasks is the outer-product one (see the top).

    The dot loop unless ``MTLOPT_CPU_GRAMIAN_LOOP`` says ``outer``, or says ``measure`` and the
    probe (:func:`_probe_outer_wins`) finds the outer-product loop faster. Past
    ``_OUTER_MAX_T`` always the dot loop. No timing happens by default: the choice depends only
    on ``T`` and the environment variable, read on every call.
    """
    pinned = _pinned_loop()
    if T > _OUTER_MAX_T:
        return False
    if pinned == "measure":
        return _probe_outer_wins(T)
    return pinned == "outer"


@functools.cache
def _probe_outer_wins(T: int) -> bool:
    """Times both loops once per process and ``T``, at trace time, on this machine's CPU device
    (0.3-0.5 s: two small compilations, ten short calls). Not measured, and the dot loop taken,
    when JAX's default backend is not the CPU (this branch then only runs for arrays placed on
    the CPU explicitly), and with several processes (jax.distributed), where every process must
    compile the same program.
    """
    if jax.default_backend() != "cpu" or jax.process_count() > 1:
        return False
    cpu = jax.devices("cpu")[0]
    probe = np.random.default_rng(0).standard_normal((T, _PROBE_COLUMNS), dtype=np.float32)
    best = {}
    with jax.ensure_compile_time_eval():  # run now, even inside the caller's trace
        x = jax.device_put(probe, cpu)
        for outer in (True, False):
            fn = jax.jit(lambda m, o=outer: _cpu_gramian([m], None, outer=o, use_native=False))
            jax.block_until_ready(fn(x))  # compiles
            times = []
            for _ in range(_PROBE_CALLS):
                start = time.perf_counter()
                jax.block_until_ready(fn(x))
                times.append(time.perf_counter() - start)
            best[outer] = min(times)
    return best[True] * _PROBE_MARGIN < best[False]


def _cpu_gramian(
    matrices: list[jax.Array],
    scale: jax.Array | None,
    outer: bool | None = None,
    small_leaf: int = _SMALL_LEAF,
    use_native: bool | None = None,
) -> jax.Array:
    """Pass 1 on XLA:CPU: the native kernel, the outer-product loop or the dot loop.

    Leaves of at most ``small_leaf`` columns take one dot on every path: as fast there (a
    model of 180 such leaves, 1e6 parameters: 18.7 ms by dots, 17.2 by outer products), and a
    loop per small leaf doubled that model's compile time (1.2 -> 2.5 s). Larger float32 leaves
    go to the native kernel where it is available (``native.available(T)``, up to
    ``native.MAX_TASKS`` tasks): at T = 10, P = 1e6, 2.4-3.7 ms against 6.9-9.0 ms for the dot
    loop, which runs on one core (benchmarks/aggregation.py, six runs; the kernel uses XLA's
    thread pool and prefetches the rows; a plain C loop reading the 40 MB once takes 1.6-2.0 ms
    on this machine). Other leaves (bfloat16 ones, whose float32 copy would be a new T x P
    buffer) take a loop: the outer-product one where it wins, see the top, else the dot loop.
    ``outer``, ``small_leaf`` and ``use_native`` are for tests, which force each form on every
    leaf.

    Every leaf waits for the one before (an optimization barrier): with sharded grads, two
    leaves' collectives ready at once could deadlock XLA:CPU's rendezvous (tests/
    sharding_check.py aborted in 2 of 8 runs under load when the small leaves' dots were left
    independent of the big leaves' loops; 0 of 8 with the chain).
    """
    T = matrices[0].shape[0]
    _pinned_loop()  # a bad value is an error even where no loop runs
    if use_native is None:
        use_native = native.available(T)

    def route(m: jax.Array) -> str:
        if m.shape[1] <= small_leaf:
            return "dot"
        return "native" if use_native and m.dtype == jnp.float32 else "loop"

    routes = [route(m) for m in matrices]
    if outer is None:  # (measured only when a loop will run)
        outer = "loop" in routes and _outer_loop_wins(T)
    acc = jnp.zeros((T, T, _LANES) if outer else (T, T), jnp.float32)
    for m, way in zip(matrices, routes, strict=True):
        acc, m = _optimization_barrier((acc, m))
        if way == "loop":
            acc = (_outer_leaf if outer else _dot_loop_leaf)(acc, m, scale)
        else:
            g = _self_gram(m, scale) if way == "dot" else _native_gram(m, scale)
            acc = acc.at[:, :, 0].add(g) if outer else acc + g
    return jnp.sum(acc, axis=-1) if outer else acc


def _native_gram(m: jax.Array, scale: jax.Array | None) -> jax.Array:
    """(T, C) float32 -> (T, T) by the native kernel; differentiable (the JVP in pure JAX)."""
    return _native_scaled_gram(m, jnp.float32(1.0) if scale is None else scale)


@jax.custom_jvp
def _native_scaled_gram(m: jax.Array, scale: jax.Array) -> jax.Array:
    return native.call(m, jnp.reshape(scale, (1,)).astype(jnp.float32))


@_native_scaled_gram.defjvp
def _native_scaled_gram_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    return _native_scaled_gram(*primals), jax.jvp(_self_gram, primals, tangents)[1]


def _one_dot_gramian(matrices: list[jax.Array], scale: jax.Array | None) -> jax.Array:
    acc = acc_dtype(*(m.dtype for m in matrices))
    return cast(jax.Array, sum(_self_gram(m, scale).astype(acc) for m in matrices))


def gramian(task_grads: Any, scale: jax.Array | None = None) -> jax.Array:
    """The ``(T, T)`` Gramian ``G[s, t] = <grad_s, grad_t>``, summed over all leaves.

    Accumulated in float32 at ``Precision.HIGHEST`` whatever the leaves' dtype, so TF32 or
    bfloat16 matmul units do not change it. With ``scale``, the Gramian of ``scale * grads``
    (applied chunk by chunk, without a scaled copy).

    On GPU/TPU it is one matmul per leaf. On CPU, large float32 leaves go to the native kernel
    where it is in use (:func:`mtlopt.native_kernel_available`), other large leaves through a
    loop over column chunks: small dots by default; for up to 16 tasks the environment variable
    ``MTLOPT_CPU_GRAMIAN_LOOP`` takes outer products instead (``outer``, faster on some CPUs) or
    times both once per process (``measure``).

    Args:
      task_grads: a pytree of ``(T, ...)`` leaves (or a :class:`TaskScaled`).
      scale: optional scalar: the Gramian of ``scale * task_grads``.

    Examples:
        >>> import jax.numpy as jnp, mtlopt
        >>> grads = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]]), "b": jnp.array([[2.0], [0.0]])}
        >>> mtlopt.gramian(grads)
        Array([[5., 1.],
               [1., 2.]], dtype=float32)
    """
    task_grads, task_scales = unwrap(task_grads)
    leaves = jax.tree.leaves(task_grads)
    if not leaves:
        raise checks.fail(
            "gramian", "task_grads has no array leaves; expected a pytree of (T, ...) arrays."
        )
    gram = matrices_gramian([as_matrix(x) for x in leaves], scale)
    return gram if task_scales is None else fold(gram, task_scales.astype(gram.dtype))


def matrices_gramian(matrices: list[jax.Array], scale: jax.Array | None = None) -> jax.Array:
    """The Gramian of ``(T, C)`` matrices (see :func:`gramian`). Zero-column ones add nothing;
    float64 ones (``jax_enable_x64``) make the whole Gramian float64, by one dot per leaf."""
    T = matrices[0].shape[0]
    acc = acc_dtype(*(m.dtype for m in matrices))
    matrices = [m for m in matrices if m.shape[1] > 0]
    if not matrices:
        return jnp.zeros((T, T), acc)
    if acc == jnp.float64:
        return _one_dot_gramian(matrices, scale)
    return lax.platform_dependent(
        *matrices,
        cpu=lambda *ms: _cpu_gramian(list(ms), scale),
        default=lambda *ms: _one_dot_gramian(list(ms), scale),
    )


def fold(gram: jax.Array, scales: jax.Array) -> jax.Array:
    """``S G S`` (``S = diag(scales)``) for a ``(T, T)`` Gramian: the Gramian of the task grads
    with row t scaled by ``scales[t]``. (The skeleton folds in pre-scaled units instead:
    ``build._fold``.)"""
    return gram * scales[:, None] * scales[None, :]


def sq_norms(task_grads: Any, scale: jax.Array | None = None) -> jax.Array:
    """The ``(T,)`` squared norms of the task gradients (the Gramian's diagonal), float32.

    With ``scale``, those of ``scale * grads`` (fused into the reduction, no copy).
    """

    leaves = jax.tree.leaves(task_grads)
    acc = acc_dtype(*(x.dtype for x in leaves))

    def leaf(x: jax.Array) -> jax.Array:
        m = as_matrix(x).astype(acc)
        m = m if scale is None else m * scale.astype(acc)
        return jnp.sum(m * m, axis=1)

    return cast(jax.Array, sum(leaf(x) for x in leaves))


# Pass 2, sum_t w[t] * J[t] per leaf: one XLA dot. Measured side by side in one process
# (benchmarks/pass2.py, T = 10, P = 1e6 float32, median ms per call, 2-core Zen 5 EPYC shared with
# other jobs; four runs, two with glibc's malloc defaults, two with freed memory kept):
#   XLA dot 0.98-1.30; elementwise chain w[0] J[0] + w[1] J[1] + ... 0.89-1.27 (a tie); the
#   native kernel (native.combine_call: 32 columns in registers, rows prefetched, chunks over
#   XLA's pool, a finiteness check in the same read) 1.41-3.03, and 2.46 on one thread, against
#   0.95 for the same loop in a C++ harness (not understood yet: so not used); numpy w @ J
#   0.65-1.39 (OpenBLAS, 2 threads; 8 ms in runs where the other core was busy); torch w @ J
#   1.42-1.55; TorchJD Mean 1.51-1.76.
#   The guard (is the update finite? else zeros): all_finite's reduction over the output then
#   lax.cond 1.24-1.38 (freed memory kept) and 1.81-3.67 (glibc: the cond copies the output
#   into a second fresh buffer, page faults), all_finite then fill_unless (in place, no copy)
#   1.31-1.79 / 1.78-2.75 (XLA copies the dot's output first: all_finite reads it too); the
#   kernel's check then fill_unless 1.49-3.00 / 1.11-2.36.
# Dropped: the dot on column halves or quarters (12-76 ms: XLA:CPU copies the slices), a sum of
# w[:, None] * J over axis 0 (2.4-5.1 ms), the elementwise chain with all_finite (XLA computes
# the chain twice, once for the output, once inside the reduction: 1.75-3.79).
# Other leaves: bfloat16 / float16 accumulate in float32, float64 in float64.
_COMBINE_KERNEL = False  # the native combination kernel by default (see above: not yet)


def _combine_xla(w: jax.Array, m: jax.Array) -> jax.Array:
    """``w @ m`` for a ``(T, C)`` matrix: float32 accumulation (float64 for float64 leaves)."""
    acc = acc_dtype(m.dtype)
    m = m if m.dtype == acc else m.astype(acc)
    return lax.dot_general(w.astype(acc), m, (((0,), (0,)), ((), ())), precision=HIGHEST)


def _add_tangents(*terms: jax.Array | None) -> jax.Array | None:
    present = [t for t in terms if t is not None]
    return functools.reduce(jnp.add, present) if present else None


@functools.partial(jax.custom_jvp)
def _native_combine(w: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(T,) and (T, C) float32 -> (w @ m, check): the kernel; the JVP in pure JAX."""
    return native.combine_call(m, w)


def _native_combine_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    (w, m), (dw, dm) = primals, tangents
    out, check = _native_combine(w, m)
    zero = jax.custom_derivatives.SymbolicZero
    dout = _add_tangents(
        None if isinstance(dw, zero) else _combine_xla(dw, m),
        None if isinstance(dm, zero) else _combine_xla(w, dm),
    )
    return (out, check), (jnp.zeros_like(out) if dout is None else dout, jnp.zeros_like(check))


_native_combine.defjvp(_native_combine_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _native_fill(ok: jax.Array, fill: jax.Array, x: jax.Array) -> jax.Array:
    return native.fill_unless_call(ok, fill, x)


def _native_fill_jvp(
    primals: tuple[jax.Array, jax.Array, jax.Array], tangents: tuple[Any, Any, Any]
) -> tuple[jax.Array, jax.Array]:
    ok, fill, x = primals
    _, dfill, dx = tangents
    zero = jax.custom_derivatives.SymbolicZero
    dx = jnp.zeros_like(x) if isinstance(dx, zero) else dx
    dfill = jnp.zeros_like(fill) if isinstance(dfill, zero) else dfill
    return _native_fill(ok, fill, x), jnp.where(ok, dx, dfill)


_native_fill.defjvp(_native_fill_jvp, symbolic_zeros=True)


def _native_leaf(m: jax.Array, use_native: bool) -> bool:
    return use_native and m.dtype == jnp.float32 and m.size > 0


def _combine_leaves(
    w: jax.Array, matrices: list[jax.Array], *, cpu: bool, use_native: bool | None = None
) -> tuple[list[jax.Array], list[jax.Array | None]]:
    """Per matrix ``(T, C)``: ``w @ m`` and, for kernel leaves, the kernel's check (else None).

    ``use_native`` (tests, benchmarks) forces the kernel on or off for float32 leaves on CPU."""
    if use_native is None:
        use_native = _COMBINE_KERNEL and cpu and native.available()
    outs, checks_ = [], []
    for m in matrices:
        if cpu and _native_leaf(m, use_native):
            out, check = _native_combine(w.astype(jnp.float32), m)
        else:
            out, check = _combine_xla(w, m).astype(m.dtype), None
        outs.append(out)
        checks_.append(check)
    return outs, checks_


def _combine_matrices(
    w: jax.Array, matrices: list[jax.Array], with_flag: bool, use_native: bool | None = None
) -> tuple[list[jax.Array], jax.Array | None]:
    """The outputs ``(C,)`` per matrix, and with ``with_flag`` whether all are finite."""

    def run(*ms: jax.Array, cpu: bool) -> tuple[list[jax.Array], jax.Array | None]:
        outs, kernel_checks = _combine_leaves(w, list(ms), cpu=cpu, use_native=use_native)
        if not with_flag:
            return outs, None
        # The kernel's checks (0 or NaN, from the same read); the other outputs are checked by
        # all_finite, a reduction over the output.
        rest = [o for o, c in zip(outs, kernel_checks, strict=True) if c is None]
        found = [c for c in kernel_checks if c is not None]
        ok = jnp.isfinite(sum(found)) if found else jnp.asarray(True)
        return outs, ok & all_finite(rest) if rest else ok

    if not matrices:
        return [], (jnp.asarray(True) if with_flag else None)
    if use_native is False or (use_native is None and not _COMBINE_KERNEL):
        return run(*matrices, cpu=False)
    return lax.platform_dependent(
        *matrices,
        cpu=lambda *ms: run(*ms, cpu=True),
        default=lambda *ms: run(*ms, cpu=False),
    )


def _weights_for(weights: jax.Array, task_grads: Any) -> jax.Array:
    """The weights as an array: float64 when they or a leaf are (jax_enable_x64), else float32."""
    w = jnp.asarray(weights)
    return w.astype(acc_dtype(w.dtype, *(x.dtype for x in jax.tree.leaves(task_grads))))


def combine(weights: jax.Array, task_grads: Any) -> Any:
    """``sum_t weights[t] * grad_t``: a pytree shaped like the params, in each leaf's dtype.

    Accumulated in float32 (float64 for float64 leaves), one dot per leaf.

    Args:
      weights: ``(T,)``.
      task_grads: a pytree of ``(T, ...)`` leaves.

    Examples:
        >>> import jax.numpy as jnp, mtlopt
        >>> grads = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]])}
        >>> mtlopt.combine(jnp.array([0.5, 2.0]), grads)
        {'w': Array([2.5, 2. ], dtype=float32)}
    """
    return combine_checked(weights, task_grads, with_flag=False)[0]


def combine_checked(
    weights: jax.Array, task_grads: Any, *, with_flag: bool = True, use_native: bool | None = None
) -> tuple[Any, jax.Array | None]:
    """:func:`combine`, and a scalar bool: every element of every output is finite.

    The same flag as ``all_finite(combine(weights, task_grads))``: with :func:`fill_unless`,
    the non-finite guard without a copy of the update. (With the native combination kernel,
    off by default, the flag of its leaves comes from the same read as the output.)
    """
    leaves, treedef = jax.tree.flatten(task_grads)
    w = _weights_for(weights, task_grads)
    outs, ok = _combine_matrices(w, [as_matrix(x) for x in leaves], with_flag, use_native)
    outs = [o.reshape(x.shape[1:]) for o, x in zip(outs, leaves, strict=True)]
    return jax.tree.unflatten(treedef, outs), ok


def fill_unless(ok: jax.Array, tree: Any, fill: float | jax.Array = 0.0) -> Any:
    """``tree`` where the scalar bool ``ok`` holds, else every leaf full of ``fill`` (its dtype).

    For the non-finite guard after :func:`combine_checked`. On CPU with the native kernel in
    use, float32 leaves are filled in place by a custom call that reads nothing when ``ok``
    holds; the other leaves take one ``lax.cond`` (on XLA:CPU a cond or a select writes the
    output again into a new buffer: 0.15 ms at P = 1e6 with freed memory kept, 1.4 ms with
    glibc's defaults).
    """
    leaves, treedef = jax.tree.flatten(tree)
    ok = jnp.asarray(ok, bool)
    fill = jnp.asarray(fill, jnp.float32)

    def by_cond(xs: list[jax.Array]) -> list[jax.Array]:
        if not xs:
            return []
        filled = lambda: [jnp.full(x.shape, fill, x.dtype) for x in xs]
        return lax.cond(ok, lambda: list(xs), filled)

    def cpu(*xs: jax.Array) -> list[jax.Array]:
        if not native.available():
            return by_cond(list(xs))
        kernel = [x.dtype == jnp.float32 and x.size > 0 for x in xs]
        rest = iter(by_cond([x for x, k in zip(xs, kernel, strict=True) if not k]))
        return [
            _native_fill(ok, fill, x.reshape(-1)).reshape(x.shape) if k else next(rest)
            for x, k in zip(xs, kernel, strict=True)
        ]

    if not leaves:
        return tree
    out = lax.platform_dependent(*leaves, cpu=cpu, default=lambda *xs: by_cond(list(xs)))
    return jax.tree.unflatten(treedef, out)


def scale_tasks(scales: jax.Array, task_grads: Any) -> Any:
    """Row ``t`` of every leaf multiplied by ``scales[t]``; leading T axis and dtypes kept."""
    s = jnp.asarray(scales, jnp.float32)

    def leaf(x: jax.Array) -> jax.Array:
        row = s.reshape((-1,) + (1,) * (x.ndim - 1))
        return (x.astype(jnp.float32) * row).astype(x.dtype)

    return jax.tree.map(leaf, task_grads)


def select_tasks(mask: jax.Array, task_grads: Any) -> Any:
    """Rows of tasks outside ``mask`` set to zero (so their NaNs cannot leak into a sum)."""

    def leaf(x: jax.Array) -> jax.Array:
        keep = mask.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x, jnp.zeros((), x.dtype))

    return jax.tree.map(leaf, task_grads)


def all_finite(tree: Any) -> jax.Array:
    """A scalar bool: every element of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)

    # The sum of each leaf scaled by 2**-40: a NaN or an inf anywhere (inf - inf too) leaves it
    # non-finite, as IEEE addition always propagates them; the scale is a power of two, so no
    # finite element becomes inf, and a sum of fewer than ~1e12 scaled elements cannot overflow.
    # Not max |x| <= finfo.max: XLA:CPU's vectorised max reduction drops NaNs (measured here,
    # jax 0.10: a NaN at any position of a 4096- or 1e5-element vector went unseen, so mean()
    # let a NaN update through). The sum also costs less: 0.08 ms against 0.16 ms at P = 1e6.
    def leaf(x: jax.Array) -> jax.Array:
        acc = acc_dtype(x.dtype)
        return jnp.isfinite(jnp.sum(x.astype(acc) * jnp.asarray(2.0**-40, acc)))

    return jnp.all(jnp.stack([leaf(x) for x in leaves]))


def where_tree(cond: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``jnp.where(cond, a, b)`` for two trees of one structure (cond a scalar)."""
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), on_true, on_false)


def zeros_like_params(task_grads: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), task_grads)


def pow2(e: jax.Array, dtype: Any) -> jax.Array:
    """``2**e`` exactly, for an integer-valued ``e``, in ``dtype``; ``e`` is clipped to
    ``[-(m - 1), m - 1]`` (``2**-m`` the smallest normal number: 125 for float32), so the result
    and its inverse are both normal. (XLA's ``exp2`` is off by an ulp at most integers and gives
    0 for ``2**-126`` on CPU, measured; ``ldexp`` builds the exponent bits.)"""
    lim = -(int(jnp.finfo(dtype).minexp) + 1)
    n = jnp.clip(jnp.where(jnp.isfinite(e), e, 0.0), -lim, lim).astype(jnp.int32)
    return jnp.ldexp(jnp.ones((), dtype), n)


def max_abs(task_grads: Any) -> jax.Array:
    """The largest absolute entry over all leaves, float32 (inf if any entry is).

    Not a NaN test: XLA:CPU's vectorised max reduction may drop NaNs (see :func:`all_finite`).
    """
    leaves = [x for x in jax.tree.leaves(task_grads) if x.size]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    acc = acc_dtype(*(x.dtype for x in leaves))
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(acc) for x in leaves]))


@jax.tree_util.register_pytree_node_class
class TaskScaled:
    """Task grads whose row ``t`` is still to be multiplied by ``scales[t]`` (a lazy scaling).

    What a task transform such as :func:`mtlopt.log_transform` returns: an mtlopt aggregator
    after it folds the scales into its small problem (``G <- S G S``, ``w <- S w``) instead of
    reading and writing a scaled T x P copy. :meth:`materialize` gives the plain scaled task
    grads (for code outside mtlopt). ``ok`` is False when the transform met a bad step
    (non-finite losses): the aggregator after it then skips its step.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> lazy = mtlopt.TaskScaled({"w": jnp.ones((2, 3))}, jnp.array([0.5, 2.0]))
      >>> lazy.materialize()["w"]
      Array([[0.5, 0.5, 0.5],
             [2. , 2. , 2. ]], dtype=float32)
    """

    def __init__(self, grads: Any, scales: jax.Array, ok: Any = True) -> None:
        self.grads = grads
        self.scales = scales
        self.ok = ok

    def tree_flatten(self) -> tuple[tuple[Any, Any, Any], None]:
        return (self.grads, self.scales, self.ok), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple[Any, Any, Any]) -> TaskScaled:
        del aux
        return cls(*children)

    def materialize(self, fill: float = 0.0) -> Any:
        """The scaled task grads; ``fill`` everywhere on a bad step.

        Args:
          fill: the value of every element on a bad step (0, or NaN).
        """
        out = scale_tasks(self.scales, self.grads)
        return jax.tree.map(lambda x: jnp.where(self.ok, x, jnp.asarray(fill, x.dtype)), out)

    def __repr__(self) -> str:
        return f"TaskScaled(grads={self.grads!r}, scales={self.scales!r}, ok={self.ok!r})"


def unwrap(task_grads: Any) -> tuple[Any, jax.Array | None]:
    """``(grads, scales)`` of a :class:`TaskScaled` (ok folded into the scales as NaN), or
    ``(task_grads, None)``."""
    if isinstance(task_grads, TaskScaled):
        scales = jnp.asarray(task_grads.scales)
        return task_grads.grads, jnp.where(task_grads.ok, scales, jnp.nan)
    return task_grads, None


def task_zeros(params: Any, T: int, dtype: Any = None) -> Any:
    """A params-shaped tree of zeros with a leading task axis: ``(T, *leaf.shape)`` per leaf.

    The T x P state helper: ``None`` leaves (task-specific heads) stay ``None``. Each leaf keeps
    its param's sharding (replicated along the task axis), eagerly and under ``jax.jit`` (the
    zeros are derived from the param, so the compiler gives them its sharding; a fresh
    ``jnp.zeros`` would land on one device). ``dtype``: None keeps float32 and float64 leaves'
    dtype and stores float16/bfloat16 ones in float32 (an EMA of small gradients divided by
    small losses overflows float16); or an explicit dtype.
    """

    def leaf(x: Any) -> jax.Array:
        want = dtype if dtype is not None else state_dtype(jnp.result_type(x))
        if isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct)):
            if isinstance(x, jax.ShapeDtypeStruct):
                return jnp.zeros((T, *x.shape), want)
            # x * 0 keeps the dependence on x (so its sharding propagates); NaN/inf entries -> 0.
            z = jnp.where(jnp.isfinite(x), x * 0, 0).astype(want)
            return lax.broadcast(z, (T,))
        z = jnp.zeros_like(x, dtype=want)  # keeps x's sharding
        return jnp.broadcast_to(z[None], (T, *jnp.shape(x)))

    return jax.tree.map(leaf, params)


def state_dtype(dtype: Any) -> Any:
    """The dtype of a T x P state for params of ``dtype`` (float32 for narrower floats)."""
    dtype = jnp.dtype(dtype)
    return dtype if dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)) else jnp.float32


def saturate(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` cast to ``dtype``, values beyond its finite range clipped to it (NaN stays NaN)."""
    big = float(jnp.finfo(dtype).max)
    return jnp.clip(x, -big, big).astype(dtype)
