"""Accuracy of the in-jit solves of FairGrad and PCD against independent float64 solves.

    python benchmarks/solver_residuals.py [--T 2 3 5 10 64] [--seeds 4]

For each T and dtype, over the problem kinds of ``tests/test_fair.py`` (random, conflicting,
collinear, scaled, a zero task; for PCD also rank-deficient, duplicated and infeasible ones):

* FairGrad (alpha 0.5, 1, 2, 5): the worst relative error of the update against the float64
  Newton solve of ``G w = w^(-1/alpha)`` (``|d - d*| / |d*|``, first step and the warm-started
  second step), the worst residual ``max_t |(G w)_t w_t^(1/alpha) - 1|`` of the returned
  weights on the non-singular problems, and the Newton steps taken.
* PCD (tau 0.2): the worst relative error of the update against scipy's SLSQP solve of the
  QP (tests/test_fair.py's ``pcd_reference``), by kind.

Prints one line per (method, T, dtype); run from the repository root (it imports the
references from tests/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import test_fair as tf


def fairgrad(T: int, dtype: str, seeds: int) -> str:
    rows, s1, s2 = tf._errors(T, dtype, range(seeds))
    worst = max(r[4] for r in rows)
    cases = [(k, a, s) for k in tf.KINDS for a in tf.ALPHAS for s in range(seeds)]
    res = 0.0
    for i, (kind, alpha, seed) in enumerate(cases):
        if kind in ("collinear", "zero"):  # singular: a ridge is added, no exact solution
            continue
        J = tf.problem(kind, T, seed).astype(dtype).astype(np.float64)
        w = np.asarray(s1.weights[i], np.float64)
        res = max(res, float(np.max(np.abs((J @ J.T @ w) * w ** (1.0 / alpha) - 1.0))))
    steps1, steps2 = np.asarray(s1.solver.num_steps), np.asarray(s2.solver.num_steps)
    return (
        f"fairgrad {dtype} T={T:<3d}: worst |d-d*|/|d*| {worst:.1e} over {len(rows)} "
        f"solves; residual max|(Gw)w^(1/a)-1| {res:.1e}; Newton steps mean {steps1.mean():.1f} "
        f"max {steps1.max()} (warm second step: max {steps2.max()})"
    )


def pcd(T: int, dtype: str, seeds: int) -> str:
    bad, worst, _ = tf._pcd_errors(T, dtype, range(seeds))
    kinds = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    return (
        f"pcd      {dtype} T={T:<3d}: worst |d-d*|/|d*| by kind: {kinds}; outside tol: {len(bad)}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[2, 3, 5, 10, 64])
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    for T in args.T:
        for dtype in ("float32", "float64"):
            print(fairgrad(T, dtype, args.seeds), flush=True)
            print(pcd(T, dtype, args.seeds), flush=True)


if __name__ == "__main__":
    main()
