"""CAGrad's two-task toy problem (Liu et al. 2021, Figure 1), with mtlopt.

Two losses of a point ``x = (x1, x2)`` in the plane. Below the x1 axis both are the same
stretched bowl (a shallow ``0.01 (x2 + 8)**2`` term) centred at ``x1 = +7`` for task 1 and
``x1 = -7`` for task 2, so the Pareto set is a segment near ``x2 = -8.36`` and the average
loss has its minimum in the middle of it, at ``x1 = 0``. Above the axis each loss is a
logarithmic valley along a curve (``x1 ~ -5`` for task 1, ``x1 ~ +5`` for task 2), floored at
``log(5e-6) + 6``. The two halves are blended by ``max(tanh(+-x2 / 2), 0)``.

Gradient descent on the mean (Adam), MGDA, PCGrad and CAGrad (c = 0.5, update divided by
``1 + c`` as in the authors' toy script) each run 100,000 Adam steps (lr 1e-3) from the
paper's three starting points. The paper's finding: the mean can stall in a valley of one
task, MGDA and PCGrad stop anywhere on the Pareto segment, and CAGrad reaches the average
loss's minimum from every start.

Every method's whole run (``lax.scan`` over the steps, ``jax.vmap`` over the starts) is one
compiled call. The script prints where each run ended, saves a figure and exits with status
1 if CAGrad missed the minimum from any start, so it also serves as a check::

    python examples/cagrad_toy.py [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from jax import lax

import mtlopt

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

# The problem, as in the authors' toy script.
LOG_FLOOR = 5e-6  # |.| is clamped here before the log: each valley bottoms out at log(5e-6) + 6
STARTS = np.array([[-8.5, 7.5], [-8.5, -5.0], [9.0, 9.0]], np.float32)
LEARNING_RATE = 1e-3
CAGRAD_C = 0.5
CAGRAD_RESCALE = 2  # the toy script divides the CAGrad update by 1 + c

# A run "reaches the minimum" when it ends this close to it (the Pareto segment is 14 long).
TOLERANCE = 0.05
RECORD_EVERY = 100  # trajectory subsampling for the figure
BOX = 11.0  # the figure shows [-BOX, BOX]^2

METHODS = {
    "GD on the mean": mtlopt.mean,
    "MGDA": mtlopt.mgda,
    "PCGrad": lambda: mtlopt.pcgrad(seed=0),
    f"CAGrad (c={CAGRAD_C})": lambda: mtlopt.cagrad(c=CAGRAD_C, rescale=CAGRAD_RESCALE),
}


def toy_losses(x, xp=jnp):
    """The two task losses at ``x[..., :2]``; ``xp`` is ``jax.numpy`` or ``numpy``.

    Returns an array whose last axis holds (L1, L2).
    """
    x1, x2 = x[..., 0], x[..., 1]
    up = xp.maximum(xp.tanh(0.5 * x2), 0.0)  # weight of the upper (log) half
    down = xp.maximum(xp.tanh(-0.5 * x2), 0.0)  # weight of the lower (bowl) half
    t = xp.tanh(x2)
    valley1 = xp.log(xp.maximum(xp.abs(0.5 * (x1 + 7.0) - t), LOG_FLOOR)) + 6.0
    valley2 = xp.log(xp.maximum(xp.abs(0.5 * (7.0 - x1) - t), LOG_FLOOR)) + 6.0
    shared = 0.01 * (x2 + 8.0) ** 2 - 20.0
    bowl1 = 0.1 * (x1 - 7.0) ** 2 + shared
    bowl2 = 0.1 * (x1 + 7.0) ** 2 + shared
    return xp.stack([up * valley1 + down * bowl1, up * valley2 + down * bowl2], axis=-1)


def average_loss(x, xp=jnp):
    return xp.mean(toy_losses(x, xp), axis=-1)


def average_minimum() -> tuple[np.ndarray, float]:
    """The average loss's global minimum, in float64: a dense grid, then Newton steps.

    Newton uses central finite differences (step 1e-4) of the float64 NumPy loss; near the
    minimum the loss is smooth (x2 < 0: only the bowls and tanh), so this converges fast.
    """
    grid = np.linspace(-BOX, BOX, 1101)
    X1, X2 = np.meshgrid(grid, grid)
    values = average_loss(np.stack([X1, X2], axis=-1), np)
    i = np.unravel_index(np.argmin(values), values.shape)
    x = np.array([X1[i], X2[i]])
    f = lambda p: float(average_loss(p, np))
    h = 1e-4
    eye = np.eye(2) * h
    for _ in range(20):
        grad = np.array([(f(x + e) - f(x - e)) / (2 * h) for e in eye])
        hess = np.array(
            [
                [
                    (f(x + a + b) - f(x + a - b) - f(x - a + b) + f(x - a - b)) / (4 * h * h)
                    for b in eye
                ]
                for a in eye
            ]
        )
        step = np.linalg.solve(hess, grad)
        x = x - step
        if np.linalg.norm(step) < 1e-10:
            break
    return x, f(x)


def make_run(method: optax.GradientTransformationExtraArgs, steps: int, every: int):
    """A jitted ``starts (S, 2) -> (final (S, 2), trajectory (S, steps // every + 1, 2))``."""
    tx = optax.chain(method, optax.adam(LEARNING_RATE))
    value_and_grads = mtlopt.task_value_and_grad(lambda x: toy_losses(x))

    def step(carry, _):
        x, opt_state = carry
        losses, grads = value_and_grads(x)
        updates, opt_state = tx.update(grads, opt_state, x, task_losses=losses)
        return (optax.apply_updates(x, updates), opt_state), None

    def chunk(carry, _):
        carry, _ = lax.scan(step, carry, None, length=every)
        return carry, carry[0]

    def one_start(x0):
        carry = (x0, tx.init(x0))
        carry, path = lax.scan(chunk, carry, None, length=steps // every)
        carry, _ = lax.scan(step, carry, None, length=steps % every)
        return carry[0], jnp.concatenate([x0[None], path, carry[0][None]])

    return jax.jit(jax.vmap(one_start))


def simulate(steps: int) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Runs every method from every start: name -> (finals, trajectories, seconds)."""
    every = max(1, min(RECORD_EVERY, steps))
    starts = jnp.asarray(STARTS)
    results = {}
    for name, make in METHODS.items():
        run = make_run(make(), steps, every)
        tic = time.perf_counter()
        final, path = jax.block_until_ready(run(starts))
        results[name] = (np.asarray(final), np.asarray(path), time.perf_counter() - tic)
    return results


def pareto_mask(X1, X2, Z1, Z2) -> np.ndarray:
    """Where the two task gradients are (numerically) opposite, on the grid: the Pareto set.

    The grid's finite-difference gradients give the sign of ``cross(g1, g2)``; the Pareto set
    is its zero line where ``<g1, g2> < 0``. Only the lower half (``x2 < -1``) is searched:
    the upper half's valleys are sharp enough to fool finite differences.
    """
    step = X1[0, 1] - X1[0, 0]
    g1y, g1x = np.gradient(Z1, step)
    g2y, g2x = np.gradient(Z2, step)
    cross = g1x * g2y - g1y * g2x
    keep = (g1x * g2x + g1y * g2y < 0) & (X2 < -1.0)
    return np.where(keep, cross, np.nan)


def plot(results, x_min: np.ndarray, out: str, steps: int) -> None:
    grid = np.linspace(-BOX, BOX, 801)
    X1, X2 = np.meshgrid(grid, grid)
    L = toy_losses(np.stack([X1, X2], axis=-1), np)
    Z = L.mean(axis=-1)
    cross = pareto_mask(X1, X2, L[..., 0], L[..., 1])
    colors = ["tab:blue", "tab:orange", "tab:purple"]
    fig, axes = plt.subplots(
        2, 2, figsize=(10, 9.8), sharex=True, sharey=True, layout="constrained"
    )
    for ax, (name, (final, path, _)) in zip(axes.flat, results.items(), strict=True):
        contours = ax.contour(X1, X2, Z, levels=20, cmap="viridis", linewidths=0.8)
        ax.contour(X1, X2, cross, levels=[0.0], colors="0.6", linewidths=5, alpha=0.6)
        for s, color in enumerate(colors):
            ax.plot(path[s, :, 0], path[s, :, 1], "-", color=color, lw=2)
            ax.plot(*STARTS[s], "o", color=color, ms=8, mec="k")
            ax.plot(*final[s], "X", color=color, ms=10, mec="k", zorder=6)
        ax.plot(*x_min, "*", color="red", ms=18, mec="k", zorder=5)
        ax.set_title(name, fontsize=13)
        ax.set_xlim(-BOX, BOX)
        ax.set_ylim(-BOX, BOX)
        ax.set_aspect("equal")
    for ax in axes[1]:
        ax.set_xlabel("x1")
    for ax in axes[:, 0]:
        ax.set_ylabel("x2")
    handles = [
        plt.Line2D([], [], color=color, lw=2, marker="o", mec="k", label=f"start {s + 1}")
        for s, color in enumerate(colors)
    ]
    handles += [
        plt.Line2D([], [], ls="", marker="X", color="w", mec="k", ms=10, label="end"),
        plt.Line2D(
            [], [], ls="", marker="*", color="red", mec="k", ms=15, label="avg-loss minimum"
        ),
        plt.Line2D([], [], color="0.6", lw=5, alpha=0.6, label="Pareto set"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=6, fontsize=10)
    fig.colorbar(contours, ax=axes, shrink=0.6, label="average loss (L1 + L2) / 2")
    fig.suptitle(
        f"CAGrad toy (Liu et al. 2021): Adam, lr {LEARNING_RATE:g}, {steps:,} steps", fontsize=14
    )
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="Adam steps (default 100000)")
    parser.add_argument("--out", default="cagrad_toy.png", help="figure path")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be positive")

    tic = time.perf_counter()
    x_min, f_min = average_minimum()
    print(f"average-loss minimum: x = ({x_min[0]:+.4f}, {x_min[1]:+.4f}), loss {f_min:.4f}")
    print(f"a run reaches it when it ends within {TOLERANCE} of it\n")
    results = simulate(args.steps)

    cagrad_ok = True
    header = f"{'method':<16} {'start':>16} {'final x':>18} {'L1':>9} {'L2':>9} {'avg':>9}"
    print(header + f" {'dist':>8}  reached")
    for name, (final, _, seconds) in results.items():
        losses = toy_losses(final.astype(np.float64), np)
        for s in range(len(STARTS)):
            dist = float(np.linalg.norm(final[s] - x_min))
            hit = dist <= TOLERANCE
            if name.startswith("CAGrad"):
                cagrad_ok &= hit
            print(
                f"{name:<16} ({STARTS[s, 0]:+5.1f}, {STARTS[s, 1]:+5.1f})  "
                f"({final[s, 0]:+7.3f}, {final[s, 1]:+7.3f}) "
                f"{losses[s, 0]:9.4f} {losses[s, 1]:9.4f} {losses[s].mean():9.4f} "
                f"{dist:8.4f}  {'yes' if hit else 'no'}"
            )
        print(f"{'':<16} (compile + run, 3 starts: {seconds:.1f} s)")
    plot(results, x_min, args.out, args.steps)
    print(f"\nfigure: {args.out}; total {time.perf_counter() - tic:.1f} s")
    if not cagrad_ok:
        print("CHECK FAILED: CAGrad did not reach the average-loss minimum from every start")
        return 1
    print("CHECK PASSED: CAGrad reached the average-loss minimum from every start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
