"""Builds mtlopt's optional CPU kernel (mtlopt/_src/csrc/kernels.cc); everything else is in
pyproject.toml.

The kernel is optional: without a C++ compiler, or without jaxlib's XLA FFI headers, the build
prints a warning, installs the pure-Python package, and mtlopt runs its pure-JAX Gramian instead
(mtlopt/_src/native.py decides at run time). ``MTLOPT_BUILD_NATIVE=0`` skips the build.

Which jaxlib's headers: a jaxlib runs FFI handlers built against its own XLA FFI API version or
an older one, not a newer one. pip builds in an isolated environment holding the newest jaxlib
that the build requirement allows, which may be newer than the jaxlib of the environment mtlopt
is installed into (one that pins an older jax). So where that environment already has jaxlib
(its site-packages, which pip's isolation hides from imports but not from ``sysconfig``), the
kernel is built against its headers: those of the jaxlib that will run it. Otherwise (a fresh
environment, where pip installs jaxlib beside mtlopt; ``python -m build``) the build
requirement's headers are used, and they are also the fallback where the installed jaxlib's
headers do not compile the kernel. The jaxlib release and FFI API version are compiled into the
library, and mtlopt/_src/native.py checks them against the running jaxlib before it registers
the kernel (a mismatch falls back to pure JAX and says why).
"""

import importlib.metadata
import os
import re
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, LinkError

_HEADER = os.path.join("xla", "ffi", "api", "ffi.h")


def _with_headers(version, include):
    ok = os.path.exists(os.path.join(include, _HEADER))
    return (re.sub(r"[^0-9A-Za-z.+_-]", "", version), include) if ok else None


def _target_jaxlib():
    """(version, include dir) of the jaxlib installed where mtlopt is being installed."""
    paths = sorted({sysconfig.get_path("platlib"), sysconfig.get_path("purelib")})
    for dist in importlib.metadata.distributions(path=paths):
        if (dist.metadata["Name"] or "").lower() == "jaxlib":
            return _with_headers(dist.version, str(dist.locate_file("jaxlib/include")))
    return None


def _build_jaxlib():
    """(version, include dir) of the importable jaxlib: the build requirement (pyproject.toml)
    in an isolated build, the environment's own with ``--no-build-isolation``."""
    try:
        import jaxlib
    except ImportError:
        return None
    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    return _with_headers(importlib.metadata.version("jaxlib"), include)


def _candidates():
    """The headers to try, in order: the target environment's jaxlib, then the importable one."""
    found = []
    for candidate in (_target_jaxlib(), _build_jaxlib()):
        if candidate is not None and candidate not in found:
            found.append(candidate)
    return found


def _flags(version, include):
    return {
        "define_macros": [("MTLOPT_JAXLIB_VERSION", f'"{version}"')],
        # XLA's headers as system headers (-isystem): the warnings they raise (a switch with no
        # default return, a signed/unsigned comparison) are XLA's, not ours; this file itself
        # compiles without a warning under -Wall -Wextra (tests/test_release.py builds it with
        # -Werror).
        "extra_compile_args": [
            "-std=c++17",
            "-O3",
            "-ffp-contract=fast",
            "-Wall",
            "-Wextra",
            "-isystem",
            include,
        ],
    }


class _BuildKernel(build_ext):
    """Builds the kernel against the first headers that compile it (an older jaxlib's may lack
    what it uses; the next candidate is then tried). Where none does, the extension is optional:
    setuptools warns and installs the package without it."""

    def build_extension(self, ext):
        candidates = _candidates()
        for i, (version, include) in enumerate(candidates):
            for key, value in _flags(version, include).items():
                setattr(ext, key, value)
            print(f"mtlopt: building the CPU kernel against jaxlib {version}'s headers ({include})")
            try:
                return super().build_extension(ext)
            except (CCompilerError, CompileError, LinkError):
                if i + 1 == len(candidates):
                    raise
                print(f"mtlopt: jaxlib {version}'s headers did not compile it; trying the next")
        return None


def _extensions():
    if os.environ.get("MTLOPT_BUILD_NATIVE", "1") == "0" or os.name != "posix":
        return []
    if not _candidates():
        print("mtlopt: no jaxlib with XLA's FFI headers; the CPU kernel is not built")
        return []
    return [
        Extension(
            # Loaded with ctypes and registered with jax.ffi, never imported as a module: it sits
            # in mtlopt/_src/csrc/, a folder that is not a package, so that module walkers
            # (doctest collection, pkgutil) do not try to import it.
            "mtlopt._src.csrc._kernels",
            sources=["mtlopt/_src/csrc/kernels.cc"],
            language="c++",
            optional=True,
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": _BuildKernel})
