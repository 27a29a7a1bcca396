"""Sharded updates equal single-device ones, on 4 simulated CPU devices (in a subprocess,
since the device count is fixed when JAX starts).

Skeleton-only (the compiler reduces the Gramian across shards, the update keeps the params'
sharding): by default on the representative rows (``Row.representative``), every other
aggregator with -m slow.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.registry import AGGREGATORS, REPRESENTATIVES

HERE = pathlib.Path(__file__).resolve().parent


def _check(rows):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharding_check.py"), *[r.name for r in rows]],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for row in rows:
        assert f"{row.name}: ok" in out, out


def test_sharded_update_equals_single_device():
    _check(REPRESENTATIVES)


@pytest.mark.slow
def test_sharded_update_equals_single_device_every_row():
    _check([r for r in AGGREGATORS if not r.representative])
