"""Scalarizations: fixed (the mean, a weighted sum) and of the losses (GLS, STCH, COSMOS, PBI).

The second kind scalarizes the task losses into one objective ``F(l)``; its weights are the
coefficients of the task gradients in ``d F / d theta = sum_t (dF / dl_t) g_t`` at this step, so
each of them needs only the losses (one backward pass with :func:`mtlopt.loss_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlopt._src import build, checks, solvers, tree


class MeanState(NamedTuple):
    """State of :func:`mean`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None


class LinearState(NamedTuple):
    """State of :func:`linear`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None


def mean(
    *, num_tasks: int | None = None, task_specific: Any = None, nonfinite: str = "skip"
) -> optax.GradientTransformationExtraArgs:
    r"""Equal weighting: the update is the mean of the task gradients.

    Task → params. Scale: averages (``1/T``), the gradient of the mean loss.

    .. math:: d = \tfrac1T \sum_t g_t

    Args:
      num_tasks: optional; given, the state keeps the weights (``task_weights``).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        gets its task's weight ``1/T``, as the gradient of the mean loss does.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Cost:
      One pass over the task grads (``w @ J`` per leaf); no Gramian, no solver. A loss
      weighting: :func:`mtlopt.loss_weights` gives its weights without task grads (one
      backward pass of ``sum_t w_t l_t`` instead of T).

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.mean()
      >>> grads = {"w": jnp.array([[1.0, 2.0], [3.0, 0.0]])}
      >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates
      {'w': Array([2., 1.], dtype=float32)}
    """

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        return solvers.uniform(ctx.mask, ctx.dtype), {}

    return build.loss_weighting(
        "mean",
        MeanState,
        weights_fn,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        needs_losses=False,
    )


def linear(
    weights: Sequence[float] | np.ndarray | jax.Array,
    *,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Fixed linear scalarization: the update is ``sum_t weights[t] * g_t``.

    Task → params. Scale: as given (weights summing to 1 average, ones sum).

    .. math:: d = \sum_t w_t g_t

    Args:
      weights: ``(T,)`` fixed weights, one per task (any real numbers).
      num_tasks: optional; must equal ``len(weights)`` if given.
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        gets its task's weight, as the gradient of ``sum_t w_t l_t`` does.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Cost:
      One pass over the task grads; no Gramian, no solver. A loss weighting: see
      :func:`mtlopt.loss_weights` for one backward pass instead of T.

    ``weights`` may be an array, traced too (``jax.vmap`` over preference vectors,
    ``optax.inject_hyperparams``): its values are checked when they are concrete.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.linear([1.0, 0.5])
      >>> grads = {"w": jnp.array([[1.0, 2.0], [4.0, 0.0]])}
      >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
      >>> updates
      {'w': Array([3., 2.], dtype=float32)}
    """
    name = "linear"
    if np.ndim(weights) != 1 or np.shape(weights)[0] == 0:
        raise checks.fail(
            name, f"weights must be a non-empty finite 1-D sequence; got {weights!r}."
        )
    T = np.shape(weights)[0]
    if checks.concrete(weights):
        w = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(w)):
            raise checks.fail(
                name, f"weights must be a non-empty finite 1-D sequence; got {weights!r}."
            )
        weights = np.asarray(weights, np.float32) if not hasattr(weights, "dtype") else weights
    if num_tasks is not None and checks.concrete(num_tasks) and num_tasks != T:
        raise checks.fail(name, f"num_tasks={num_tasks} but {T} weights were given.")

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        return jnp.asarray(weights).astype(ctx.dtype), {}

    return build.loss_weighting(
        name,
        LinearState,
        weights_fn,
        num_tasks=T,
        task_specific=task_specific,
        nonfinite=nonfinite,
        needs_losses=False,
    )


# ---------------------------------------------------------------------------------------------
# Scalarizations of the losses: GLS, STCH, COSMOS, PBI. Each weighting below returns dF/dl_t,
# the coefficient of g_t in the gradient of its objective F(l), over the active tasks (masked
# tasks are dropped from F: weight 0, no influence on the others).


class GLSState(NamedTuple):
    """State of :func:`gls`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None


class STCHState(NamedTuple):
    """State of :func:`stch`: ``nadir`` is the running mean of each task's warm-up losses
    (over the steps that count, ``nadir_count`` of them); ``epochs`` and ``epoch_steps`` count
    the finished epochs and the steps of the current one (epoch form). Fields that the chosen
    form does not need are None."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    nadir: jax.Array | None
    nadir_count: jax.Array | None
    epochs: jax.Array | None
    epoch_steps: jax.Array | None


class COSMOSState(NamedTuple):
    """State of :func:`cosmos`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None


class PBIState(NamedTuple):
    """State of :func:`pbi`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None


_PREFERENCE_WHY = (
    " (a ({T},) vector of preference weights >= 0 for this step, e.g. a fresh Dirichlet "
    "sample; it replaces the constructor's preference)"
)


def _preference_signal(required: bool, T: int | None) -> build.Signal:
    why = _PREFERENCE_WHY.replace("({T},)", f"({T},)" if T else "(T,)")
    return build.Signal("preference", "task_vector", required=required, why=why)


def _check_preference(
    name: str, value: Any, num_tasks: int | None, *, arg: str = "preference"
) -> tuple[int | None, Any]:
    """A constructor's preference: None, or ``(T,)`` finite weights >= 0, not all 0 (checked
    when concrete). Returns ``(T or num_tasks, the vector)``."""
    if value is None:
        return num_tasks, None
    T, value = checks.weight_vector(name, arg, value, num_tasks)
    if checks.concrete(value) and not np.any(np.asarray(value) > 0):
        raise checks.fail(name, f"{arg} must have at least one entry > 0; got {value!r}.")
    return T, value


def _check_point(
    name: str, arg: str, value: Any, T: int | None, *, positive: bool = False
) -> tuple[int | None, Any]:
    """A constructor's ``(T,)`` point (a reference or a nadir): finite (and > 0), checked when
    concrete; returns ``(T, the vector)``."""
    if value is None:
        return T, None
    what = "finite numbers > 0" if positive else "finite numbers"
    if np.ndim(value) != 1 or np.shape(value)[0] == 0:
        raise checks.fail(name, f"{arg} must be a non-empty 1-D sequence of {what}; got {value!r}.")
    size = np.shape(value)[0]
    if T is not None and checks.concrete(T) and size != T:
        raise checks.fail(
            name, f"{arg} has {size} entries but T = {T} (from num_tasks or the preference)."
        )
    if checks.concrete(value):
        v = np.asarray(value, np.float64)
        if not np.all(np.isfinite(v)) or (positive and not np.all(v > 0)):
            raise checks.fail(name, f"{arg} must hold {what}; got {value!r}.")
        value = np.asarray(value, np.float32)
    return size, value


def _pref(ctx: build.Context, given: Any, default: str) -> jax.Array:
    """This step's preference on the active tasks (0 on the masked ones): the ``preference``
    signal if passed, else the constructor's, else ``default`` ("ones", or "uniform": 1/n)."""
    sig = (ctx.signals or {}).get("preference")
    if sig is not None:
        p = sig.astype(ctx.dtype)
    elif given is not None:
        p = jnp.asarray(given).astype(ctx.dtype)
    elif default == "ones":
        p = jnp.ones((ctx.T,), ctx.dtype)
    else:
        return solvers.uniform(ctx.mask, ctx.dtype)
    return jnp.where(ctx.mask, p, 0.0)


def _unit(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(v / |v|, |v|)`` without over- or underflow (the norm of ``v / max|v|``); the zero
    vector's direction is the zero vector."""
    m = jnp.max(jnp.abs(v))
    pos = m > 0
    s = v / jnp.where(pos, m, 1.0)
    n = jnp.sqrt(jnp.sum(s * s))
    return jnp.where(pos, s / jnp.where(pos, n, 1.0), 0.0), m * n


def _positive_losses(ctx: build.Context) -> tuple[jax.Array, jax.Array]:
    """``(losses, ok)``: the active losses (1 on the masked tasks); ``ok`` is False where an
    active loss is ``<= 0`` (outside the log's domain: a bad input). Bad ones are replaced by
    1 so that nothing downstream is NaN for them (the weights are made NaN instead)."""
    l = jnp.where(ctx.mask, ctx.losses.astype(ctx.dtype), 1.0)
    ok = jnp.all(l > 0)
    return jnp.where(l > 0, l, 1.0), ok


def _log_ratio(a: jax.Array, b: jax.Array) -> jax.Array:
    """``log(a / b)`` for positive a, b: the log of the rounded ratio (accurate to ~eps
    absolutely: for a = b, exactly 0, whatever their scale; ``log a - log b`` is only accurate to
    eps times ``|log a|``, 7e-6 at 1e-30 in float32), or the difference of the logs where the
    ratio over- or underflows."""
    q = a / b
    fine = (q >= jnp.finfo(q.dtype).tiny) & jnp.isfinite(q)
    return jnp.where(fine, jnp.log(jnp.where(fine, q, 1.0)), jnp.log(a) - jnp.log(b))


def _softmax(y: jax.Array, mu: Any, mask: jax.Array) -> jax.Array:
    """``softmax(y / mu)`` over the active entries (``y`` is -inf on the others), with the
    largest ``y`` subtracted before the division, so a small ``mu`` cannot overflow."""
    top = jnp.where(jnp.any(mask), jnp.max(y), 0.0)
    return jax.nn.softmax((y - top) / jnp.asarray(mu).astype(y.dtype))


def _bad_unless(ok: jax.Array, w: jax.Array) -> jax.Array:
    """NaN weights on a bad input: the skeleton then skips the step (state kept, counted)."""
    return jnp.where(ok, w, jnp.nan)


# ---------------------------------------------------------------------------------------------
# GLS


def gls(
    *, num_tasks: int | None = None, task_specific: Any = None, nonfinite: str = "skip"
) -> optax.GradientTransformationExtraArgs:
    r"""Geometric Loss Strategy: descend the geometric mean of the task losses.

    Task → params, or the loss weights alone with one backward pass
    (:func:`mtlopt.loss_weights`). Scale: averages (equal losses give ``1/T`` each, the mean).

    .. math::
       F(l) = \Big(\prod_{t} l_t\Big)^{1/n}, \qquad
       w_t = \frac{\partial F}{\partial l_t} = \frac{F(l)}{n\, l_t}

    over the n active tasks. The geometric mean is computed through the logs,
    ``exp(mean_t log l_t)``, and each weight as ``exp(mean_s log l_s - log l_t) / n``: no
    overflow or underflow of the product for T = 64 tasks or losses of 1e-30 or 1e30. A task
    with a small loss weighs more (its relative decrease counts as much as any other's).

    Args:
      num_tasks: optional; given, the state keeps the weights (``task_weights``).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        gets its task's weight, as the gradient of ``F`` does.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Bad values: ``F`` takes the log of every active loss, so an active loss ``<= 0`` is a bad
    input: the step is skipped as a non-finite one is (zero update with ``nonfinite="skip"``,
    NaN with ``"propagate"``; the state is left as it was and ``skipped`` counts it). Masked
    tasks (``task_mask``) are left out of the product and get weight 0.

    Cost:
      O(T) on the losses; one pass over the task grads (the combination), none in the
      loss-only mode.

    Deviations:
      LibMTL's ``GLS`` reports ``l_t / (T prod_s l_s)`` as its weights (not the coefficients of
      its update, which are ours) and forms the product directly (it underflows for many small
      losses); TorchJD 0.18's ``GeometricMean`` computes it through logs, as here, and raises on
      a negative loss. Both give the same gradient as this method (tested against TorchJD).

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.gls()
      >>> w, _ = mtlopt.loss_weights(tx, jnp.array([1.0, 4.0]), tx.init(None))
      >>> w  # F = sqrt(l0 l1) = 2: w = (2 / (2 * 1), 2 / (2 * 4))
      Array([1.  , 0.25], dtype=float32)

    References:
      Chennupati et al., `MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
      Strategy for Multi-Task Learning
      <https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019.
    """
    name = "gls"

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        l, ok = _positive_losses(ctx)
        n = jnp.maximum(jnp.sum(ctx.mask), 1).astype(ctx.dtype)
        # Logs relative to the largest loss: equal losses give exactly 1/n.
        top = jnp.max(jnp.where(ctx.mask, l, 0.0))
        d = _log_ratio(l, jnp.where(top > 0, top, 1.0))
        mean = jnp.sum(jnp.where(ctx.mask, d, 0.0)) / n
        w = jnp.exp(mean - d) / n
        return _bad_unless(ok, jnp.where(ctx.mask, w, 0.0)), {}

    return build.loss_weighting(
        name,
        GLSState,
        weights_fn,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
    )


# ---------------------------------------------------------------------------------------------
# STCH

_STCH_FORMS = ("log", "raw")

_NEW_EPOCH = build.Signal(
    "new_epoch",
    "flag",
    required=False,
    why=" (a bool scalar, True on the first step of every epoch: the epoch form of the warm-up)",
)


def stch(
    mu: float = 1.0,
    warmup_steps: int = 0,
    *,
    preference: Any = None,
    nadir: Any = None,
    nadir_steps: int | None = None,
    warmup_epochs: int | None = None,
    form: str = "log",
    reference: Any = None,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Smooth Tchebycheff scalarization: a smooth maximum of the (log) losses.

    Task → params, or the loss weights alone with one backward pass
    (:func:`mtlopt.loss_weights`). Scale: sums (``form="log"``: n equal losses ``l`` give
    ``1 / l`` each, as ``sum_t log l_t`` does; ``form="raw"``: ``1 / n^2`` each, ``g / n`` for
    n identical tasks).

    The default, ``form="log"``, is the authors' multi-task code, as LibMTL runs it: what the
    paper's multi-task results used (its equation is for general multi-objective problems, and
    is ``form="raw"``). After a warm-up, with :math:`f_t = \log(l_t / z_t)` against a nadir
    point :math:`z`,

    .. math::
       F(l) = n \mu \log \sum_t \exp\Big(\frac{\lambda_t f_t}{\mu}\Big), \qquad
       w_t = \frac{\partial F}{\partial l_t} =
       n\, \mathrm{softmax}\Big(\frac{\lambda f}{\mu}\Big)_t \frac{\lambda_t}{l_t},

    over the n active tasks (``lambda`` = ``preference``, default ones). During the warm-up the
    objective is :math:`\sum_t \log l_t` (weights :math:`1 / l_t`) and the nadir is measured: each
    task's mean loss over the warm-up steps that count (below). ``form="raw"`` is the paper's
    scalarization of the raw losses against a reference (ideal) point :math:`z^\star`, as
    TorchJD 0.18's ``STCH``: :math:`F = \mu \log \sum_t \exp(\lambda_t (l_t - z^\star_t) /
    \mu)`, weights :math:`\mathrm{softmax}(\lambda (l - z^\star) / \mu)_t \lambda_t`,
    ``lambda`` default ``1/n``, no warm-up. Both are smooth approximations of
    :math:`\max_t \lambda_t f_t` (times n), tighter as :math:`\mu` falls.

    Warm-up (``form="log"``; ``warmup_steps=0`` and no ``warmup_epochs``: none):

    * step form, ``warmup_steps=W``: the first W steps are the warm-up; the nadir is each
      task's mean loss over the last ``nadir_steps`` of them (default: all W; with the steps of
      one epoch it is LibMTL's choice, the mean over the last warm-up epoch).
    * epoch form, ``warmup_epochs=E``: pass ``new_epoch=True`` on the first step of every epoch
      (the spelling of :func:`mtlopt.dwa`); epochs 0 .. E-1 are the warm-up and the nadir is
      each task's mean loss over epoch E-1. LibMTL's ``STCH_warmup_epoch`` is ``E - 1`` (its
      default 4 is ``warmup_epochs=5``: it warms up while its epoch index is ``<= 4`` and
      averages epoch 4). Without ``new_epoch`` the warm-up never ends.
    * ``nadir=`` fixes the nadir: nothing is measured (a warm-up, if asked for, still trains
      on the log losses).

    Steps skipped for bad inputs count for nothing. A task with no warm-up loss (no warm-up,
    or masked throughout the steps that count) has nadir 1: :math:`f_t = \log l_t`.

    Args:
      mu: the smoothing :math:`\mu > 0` (default 1, LibMTL's and the authors'); small values
        approach the weighted maximum (the paper tries 0.01 to 1). May be traced.
      warmup_steps: W >= 0, the step form of the warm-up (``form="log"`` only). May be traced
        (``optax.inject_hyperparams`` traces it even when left at 0); the nadir is then
        measured where ``num_tasks`` is given, and is 1 without it.
      preference: ``(T,)`` weights :math:`\lambda \ge 0`; default ones (``"log"``) or ``1/n``
        (``"raw"``). A ``preference=`` extra argument of ``update`` overrides it for one step
        (e.g. a Dirichlet sample, as in Pareto set learning).
      nadir: a fixed ``(T,)`` nadir point ``> 0`` (``form="log"``): no measurement.
      nadir_steps: the nadir is the mean over the last this many warm-up steps (step form;
        default W).
      warmup_epochs: E >= 1, the epoch form of the warm-up (with the ``new_epoch`` argument).
      form: ``"log"`` (default, the multi-task code) or ``"raw"`` (the paper's scalarization
        of the raw losses, TorchJD's).
      reference: the ``(T,)`` reference point of ``form="raw"`` (default 0).
      num_tasks: T; required for a warm-up that measures the nadir (the state keeps each
        task's running mean). Given, the state keeps the weights and, for ``form="log"``
        without ``nadir=``, those means (which move only during a warm-up).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        gets its task's weight, as the gradient of ``F`` does.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Bad values: ``form="log"`` takes the log of every active loss, so an active loss ``<= 0``
    is a bad input: the step is skipped as a non-finite one is (zero update with
    ``nonfinite="skip"``, NaN with ``"propagate"``; the state, the nadir's means included, is
    left as it was and ``skipped`` counts it). ``form="raw"`` accepts any finite loss. Masked
    tasks (``task_mask``) are left out of ``F`` (and of the factor n) and out of the nadir's
    means; they get weight 0.

    Cost:
      O(T) on the losses; one pass over the task grads (the combination), none in the
      loss-only mode. State: the nadir's running means (``(T,)``) where it is measured.

    Deviations:
      ``form="log"`` follows the authors' code and LibMTL (the factor n, the log losses
      against a nadir, the warm-up on ``sum_t log l_t``), which differ from the paper's
      general scalarization: that is ``form="raw"``, TorchJD's (reproduced to rounding,
      tested). LibMTL calls ``mu`` ``STCH_mu`` and adds ``1e-20`` inside its logs; here the
      logs are exact (``log(l / z)`` is the log of the ratio, exact for ``l = z`` at any
      scale) and a loss ``<= 0`` skips the step. LibMTL counts the warm-up in epochs only; the
      step form is ours. The softmax is computed with its largest logit at 0 (as both peers
      do), so a small ``mu`` does not overflow.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.stch(mu=1.0, warmup_steps=1, num_tasks=2)
      >>> state = tx.init(None)
      >>> w, state = mtlopt.loss_weights(tx, jnp.array([1.0, 4.0]), state)
      >>> w  # warm-up: 1 / l; the nadir becomes (1, 4)
      Array([1.  , 0.25], dtype=float32)
      >>> w, state = mtlopt.loss_weights(tx, jnp.array([0.5, 4.0]), state)
      >>> w.round(4)  # f = (log 0.5, 0): 2 softmax(f) / l
      Array([1.3333, 0.3333], dtype=float32)

    References:
      Lin et al., `Smooth Tchebycheff Scalarization for Multi-Objective Optimization
      <https://arxiv.org/abs/2402.19078>`_, ICML 2024.
    """
    name = "stch"
    checks.choice(name, "form", form, _STCH_FORMS)
    num_tasks = checks.positive_int(name, "num_tasks", num_tasks)
    mu = checks.positive(name, "mu", mu)
    warmup_steps = checks.count(name, "warmup_steps", warmup_steps)
    T, preference = _check_preference(name, preference, num_tasks)
    # A traced warmup_steps (optax.inject_hyperparams traces every numeric argument, defaults
    # included) may be anything: the step form's logic is then kept, but only a concrete
    # nonzero value counts as asking for a warm-up in the checks below.
    named = checks.concrete(warmup_steps) and warmup_steps != 0
    if form == "raw":
        given = {
            "warmup_steps": named,
            "warmup_epochs": warmup_epochs is not None,
            "nadir": nadir is not None,
            "nadir_steps": nadir_steps is not None,
        }
        bad = [k for k, v in given.items() if v]
        if bad:
            raise checks.fail(
                name,
                f"form=\"raw\" (the paper's scalarization, TorchJD's) has no warm-up or nadir; "
                f'got {", ".join(bad)}. Use reference= for its ideal point, or form="log".',
            )
        T, reference = _check_point(name, "reference", reference, T)
    else:
        if reference is not None:
            raise checks.fail(
                name,
                'reference= is the ideal point of form="raw"; form="log" (the default) '
                "measures a nadir (or takes nadir=).",
            )
        T, nadir = _check_point(name, "nadir", nadir, T, positive=True)
    if warmup_epochs is not None:
        warmup_epochs = checks.count(name, "warmup_epochs", warmup_epochs, 1)
        if named:
            raise checks.fail(
                name,
                "give the warm-up either in steps (warmup_steps) or in epochs (warmup_epochs), "
                f"not both; got warmup_steps={warmup_steps!r}, warmup_epochs={warmup_epochs!r}.",
            )
        if nadir_steps is not None:
            raise checks.fail(
                name,
                "nadir_steps is for the step form (warmup_steps); the epoch form averages the "
                "last warm-up epoch.",
            )
    if nadir_steps is not None:
        nadir_steps = checks.count(name, "nadir_steps", nadir_steps, 1)
        if nadir is not None:
            raise checks.fail(name, "nadir_steps has no use with a fixed nadir=.")
        if checks.concrete((warmup_steps, nadir_steps)) and nadir_steps > warmup_steps:
            raise checks.fail(
                name,
                "nadir_steps counts the last warm-up steps: it must be <= warmup_steps; got "
                f"nadir_steps={nadir_steps}, warmup_steps={warmup_steps}.",
            )
    epochs_form = warmup_epochs is not None
    zero = checks.concrete(warmup_steps) and warmup_steps == 0
    by_steps = form == "log" and not epochs_form and not zero
    T = checks.positive_int(name, "num_tasks", T)
    # The nadir's means live in the state wherever T is known (the state's structure must not
    # depend on a hyperparameter's value: inject_hyperparams builds it from concrete values
    # and updates from traced ones); they move only during a warm-up.
    measured = form == "log" and nadir is None and T is not None
    if form == "log" and nadir is None and T is None and (named or epochs_form):
        raise checks.fail(
            name,
            "num_tasks is required when the nadir is measured during a warm-up (the state "
            "keeps each task's mean loss); e.g. mtlopt.stch(warmup_steps=100, num_tasks=3), or "
            "give nadir=.",
        )

    def init_extra(T: int | None, shared: Any) -> dict:
        dtype = tree.acc_dtype(*(jnp.result_type(x) for x in jax.tree.leaves(shared)))
        out = dict.fromkeys(("nadir", "nadir_count", "epochs", "epoch_steps"))
        if measured:
            out["nadir"] = jnp.zeros((T,), dtype)
            out["nadir_count"] = jnp.zeros((T,), dtype)
        if epochs_form:
            out["epochs"] = jnp.zeros((), jnp.int32)
            out["epoch_steps"] = jnp.zeros((), jnp.int32)
        return out

    def phase(ctx: build.Context) -> tuple[jax.Array, jax.Array, dict]:
        """``(in the warm-up, the step counts into the nadir, state fields)``."""
        extras: dict
        s, extras = ctx.state, {}
        if epochs_form:
            flag = ctx.signals["new_epoch"]
            flag = jnp.asarray(False) if flag is None else flag
            close = flag & (s.epoch_steps > 0)
            epochs = s.epochs + close.astype(jnp.int32)
            steps = jnp.where(close, 0, s.epoch_steps) + jnp.any(ctx.mask).astype(jnp.int32)
            extras.update(epochs=epochs, epoch_steps=steps)
            E = jnp.asarray(warmup_epochs).astype(jnp.int32)
            return epochs < E, epochs == E - 1, extras
        W = jnp.asarray(warmup_steps).astype(jnp.int32)
        warm = s.count < W
        M = W if nadir_steps is None else jnp.asarray(nadir_steps).astype(jnp.int32)
        return warm, warm & (s.count >= W - M), extras

    def log_weights(ctx: build.Context) -> tuple[jax.Array, dict]:
        dtype, mask = ctx.dtype, ctx.mask
        l, ok = _positive_losses(ctx)
        warm, counts, extras = phase(ctx) if (by_steps or epochs_form) else (False, False, {})
        if nadir is not None:
            z = jnp.asarray(nadir).astype(dtype)
        elif ctx.state.nadir is not None:  # as init built it (num_tasks may be traced now)
            z, k = ctx.state.nadir.astype(dtype), ctx.state.nadir_count.astype(dtype)
            z = jnp.where(k > 0, z, 1.0)
            # This step's losses join the running means (masked tasks' do not).
            add = counts & mask
            k_new = k + add.astype(dtype)
            z_new = jnp.where(add, z + (l - z) / jnp.maximum(k_new, 1.0), z)
            extras.update(nadir=z_new, nadir_count=k_new)
        else:
            z = jnp.ones((ctx.T,), dtype)
        lam = _pref(ctx, preference, "ones")
        n = jnp.sum(mask).astype(dtype)
        soft = _softmax(jnp.where(mask, lam * _log_ratio(l, z), -jnp.inf), mu, mask)
        # soft / l first: it overflows only where the weight itself does.
        w = jnp.where(warm, 1.0 / l, (soft / l) * (n * lam))
        return _bad_unless(ok, jnp.where(mask, w, 0.0)), extras

    def raw_weights(ctx: build.Context) -> tuple[jax.Array, dict]:
        dtype, mask = ctx.dtype, ctx.mask
        l = jnp.where(mask, ctx.losses.astype(dtype), 0.0)
        if reference is not None:
            l = l - jnp.where(mask, jnp.asarray(reference).astype(dtype), 0.0)
        lam = _pref(ctx, preference, "uniform")
        soft = _softmax(jnp.where(mask, lam * l, -jnp.inf), mu, mask)
        return jnp.where(mask, soft * lam, 0.0), {}

    signals = [_preference_signal(False, T)]
    if epochs_form:
        signals.append(_NEW_EPOCH)
    return build.loss_weighting(
        name,
        STCHState,
        log_weights if form == "log" else raw_weights,
        init_extra=init_extra,
        signals=tuple(signals),
        num_tasks=T,
        task_specific=task_specific,
        nonfinite=nonfinite,
    )


# ---------------------------------------------------------------------------------------------
# COSMOS


def cosmos(
    preference: Any,
    mu: float = 2.0,
    *,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""COSMOS: a linear scalarization that rewards aligning the losses with the preference.

    Task → params, or the loss weights alone with one backward pass
    (:func:`mtlopt.loss_weights`). Scale: sums (``w = r`` where the losses are parallel to
    ``r``: ones give ``T g`` for T identical tasks).

    .. math::
       F(l) = \sum_t r_t l_t - \mu \cos(r, l), \qquad
       w_t = \frac{\partial F}{\partial l_t}
           = r_t - \frac{\mu}{\|l\|}\Big(\frac{r_t}{\|r\|} - \cos(r, l)\,\frac{l_t}{\|l\|}\Big)

    over the active tasks (masked tasks are dropped from ``r`` and ``l``; the rest of ``r`` is
    not rescaled). The cosine term is 0 where ``l`` is parallel to ``r`` and pulls the losses
    toward the preference ray elsewhere; sampling ``r`` anew every step spreads one
    (preference-conditioned) model over the Pareto front.

    Args:
      preference: ``(T,)`` weights :math:`r \ge 0` (the paper samples them from a Dirichlet
        distribution every step), or None: then every ``update`` must pass its own as the
        extra argument ``preference=`` (which always overrides the constructor's). The
        per-step vector is not checked for signs (it may be traced); a non-finite one skips
        the step. Conditioning the model on ``r`` (the paper feeds it to the network) is the
        user's part: sample ``r`` before the forward pass and pass the same ``r`` here.
      mu: the cosine penalty :math:`\mu \ge 0` (the paper's :math:`\lambda`); 0 is the linear
        scalarization. Default 2, the authors' default (their Multi-MNIST and Multi-Fashion
        setting; their settings use 0.01 on the tabular fairness sets, 3 on CelebA, 8 on
        Multi-Fashion+MNIST). May be traced.
      num_tasks: optional (T is the preference's length where one is given); the state keeps
        the weights when T is known.
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        gets its task's weight, as the gradient of ``F`` does.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Bad values: no log is taken, so any finite loss is accepted. The cosine is undefined when
    every active loss is 0 (``l = 0``): the cosine term is then left out (``w = r``: the
    linear scalarization, which is also the limit of ``F`` along ``l = s r``, ``s -> 0``);
    likewise an all-zero active preference gives ``w = 0``. Norms are taken after dividing by
    the largest entry, so losses of 1e-30 or 1e30 give finite weights (the cosine term's weight
    grows as ``mu / ||l||``: that is its gradient).

    Cost:
      O(T) on the losses; one pass over the task grads (the combination), none in the
      loss-only mode.

    Deviations:
      TorchJD 0.18's ``COSMOS`` (``lambda_`` is this ``mu``) uses torch's ``cosine_similarity``,
      which clamps the norms with ``1e-8``: the weights agree to rounding wherever
      ``||l|| > 1e-8`` (tested); below, its clamp gives weights of order ``mu / 1e-8`` (at
      ``l = 0``, ``r - mu r_hat / 1e-8``) where this method leaves the cosine term out. LibMTL
      has no COSMOS. The paper's hypernetwork-free conditioning of the model
      on ``r`` is not part of an optimizer.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.cosmos([0.5, 0.5], mu=1.0)
      >>> w, _ = mtlopt.loss_weights(tx, jnp.array([3.0, 4.0]), tx.init(None))
      >>> w.round(5)  # r - (r_hat - cos(r, l) l / |l|) / |l|: loss 4 weighs more
      Array([0.47737, 0.51697], dtype=float32)

    References:
      Ruchte & Grabocka, `Scalable Pareto Front Approximation for Deep Multi-Objective
      Learning <https://arxiv.org/abs/2103.13392>`_, ICDM 2021.
    """
    name = "cosmos"
    num_tasks = checks.positive_int(name, "num_tasks", num_tasks)
    T, preference = _check_preference(name, preference, num_tasks)
    mu = checks.nonnegative(name, "mu", mu)
    T = checks.positive_int(name, "num_tasks", T)

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        dtype, mask = ctx.dtype, ctx.mask
        r = _pref(ctx, preference, "ones")
        l = jnp.where(mask, ctx.losses.astype(dtype), 0.0)
        r_hat, _ = _unit(r)
        u, l_norm = _unit(l)
        cos = jnp.dot(r_hat, u)
        live = l_norm > 0
        grad_cos = jnp.where(live, (r_hat - cos * u) / jnp.where(live, l_norm, 1.0), 0.0)
        w = r - jnp.asarray(mu).astype(dtype) * grad_cos
        return jnp.where(mask, w, 0.0), {}

    return build.loss_weighting(
        name,
        COSMOSState,
        weights_fn,
        signals=(_preference_signal(preference is None, T),),
        num_tasks=T,
        task_specific=task_specific,
        nonfinite=nonfinite,
    )


# ---------------------------------------------------------------------------------------------
# PBI

# d2 (the distance to the preference ray) at most this many ulps of ||f|| times (n + 1) is the
# rounding of the projection f - d1 w_hat (each of its n + 1 terms rounds by ~eps ||f||): its
# direction is noise, and the zero subgradient of the cone at the ray is taken instead.
_PBI_ULPS = 4.0


def pbi(
    preference: Any,
    theta: float = 5.0,
    *,
    reference: Any = None,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Penalty-based boundary intersection: progress along a preference ray, off it penalized.

    Task → params, or the loss weights alone with one backward pass
    (:func:`mtlopt.loss_weights`). Scale: ``|w_hat| = 1`` plus the penalty (losses on the ray
    give ``w = w_hat``: ``sqrt(T) g`` for T identical tasks and a uniform preference).

    .. math::
       f = l - z,\quad \hat w = \frac{r}{\|r\|},\quad d_1 = f^\top \hat w,\quad
       d_2 = \|f - d_1 \hat w\|, \qquad
       F(l) = d_1 + \theta d_2, \qquad
       w = \frac{\partial F}{\partial l} = \hat w + \theta\,\frac{f - d_1 \hat w}{d_2}

    over the active tasks (masked tasks are dropped from ``r`` and ``f``). ``d_1`` measures
    progress along the preference ray from the reference point ``z``, ``d_2`` the distance to
    the ray.

    Args:
      preference: ``(T,)`` weights :math:`r \ge 0`, the ray's direction, or None: then every
        ``update`` must pass its own as the extra argument ``preference=`` (which always
        overrides the constructor's; e.g. a Dirichlet sample each step).
      theta: the penalty :math:`\theta \ge 0` on ``d2`` (default 5, MOEA/D's); 0 is the
        projection on the ray, a linear scalarization with weights ``w_hat``. May be traced.
      reference: the ``(T,)`` reference (ideal) point ``z``, a lower bound of the losses
        (default 0, which suits non-negative losses).
      num_tasks: optional (T is the preference's length where one is given); the state keeps
        the weights when T is known.
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); each
        gets its task's weight, as the gradient of ``F`` does.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Bad values: no log is taken, so any finite loss is accepted. ``d2`` is not differentiable
    on the ray (``d2 = 0``, e.g. T = 1 or losses proportional to ``r``): there the zero
    subgradient is taken (``w = w_hat``), and so it is wherever ``d2`` is within the rounding of
    the projection (``4 (n + 1) eps ||f||``; its direction would be noise, magnified by
    ``theta``). An all-zero active preference has no direction: ``w_hat = 0``.

    Cost:
      O(T) on the losses; one pass over the task grads (the combination), none in the
      loss-only mode.

    Deviations:
      TorchJD 0.18's ``PBI`` (``weights`` is this ``preference``) adds ``1e-12`` under the
      square root of ``d2`` instead: its weights differ from these by a relative
      ``~1e-12 / d2^2`` (tested: equal to rounding on random losses), and by more only within
      ``~1e-6`` of the ray, where it damps the penalty's gradient and this method drops it.
      MOEA/D updates ``z`` with the best values seen; here ``z`` is fixed. LibMTL has no PBI.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.pbi([1.0, 1.0], theta=5.0)
      >>> w, _ = mtlopt.loss_weights(tx, jnp.array([1.0, 2.0]), tx.init(None))
      >>> w.round(4)  # the task above the ray (loss 2) is pushed down, the other up
      Array([-2.8284,  4.2426], dtype=float32)

    References:
      Zhang & Li, `MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition
      <https://doi.org/10.1109/TEVC.2007.892759>`_, IEEE TEVC 2007.
    """
    name = "pbi"
    num_tasks = checks.positive_int(name, "num_tasks", num_tasks)
    T, preference = _check_preference(name, preference, num_tasks)
    T, reference = _check_point(name, "reference", reference, T)
    theta = checks.nonnegative(name, "theta", theta)
    T = checks.positive_int(name, "num_tasks", T)

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        dtype, mask = ctx.dtype, ctx.mask
        f = ctx.losses.astype(dtype)
        if reference is not None:
            f = f - jnp.asarray(reference).astype(dtype)
        f = jnp.where(mask, f, 0.0)
        w_hat, _ = _unit(_pref(ctx, preference, "ones"))
        d1 = jnp.dot(f, w_hat)
        u, d2 = _unit(f - d1 * w_hat)
        _, f_norm = _unit(f)
        n = jnp.sum(mask).astype(dtype)
        noise = _PBI_ULPS * (n + 1.0) * jnp.finfo(dtype).eps * f_norm
        u = jnp.where(d2 > noise, u, 0.0)
        w = w_hat + jnp.asarray(theta).astype(dtype) * u
        return jnp.where(mask, w, 0.0), {}

    return build.loss_weighting(
        name,
        PBIState,
        weights_fn,
        signals=(_preference_signal(preference is None, T),),
        num_tasks=T,
        task_specific=task_specific,
        nonfinite=nonfinite,
    )
