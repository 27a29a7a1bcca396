"""Learned loss scales: uncertainty weighting (UW), IMTL-L and the hybrid IMTL.

Each method keeps one learned number ``s_t`` per task in its state and weighs task t by a
function of it (``exp(-s_t)`` for UW, ``exp(s_t)`` for IMTL). The papers learn ``s`` beside the
model, with the model's optimizer, from the gradient of a regularised objective; here the
method owns an optax optimizer for ``s`` (``mtlopt/_src/learned.py``) and steps it inside
``update``, from the gradient of the paper's objective with respect to ``s``.

Conventions shared by the three methods (the reasons for what the functions below do):

* **A joint step.** The weights of step k use ``s`` as it was before the step, as one gradient
  step of the model and ``s`` together would: differentiating the paper's objective at
  ``(theta_k, s_k)`` gives both the model's gradient (with the weights at ``s_k``) and the
  gradient on ``s`` from which ``s_{k+1}`` is written into the state. Passing ``optimizer=``
  equal to the model's optimizer reproduces the peers (TorchJD, LibMTL), which put ``s`` in the
  model's optimizer.
* **Bounded.** Each method's optimum in ``s`` follows a log of the losses (UW: ``s = log l``,
  IMTL-L: ``s = -log l``): a loss that goes to 0 sends ``s`` off to infinity, and
  ``exp(+-s)`` overflows in float32 beyond 88. After every step ``s`` is projected onto
  ``[-bound, bound]`` (default 20: weights within ``e^{+-20}``, about ``2e-9`` to ``5e8``), so
  the weights stay finite and ``s`` comes back as soon as the losses do. The gradient fed to the
  optimizer is clipped to ``+-1e15`` (its square, Adam's second moment, then stays finite in
  float32: an inf there would freeze ``s`` for good), and a step whose new ``s`` or optimizer
  state is not finite is skipped (NaN weights: the skeleton leaves the state as it was).
* **Masked tasks** (``task_mask``) get weight 0 and keep their ``s`` and their rows of the
  optimizer's state (Adam's moments); their losses may be NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlopt._src import build, checks, learned
from mtlopt._src.methods.closed_form import _rcond_arg, imtl_g_weights

# The default learning rate of the default optimizer (Adam) on s. Adam's steps are about the
# learning rate whatever the gradient's size (the gradient on s grows with the losses), so s
# moves by at most ~1e-3 a step: a weight can change by a factor e in ~1000 steps, the time
# scale on which the losses of a typical run move.
_LR = 1e-3
# s is projected onto [-_BOUND, _BOUND] after every step (see the module notes).
_BOUND = 20.0
# The gradient on s is clipped to this size before the optimizer sees it: its square stays
# finite in float32 (Adam's second moment).
_MAX_GRAD = 1e15
_FORMS = ("kendall", "simplified")


class UWState(NamedTuple):
    """State of :func:`uw`: the log-variances ``s_t = log sigma_t^2`` and their optimizer's
    state."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array
    log_vars: jax.Array
    opt_state: Any


class IMTLLState(NamedTuple):
    """State of :func:`imtl_l`: the log-scales ``s_t`` and their optimizer's state."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array
    log_scales: jax.Array
    opt_state: Any


class IMTLState(NamedTuple):
    """State of :func:`imtl`: the log-scales ``s_t`` and their optimizer's state."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array
    log_scales: jax.Array
    opt_state: Any


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _need_num_tasks(name: str, num_tasks: Any, what: str) -> None:
    if num_tasks is None:
        raise checks.fail(
            name,
            f"num_tasks is required (the state keeps {what}); e.g. mtlopt.{name}(num_tasks=3).",
        )


def _bounds(name: str, init: Any, bound: Any) -> tuple[Any, Any]:
    """Checks ``init`` (a finite scalar) and ``bound`` (None or > 0, with ``|init| <= bound``)
    where they are concrete; traced values pass."""
    if checks.concrete(init):
        ok = np.ndim(init) == 0 and not isinstance(init, bool)
        ok = ok and np.issubdtype(np.asarray(init).dtype, np.number)
        if not (ok and np.isfinite(np.asarray(init, np.float64))):
            raise checks.fail(name, f"init must be a finite number; got {init!r}.")
        if isinstance(init, (int, float, np.number)):
            init = float(init)
    elif np.ndim(init) != 0:
        raise checks.fail(name, f"init must be a scalar; got shape {np.shape(init)}.")
    if bound is None:
        return init, None
    bound = checks.positive(name, "bound", bound)
    if checks.concrete(init) and checks.concrete(bound) and abs(init) > float(bound):
        raise checks.fail(name, f"init={init!r} is outside [-bound, bound] with bound={bound!r}.")
    return init, bound


def _init_fn(
    opt: optax.GradientTransformation, init: Any, field: str
) -> Callable[[int, Any], dict]:
    def init_extra(T: int, shared: Any) -> dict:
        del shared
        value, opt_state = learned.init(opt, jnp.full((T,), init, jnp.float32))
        return {field: value, "opt_state": opt_state}

    return init_extra


def _finite(tree_: Any) -> jax.Array:
    ok = jnp.asarray(True)
    for x in jax.tree.leaves(tree_):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            ok &= jnp.all(jnp.isfinite(x))
    return ok


def _step(
    opt: optax.GradientTransformation,
    grad: jax.Array,
    value: jax.Array,
    opt_state: Any,
    mask: jax.Array,
    bound: Any,
) -> tuple[jax.Array, Any, jax.Array]:
    """One step of the learned parameters: ``(new value, new optimizer state, ok)``, the value
    projected onto ``[-bound, bound]``; ``ok`` False where the new state is not finite."""
    grad = jnp.clip(jnp.where(mask, grad, 0.0), -_MAX_GRAD, _MAX_GRAD)
    new, opt_state = learned.step(opt, grad.astype(value.dtype), value, opt_state, mask)
    if bound is not None:
        b = jnp.asarray(bound).astype(new.dtype)
        new = jnp.where(mask, jnp.clip(new, -b, b), new)
    return new, opt_state, _finite(new) & _finite(opt_state)


def _positive_losses(losses: jax.Array, mask: jax.Array) -> jax.Array:
    """Every active loss is > 0 (IMTL's optimum in s is ``-log l``)."""
    return jnp.all(jnp.where(mask, losses > 0, True))


# ---------------------------------------------------------------------------------------------
# UW


def uw(
    learning_rate: float = _LR,
    *,
    form: str = "kendall",
    init: float = 0.0,
    bound: float | None = _BOUND,
    optimizer: optax.GradientTransformation | None = None,
    num_tasks: int,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Uncertainty weighting: each loss divided by a learned variance, plus its log.

    Task → params, or the loss weights alone with one backward pass
    (:func:`mtlopt.loss_weights`). Scale: sums, with weights ``0.5 exp(-s_t)``: ``0.5`` per task
    at the initial state (``init=0``, ``form="kendall"``), 1 per task with
    ``form="simplified"``; the weights then follow the losses (``exp(-s_t) -> 1 / l_t``).

    .. math::
       \mathcal L(\theta, s) = \sum_t \tfrac12 e^{-s_t} l_t(\theta) + \tfrac12 s_t,\qquad
       d = \sum_t \tfrac12 e^{-s_t} g_t,\qquad
       \frac{\partial \mathcal L}{\partial s_t} = \tfrac12 \left(1 - e^{-s_t} l_t\right)

    (``form="kendall"``: Kendall et al.'s regression form ``l / (2 sigma^2) + log sigma`` with
    ``s = log sigma^2``) or ``sum_t exp(-s_t) l_t + s_t``, weights ``exp(-s_t)``, gradient
    ``1 - exp(-s_t) l_t`` (``form="simplified"``). ``d`` uses ``s`` before the step; ``s`` then
    takes one step of ``optimizer`` on the gradient above and is kept in ``[-bound, bound]``
    (its optimum is ``s_t = log l_t``).

    Args:
      learning_rate: of the default optimizer, ``optax.adam(learning_rate)``; default ``1e-3``
        (Adam moves ``s`` by about the learning rate a step, whatever the losses' size: a weight
        changes by a factor e in ~1000 steps). Ignored when ``optimizer`` is given. May be
        traced (``optax.inject_hyperparams``, ``jax.vmap``).
      form: ``"kendall"`` (default: the paper's regression form, as TorchJD 0.18 ``UW`` and
        LibMTL ``UW`` implement it) or ``"simplified"`` (``exp(-s) l + s``, the form common in
        other code: twice the objective, so twice the weights and the gradient on ``s``; with
        Adam, nearly the same ``s``).
      init: the initial ``s_t`` (default 0: ``sigma^2 = 1``, the paper's and TorchJD's; LibMTL
        starts at ``-0.5``).
      bound: ``s_t`` is projected onto ``[-bound, bound]`` after every step (default 20; see
        below). ``None``: no bound (the peers'), at the risk of a weight that overflows.
      optimizer: any optax transformation for ``s`` (e.g. ``optax.sgd(0.1)``); pass the
        model's own optimizer to reproduce the peers, which train ``s`` jointly with the model.
      num_tasks: T (required: the state keeps ``s``).
      task_specific: heads get their task's weight, as the trunk does (the gradient of the
        objective).
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Bad values: no log of the losses is taken, so any finite loss is accepted. A loss ``<= 0``
    has no optimum in ``s`` (the objective falls without end as ``s -> -inf``): ``s`` runs down
    to ``-bound`` (weight ``0.5 e^{20}`` with the defaults) and stays there while the loss does,
    and comes back as soon as the loss is positive again. Non-finite losses skip the step.
    Masked tasks (``task_mask``) get weight 0 and keep ``s`` and their optimizer moments.

    Cost:
      O(T): no pass over the task grads beyond the combination (none in the loss-only mode,
      where the user's one backward pass of ``sum_t w_t l_t`` does it); one optimizer step on
      T numbers. State: ``s`` and its optimizer's state (Adam: 3 T numbers).

    Deviations:
      The peers train ``s`` with the model's optimizer and learning rate (TorchJD's example:
      SGD, LibMTL: Adam, 1e-4 in its examples); here it has its own, Adam at ``1e-3`` by
      default (``optimizer=`` gives the peers'). The bound on ``s`` is ours: the peers have
      none (their weights overflow when a loss goes to 0).

    Examples:
      >>> import jax.numpy as jnp, optax, mtlopt
      >>> tx = mtlopt.uw(optimizer=optax.sgd(0.5), num_tasks=2)
      >>> state = tx.init(None)
      >>> w, state = mtlopt.loss_weights(tx, jnp.array([1.0, 3.0]), state)
      >>> w  # 0.5 exp(-0)
      Array([0.5, 0.5], dtype=float32)
      >>> state.log_vars  # s - 0.5 * 0.5 (1 - l)
      Array([0. , 0.5], dtype=float32)

    References:
      Kendall, Gal & Cipolla, `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
      Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.
    """
    name = "uw"
    _need_num_tasks(name, num_tasks, "the learned log-variances")
    checks.choice(name, "form", form, _FORMS)
    init, bound = _bounds(name, init, bound)
    opt = learned.optimizer(name, learning_rate, optimizer)
    half = form == "kendall"

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        s, mask = ctx.state.log_vars, ctx.mask
        e = jnp.exp(-s.astype(ctx.dtype))
        w = 0.5 * e if half else e
        grad = 1.0 - e * ctx.losses
        grad = 0.5 * grad if half else grad
        new, opt_state, ok = _step(opt, grad, s, ctx.state.opt_state, mask, bound)
        w = jnp.where(ok, jnp.where(mask, w, 0.0), jnp.nan)
        return w, {"log_vars": new, "opt_state": opt_state}

    return build.loss_weighting(
        name,
        UWState,
        weights_fn,
        init_extra=_init_fn(opt, init, "log_vars"),
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
    )


# ---------------------------------------------------------------------------------------------
# IMTL-L


def _imtl_l_step(
    opt: optax.GradientTransformation, bound: Any, ctx: build.Context
) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """IMTL-L's step on ``s``: ``(exp(s), new s, new optimizer state, ok)``, ``ok`` False where
    an active loss is not positive or the new state is not finite."""
    s, mask = ctx.state.log_scales, ctx.mask
    e = jnp.exp(s.astype(ctx.dtype))
    grad = e * ctx.losses - 1.0
    new, opt_state, ok = _step(opt, grad, s, ctx.state.opt_state, mask, bound)
    return e, new, opt_state, ok & _positive_losses(ctx.losses, mask)


def imtl_l(
    learning_rate: float = _LR,
    *,
    init: float = 0.0,
    bound: float | None = _BOUND,
    optimizer: optax.GradientTransformation | None = None,
    num_tasks: int,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""IMTL-L: each loss scaled by a learned ``exp(s_t)``, regularised by ``-s_t``, so that the
    scaled losses stay at 1.

    Task → params, or the loss weights alone with one backward pass
    (:func:`mtlopt.loss_weights`). Scale: sums, with weights ``exp(s_t)``: 1 per task at the
    initial state (``init=0``: the plain sum of the losses), then ``exp(s_t) -> 1 / l_t``.

    .. math::
       \mathcal L(\theta, s) = \sum_t e^{s_t} l_t(\theta) - s_t,\qquad
       d = \sum_t e^{s_t} g_t,\qquad
       \frac{\partial \mathcal L}{\partial s_t} = e^{s_t} l_t - 1

    ``d`` uses ``s`` before the step; ``s`` then takes one step of ``optimizer`` on the gradient
    above and is kept in ``[-bound, bound]`` (its optimum is ``s_t = -log l_t``). This is
    :func:`mtlopt.uw` at ``-s`` times 2 (same weights up to that factor, same optima).

    Args:
      learning_rate: of the default optimizer, ``optax.adam(learning_rate)``; default ``1e-3``
        (see :func:`mtlopt.uw`). Ignored when ``optimizer`` is given. May be traced.
      init: the initial ``s_t`` (default 0, the paper's, TorchJD's and LibMTL's).
      bound: ``s_t`` is projected onto ``[-bound, bound]`` after every step (default 20);
        ``None``: no bound (the peers').
      optimizer: any optax transformation for ``s``; pass the model's own optimizer to
        reproduce the peers, which train ``s`` jointly with the model.
      num_tasks: T (required: the state keeps ``s``).
      task_specific: heads get their task's weight, as the trunk does.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Bad values: the optimum ``s = -log l`` needs positive losses (the paper balances positive
    losses): with an active loss ``<= 0`` the objective has no minimum in ``s`` and the step is
    a bad input, skipped as a non-finite one is (zero update with ``nonfinite="skip"``, NaN with
    ``"propagate"``; the state, ``s`` included, is left as it was; ``skipped`` counts it). A
    tiny positive loss sends ``s`` to ``bound``, no further. Masked tasks (``task_mask``) get
    weight 0 and keep ``s`` and their optimizer moments; their losses are not checked.

    Cost:
      O(T): no pass over the task grads beyond the combination (none in the loss-only mode);
      one optimizer step on T numbers. State: ``s`` and its optimizer's state.

    Deviations:
      The peers (TorchJD 0.18 ``IMTLL``; LibMTL's ``IMTL`` for its loss half) train ``s`` with
      the model's optimizer and accept any loss; here ``s`` has its own optimizer (Adam,
      ``1e-3``; ``optimizer=`` gives theirs), is bounded, and non-positive losses skip the step.

    Examples:
      >>> import jax.numpy as jnp, optax, mtlopt
      >>> tx = mtlopt.imtl_l(optimizer=optax.sgd(0.5), num_tasks=2)
      >>> state = tx.init(None)
      >>> w, state = mtlopt.loss_weights(tx, jnp.array([1.0, 3.0]), state)
      >>> w  # exp(0)
      Array([1., 1.], dtype=float32)
      >>> state.log_scales  # s - 0.5 (exp(s) l - 1)
      Array([ 0., -1.], dtype=float32)

    References:
      Liu et al., `Towards Impartial Multi-task Learning
      <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
    """
    name = "imtl_l"
    _need_num_tasks(name, num_tasks, "the learned log-scales")
    init, bound = _bounds(name, init, bound)
    opt = learned.optimizer(name, learning_rate, optimizer)

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        e, new, opt_state, ok = _imtl_l_step(opt, bound, ctx)
        w = jnp.where(ok, jnp.where(ctx.mask, e, 0.0), jnp.nan)
        return w, {"log_scales": new, "opt_state": opt_state}

    return build.loss_weighting(
        name,
        IMTLLState,
        weights_fn,
        init_extra=_init_fn(opt, init, "log_scales"),
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
    )


# ---------------------------------------------------------------------------------------------
# IMTL (hybrid)


def imtl(
    learning_rate: float = _LR,
    *,
    init: float = 0.0,
    bound: float | None = _BOUND,
    optimizer: optax.GradientTransformation | None = None,
    rcond: float | None = None,
    num_tasks: int,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""IMTL, the hybrid: IMTL-G's combination of the gradients of IMTL-L's scaled losses.

    Task → params (it needs the task gradients: no loss-only mode). Scale: an affine
    combination of the scaled gradients ``exp(s_t) g_t`` (``sum_t a_t = 1``): at the initial
    state (``init=0``) that of :func:`mtlopt.imtl_g`, the gradient itself for T = 1 and for
    identical tasks; the scales then follow the losses (``exp(s_t) -> 1 / l_t``).

    .. math::
       \tilde g_t = e^{s_t} g_t,\qquad d = \sum_t a_t \tilde g_t
       \ \text{(IMTL-G on the}\ \tilde g_t),\qquad
       s_t \leftarrow s_t - \text{step}\big(e^{s_t} l_t - 1\big)

    The shared parameters get IMTL-G's combination (equal projections on the unit gradients,
    ``sum_t a_t = 1``) of the gradients of the scaled losses ``exp(s_t) l_t - s_t``; each
    task-specific head gets its own scaled gradient ``exp(s_t) g_t`` (the paper; LibMTL's
    ``IMTL``, whose heads accumulate the scaled losses' gradients); ``s`` takes IMTL-L's step
    (:func:`mtlopt.imtl_l`). The scales use ``s`` before the step. The scales enter as
    ``S G S`` in the Gramian and ``S a`` in the weights (no scaled copy of the gradients):
    :func:`mtlopt.task_weights` reports ``exp(s_t) a_t``, the coefficients on the raw task
    gradients.

    Args:
      learning_rate: of the default optimizer, ``optax.adam(learning_rate)``; default ``1e-3``
        (see :func:`mtlopt.uw`). Ignored when ``optimizer`` is given. May be traced.
      init: the initial ``s_t`` (default 0, LibMTL's).
      bound: ``s_t`` is projected onto ``[-bound, bound]`` after every step (default 20);
        ``None``: no bound (LibMTL's).
      optimizer: any optax transformation for ``s``; pass the model's own optimizer to
        reproduce LibMTL, which trains ``s`` jointly with the model.
      rcond: IMTL-G's numerical rank (see :func:`mtlopt.imtl_g`).
      num_tasks: T (required: the state keeps ``s``).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        follows ``exp(s_t)`` times its task's gradient.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Bad values: as :func:`mtlopt.imtl_l`: an active loss ``<= 0`` skips the step (state
    unchanged, ``skipped`` counts it). Zero gradients, masked tasks and the degenerate cases
    as :func:`mtlopt.imtl_g` (never NaN); masked tasks keep ``s`` and their optimizer moments.

    Cost:
      Two passes over the task grads (Gramian, combination); one ``(T, T)`` ``eigh`` (IMTL-G);
      one optimizer step on T numbers. State: ``s``, its optimizer's state and the weights.
      Not with ``groups=`` (the scales are per task, not per group).

    Deviations:
      LibMTL computes IMTL-G on the scaled gradients by inverting ``D U^T`` (NaN for a zero or
      linearly dependent task gradient); we use :func:`mtlopt.imtl_g`'s pseudo-inverse on the
      unit Gramian (the same weights for independent gradients, never NaN). LibMTL trains
      ``s`` with the model's optimizer and accepts any loss; here ``s`` has its own optimizer
      (Adam, ``1e-3``; ``optimizer=`` gives LibMTL's), is bounded, and non-positive losses skip
      the step. TorchJD 0.18 has no hybrid (``IMTLL`` and ``IMTLG`` separately).

    Examples:
      >>> import jax.numpy as jnp, optax, mtlopt
      >>> tx = mtlopt.imtl(optimizer=optax.sgd(0.5), num_tasks=2)
      >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> updates, state = tx.update(grads, state, task_losses=jnp.array([1.0, 3.0]))
      >>> updates["w"].round(4)  # IMTL-G at s = 0: projections 2/3 on both unit gradients
      Array([0.6667, 0.6667], dtype=float32)
      >>> state.log_scales  # IMTL-L's step: s - 0.5 (exp(s) l - 1)
      Array([ 0., -1.], dtype=float32)

    References:
      Liu et al., `Towards Impartial Multi-task Learning
      <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
    """
    name = "imtl"
    _need_num_tasks(name, num_tasks, "the learned log-scales")
    init, bound = _bounds(name, init, bound)
    rcond = _rcond_arg(name, rcond)
    opt = learned.optimizer(name, learning_rate, optimizer)

    def scales(ctx: build.Context) -> jax.Array:
        return jnp.exp(ctx.state.log_scales.astype(ctx.dtype))

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        # ctx.gram is the Gramian of the scaled gradients, S G S (pre-scaled: IMTL-G's weights
        # are homogeneous of degree 0 in it); the skeleton multiplies the weights by S.
        _, new, opt_state, ok = _imtl_l_step(opt, bound, ctx)
        a = imtl_g_weights(ctx.gram, ctx.mask, rcond)
        a = jnp.where(ok, a, jnp.nan)
        return a, {"log_scales": new, "opt_state": opt_state}

    method = build.Method(
        name,
        IMTLState,
        weights_fn,
        init_extra=_init_fn(opt, init, "log_scales"),
        needs_losses=True,
        scales=scales,
        head_scales=lambda ctx, w: scales(ctx),
    )
    return build.aggregator(
        method, num_tasks=num_tasks, task_specific=task_specific, nonfinite=nonfinite
    )
