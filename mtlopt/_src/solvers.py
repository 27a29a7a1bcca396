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
import os

FACE_ENTER = bool(int(os.environ.get("FACE_ENTER", "1")))
SCHEDULE = os.environ.get("SCHEDULE", "fallback")


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


def fw_gap(w: jax.Array, grad: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.dot(grad, w, precision=HIGHEST) - jnp.min(jnp.where(mask, grad, jnp.inf))


def _newton_direction(H: jax.Array, g: jax.Array, support: jax.Array) -> jax.Array:
    """The Newton step on the face ``{d: sum(d) = 0, d_i = 0 off support}``.

    Solves ``[[H_SS, 1], [1^T, 0]] [d; nu] = [-g_S; 0]`` padded to full size (identity rows off
    the support). ``H_SS`` may be singular (rank-deficient Gramians): it gets a ridge of a few
    ulps of its scale, and one step of iterative refinement recovers the unregularised
    solution where that one is well determined.
    """
    T = g.shape[0]
    dtype = g.dtype
    both = support[:, None] & support[None, :]
    Hs = jnp.where(both, H, 0.0)
    scale = jnp.max(jnp.where(support, jnp.diagonal(H), 0.0))
    scale = jnp.where(scale > 0, scale, 1.0)
    ridge = 64.0 * jnp.finfo(dtype).eps * scale
    eye = jnp.eye(T, dtype=dtype)
    on = support.astype(dtype)
    A = Hs + eye * jnp.where(support, ridge, scale)
    K = jnp.block([[A, scale * on[:, None]], [scale * on[None, :], jnp.zeros((1, 1), dtype)]])
    Kexact = jnp.block(
        [
            [Hs + eye * jnp.where(support, 0.0, scale), scale * on[:, None]],
            [scale * on[None, :], jnp.zeros((1, 1), dtype)],
        ]
    )
    rhs = jnp.concatenate([jnp.where(support, -g, 0.0), jnp.zeros((1,), dtype)])
    lu = jax.scipy.linalg.lu_factor(K)
    x = jax.scipy.linalg.lu_solve(lu, rhs)
    x = x + jax.scipy.linalg.lu_solve(lu, rhs - jnp.dot(Kexact, x, precision=HIGHEST))
    return jnp.where(support, x[:T], 0.0)


class _Carry(NamedTuple):
    w: jax.Array
    y: jax.Array
    t: jax.Array
    f: jax.Array
    g: jax.Array
    gap: jax.Array
    k: jax.Array
    stall: jax.Array  # steps since F last fell below its best value by more than rounding
    best: jax.Array  # the best F so far


def minimize_on_simplex(
    value_and_grad: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    curvature: Callable[[jax.Array], jax.Array],
    w0: jax.Array,
    mask: jax.Array,
    *,
    tol: float,
    max_iters: int,
    hessian: Callable[[jax.Array], jax.Array] | None = None,
    lower_bound: jax.Array | None = None,
    newton_every: int = 2,
    patience: int = 16,
    num_backtracks: int = 8,
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
      hessian: optional ``w -> (T, T)`` Hessian of F: then every ``newton_every``-th step
        (the first included) is a Newton step on the face of the current support.
      lower_bound: optional lower bound on ``min F`` known in advance; the reported gap is the
        smaller of the Frank-Wolfe gap and ``F(w) - lower_bound``.
      newton_every: the period of the Newton steps.
      patience: stop (unconverged) after this many steps in a row without decrease of F: the
        iterate is at the floor set by rounding.

    Returns:
      The solution and a :class:`SolverInfo`.
    """
    w0 = jnp.asarray(w0)
    dtype = w0.dtype if jnp.issubdtype(w0.dtype, jnp.floating) else jnp.float32
    w = project(w0.astype(dtype), mask)

    def gap_of(w, f, g):
        gap = fw_gap(w, g, mask)
        if lower_bound is not None:
            gap = jnp.minimum(gap, f - lower_bound)
        return gap

    f, g = value_and_grad(w)
    carry = _Carry(w, w, jnp.ones((), dtype), f, g, gap_of(w, f, g), jnp.int32(0), jnp.int32(0), f)

    def progress(c, f_new):
        # A decrease of F above its rounding level (F is a sum of terms of size <= max |grad|).
        slack = (
            8.0
            * jnp.finfo(dtype).eps
            * (jnp.abs(c.f) + jnp.max(jnp.abs(jnp.where(mask, c.g, 0.0))))
        )
        return f_new < c.best - slack

    def cond(c):
        return (c.gap > tol) & (c.k < max_iters) & (c.stall < patience)

    def fista(c):
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
            g=jnp.where(accept, g_new, c.g),
            gap=jnp.where(accept, gap_of(w_new, f_new, g_new), c.gap),
            k=c.k + 1,
            stall=jnp.where(accept & progress(c, f_new), 0, c.stall + 1),
            best=jnp.minimum(c.best, jnp.where(accept, f_new, c.best)),
        )

    steps = 0.25 ** jnp.arange(num_backtracks, dtype=dtype)

    def newton(c):
        lam = jnp.dot(c.g, c.w, precision=HIGHEST)
        # The face: the support, and the zero coordinates whose gradient asks to enter.
        support = mask & (c.w > 0)
        entering = mask & (c.w <= 0) & (c.g < lam)
        face = support | (entering if FACE_ENTER else False)
        d = _newton_direction(hessian(c.w), c.g, face)
        d = jnp.where(support, d, jnp.maximum(d, 0.0))
        # (a) steps along d, the longest one that stays feasible and shorter ones (F need not be
        # quadratic); the blocking coordinates of the longest are set to 0;
        shrink = support & (d < 0)
        ratio = jnp.where(shrink, c.w / jnp.where(shrink, -d, 1.0), jnp.inf)
        alpha = jnp.minimum(jnp.min(ratio), 1.0)
        wa = jnp.maximum(c.w[None, :] + (alpha * steps)[:, None] * d[None, :], 0.0)
        wa = wa.at[0].set(jnp.where(ratio <= alpha, 0.0, wa[0]))
        # (b) steps of at most 1 in each coordinate without the ratio test, projected back.
        base = 1.0 / jnp.maximum(jnp.max(jnp.abs(d)), 1.0)
        wb = jax.vmap(lambda s: project(c.w + (base * s) * d, mask))(steps)
        cands = jnp.concatenate([wa, wb])
        cands = cands / jnp.maximum(jnp.sum(cands, axis=1, keepdims=True), jnp.finfo(dtype).tiny)
        fs, gs = jax.vmap(value_and_grad)(cands)
        fs = jnp.where(jnp.isfinite(fs), fs, jnp.inf)
        best = jnp.argmin(fs)
        w_new, f_new, g_new = cands[best], fs[best], gs[best]
        accept = f_new < c.f
        out = _Carry(
            w=jnp.where(accept, w_new, c.w),
            y=jnp.where(accept, w_new, c.y),
            t=jnp.where(accept, 1.0, c.t),
            f=jnp.where(accept, f_new, c.f),
            g=jnp.where(accept, g_new, c.g),
            gap=jnp.where(accept, gap_of(w_new, f_new, g_new), c.gap),
            k=c.k + 1,
            stall=jnp.where(progress(c, f_new), 0, c.stall + 1),
            best=jnp.minimum(c.best, f_new),
        )
        return out, accept

    if hessian is None:
        body = fista
    elif SCHEDULE == "alternate":

        def body(c):
            return lax.cond(c.k % newton_every == 0, lambda c: newton(c)[0], fista, c)

    else:

        def body(c):
            cn, ok = newton(c)
            return lax.cond(ok, lambda: cn, lambda: fista(c))

    out = lax.while_loop(cond, body, carry)
    return out.w, SolverInfo(out.k, out.gap, out.gap <= tol)


def _psd_factor(G: jax.Array) -> jax.Array:
    """``L`` with ``L L^T`` the PSD part of G, accurate relative to each task's scale.

    The eigendecomposition is taken of the correlation matrix ``D^-1 G D^-1`` (``D`` the
    gradients' norms): its errors are then relative to ``sqrt(G_ss G_tt)`` entrywise, as the
    Gramian's own rounding is, where a plain one would lose the tasks whose squared norm is
    below a few ulps of the largest.
    """
    d = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
    inv = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    C = G * inv[:, None] * inv[None, :]
    eigvals, V = jnp.linalg.eigh(0.5 * (C + C.T))
    return d[:, None] * V * jnp.sqrt(jnp.maximum(eigvals, 0.0))[None, :]


def min_norm(G: jax.Array, w0: jax.Array, mask: jax.Array, *, tol: float, max_iters: int):
    """The min-norm point of the convex hull: ``argmin_{w in simplex} w^T G w`` (G normalised)."""
    L = 2.0 * spectral_bound(G)

    def value_and_grad(w):
        Gw = matvec(G, w)
        return jnp.dot(w, Gw, precision=HIGHEST), 2.0 * Gw

    return minimize_on_simplex(
        value_and_grad,
        lambda y: L,
        jnp.asarray(w0).astype(G.dtype),
        mask,
        tol=tol,
        max_iters=max_iters,
        hessian=lambda w: 2.0 * G,
        lower_bound=jnp.zeros((), G.dtype),
    )


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

    The solve works on a factor ``G+ = L L^T`` (the PSD part of G, from its eigendecomposition):
    ``||L^T w||`` has an absolute error of a few ulps of the gradients' norms where
    ``sqrt(w^T G w)`` has the square root of that (~3e-4 in float32) when ``g_w`` is small, near
    Pareto-stationary points, and the solver would chase that noise.

    ``sqrt`` is concave, so its tangent at ``q(y) = y^T G y`` majorizes it; the majorizer's
    gradient is ``rho * lam_max(G) / sqrt(q(y))``-Lipschitz, which is the FISTA step's curvature.
    """
    dtype = G.dtype
    b = jnp.asarray(b).astype(dtype)
    rho = jnp.asarray(rho).astype(dtype)
    L = _psd_factor(G)
    Gp = jnp.dot(L, L.T, precision=HIGHEST)
    lam = jnp.max(jnp.linalg.eigvalsh(Gp))
    v0 = jnp.dot(b, L, precision=HIGHEST)  # L^T b: g0 in the factor's coordinates
    Gb = jnp.dot(L, v0, precision=HIGHEST)
    floor = jnp.sqrt(jnp.asarray(jnp.finfo(dtype).tiny, dtype))

    def value_and_grad(w):
        v = jnp.dot(w, L, precision=HIGHEST)
        norm = jnp.sqrt(jnp.dot(v, v, precision=HIGHEST))
        safe = jnp.maximum(norm, floor)
        grad = jnp.dot(L, v0 + (rho / safe) * v, precision=HIGHEST)
        return jnp.dot(v, v0, precision=HIGHEST) + rho * norm, grad

    def curvature(y):
        v = jnp.dot(y, L, precision=HIGHEST)
        return rho * lam / jnp.maximum(jnp.sqrt(jnp.dot(v, v, precision=HIGHEST)), floor)

    def hessian(w):
        v = jnp.dot(w, L, precision=HIGHEST)
        norm = jnp.maximum(jnp.sqrt(jnp.dot(v, v, precision=HIGHEST)), floor)
        u = jnp.dot(L, v, precision=HIGHEST) / norm
        return (rho / norm) * (Gp - u[:, None] * u[None, :])

    # Weak duality: d = max(1 - c, 0) g0 lies in CAGrad's ball, so F* >= min_t <g_t, d>.
    g0_norm = jnp.sqrt(jnp.dot(v0, v0, precision=HIGHEST))
    c = rho / jnp.where(g0_norm > 0, g0_norm, 1.0)
    lower = jnp.maximum(1.0 - c, 0.0) * jnp.min(jnp.where(mask, Gb, jnp.inf))
    lower = jnp.where(jnp.any(mask), lower, 0.0)

    return minimize_on_simplex(
        value_and_grad,
        curvature,
        jnp.asarray(w0).astype(dtype),
        mask,
        tol=tol,
        max_iters=max_iters,
        hessian=hessian,
        lower_bound=lower,
    )
