"""Smoke test of an installed mtlopt: every public method's update on a small problem, and which
Gramian path (the native CPU kernel or pure JAX) this install uses.

It imports nothing from the source tree (no tests/registry.py): run it from outside the
checkout against an installed wheel or sdist, e.g. ``cd /tmp && python -I smoke.py --expect
native``. tests/test_release.py does so in fresh virtual environments.

Every name in ``mtlopt.__all__`` whose annotation says it returns a gradient transformation is a
method: it is built with ``num_tasks=T`` (plus the arguments in ``REQUIRED`` where it has
required ones; a wrapper, whose first parameter is ``tx``, wraps ``mtlopt.mgda``), stepped twice
under ``jax.jit`` chained with SGD, and checked for finite updates of the right shapes. Every
step passes every extra argument a method may read (undeclared ones are ignored). A new method
whose required arguments this script cannot guess fails here, by name: add it to ``REQUIRED``.

Exit status 0 where everything passed; the last line says which Gramian path runs.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtlopt

T = 3
P = 20_000  # one shared leaf past 16384 entries: the native kernel's size where it is in use

# Arguments without defaults, by method (num_tasks is always given).
REQUIRED = {
    "linear": lambda: {"weights": np.linspace(1.0, 2.0, T).astype(np.float32)},
    "krum": lambda: {"n_byzantine": 0},
    "trimmed_mean": lambda: {"trim_number": 1},
    "cosmos": lambda: {"preference": np.ones(T, np.float32)},
    "pbi": lambda: {"preference": np.ones(T, np.float32)},
    "accumulate": lambda: {"every_k": 2},
    "refresh_weights": lambda: {"every": 2},
}


def _losses(params, batch):
    # Three tasks that pull the shared weights towards different targets; positive losses.
    w, b = params["w"], params["b"]
    return jnp.stack(
        [1.0 + jnp.mean((w - batch[t]) ** 2) + jnp.sum((b[t] - t) ** 2) * 0.1 for t in range(T)]
    )


def _problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((P,), jnp.float32), "b": jnp.zeros((T, 4), jnp.float32)}
    batches = [jnp.asarray(rng.standard_normal((T, P)), jnp.float32) for _ in range(2)]
    return params, batches


def _is_method(fn) -> bool:
    try:
        annotation = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return False
    return "GradientTransformation" in str(annotation)


def methods() -> dict[str, object]:
    """Every public method and wrapper of the installed mtlopt, by name."""
    public = {name: getattr(mtlopt, name) for name in sorted(mtlopt.__all__) if name[:1].islower()}
    return {name: fn for name, fn in public.items() if callable(fn) and _is_method(fn)}


def build(name: str, fn) -> optax.GradientTransformationExtraArgs:
    params = inspect.signature(fn).parameters
    kwargs = REQUIRED.get(name, dict)()
    if "num_tasks" in params:
        kwargs["num_tasks"] = T
    if next(iter(params), None) == "tx":  # a wrapper of a method: of one with a Gramian
        return fn(mtlopt.mgda(num_tasks=T), **kwargs)
    return fn(**kwargs)


def run_method(name: str, fn, params, batches) -> str:
    """Two jitted steps; returns the kind ("aggregator" or "task transform")."""
    grad_fn = mtlopt.task_value_and_grad(_losses)
    tx = build(name, fn)
    _, probe = grad_fn(params, batches[0])
    shapes = jax.eval_shape(lambda g: tx.update(g, tx.init(params), params, **_extra(g))[0], probe)
    if jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params):
        kind = "aggregator"
    else:  # a task transform (task grads in, task grads out): in front of an aggregator
        tx, kind = optax.chain(tx, mtlopt.mean(num_tasks=T)), "task transform"
    tx = optax.chain(tx, optax.sgd(0.1))
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch, other):
        losses, grads = grad_fn(params, batch)
        _, second = grad_fn(params, other)
        updates, state = tx.update(grads, state, params, **_extra(grads, losses, second))
        return optax.apply_updates(params, updates), state, updates

    new = params
    for i in range(2):
        new, state, updates = step(new, state, batches[i], batches[1 - i])
        for path, u in jax.tree_util.tree_leaves_with_path(updates):
            assert u.shape == params[path[0].key].shape, (name, path, u.shape)
            assert bool(jnp.all(jnp.isfinite(u))), (name, path, "non-finite update")
    moved = float(jnp.abs(new["w"] - params["w"]).max())
    assert moved > 0, (name, "the parameters did not move in two steps")
    return kind


def _extra(grads, losses=None, second=None):
    losses = jnp.linspace(1.0, 2.0, T) if losses is None else losses
    return {
        "task_losses": losses,
        "losses_after": losses * 0.9,  # famo
        "new_epoch": jnp.asarray(True),  # dwa
        "second_sample": grads if second is None else second,  # modo, sdmgrad
    }


def check_gramian_path(expect: str) -> str:
    status_fn = getattr(mtlopt, "native_kernel_status", None)
    if status_fn is None:  # an mtlopt from before the public name
        from mtlopt._src.native import status as status_fn
    status = status_fn()
    in_use = mtlopt.native_kernel_available()
    x = np.random.default_rng(1).standard_normal((T, P)).astype(np.float32)
    hlo = jax.jit(mtlopt.gramian).lower(jnp.asarray(x)).as_text()
    assert ("mtlopt_gramian" in hlo) == in_use, (in_use, "the kernel's call in the program")
    want = x.astype(np.float64) @ x.astype(np.float64).T
    np.testing.assert_allclose(mtlopt.gramian(jnp.asarray(x)), want, rtol=1e-5, atol=1e-3)
    if expect == "native":
        assert in_use, f"the native kernel is not in use: {status}"
    elif expect == "pure":
        assert not in_use, f"the native kernel is in use: {status}"
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--expect",
        choices=("native", "pure", "any"),
        default="any",
        help="the Gramian path this install must use (default: report it only)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"mtlopt {mtlopt.__version__} from {mtlopt.__file__}")
    print(f"jax {jax.__version__}, python {sys.version.split()[0]}")
    params, batches = _problem()
    found = methods()
    for name, fn in found.items():
        t0 = time.perf_counter()
        try:
            kind = run_method(name, fn, params, batches)
        except TypeError as e:
            if "required" in str(e) and name not in REQUIRED:
                raise SystemExit(
                    f"smoke: {name} has required arguments this script does not know ({e}); "
                    "add them to REQUIRED in tests/smoke.py"
                ) from e
            raise
        print(f"  ok  {name:<16} {kind:<15} {time.perf_counter() - t0:5.1f} s")
    status = check_gramian_path(args.expect)
    print(f"{len(found)} methods passed in {time.perf_counter() - start:.1f} s")
    print(f"Gramian path: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
