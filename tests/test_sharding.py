"""Sharded updates equal single-device ones, on 4 simulated CPU devices (in a subprocess,
since the device count is fixed when JAX starts)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from tests.registry import ROWS

HERE = pathlib.Path(__file__).resolve().parent


def test_sharded_update_equals_single_device():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharding_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for row in [r for r in ROWS if not r.variant]:
        assert f"{row.name}: ok" in out, out
