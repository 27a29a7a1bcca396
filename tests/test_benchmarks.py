"""The benchmark scripts run: `aggregation.py --quick` and `train_step.py --quick` exit 0 and
time every method."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_aggregation_quick():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aggregation.py"), "--quick", "--repeats", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
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


def test_train_step_quick():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "### Shared-trunk MLP" in out and "### JaxJD's case" in out
    for method in ["mean", "linear", "cagrad", "mgda", "pcgrad", "db_mtl", "task grads only"]:
        assert f"\n| {method} | " in out, f"{method!r} missing from:\n{out}"
    assert "aggregation share" in out
