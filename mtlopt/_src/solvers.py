"""Small dense solvers on ``(T,)`` and ``(T, T)`` arrays, run inside the user's jit.

One solver serves every method that minimises a convex function over the probability
simplex (MGDA's min-norm point, CAGrad's dual). It is an active-set method for these small
dense problems:

* a Newton step on the current face (the support, plus the zero coordinates whose gradient
  asks to enter), and for CAGrad the exact minimiser of the dual on that face, each followed
  along its direction with a ratio test (the blocking coordinates leave the support) and,
  as an alternative, projected back onto the simplex, at a few step lengths (the best value
  is taken, and only when it decreases F);
* when neither decreases F, an accelerated projected-gradient step (FISTA with
  function-value restarts, the simplex projection of ``optax.projections``), which
  guarantees progress and lets new coordinates in.

It stops on the Frank-Wolfe duality gap, ``<grad F(w), w> - min_i grad F(w)_i``, an upper
bound on ``F(w) - F*`` for convex F (or on ``F(w) - lower_bound`` where a lower bound on F* is
known): when the gap is at most ``tol``, after ``max_iters`` steps, or after ``patience``
steps in a row that did not lower F beyond its rounding (the floor of the dtype). The loop is
a ``lax.while_loop``; it never raises, it reports (:class:`SolverInfo`). Warm-started from
the previous step's solution it usually stops after one step: one Newton step on the right
face is exact for MGDA, and so is the face solve for CAGrad.

Callers hand in a trace-normalised Gramian (``trace = T``), so ``tol`` is relative to
``trace(G) / T`` and the same numbers suit gradients of any scale. Everything follows the
Gramian's dtype (float32, or float64 with ``jax_enable_x64``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from optax import projections

HIGHEST = lax.Precision.HIGHEST
import os

NEWTON = bool(int(os.environ.get("NEWTON", "1")))


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


def _kkt_solve(H: jax.Array, top: jax.Array, bottom: jax.Array, face: jax.Array) -> jax.Array:
    """Solves ``[[H_FF, 1], [1^T, 0]] [x; nu] = [top_F; bottom]`` for each column; ``x = 0`` off F.

    The system is padded to full size (identity rows off the face) and the border scaled to
    ``H``'s diagonal. ``H_FF`` may be singular (rank-deficient Gramians): it gets a ridge of a
    few ulps of its scale, and one step of iterative refinement recovers the unregularised
    solution where that one is well determined. ``top`` is ``(T, k)``, ``bottom`` ``(k,)``.
    """
    T = H.shape[0]
    dtype = H.dtype
    both = face[:, None] & face[None, :]
    Hf = jnp.where(both, H, 0.0)
    scale = jnp.max(jnp.where(face, jnp.abs(jnp.diagonal(H)), 0.0))
    scale = jnp.where(scale > 0, scale, 1.0)
    ridge = 64.0 * jnp.finfo(dtype).eps * scale
    eye = jnp.eye(T, dtype=dtype)
    border = scale * face.astype(dtype)

    def kkt(diag):
        return jnp.block(
            [[Hf + eye * diag, border[:, None]], [border[None, :], jnp.zeros((1, 1), dtype)]]
        )

    rhs = jnp.concatenate([jnp.where(face[:, None], top, 0.0), scale * bottom[None, :]])
    lu = jax.scipy.linalg.lu_factor(kkt(jnp.where(face, ridge, scale)))
    x = jax.scipy.linalg.lu_solve(lu, rhs)
    residual = rhs - jnp.dot(kkt(jnp.where(face, 0.0, scale)), x, precision=HIGHEST)
    x = x + jax.scipy.linalg.lu_solve(lu, residual)
    return jnp.where(face[:, None], x[:T], 0.0)


class _Carry(NamedTuple):
    w: jax.Array
    y: jax.Array  # FISTA's extrapolated point
    t: jax.Array  # FISTA's momentum parameter
    f: jax.Array
    g: jax.Array
    gap: jax.Array
    k: jax.Array
    stall: jax.Array  # steps since F last fell below its best value by more than rounding
    best: jax.Array  # the lowest F so far


def minimize_on_simplex(
    value_and_grad: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    curvature: Callable[[jax.Array], jax.Array],
    w0: jax.Array,
    mask: jax.Array,
    *,
    tol: float,
    max_iters: int,
    hessian: Callable[[jax.Array], jax.Array] | None = None,
    face_target: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    lower_bound: jax.Array | None = None,
    patience: int = 16,
    num_steps: int = 8,
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
      hessian: optional ``w -> (T, T)`` Hessian of F: each step then first tries a Newton
        step on the current face.
      face_target: optional ``(w, face) -> point``: the minimiser of F over the affine hull of
        the face (or a far point in a direction of descent where F is unbounded there); each
        step then also tries the move towards it.
      lower_bound: optional lower bound on ``min F`` known in advance; the reported gap is the
        smaller of the Frank-Wolfe gap and ``F(w) - lower_bound``.
      patience: stop (unconverged) after this many steps in a row that did not lower the best
        F by more than its rounding: the iterate is at the floor set by the dtype.
      num_steps: the step lengths tried along each direction (a factor 4 apart).

    Returns:
      The solution and a :class:`SolverInfo`.
    """
    w0 = jnp.asarray(w0)
    dtype = w0.dtype if jnp.issubdtype(w0.dtype, jnp.floating) else jnp.float32
    w = project(w0.astype(dtype), mask)
    eps = jnp.finfo(dtype).eps

    def gap_of(w, f, g):
        gap = fw_gap(w, g, mask)
        if lower_bound is not None:
            gap = jnp.minimum(gap, f - lower_bound)
        return gap

    def progress(c, f_new):
        # A decrease of the best F beyond its rounding, of the order of sum_i w_i |grad_i|
        # for F = w^T G w and for CAGrad's dual (both have F(w) = <grad F(w), w> up to a factor).
        scale = jnp.abs(c.f) + jnp.dot(jnp.abs(c.g), c.w, precision=HIGHEST)
        return f_new < c.best - 8.0 * eps * scale

    f, g = value_and_grad(w)
    zero = jnp.int32(0)
    carry = _Carry(w, w, jnp.ones((), dtype), f, g, gap_of(w, f, g), zero, zero, f)

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

    lengths = 0.25 ** jnp.arange(num_steps, dtype=dtype)

    def candidates(w, d, support):
        # (a) along d as far as feasible (the blocking coordinates leave) and shorter;
        shrink = support & (d < 0)
        ratio = jnp.where(shrink, w / jnp.where(shrink, -d, 1.0), jnp.inf)
        alpha = jnp.minimum(jnp.min(ratio), 1.0)
        wa = jnp.maximum(w[None, :] + (alpha * lengths)[:, None] * d[None, :], 0.0)
        wa = wa.at[0].set(jnp.where(ratio <= alpha, 0.0, wa[0]))
        # (b) steps of at most 1 in every coordinate, projected back onto the simplex.
        base = 1.0 / jnp.maximum(jnp.max(jnp.abs(d)), 1.0)
        wb = jax.vmap(lambda s: project(w + (base * s) * d, mask))(lengths)
        return jnp.concatenate([wa, wb])

    def active_set_step(c):
        lam = jnp.dot(c.g, c.w, precision=HIGHEST)
        support = mask & (c.w > 0)
        # Two faces: the support, and the support with the zero coordinates whose gradient
        # asks to enter (the Frank-Wolfe gap's direction).
        faces = (support, support | (mask & (c.g < lam)))
        directions = []
        for face in faces:
            if hessian is not None and (NEWTON or face_target is None):
                top = -c.g[:, None]
                d = _kkt_solve(hessian(c.w), top, jnp.zeros((1,), dtype), face)[:, 0]
                directions.append(d)
            if face_target is not None:
                directions.append(face_target(c.w, face) - c.w)
        cands = []
        for d in directions:
            d = jnp.where(support, d, jnp.maximum(d, 0.0))  # entering coordinates only grow
            cands.append(candidates(c.w, d, support))
        cands = jnp.concatenate(cands)
        cands = cands / jnp.maximum(jnp.sum(cands, axis=1, keepdims=True), jnp.finfo(dtype).tiny)
        fs, gs = jax.vmap(value_and_grad)(cands)
        fs = jnp.where(jnp.isfinite(fs), fs, jnp.inf)
        i = jnp.argmin(fs)
        w_new, f_new, g_new = cands[i], fs[i], gs[i]
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

    if hessian is None and face_target is None:
        body = fista
    else:

        def body(c):
            out, accept = active_set_step(c)
            return lax.cond(accept, lambda: out, lambda: fista(c))

    out = lax.while_loop(cond, body, carry)
    return out.w, SolverInfo(out.k, out.gap, out.gap <= tol)


def min_norm(G: jax.Array, w0: jax.Array, mask: jax.Array, *, tol: float, max_iters: int):
    """The min-norm point of the convex hull: ``argmin_{w in simplex} w^T G w`` (G normalised).

    F is quadratic: the Newton step on a face is its exact minimiser there. ``F* >= 0``.
    """
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

    The solve works on a factor ``L L^T`` of G (its PSD part, :func:`_psd_factor`):
    ``||L^T w||`` has an absolute error of a few ulps of the gradients' norms, where
    ``sqrt(w^T G w)`` has the square root of that (~3e-4 in float32) when ``g_w`` is small,
    near Pareto-stationary points, and the solver would chase that noise.

    On the affine hull of a face, the KKT conditions make the minimiser of F the QP solution
    ``x0 + t x1`` (``x0`` the face's min-norm point, ``x1`` the step that the linear term
    asks for, ``t = ||g_w|| / rho``), and ``F(x0 + t x1)`` is minimised over t in closed form:
    the active-set step is exact once the face is right, despite the square root's curvature
    near ``g_w = 0``. The FISTA fallback majorizes ``sqrt`` by its tangent at ``q(y)``, whose
    gradient is ``rho * lam_max(G) / sqrt(q(y))``-Lipschitz.

    F* >= min_t <g_t, d> for any d in CAGrad's ball (weak duality); ``d = max(1 - c, 0) g0``
    gives the lower bound that certifies Pareto-stationary points for ``c >= 1`` (F* = 0), where
    the Frank-Wolfe gap does not vanish (F is not differentiable at ``g_w = 0``).
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

    def norm_of(w):
        v = jnp.dot(w, L, precision=HIGHEST)
        return v, jnp.sqrt(jnp.dot(v, v, precision=HIGHEST))

    def value_and_grad(w):
        v, norm = norm_of(w)
        grad = jnp.dot(L, v0 + (rho / jnp.maximum(norm, floor)) * v, precision=HIGHEST)
        return jnp.dot(v, v0, precision=HIGHEST) + rho * norm, grad

    def curvature(y):
        return rho * lam / jnp.maximum(norm_of(y)[1], floor)

    def hessian(w):
        v, norm = norm_of(w)
        norm = jnp.maximum(norm, floor)
        u = jnp.dot(L, v, precision=HIGHEST) / norm
        return (rho / norm) * (Gp - u[:, None] * u[None, :])

    def face_target(w, face):
        top = jnp.stack([jnp.zeros_like(Gb), -Gb], axis=1)
        x = _kkt_solve(Gp, top, jnp.array([1.0, 0.0], dtype), face)
        x0, x1 = x[:, 0], x[:, 1]
        p0, p1 = jnp.dot(x0, L, precision=HIGHEST), jnp.dot(x1, L, precision=HIGHEST)
        q0 = jnp.dot(p0, p0, precision=HIGHEST)
        q01 = jnp.dot(p0, p1, precision=HIGHEST)
        q11 = jnp.dot(p1, p1, precision=HIGHEST)
        l1 = jnp.dot(p1, v0, precision=HIGHEST)
        # F(t) = const + l1 t + rho sqrt(q11 (t + q01/q11)^2 + D): minimised in closed form
        # where rho^2 q11 > l1^2; otherwise F falls without bound along -sign(l1) x1.
        ok = q11 > 0
        q11s = jnp.where(ok, q11, 1.0)
        D = jnp.maximum(q0 - q01 * q01 / q11s, 0.0)
        den = rho * rho * q11 - l1 * l1
        bounded = ok & (den > 0)
        tau = -l1 * jnp.sqrt(D / (q11s * jnp.where(bounded, den, 1.0)))
        far = -jnp.sign(l1) * 4.0 / jnp.maximum(jnp.max(jnp.abs(x1)), floor)
        t = jnp.where(bounded, tau - q01 / q11s, far)
        return jnp.where(ok, x0 + t * x1, x0)

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
        face_target=face_target,
        lower_bound=lower,
    )
