"""What a task transform in front of an aggregator costs: ``log_transform`` + ``cagrad`` against
``cagrad`` alone, and against the old way (the scaled T x P copy written out first).

Each is ``jax.jit(tx.update, donate_argnums=1)`` on one float32 ``(T, P)`` array with the state fed
back, timed round-robin (one call of each per round, so a load spike hits all alike); the median
over rounds is printed with its ratio to ``cagrad`` alone in the same run.

    python benchmarks/fold.py                 # T=10, P=1e6
    python benchmarks/fold.py --P 100000      # smaller
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import mtlopt
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mtlopt

import jax
import jax.numpy as jnp
import optax

from mtlopt._src import tree


def materialized_log_transform() -> optax.GradientTransformationExtraArgs:
    """The previous log_transform: the scaled task grads written out as a new T x P array."""

    def update(task_grads, state, params=None, *, task_losses=None, **extra):
        del params, extra
        return tree.scale_tasks(1.0 / (task_losses + 1e-8), task_grads), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=10)
    ap.add_argument("--P", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    T, P = args.T, args.P
    rng = np.random.default_rng(0)
    J = jnp.asarray(rng.standard_normal((T, P), dtype=np.float32))
    losses = jnp.asarray(rng.uniform(0.01, 10.0, T), jnp.float32)
    params = jnp.zeros((P,), jnp.float32)
    cases = {
        "cagrad": mtlopt.cagrad(num_tasks=T),
        "log_transform + cagrad": optax.chain(mtlopt.log_transform(), mtlopt.cagrad(num_tasks=T)),
        "materialized log + cagrad": optax.chain(
            materialized_log_transform(), mtlopt.cagrad(num_tasks=T)
        ),
        "mean": mtlopt.mean(num_tasks=T),
        "log_transform + mean": optax.chain(mtlopt.log_transform(), mtlopt.mean(num_tasks=T)),
    }
    runs = {}
    for name, tx in cases.items():
        fn = jax.jit(lambda g, s, tx=tx: tx.update(g, s, task_losses=losses), donate_argnums=1)
        state = tx.init(params)
        for _ in range(3):
            out, state = fn(J, state)
            jax.block_until_ready(out)
        runs[name] = [fn, state, []]
    for _ in range(args.rounds):
        for run in runs.values():
            fn, state, times = run
            start = time.perf_counter()
            out, state = fn(J, state)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
            run[1] = state
    base = {k: statistics.median(runs[k][2]) for k in ("cagrad", "mean")}
    print(
        f"T={T} P={P} float32, median of {args.rounds} round-robin calls, jax {jax.__version__}"
        f", native kernel: {mtlopt.native_kernel_available()}"
    )
    for name, (_, _, times) in runs.items():
        ref = "mean" if "mean" in name else "cagrad"
        med = statistics.median(times)
        print(f"{name:28s} {1e3 * med:7.2f} ms   x{med / base[ref]:.2f} of {ref}")


if __name__ == "__main__":
    main()
