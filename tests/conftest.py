"""Strict JAX settings for the whole suite, and hypothesis profiles (derandomized in CI)."""

import collections
import contextlib
import json
import os
import tempfile
import time

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


# XLA programs per test. JAX reports every program it builds for a backend (the
# backend_compile_duration event), whether XLA compiled it or the persistent cache above had it
# (a cache_hits event): "programs" counts both, "compiles" only the real backend compiles.
# Each test's counts travel in its report's user_properties (through pytest-xdist too) with
# its registry row; with MTLOPT_COMPILE_REPORT=FILE they are also written as one JSON line per
# test (tests/cost_report.py sums them per row).
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_counts = collections.Counter()


def _count_duration(name, *args, **kwargs):
    if name == _BACKEND_COMPILE:
        _counts["programs"] += 1


def _count_event(name, *args, **kwargs):
    if name == _CACHE_HIT:
        _counts["hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_duration)
jax.monitoring.register_event_listener(_count_event)


def _row_of(item):
    row = getattr(item, "callspec", None) and item.callspec.params.get("row")
    return getattr(row, "name", None), bool(getattr(row, "representative", ""))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before, start = dict(_counts), time.perf_counter()
    yield
    programs = _counts["programs"] - before.get("programs", 0)
    compiles = programs - (_counts["hits"] - before.get("hits", 0))
    row, representative = _row_of(item)
    slow = item.get_closest_marker("slow") is not None
    item.user_properties += [("compiles", compiles), ("programs", programs), ("slow", slow)]
    if row is not None:
        item.user_properties += [("row", row), ("representative", representative)]
    report = os.environ.get("MTLOPT_COMPILE_REPORT")
    if report:
        line = {"id": item.nodeid, "row": row, "compiles": compiles, "programs": programs,
                "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
        with open(report, "a") as f:
            f.write(json.dumps(line) + "\n")


@pytest.fixture(scope="session")
def batch_warm_up():
    """Builds tests/batch.py's programs once per worker for a row outside the registry
    (``mean``), so that the small eager programs every row shares (inits, casts) are compiled
    in this set-up, not in the first registry row's tests: each row's count is its own."""
    import mtlopt
    from tests import batch
    from tests.registry import Row

    batch.results(Row("warm-up", lambda T, **k: mtlopt.mean(**{"num_tasks": T, **k})))
    # The key's small programs (split, key data) too, or the first seeded row on a worker pays
    # them (measured: gradvac's count 13 or 21 depending on the worker it landed on).
    seeded = lambda T, **k: mtlopt.pcgrad(**{"seed": 0, "num_tasks": T, **k})
    warm_seeded = Row("warm-up-seeded", seeded, order_free=False, seeded=True)
    batch.results(warm_seeded)
    # The seeded rows' training test: its eager programs (measured: rlw's 12, 25 in all).
    from tests.test_training import test_determinism_and_independent_seeds

    # It trains on scikit-learn's digits; where they are missing it skips, as the test does: a
    # warm-up never skips the tests that use it.
    with contextlib.suppress(pytest.skip.Exception):
        test_determinism_and_independent_seeds(warm_seeded)
    # The one-pass test's and the missing-losses test's small programs (the first loss-weighting
    # row on a worker paid them: gls 25, stch 22).
    from tests.test_contract import test_missing_losses_is_an_error
    from tests.test_one_pass import test_one_pass_matches_the_task_grads_mode

    mean = lambda T, **k: mtlopt.mean(**{"num_tasks": T, **k})
    test_one_pass_matches_the_task_grads_mode(Row("warm-up-one-pass", mean, one_pass=True))
    gls = lambda T, **k: mtlopt.gls(**{"num_tasks": T, **k})
    test_missing_losses_is_an_error(Row("gls", gls, needs_losses=True))


# The compile budget. Adding a method adds a registry row, and every row costs the XLA programs
# of its tests: here 3 (tests/batch.py: the plain jitted update, the vmapped scenario program,
# the side program), plus 6-8 in tests/test_native.py (measured: 9-12 per row in all). A row
# whose default-suite tests (not -m slow) build more programs than this fails the run, so that
# a test that compiles per row and per case (rather than adding a scenario to tests/batch.py)
# is caught when it lands, not when the suite has become slow. Counted as programs (compiles +
# persistent-cache hits): the same number whatever the cache held. The small eager programs
# that every row shares are built first, outside any row's tests (the batch_warm_up fixture).
ROW_PROGRAM_BUDGET = 20
# Representative rows (Row.representative) also run the skeleton-only tests (training,
# checkpoints, donation, memory, apply_if_finite, large leaves; measured: 35-77 programs in
# all, the most for the first representative row on a worker): this many more.
REPRESENTATIVE_PROGRAM_EXTRA = 60
_row_programs: collections.Counter = collections.Counter()
_representative: set = set()


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    props = dict(report.user_properties)
    if props.get("row") is None or props.get("slow"):
        return
    _row_programs[props["row"]] += props.get("programs", 0)
    if props.get("representative"):
        _representative.add(props["row"])


def _over_budget():
    out = []
    for row, n in sorted(_row_programs.items()):
        limit = ROW_PROGRAM_BUDGET + (REPRESENTATIVE_PROGRAM_EXTRA if row in _representative else 0)
        if n > limit:
            out.append((row, n, limit))
    return out


def _is_worker(config):
    return hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if not _is_worker(session.config) and _over_budget() and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _is_worker(config) or not _row_programs:
        return
    over = _over_budget()
    tr = terminalreporter
    if over:
        tr.section("compile budget exceeded", sep="=", red=True, bold=True)
        for row, n, limit in over:
            tr.line(
                f"registry row {row!r}: its default-suite tests built {n} XLA programs, over "
                f"the budget of {limit} (tests/conftest.py ROW_PROGRAM_BUDGET): batch new "
                "per-row checks into tests/batch.py's scenarios instead of compiling per test",
                red=True,
            )
    else:
        worst = max(_row_programs.items(), key=lambda kv: kv[1])
        tr.write_line(
            f"compile budget: {len(_row_programs)} rows within {ROW_PROGRAM_BUDGET} XLA "
            f"programs each (+{REPRESENTATIVE_PROGRAM_EXTRA} for representatives); most: "
            f"{worst[0]} {worst[1]}"
        )
