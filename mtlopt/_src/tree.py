"""All per-leaf maths over task grads: the only code that reads the big arrays.

A task-grads pytree has leaves of shape ``(T, *param_shape)``. Methods never loop over
leaves themselves: they call :func:`gramian` (pass 1), solve a small problem on the
``(T, T)`` result, then call :func:`combine` (pass 2). Reductions run in float32
(``preferred_element_type``), results come back in each leaf's dtype.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

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
# T), and one small reduction over L ends it. On machines A and C the dot loop wins. So which
# loop runs for T <= _OUTER_MAX_T is measured once per process and T on the machine itself
# (_outer_loop_wins); past _OUTER_MAX_T the dot loop always runs.
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
    """A ``(T, *shape)`` leaf as a ``(T, prod(shape))`` matrix."""
    return x.reshape(x.shape[0], -1)


def _self_gram(m: jax.Array, scale: jax.Array | None) -> jax.Array:
    """(T, C) -> (T, T) by one dot, of ``scale * m`` with a scale, in float32 at full precision."""
    s = m if scale is None else m.astype(jnp.float32) * scale
    return lax.dot_general(
        s, s, (((1,), (1,)), ((), ())), precision=HIGHEST, preferred_element_type=jnp.float32
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

    def body(i, acc):
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

    def body(i, acc):
        chunk = lax.dynamic_slice_in_dim(m, i * _CHUNK_COLUMNS, _CHUNK_COLUMNS, axis=1)
        return acc + _self_gram(chunk, scale)

    acc = acc + _self_gram(m[:, n * _CHUNK_COLUMNS :], scale)
    return lax.fori_loop(0, n, body, acc) if n else acc


# The measurement behind _outer_loop_wins: a (T, _PROBE_COLUMNS) float32 array, the fastest of
# _PROBE_CALLS calls of each loop. The outer-product loop must win by _PROBE_MARGIN, so that
# machines where the two are close always take the dot loop instead of a choice that timing
# noise could flip from one process to the next (machine B: 2-3x at T = 10, 1.1x at T = 16).
_PROBE_COLUMNS = 1 << 18
_PROBE_CALLS = 5
_PROBE_MARGIN = 1.3
# "outer" or "dot" skips the measurement and takes that loop for T <= _OUTER_MAX_T.
GRAMIAN_LOOP_ENV = "MTLOPT_CPU_GRAMIAN_LOOP"


def _pinned_loop() -> str:
    """``MTLOPT_CPU_GRAMIAN_LOOP``, checked: "outer", "dot", or "" (measure)."""
    value = os.environ.get(GRAMIAN_LOOP_ENV, "")
    return checks.choice("gramian", GRAMIAN_LOOP_ENV, value, ("", "outer", "dot"))


@functools.cache
def _outer_loop_wins(T: int) -> bool:
    """Whether the outer-product loop beats the dot loop here, for T tasks (see the top).

    Measured once per process and ``T``, at trace time, on this machine's CPU device (0.3-0.5 s:
    two small compilations, ten short calls). Not measured, and the dot loop taken, where the
    answer is already known or must agree across processes: past ``_OUTER_MAX_T``, when JAX's
    default backend is not the CPU (this branch then only runs for arrays placed on the CPU
    explicitly), and with several processes (jax.distributed), where every process must compile
    the same program.
    """
    pinned = _pinned_loop()
    if T > _OUTER_MAX_T:
        return False
    if pinned:
        return pinned == "outer"
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

    def route(m):
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
def _native_scaled_gram_jvp(primals, tangents):
    return _native_scaled_gram(*primals), jax.jvp(_self_gram, primals, tangents)[1]


def _one_dot_gramian(matrices: list[jax.Array], scale: jax.Array | None) -> jax.Array:
    return sum(_self_gram(m, scale) for m in matrices)


def gramian(task_grads: Any, scale: jax.Array | None = None) -> jax.Array:
    """The ``(T, T)`` Gramian ``G[s, t] = <grad_s, grad_t>``, summed over all leaves.

    Accumulated in float32 at ``Precision.HIGHEST`` whatever the leaves' dtype, so TF32 or
    bfloat16 matmul units do not change it. With ``scale``, the Gramian of ``scale * grads``
    (applied chunk by chunk, without a scaled copy).

    On GPU/TPU it is one matmul per leaf. On CPU, large leaves go through a loop over column
    chunks; for up to 16 tasks, which of two loops is faster depends on the CPU, and the first
    trace in a process times both (0.3-0.5 s, once per number of tasks). The environment
    variable ``MTLOPT_CPU_GRAMIAN_LOOP`` (``dot`` or ``outer``) pins it instead.

    Examples:
        >>> import jax.numpy as jnp, mtlopt
        >>> grads = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]]), "b": jnp.array([[2.0], [0.0]])}
        >>> mtlopt.gramian(grads)
        Array([[5., 1.],
               [1., 2.]], dtype=float32)
    """
    matrices = [as_matrix(x) for x in jax.tree.leaves(task_grads)]
    return lax.platform_dependent(
        *matrices,
        cpu=lambda *ms: _cpu_gramian(list(ms), scale),
        default=lambda *ms: _one_dot_gramian(list(ms), scale),
    )


def sq_norms(task_grads: Any, scale: jax.Array | None = None) -> jax.Array:
    """The ``(T,)`` squared norms of the task gradients (the Gramian's diagonal), float32.

    With ``scale``, those of ``scale * grads`` (fused into the reduction, no copy).
    """

    def leaf(x):
        m = as_matrix(x).astype(jnp.float32)
        m = m if scale is None else m * scale
        return jnp.sum(m * m, axis=1)

    return sum(leaf(x) for x in jax.tree.leaves(task_grads))


def combine(weights: jax.Array, task_grads: Any) -> Any:
    """``sum_t weights[t] * grad_t``: a pytree shaped like the params, in each leaf's dtype.

    Examples:
        >>> import jax.numpy as jnp, mtlopt
        >>> grads = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]])}
        >>> mtlopt.combine(jnp.array([0.5, 2.0]), grads)
        {'w': Array([2.5, 2. ], dtype=float32)}
    """
    w = jnp.asarray(weights, jnp.float32)

    def leaf(x):
        # w @ J: 0.97 ms on a (10, 1e6) float32 leaf here, the same as numpy; J.mean(0) 57 ms.
        m = as_matrix(x)
        if m.dtype != jnp.float32:
            m = m.astype(jnp.float32)
        out = lax.dot_general(w, m, (((0,), (0,)), ((), ())), precision=HIGHEST)
        return out.reshape(x.shape[1:]).astype(x.dtype)

    return jax.tree.map(leaf, task_grads)


def scale_tasks(scales: jax.Array, task_grads: Any) -> Any:
    """Row ``t`` of every leaf multiplied by ``scales[t]``; leading T axis and dtypes kept."""
    s = jnp.asarray(scales, jnp.float32)

    def leaf(x):
        row = s.reshape((-1,) + (1,) * (x.ndim - 1))
        return (x.astype(jnp.float32) * row).astype(x.dtype)

    return jax.tree.map(leaf, task_grads)


def select_tasks(mask: jax.Array, task_grads: Any) -> Any:
    """Rows of tasks outside ``mask`` set to zero (so their NaNs cannot leak into a sum)."""

    def leaf(x):
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
    def leaf(x):
        return jnp.sum(x.astype(jnp.float32) * jnp.float32(2.0**-40))

    return jnp.isfinite(jnp.sum(jnp.stack([leaf(x) for x in leaves])))


def where_tree(cond: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``jnp.where(cond, a, b)`` for two trees of one structure (cond a scalar)."""
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), on_true, on_false)


def zeros_like_params(task_grads: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), task_grads)


def max_abs(task_grads: Any) -> jax.Array:
    """The largest absolute entry over all leaves, float32 (inf if any entry is).

    Not a NaN test: XLA:CPU's vectorised max reduction may drop NaNs (see :func:`all_finite`).
    """
    return jnp.max(
        jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(task_grads)])
    )
