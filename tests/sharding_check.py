"""Run in a subprocess with 4 simulated CPU devices (see test_sharding.py).

For every registry row named on the command line (all aggregators if none): the update of
task grads sharded along the parameter axis over a 4-device mesh equals the single-device
update, and the update keeps the params' sharding.
Prints one line per row and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.registry import ROWS


def main() -> int:
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    T = 3
    rng = np.random.default_rng(0)
    # Leaves whose parameter axes divide by 4 (sharded) and one that stays replicated.
    grads = {
        "w": jnp.asarray(rng.normal(size=(T, 64, 8)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(T, 40000)), jnp.float32),  # the chunked Gramian path
        "b": jnp.asarray(rng.normal(size=(T, 3)), jnp.float32),
    }
    grads["v"] = grads["v"].at[1].set(-0.6 * grads["v"][0] + 0.4 * grads["v"][1])
    specs = {"w": P(None, "x", None), "v": P(None, "x"), "b": P()}
    param_specs = {"w": P("x", None), "v": P("x"), "b": P()}
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), grads)
    losses = jnp.asarray(rng.uniform(0.5, 2.0, T), jnp.float32)
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in grads.items()}
    sharded_params = {
        k: jax.device_put(v, NamedSharding(mesh, param_specs[k])) for k, v in params.items()
    }
    names = sys.argv[1:]
    rows = [r for r in ROWS if r.kind == "aggregator" and (not names or r.name in names)]
    assert not names or len(rows) == len(names), (names, [r.name for r in rows])
    failures = 0
    for row in rows:
        tx = row.make(T)
        extra = {"task_losses": losses} if row.needs_losses else {}
        extra.update(dict(row.signals))
        ref, _ = jax.jit(tx.update)(grads, tx.init(params), **extra)
        out, _ = jax.jit(tx.update)(sharded, tx.init(sharded_params), sharded_params, **extra)
        ok = True
        for k in grads:
            a, b = np.asarray(out[k]), np.asarray(ref[k])
            scale = max(np.abs(b).max(), 1e-30)
            if not np.allclose(a, b, rtol=1e-5, atol=1e-5 * scale):
                ok = False
                print(f"{row.name}: leaf {k} differs by {np.abs(a - b).max() / scale:.2e}")
            want = NamedSharding(mesh, param_specs[k])
            if not out[k].sharding.is_equivalent_to(want, out[k].ndim):
                ok = False
                print(f"{row.name}: leaf {k} sharding {out[k].sharding} != {want}")
        print(f"{row.name}: {'ok' if ok else 'FAIL'}")
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
