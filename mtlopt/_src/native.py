"""The optional CPU Gramian kernel (``csrc/kernels.cc``), called through ``jax.ffi``.

Built by ``pip install`` where a C++ compiler is found (``setup.py``); absent otherwise, and then
mtlopt computes every Gramian in pure JAX (``tree._cpu_gramian``'s loops), with the same results
to float32 rounding. :func:`available` says whether this process uses it: the library was
built, ``jax.ffi.ffi_call`` exists (not in jax 0.4.30), the library was built against an XLA
FFI API that this jaxlib runs (see below), it registers, a one-off check call gives the right
answer, the process has a single CPU device (with several, e.g. sharded params, the pure-JAX
loops let the compiler split the Gramian over the shards; an FFI call would gather them), and
``MTLOPT_NATIVE`` is not ``0``. ``MTLOPT_NATIVE=1`` requires the kernel: tracing a CPU
Gramian or combination then raises a RuntimeError that says why the kernel is unusable, instead
of falling back. The variable is read (and checked) on every trace.
:func:`kernel_available` is the public question (``mtlopt.native_kernel_available``) and
:func:`status` the public answer with its reason (``mtlopt.native_kernel_status``); the decision
is also logged once, at debug level, on the ``"mtlopt"`` logger, and a library that was built
but cannot run here (a load, registration or check failure) logs a warning once.

Versions: a jaxlib runs FFI handlers built against its own XLA FFI API version or an older
one. The library records the FFI API version and the jaxlib release of the headers it was
built with (``setup.py`` builds against the jaxlib of the environment being installed into
where there is one); before registering, that is compared with the FFI API of the running
jaxlib (read from the headers it ships, ``jax.ffi.include_dir()``). A library built against a
newer FFI API is not registered: the pure-JAX path runs, and the reason names both versions.
(XLA would reject it: at once where the CPU backend has started, and otherwise when it starts,
which then fails; a standalone jaxlib 0.5.3 process did. The CPU backend is therefore started
before any registration.)

It also holds the combination kernel (``w @ J`` with a finiteness check in the same read, see
``tree.combine_checked``) and an in-place fill for the non-finite guard (``tree.fill_unless``).

The kernel takes a float32 ``(..., T, C)`` array and a scale per leading index, and returns the
``(..., T, T)`` Gramian of ``scale * x`` in float32, accumulated in double across column panels.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import pathlib
import re
from typing import cast

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

logger = logging.getLogger("mtlopt")
_REINSTALL = (
    "reinstall mtlopt from source in this environment to build it against the jaxlib here "
    "(pip install --force-reinstall --no-deps --no-binary mtlopt mtlopt; in a checkout: "
    "pip install -e .)"
)
_NOT_BUILT = (
    "the kernel library was not built (pip install without a C++ compiler or with "
    "MTLOPT_BUILD_NATIVE=0; reinstall with a compiler)"
)


@functools.cache
def _log_once(level: int, message: str) -> None:
    logger.log(level, "%s", message)


def _broken(reason: str) -> str:
    """``reason``, after a warning (once): a library that was built cannot run here."""
    _log_once(
        logging.WARNING,
        f"mtlopt: the native CPU kernel was built but cannot run here: {reason}. The pure-JAX "
        "Gramian runs instead (the same results; slower on large models on the CPU).",
    )
    return reason


def _first_line(e: Exception) -> str:
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line[:300]}"


def runtime_ffi_api() -> tuple[int, int] | None:
    """The XLA FFI API version ``(major, minor)`` of the running jaxlib, read from the headers it
    ships (``jax.ffi.include_dir()``); None where it ships none."""
    try:
        text = pathlib.Path(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h").read_text()
    except (AttributeError, OSError):
        return None
    major = re.search(r"#define XLA_FFI_API_MAJOR\s+(\d+)", text)
    minor = re.search(r"#define XLA_FFI_API_MINOR\s+(\d+)", text)
    return (int(major[1]), int(minor[1])) if major and minor else None


def version_mismatch(
    built: tuple[int, int],
    built_jaxlib: str,
    runtime: tuple[int, int] | None,
    runtime_jaxlib: str,
) -> str | None:
    """Why a library built against XLA FFI API ``built`` (jaxlib ``built_jaxlib``'s headers)
    cannot run under jaxlib ``runtime_jaxlib``, whose FFI API is ``runtime``; None where it can
    (the same major version, a minor one no newer), or where ``runtime`` is unknown (then XLA's
    own check at registration decides)."""
    if runtime is None or (built[0] == runtime[0] and built[1] <= runtime[1]):
        return None
    return (
        f"it was built against XLA FFI API {built[0]}.{built[1]} (jaxlib {built_jaxlib}'s "
        f"headers), which jaxlib {runtime_jaxlib} (FFI API {runtime[0]}.{runtime[1]}) cannot "
        f"run; {_REINSTALL}"
    )


def _library_path() -> pathlib.Path | None:
    # Built by setup.py into the folder csrc/ beside this module (not a package).
    found = sorted((pathlib.Path(__file__).parent / "csrc").glob("_kernels*.so"))
    return found[0] if found else None


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library, or why it could not be loaded."""
    path = _library_path()
    if path is None:
        return _NOT_BUILT
    try:
        return ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        return _broken(f"{path.name} could not be loaded ({_first_line(e)})")


@functools.cache
def build_info() -> tuple[str, tuple[int, int]] | None:
    """``(jaxlib release, (FFI API major, minor))`` of the headers that the built library was
    compiled with; None where no library loads or it records none (an older mtlopt's build)."""
    lib = _library()
    if isinstance(lib, str):
        return None
    try:
        lib.MtloptBuildJaxlib.restype = ctypes.c_char_p
        api = (int(lib.MtloptFfiApiMajor()), int(lib.MtloptFfiApiMinor()))
        return lib.MtloptBuildJaxlib().decode(), api
    except AttributeError:
        return None


@functools.cache
def _load_error() -> str | None:
    """Loads the library and registers its handlers once per process; why not, where it cannot."""
    ffi = getattr(jax, "ffi", None)
    if ffi is None or not hasattr(ffi, "ffi_call"):
        return f"jax {jax.__version__} has no jax.ffi.ffi_call"
    lib = _library()
    if isinstance(lib, str):
        return lib
    info = build_info()
    if info is None:
        return _broken(f"the library records no build versions (an older mtlopt's); {_REINSTALL}")
    import jaxlib

    running = getattr(jaxlib, "__version__", "?")
    mismatch = version_mismatch(info[1], info[0], runtime_ffi_api(), running)
    if mismatch is not None:
        return _broken(mismatch)
    try:
        # The CPU backend first: a handler registered before it starts is registered by the
        # backend's start, where a rejection by XLA fails the whole backend (seen with jaxlib
        # 0.5.3), not this call.
        jax.devices("cpu")
    except RuntimeError:
        return "this process has no CPU backend"
    try:
        for target, handler in (
            (_TARGET, lib.MtloptGramian),
            (COMBINE_TARGET, lib.MtloptCombine),
            (FILL_TARGET, lib.MtloptFillUnless),
        ):
            ffi.register_ffi_target(target, ffi.pycapsule(handler), platform="cpu")
    except Exception as e:  # a foreign build, or one that XLA's own version check rejects
        return _broken(f"the library could not be registered ({_first_line(e)})")
    return None


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
    out = jax.ffi.ffi_call(COMBINE_TARGET, outs, vmap_method="expand_dims")(x, w)
    return cast("tuple[jax.Array, jax.Array]", out)  # the container of ``outs``


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
def _check_error() -> str | None:
    """One small call checked against numpy, run now even inside a caller's trace; what went
    wrong, or None."""
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
    except Exception as e:
        return _broken(f"its check call on a small array failed ({_first_line(e)})")
    if not (
        np.allclose(got, want, rtol=1e-5, atol=1e-5)
        and np.allclose(combined, w.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)
        and float(check) == 0.0
    ):
        return _broken("its check call on a small array gave a wrong answer")
    return None


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
    return _check_error()


def available(num_tasks: int | None = None) -> bool:
    """Whether float32 leaves on the CPU go through the kernels in this process (for a Gramian
    of ``num_tasks`` tasks: at most ``MAX_TASKS``).

    Raises a RuntimeError where ``MTLOPT_NATIVE=1`` requires the kernel and it is unusable.
    """
    env = _env()
    if env == "0":
        _log_once(logging.DEBUG, _status_line(env, None))
        return False
    reason = unusable_reason()
    _log_once(logging.DEBUG, _status_line(env, reason))
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

    True where the optional C++ kernel was built at install time against an XLA FFI API that
    this jaxlib runs, loads, passes a check call, and this process has a single CPU device;
    False where ``MTLOPT_NATIVE=0`` turns it off or it is unusable (then the same maths runs in
    pure JAX). :func:`mtlopt.native_kernel_status` says why. Raises a ValueError for a
    ``MTLOPT_NATIVE`` other than unset, ``0`` or ``1``.

    Examples:
        >>> import mtlopt
        >>> isinstance(mtlopt.native_kernel_available(), bool)
        True
    """
    return _env() != "0" and unusable_reason() is None


def _status_line(env: str, reason: str | None) -> str:
    if env == "0":
        return f"pure JAX: {NATIVE_ENV}=0 turns the native kernel off"
    if reason is not None:
        return f"pure JAX: {reason}"
    jaxlib_version, api = build_info() or ("unknown", (0, 0))
    return (
        f"native kernel: float32 CPU Gramians of up to {MAX_TASKS} tasks (built against jaxlib "
        f"{jaxlib_version}'s headers, XLA FFI API {api[0]}.{api[1]})"
    )


def status() -> str:
    """Which path computes mtlopt's Gramians and combinations on the CPU here, and why.

    One line, for logs and bug reports: ``"native kernel: ..."`` where the optional C++ kernel
    runs (with the jaxlib release and XLA FFI API version it was built against), or
    ``"pure JAX: <reason>"`` where it does not: ``MTLOPT_NATIVE=0``, no kernel built (no C++
    compiler at install time), a jax without ``jax.ffi``, a kernel built against a newer XLA FFI
    API than this jaxlib's, several CPU devices, ... The same line is logged once, at debug
    level, on the ``"mtlopt"`` logger when a program first asks for a CPU Gramian; a kernel
    that was built but cannot run here also logs a warning once. Raises a ValueError for a
    ``MTLOPT_NATIVE`` other than unset, ``0`` or ``1``.

    Examples:
        >>> import mtlopt
        >>> mtlopt.native_kernel_status().startswith(("native kernel:", "pure JAX:"))
        True
    """
    env = _env()
    return _status_line(env, None if env == "0" else unusable_reason())
