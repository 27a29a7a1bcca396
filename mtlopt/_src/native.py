"""The optional CPU Gramian kernel (``csrc/kernels.cc``), called through ``jax.ffi``.

Built by ``pip install`` where a C++ compiler is found (``setup.py``); absent otherwise, and then
mtlopt computes every Gramian in pure JAX (``tree._cpu_gramian``'s loops), with the same results
to float32 rounding. :func:`available` says whether this process uses it: the library was
built, ``jax.ffi.ffi_call`` exists (not in jax 0.4.30), a one-off check call gives the right
answer, the process has a single CPU device (with several, e.g. sharded params, the pure-JAX
loops let the compiler split the Gramian over the shards; an FFI call would gather them), and
``MTLOPT_NATIVE`` is not ``0``. ``MTLOPT_NATIVE=1`` requires the kernel: tracing a CPU
Gramian or combination then raises a RuntimeError that says why the kernel is unusable, instead
of falling back. The variable is read (and checked) on every trace.
:func:`kernel_available` is the public question (``mtlopt.native_kernel_available``).

It also holds the combination kernel (``w @ J`` with a finiteness check in the same read, see
``tree.combine_checked``) and an in-place fill for the non-finite guard (``tree.fill_unless``).

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
COMBINE_TARGET = "mtlopt_combine"
FILL_TARGET = "mtlopt_fill_unless"
# The kernel keeps T * T * 16 float32 partial sums per thread (1 MiB at T = 128): past that,
# the pure-JAX loops run.
MAX_TASKS = 128


@functools.cache
def _load_error() -> str | None:
    """Loads the library and registers its handlers once per process; why not, where it cannot."""
    ffi = getattr(jax, "ffi", None)
    if ffi is None or not hasattr(ffi, "ffi_call"):
        return f"jax {jax.__version__} has no jax.ffi.ffi_call"
    # Built by setup.py into the folder csrc/ beside this module (not a package).
    found = sorted((pathlib.Path(__file__).parent / "csrc").glob("_kernels*.so"))
    if not found:
        return (
            "the kernel library was not built (pip install without a C++ compiler or with "
            "MTLOPT_BUILD_NATIVE=0; reinstall with a compiler)"
        )
    try:
        lib = ctypes.cdll.LoadLibrary(str(found[0]))
        for target, handler in (
            (_TARGET, lib.MtloptGramian),
            (COMBINE_TARGET, lib.MtloptCombine),
            (FILL_TARGET, lib.MtloptFillUnless),
        ):
            ffi.register_ffi_target(target, ffi.pycapsule(handler), platform="cpu")
    except Exception as e:  # a stale or foreign build: the pure-JAX path stands in
        return f"{found[0].name} could not be loaded or registered ({type(e).__name__}: {e})"
    return None


def _registered() -> bool:
    return _load_error() is None


def call(x: jax.Array, scale: jax.Array) -> jax.Array:
    """The raw kernel: ``x`` float32 ``(..., T, C)``, ``scale`` float32 ``(..., 1)``."""
    _load_error()  # (registers the handlers, once)
    out = jax.ShapeDtypeStruct((*x.shape[:-1], x.shape[-2]), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="broadcast_all")(x, scale)


def combine_call(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The raw combination kernel: ``x`` float32 ``(..., T, C)``, ``w`` float32 ``(..., T)``.

    Returns ``w @ x`` ``(..., C)`` and a check ``(...)``: 0.0 where every output is finite, NaN
    otherwise. Under vmap an unmapped argument is read once per batch element, not copied.
    """
    _load_error()
    outs = (
        jax.ShapeDtypeStruct((*x.shape[:-2], x.shape[-1]), jnp.float32),
        jax.ShapeDtypeStruct(x.shape[:-2], jnp.float32),
    )
    return jax.ffi.ffi_call(COMBINE_TARGET, outs, vmap_method="expand_dims")(x, w)


def fill_unless_call(ok: jax.Array, fill: jax.Array, x: jax.Array) -> jax.Array:
    """The raw fill kernel: float32 ``x`` ``(..., C)``, in place, set to ``fill`` ``(...)`` where
    the bool ``ok`` ``(...)`` is false; untouched (no pass over it) where it is true."""
    _load_error()
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    call = jax.ffi.ffi_call(
        FILL_TARGET, out, vmap_method="broadcast_all", input_output_aliases={2: 0}
    )
    return call(ok, fill, x)


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
            w = np.array([0.5, -1.0, 2.0], np.float32)
            combined, check = jax.jit(combine_call)(args[0], jax.device_put(w, cpu))
    except Exception:
        return False
    return (
        bool(np.allclose(got, want, rtol=1e-5, atol=1e-5))
        and bool(np.allclose(combined, w.astype(np.float64) @ x, rtol=1e-5, atol=1e-5))
        and float(check) == 0.0
    )


def _env() -> str:
    """``MTLOPT_NATIVE``, checked: "" (use the kernel where usable), "0" (off), "1" (required)."""
    return checks.choice("gramian", NATIVE_ENV, os.environ.get(NATIVE_ENV, ""), ("", "0", "1"))


def unusable_reason() -> str | None:
    """Why this process cannot use the kernel, or None where it can (``MTLOPT_NATIVE`` aside)."""
    error = _load_error()
    if error is not None:
        return error
    try:
        cpus = len(jax.devices("cpu"))
    except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS without cpu)
        return "this process has no CPU backend"
    if jax.process_count() > 1:
        return "the process is one of several (jax.distributed): all must compile one program"
    if cpus > 1:
        return (
            f"this process has {cpus} CPU devices (the kernel runs on one; the pure-JAX path "
            "lets XLA split the work over the shards)"
        )
    if not _works():
        return "its check call on a small array failed or gave a wrong answer"
    return None


def available(num_tasks: int | None = None) -> bool:
    """Whether float32 leaves on the CPU go through the kernels in this process (for a Gramian
    of ``num_tasks`` tasks: at most ``MAX_TASKS``).

    Raises a RuntimeError where ``MTLOPT_NATIVE=1`` requires the kernel and it is unusable.
    """
    env = _env()
    if env == "0":
        return False
    reason = unusable_reason()
    if reason is not None:
        if env == "1":
            raise RuntimeError(
                f"mtlopt: {NATIVE_ENV}=1 requires the native CPU kernel, but {reason}. "
                f"Unset {NATIVE_ENV} to fall back to the pure-JAX path, or set it to 0."
            )
        return False
    return num_tasks is None or num_tasks <= MAX_TASKS


def kernel_available() -> bool:
    """Whether mtlopt's CPU Gramian and combination run through its native kernel here.

    True where the optional C++ kernel was built at install time, loads, passes a check call,
    and this process has a single CPU device; False where ``MTLOPT_NATIVE=0`` turns it off or it
    is unusable (then the same maths runs in pure JAX). ``mtlopt._src.native.unusable_reason()``
    says why. Raises a ValueError for a ``MTLOPT_NATIVE`` other than unset, ``0`` or ``1``.

    Examples:
        >>> import mtlopt
        >>> isinstance(mtlopt.native_kernel_available(), bool)
        True
    """
    return _env() != "0" and unusable_reason() is None
