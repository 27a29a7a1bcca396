"""Strict JAX settings for the whole suite, and hypothesis profiles (derandomized in CI)."""

import os
import tempfile

import jax
import pytest

# Many tests build the same method with the same shapes: share their compilations through
# JAX's persistent cache (a fresh directory per run unless MTLOPT_TEST_CACHE names one).
# pytest-xdist's workers share PYTEST_XDIST_TESTRUNUID, so they share the directory too.
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
_cache = os.environ.get("MTLOPT_TEST_CACHE") or os.path.join(
    tempfile.gettempdir(), f"mtlopt-jax-cache-{_run}"
)
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

try:
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40)
    settings.register_profile("dev", deadline=None, max_examples=40)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # hypothesis is in the test extra; tests that need it import it
    pass


@pytest.fixture(autouse=True)
def _no_x64_leak():
    yield
    assert not jax.config.jax_enable_x64, "a test left jax_enable_x64 on"


# Compilations per test: every XLA backend compile (a persistent-cache hit is not one) is
# counted and, with MTLOPT_COMPILE_REPORT=FILE, written as a JSON line per test (nodeid,
# compiles, seconds), so the cost of a registry row can be measured (tests/cost_report.py).
_compiles = [0]


def _count(name, *args, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    import json
    import time

    before, start = _compiles[0], time.perf_counter()
    yield
    item.user_properties.append(("compiles", _compiles[0] - before))
    report = os.environ.get("MTLOPT_COMPILE_REPORT")
    if report:
        with open(report, "a") as f:
            line = {"id": item.nodeid, "compiles": _compiles[0] - before,
                    "seconds": round(time.perf_counter() - start, 3)}
            f.write(json.dumps(line) + "\n")
