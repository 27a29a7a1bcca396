"""One row per method: how to build it and what it claims. Every shared test runs every row.

A new method adds a row here and inherits the whole contract and property suite.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
import pytest

import mtlopt


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    make: Callable[..., object]  # make(T, **common) -> transformation
    needs_losses: bool = False
    needs_num_tasks: bool = False  # the constructor raises without num_tasks
    order_free: bool = True  # permuting the tasks leaves the update unchanged
    stateful_weights: bool = True  # task_weights(state) is an array when built with num_tasks
    kind: str = "aggregator"  # or "task_transform"
    variant: bool = False  # a second setting of a method above: skipped by the heaviest tests
    # Scale of the update for T = 1 relative to the gradient (None: only the direction).
    t1_scale: Callable[[float], float] | None = lambda loss: 1.0

    @property
    def method(self) -> str:
        """The public name that error messages carry (``mtlopt.<method>: ...``)."""
        for public in ("db_mtl", "cagrad", "mgda", "pcgrad", "mean", "linear"):
            if self.name.startswith(public):
                return public
        return self.name

    def __repr__(self):
        return self.name


def _linear_weights(T):
    return np.linspace(1.0, 2.0, T).astype(np.float32)


ROWS = [
    Row("mean", lambda T, **k: mtlopt.mean(num_tasks=T, **k)),
    Row(
        "linear",
        lambda T, **k: mtlopt.linear(_linear_weights(T), **k),
        order_free=False,
        t1_scale=None,
    ),
    Row(
        "cagrad",
        lambda T, **k: mtlopt.cagrad(c=0.4, num_tasks=T, **k),
        t1_scale=lambda loss: 1.4 / 1.16,
    ),
    Row(
        "cagrad_rescale0",
        lambda T, **k: mtlopt.cagrad(c=0.5, rescale=0, num_tasks=T, **k),
        t1_scale=lambda loss: 1.5,
        variant=True,
    ),
    Row("cagrad_c0", lambda T, **k: mtlopt.cagrad(c=0.0, num_tasks=T, **k), variant=True),
    Row("mgda", lambda T, **k: mtlopt.mgda(num_tasks=T, **k)),
    Row("mgda_l2", lambda T, **k: mtlopt.mgda("l2", num_tasks=T, **k), t1_scale=None, variant=True),
    Row(
        "mgda_loss+",
        lambda T, **k: mtlopt.mgda("loss+", num_tasks=T, **k),
        needs_losses=True,
        t1_scale=None,
        variant=True,
    ),
    Row("pcgrad", lambda T, **k: mtlopt.pcgrad(seed=0, num_tasks=T, **k), order_free=False),
    Row(
        "db_mtl",
        lambda T, **k: mtlopt.db_mtl(T, **k),
        needs_losses=True,
        needs_num_tasks=True,
        t1_scale=lambda loss: 0.1 / (loss + 1e-8),
    ),
]

AGGREGATORS = [r for r in ROWS if r.kind == "aggregator"]
ORDER_FREE = [r for r in AGGREGATORS if r.order_free]
# The heaviest tests (whole training runs) run every method once by default; the variants
# (other settings of the same method) run with -m slow.
HEAVY = [pytest.param(r, marks=pytest.mark.slow) if r.variant else r for r in AGGREGATORS]


@functools.cache
def cached(row: Row, T: int):
    """``(tx, jax.jit(tx.update))`` built once per row and T, so tests share compilations."""
    tx = row.make(T)
    return tx, jax.jit(tx.update)
