"""Weight modifiers: wrappers that change how any method with weights uses them.

:func:`smooth_weights` keeps a moving average of a method's weights (CR-MOGM) and
:func:`refresh_weights` recomputes them only every k steps. Both reach the aggregator inside
through the skeleton (``build.MODIFY``, "Weight modifiers" in ``build.py``): the aggregator
applies the modified weights before its combination pass, so a modifier costs no pass over the
task grads of its own, and the refresh removes the Gramian pass and the solve on the steps in
between.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlopt._src import build, checks, inspect


class SmoothWeightsState(NamedTuple):
    """The state of :func:`smooth_weights`.

    Attributes:
      inner_state: the wrapped method's state (its ``weights`` are the smoothed weights it
        applied, 0 for masked tasks).
      average: ``(T,)`` (``(K, T)`` under ``groups=``) the moving average ``lambda_k``; a masked
        task keeps its value.
      started: bool, like ``average``: whether the task's average has its first value.
      raw_weights: the wrapped method's own weights ``lambda_hat_k`` of the last step.
    """

    inner_state: Any
    average: jax.Array
    started: jax.Array
    raw_weights: jax.Array

    @property  # (shadows tuple.count, as the methods' ``count`` fields do)
    def count(self) -> jax.Array:  # type: ignore[override]
        """The wrapped method's step count."""
        return _method_state(self.inner_state).count

    @property
    def skipped(self) -> jax.Array:
        """How many steps the wrapped method skipped (non-finite inputs)."""
        return _method_state(self.inner_state).skipped


def _method_state(inner_state: Any) -> Any:
    """The aggregator's own state inside a (chained, wrapped) state."""
    for node in inspect.nodes(inner_state):
        if isinstance(node, tuple) and hasattr(node, "_fields") and "skipped" in node._fields:
            return node
    raise AttributeError("no mtlopt method state inside")


def _stored_weights(name: str, inner_state: Any) -> jax.Array:
    """The weights array of the aggregator inside a (chained, wrapped) state."""
    w = inspect.task_weights(inner_state)  # (the same search as the public function's)
    if w is not None:
        return w
    raise checks.fail(
        name,
        "num_tasks is required: the wrapped transformation keeps no weights; wrap an mtlopt "
        "method that has weights (a Gramian or a loss-weighting method) built with "
        "num_tasks=T.",
    )


def _request(name: str, extra: dict) -> dict:
    """The modifiers' request passed down to the aggregator (shared with outer modifiers)."""
    modify = extra.pop(build.MODIFY, None)
    modify = {} if modify is None else modify
    modify["by"] = (*modify.get("by", ()), name)
    return modify


def _check_consumed(name: str, modify: dict) -> None:
    n = modify.get("consumed", 0)
    if n != 1:
        what = "no mtlopt aggregator" if n == 0 else f"{n} mtlopt aggregators"
        raise checks.fail(
            name,
            f"expected one mtlopt aggregator inside, running in the same trace; {what} took "
            "its weights (a plain optax transformation has none, and mtlopt.accumulate runs its "
            "inner update under lax.cond: put the modifier inside accumulate).",
        )


def smooth_weights(
    tx: optax.GradientTransformation, alpha: Any = 0.9, *, initial_weights: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""A moving average of any method's weights (CR-MOGM, Zhou et al., NeurIPS 2022).

    With :math:`\hat\lambda_k` the weights the wrapped method computes at step k, the update
    combines the task grads with

    .. math::

        \lambda_k = \alpha\,\lambda_{k-1} + (1 - \alpha)\,\hat\lambda_k,

    where :math:`\lambda_0 = \hat\lambda_1` (so the first step is the method's own), or
    ``initial_weights``. Smoothing the weights of a stochastic gradient manipulation makes its
    update a consistent estimate (the paper's Corollary 1 lets alpha grow towards 1 as the
    learning rate decays, e.g. ``alpha = 1 - lr / lr_0``: pass a schedule through
    ``optax.inject_hyperparams(mtlopt.smooth_weights, static_args="tx")``).

    ``tx`` is any mtlopt method with weights (every Gramian method and every loss-weighting
    one; not a per-coordinate method such as ``trimmed_mean``), built with ``num_tasks``, alone
    or in a chain (``optax.chain(mtlopt.log_transform(), mtlopt.upgrad(num_tasks=T))``). The
    weights are those on the task grads the method received (for DB-MTL, on its EMA
    gradients; under ``groups=``, ``(K, T)``, averaged per group). Heads get the smoothed
    weights where the method gives them its weights (loss weightings). The method's own state
    (warm starts, learned parameters) evolves as without the wrapper.

    Masks: a masked task's weight is 0 in that update and its average is kept, not decayed; a
    task's average starts at its first step in the update. Non-finite steps: where the method
    skips a step, the average and ``raw_weights`` are kept too. :func:`mtlopt.task_weights`
    returns the smoothed weights applied (in the wrapped state); ``raw_weights`` in this state
    holds the method's own.

    Cost: ``O(T)`` per step; no pass over the task grads. Put it inside
    :func:`mtlopt.accumulate` and :func:`mtlopt.with_diagnostics` or outside the latter, not
    outside ``accumulate``.

    Args:
      tx: the method (or a chain holding one mtlopt aggregator).
      alpha: the weight of the past, in [0, 1]: 0 is the method itself, 1 freezes the
        weights at their first value. Float or scalar array (traced under
        ``inject_hyperparams``/``vmap``).
      initial_weights: ``lambda_0`` (``(T,)``, or ``(K, T)`` under ``groups=``); default: the
        first step's weights.

    Returns:
      an ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`SmoothWeightsState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, mtlopt
      >>> tx = mtlopt.smooth_weights(mtlopt.mgda(num_tasks=2), alpha=0.5)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}, state)
      >>> mtlopt.task_weights(state)  # the first step is MGDA's own
      Array([0.5, 0.5], dtype=float32)
      >>> # MGDA's weights are now (0.9, 0.1); the smoothed ones 0.5 * 0.5 + 0.5 * 0.9, ...
      >>> _, state = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}, state)
      >>> np.asarray(mtlopt.task_weights(state), float).round(4).tolist()
      [0.7, 0.3]
      >>> np.asarray(state.raw_weights, float).round(4).tolist()
      [0.9, 0.1]
    """
    name = "smooth_weights"
    alpha = checks.nonnegative(name, "alpha", alpha, upper=1.0)
    if initial_weights is not None and checks.concrete(initial_weights):
        v = np.asarray(initial_weights, np.float64)
        if v.ndim not in (1, 2) or v.size == 0 or not np.all(np.isfinite(v)):
            raise checks.fail(
                name, f"initial_weights must be a finite (T,) or (K, T) array; got {v!r}."
            )
    tx = optax.with_extra_args_support(tx)

    def init_fn(params: Any) -> SmoothWeightsState:
        inner = tx.init(params)
        w = _stored_weights(name, inner)
        if initial_weights is None:
            average, started = jnp.zeros_like(w), jnp.zeros(w.shape, bool)
        else:
            if np.shape(initial_weights) != w.shape:
                raise checks.fail(
                    name,
                    f"initial_weights has shape {np.shape(initial_weights)}; the method's "
                    f"weights have shape {w.shape}.",
                )
            average = jnp.array(initial_weights, dtype=w.dtype)
            started = jnp.ones(w.shape, bool)
        return SmoothWeightsState(inner, average, started, jnp.zeros_like(w))

    def update_fn(
        updates: Any, state: SmoothWeightsState, params: Any = None, **extra: Any
    ) -> tuple[Any, SmoothWeightsState]:
        modify = _request(name, extra)
        if "smooth" in modify:
            raise checks.fail(name, "the method is already smoothed by a smooth_weights inside.")
        seen: dict = {}

        def smooth(w: jax.Array, mask: jax.Array) -> jax.Array:
            prev = jnp.where(state.started, state.average.astype(w.dtype), w)
            lam = alpha * prev + (1 - alpha) * w
            seen["raw"], seen["average"], seen["mask"] = w, jnp.where(mask, lam, prev), mask
            return jnp.where(mask, lam, 0.0)

        modify["smooth"] = smooth
        out, inner = tx.update(
            updates, state.inner_state, params, **extra, **{build.MODIFY: modify}
        )
        _check_consumed(name, modify)
        ok = modify["ok"]
        # A skipped step keeps the average (the wrapped state is kept by the skeleton).
        keep = lambda new, old: jnp.where(ok, new.astype(old.dtype), old)
        started = jnp.where(ok, state.started | seen["mask"], state.started)
        average = keep(seen["average"], state.average)
        raw = keep(seen["raw"], state.raw_weights)
        return out, SmoothWeightsState(inner, average, started, raw)

    # (update_fn's state is typed as this state class; optax's protocol types it as any pytree.)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # type: ignore[arg-type]


def refresh_weights(
    tx: optax.GradientTransformation, every: Any
) -> optax.GradientTransformationExtraArgs:
    """Any method's weights recomputed every ``every`` steps and reused in between.

    On the steps ``k`` (counted from 0 by the method's own step count) with
    ``k % every == 0`` the wrapped method runs as usual; on the others the update combines the
    task grads with the stored weights of the last such step, and the Gramian pass and the
    solve are skipped (one ``lax.cond``): the aggregation then costs about what ``mean()``
    costs. This is Nash-MTL's ``update_weights_every`` and the periodic MGDA variants, for any
    method with weights, built with ``num_tasks`` (not for per-coordinate methods such as
    ``trimmed_mean``, nor for a method built with its own period). Masked tasks get weight 0
    on every step; a step the method skips (non-finite inputs) is not counted, so the next step
    is still a refresh where that one was. The method's other state is updated only on refresh
    steps, except what it writes before its weighting (DB-MTL's EMA gradients, every step).

    Args:
      tx: the method (or a chain holding one mtlopt aggregator).
      every: the period, an int >= 1 (1: the method itself); may be traced.

    Returns:
      an ``optax.GradientTransformationExtraArgs`` whose state is the wrapped one.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.refresh_weights(mtlopt.mgda(num_tasks=2), every=2)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for J in ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]]):
      ...     u, state = tx.update({"w": jnp.array(J)}, state)
      >>> u["w"]  # the second step reuses the first step's weights (0.5, 0.5)
      Array([0.5, 1.5], dtype=float32)
    """
    name = "refresh_weights"
    every = checks.count(name, "every", every, minimum=1)
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        modify = _request(name, extra)
        if "refresh_every" in modify:
            raise checks.fail(name, "the method is already wrapped by a refresh_weights.")
        modify["refresh_every"] = every
        out, state = tx.update(updates, state, params, **extra, **{build.MODIFY: modify})
        _check_consumed(name, modify)
        return out, state

    def init_fn(params: Any) -> Any:
        state = tx.init(params)
        _stored_weights(name, state)
        return state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
