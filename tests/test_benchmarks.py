"""The benchmark scripts run: each one's `--quick` mode exits 0 and times every method.

Marked slow (92 s of the README command's run, mostly compiling): `.ci/run` runs them as a step
of their own, `python -m pytest -q -m slow tests/test_benchmarks.py`, outside the 10-minute
test command. One fast check (no training) stays in it: the MultiDigits runner has a row for
every public method of mtlopt."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_aggregation_quick():
    out = _run("aggregation.py", "--repeats", "3")
    for label in [
        "mean()",
        "linear(w)",
        "cagrad()",
        "cagrad(num_tasks=T)",
        "mgda()",
        "mgda(num_tasks=T)",
        "pcgrad()",
        "db_mtl(T)",
        "log_transform()",
        "mtlopt.gramian(grads)",
        "mtlopt.combine(w, grads)",
        "numpy w @ J",
        "numpy J @ J.T",
    ]:
        assert f"\n{label} " in out, f"{label!r} missing from:\n{out}"
    assert "targets:" in out


@pytest.mark.slow
def test_train_step_quick():
    out = _run("train_step.py", "--steps", "2", "--malloc", "retain")
    assert "malloc retaining freed memory" in out
    assert "### Shared-trunk MLP" in out and "### JaxJD's case" in out
    for method in ["mean", "linear", "cagrad", "mgda", "pcgrad", "db_mtl", "task grads only"]:
        assert f"\n| {method} | " in out, f"{method!r} missing from:\n{out}"
    assert "aggregation share" in out


@pytest.mark.slow
def test_gramian_route_quick():
    out = _run("gramian_route.py", "--steps", "2")
    assert "| mgda |" in out and "route temp xP" in out


@pytest.mark.slow
def test_one_pass_quick():
    from tests.registry import ROWS

    out = _run("one_pass.py", "--steps", "2")
    assert "### Shared-trunk MLP" in out and "one pass / plain" in out and "Style:" in out
    # Every registry row that claims one backward pass is found and timed, both ways.
    for method in sorted({r.method for r in ROWS if r.one_pass}):
        line = next((s for s in out.splitlines() if s.startswith(f"| `{method}(")), None)
        assert line is not None, f"{method!r} missing from:\n{out}"
        assert line.count("n/a") == 0, line


@pytest.mark.slow
def test_donation_quick():
    out = _run("donation.py")
    for label in ["db_mtl(T)", "mean()", "cagrad()"]:
        assert f"| `{label}` |" in out, f"{label!r} missing from:\n{out}"


def _multidigits_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "multidigits_bench", ROOT / "benchmarks" / "multidigits.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def test_multidigits_covers_every_method():
    # Fast (no training): every public method of mtlopt has a row in the MultiDigits runner, so
    # a new method cannot be left out of the benchmark. A public name that is not a method goes
    # into the runner's NOT_METHODS.
    md = _multidigits_module()
    covered = {name for m in md.METHODS for name in m.covers}
    missing = md.public_methods() - covered
    assert not missing, f"benchmarks/multidigits.py has no row for {sorted(missing)}"
    assert set(md.QUICK_METHODS) <= {m.name for m in md.METHODS}
    assert len({m.name for m in md.METHODS}) == len(md.METHODS)


@pytest.mark.slow
def test_multidigits_quick(tmp_path):
    args = ["--methods", "mean,cagrad", "--seeds", "1", "--epochs", "1", "--n-train", "512"]
    out = _run("multidigits.py", *args, "--n-test", "200", "--tasks", "4", "--out", str(tmp_path))
    assert "## T = 4: left, right, sum, left>right" in out
    for row in ["| single-task baselines |", "| `mean` |", "| `cagrad` |"]:
        assert row in out, f"{row!r} missing from:\n{out}"
    assert "Δm% ↑" in out and "compile s" in out
    assert (tmp_path / "multidigits.md").read_text().startswith("# MultiDigits")
    for png in ["multidigits_metrics.png", "multidigits_tradeoff.png"]:
        assert (tmp_path / png).stat().st_size > 0
