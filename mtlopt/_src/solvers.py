"""Small dense solvers on ``(T,)`` and ``(T, T)`` arrays, run inside the user's jit.

One solver serves every method that minimises a convex function over the probability
simplex (MGDA's min-norm point, CAGrad's dual). It is an active-set method for these small
dense problems; each step:

* solves, in one batched LU factorisation, the Newton step of F on two faces (the support,
  and the support plus the zero coordinates whose gradient asks to enter) and, for CAGrad,
  the exact minimiser of F on the affine hull of each face;
* follows each direction at 8 step lengths, with a ratio test (the blocking coordinates leave
  the support) and, as an alternative, projected back onto the simplex
  (``optax.projections``);
* takes the candidate of lowest F when that lowers F beyond rounding, otherwise the one of
  smallest duality gap among those no higher (near the optimum F is flat to second order while
  the gap is first order: in float32 only the gap still shows progress);
* and when no candidate qualifies, takes an accelerated projected-gradient step (FISTA with
  function-value restarts), which guarantees progress and lets new coordinates in.

It stops on a duality gap, the Frank-Wolfe gap ``<grad F(w), w> - min_i grad F(w)_i`` (an
upper bound on ``F(w) - F*`` for convex F) with each coordinate of the gradient granted its
rounding (or ``F(w) - lower_bound`` where a lower bound on F* is known and that is smaller):
when the gap is at most ``tol`` relative to F's own scale, or at most F's rounding at w
(``_evaluate``); after ``max_iters`` steps; or after ``patience`` steps in a row that did not
lower F beyond its rounding. The scale, and what ``tol`` buys on the update d:

* MGDA: ``F(w) = |d_w|^2`` and ``|d_w - d*|^2 <= F(w) - F*``: a gap of ``tol * F(w)`` puts d
  within ``sqrt(tol) |d|`` of d* (1e-3 at the default 1e-6);
* CAGrad: with ``v = g_w``, ``F(w) - F* >= rho |v| |u_v - u*|^2 / 2`` (u the unit direction),
  and ``d = g0 + rho u_v``, so ``|d_w - d*|^2 <= 2 rho (F(w) - F*) / |v|``: a gap of
  ``tol * rho |v| / 2`` puts d within ``sqrt(tol) * rho`` of d*.

The floor is F's rounding, a few ulps of ``w^T |G| w <= (sum_i w_i sqrt(G_ii))^2`` (not of
``trace(G)``, far too coarse where the optimum is a small fraction of it), so badly scaled
problems (gradient norms spread by orders of magnitude, an optimum near 0) are solved to the
precision's rounding of the Gramian. The loop is a ``lax.while_loop``; it never raises, it
reports (:class:`SolverInfo`). Warm-started from the previous step's solution it usually stops
after 0 or 1 step: the Newton step on the right face is exact for MGDA, and so is the face solve
for CAGrad; from the uniform weights it takes a few (up to ~20 on hard float32 problems,
T <= 64). On GPU each step of a ``lax.while_loop`` brings its predicate back to the host.

Two tasks take closed forms instead (the simplex is a segment: the minimum of a convex function
of one variable): exact, no loop and no per-step host synchronisation (``_two_tasks``).

Callers hand in a trace-normalised Gramian (``trace = T``), which keeps the arithmetic clear of
over- and underflow; the stop does not depend on it. Everything follows the Gramian's dtype
(float32, or float64 with ``jax_enable_x64``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike
from optax import projections

HIGHEST = lax.Precision.HIGHEST

# The rounding of a sum of terms, in ulps of the sum of their magnitudes (see _evaluate).
_ULPS = 4.0


class SolverInfo(NamedTuple):
    """What a solve reports: steps taken, final duality gap, and whether it met the stop.

    ``converged``: the gap reached ``tol`` relative to F's scale, or F's rounding (see the
    module docstring), rather than the iteration cap or the ``patience`` stop.
    """

    num_steps: jax.Array  # int32
    # G's dtype, in units of trace(G) / T: the duality gap with the gradient's rounding granted
    # (with F's rounding, an upper bound on F(w) - F*)
    gap: jax.Array
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


def normalize(G: jax.Array, mask: jax.Array) -> jax.Array:
    """``G`` over the active tasks scaled to trace = number of active tasks.

    Entries of inactive tasks are set to zero. A zero Gramian stays zero. For traces above
    ~1e38 (float32) the factor ``count / trace`` is subnormal and XLA:CPU flushes it to zero
    (as it would ``1 / trace``, which XLA may put in place of a division): there it is
    applied as two factors ``sqrt(count / trace)``.
    """
    both = mask[:, None] & mask[None, :]
    G = jnp.where(both, G, 0.0)
    trace = jnp.trace(G)
    active = jnp.sum(mask).astype(G.dtype)
    ok = trace > 0
    trace = jnp.where(ok, trace, 1.0)
    factor = active / trace
    r = jnp.sqrt(active) / jnp.sqrt(trace)
    scaled = jnp.where(factor >= jnp.finfo(G.dtype).tiny, G * factor, (G * r) * r)
    return jnp.where(ok, scaled, G)


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


def preference(weights: Any, mask: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Weights on the active tasks: ``uniform`` where ``weights`` is None; a given ``(T,)``
    vector keeps its total when tasks are masked out (its active part rescaled)."""
    if weights is None:
        return uniform(mask, dtype)
    full = jnp.asarray(weights).astype(dtype)
    kept = jnp.where(mask, full, 0.0)
    total = jnp.sum(kept)
    return jnp.where(total > 0, kept * (jnp.sum(full) / jnp.where(total > 0, total, 1.0)), 0.0)


def fw_gap(w: jax.Array, grad: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.dot(grad, w, precision=HIGHEST) - jnp.min(jnp.where(mask, grad, jnp.inf))


class Rounding(NamedTuple):
    """The rounding errors of F and of grad F at a point, in absolute terms (eps included).

    ``f``: a scalar; ``g``: ``(T,)``, one per coordinate (0 where a coordinate's rounding is
    not to be trusted: the gap then takes that coordinate's computed gradient as it is).
    """

    f: jax.Array
    g: jax.Array


# The callables a simplex problem is given by (see minimize_on_simplex).
_ValueAndGrad = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
_RoundingFn = Callable[[jax.Array], Rounding]
_SizeFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class _Eval(NamedTuple):
    f: jax.Array
    g: jax.Array
    gap: jax.Array  # the reported gap
    bar: jax.Array  # the stop: gap <= bar
    slack: jax.Array  # F's rounding: a change of F smaller than this is no change


def _evaluate(
    w: jax.Array,
    value_and_grad: _ValueAndGrad,
    rounding: _RoundingFn,
    size: _SizeFn,
    mask: jax.Array,
    lower_bound: jax.Array | None,
    tol: float,
) -> _Eval:
    """F, its gradient, the duality gap at ``w`` and the bar it must reach.

    The gap is the Frank-Wolfe gap with each coordinate's gradient granted its rounding,
    ``<g, w> - min_i (g_i + r_i)`` (or ``F(w) - lower_bound`` where that is smaller). For a
    convex F, ``F(w) - F* <= gap + <w + w*, r>`` (the gradient is only known to ``r``), and
    ``<w + w*, r>`` is of the order of F's own rounding: it is small even where a coordinate
    of large gradient norm, whose gradient is a sum of large terms that cancel, carries a
    rounding far above F's (a badly scaled Gramian), because such coordinates carry small
    weights.

    The bar: ``max(tol * size(w, F, g), floor)``, ``floor`` the rounding of F (relative
    accuracy where F's scale allows, F's rounding where it does not).
    """
    f, g = value_and_grad(w)
    r = rounding(w)
    gap = jnp.dot(g, w, precision=HIGHEST) - jnp.min(jnp.where(mask, g + r.g, jnp.inf))
    if lower_bound is not None:
        gap = jnp.minimum(gap, f - lower_bound)
    bar = jnp.maximum(tol * jnp.maximum(size(w, f, g), 0.0), r.f)
    return _Eval(f, g, gap, bar, r.f)


def _spread(G: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For T = 2: ``|g0 - g1|^2`` and whether it is zero up to rounding (equal gradients)."""
    dist2 = G[0, 0] + G[1, 1] - 2.0 * G[0, 1]
    return dist2, dist2 <= 8.0 * jnp.finfo(G.dtype).eps * (G[0, 0] + G[1, 1])


def _two_tasks(
    a: jax.Array,
    free: jax.Array,
    w0: jax.Array,
    mask: jax.Array,
    value_and_grad: _ValueAndGrad,
    rounding: _RoundingFn,
    size: _SizeFn,
    lower_bound: jax.Array | None,
    tol: float,
) -> tuple[jax.Array, SolverInfo]:
    """The answer for T = 2 from ``a``, the weight of task 0 on the segment ``(a, 1 - a)``.

    Where ``free``, every point is optimal and the (projected) start is kept. One active task
    takes weight 1, none leaves 0. Reported as the loop would: 0 steps, the gap at the answer.
    Two tasks have closed forms (the minimum of a convex function of one variable on [0, 1]):
    no ``lax.while_loop``, hence no predicate to bring back to the host per step on GPU, and
    no stopping rule.
    """
    start = project(w0, mask)
    a = jnp.where(free | ~jnp.isfinite(a), start[0], jnp.clip(a, 0.0, 1.0))
    w = jnp.where(mask[0] & mask[1], jnp.stack([a, 1.0 - a]), mask.astype(w0.dtype))
    e = _evaluate(w, value_and_grad, rounding, size, mask, lower_bound, tol)
    return w, SolverInfo(jnp.zeros((), jnp.int32), e.gap, e.gap <= e.bar)


def _kkt_solve(
    H: jax.Array, top: jax.Array, bottom: jax.Array, face: jax.Array, ridge: jax.Array
) -> jax.Array:
    """Solves ``[[H_FF, 1], [1^T, 0]] [x; nu] = [top_F; bottom]``, ``x = 0`` off the face F.

    Batched: ``H`` is ``(m, T, T)``, ``top`` ``(m, T, k)``, ``bottom`` ``(m, k)``, ``face``
    ``(m, T)``, ``ridge`` ``(m,)``; one batched LU factorisation serves all ``m`` systems
    (jaxlib 0.10's CPU LU can deadlock when two batched factorisations run at once, which
    independent solves under ``vmap`` do on a 2-thread pool).

    Each system is padded to full size (identity rows off the face) and equilibrated: rows and
    columns are divided by ``sqrt(H_ii)``, so tasks whose gradients differ in norm by orders of
    magnitude weigh alike in the factorisation. ``H_FF`` may be singular (rank-deficient
    Gramians): the scaled matrix gets a ridge of ``ridge`` ulps, and two steps of iterative
    refinement recover the unregularised solution where that one is well determined.
    """
    m, T, _ = H.shape
    dtype = H.dtype
    eps = jnp.finfo(dtype).eps
    both = face[:, :, None] & face[:, None, :]
    diag = jnp.abs(jnp.diagonal(H, axis1=1, axis2=2))  # (m, T)
    scale = jnp.max(jnp.where(face, diag, 0.0), axis=1, keepdims=True)
    scale = jnp.where(scale > 0, scale, 1.0)
    d = jnp.where(face, 1.0 / jnp.sqrt(jnp.maximum(diag, eps * eps * scale)), 1.0)  # (m, T)
    S = jnp.where(both, H * d[:, :, None] * d[:, None, :], 0.0)
    gamma = 1.0 / jnp.max(jnp.where(face, d, 0.0), axis=1, keepdims=True)
    gamma = jnp.where(jnp.isfinite(gamma), gamma, 1.0)
    border = jnp.where(face, gamma * d, 0.0)  # (m, T)
    eye = jnp.eye(T, dtype=dtype)[None]

    def kkt(diagonal: jax.Array) -> jax.Array:  # (m, T): what is added to the diagonal of S
        upper = jnp.concatenate([S + eye * diagonal[:, None, :], border[:, :, None]], axis=2)
        lower = jnp.concatenate([border[:, None, :], jnp.zeros((m, 1, 1), dtype)], axis=2)
        return jnp.concatenate([upper, lower], axis=1)

    rhs = jnp.concatenate(
        [jnp.where(face[:, :, None], d[:, :, None] * top, 0.0), (gamma * bottom)[:, None]], 1
    )
    lu = jax.scipy.linalg.lu_factor(kkt(jnp.where(face, ridge[:, None] * eps, 1.0)))
    solve = jax.vmap(jax.scipy.linalg.lu_solve)
    y = solve(lu, rhs)
    exact = kkt(jnp.where(face, 0.0, 1.0))
    for _ in range(2):
        y = y + solve(lu, rhs - jnp.einsum("mij,mjk->mik", exact, y, precision=HIGHEST))
    return jnp.where(face[:, :, None], d[:, :, None] * y[:, :T], 0.0)


class FaceSolve(NamedTuple):
    """How to find the minimiser of F on the affine hull of a face from one KKT solve.

    ``x = _kkt_solve(matrix, rhs, rhs_sum, face, ridge)`` (``rhs`` ``(T, k)``, ``rhs_sum``
    ``(k,)``, ``ridge`` in ulps of the matrix's scale) and the point is ``finish(x)``.
    """

    matrix: jax.Array
    rhs: jax.Array
    rhs_sum: jax.Array
    finish: Callable[[jax.Array], jax.Array]
    ridge: float = 64.0


class _Carry(NamedTuple):
    w: jax.Array
    y: jax.Array  # FISTA's extrapolated point
    t: jax.Array  # FISTA's momentum parameter
    e: _Eval  # F, its gradient, the gap and the stop's bar at w
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
    rounding: Callable[[jax.Array], Rounding],
    size: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
    hessian: Callable[[jax.Array], jax.Array] | None = None,
    face_solve: FaceSolve | None = None,
    newton_ridge: float = 64.0,
    lower_bound: jax.Array | None = None,
    patience: int = 8,
    num_steps: int = 8,
) -> tuple[jax.Array, SolverInfo]:
    """Minimises a convex F over the simplex of the active tasks.

    Args:
      value_and_grad: ``w -> (F(w), grad F(w))``.
      curvature: ``y -> L``, a Lipschitz bound for grad F valid on a step from ``y`` (for a
        non-smooth F, the curvature of a majorizer of F that touches it at ``y``).
      w0: the starting point (projected first), e.g. the last step's solution.
      mask: ``(T,)`` bool, the coordinates that may be nonzero.
      tol: relative: stop once the gap is at most ``tol * size(w, F(w), grad F(w))``, or at
        most the rounding of F (``rounding(w).f``), whichever is larger.
      max_iters: the iteration cap (static).
      rounding: ``w -> Rounding``, the rounding errors of F and of each coordinate of its
        gradient at ``w`` (see :func:`_evaluate`).
      size: the scale of F that ``tol`` is relative to; default ``F(w) - lower_bound`` (F(w)
        where no lower bound is given).
      hessian: optional ``w -> (T, T)`` Hessian of F: each step then first tries a Newton
        step on the current face.
      face_solve: optional :class:`FaceSolve`, the minimiser of F over the affine hull of a
        face (or a far point in a direction of descent where F is unbounded there); each step
        then also tries the move towards it.
      newton_ridge: the ridge added to the Newton system's Hessian, in ulps of its diagonal.
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
    w0 = jnp.where(mask, w0.astype(dtype), 0.0)
    total = jnp.sum(w0)
    # A start on the simplex up to rounding (a warm start) is rescaled, which keeps its zeros
    # (a projection could lift them all by the rounding of the sum); any other is projected.
    on = jnp.all(w0 >= 0) & (jnp.abs(total - 1.0) <= 1e-3)
    w = jnp.where(on, w0 / jnp.where(on, total, 1.0), project(w0, mask))
    T = w.shape[0]
    if size is None:
        base = jnp.zeros((), dtype) if lower_bound is None else lower_bound
        size = lambda w, f, g: f - base

    def evaluate(w: jax.Array) -> _Eval:
        return _evaluate(w, value_and_grad, rounding, size, mask, lower_bound, tol)

    def progress(c: _Carry, f_new: jax.Array) -> jax.Array:
        # A decrease of the best F beyond its rounding.
        return f_new < c.best - c.e.slack

    e = evaluate(w)
    zero = jnp.int32(0)
    carry = _Carry(w, w, jnp.ones((), dtype), e, zero, zero, e.f)

    def cond(c: _Carry) -> jax.Array:
        return (c.e.gap > c.e.bar) & (c.k < max_iters) & (c.stall < patience)

    def pick(accept: jax.Array, new: _Eval, old: _Eval) -> _Eval:
        return jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)

    def fista(c: _Carry) -> _Carry:
        _, gy = value_and_grad(c.y)
        L = curvature(c.y)
        step = jnp.where(L > 0, 1.0 / jnp.where(L > 0, L, 1.0), 0.0)
        w_new = project(c.y - step * gy, mask)
        e_new = evaluate(w_new)
        # A plain projected step (t == 1) never increases F; an accelerated one may: then restart.
        accept = (e_new.f <= c.e.f) | (c.t == 1.0)
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * c.t * c.t))
        y_next = w_new + ((c.t - 1.0) / t_next) * (w_new - c.w)
        return _Carry(
            w=jnp.where(accept, w_new, c.w),
            y=jnp.where(accept, y_next, c.w),
            t=jnp.where(accept, t_next, 1.0),
            e=pick(accept, e_new, c.e),
            k=c.k + 1,
            stall=jnp.where(accept & progress(c, e_new.f), 0, c.stall + 1),
            best=jnp.minimum(c.best, jnp.where(accept, e_new.f, c.best)),
        )

    lengths = 0.25 ** jnp.arange(num_steps, dtype=dtype)

    def candidates(w: jax.Array, d: jax.Array, support: jax.Array) -> jax.Array:
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

    def active_set_step(c: _Carry) -> tuple[_Carry, jax.Array]:
        lam = jnp.dot(c.e.g, c.w, precision=HIGHEST)
        support = mask & (c.w > 0)
        # Two faces: the support, and the support with the zero coordinates whose gradient
        # asks to enter (the Frank-Wolfe gap's direction).
        faces = [support, support | (mask & (c.e.g < lam))]
        face = jnp.stack(faces)
        mats, rhss, sums, ridges = [], [], [], []  # all systems go to one batched solve
        if hessian is not None:
            mats.append(jnp.broadcast_to(hessian(c.w), (2, T, T)))
            rhss.append(jnp.broadcast_to(jnp.stack([-c.e.g, jnp.zeros_like(c.e.g)], 1), (2, T, 2)))
            sums.append(jnp.zeros((2, 2), dtype))
            ridges.append(jnp.full((2,), newton_ridge, dtype))
        if face_solve is not None:
            fsol = face_solve
            rhs = jnp.zeros((T, 2), dtype).at[:, : fsol.rhs.shape[1]].set(fsol.rhs)
            rhs_sum = jnp.zeros((2,), dtype).at[: fsol.rhs_sum.shape[0]].set(fsol.rhs_sum)
            mats.append(jnp.broadcast_to(fsol.matrix, (2, T, T)))
            rhss.append(jnp.broadcast_to(rhs, (2, T, 2)))
            sums.append(jnp.broadcast_to(rhs_sum, (2, 2)))
            ridges.append(jnp.full((2,), fsol.ridge, dtype))
        n = len(mats)
        xs = _kkt_solve(
            jnp.concatenate(mats),
            jnp.concatenate(rhss),
            jnp.concatenate(sums),
            jnp.concatenate([face] * n),
            jnp.concatenate(ridges),
        )
        directions = []
        if hessian is not None:
            directions.append(xs[:2, :, 0])
        if face_solve is not None:
            directions.append(jax.vmap(face_solve.finish)(xs[-2:]) - c.w[None, :])
        d = jnp.concatenate(directions)
        d = jnp.where(support[None, :], d, jnp.maximum(d, 0.0))  # entering coordinates only grow
        cands = jax.vmap(candidates, in_axes=(None, 0, None))(c.w, d, support)
        cands = cands.reshape(-1, T)
        total = jnp.sum(cands, axis=1)
        cands = cands / jnp.where(total > 0, total, 1.0)[:, None]
        es = jax.vmap(evaluate)(cands)
        fs = jnp.where(jnp.isfinite(es.f) & (total > 0), es.f, jnp.inf)
        # The lowest F; where none is lower beyond rounding (F is flat to second order near
        # the optimum, its gap is first order), the smallest gap among those no higher.
        slack = c.e.slack
        i_f = jnp.argmin(fs)
        tie = (fs <= c.e.f + slack) & (es.gap < c.e.gap)
        i_gap = jnp.argmin(jnp.where(tie, es.gap, jnp.inf))
        by_f = fs[i_f] < c.e.f - slack
        i = jnp.where(by_f, i_f, i_gap)
        accept = by_f | jnp.any(tie)
        w_new = cands[i]
        e_new = jax.tree.map(lambda x: x[i], es)
        out = _Carry(
            w=jnp.where(accept, w_new, c.w),
            y=jnp.where(accept, w_new, c.y),
            t=jnp.where(accept, 1.0, c.t),
            e=pick(accept, e_new, c.e),
            k=c.k + 1,
            stall=jnp.where(progress(c, e_new.f), 0, c.stall + 1),
            best=jnp.minimum(c.best, jnp.where(accept, e_new.f, c.best)),
        )
        return out, accept

    if hessian is None and face_solve is None:
        body = fista
    else:

        def body(c: _Carry) -> _Carry:
            out, accept = active_set_step(c)
            return lax.cond(accept, lambda: out, lambda: fista(c))

    out = lax.while_loop(cond, body, carry)
    return out.w, SolverInfo(out.k, out.e.gap, out.e.gap <= out.e.bar)


def min_norm(
    G: jax.Array, w0: jax.Array, mask: jax.Array, *, tol: float, max_iters: int
) -> tuple[jax.Array, SolverInfo]:
    """The min-norm point of the convex hull: ``argmin_{w in simplex} w^T G w`` (G normalised).

    F is quadratic: the Newton step on a face is its exact minimiser there. ``F* >= 0``. The
    stop: a gap of ``tol * F(w)``; as ``|d_w - d*|^2 <= F(w) - F*``, d is then within
    ``sqrt(tol) |d_w|`` of the min-norm point (or at F's rounding).
    """
    L = 2.0 * spectral_bound(G)
    A = jnp.abs(G)
    ulps = _ULPS * jnp.finfo(G.dtype).eps

    def value_and_grad(w: jax.Array) -> tuple[jax.Array, jax.Array]:
        Gw = matvec(G, w)
        return jnp.dot(w, Gw, precision=HIGHEST), 2.0 * Gw

    def rounding(w: jax.Array) -> Rounding:
        # F = w^T G w and (G w)_i are sums of terms w_i G_ij w_j and G_ij w_j: their rounding is
        # a few ulps of the sums of the terms' magnitudes, w^T |G| w <= (sum_i w_i sqrt(G_ii))^2
        # and (|G| w)_i. The latter is far larger for a task of large norm and small weight.
        Aw = matvec(A, w)
        return Rounding(ulps * jnp.dot(w, Aw, precision=HIGHEST), 2.0 * ulps * Aw)

    zero = jnp.zeros((), G.dtype)
    w0 = jnp.asarray(w0).astype(G.dtype)
    if G.shape[0] == 2:
        # |a g0 + (1 - a) g1|^2 is least at a = <g1, g1 - g0> / |g0 - g1|^2 (clipped to [0, 1]);
        # identical gradients: every point.
        dist2, free = _spread(G)
        a = (G[1, 1] - G[0, 1]) / jnp.where(free, 1.0, dist2)
        size = lambda w, f, g: f
        return _two_tasks(a, free, w0, mask, value_and_grad, rounding, size, zero, tol)

    return minimize_on_simplex(
        value_and_grad,
        lambda y: L,
        w0,
        mask,
        tol=tol,
        max_iters=max_iters,
        rounding=rounding,
        hessian=lambda w: 2.0 * G,
        lower_bound=zero,
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
) -> tuple[jax.Array, SolverInfo]:
    """CAGrad's dual ``argmin_{w in simplex} w^T G b + rho * sqrt(w^T G w)`` (G normalised).

    On the affine hull of a face, the KKT conditions make the minimiser of F the QP solution
    ``x0 + t x1`` (``x0`` the face's min-norm point, ``x1`` the step that the linear term
    asks for, ``t = ||g_w|| / rho``), and ``F(x0 + t x1)`` is minimised over t in closed form:
    the active-set step is exact once the face is right, despite the square root's curvature
    near ``g_w = 0`` (a Newton step on F is tried as well). The FISTA fallback majorizes
    ``sqrt`` by its tangent at ``q(y)``, whose gradient is ``rho * lam_max(G) / sqrt(q(y))``
    Lipschitz.

    F* >= min_t <g_t, d> for any d in CAGrad's ball (weak duality); ``d = max(1 - c, 0) g0``
    gives the lower bound that certifies Pareto-stationary points for ``c >= 1`` (F* = 0), where
    the Frank-Wolfe gap does not vanish (F is not differentiable at ``g_w = 0``).

    The stop: a gap of ``tol * rho * ||g_w|| / 2`` puts the update ``g0 + rho g_w / ||g_w||``
    within ``sqrt(tol) * rho`` of the exact one (``|d_w - d*|^2 <= 2 rho (F(w) - F*) / |g_w|``).

    Precision: ``||g_w||`` is the square root of ``w^T G w``, whose rounding error is a few ulps
    of ``w^T |G| w``; where ``g_w`` is that small (near Pareto-stationary points) F is only
    known to about ``rho * sqrt(ulp * w^T |G| w)``, and that is where the stop's floor lies.
    """
    dtype = G.dtype
    G = 0.5 * (G + G.T)
    b = jnp.asarray(b).astype(dtype)
    rho = jnp.asarray(rho).astype(dtype)
    lam = spectral_bound(G)
    Gb = matvec(G, b)
    floor = jnp.sqrt(jnp.asarray(jnp.finfo(dtype).tiny, dtype))

    def norm_of(w: jax.Array) -> tuple[jax.Array, jax.Array]:
        Gw = matvec(G, w)
        return Gw, jnp.sqrt(jnp.maximum(jnp.dot(w, Gw, precision=HIGHEST), 0.0))

    def value_and_grad(w: jax.Array) -> tuple[jax.Array, jax.Array]:
        Gw, norm = norm_of(w)
        value = jnp.dot(w, Gb, precision=HIGHEST) + rho * norm
        return value, Gb + (rho / jnp.maximum(norm, floor)) * Gw

    def curvature(y: jax.Array) -> jax.Array:
        return rho * lam / jnp.maximum(norm_of(y)[1], floor)

    A = jnp.abs(G)
    Ab = matvec(A, b)
    eps = jnp.finfo(dtype).eps
    ulps = _ULPS * eps

    def rounding(w: jax.Array) -> Rounding:
        # F = w^T G b + rho sqrt(q), q = w^T G w; grad F = G b + (rho / sqrt(q)) G w. The
        # rounding of q is dq (as for MGDA); that of sqrt(q) is at most dq / (2 sqrt(q)) and
        # sqrt(dq). The direction G w / sqrt(q) has rounding rho (|G| w / sqrt(q) +
        # |G w| dq / (2 q^1.5)); where q is below 64 dq that direction is noise, and the gap
        # takes the computed gradient as it is (no allowance) rather than trust none of it.
        Gw, norm = norm_of(w)
        Aw = matvec(A, w)
        qa = jnp.dot(w, Aw, precision=HIGHEST)
        dq = ulps * qa
        nf = jnp.maximum(norm, floor)
        r_f = ulps * jnp.dot(w, Ab, precision=HIGHEST) + rho * jnp.minimum(
            dq / (2.0 * nf), jnp.sqrt(eps * qa)
        )
        known = norm * norm > 64.0 * dq
        n = jnp.where(known, nf, 1.0)
        r_dir = rho * (ulps * Aw / n + jnp.abs(Gw) * dq / (2.0 * n * n * n))
        return Rounding(r_f, ulps * Ab + jnp.where(known, r_dir, 0.0))

    def size(w: jax.Array, f: jax.Array, g: jax.Array) -> jax.Array:
        # |d - d*|^2 <= 2 rho (F(w) - F*) / |g_w| (see the docstring): F(w) - F* at most
        # tol * rho |g_w| / 2 puts d within sqrt(tol) * rho of d*.
        return 0.5 * rho * norm_of(w)[1]

    def hessian(w: jax.Array) -> jax.Array:
        Gw, norm = norm_of(w)
        norm = jnp.maximum(norm, floor)
        u = Gw / norm
        return (rho / norm) * (G - u[:, None] * u[None, :])

    def finish(x: jax.Array) -> jax.Array:
        x0, x1 = x[:, 0], x[:, 1]
        q0 = jnp.maximum(quad(G, x0), 0.0)
        q01 = jnp.dot(x0, matvec(G, x1), precision=HIGHEST)
        q11 = jnp.maximum(quad(G, x1), 0.0)
        l1 = jnp.dot(x1, Gb, precision=HIGHEST)
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

    # x0: the face's min-norm point (sum 1); x1: the least-squares step for -G b (sum 0).
    rhs = jnp.stack([jnp.zeros_like(Gb), -Gb], axis=1)
    face_solve = FaceSolve(G, rhs, jnp.array([1.0, 0.0], dtype), finish)

    # Weak duality: d = max(1 - c, 0) g0 lies in CAGrad's ball, so F* >= min_t <g_t, d>.
    g0_norm = jnp.sqrt(jnp.maximum(jnp.dot(b, Gb, precision=HIGHEST), 0.0))
    c = rho / jnp.where(g0_norm > 0, g0_norm, 1.0)
    lower = jnp.maximum(1.0 - c, 0.0) * jnp.min(jnp.where(mask, Gb, jnp.inf))
    lower = jnp.where(jnp.any(mask), lower, 0.0)

    if G.shape[0] == 2:
        # On w = (a, 1 - a): F(a) = const + c1 a + rho sqrt(qa a^2 + 2 qb a + qc). With
        # s = qa a + qb, qa q = s^2 + det (det = qa qc - qb^2 >= 0), F'(a) = 0 at
        # s = -c1 sqrt(det / (qa rho^2 - c1^2)) where qa rho^2 > c1^2 (F convex: clip to [0, 1]);
        # otherwise F is monotone, least at the end c1 points away from. qa = 0 (equal
        # gradients): F is linear in a.
        qa, flat = _spread(G)
        qb = G[0, 1] - G[1, 1]
        det = jnp.maximum(G[0, 0] * G[1, 1] - G[0, 1] * G[0, 1], 0.0)
        c1 = Gb[0] - Gb[1]
        den = qa * rho * rho - c1 * c1
        bounded = ~flat & (den > 0)
        s = -c1 * jnp.sqrt(det / jnp.where(bounded, den, 1.0))
        end = jnp.where(c1 > 0, 0.0, 1.0)
        a = jnp.where(bounded, (s - qb) / jnp.where(flat, 1.0, qa), end)
        free = (flat | (den <= 0)) & (c1 == 0)
        w0 = jnp.asarray(w0).astype(dtype)
        return _two_tasks(a, free, w0, mask, value_and_grad, rounding, size, lower, tol)

    return minimize_on_simplex(
        value_and_grad,
        curvature,
        jnp.asarray(w0).astype(dtype),
        mask,
        tol=tol,
        max_iters=max_iters,
        rounding=rounding,
        size=size,
        hessian=hessian,
        face_solve=face_solve,
        # The Hessian's scale grows as rho / ||g_w|| near g_w = 0: a ridge of 64 ulps of it
        # swamps the directions that matter there (measured: more steps in float32).
        newton_ridge=1.0,
        lower_bound=lower,
    )


# Projections onto the dual cone {x : J x >= 0} (UPGrad, DualProj), in Gramian form: for each
# row u of U, ``v = argmin_{v >= u} v^T G v``; then ``J^T v`` is the projection of ``J^T u``.


class _ConeEval(NamedTuple):
    f: jax.Array  # (..., m) F(v) = v^T G v
    g: jax.Array  # (..., m, T) G v (half the gradient)
    gap: jax.Array  # (..., m) the reported gap: complementarity plus the dual infeasibility
    viol: jax.Array  # (..., m, T) bool: G v < 0 beyond its rounding (dual infeasible)
    ok: jax.Array  # (..., m) bool: the stop is met
    slack: jax.Array  # (..., m) F's rounding


class _ConeCarry(NamedTuple):
    x: jax.Array  # (m, T) the shift v - u >= 0
    e: _ConeEval
    done: jax.Array  # (m,) bool
    stall: jax.Array  # (m,) int32: steps in a row without progress
    k: jax.Array  # int32


def _cone_evaluate(
    G: jax.Array,
    A: jax.Array,
    U: jax.Array,
    X: jax.Array,
    live: jax.Array,
    diag: jax.Array,
    tol: float,
    ulps: Any,
) -> _ConeEval:
    """F, G v, the stop and the gap at ``v = U + X`` (any leading batch axes on X).

    With ``g = G v`` (each entry known to ``r = ulps (|G| |v|)``), the optimum ``x*`` and
    convexity, ``F(v) - F* <= 2 g^T x - 2 sum_i min(g_i, 0) x*_i``. Where every ``g_i >= -r_i``
    (dual feasible up to rounding) the last sum is at most ``2 r^T x*``, a few ulps of
    ``|v*|^T |G| |v|``: F's own rounding. The stop asks for that and for the complementarity
    ``2 g^T x <= max(tol F(v), 2 * F's rounding)``.
    """
    live, diag = jnp.broadcast_to(live, X.shape), jnp.broadcast_to(diag, X.shape)
    V = jnp.broadcast_to(U, X.shape) + X
    g = jnp.einsum("...j,jk->...k", V, G, precision=HIGHEST)
    f = jnp.sum(V * g, axis=-1)
    Va = jnp.abs(V)
    Av = jnp.einsum("...j,jk->...k", Va, A, precision=HIGHEST)
    r = ulps * Av
    rf = ulps * jnp.sum(Va * Av, axis=-1)
    comp = 2.0 * jnp.sum(X * g, axis=-1)
    short = jnp.where(live, jnp.minimum(g + r, 0.0), 0.0)
    viol = short < 0
    # The decrease one coordinate step would give: a lower bound on F(v) - F*, 0 when feasible.
    infeasible = jnp.sum(short * short / diag, axis=-1)
    bar = jnp.maximum(tol * jnp.maximum(f, 0.0), 2.0 * rf)
    # F* >= 0: F(v) itself bounds F(v) - F* (where the optimum is 0, or nearly).
    ok = (~jnp.any(viol, axis=-1) & (comp <= bar)) | (f <= bar)
    gap = jnp.minimum(jnp.maximum(comp, 0.0) + infeasible, jnp.maximum(f, 0.0))
    return _ConeEval(f, g, gap, viol, ok, rf)


def _face_steps(
    G: jax.Array, root: jax.Array, g: jax.Array, faces: jax.Array, ridge: float
) -> jax.Array:
    """For each face F (a bool (k, T) batch) the Newton step of F on it: ``p`` with
    ``G_FF p_F = -g_F`` and ``p = 0`` off F (``g``: ``(k, T)``, G v at the current point).

    Equilibrated (rows and columns divided by ``sqrt(G_ii)``, so tasks whose gradients differ
    in norm by orders of magnitude weigh alike), with a ridge of ``ridge`` ulps for singular
    ``G_FF`` (rank-deficient Gramians: the systems are consistent, ``g_F`` lies in the range of
    ``G_FF``) and two steps of iterative refinement against the exact matrix. One batched LU
    factorisation for all k systems.
    """
    T = g.shape[1]
    dtype = G.dtype
    eps = jnp.finfo(dtype).eps
    ds = jnp.where(faces, 1.0 / root[None, :], 1.0)
    both = faces[:, :, None] & faces[:, None, :]
    S = jnp.where(both, G[None] * ds[:, :, None] * ds[:, None, :], 0.0)
    eye = jnp.eye(T, dtype=dtype)[None]
    exact = S + eye * jnp.where(faces, 0.0, 1.0)[:, None, :]
    lu = jax.scipy.linalg.lu_factor(S + eye * jnp.where(faces, ridge * eps, 1.0)[:, None, :])
    solve = jax.vmap(jax.scipy.linalg.lu_solve)
    b = jnp.where(faces, -ds * g, 0.0)
    y = solve(lu, b)
    for _ in range(2):
        y = y + solve(lu, b - jnp.einsum("kij,kj->ki", exact, y, precision=HIGHEST))
    return jnp.where(faces, ds * y, 0.0)


def dual_cone(
    G: jax.Array,
    U: jax.Array,
    X0: jax.Array,
    mask: jax.Array,
    *,
    tol: float,
    max_iters: int,
    patience: int = 8,
    ridge: float = 64.0,
) -> tuple[jax.Array, SolverInfo]:
    """``V[i] = argmin_{v >= U[i]} v^T G v`` for the m rows of ``U`` (``(m, T)``, ``U >= 0``),
    all in one batched solve; ``J^T V[i]`` is the projection of ``J^T U[i]`` onto the dual cone
    ``{x : J x >= 0}`` (Quinton & Rey 2024, Prop. 1). G normalised (trace = active tasks).

    In the shift ``x = v - u >= 0`` this is a non-negative least-squares problem in Gram form,
    ``min_{x >= 0} |J^T (u + x)|^2``, solved by an active-set method warm-started at ``X0``
    (e.g. the last step's shifts); each step, for every problem not yet done:

    * Newton steps on three faces, in one batched equilibrated solve (:func:`_face_steps`): the
      support ``{x > 0}``; the support plus every coordinate whose ``(G v)_i < 0`` beyond
      rounding (all violated constraints enter at once); the support plus the most violated
      one (Lawson-Hanson's choice);
    * from each, two points: the full step where it stays feasible (then it is the face's
      minimiser), and the step cut at the first coordinate that reaches 0 (a ratio test: that
      coordinate leaves); and the exact minimiser along the most violated coordinate (always a
      decrease where a constraint is violated);
    * the point of lowest F is taken when it lowers F beyond rounding (judged on the change
      ``2 g^T p + p^T G p`` of each step p, known far more finely than F itself), otherwise the
      one of smallest gap among those no higher.

    Steps are never clipped back onto the orthant: a clipped Newton step can lower F faster
    at first but leaves supports of linearly dependent tasks, on which rank-deficient problems
    (more tasks than the gradients' rank) then crawl (measured: 16-20 steps from cold for 64
    tasks of rank 16 without clipping, up to 340 with it, in float64).

    Once the face is right its Newton step is exact, so a warm start usually stops after 0 or 1
    step; from ``X0 = 0`` the steps grow with the number of constraints that bind. The stop
    (:func:`_cone_evaluate`): every ``(G v)_i >= 0`` up to its rounding and the complementarity
    ``2 x^T G v <= tol F(v)`` (or F's rounding): as ``|J^T v|^2 - |d*|^2 >= |J^T v - d*|^2``
    (``d*`` the min-norm point of the convex set ``{J^T v : v >= u}``), the projection is then
    within ``sqrt(tol) |J^T v|`` of the exact one, or at the rounding of the Gramian. A
    problem also stops after ``patience`` steps in a row without progress, and all stop at
    ``max_iters`` (one ``lax.while_loop``: on GPU each step brings its predicate to the host).

    Two tasks take a closed form (no loop): from ``x = 0`` at most one constraint is violated
    (Cauchy-Schwarz, as ``u >= 0``), and the coordinate step onto it is the optimum.

    Masked coordinates and zero tasks (``G_ii = 0``) keep ``x_i = 0``. Rank-deficient G is
    fine: v is then not unique, ``J^T v`` is. Reported in :class:`SolverInfo`: the loop's
    steps, the largest gap (units of ``trace(G) / T``), and whether every problem met the stop.
    """
    dtype = G.dtype
    m, T = U.shape
    eps = jnp.finfo(dtype).eps
    ulps = _ULPS * eps
    G = 0.5 * (G + G.T)
    G = jnp.where(jnp.all(jnp.isfinite(G)), G, 0.0)  # a bad step is skipped anyway: no loop
    diag = jnp.diagonal(G)
    live = mask & (diag > 0)
    diag = jnp.where(live, diag, 1.0)
    root = jnp.sqrt(diag)
    U = jnp.where(mask[None, :], U.astype(dtype), 0.0)
    X0 = jnp.asarray(X0).astype(dtype)
    X = jnp.where(live[None, :] & (X0 > 0), X0, 0.0)  # NaN or inf: start cold there
    X = jnp.where(jnp.isfinite(X), X, 0.0)
    A = jnp.abs(G)

    def evaluate(X: jax.Array) -> _ConeEval:
        return _cone_evaluate(G, A, U, X, live, diag, tol, ulps)

    def coordinate(X: jax.Array, e: _ConeEval) -> tuple[jax.Array, jax.Array]:
        # The exact minimiser along the most violated coordinate j: x_j -= g_j / G_jj.
        score = jnp.where(e.viol, e.g / root[None, :], jnp.inf)
        j = jnp.argmin(score, axis=-1)
        pick = (jnp.arange(T)[None, :] == j[:, None]) & jnp.any(e.viol, axis=-1, keepdims=True)
        step = -jnp.take_along_axis(e.g, j[:, None], axis=-1) / diag[j][:, None]
        return jnp.maximum(X + jnp.where(pick, step, 0.0), 0.0), pick

    def info(e: _ConeEval, k: ArrayLike) -> SolverInfo:
        return SolverInfo(jnp.asarray(k, jnp.int32), jnp.max(e.gap).astype(dtype), jnp.all(e.ok))

    if T == 1:
        e = evaluate(X * 0.0)
        return U, info(e, 0)
    if T == 2:
        X, _ = coordinate(X * 0.0, evaluate(X * 0.0))
        e = evaluate(X)
        return U + X, info(e, 0)

    def candidates(X: jax.Array, e: _ConeEval) -> jax.Array:
        support = live[None, :] & (X > 0)
        X1, one = coordinate(X, e)
        # The primal-dual guess of the optimal face: the coordinates whose own Newton step
        # x_i - g_i / G_ii stays positive (the violated ones enter, the ones that would cross 0
        # leave at once, set to 0 first).
        guess = live[None, :] & (X * diag[None, :] > e.g)
        Xg = jnp.where(guess, X, 0.0)
        g_guess = e.g - jnp.einsum("mj,jk->mk", X - Xg, G, precision=HIGHEST)
        faces = jnp.stack([support, support | one, guess])  # (3, m, T)
        base = jnp.stack([X, X, Xg])
        P = _face_steps(
            G,
            root,
            jnp.stack([e.g, e.g, g_guess]).reshape(3 * m, T),
            faces.reshape(3 * m, T),
            ridge,
        ).reshape(3, m, T)
        full = base + P
        feasible = jnp.all(full >= 0, axis=-1, keepdims=True)
        full = jnp.where(feasible, full, X[None])
        # The ratio test: the step cut where the first coordinate reaches 0 (it leaves).
        shrink = faces & (P < 0)
        ratio = jnp.where(shrink, base / jnp.where(shrink, -P, 1.0), jnp.inf)
        alpha = jnp.minimum(jnp.min(ratio, axis=-1, keepdims=True), 1.0)
        cut = jnp.maximum(base + alpha * P, 0.0)
        cut = jnp.where(ratio <= alpha, 0.0, cut)
        cands = jnp.concatenate([full, cut, X1[None]])  # (7, m, T)
        return jnp.where(live[None, None, :], cands, 0.0)

    def body(c: _ConeCarry) -> _ConeCarry:
        cands = candidates(c.x, c.e)
        es = evaluate(cands)
        # Each candidate's change of F, from the step P itself: 2 g^T P + P^T G P is known to a
        # few ulps of its own terms, far finer than F (a big v^T G v whose rounding would hide
        # the last decreases that matter to the update).
        P = cands - c.x[None]
        GP = jnp.einsum("cmj,jk->cmk", P, G, precision=HIGHEST)
        AP = jnp.einsum("cmj,jk->cmk", jnp.abs(P), A, precision=HIGHEST)
        g = c.e.g[None]
        delta = jnp.sum(P * (2.0 * g + GP), axis=-1)  # (7, m)
        noise = ulps * jnp.sum(jnp.abs(P) * (2.0 * jnp.abs(g) + AP), axis=-1)
        delta = jnp.where(jnp.isfinite(delta), delta, jnp.inf)
        i_f = jnp.argmin(delta, axis=0)
        rows = jnp.arange(m)
        by_f = delta[i_f, rows] < -noise[i_f, rows]
        tie = (delta <= noise) & (es.gap < c.e.gap[None])
        i_gap = jnp.argmin(jnp.where(tie, es.gap, jnp.inf), axis=0)
        i = jnp.where(by_f, i_f, i_gap)
        accept = (by_f | jnp.any(tie, axis=0)) & ~c.done
        x_new = cands[i, rows]
        e_new = jax.tree.map(lambda a: a[i, rows], es)
        keep = lambda new, old: jnp.where(accept.reshape((m,) + (1,) * (old.ndim - 1)), new, old)
        x = keep(x_new, c.x)
        e = jax.tree.map(keep, e_new, c.e)
        stall = jnp.where(by_f & ~c.done, 0, c.stall + 1)
        done = c.done | e.ok | (stall >= patience)
        return _ConeCarry(x, e, done, stall, c.k + 1)

    e = evaluate(X)
    zero = jnp.zeros((m,), jnp.int32)
    carry = _ConeCarry(X, e, e.ok, zero, jnp.int32(0))
    out = lax.while_loop(lambda c: jnp.any(~c.done) & (c.k < max_iters), body, carry)
    return U + out.x, info(out.e, out.k)


# Nash-MTL's bargaining system ``G a = 1/a``, ``a > 0``: the stationary point of the strictly
# convex ``0.5 a^T G a - sum_t log a_t``. With ``a_t = b_t / n_t`` (``n_t = |g_t|``) it is the same
# system on the cosine matrix ``C = G / (n n^T)``: ``b_t (C b)_t = 1``; the update
# ``sum_t a_t g_t = sum_t b_t u_t`` (``u_t`` the unit gradients) does not depend on the
# gradients' norms, so the solve works on C (unit diagonal: tasks of any norms weigh alike).


def _mv(A: jax.Array, x: jax.Array) -> jax.Array:
    """``A @ x`` as a product and a sum: on XLA:CPU each small ``dot`` costs ~0.1 s of compile
    time, and this solver has a dozen of them."""
    return jnp.sum(A * x[..., None, :], axis=-1)


def _vv(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(x * y, axis=-1)


class BargainingInfo(NamedTuple):
    """What a bargaining solve reports (see :func:`bargaining`).

    ``residual``: ``max_t |b_t (A b)_t - 1|`` over the active tasks at the answer (``A = C +
    sigma I``, the system solved); ``converged``: every ``|b_t (A b)_t - 1|`` is at most ``tol``
    plus its own rounding; ``ridge``: ``sigma``, the regularisation added to C's diagonal (0
    where C is safely positive definite, the usual case).
    """

    num_steps: jax.Array  # int32: Newton steps (0: the start met the stop; closed forms)
    residual: jax.Array
    converged: jax.Array  # bool
    ridge: jax.Array


def bargaining_cosines(gram: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(C, inv_norms, active)`` from a (pre-scaled) Gramian: the cosine matrix ``C`` (unit
    diagonal over the active tasks, zero rows and columns elsewhere), ``1 / sqrt(G_tt)`` (0 off
    the active tasks) and the active tasks: ``mask`` and a squared norm above ``tiny / eps`` of
    the dtype (below it, its products with other gradients have lost digits to underflow: the
    task counts as zero). Cosines are clipped to ``[-1, 1]``; NaN stays NaN."""
    T = gram.shape[0]
    dtype = gram.dtype
    info = jnp.finfo(dtype)
    diag = jnp.diagonal(gram)
    active = mask & (diag > info.tiny / info.eps)
    inv = jnp.where(active, 1.0 / jnp.sqrt(jnp.where(active, diag, 1.0)), 0.0)
    both = active[:, None] & active[None, :]
    C = jnp.clip((gram * inv[:, None]) * inv[None, :], -1.0, 1.0)
    C = jnp.where(both, C, 0.0)
    C = jnp.where(jnp.eye(T, dtype=bool), active.astype(dtype), C)
    return C, inv, active


# The regularisation's ladder: sigma in {0, ridge * 4**k, k < _LADDER}.
_LADDER = 8
# Step lengths tried along the Newton direction (away from its quadratic region): 1/16 to 4096,
# a factor sqrt(2) apart, and the damped step 1 / (1 + lambda).
_NASH_STEPS = tuple(2.0 ** (k / 2) for k in range(-8, 25))
# The Newton decrement below which the full step is taken (quadratic convergence region of a
# self-concordant function: lambda < (3 - sqrt(5)) / 2).
_QUADRATIC = 0.25


class _NashCarry(NamedTuple):
    b: jax.Array
    r: jax.Array  # b (A b) - 1 (0 off the active tasks)
    strict: jax.Array  # max |r| <= tol
    near: jax.Array  # |r| <= tol + its rounding
    gain: jax.Array  # the last step halved max |r|
    k: jax.Array
    stall: jax.Array
    best: jax.Array


def _bargaining_ridge(C: jax.Array, active: jax.Array, ridge: jax.Array) -> jax.Array:
    """The smallest ``sigma`` of ``{0, ridge * 4**k}`` with ``C + (sigma - ridge) I`` positive
    definite in the precision (its Cholesky factorisation succeeds): then ``C + sigma I`` has
    no eigenvalue below ``ridge``. One batched factorisation."""
    dtype = C.dtype
    on = active.astype(dtype)
    steps = ridge * 4.0 ** jnp.arange(_LADDER, dtype=dtype)
    ladder = jnp.concatenate([jnp.zeros((1,), dtype), steps])
    base = C + jnp.diag(1.0 - on)
    mats = base[None] + (ladder - ridge)[:, None, None] * jnp.diag(on)[None]
    factors = jnp.linalg.cholesky(mats)
    ok = jnp.all(jnp.isfinite(factors), axis=(1, 2))
    return jnp.where(jnp.any(ok), ladder[jnp.argmax(ok)], ladder[-1])


def bargaining(
    C: jax.Array,
    b0: jax.Array,
    active: jax.Array,
    *,
    ridge: ArrayLike,
    tol: float,
    max_iters: int,
    patience: int = 3,
) -> tuple[jax.Array, BargainingInfo]:
    """Solves ``b_t (A b)_t = 1``, ``b > 0``, over the active tasks, ``A = C + sigma I``.

    ``C`` is a cosine matrix (:func:`bargaining_cosines`). Without ``sigma`` a positive
    solution exists iff no non-negative vector ``v != 0`` has ``v^T C v = 0`` (a zero task, two
    exactly opposed tasks, more tasks than the rank with 0 in their cone); rounding blurs that
    line, and makes a singular C indefinite. So ``sigma`` is 0 where C is positive definite
    with no eigenvalue below ``ridge`` and otherwise the smallest ``ridge * 4**k`` that lifts
    every eigenvalue above ``ridge`` (:func:`_bargaining_ridge`).

    Method: damped Newton on the self-concordant ``f(b) = 0.5 b^T A b - sum_t log b_t``, in
    relative steps ``b <- b (1 + t q)``, ``(B A B + I) q = -r`` (``r = b (A b) - 1``, the
    residual; the matrix is at least I, equilibrated and factorised by Cholesky). The full step
    where the Newton decrement ``lambda = sqrt(-r^T q)`` is at most 1/4 (quadratic
    convergence; ``lambda <= |r|``); elsewhere the step of least f among ``t`` in
    ``_NASH_STEPS`` and ``1 / (1 + lambda)`` (which decreases f by at least
    ``lambda - log(1 + lambda)``), each also rescaled by its exact best factor
    ``sqrt(m / x^T A x)`` (``m`` active tasks; where ``x^T A x`` is above its rounding): that
    moves along flat directions of A by orders of magnitude in one step.

    The start ``b0``: its positive entries (a warm start: the caller converts the last
    solution to this step's gradient norms), 1 elsewhere; a start with any such 1 is rescaled
    by the same factor (exact for identical or orthogonal tasks from all ones). A start whose
    residual is within 16 ulps of its rounding is kept (0 steps).

    The stop: ``max_t |r_t| <= tol``; or every ``|r_t|`` within ``tol`` plus its rounding
    (``4 eps b_t (|A| b)_t``) and the last step no longer halving ``max |r|``; or ``patience``
    steps in a row that neither halved the best residual nor lowered f by more than its
    rounding (and 0.01); or ``max_iters``. The residual bounds the update's error: ``|d - d*|
    <= lambda / (1 - lambda) <= |r|_2 / (1 - |r|_2)`` (self-concordance, and ``C <= A + B^-2``),
    with ``|d*|^2 = m - sigma |b*|^2`` (``m`` without the regularisation).

    Precision: ``C`` is known to a few ulps per entry (the Gramian's rounding), so where ``b``
    is large (nearly singular C) float32 resolves ``b``, and the update, only to
    ``~eps |b| sum_t b_t``; the stop's allowance for the residual's rounding lets the solve end
    there instead of at ``max_iters``.

    Returns ``b`` (0 off the active tasks) and a :class:`BargainingInfo`.
    """
    T = C.shape[0]
    dtype = C.dtype
    eps = jnp.finfo(dtype).eps
    ridge = jnp.asarray(ridge).astype(dtype)
    on = active.astype(dtype)
    m = jnp.sum(on)
    both = active[:, None] & active[None, :]
    eye = jnp.eye(T, dtype=dtype)
    C = jnp.where(both, C, 0.0)
    b0 = jnp.asarray(b0).astype(dtype)
    warm = active & (b0 > 0) & jnp.isfinite(b0)
    b0 = jnp.where(warm, b0, 1.0)

    def quad_active(A: jax.Array, x: jax.Array) -> jax.Array:
        x = jnp.where(active, x, 0.0)
        return _vv(x, _mv(A, x))

    if T <= 2:
        # On two tasks the system is symmetric: b_1 = b_2 = 1 / sqrt(1 + sigma + c), c the
        # cosine; one task: b = 1 / sqrt(1 + sigma). sigma as the ladder gives it, from the
        # least eigenvalue 1 - |c| (an exact zero fails the factorisation: 4 ridge).
        c = C[0, 1] if T == 2 else jnp.zeros((), dtype)
        lam = jnp.where(jnp.all(active), 1.0 - jnp.abs(c), 1.0)
        sigma = jnp.where(lam > ridge, 0.0, jnp.where(lam > 0, ridge, 4.0 * ridge))
        other = jnp.where(jnp.all(active), c, 0.0)
        b = jnp.where(active, 1.0 / jnp.sqrt(1.0 + sigma + other), 0.0)
        A = C + jnp.diag(sigma * on)
        r = jnp.where(active, b * _mv(A, b) - 1.0, 0.0)
        allow = _ULPS * eps * b * _mv(jnp.abs(A), b)
        info = BargainingInfo(
            jnp.zeros((), jnp.int32),
            jnp.max(jnp.abs(r)),
            jnp.all(jnp.abs(r) <= tol + allow),
            sigma,
        )
        return b, info

    sigma = _bargaining_ridge(C, active, ridge)
    A = C + jnp.diag(sigma * on + (1.0 - on))  # inactive tasks: identity rows, b = 1 (r = 0)
    A_abs = jnp.abs(A)
    A_act = jnp.where(both, A, 0.0)
    A_act_abs = jnp.abs(A_act)
    steps = jnp.asarray(_NASH_STEPS, dtype)
    bound = 4.0 * m / ridge

    def rescale(x: jax.Array) -> jax.Array:
        q = quad_active(A_act, x)
        good = (q > 0) & jnp.isfinite(q)
        s = jnp.sqrt(m / jnp.where(good, q, 1.0))
        return jnp.where(active, jnp.where(good, s, 1.0) * x, 1.0)

    def residual(
        b: jax.Array, ulps: float = _ULPS
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        r = jnp.where(active, b * _mv(A, b) - 1.0, 0.0)
        allow = ulps * eps * b * _mv(A_abs, b)  # r's rounding, per task
        rmax = jnp.max(jnp.abs(r))
        return r, rmax <= tol, jnp.all(jnp.abs(r) <= tol + allow), rmax

    def cond(c: _NashCarry) -> jax.Array:
        done = c.strict | (c.near & ~c.gain) | (c.stall >= patience)
        return ~done & (c.k < max_iters) & jnp.all(jnp.isfinite(c.b))

    def body(c: _NashCarry) -> _NashCarry:
        b, r = c.b, c.r
        Ab = _mv(A, b)
        M = b[:, None] * A * b[None, :] + eye
        dm = jnp.sqrt(jnp.diagonal(M))
        Mn = M / (dm[:, None] * dm[None, :]) + (4.0 * T * eps) * eye
        L = jnp.linalg.cholesky(Mn)
        q = -jax.scipy.linalg.cho_solve((L, True), r / dm) / dm
        # A failed factorisation (NaN): a diagonal Newton step instead.
        q = jnp.where(jnp.all(jnp.isfinite(q)), q, -r / jnp.diagonal(M))
        q = jnp.where(active, q, 0.0)
        lam = jnp.sqrt(jnp.maximum(-_vv(r, q), 0.0))
        p = b * q
        g0 = quad_active(A_act, b)
        g1 = _vv(jnp.where(active, Ab, 0.0), p)
        g2 = quad_active(A_act, p)

        def change(t: jax.Array) -> tuple[jax.Array, jax.Array]:
            # f(x) - f(b) at x = b (1 + t q), and at x rescaled by its best factor s(t).
            x = 1.0 + t * q
            inside = jnp.all(x > 0)
            logs = jnp.sum(jnp.log(jnp.where(x > 0, x, 1.0)))
            plain = t * g1 + 0.5 * t * t * g2 - logs
            Q = g0 + 2.0 * t * g1 + t * t * g2
            Q_abs = quad_active(A_act_abs, b * x)
            known = 64.0 * eps * Q_abs < Q
            Qs = jnp.where(known, Q, 1.0)
            scaled = 0.5 * (m - g0) + 0.5 * m * jnp.log(Qs / m) - logs
            # |b*|^2 <= m / ridge (b^T A b = m, A's eigenvalues above ridge): no step beyond
            # (where rounding makes a flat direction look like descent without end).
            size = jnp.sum(jnp.where(active, b * x, 0.0) ** 2)
            plain = jnp.where(inside & (size <= bound) & jnp.isfinite(plain), plain, jnp.inf)
            fits = size * m <= bound * Qs
            scaled = jnp.where(inside & known & fits & jnp.isfinite(scaled), scaled, jnp.inf)
            return plain, scaled

        ts = jnp.concatenate([(1.0 / (1.0 + lam))[None], steps])
        plain, scaled = jax.vmap(change)(ts)
        both_f = jnp.concatenate([plain, scaled])
        i = jnp.argmin(both_f)
        n = ts.shape[0]
        full = lam <= _QUADRATIC
        t = jnp.where(full, 1.0, ts[i % n])
        b_new = jnp.where(active, b * (1.0 + t * q), 1.0)
        b_new = jnp.where(~full & (i >= n), rescale(b_new), b_new)
        drop = jnp.where(full, change(jnp.ones((), dtype))[0], both_f[i])
        r_new, strict, near, rmax = residual(b_new)
        gain = rmax <= 0.5 * jnp.max(jnp.abs(r))
        # f's rounding: a few ulps of b^T |A| b (far above 0.01 where b is large).
        slack = jnp.maximum(0.01, _ULPS * eps * quad_active(A_act_abs, b))
        progress = (rmax <= 0.5 * c.best) | (drop < -slack)
        return _NashCarry(
            b_new,
            r_new,
            strict,
            near,
            gain,
            c.k + 1,
            jnp.where(progress, 0, c.stall + 1),
            jnp.minimum(c.best, rmax),
        )

    # A cold start (or a partly cold one: tasks that were not active last time) is rescaled
    # to its best factor; a warm start is not (it is in the cosines' units already, and the
    # factor's own rounding, where b^T A b cancels, would move it), and is kept as it is if its
    # residual is within a few times its rounding (the same problem, or cosines that differ
    # by their rounding).
    b = jnp.where(jnp.all(warm | ~active), b0, rescale(b0))
    r, strict, near, rmax = residual(b, 4.0 * _ULPS)
    zero = jnp.zeros((), jnp.int32)
    carry = _NashCarry(b, r, strict, near, jnp.asarray(False), zero, zero, rmax)
    out = lax.while_loop(cond, body, carry)
    b = jnp.where(active, out.b, 0.0)
    info = BargainingInfo(out.k, jnp.max(jnp.abs(out.r)), out.near, sigma)
    return b, info


# --- solvers: fair ---
class FairInfo(NamedTuple):
    """What a FairGrad solve reports (see :func:`fair`): ``num_steps`` (Newton steps),
    ``residual`` (``max_t |(A w)_t w_t^p - 1|`` over the active tasks), ``converged`` (the stop
    test held: the residual within ``tol`` plus its rounding) and ``ridge`` (the regularisation
    ``sigma`` used, 0 for a positive definite cosine matrix)."""

    num_steps: jax.Array
    residual: jax.Array
    converged: jax.Array
    ridge: jax.Array


# Step lengths tried along the Newton direction away from its quadratic region: 1/256 to 4096.
_FAIR_STEPS = tuple(2.0 ** (k / 2) for k in range(-16, 25))
# Fractions of the step to the boundary of the positive orthant also tried.
_FAIR_EDGE = (0.5, 0.9, 0.99)


def _relative_power_change(x: jax.Array, p: jax.Array) -> jax.Array:
    """``((1 + x)^(1 - p) - 1) / (1 - p)`` (``log(1 + x)`` at ``p = 1``), for ``x > -1``: the
    change of ``h(w) = w^(1-p) / (1-p)`` from ``w`` to ``w (1 + x)``, in units of ``w^(1-p)``."""
    e = 1.0 - p
    l1 = jnp.log1p(x)
    small = jnp.abs(e) < 1e-30
    return jnp.where(small, l1, jnp.expm1(e * l1) / jnp.where(small, 1.0, e))


def fair(
    G: jax.Array,
    w0: jax.Array,
    active: jax.Array,
    p: jax.Array,
    *,
    sigma: jax.Array,
    tol: float,
    max_iters: int,
    patience: int = 3,
) -> tuple[jax.Array, FairInfo]:
    """Solves ``(A w)_t = w_t^(-p)``, ``w > 0``, over the active tasks, ``A = G + sigma D``
    (``D`` the diagonal of ``G``; ``sigma`` from :func:`_bargaining_ridge` on the cosines, 0
    where ``G`` is safely positive definite): FairGrad's alpha-fair weights, ``p = 1/alpha``
    (``p = 1`` is Nash-MTL's system, :func:`bargaining`).

    It is the stationarity condition of the strictly convex
    ``f(w) = 0.5 w^T A w - sum_t h(w_t)``, ``h(w) = w^(1-p) / (1-p)`` (``log w`` at ``p = 1``),
    whose minimiser exists iff no non-negative ``v != 0`` has ``v^T A v = 0``. Method: damped
    Newton in relative steps ``w <- w (1 + t q)``, ``(W A W + p diag(w^(1-p))) q = -w^(1-p) r``
    (``r = w^p (A w) - 1``, the residual; equilibrated, Cholesky): the full step where the
    Newton decrement ``lambda = sqrt(-(w^(1-p) r)^T q)`` is at most 1/4, elsewhere the step of
    least ``f`` among ``t`` in ``_FAIR_STEPS`` and ``1 / (1 + lambda)`` (f's change computed
    in closed form along the line, without cancellation). Newton is invariant under the
    per-task scaling of ``w``, so tasks of very different norms converge alike.

    Start: ``w0``'s positive finite entries (a warm start), elsewhere the solution for
    orthogonal tasks ``G_tt^(-1/(1+p))``; a start with any such cold entry is rescaled by its
    best factor ``s^(1+p) = sum_t w_t^(1-p) / (w^T A w)`` (exact for one task, for identical
    and for orthogonal tasks of equal norms).

    Stop: ``max |r| <= tol``; or every ``|r_t|`` within ``tol`` plus its rounding
    (``4 eps w_t^p (|A| w)_t``) and the last step no longer halving ``max |r|``; or
    ``patience`` steps in a row without halving the best residual nor lowering ``f``; or
    ``max_iters``. Returns ``w`` (0 off the active tasks) and a :class:`FairInfo`.
    """
    T = G.shape[0]
    dtype = G.dtype
    eps = jnp.finfo(dtype).eps
    p = jnp.asarray(p).astype(dtype)
    sigma = jnp.asarray(sigma).astype(dtype)
    on = active.astype(dtype)
    both = active[:, None] & active[None, :]
    eye = jnp.eye(T, dtype=dtype)
    diag = jnp.where(active, jnp.diagonal(G), 1.0)
    A_act = jnp.where(both, G, 0.0) + jnp.diag(sigma * diag * on)
    A = A_act + jnp.diag(1.0 - on)  # inactive tasks: identity rows, w = 1 (r = 0)
    A_abs = jnp.abs(A)
    A_act_abs = jnp.abs(A_act)
    steps = jnp.asarray(_FAIR_STEPS, dtype)

    def pw(x: jax.Array, e: ArrayLike) -> jax.Array:  # x^e for x > 0
        return jnp.exp(e * jnp.log(x))

    def residual(
        w: jax.Array, ulps: float = _ULPS
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        Aw = _mv(A, w)
        wp = pw(w, p)
        r = jnp.where(active, wp * Aw - 1.0, 0.0)
        allow = ulps * eps * wp * _mv(A_abs, w)
        rmax = jnp.max(jnp.abs(r))
        return r, rmax <= tol, jnp.all(jnp.abs(r) <= tol + allow), rmax

    def cond(c: _NashCarry) -> jax.Array:
        done = c.strict | (c.near & ~c.gain) | (c.stall >= patience)
        return ~done & (c.k < max_iters) & jnp.all(jnp.isfinite(c.b))

    def body(c: _NashCarry) -> _NashCarry:
        w, r = c.b, c.r
        u = jnp.where(active, pw(w, 1.0 - p), 1.0)
        Aw = _mv(A, w)
        M = w[:, None] * A * w[None, :] + jnp.diag(jnp.where(active, p * u, 1.0))
        dm = jnp.sqrt(jnp.diagonal(M))
        Mn = M / (dm[:, None] * dm[None, :]) + (4.0 * T * eps) * eye
        L = jnp.linalg.cholesky(Mn)
        ur = u * r
        q = -jax.scipy.linalg.cho_solve((L, True), ur / dm) / dm
        q = jnp.where(jnp.all(jnp.isfinite(q)), q, -ur / jnp.diagonal(M))
        q = jnp.where(active, q, 0.0)
        lam = jnp.sqrt(jnp.maximum(-_vv(ur, q), 0.0))
        d = w * q
        g1 = _vv(jnp.where(active, Aw, 0.0), d)
        g2 = _vv(d, _mv(A_act, d))

        def change(t: jax.Array) -> jax.Array:
            x = t * q
            inside = jnp.all(x > -1.0)
            hs = jnp.sum(
                jnp.where(active, u * _relative_power_change(jnp.where(x > -1, x, 0.0), p), 0.0)
            )
            val = t * g1 + 0.5 * t * t * g2 - hs
            return jnp.where(inside & jnp.isfinite(val), val, jnp.inf)

        # The steps to the positive orthant's boundary's neighbourhood: where w must fall by
        # orders of magnitude (a steep w^(-p)), the fixed steps all leave the orthant.
        reach = 1.0 / jnp.maximum(jnp.max(jnp.where(active, -q, 0.0)), eps)
        near_edge = reach * jnp.asarray(_FAIR_EDGE, dtype)
        ts = jnp.concatenate([(1.0 / (1.0 + lam))[None], near_edge, steps])
        vals = jax.vmap(change)(ts)
        i = jnp.argmin(vals)
        full = (lam <= 0.25) & jnp.all(q > -1.0)
        # No step lowers f (every value infinite): stay (the stall count ends the loop).
        t = jnp.where(full, 1.0, jnp.where(jnp.isfinite(vals[i]), ts[i], 0.0))
        w_new = jnp.where(active, w * (1.0 + t * q), 1.0)
        drop = jnp.where(full, change(jnp.ones((), dtype)), jnp.minimum(vals[i], 0.0))
        r_new, strict, near, rmax = residual(w_new)
        gain = rmax <= 0.5 * jnp.max(jnp.abs(r))
        slack = _ULPS * eps * (_vv(w, _mv(A_act_abs, w)) + jnp.sum(jnp.where(active, u, 0.0)))
        progress = (rmax <= 0.5 * c.best) | (drop < -slack)
        return _NashCarry(
            w_new,
            r_new,
            strict,
            near,
            gain,
            c.k + 1,
            jnp.where(progress, 0, c.stall + 1),
            jnp.minimum(c.best, rmax),
        )

    w0 = jnp.asarray(w0).astype(dtype)
    warm = active & (w0 > 0) & jnp.isfinite(w0)
    cold = pw(diag, -1.0 / (1.0 + p))
    w = jnp.where(active, jnp.where(warm, w0, cold), 1.0)
    # Best factor s of a cold start: s^(1+p) = sum w^(1-p) / w^T A w (in logs: no overflow).
    Q = _vv(jnp.where(active, w, 0.0), _mv(A_act, jnp.where(active, w, 0.0)))
    H = jnp.sum(jnp.where(active, pw(w, 1.0 - p), 0.0))
    good = (Q > 0) & jnp.isfinite(Q) & (H > 0) & jnp.isfinite(H)
    log_s = (jnp.log(jnp.where(good, H, 1.0)) - jnp.log(jnp.where(good, Q, 1.0))) / (1.0 + p)
    s = jnp.where(good & ~jnp.all(warm | ~active), jnp.exp(log_s), 1.0)
    w = jnp.where(active, s * w, 1.0)
    r, strict, near, rmax = residual(w, 4.0 * _ULPS)
    zero = jnp.zeros((), jnp.int32)
    carry = _NashCarry(w, r, strict, near, jnp.asarray(False), zero, zero, rmax)
    out = lax.while_loop(cond, body, carry)
    w = jnp.where(active, out.b, 0.0)
    info = FairInfo(out.k, jnp.max(jnp.abs(out.r)), out.near, sigma)
    return w, info


class PriorityInfo(NamedTuple):
    """What a PCD solve reports (see :func:`priority_qp`): ``num_steps`` (active-set steps),
    ``violation`` (the largest constraint violation left, in units of the largest squared norm
    of the Gramian), ``feasible`` (False where the constraints cannot all hold: the weights are
    then the primary task's alone)."""

    num_steps: jax.Array
    violation: jax.Array
    feasible: jax.Array


class _QPCarry(NamedTuple):
    mu: jax.Array  # (n,) the multipliers of the secondary constraints
    active: jax.Array  # (n,) bool: the working set
    p: jax.Array  # the constraint being added
    slack_p: jax.Array
    inner: jax.Array  # adding p (possibly after drops) is under way
    done: jax.Array
    infeasible: jax.Array
    k: jax.Array


def priority_qp(
    G: jax.Array,
    tau: jax.Array,
    live: jax.Array,
    *,
    tol: float,
    dependence_tol: float,
    max_iters: int,
) -> tuple[jax.Array, PriorityInfo]:
    """PCD's quadratic program on the Gramian ``G`` of ``g_0, ..., g_n`` (row 0 the primary):

    ``min_d 0.5 |d - g_0|^2  s.t.  g_j^T d >= tau_j |g_j|^2`` for the live ``j >= 1``.

    Returns ``w = [1, mu_1, ..., mu_n]`` with ``d = sum_i w_i g_i`` (``mu`` the KKT multipliers,
    0 off the live constraints), or ``[1, 0, ..., 0]`` where the constraints are infeasible.

    Method: the dual active-set method of Goldfarb & Idnani (1983) for an identity Hessian, in
    Gramian terms (stationarity ``d = g_0 + sum_j mu_j g_j`` holds throughout): each step adds
    the most violated constraint ``p`` (slack ``(G_s mu - b)_p < -tol max_i G_ii``,
    ``b_j = tau_j G_jj - G_j0``) by a step along ``z = g_p - sum_A r_j g_j`` (``G_AA r =
    G_Ap``), or, where an active multiplier would turn negative first, drops that constraint
    and tries again. ``g_p`` counts as a combination of the active gradients when ``|z|^2 <=
    dependence_tol G_pp``; then, with no multiplier to drop, the constraints are infeasible.
    Exact (finitely many steps in exact arithmetic, about n in practice); one
    ``lax.while_loop`` of at most ``max_iters`` steps (each a ``T x T`` solve), the guard
    against cycling under rounding (the iterate is then returned).
    """
    T = G.shape[0]
    dtype = G.dtype
    n = T - 1
    e0 = jnp.zeros((T,), dtype).at[0].set(1.0)
    if n == 0:
        z = jnp.zeros((), dtype)
        return e0, PriorityInfo(jnp.zeros((), jnp.int32), z, jnp.array(True))
    Gs = G[1:, 1:]
    live = live[1:]
    b = jnp.where(live, tau * jnp.diagonal(Gs) - G[1:, 0], 0.0)
    atol = tol * jnp.maximum(jnp.max(jnp.diagonal(G)), jnp.finfo(dtype).tiny)
    idx = jnp.arange(n, dtype=jnp.int32)

    def slacks_of(mu: jax.Array, active: jax.Array) -> jax.Array:
        s = _mv(Gs, mu) - b
        return jnp.where(active | ~live, 0.0, s)

    def cond(c: _QPCarry) -> jax.Array:
        return ~c.done & (c.k < max_iters)

    def body(c: _QPCarry) -> _QPCarry:
        s = slacks_of(c.mu, c.active)
        p_new = jnp.argmin(s)
        violated = s[p_new] < -atol
        p = jnp.where(c.inner, c.p, p_new.astype(jnp.int32))
        slack_p = jnp.where(c.inner, c.slack_p, s[p_new])
        finished = ~c.inner & ~violated
        A = c.active
        AA = A[:, None] & A[None, :]
        M = jnp.where(AA, Gs, 0.0) + jnp.diag(jnp.where(A, 0.0, 1.0))
        col = jnp.where(A, Gs[:, p], 0.0)
        r = jnp.where(A, jnp.linalg.solve(M, col), 0.0)
        z = Gs[p, p] - _vv(Gs[p], r)
        ratios = jnp.where(A & (r > 0), c.mu / jnp.where(r > 0, r, 1.0), jnp.inf)
        kk = jnp.argmin(ratios).astype(jnp.int32)
        partial = ratios[kk]
        independent = z > dependence_tol * Gs[p, p]
        full = jnp.where(independent, -slack_p / jnp.where(independent, z, 1.0), jnp.inf)
        step = jnp.minimum(partial, full)
        infeasible = ~jnp.isfinite(step)
        step = jnp.where(infeasible, 0.0, step)
        mu = c.mu - step * r
        mu = mu + jnp.where(idx == p, step, 0.0)
        add = full <= partial
        active = jnp.where(add, A | (idx == p), A & (idx != kk))
        mu = jnp.where(add | (idx != kk), mu, 0.0)
        slack_next = _vv(Gs[p], mu) - b[p]
        new = _QPCarry(mu, active, p, slack_next, ~add, infeasible, infeasible, c.k + 1)
        keep = c._replace(done=jnp.array(True))
        return jax.tree.map(lambda x, y: jnp.where(finished, x, y), keep, new)

    zero = jnp.zeros((), jnp.int32)
    carry = _QPCarry(
        jnp.zeros((n,), dtype),
        jnp.zeros((n,), bool),
        zero,
        jnp.zeros((), dtype),
        jnp.array(False),
        jnp.array(False),
        jnp.array(False),
        zero,
    )
    out = lax.while_loop(cond, body, carry)
    mu = jnp.where(live, jnp.maximum(out.mu, 0.0), 0.0)
    w = jnp.concatenate([jnp.ones((1,), dtype), mu])
    w = jnp.where(out.infeasible, e0, w)
    s = jnp.where(live, _mv(Gs, mu) - b, 0.0)
    scale = jnp.maximum(jnp.max(jnp.diagonal(G)), jnp.finfo(dtype).tiny)
    violation = jnp.where(out.infeasible, 0.0, jnp.maximum(-jnp.min(s), 0.0) / scale)
    return w, PriorityInfo(out.k, violation, ~out.infeasible)


# --- end solvers: fair ---
