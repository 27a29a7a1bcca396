"""The optional CPU Gramian kernel (``csrc/kernels.cc``), called through ``jax.ffi``.

Built by ``pip install`` where a C++ compiler is found (``setup.py``); absent otherwise, and then
mtlopt computes every Gramian in pure JAX (``tree._cpu_gramian``'s loops), with the same results
to float32 rounding. :func:`available` says whether this process uses it: the library was
built, ``jax.ffi.ffi_call`` exists (not in jax 0.4.30), a one-off check call gives the right
answer, the process has a single CPU device (with several, e.g. sharded params, the pure-JAX
loops let the compiler split the Gramian over the shards; an FFI call would gather them), and
``MTLOPT_NATIVE`` is not ``0``.

The kernel takes a float32 ``(..., T, C)`` array and a scale per leading index, and returns the
``(..., T, T)`` Gramian of ``scale * x`` in float32, accumulated in double across column panels.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mtlopt._src import checks

NATIVE_ENV = "MTLOPT_NATIVE"
_TARGET = "mtlopt_gramian"
# The kernel keeps T * T * 16 float32 partial sums per thread (1 MiB at T = 128): past that,
# the pure-JAX loops run.
MAX_TASKS = 128


@functools.cache
def _registered() -> bool:
    """Loads the library and registers its handler once per process; False where it cannot."""
    ffi = getattr(jax, "ffi", None)
    if ffi is None or not hasattr(ffi, "ffi_call"):
        return False
    # Built by setup.py into the folder csrc/ beside this module (not a package).
    found = sorted((pathlib.Path(__file__).parent / "csrc").glob("_kernels*.so"))
    if not found:
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(found[0]))
        ffi.register_ffi_target(_TARGET, ffi.pycapsule(lib.MtloptGramian), platform="cpu")
    except Exception:  # a stale or foreign build: the pure-JAX path stands in
        return False
    return True


def call(x: jax.Array, scale: jax.Array) -> jax.Array:
    """The raw kernel: ``x`` float32 ``(..., T, C)``, ``scale`` float32 ``(..., 1)``."""
    out = jax.ShapeDtypeStruct((*x.shape[:-1], x.shape[-2]), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="broadcast_all")(x, scale)


@functools.cache
def _works() -> bool:
    """One small call checked against numpy, run now even inside a caller's trace."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1000), dtype=np.float32)
    want = (x.astype(np.float64) * 0.5) @ (x.astype(np.float64) * 0.5).T
    try:
        with jax.ensure_compile_time_eval():
            cpu = jax.devices("cpu")[0]
            args = jax.device_put((x, np.full((1,), 0.5, np.float32)), cpu)
            got = np.asarray(jax.jit(call)(*args))
    except Exception:
        return False
    return bool(np.allclose(got, want, rtol=1e-5, atol=1e-5))


def available(num_tasks: int | None = None) -> bool:
    """Whether Gramians of float32 leaves on the CPU go through the kernel in this process (for
    ``num_tasks`` tasks: at most ``MAX_TASKS``)."""
    env = checks.choice("gramian", NATIVE_ENV, os.environ.get(NATIVE_ENV, ""), ("", "0", "1"))
    if env == "0" or (num_tasks is not None and num_tasks > MAX_TASKS) or not _registered():
        return False
    try:
        cpus = len(jax.devices("cpu"))
    except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS without cpu)
        return False
    if jax.process_count() > 1 or cpus > 1:
        return False
    return _works()
