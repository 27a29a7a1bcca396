"""The memory-light Gramian route (MGDA-UB) next to the full path: time and memory per step.

A shared-trunk MLP (``x -> relu(x W1) -> relu(. W2) = z``, then T linear heads on ``z``), batch
256, T = 10 regression tasks, trained by a whole jitted step with Adam. Two ways to weight the
tasks with a Gramian method (``mgda`` and ``cagrad``, both built with ``num_tasks``):

* ``full``: T gradients over every parameter (``mtlopt.task_value_and_grad``), the method on
  them (heads marked ``task_specific``): the T x P task grads exist in the step.
* ``route``: one trunk forward, T gradients with respect to the shared features ``z`` only (a
  ``(T, B, H)`` array), their Gramian, ``mtlopt.weights_from_gramian``, then one backward pass
  of ``sum_t w_t loss_t`` through the trunk (its cotangent at ``z`` is ``sum_t w_t dz_t``): the
  T x P task grads never exist.

Printed per method and size: median ms per step, and the step's temporary memory
(``compiled.memory_analysis().temp_size_in_bytes``) in units of one parameter copy
(``P * 4`` bytes). The route's weights come from a different Gramian (features, not
parameters: Sener & Koltun's upper bound), so the two paths train differently by design.

    python benchmarks/gramian_route.py            # P ~ 1e6 and 1e7; writes results/gramian_route.md
    python benchmarks/gramian_route.py --quick    # tiny sizes, mgda only, seconds (CI)
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtlopt

T = 10
BATCH = 256
D_IN = 256


def init(key, hidden):
    k1, k2, k3 = jax.random.split(key, 3)
    glorot = jax.nn.initializers.glorot_normal()
    return {
        "trunk": {
            "w1": glorot(k1, (D_IN, hidden)),
            "w2": glorot(k2, (hidden, hidden)),
        },
        "heads": glorot(k3, (T, hidden)),
    }


def features(trunk, x):
    return jax.nn.relu(jax.nn.relu(x @ trunk["w1"]) @ trunk["w2"])


def losses_from_features(z, heads, y):
    return jnp.mean((z @ heads.T - y) ** 2, axis=0)  # (T,)


def task_losses(params, x, y):
    return losses_from_features(features(params["trunk"], x), params["heads"], y)


HEADS = {"trunk": {"w1": False, "w2": False}, "heads": True}


def full_step(method):
    tx = optax.chain(method(num_tasks=T, task_specific=HEADS), optax.adam(1e-3))

    def step(params, state, x, y):
        losses, grads = mtlopt.task_value_and_grad(task_losses)(params, x, y)
        updates, state = tx.update(grads, state, params, task_losses=losses)
        return optax.apply_updates(params, updates), state, losses

    return tx.init, step


def route_step(method):
    weigher = method(num_tasks=T)
    adam = optax.adam(1e-3)

    def init_fn(params):
        return adam.init(params), weigher.init({"f": jnp.zeros((T,), jnp.float32)})

    def step(params, state, x, y):
        adam_state, w_state = state
        # One trunk forward, kept for its VJP; T cheap gradients at the features.
        z, trunk_vjp = jax.vjp(lambda t: features(t, x), params["trunk"])
        heads = params["heads"]
        losses, feature_grads = mtlopt.task_value_and_grad(losses_from_features)(z, heads, y)
        w, w_state = mtlopt.weights_from_gramian(weigher, mtlopt.gramian(feature_grads), w_state)
        w = jax.lax.stop_gradient(w)
        # The trunk: one backward pass of sum_t w_t loss_t; the heads: each its own task's
        # gradient (sum_t loss_t, since head t enters loss t only), at the same z.
        (trunk_grad,) = trunk_vjp(mtlopt.combine(w, feature_grads))
        head_grad = jax.grad(lambda h: jnp.sum(losses_from_features(z, h, y)))(heads)
        grads = {"trunk": trunk_grad, "heads": head_grad}
        updates, adam_state = adam.update(grads, adam_state, params)
        return optax.apply_updates(params, updates), (adam_state, w_state), losses

    return init_fn, step


def measure(make, method, hidden, steps):
    params = init(jax.random.key(0), hidden)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, D_IN), dtype=np.float32))
    y = jnp.asarray(rng.standard_normal((BATCH, T), dtype=np.float32))
    init_fn, step = make(method)
    state = init_fn(params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x, y).compile()
    mem = compiled.memory_analysis()
    temp = None if mem is None else mem.temp_size_in_bytes / (4 * n_params)
    params, state, losses = compiled(params, state, x, y)  # warm-up
    jax.block_until_ready(losses)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, state, losses = compiled(params, state, x, y)
        jax.block_until_ready(losses)
        times.append(time.perf_counter() - t0)
    return n_params, statistics.median(times) * 1e3, temp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (CI)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    hiddens = [64] if args.quick else [900, 3000]  # ~1e6 and ~1e7 parameters
    steps = args.steps or (3 if args.quick else 15)

    rows = []
    for hidden in hiddens:
        methods = (("mgda", mtlopt.mgda),) + (() if args.quick else (("cagrad", mtlopt.cagrad),))
        for name, method in methods:
            res = {}
            for path, make in (("full", full_step), ("route", route_step)):
                res[path] = measure(make, method, hidden, steps)
            n = res["full"][0]
            rows.append((name, n, res))
            print(
                f"{name:7s} P={n:.2e}  full {res['full'][1]:8.2f} ms  temp {res['full'][2]:5.2f}xP"
                f"  | route {res['route'][1]:8.2f} ms  temp {res['route'][2]:5.2f}xP"
                f"  | speed-up {res['full'][1] / res['route'][1]:4.1f}x",
                flush=True,
            )

    env = (
        f"mtlopt {mtlopt.__version__}, jax {jax.__version__} ({jax.default_backend()}), "
        f"{platform.processor() or platform.machine()}, T={T}, batch {BATCH}, float32, "
        f"median of {steps} steps after one warm-up"
    )
    lines = [
        "# The Gramian route (MGDA-UB) vs the full path",
        "",
        env + ". Written by `python benchmarks/gramian_route.py`.",
        "",
        "temp xP: the compiled step's temporary buffers / (P * 4 bytes).",
        "",
        "| method | P | full ms | full temp xP | route ms | route temp xP | route speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n, res in rows:
        f, r = res["full"], res["route"]
        lines.append(
            f"| {name} | {n:.2e} | {f[1]:.2f} | {f[2]:.2f} | {r[1]:.2f} | {r[2]:.2f} | "
            f"{f[1] / r[1]:.1f}x |"
        )
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if not args.quick:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gramian_route.md").write_text(table)
        print(f"wrote {out / 'gramian_route.md'}")


if __name__ == "__main__":
    main()
