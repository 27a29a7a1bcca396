"""Methods that track per-task statistics of the gradients in a T x P state: MoCo, ExcessMTL.

Both keep a params-shaped state with a leading task axis (``tree.task_zeros``: sharded like the
params, float32 for narrower floats), written once per step by the ``prepare`` hook, before the
weighting, and left as it was on a skipped step and in the rows of masked tasks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mtlopt._src import build, checks, solvers, tree

# --- moco ---


class MoCoState(NamedTuple):
    """State of :func:`moco`: ``tracked`` holds each task's tracked gradient ``y_t``, a
    params-shaped tree of ``(T, *leaf_shape)`` arrays (``None`` at task-specific leaves);
    ``lam`` the weights ``lambda`` on the simplex, carried from step to step."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    tracked: Any
    lam: jax.Array


def _renormalized(v: jax.Array, mask: jax.Array) -> jax.Array:
    """``v`` over the active tasks scaled to sum 1 (uniform there if its active part is 0)."""
    v = jnp.where(mask, jnp.maximum(v, 0.0), 0.0)
    total = jnp.sum(v)
    ok = (total > 0) & jnp.isfinite(total)
    return jnp.where(ok, v / jnp.where(ok, total, 1.0), solvers.uniform(mask, v.dtype))


def moco_step(
    lam: jax.Array,
    gram: jax.Array,
    gram_scale: jax.Array,
    mask: jax.Array,
    gamma_k: Any,
    rho: Any,
    projection: str = "simplex",
) -> jax.Array:
    """MoCo's weight step ``lambda <- P(lambda - gamma_k (Y Y^T + rho I) lambda)`` over the
    active tasks, ``P`` the Euclidean projection onto the simplex (or LibMTL's softmax).

    ``gram * gram_scale**2`` is ``Y Y^T`` (pre-scaled by a power of two). ``lam`` is first
    renormalised onto the simplex of the active tasks. Both maps are invariant to a common
    shift of their argument, so the step subtracts the smallest active entry of ``G lambda``
    first: ``(G lambda)_t - min_s (G lambda)_s >= 0``, and a huge Gramian (beyond the dtype's
    range) drives the tasks of larger ``(G lambda)_t`` to weight 0 instead of overflowing.
    """
    dtype = gram.dtype
    lam = _renormalized(lam.astype(dtype), mask)
    both = mask[:, None] & mask[None, :]
    u = solvers.matvec(jnp.where(both, gram, 0.0), lam)
    low = jnp.min(jnp.where(mask, u, jnp.inf))
    low = jnp.where(jnp.isfinite(low), low, 0.0)
    du = jnp.where(mask, u - low, 0.0)  # >= 0, 0 at the smallest
    g = jnp.asarray(gamma_k, dtype)
    # gamma_k * gram_scale**2 * du, in an order that never forms gram_scale**2 alone.
    step = jnp.where(du > 0, ((du * gram_scale) * gram_scale) * g, 0.0)
    x = lam * (1.0 - g * jnp.asarray(rho, dtype)) - step
    top = jnp.max(jnp.where(mask, x, -jnp.inf))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    if projection == "simplex":
        # Entries 2 below the largest get 0 from the projection: clipping keeps -inf out of it.
        x = jnp.maximum(jnp.where(jnp.isnan(x), top - 2.0, x), top - 2.0)
        return solvers.project(x, mask)
    x = jnp.where(mask, x - top, -jnp.inf)
    e = jnp.where(mask, jnp.exp(x), 0.0)
    return e / jnp.sum(e)


def moco(
    beta: float = 0.5,
    gamma: float = 0.1,
    rho: float = 0.0,
    *,
    num_tasks: int | None = None,
    beta_sigma: float = 0.5,
    gamma_sigma: float = 0.5,
    normalization: str = "loss",
    projection: str = "simplex",
    eps: float = 1e-8,
    state_dtype: Any = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""MoCo: tracked task gradients, weights stepped on the simplex from their Gramian.

    Task → params. Scale: a convex combination of the tracked gradients (mean-like); with the
    default ``normalization="loss"`` each tracked gradient is an average of vectors of norm
    ``l_t`` (its task's losses), so the update's size follows the losses, not the gradients
    (the direction is that of the gradients at any scale: zero, tiny or huge).

    .. math::
       y_t \leftarrow y_t - \beta_k\,(y_t - h_t), \qquad
       \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma_k (Y Y^\top + \rho I)\,\lambda\big),
       \qquad d = Y^\top \lambda = \sum_t \lambda_t y_t

    at step ``k = 1, 2, ...``, with ``beta_k = beta / k**beta_sigma``, ``gamma_k = gamma /
    k**gamma_sigma``, ``y_t`` starting at 0, ``lambda`` at ``1/T``, ``Pi_Delta`` the Euclidean
    projection onto the simplex, and ``h_t = l_t g_t / (||g_t|| + eps)`` (the authors' code's
    normalisation, ``"loss"``), or ``h_t = g_t`` (``"none"``: Algorithm 1 of the paper on the
    raw gradients). The weights of step k come from the tracked gradients after this step's
    tracking update (Algorithm 1's order).

    Args:
      beta: the tracking step ``beta`` in ``[0, 1]`` (1: no memory, ``y_t = h_t``).
      gamma: the weights' step ``gamma >= 0``. It multiplies a Gramian: with
        ``normalization="none"`` its units are ``1 / |g|^2``, and the default 0.1 suits
        gradients of norm ~1 only.
      rho: ``rho >= 0``, the l2 regularisation of the weights' subproblem.
      num_tasks: T (required: the tracked gradients are state shaped by T).
      beta_sigma: the power of the step count by which the tracking step decays,
        ``beta / k**beta_sigma`` (LibMTL's 0.5 by default; 0: a constant step).
      gamma_sigma: the same for the weights' step, ``gamma / k**gamma_sigma`` (0.5 by
        default; 0: a constant step).
      normalization: ``"loss"`` (default, the authors' code and LibMTL: each task gradient
        rescaled to norm ``l_t`` before it is tracked; needs ``task_losses``, used as given)
        or ``"none"`` (the raw gradients: the weights then depend on the gradients' scale,
        and huge gradients put all the weight on the tasks of smallest ``(Y Y^T lambda)_t``).
      projection: ``"simplex"`` (default: the paper's Euclidean projection) or
        ``"softmax"`` (LibMTL's ``softmax(lambda - gamma_k (Y Y^T + rho I) lambda)``).
      eps: added to each gradient norm in ``"loss"`` normalisation (LibMTL's 1e-8).
      state_dtype: the tracked gradients' dtype: None (default) keeps float32/float64 params'
        dtype and uses float32 for float16/bfloat16 params; or an explicit dtype. Writes
        saturate at the dtype's largest finite value, never inf.
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        follows its own task's raw gradient (as in LibMTL), nothing tracked.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`). A step
        skipped for bad inputs (a non-finite gradient or active loss) leaves the tracked
        gradients and the weights as they were.

    Masked tasks (``task_mask``) take no part: their tracked gradient and weight are kept,
    they get weight 0, and the weights of the active tasks are renormalised onto their own
    simplex before the step (so the update is that of MoCo run on the active tasks alone).

    Cost:
      With ``"loss"``: the task grads read twice (their norms, then the tracking update, which
      reads and writes the tracked gradients), then the tracked gradients read twice (the
      Gramian, the combination). ``"none"``: a finiteness check in place of the norms. No
      solver: one projection on the ``(T,)`` weights. State: one T x P copy.

    Deviations:
      From the paper: the default tracks loss-normalised gradients (the authors' code, through
      LibMTL), as the default step sizes assume: on raw gradients ``gamma`` has units of
      ``1 / |g|^2``, so no default suits every model; the paper's optional projection of ``y_t``
      onto a bounded set is not applied (nor in the code). From LibMTL: the weights' step is
      the paper's Euclidean projection, LibMTL's softmax is ``projection="softmax"``; with
      ``normalization="loss", projection="softmax"`` the update is LibMTL's
      (``tests/test_tracking.py`` checks it against a float64 transcription). Neither TorchJD
      nor LibMTL has masks; ``task_weights`` returns ``lambda`` (the coefficients on the
      tracked gradients, as LibMTL returns).

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.moco(beta=1.0, gamma=0.0, num_tasks=2, normalization="none")
      >>> grads = {"w": jnp.array([[2.0, 0.0], [0.0, 4.0]])}
      >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates["w"]
      Array([1., 2.], dtype=float32)

    References:
      Fernando et al., `Mitigating Gradient Bias in Multi-objective Learning: A Provably
      Convergent Approach <https://openreview.net/forum?id=dLAYGdKTi2>`_, ICLR 2023.
    """
    name = "moco"
    if num_tasks is None:
        raise checks.fail(
            name,
            "num_tasks is required (the tracked gradient of each task is state shaped by T); "
            "e.g. mtlopt.moco(num_tasks=3).",
        )
    beta = checks.nonnegative(name, "beta", beta, upper=1.0)
    gamma = checks.nonnegative(name, "gamma", gamma)
    rho = checks.nonnegative(name, "rho", rho)
    beta_sigma = checks.nonnegative(name, "beta_sigma", beta_sigma)
    gamma_sigma = checks.nonnegative(name, "gamma_sigma", gamma_sigma)
    eps = checks.nonnegative(name, "eps", eps)
    checks.choice(name, "normalization", normalization, ("loss", "none"))
    checks.choice(name, "projection", projection, ("simplex", "softmax"))
    by_loss = normalization == "loss"

    def init_extra(T: int, shared: Any) -> dict:
        if shared is None:
            raise checks.fail(
                name, "init needs the params: the tracked gradients are shaped like them."
            )
        dtype = tree.acc_dtype(*(jnp.result_type(x) for x in jax.tree.leaves(shared)))
        return {
            "tracked": tree.task_zeros(shared, T, state_dtype),
            "lam": jnp.full((T,), 1.0 / T, dtype),
        }

    def prepare(shared: list, ctx: build.Context) -> build.Prepared:
        dtype, T = ctx.dtype, ctx.T
        k = (ctx.state.count + 1).astype(dtype)
        beta_k = (beta / k**beta_sigma).astype(dtype)
        ok = ctx.ok
        scales = jnp.ones((T,), dtype) if ctx.scales is None else ctx.scales.astype(dtype)
        if by_loss:
            # The norms by the skeleton's pre-scaled pass (no over- or underflow); a NaN or inf
            # gradient gives a non-finite norm, so this pass is also the finiteness check.
            mats = [tree.as_matrix(x) for x in shared]
            sq, s = build._pass_one("diag", [mats], T, dtype)
            norms = jnp.sqrt(jnp.maximum(sq[0], 0.0)) * s[0] * jnp.abs(scales)
            ok &= jnp.all(jnp.isfinite(jnp.where(ctx.mask, norms, 0.0)))
            losses = jnp.where(ctx.mask, ctx.losses, 0.0)
            live = jnp.isfinite(norms) & (norms > 0)  # a zero gradient stays 0, even for eps = 0
            n = jnp.where(live, norms, 1.0)
            scales = jnp.where(live, scales * losses / (n + eps), 0.0)
        else:
            ok &= tree.all_finite(shared)
        scales = jax.lax.stop_gradient(jnp.where(ctx.mask, scales, 0.0))
        ok &= jnp.all(jnp.isfinite(scales))
        keep = ctx.mask & ok
        treedef: Any  # (jax's PyTreeDef does not resolve for mypy)
        old_leaves, treedef = jax.tree.flatten(ctx.state.tracked)

        def leaf(g: jax.Array, old: jax.Array) -> jax.Array:
            rows = (-1,) + (1,) * (g.ndim - 1)
            h = g.astype(dtype) * scales.reshape(rows)
            new = tree.saturate(old.astype(dtype) - beta_k * (old.astype(dtype) - h), old.dtype)
            return jnp.where(keep.reshape(rows), new, old)

        ys = [leaf(g, old) for g, old in zip(shared, old_leaves, strict=True)]
        return build.Prepared(ys, {"tracked": treedef.unflatten(ys)}, ok)

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        k = (ctx.state.count + 1).astype(ctx.dtype)
        gamma_k = gamma / k**gamma_sigma
        lam = moco_step(ctx.state.lam, ctx.gram, ctx.gram_scale, ctx.mask, gamma_k, rho, projection)
        kept = jnp.where(ctx.mask, lam, ctx.state.lam.astype(lam.dtype))
        return lam, {"lam": kept}

    method = build.Method(
        name,
        MoCoState,
        weights_fn,
        init_extra=init_extra,
        gram="full",
        needs_losses=by_loss,
        prepare=prepare,
        guarded=("tracked",),
    )
    return build.aggregator(
        method, num_tasks=num_tasks, task_specific=task_specific, nonfinite=nonfinite
    )


# --- end moco ---

# --- excess_mtl ---


class ExcessMTLState(NamedTuple):
    """State of :func:`excess_mtl`: ``sq_sum`` holds each task's sum of squared gradients (the
    diagonal second moments), a params-shaped tree of ``(T, *leaf_shape)`` arrays (``None`` at
    task-specific leaves); ``alpha`` the weights on the simplex carried from step to step;
    ``excess`` the last excess-risk estimates; ``baseline`` and ``samples`` the sum and number
    of the estimates each task's normalisation divides by."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    sq_sum: Any
    alpha: jax.Array
    excess: jax.Array
    baseline: jax.Array
    samples: jax.Array


def excess_weights(
    alpha: jax.Array,
    excess: jax.Array,
    baseline: jax.Array,
    samples: jax.Array,
    mask: jax.Array,
    step_size: Any,
    warm: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ExcessMTL's weight step on the active tasks: ``(alpha, baseline, samples)`` after it.

    ``r_t = excess_t / (baseline_t / samples_t)``; a task without a positive baseline takes
    this step's estimate as its baseline (``r_t = 1``), or ``r_t = 0`` while its estimate is
    0. ``alpha <- softmax(log alpha + step_size * r)`` over the active tasks (their weights
    sum to 1; masked ones are kept); during the warm-up (``warm`` True) every active estimate
    is added to the baseline and ``alpha`` is left as it was.
    """
    dtype = excess.dtype
    big = jnp.finfo(dtype).max
    e = jnp.where(mask, jnp.clip(excess, 0.0, big), 0.0)
    warm = jnp.asarray(warm)
    has = (samples > 0) & (baseline > 0)
    start = mask & ~warm & ~has & (e > 0)
    in_warm = mask & warm
    baseline = jnp.where(start, e, jnp.where(in_warm, jnp.minimum(baseline + e, big), baseline))
    samples = jnp.where(start, 1, jnp.where(in_warm, samples + 1, samples)).astype(samples.dtype)
    mean = baseline / jnp.maximum(samples, 1).astype(dtype)
    live = (samples > 0) & (mean > 0)
    r = jnp.where(live, e / jnp.where(live, mean, 1.0), 0.0)
    r = jnp.where(start, 1.0, jnp.clip(r, 0.0, big))
    a = _renormalized(alpha.astype(dtype), mask)
    logits = jnp.log(jnp.where(a > 0, a, 1.0)) + jnp.asarray(step_size, dtype) * r
    logits = jnp.where(mask & (a > 0), logits, -jnp.inf)
    top = jnp.max(logits)
    ex = jnp.exp(jnp.where(jnp.isfinite(logits), logits - top, -jnp.inf))
    new = ex / jnp.sum(ex)
    new = jnp.where(warm, a, new)
    new = jnp.where(mask, new, alpha.astype(dtype))
    return new, baseline, samples


def excess_mtl(
    robust_step_size: float = 1.0,
    *,
    num_tasks: int | None = None,
    eps: float = 1e-7,
    warmup_steps: int = 0,
    reduction: str = "mean",
    state_dtype: Any = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""ExcessMTL: weights by exponentiated gradient on each task's estimated excess risk.

    Task → params. Scale: the weights lie on the simplex (a convex combination, mean-like;
    the first update is the mean); ``reduction="sum"`` multiplies them by T (LibMTL's scale).

    .. math::
       S_t \leftarrow S_t + g_t \odot g_t, \qquad
       e_t = \sum_p \frac{g_{tp}^2}{\sqrt{S_{tp} + \epsilon}}, \qquad
       \alpha_t \leftarrow \frac{\alpha_t \exp(\eta\, e_t / e_t^0)}
                                {\sum_s \alpha_s \exp(\eta\, e_s / e_s^0)}, \qquad
       d = \sum_t \alpha_t g_t

    from ``alpha = 1/T``: ``e_t`` estimates task t's excess risk ``l_t(theta) - l_t(theta*)``
    by a second-order Taylor expansion, ``g^T H^{-1} g``, with the diagonal empirical Fisher
    (AdaGrad's ``diag(sqrt(sum g^2))``) for the Hessian ``H`` (the paper's Eqs. 6-7); ``e_t^0``,
    the estimate at the task's first step (or the mean over the warm-up), makes the tasks'
    scales comparable (the paper's scale processing), and ``eta = robust_step_size`` (Eq. 9).
    The weights are updated from the first step, as in the paper and TorchJD; at the first
    step every ``e_t / e_t^0 = 1``, so the weights stay uniform.

    Args:
      robust_step_size: ``eta >= 0`` (TorchJD's default 1.0, the authors' README example;
        LibMTL's default is 0.01). 0 gives the mean.
      num_tasks: T (required: the second moments are state shaped by T).
      eps: ``> 0``, added to the second moments inside the square root (the peers' 1e-7).
      warmup_steps: steps (counted as ``count``) during which the weights stay as they are
        and every active estimate adds to ``e_t^0``, which is then their mean (the paper's
        Appendix C.1 collects 3 epochs; TorchJD's ``n_warmup_steps``). 0 (default): the
        first step's estimate.
      reduction: ``"mean"`` (default: weights on the simplex) or ``"sum"`` (times the number
        of active tasks: T when all take part).
      state_dtype: the second moments' dtype: None (default) keeps float32/float64 params'
        dtype and uses float32 for float16/bfloat16 params; or an explicit dtype. Sums
        saturate at the dtype's largest finite value, never inf.
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`): they
        take no part in the estimates and follow their task's gradient times its weight (the
        gradient of ``sum_t alpha_t l_t``, as the peers' backward pass gives them).
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`). A step
        skipped for bad inputs leaves the second moments, the weights and the baselines as
        they were.

    Masked tasks (``task_mask``) take no part: their second moments, weight and baseline are
    kept, they get weight 0, and the active tasks' weights are renormalised onto their own
    simplex. A task whose estimate is 0 (a zero gradient) at its first step takes its first
    positive estimate as its baseline; until then its ``e_t / e_t^0`` counts as 0.

    Cost:
      The task grads read three times: the estimates (from the old second moments; a NaN or
      inf gradient makes its estimate NaN, so this pass is also the finiteness check), the
      second moments' update (which reads and writes them), the combination. No Gramian, no
      solver. State: one T x P copy and a few ``(T,)`` vectors.

    Deviations:
      LibMTL (and the authors' code) keep weights that sum to T (``reduction="sum"``) and
      skip the weights' update at the first step; since the first normalised estimates are all
      1, that step would leave the weights uniform anyway, so ``reduction="sum"`` gives their
      update (without their eps: a zero first estimate there divides by 0). TorchJD 0.18
      (``n_warmup_steps=0``) updates the first step's weights with the raw estimates
      ``e_t`` (not divided by a baseline: their scale is that of the gradients' l1 norm, which
      for a large model puts nearly all the weight on one task); we divide by the baseline
      from the first step on. With ``warmup_steps >= 1`` both use the warm-up's mean and
      agree (up to the 1e-7 TorchJD adds to the baseline). Gradient entries above ~1.8e19
      (their squares overflow float32) saturate the second moments and add 0 to the
      estimates.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.excess_mtl(num_tasks=2)
      >>> grads = {"w": jnp.array([[2.0, 0.0], [0.0, 4.0]])}
      >>> updates, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates["w"]  # the first step: uniform weights
      Array([1., 2.], dtype=float32)

    References:
      He et al., `Robust Multi-Task Learning with Excess Risks
      <https://proceedings.mlr.press/v235/he24n.html>`_, ICML 2024.
    """
    name = "excess_mtl"
    if num_tasks is None:
        raise checks.fail(
            name,
            "num_tasks is required (the second moments of each task's gradient are state "
            "shaped by T); e.g. mtlopt.excess_mtl(num_tasks=3).",
        )
    eta = checks.nonnegative(name, "robust_step_size", robust_step_size)
    eps = checks.positive(name, "eps", eps)
    warmup_steps = checks.count(name, "warmup_steps", warmup_steps)
    checks.choice(name, "reduction", reduction, ("mean", "sum"))

    def init_extra(T: int, shared: Any) -> dict:
        if shared is None:
            raise checks.fail(
                name, "init needs the params: the second moments are shaped like them."
            )
        dtype = tree.acc_dtype(*(jnp.result_type(x) for x in jax.tree.leaves(shared)))
        return {
            "sq_sum": tree.task_zeros(shared, T, state_dtype),
            "alpha": jnp.full((T,), 1.0 / T, dtype),
            "excess": jnp.zeros((T,), dtype),
            "baseline": jnp.zeros((T,), dtype),
            "samples": jnp.zeros((T,), jnp.int32),
        }

    def prepare(shared: list, ctx: build.Context) -> build.Prepared:
        dtype = ctx.dtype
        if ctx.scales is not None:  # a task transform in front: its scaled grads
            shared = [
                (g.astype(dtype) * ctx.scales.reshape((-1,) + (1,) * (g.ndim - 1))).astype(g.dtype)
                for g in shared
            ]
        # Every read below goes through the (T, C) matrices the skeleton's passes read too: a leaf
        # that autodiff left in a transposed layout is laid out row-major once for all of them
        # (read as it came, the reduction below made a T x P copy of its own).
        mats = [tree.as_matrix(g) for g in shared]
        treedef: Any  # (jax's PyTreeDef does not resolve for mypy)
        old_leaves, treedef = jax.tree.flatten(ctx.state.sq_sum)
        olds = [tree.as_matrix(o) for o in old_leaves]
        # The estimates first, from the old sums: e_t = sum g^2 / sqrt(S + g^2 + eps), as
        # (g rsqrt(S + g^2 + eps)) g (|g| <= sqrt(S + g^2): no overflow). A NaN or inf gradient
        # makes its estimate NaN, so this pass is also the finiteness check that decides the
        # write below (a step skipped for bad inputs leaves the sums as they were), without a
        # pass of its own. (The write's g * g is not shared with this pass: XLA would keep a
        # shared product as a T x P temporary, measured 40 MB and 25 ms at T = 10, P = 1e6.)
        e_sum = jnp.zeros((ctx.T,), dtype)
        for m, o in zip(mats, olds, strict=True):
            md = m.astype(dtype)
            inv = lax.rsqrt(o.astype(dtype) + (jnp.abs(md) * jnp.abs(md) + eps))
            e_sum = e_sum + jnp.sum((md * inv) * md, axis=1)
        ok = ctx.ok & jnp.all(jnp.isfinite(jnp.where(ctx.mask, e_sum, 0.0)))
        keep = ctx.mask[:, None] & ok
        new_leaves = []
        for m, o, old in zip(mats, olds, old_leaves, strict=True):
            s = tree.saturate(o.astype(dtype) + m.astype(dtype) * m.astype(dtype), old.dtype)
            new_leaves.append(jnp.where(keep, s, o).reshape(old.shape))
        shared = [m.reshape(g.shape) for m, g in zip(mats, shared, strict=True)]
        e_sum = jnp.where(ctx.mask, e_sum, ctx.state.excess.astype(dtype))
        return build.Prepared(
            shared, {"sq_sum": treedef.unflatten(new_leaves), "excess": e_sum}, ok
        )

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        st = ctx.state
        warm = st.count < jnp.asarray(warmup_steps, st.count.dtype)
        alpha, baseline, samples = excess_weights(
            st.alpha, st.excess.astype(ctx.dtype), st.baseline.astype(ctx.dtype), st.samples,
            ctx.mask, eta, warm,
        )  # fmt: skip
        w = jnp.where(ctx.mask, alpha, 0.0)
        if reduction == "sum":  # times the number of active tasks
            w = w * jnp.sum(ctx.mask).astype(w.dtype)
        return w, {"alpha": alpha, "baseline": baseline, "samples": samples}

    method = build.Method(
        name,
        ExcessMTLState,
        weights_fn,
        init_extra=init_extra,
        gram=None,
        prepare=prepare,
        head_scales=lambda ctx, w: w,
        guarded=("sq_sum",),
    )
    return build.aggregator(
        method, num_tasks=num_tasks, task_specific=task_specific, nonfinite=nonfinite
    )


# --- end excess_mtl ---
