"""Small dense solvers on ``(T,)`` and ``(T, T)`` arrays, run inside the user's jit.

One solver serves every method that minimises a convex function over the probability
simplex (MGDA's min-norm point, CAGrad's dual): accelerated projected gradient (FISTA) with
function-value restarts, the simplex projection of ``optax.projections``, and a stopping rule
on the Frank-Wolfe duality gap, ``<grad F(w), w> - min_i grad F(w)_i``, which bounds
``F(w) - F*`` from above for convex F. The loop is a ``lax.while_loop`` that stops when the gap
is at most ``tol`` or after ``max_iters`` steps; it never raises, it reports
(:class:`SolverInfo`). Warm-started from the previous step's solution, it usually stops after
0 to a few steps.

Callers hand in a trace-normalised Gramian (``trace = T``), so ``tol`` is relative to
``trace(G) / T`` and the same numbers suit gradients of any scale.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from optax import projections

HIGHEST = lax.Precision.HIGHEST


class SolverInfo(NamedTuple):
    """What a solve reports: steps taken, final duality gap, and whether ``gap <= tol``."""

    num_steps: jax.Array  # int32
    gap: jax.Array  # G's dtype, an upper bound on F(w) - F*, in units of trace(G) / T
    converged: jax.Array  # bool


def matvec(G: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(G, w, precision=HIGHEST)


def quad(G: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(w, matvec(G, w), precision=HIGHEST)


def spectral_bound(G: jax.Array) -> jax.Array:
    """An upper bound on the largest eigenvalue of a PSD G: min(Frobenius, max row sum)."""
    fro = jnp.sqrt(jnp.sum(G * G))
    rows = jnp.max(jnp.sum(jnp.abs(G), axis=1))
    return jnp.minimum(fro, rows)


def normalize(G: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``G`` over the active tasks scaled to trace = number of active tasks, and the factor.

    Entries of inactive tasks are set to zero. A zero Gramian stays zero (factor 1).
    """
    both = mask[:, None] & mask[None, :]
    G = jnp.where(both, G, 0.0)
    trace = jnp.trace(G)
    active = jnp.sum(mask).astype(G.dtype)
    ok = trace > 0
    factor = jnp.where(ok, active / jnp.where(ok, trace, 1.0), 1.0)
    return G * factor, factor


def project(v: jax.Array, mask: jax.Array) -> jax.Array:
    """Euclidean projection onto the simplex of the active coordinates (others get 0)."""
    top = jnp.max(jnp.where(mask, v, -jnp.inf))
    top = jnp.where(jnp.any(mask), top, 0.0)
    # Any coordinate at least 1 below the largest is 0 after projection; push inactive ones 2 below.
    v = jnp.where(mask, v, top - 2.0)
    # optax's projection mixes int and float internally: keep it working for users who run with
    # jax_numpy_dtype_promotion="strict".
    with jax.numpy_dtype_promotion("standard"):
        p = projections.projection_simplex(v)
    return jnp.where(mask, p, 0.0)


def uniform(mask: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Equal weights on the active coordinates (all zero when none is active)."""
    m = mask.astype(dtype)
    return m / jnp.maximum(jnp.sum(m), 1.0)
