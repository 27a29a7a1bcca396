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

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from optax import projections

HIGHEST = lax.Precision.HIGHEST


class SolverInfo(NamedTuple):
    """What a solve reports: steps taken, final duality gap, and whether ``gap <= tol``."""

    num_steps: jax.Array  # int32
    gap: jax.Array  # float32, an upper bound on F(w) - F*, in units of trace(G) / T
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
    active = jnp.sum(mask).astype(jnp.float32)
    ok = trace > 0
    factor = jnp.where(ok, active / jnp.where(ok, trace, 1.0), 1.0)
    return G * factor, factor


def project(v: jax.Array, mask: jax.Array) -> jax.Array:
    """Euclidean projection onto the simplex of the active coordinates (others get 0)."""
    top = jnp.max(jnp.where(mask, v, -jnp.inf))
    top = jnp.where(jnp.any(mask), top, 0.0)
    # Any coordinate at least 1 below the largest is 0 after projection; push inactive ones 2 below.
    v = jnp.where(mask, v, top - 2.0)
    return jnp.where(mask, projections.projection_simplex(v), 0.0)


def uniform(mask: jax.Array) -> jax.Array:
    m = mask.astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m), 1.0)


def fw_gap(w: jax.Array, grad: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.dot(grad, w, precision=HIGHEST) - jnp.min(jnp.where(mask, grad, jnp.inf))


class _Carry(NamedTuple):
    w: jax.Array
    y: jax.Array
    t: jax.Array
    f: jax.Array
    gap: jax.Array
    k: jax.Array


def minimize_on_simplex(
    value_and_grad: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    curvature: Callable[[jax.Array], jax.Array],
    w0: jax.Array,
    mask: jax.Array,
    *,
    tol: float,
    max_iters: int,
) -> tuple[jax.Array, SolverInfo]:
    """Minimises a convex F over the simplex of the active tasks.

    Args:
      value_and_grad: ``w -> (F(w), grad F(w))``.
      curvature: ``y -> L``, a Lipschitz bound for grad F valid on a step from ``y`` (for a
        non-smooth F, the curvature of a majorizer of F that touches it at ``y``).
      w0: the starting point (projected first), e.g. the last step's solution.
      mask: ``(T,)`` bool, the coordinates that may be nonzero.
      tol: stop once the Frank-Wolfe gap is at most ``tol``.
      max_iters: the iteration cap (static).

    Returns:
      The solution and a :class:`SolverInfo`.
    """
    w = project(w0.astype(jnp.float32), mask)
    f, g = value_and_grad(w)
    carry = _Carry(w, w, jnp.float32(1.0), f, fw_gap(w, g, mask), jnp.int32(0))

    def cond(c):
        return (c.gap > tol) & (c.k < max_iters)

    def body(c):
        _, gy = value_and_grad(c.y)
        L = curvature(c.y)
        step = jnp.where(L > 0, 1.0 / jnp.where(L > 0, L, 1.0), 0.0)
        w_new = project(c.y - step * gy, mask)
        f_new, g_new = value_and_grad(w_new)
        # A plain projected step (t == 1) never increases F; an accelerated one may: then restart.
        accept = (f_new <= c.f) | (c.t == 1.0)
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * c.t * c.t))
        y_next = w_new + ((c.t - 1.0) / t_next) * (w_new - c.w)
        return _Carry(
            w=jnp.where(accept, w_new, c.w),
            y=jnp.where(accept, y_next, c.w),
            t=jnp.where(accept, t_next, 1.0),
            f=jnp.where(accept, f_new, c.f),
            gap=jnp.where(accept, fw_gap(w_new, g_new, mask), c.gap),
            k=c.k + 1,
        )

    out = lax.while_loop(cond, body, carry)
    return out.w, SolverInfo(out.k, out.gap, out.gap <= tol)


def min_norm(G: jax.Array, w0: jax.Array, mask: jax.Array, *, tol: float, max_iters: int):
    """The min-norm point of the convex hull: ``argmin_{w in simplex} w^T G w`` (G normalised)."""
    L = 2.0 * spectral_bound(G)

    def value_and_grad(w):
        Gw = matvec(G, w)
        return jnp.dot(w, Gw, precision=HIGHEST), 2.0 * Gw

    return minimize_on_simplex(value_and_grad, lambda y: L, w0, mask, tol=tol, max_iters=max_iters)


def cagrad_dual(
    G: jax.Array,
    b: jax.Array,
    rho: jax.Array,
    w0: jax.Array,
    mask: jax.Array,
    *,
    tol: float,
    max_iters: int,
):
    """CAGrad's dual ``argmin_{w in simplex} w^T G b + rho * sqrt(w^T G w)`` (G normalised).

    ``sqrt`` is concave, so its tangent at ``q(y) = y^T G y`` majorizes it; the majorizer's
    gradient is ``rho * lam_max(G) / sqrt(q(y))``-Lipschitz, which is the step's curvature.
    """
    Gb = matvec(G, b)
    lam = spectral_bound(G)
    floor = jnp.float32(1e-12)

    def value_and_grad(w):
        Gw = matvec(G, w)
        norm = jnp.sqrt(jnp.maximum(jnp.dot(w, Gw, precision=HIGHEST), 0.0))
        safe = jnp.maximum(norm, floor)
        return jnp.dot(w, Gb, precision=HIGHEST) + rho * norm, Gb + (rho / safe) * Gw

    def curvature(y):
        norm = jnp.sqrt(jnp.maximum(quad(G, y), 0.0))
        return rho * lam / jnp.maximum(norm, floor)

    return minimize_on_simplex(value_and_grad, curvature, w0, mask, tol=tol, max_iters=max_iters)
