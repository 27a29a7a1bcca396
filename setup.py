"""Builds mtlopt's optional CPU kernel (mtlopt/_src/csrc/kernels.cc); everything else is in
pyproject.toml.

The kernel is optional: without a C++ compiler, or without jaxlib's XLA FFI headers, the build
prints a warning, installs the pure-Python package, and mtlopt runs its pure-JAX Gramian instead
(mtlopt/_src/native.py decides at run time). ``MTLOPT_BUILD_NATIVE=0`` skips the build.
"""

import os

from setuptools import Extension, setup


def _ffi_include_dir():
    # jaxlib ships XLA's FFI headers (jax.ffi.include_dir()); it is a build requirement in
    # pyproject.toml, so pip's isolated build environment has it.
    try:
        import jaxlib
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    return path if os.path.exists(os.path.join(path, "xla", "ffi", "api", "ffi.h")) else None


def _extensions():
    include = _ffi_include_dir()
    if os.environ.get("MTLOPT_BUILD_NATIVE", "1") == "0" or include is None or os.name != "posix":
        return []
    return [
        Extension(
            # Loaded with ctypes and registered with jax.ffi, never imported as a module: it sits
            # in mtlopt/_src/csrc/, a folder that is not a package, so that module walkers
            # (doctest collection, pkgutil) do not try to import it.
            "mtlopt._src.csrc._kernels",
            sources=["mtlopt/_src/csrc/kernels.cc"],
            include_dirs=[include],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=fast", "-w"],
            optional=True,
        )
    ]


setup(ext_modules=_extensions())
