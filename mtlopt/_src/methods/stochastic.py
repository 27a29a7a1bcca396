r"""Stochastic multi-objective methods with double sampling: SDMGrad and MoDo.

Both papers update simplex weights from inner products of task gradients drawn from two
**independent** mini-batches, ``A = J1 J2^T`` (``A[s, t] = <g_s(xi), g_t(xi')>``): its
expectation is the true Gramian, whereas the one-sample Gramian ``J J^T`` is biased upwards by
the gradients' noise (``E[J J^T] = G + Cov``, the per-task noise variances added to the
diagonal). Both methods take the second sample as the optional extra argument
``second_sample`` (task grads with the structure of the first): the skeleton then computes the
cross-Gramian in pass 1 instead of the Gramian (``build.Method.cross``: over the shared leaves,
heads excluded, masked rows zeroed, pre-scaled where float32 over- or underflows) and pass 2
combines the main task grads. Without it they fall back to the one-sample Gramian (see each
method's "Single sample" paragraph).

Producing the two samples in a Flax (or any JAX) step: one forward pass over the batch, the
per-example task losses averaged over each half of it, and the gradients of those 2T losses in
one ``vmap`` (what :func:`mtlopt.task_value_and_grad` and ``mtlopt.flax.task_value_and_grad``
run): rows ``:T`` are the first half's task grads, rows ``T:`` the second's::

    def half_losses(model, x, y):  # (2T,): task losses of the first half, then the second
        per_example = per_example_task_losses(model, x, y)  # (B, T), B even
        return per_example.reshape(2, -1, T).mean(axis=1).reshape(2 * T)

    losses, J = mtlopt.flax.task_value_and_grad(half_losses)(model, x, y)
    first = jax.tree.map(lambda g: g[:T], J)
    second = jax.tree.map(lambda g: g[T:], J)
    optimizer.update(model, first, second_sample=second)  # nnx.Optimizer(model, tx, wrt=...)

The backward passes cost those of 2T tasks; the update combines the first half's gradients.
(Layers that mix examples, such as BatchNorm in training mode, make the halves' gradients
slightly dependent.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mtlopt._src import build, checks, solvers, tree

HIGHEST = lax.Precision.HIGHEST

SECOND_SAMPLE = build.Signal(
    "second_sample",
    "task_grads",
    required=False,
    why=" (a second, independent sample of the task grads, with the structure of the first)",
)


class SDMGradState(NamedTuple):
    """State of :func:`sdmgrad`. ``inner`` is the inner variable ``w`` (on the simplex), warm
    start of the next step's inner loop."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    inner: jax.Array


class MoDoState(NamedTuple):
    """State of :func:`modo`. ``lam`` is the paper's ``lambda`` (on the simplex)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    lam: jax.Array


def _require_num_tasks(name: str, num_tasks: Any) -> None:
    if num_tasks is None:
        raise checks.fail(
            name,
            f"num_tasks is required (the state keeps the simplex weights from step to step); "
            f"e.g. mtlopt.{name}(num_tasks=3).",
        )


def _simplex_state(field: str) -> Callable[[int, Any], dict]:
    def init_extra(T: int, shared: Any) -> dict:
        dtype = tree.acc_dtype(*(x.dtype for x in jax.tree.leaves(shared)))
        return {field: jnp.full((T,), 1.0 / T, dtype)}

    return init_extra


def _normalized(A: jax.Array, mask: jax.Array) -> jax.Array:
    """``A / s**2`` with ``s`` the mean over the active tasks of ``sqrt(max(A_tt, 0))`` (the
    official SDMGrad code's normalisation, without its ``+1e-8``), ``s**2`` floored at
    ``eps * max |A_st|`` (met only by a cross-Gramian whose diagonal is almost all cancelled);
    0 for a zero ``A``. Homogeneous of degree 0: the pre-scaled ``ctx.gram`` serves."""
    dtype = A.dtype
    A = jnp.where(mask[:, None] & mask[None, :], A, 0.0)
    d = jnp.where(mask, jnp.sqrt(jnp.maximum(jnp.diagonal(A), 0.0)), 0.0)
    s = jnp.sum(d) / jnp.maximum(jnp.sum(mask), 1).astype(dtype)
    top = jnp.max(jnp.abs(A))
    den = jnp.maximum(s * s, jnp.finfo(dtype).eps * top)
    return jnp.where(den > 0, A / jnp.where(den > 0, den, 1.0), 0.0)


def sdmgrad_weights(
    A: jax.Array,
    w0: jax.Array,
    mask: jax.Array,
    lamda: Any,
    niter: Any,
    lr: Any,
    momentum: Any,
) -> tuple[jax.Array, jax.Array]:
    """SDMGrad's inner loop on a (pre-scaled) matrix ``A``: ``(weights, w)``; see
    :func:`mtlopt.sdmgrad`."""
    dtype = A.dtype
    An = _normalized(A, mask)
    pref = solvers.uniform(mask, dtype)
    lamda = jnp.asarray(lamda, dtype)
    lr = jnp.asarray(lr, dtype)
    momentum = jnp.asarray(momentum, dtype)
    w = solvers.project(w0.astype(dtype), mask)
    shift = lamda * jnp.dot(An, pref, precision=HIGHEST)

    def body(_: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        w, v = carry
        g = jnp.dot(An, w, precision=HIGHEST) + shift
        v = momentum * v + g  # (v = g on the first iteration, as torch's SGD buffer)
        return solvers.project(w - lr * v, mask), v

    w, _ = lax.fori_loop(0, niter, body, (w, jnp.zeros_like(w)))
    return jnp.where(mask, (w + lamda * pref) / (1.0 + lamda), 0.0), w


def sdmgrad(
    lamda: float = 0.3,
    niter: int = 20,
    *,
    lr: float = 1.0,
    momentum: float = 0.5,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SDMGrad: stochastic direction-oriented MGDA, weights from a few projected (momentum) SGD
    steps on the simplex with double-sampled task gradients, pulled towards the average.

    Task → params. Scale: a convex combination (the weights are on the simplex): identical tasks
    give their gradient, T = 1 gives it too.

    .. math::
       \min_{w \in \Delta}\ \tfrac12 \|J^\top w + \lambda\, J^\top \tilde w\|^2
       \;\Rightarrow\;
       v \leftarrow \mu v + \hat A (w + \lambda \tilde w),\quad
       w \leftarrow \Pi_\Delta(w - \beta v)\ \ (\text{niter times}),\qquad
       d = J^\top \frac{w + \lambda \tilde w}{1 + \lambda}

    with :math:`\tilde w = 1/T`, :math:`\hat A = A / s^2`,
    :math:`s = \operatorname{mean}_t \sqrt{\max(A_{tt}, 0)}` and ``A = J1 J2^T`` the
    cross-Gramian of two independent samples (pass ``second_sample=``; ``d`` uses the main
    task grads ``J = J1``). ``w`` lives in the state: each step's loop starts from the last
    step's ``w`` (``v`` starts at 0 every step).

    Args:
      lamda: :math:`\lambda \ge 0`, the pull towards the average gradient (0: stochastic MGDA;
        large: the mean).
      niter: inner iterations per step (an int >= 1).
      lr: :math:`\beta > 0`, the inner step size on the normalised :math:`\hat A` (1; the
        authors' code and TorchJD use 10, LibMTL 5: see Deviations).
      momentum: :math:`\mu \in [0, 1)`, the inner heavy-ball momentum (0.5, as the authors'
        code and both peers; 0 is the paper's plain projected SGD).
      num_tasks: T (required: the state keeps ``w``).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); heads
        follow their own task's gradient and are not part of ``A``.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).
      groups: per-group matrices ``A`` and inner loops (see :func:`mtlopt.cagrad`).

    Extra argument ``second_sample``: a second sample of task grads, independent of the first
    (the other half of the batch, see the module notes of ``mtlopt._src.methods.stochastic``
    and the README), with the structure and shapes of the task grads.

    Single sample: without ``second_sample``, ``A`` is the Gramian ``J J^T`` of the one sample,
    as the peers do when given one batch. Its expectation is ``G + Cov`` (each task's gradient
    noise variance on the diagonal), so noisier tasks look longer and ``w`` leans away from
    them, towards MGDA's bias; the paper's convergence guarantee needs the two samples.

    Masked tasks get weight 0, keep their ``w`` entry, and do not enter ``s``, ``tilde w`` or
    the loop (the active part of the stored ``w`` is projected onto the simplex first). A zero
    ``A`` leaves ``w`` unchanged. The weights depend on ``A`` only through ``A / s^2``: the
    update scales with the gradients.

    Cost:
      Two passes over the task grads (the cross-Gramian, which reads both samples, or the
      Gramian; the combination); ``niter`` ``(T, T)`` mat-vecs and simplex projections.

    Deviations:
      The paper's Algorithm 1 draws a third batch :math:`\zeta` for ``d`` and runs plain
      projected SGD with a step :math:`\beta` on the raw ``A``; the authors' code (and LibMTL,
      TorchJD) normalise ``A`` by ``s**2 + 1e-8`` and use momentum 0.5: we follow the code
      without the ``1e-8`` (so gradients of any scale give the same weights; the two agree
      where ``s >> 1e-4``). ``d`` here uses the first sample (``zeta = xi``); LibMTL's three
      batches (``d`` from a third one) are not offered by this signature. The default inner
      step is 1, not the authors' and TorchJD's 10 (LibMTL's 5): on :math:`\hat A` (mean
      diagonal 1) a step of 10 overshoots, the loop bounces between faces of the simplex and
      amplifies rounding: measured in float64 over 10-20 random problems, a relative change of
      1e-9 in ``A`` moved the weights by up to 1e-3 (T = 10, cross-Gramians) to 1e-2
      (T = 64), so float32 runs, kernels or backends that differ in the last bit give different
      weights. At step 1 the same changes moved them by less than 1e-9 (random, 1000x-spread,
      cross-Gramian and T = 64 problems), except with many tasks of widely spread norms
      (T = 64, norms spread 1000x: float32 weights off the float64 ones by 0.7 at step 1,
      5e-3 at 0.3, 2e-8 at 0.1; there pass ``lr=0.1``). ``lr=10.0`` reproduces the peers. TorchJD's
      ``pref_vector`` (a preference other than 1/T) is not offered.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.sdmgrad(num_tasks=2)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> first = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> second = {"w": jnp.array([[1.2, 0.1], [-0.1, 1.8]])}
      >>> updates, state = tx.update(first, state, second_sample=second)
      >>> [round(float(x), 4) for x in mtlopt.task_weights(state)]  # the shorter one weighs more
      [0.787, 0.213]

    References:
      Xiao, Ban & Ji, `Direction-oriented Multi-objective Learning: Simple and Provable
      Stochastic Algorithms <https://arxiv.org/abs/2305.18409>`_, NeurIPS 2023.
    """
    name = "sdmgrad"
    _require_num_tasks(name, num_tasks)
    lamda = checks.nonnegative(name, "lamda", lamda)
    niter = checks.count(name, "niter", niter, 1)
    lr = checks.positive(name, "lr", lr)
    momentum = checks.nonnegative(name, "momentum", momentum, upper=1.0)
    if checks.concrete(momentum) and float(momentum) >= 1.0:
        raise checks.fail(name, f"momentum must be a finite number in [0, 1); got {momentum!r}.")

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        w, inner = sdmgrad_weights(ctx.gram, ctx.state.inner, ctx.mask, lamda, niter, lr, momentum)
        return w, {"inner": jnp.where(ctx.mask, inner, ctx.state.inner.astype(inner.dtype))}

    method = build.Method(
        name,
        SDMGradState,
        weights_fn,
        init_extra=_simplex_state("inner"),
        signals=(SECOND_SAMPLE,),
        cross=SECOND_SAMPLE.name,
        per_group=("inner",),
    )
    return build.aggregator(
        method,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        groups=groups,
    )


def modo_weights(
    A: jax.Array,
    scale: jax.Array,
    lam0: jax.Array,
    mask: jax.Array,
    gamma: Any,
    rho: Any,
    normalize: bool,
) -> jax.Array:
    """MoDo's step on a (pre-scaled) matrix ``A`` (true ``A * scale**2``): the new ``lambda``;
    see :func:`mtlopt.modo`."""
    dtype = A.dtype
    gamma = jnp.asarray(gamma, dtype)
    rho = jnp.asarray(rho, dtype)
    lam = solvers.project(lam0.astype(dtype), mask)
    if normalize:
        A, scale = _normalized(A, mask), jnp.ones((), dtype)
    A = jnp.where(mask[:, None] & mask[None, :], A, 0.0)
    u = jnp.dot(A, lam, precision=HIGHEST)  # (A lambda) / scale**2
    z = ((gamma * u) * scale) * scale + gamma * rho * lam
    # Where gamma A lambda overflows, the true step's entries differ by far more than 1: the
    # projection keeps only the smallest (A lambda)_t, ties shared; so does that of -u * 2**100
    # (u scaled to at most 1), which is finite.
    big = jnp.max(jnp.where(mask, jnp.abs(u), 0.0))
    huge = (u / jnp.where(big > 0, big, 1.0)) * tree.pow2(jnp.asarray(100.0), dtype)
    finite = jnp.all(jnp.isfinite(jnp.where(mask, z, 0.0)))
    z = jnp.where(finite | ~jnp.all(jnp.isfinite(u)), z, huge)
    return solvers.project(lam - z, mask)


def modo(
    gamma: float = 1e-3,
    rho: float = 0.1,
    *,
    normalize: bool = False,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""MoDo: multi-objective gradient with double sampling; one projected gradient step of
    the simplex weights per step, from the cross-Gramian of two independent samples.

    Task → params. Scale: a convex combination (the weights are on the simplex): identical tasks
    give their gradient, T = 1 gives it too.

    .. math::
       \lambda_{k+1} = \Pi_\Delta\big(\lambda_k - \gamma\,(A \lambda_k + \rho \lambda_k)\big),
       \qquad d = J^\top \lambda_{k+1}

    with ``A = J1 J2^T`` the cross-Gramian of two independent samples (pass
    ``second_sample=``; ``d`` uses the main task grads ``J = J1``) and :math:`\lambda` in the
    state (uniform at the start). :math:`A\lambda` is the gradient of
    :math:`\tfrac12\|J^\top\lambda\|^2`, estimated without bias: :math:`\lambda` drifts towards
    MGDA's min-norm weights, regularised by :math:`\rho` towards uniform.

    Args:
      gamma: :math:`\gamma > 0`, the step size of :math:`\lambda` (in the gradients' units: the
        step is :math:`\gamma A \lambda`, so its effect grows with the squared gradient norms,
        as in the paper).
      rho: :math:`\rho \ge 0`, the :math:`\ell_2` regularisation of :math:`\lambda`.
      normalize: False (default, the paper's and the peers' rule) or True: ``A`` divided by
        :math:`s^2`, :math:`s = \operatorname{mean}_t \sqrt{\max(A_{tt}, 0)}` (SDMGrad's
        normalisation), so that ``gamma`` is relative and the weights do not depend on the
        gradients' scale.
      num_tasks: T (required: the state keeps :math:`\lambda`).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); heads
        follow their own task's gradient and are not part of ``A``.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).
      groups: per-group matrices ``A`` and weights (see :func:`mtlopt.cagrad`).

    Extra argument ``second_sample``: a second sample of task grads, independent of the first
    (the other half of the batch, see the module notes of ``mtlopt._src.methods.stochastic``
    and the README), with the structure and shapes of the task grads.

    Single sample: without ``second_sample``, ``A`` is the Gramian ``J J^T`` of the one sample.
    Its expectation is ``G + Cov`` (each task's gradient noise variance on the diagonal), so
    the step pushes :math:`\lambda` away from noisy tasks as if they had longer gradients; the
    paper's analysis (an unbiased :math:`A\lambda`) needs the two samples.

    Masked tasks get weight 0, keep their :math:`\lambda` entry and take no part (the active
    part of the stored :math:`\lambda` is projected onto the simplex first). With
    ``normalize=False`` huge gradients (where :math:`\gamma A \lambda` overflows) give the
    projection's limit: all weight on the task(s) of the smallest :math:`(A\lambda)_t`; tiny
    ones leave only the :math:`\rho` term.

    Cost:
      Two passes over the task grads (the cross-Gramian, which reads both samples, or the
      Gramian; the combination); one ``(T, T)`` mat-vec and one simplex projection.

    Deviations:
      The paper's three-sample form and LibMTL (three batches) combine a third sample with
      :math:`\lambda_{k+1}`; the two-sample form of TorchJD's example combines the mean of the
      two. Here ``d`` combines the first sample (which ``A`` also read). The defaults
      (``gamma=1e-3``, ``rho=0.1``) are LibMTL's; TorchJD's are ``gamma=0.1``, ``rho=0.1``.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.modo(gamma=0.1, rho=0.0, num_tasks=2)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> first = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> second = {"w": jnp.array([[1.2, 0.1], [-0.1, 1.8]])}
      >>> updates, state = tx.update(first, state, second_sample=second)
      >>> [round(float(x), 4) for x in mtlopt.task_weights(state)]  # towards the shorter one
      [0.5675, 0.4325]

    References:
      Chen, Fernando, Ying & Chen, `Three-Way Trade-Off in Multi-Objective Learning:
      Optimization, Generalization and Conflict-Avoidance <https://arxiv.org/abs/2305.20057>`_,
      NeurIPS 2023 (JMLR 2024).
    """
    name = "modo"
    _require_num_tasks(name, num_tasks)
    gamma = checks.positive(name, "gamma", gamma)
    rho = checks.nonnegative(name, "rho", rho)
    if not isinstance(normalize, bool):
        raise checks.fail(name, f"normalize must be a bool; got {normalize!r}.")

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        lam = modo_weights(ctx.gram, ctx.gram_scale, ctx.state.lam, ctx.mask, gamma, rho, normalize)
        return lam, {"lam": jnp.where(ctx.mask, lam, ctx.state.lam.astype(lam.dtype))}

    method = build.Method(
        name,
        MoDoState,
        weights_fn,
        init_extra=_simplex_state("lam"),
        signals=(SECOND_SAMPLE,),
        cross=SECOND_SAMPLE.name,
        per_group=("lam",),
    )
    return build.aggregator(
        method,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        groups=groups,
    )
