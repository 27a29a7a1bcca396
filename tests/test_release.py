"""The release: version and changelog agree, the metadata, the native kernel's build (no
warnings, its versions checked against the running jaxlib, its status said), and, with -m slow,
the wheel and the sdist built by ``python -m build`` and installed into fresh virtual
environments, where tests/smoke.py runs every method from outside the source tree.

The slow tests need ``build`` (``pip install build``) and the package registries (each venv
installs jax, optax, chex and numpy; the sdist's isolated build installs its build
requirements). ``MTLOPT_RELEASE_PYTHON`` names the interpreter of the sdist's venv (e.g. the
oldest Python supported); the default is the one running the tests.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile

import jax
import pytest

import mtlopt
from mtlopt._src import native

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL = ROOT / "mtlopt" / "_src" / "csrc" / "kernels.cc"
_COMPILER = (sysconfig.get_config_var("CXX") or "c++").split()[0]
HAVE_COMPILER = shutil.which(_COMPILER) is not None
needs_compiler = pytest.mark.skipif(not HAVE_COMPILER, reason=f"no C++ compiler ({_COMPILER})")
KEEP_A_CHANGELOG = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- version, changelog, metadata ----------------------------------------------------------


def test_version_agrees_with_the_changelog():
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[([^\]]+)\](?: - (\S+))?$", text, re.M)
    assert releases, "CHANGELOG.md has no '## [version] - date' heading"
    versions = [v for v, _ in releases if v != "Unreleased"]
    assert versions[0] == mtlopt.__version__, (versions[0], mtlopt.__version__)
    for version, date in releases:
        if version != "Unreleased":
            assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}|unreleased", date or ""), (version, date)
    # Keep a Changelog's sections only, each under a release.
    sections = re.findall(r"^### (.+)$", text, re.M)
    assert sections and set(sections) <= KEEP_A_CHANGELOG, sections


def test_metadata_classifiers_and_typing():
    project = _pyproject()["project"]
    classifiers = project["classifiers"]
    assert "Typing :: Typed" in classifiers and (ROOT / "mtlopt" / "py.typed").exists()
    tested = {c.rsplit(" :: ", 1)[1] for c in classifiers if re.search(r":: 3\.\d+$", c)}
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert here in tested, f"Python {here} runs the tests but has no classifier"
    low = re.fullmatch(r">=(3\.\d+)", project["requires-python"])[1]
    assert low in tested, "the oldest Python allowed is tested (tests/test_release.py, slow)"
    assert all(tuple(map(int, v.split("."))) >= tuple(map(int, low.split("."))) for v in tested)
    assert not any(c.startswith("License ::") for c in classifiers)  # the SPDX `license` says it


# --- the native kernel's build ---------------------------------------------------------------


@needs_compiler
def test_the_kernel_compiles_without_warnings():
    # The flags of setup.py with -Werror: XLA's headers are system headers (-isystem), this
    # file must not warn. setup.py must not silence warnings (-w).
    assert '"-w"' not in (ROOT / "setup.py").read_text()
    cmd = [_COMPILER, "-std=c++17", "-O3", "-Wall", "-Wextra", "-Werror", "-fsyntax-only"]
    cmd += ["-isystem", jax.ffi.include_dir(), str(KERNEL)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_ffi_version_rule():
    # A jaxlib runs handlers built against its own XLA FFI API version or an older one.
    assert native.version_mismatch((0, 1), "0.5.3", (0, 3), "0.10.2") is None
    assert native.version_mismatch((0, 3), "0.10.2", (0, 3), "0.10.2") is None
    assert native.version_mismatch((0, 3), "0.10.2", None, "0.10.2") is None  # XLA decides
    newer = native.version_mismatch((0, 3), "0.10.2", (0, 1), "0.5.3")
    assert "XLA FFI API 0.3 (jaxlib 0.10.2's headers)" in newer
    assert "jaxlib 0.5.3 (FFI API 0.1) cannot run" in newer and "--no-binary mtlopt" in newer
    assert native.version_mismatch((1, 0), "9", (0, 3), "0.10.2") is not None


@needs_compiler
def test_the_kernel_was_built_against_the_running_jaxlib():
    # This checkout's install (pip install -e) built it against the jaxlib that runs it.
    import jaxlib

    info = native.build_info()
    assert info is not None, "no kernel built, or an old build: pip install -e . again"
    assert info == (jaxlib.__version__, native.runtime_ffi_api())


@needs_compiler
def test_status_says_which_path_and_logs_it_once(monkeypatch, caplog):
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    status = native.status()
    assert status.startswith("native kernel:") and "XLA FFI API" in status
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.status() == "pure JAX: MTLOPT_NATIVE=0 turns the native kernel off"
    monkeypatch.delenv(native.NATIVE_ENV)
    native._log_once.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="mtlopt"):
        assert native.available() and native.available(4)
    assert [r.getMessage() for r in caplog.records if r.name == "mtlopt"] == [status]


@needs_compiler  # (where a compiler is found, the install built the kernel: no kernel fails)
def test_a_kernel_built_against_a_newer_ffi_api_is_not_registered(monkeypatch, caplog):
    # The check runs before registration: a jaxlib whose FFI API is older than the headers the
    # kernel was built with never sees the handlers (jaxlib 0.5.3 failed its CPU backend's
    # start on such a registration). Here: the running FFI API made to look older.
    info = native.build_info()
    assert info is not None, "no kernel built, or an old build: pip install -e . again"
    jaxlib_version, (major, minor) = info
    monkeypatch.setattr(native, "runtime_ffi_api", lambda: (major, minor - 1))
    registered = []
    monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda *a, **k: registered.append(a))
    native._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="mtlopt"):
        reason = native._load_error.__wrapped__()
    assert not registered
    assert f"XLA FFI API {major}.{minor} (jaxlib {jaxlib_version}'s headers)" in reason
    (record,) = [r for r in caplog.records if r.name == "mtlopt"]
    assert record.levelno == logging.WARNING and reason in record.getMessage()
    native._log_once.cache_clear()


# --- the wheel and the sdist, installed (slow) -----------------------------------------------


class _Timer:
    """Seconds per step, printed at the end of each slow test (pytest -s shows them)."""

    def __init__(self):
        self.steps: list[tuple[str, float]] = []

    def run(self, label, cmd, **kwargs):
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
        self.steps.append((label, time.perf_counter() - start))
        assert out.returncode == 0, f"{label} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        return out

    def report(self):
        for label, seconds in self.steps:
            print(f"  {label}: {seconds:.1f} s")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MTLOPT_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("the release tests need `build`: pip install build")
    out = tmp_path_factory.mktemp("dist")
    timer = _Timer()
    timer.run("python -m build", [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    timer.report()
    (sdist,) = out.glob("mtlopt-*.tar.gz")
    (wheel,) = out.glob("mtlopt-*.whl")
    return sdist, wheel


def _venv(path, python, timer):
    timer.run("venv", [python, "-m", "venv", str(path)])
    return str(path / "bin" / "python")


def _smoke(python, where, expect, timer, **env):
    # From outside the checkout, with the script's folder off sys.path (-I): the installed
    # mtlopt, nothing of the source tree.
    script = where / "smoke.py"
    shutil.copy(ROOT / "tests" / "smoke.py", script)
    out = timer.run(
        "smoke",
        [python, "-I", str(script), "--expect", expect],
        cwd=where,
        env=_clean_env(**env),
    )
    print(out.stdout)
    installed = re.search(r"^mtlopt \S+ from (.+)$", out.stdout, re.M)[1]
    assert str(ROOT) not in installed and "site-packages" in installed, installed
    return out.stdout


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_passes_the_smoke_test(dist, tmp_path):
    _, wheel = dist
    names = zipfile.ZipFile(wheel).namelist()
    assert "mtlopt/py.typed" in names
    kernel = [n for n in names if re.fullmatch(r"mtlopt/_src/csrc/_kernels.*\.so", n)]
    assert bool(kernel) == HAVE_COMPILER, names
    assert not any(n.startswith("tests/") for n in names)
    timer = _Timer()
    python = _venv(tmp_path / "venv", sys.executable, timer)
    timer.run("pip install wheel", [python, "-m", "pip", "install", "-q", str(wheel)])
    out = _smoke(python, tmp_path, "native" if HAVE_COMPILER else "pure", timer)
    timer.report()
    shutil.rmtree(tmp_path / "venv")  # ~600 MB each
    if HAVE_COMPILER:
        import jaxlib

        assert f"built against jaxlib {jaxlib.__version__}'s headers" in out


@pytest.mark.slow
def test_sdist_installs_without_a_compiler_and_uses_pure_jax(dist, tmp_path):
    sdist, _ = dist
    listing = subprocess.run(["tar", "tzf", str(sdist)], capture_output=True, text=True).stdout
    for name in ("CHANGELOG.md", "LICENSE", "mtlopt/_src/csrc/kernels.cc", "mtlopt/py.typed"):
        assert f"/{name}" in listing, name
    assert "/tests/" not in listing and ".so" not in listing
    timer = _Timer()
    oldest = os.environ.get("MTLOPT_RELEASE_PYTHON", sys.executable)
    python = _venv(tmp_path / "venv", oldest, timer)
    # No C++ compiler: every compiler variable setuptools reads points at /bin/false.
    none = {k: "/bin/false" for k in ("CC", "CXX", "LDSHARED", "LDCXXSHARED")}
    out = timer.run(
        "pip install sdist (no compiler)",
        [python, "-m", "pip", "install", "-v", str(sdist)],
        env=_clean_env(**none),
    )
    log = out.stdout + out.stderr  # (pip prints the build's output on stderr)
    assert "building 'mtlopt._src.csrc._kernels' extension" in log
    assert 'building extension "mtlopt._src.csrc._kernels" failed' in log  # and went on
    smoke = _smoke(python, tmp_path, "pure", timer)
    timer.report()
    shutil.rmtree(tmp_path / "venv")  # ~600 MB each
    assert "Gramian path: pure JAX: the kernel library was not built" in smoke


@pytest.mark.slow
@needs_compiler
def test_sdist_builds_the_kernel_against_the_installed_older_jaxlib(dist, tmp_path):
    # An environment that pins an older jax: pip's isolated build gets the newest jaxlib, but
    # the kernel is built against the installed one's headers, and runs.
    sdist, _ = dist
    timer = _Timer()
    python = _venv(tmp_path / "venv", sys.executable, timer)
    pins = ["jax==0.5.3", "jaxlib==0.5.3"]
    timer.run("pip install jax 0.5.3", [python, "-m", "pip", "install", "-q", *pins])
    out = timer.run("pip install sdist", [python, "-m", "pip", "install", "-v", str(sdist), *pins])
    assert "building the CPU kernel against jaxlib 0.5.3's headers" in out.stdout + out.stderr
    smoke = _smoke(python, tmp_path, "native", timer)
    timer.report()
    shutil.rmtree(tmp_path / "venv")  # ~600 MB each
    assert "built against jaxlib 0.5.3's headers, XLA FFI API 0.1" in smoke
