"""Rate balancing: task weights learned beside the model so that every task trains at a
similar rate (FAMO from the losses alone, GradNorm from the gradient norms of a shared layer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlopt._src import build, checks, learned

# FAMO's shift inside the log, as in the authors' code and both peers: log(l - min + 1e-8).
_FAMO_EPS = 1e-8
# GradNorm's learned weights are kept at or above this before they are renormalised.
_GRADNORM_FLOOR = 1e-6


def _softmax(x: jax.Array, keep: jax.Array) -> jax.Array:
    """``softmax(x)`` over the entries where ``keep`` is True, 0 elsewhere (all 0 if none)."""
    top = jnp.max(jnp.where(keep, x, -jnp.inf))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(keep, jnp.exp(jnp.where(keep, x - top, 0.0)), 0.0)
    total = jnp.sum(e)
    return e / jnp.where(total > 0, total, 1.0)


def _finite(tree_: Any) -> jax.Array:
    """Every float entry of a small tree (an optimizer's state) is finite."""
    oks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree_)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(oks)) if oks else jnp.asarray(True)


def _require_num_tasks(name: str, num_tasks: Any, what: str) -> None:
    if num_tasks is None:
        raise checks.fail(name, f"num_tasks is required ({what}); e.g. mtlopt.{name}(num_tasks=3).")


# --- famo ---


class FAMOState(NamedTuple):
    """State of :func:`famo`: the task logits and their optimizer's state, and each task's
    loss of its last step (``last_losses``) with the value of ``count`` after that step
    (``loss_step``; -1 before any), the "before" side of the next logit update."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array
    logits: jax.Array
    opt_state: Any
    last_losses: jax.Array
    loss_step: jax.Array


_LOSSES_AFTER = build.Signal(
    "losses_after",
    "task_vector",
    required=False,
    why=" (optional: the previous step's batch evaluated after the previous update)",
)


def _min_losses(name: str, value: Any, T: int) -> Any:
    if value is None:
        return None
    if not checks.concrete(value):
        if np.shape(value) != (T,):
            raise checks.fail(name, f"min_losses must have shape ({T},); got {np.shape(value)}.")
        return value
    v = np.asarray(value, np.float64)
    if v.shape != (T,) or not np.all(np.isfinite(v)):
        raise checks.fail(
            name, f"min_losses must be {T} finite numbers (one per task); got {value!r}."
        )
    return np.asarray(value, np.float32)


def famo(
    w_lr: float = 0.025,
    gamma: float = 1e-3,
    *,
    min_losses: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    num_tasks: int,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""FAMO: weights from learned logits that make every task's log loss fall at one rate.

    Task → params, or the loss weights alone with one backward pass
    (:func:`mtlopt.loss_weights`: FAMO's point, O(1) passes whatever T). Scale: a convex
    combination (the weights add up to 1, like the mean).

    .. math::
       w_t = \frac{z_t / D_t}{\sum_s z_s / D_s}
           = \operatorname{softmax}_t\big(\xi_t - \log D_t\big), \qquad
       z = \operatorname{softmax}(\xi), \quad D_t = l_t - b_t + 10^{-8}

    the coefficients of the task gradients in the gradient of the paper's objective
    :math:`\sum_t (z_t / c) \log D_t`, :math:`c = \sum_t z_t / D_t` held constant. The logits
    :math:`\xi` (the state) follow one step of Adam (``w_lr``) with L2 weight decay ``gamma``
    on

    .. math::
       \nabla_\xi = J_{\operatorname{softmax}}(\xi)^\top \delta
                  = z \odot (\delta - \langle z, \delta\rangle), \qquad
       \delta_t = \log D_t^{\text{before}} - \log D_t^{\text{after}}

    the fall of each log loss over one model update: tasks that fell fast lose weight.

    **When the logits move.** The paper updates the logits after step k's model update, from
    step k's batch evaluated before and after it. Here ``update`` is called once per step, so
    that update runs at the start of step k+1 (the same thing: nothing happens in between),
    before step k+1's weights, which then use the new logits; step k+1's losses are stored for
    the next one. The first step has nothing to compare: uniform logits,
    :math:`w_t \propto 1 / D_t`.

    **The "after" losses**, in two forms:

    * ``losses_after=`` (the paper's rule): pass, at step k+1, step k's batch evaluated with
      the params after step k's update (one extra forward pass per step, no backward):
      :math:`\delta` measures exactly what that update did.
    * lagged (default, no ``losses_after``): step k+1's own losses stand in for the "after"
      side, so no extra pass. The "before" and "after" losses then come from different
      batches: :math:`\delta` also carries the batch-to-batch difference of the losses (noise
      with mean zero over batches, which Adam's averaging damps, but at small batch sizes it
      can dominate the per-step change), and the "after" side is measured on a batch the
      model has not been trained on (not the optimistic same-batch value).

    Args:
      w_lr: the logits' learning rate (the paper: 0.025), ``>= 0``; may be traced
        (``optax.inject_hyperparams``).
      gamma: the logits' L2 regularisation, added to their gradient before Adam's moments, as
        ``torch.optim.Adam(weight_decay=gamma)`` does (``optax.chain(
        optax.add_decayed_weights(gamma), optax.adam(w_lr))``): 1e-3 as in LibMTL, TorchJD
        and the authors' NYUv2 script (their code's defaults are 1e-5 in
        ``methods/weight_methods.py`` and 0.01 in ``famo.py`` and the experiments' parser).
      min_losses: ``b``, a ``(T,)`` lower bound of each loss (default 0), subtracted inside
        the log.
      optimizer: any optax transformation for the logits instead of the default (``w_lr`` and
        ``gamma`` are then unused).
      num_tasks: T (required: the state keeps per-task logits and losses).
      task_specific: heads get their task's weight, as the trunk does (the gradient of
        ``sum_t w_t l_t``: the one-pass mode and the task-grads mode agree).
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Masked tasks (``task_mask``) get weight 0 and take no part in either softmax; their
    logits, their rows of Adam's moments and their stored losses stay as they were. A logit
    update involves the tasks active at both steps (the previous one and this one); the others
    keep theirs. With ``losses_after``, its entries for tasks that had no loss at the previous
    step are not used, but must be finite (pass 0, say) where the task is active now.

    Bad values: FAMO takes ``log D``. A step where an active task has ``D <= 0`` (a loss below
    its bound ``b`` by more than 1e-8), now or in the stored or ``losses_after`` values of the
    update, is a bad input: NaN weights, so the step is skipped (zero update with
    ``"skip"``, NaN with ``"propagate"``; the state, logits included, is left as it was and
    ``skipped`` counts the step). A skipped step stores nothing: the next step's
    ``losses_after``, if computed on the skipped batch, is then compared with the losses of
    the last step taken (another batch), once.

    Cost:
      O(T): no pass over the task grads beyond the combination, none in the one-pass mode;
      the ``losses_after`` form adds one forward pass (the user's).

    Deviations:
      The update follows the paper and the authors' code (TorchJD's ``FAMO`` and LibMTL's
      ``FAMO`` compute the same weights and the same logit step). Both peers and the authors
      update the logits after the model step, through a separate call with the recomputed
      losses; here one ``update`` per step does both (see above), and the lagged form is ours.
      The authors' code has a ``max_norm=1.0`` clip of the shared gradient, but it runs before
      the backward pass (``WeightMethod.backward`` clips, then calls ``loss.backward()``; the
      example in ``famo.py`` passes no parameters to clip), so it never acts; the paper has
      none. It is not reproduced: to clip, chain ``optax.clip_by_global_norm`` after this
      transformation (in the one-pass mode, before the model's optimizer). Masks are ours.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.famo(num_tasks=2)
      >>> state = tx.init(None)
      >>> w, state = mtlopt.loss_weights(tx, jnp.array([1.0, 4.0]), state)
      >>> print(*(f"{x:.4f}" for x in w))  # the first step: w proportional to 1 / loss
      0.8000 0.2000
      >>> # Task 0's loss halved, task 1's did not move: task 0's logit falls.
      >>> w, state = mtlopt.loss_weights(tx, jnp.array([0.5, 4.0]), state)
      >>> print(*(f"{x:.4f}" for x in state.logits))
      -0.0250 0.0250

    References:
      Liu, Feng, Stone & Liu, `FAMO: Fast Adaptive Multitask Optimization
      <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023; code:
      https://github.com/Cranial-XIX/FAMO.
    """
    name = "famo"
    _require_num_tasks(name, num_tasks, "the state keeps per-task logits and losses")
    w_lr = checks.nonnegative(name, "w_lr", w_lr)
    gamma = checks.nonnegative(name, "gamma", gamma)
    T0 = checks.positive_int(name, "num_tasks", num_tasks)
    lower = _min_losses(name, min_losses, T0) if T0 is not None else min_losses

    def adam_l2(lr: Any) -> optax.GradientTransformation:
        return optax.chain(optax.add_decayed_weights(gamma), optax.adam(lr))

    opt = learned.optimizer(name, w_lr, optimizer, default=adam_l2)

    def init_extra(T: int | None, shared: Any) -> dict:
        del shared
        logits, opt_state = learned.init(opt, jnp.zeros((T,), jnp.float32))
        return {
            "logits": logits,
            "opt_state": opt_state,
            "last_losses": jnp.zeros((T,), jnp.float32),
            "loss_step": jnp.full((T,), -1, jnp.int32),
        }

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        s, dtype, mask = ctx.state, ctx.dtype, ctx.mask
        b = jnp.zeros((ctx.T,), dtype) if lower is None else jnp.asarray(lower, dtype)
        D = ctx.losses.astype(dtype) - b + _FAMO_EPS

        # The logit update of the previous step, for the tasks active then and now.
        both = mask & (s.loss_step == s.count)
        after = ctx.signals["losses_after"]
        D_after = D if after is None else after.astype(dtype) - b + _FAMO_EPS
        D_before = s.last_losses.astype(dtype) - b + _FAMO_EPS
        ok_prev = jnp.all(jnp.where(both, (D_before > 0) & (D_after > 0), True))
        safe = lambda x: jnp.log(jnp.where(both & (x > 0), x, 1.0))
        delta = jnp.where(both, safe(D_before) - safe(D_after), 0.0)
        z = _softmax(s.logits.astype(dtype), both)
        grad = z * (delta - jnp.sum(z * delta))
        logits, opt_state = learned.step(opt, grad, s.logits, s.opt_state, both)
        moved = jnp.any(both)  # no step at all (Adam's count included) without a comparison
        logits = jnp.where(moved, logits, s.logits)
        opt_state = jax.tree.map(lambda a, o: jnp.where(moved, a, o), opt_state, s.opt_state)

        # This step's weights, from the new logits.
        ok = ok_prev & jnp.all(jnp.where(mask, D > 0, True))
        log_d = jnp.log(jnp.where(mask & (D > 0), D, 1.0))
        w = _softmax(logits.astype(dtype) - log_d, mask)
        w = jnp.where(ok, w, jnp.nan)
        extras = {
            "logits": logits,
            "opt_state": opt_state,
            "last_losses": jnp.where(mask, ctx.losses.astype(dtype), s.last_losses.astype(dtype)),
            "loss_step": jnp.where(mask, s.count + 1, s.loss_step),
        }
        return w, extras

    return build.loss_weighting(
        name,
        FAMOState,
        weights_fn,
        init_extra=init_extra,
        signals=(_LOSSES_AFTER,),
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
    )


# --- gradnorm ---


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`: the learned parameters (``learned``: the weights ``w``, or
    the logits ``p`` of ``w = T softmax(p)`` with ``parameterization="softmax"``) and their
    optimizer's state; each task's initial loss ``L_t(0)`` (``initial_losses``) and how many of
    its losses went into it (``loss_steps``, at most ``max(warmup_steps, 1)``)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array
    learned: jax.Array
    opt_state: Any
    initial_losses: jax.Array
    loss_steps: jax.Array


PARAMETERIZATIONS = ("paper", "softmax")


def gradnorm(
    alpha: float = 1.5,
    learning_rate: float = 0.025,
    *,
    layer: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    parameterization: str = "paper",
    warmup_steps: int = 0,
    num_tasks: int,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""GradNorm: loss weights learned so that each task's gradient norm at a shared layer
    follows its relative training rate.

    Task → params (needs the task gradients: the norms; no one-pass mode). Scale: sums (the
    weights add up to T; 1 each at the start).

    At step t, with :math:`n_t = \|\nabla_W l_t\|` the norm of task t's gradient on the chosen
    shared layer W and :math:`w_t` the current weights:

    .. math::
       G_t = w_t n_t, \quad \bar G = \operatorname{mean}_s G_s, \quad
       r_t = \frac{l_t / L_t(0)}{\operatorname{mean}_s\, l_s / L_s(0)}, \quad
       L_{\text{grad}} = \sum_t \big|G_t - \bar G\, r_t^{\alpha}\big|

    with the targets :math:`\bar G r_t^\alpha` held constant, so
    :math:`\partial L_{\text{grad}} / \partial w_t = \operatorname{sign}(G_t - \bar G
    r_t^\alpha)\, n_t`. The update is :math:`\sum_t w_t g_t` with the weights before this
    step's learning (the paper's :math:`w_i(t)`, as a joint step of the model and the weights
    would take). Then one step of the optimizer on :math:`w` with that gradient, and the
    weights are renormalised to add up to T. Heads get the same weights (the gradient of
    :math:`\sum_t w_t l_t`).

    Args:
      alpha: the asymmetry :math:`\alpha \ge 0`, the strength of the pull towards a common
        training rate, tuned per problem in the paper (1.5 as in LibMTL); 0 equalises the
        weighted norms. May be traced.
      learning_rate: of the default optimizer, ``optax.adam(learning_rate)``; may be traced.
        Adam's steps are about ``learning_rate`` per step whatever the gradients' scale (the
        weights start at 1). The paper (and LibMTL) train the weights with the network's
        optimizer and learning rate; pass that as ``optimizer=`` to reproduce it (an SGD step
        is then proportional to the gradient norms).
      layer: which shared leaves are "the last shared layer" W whose gradient norms are
        compared: a bool pytree with the params' structure, or a callable that is handed a
        params-shaped tree of ``jax.ShapeDtypeStruct`` and returns one (as ``task_specific``),
        e.g. ``{"trunk": {"w1": False, "w2": True}, "heads": False}``. Only those
        leaves are read for the norms (the whole update still combines every leaf). None
        (default): all shared leaves (LibMTL's default, without ``rep_grad``). Selecting only
        heads (or nothing) is a ValueError.
      optimizer: any optax transformation for the learned parameters instead of Adam.
      parameterization: ``"paper"`` (default): the weights themselves are learned, clamped at
        1e-6 after each step (so they stay positive; the gradient can push a weight through
        0), then renormalised. ``"softmax"``: LibMTL's ``w = T softmax(p)``, with the gradient
        through the softmax (no clamp or renormalisation needed).
      warmup_steps: 0 (default, the paper): ``L_t(0)`` is task t's first loss, and the weights
        learn from the first step (where every ``r_t`` is 1). ``k > 0``: ``L_t(0)`` is the
        mean of task t's first k losses, the weights stay as they are during those steps, and
        they learn once every active task has had k steps before the current one (LibMTL: k =
        the steps of one epoch, its epoch 0 of plain summed losses).
      num_tasks: T (required: the state keeps the weights and the initial losses).
      task_specific: which leaves are task-specific heads (see :func:`mtlopt.cagrad`); they
        are never in the norms.
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    Masked tasks (``task_mask``) get weight 0 and take no part in :math:`\bar G`, the mean
    loss ratio or the learning: their weight, their rows of the optimizer's state and their
    initial loss are kept, and the active tasks share T minus the masked tasks' weights. A
    task's ``L_t(0)`` is taken at its first active steps.

    Bad values: the loss ratios need ``l_t >= 0`` and ``L_t(0) > 0``. A step with a negative
    active loss, or a non-positive loss going into ``L_t(0)``, is a bad input: the step is
    skipped (zero update with ``"skip"``, NaN with ``"propagate"``; the state is left as it
    was and ``skipped`` counts it). If all active losses are 0, every ``r_t`` is 1. A learning
    step whose result is not finite (a gradient norm that overflows the optimizer's moments,
    e.g. Adam's squared gradient of a norm beyond ~1e19 in float32) is not taken: the weights
    and the optimizer's state stay, and the model's update goes ahead.

    Cost:
      Two passes over the task grads: the squared norms (of the ``layer`` leaves only), then
      the combination; O(T) work, no solver. With a ``layer`` that leaves shared leaves out,
      the update is also checked for finite values (the norms vouch only for what they read).

    Deviations:
      From the paper: the weights are clamped at 1e-6 before the renormalisation, so they stay
      positive (Algorithm 1 only renormalises); they learn with their own optimizer (Adam,
      ``learning_rate``) unless ``optimizer=`` is given; masks are ours. From LibMTL: its
      ``w = T softmax(p)`` (``parameterization="softmax"``) trained by the network's
      optimizer, and its first epoch of plain summed losses, whose mean losses are its
      ``L_t(0)`` (``warmup_steps`` = the steps of an epoch); its norms are those of all
      shared parameters (``layer=None``) or of the representation (``rep_grad``, not
      available here). TorchJD has no GradNorm.

    Examples:
      >>> import jax.numpy as jnp, mtlopt, optax
      >>> tx = mtlopt.gradnorm(optimizer=optax.sgd(0.1), num_tasks=2)
      >>> grads = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]])}
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> updates, state = tx.update(grads, state, task_losses=jnp.array([1.0, 1.0]))
      >>> updates["w"]  # the first step: w = (1, 1)
      Array([3., 1.], dtype=float32)
      >>> # G = (3, 1), target 2: w - 0.1 * (3, -1) = (0.7, 1.1), renormalised to add up to 2
      >>> print(*(f"{x:.4f}" for x in state.learned))
      0.7778 1.2222

    References:
      Chen, Badrinarayanan, Lee & Rabinovich, `GradNorm: Gradient Normalization for Adaptive
      Loss Balancing in Deep Multitask Networks <https://arxiv.org/abs/1711.02257>`_,
      ICML 2018.
    """
    name = "gradnorm"
    _require_num_tasks(name, num_tasks, "the state keeps the weights and the initial losses")
    alpha = checks.nonnegative(name, "alpha", alpha)
    learning_rate = checks.nonnegative(name, "learning_rate", learning_rate)
    checks.choice(name, "parameterization", parameterization, PARAMETERIZATIONS)
    warmup_steps = checks.nonnegative(name, "warmup_steps", warmup_steps)
    if checks.concrete(warmup_steps) and float(warmup_steps) != int(float(warmup_steps)):
        raise checks.fail(name, f"warmup_steps must be an int >= 0; got {warmup_steps!r}.")
    if layer is not None and not callable(layer) and not jax.tree.leaves(layer):
        raise checks.fail(name, "layer must mark at least one shared leaf; got an empty tree.")
    opt = learned.optimizer(name, learning_rate, optimizer)
    softmax = parameterization == "softmax"

    def init_extra(T: int | None, shared: Any) -> dict:
        del shared
        value, opt_state = learned.init(opt, jnp.ones((T,), jnp.float32))
        return {
            "learned": value,
            "opt_state": opt_state,
            "initial_losses": jnp.zeros((T,), jnp.float32),
            "loss_steps": jnp.zeros((T,), jnp.int32),
        }

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        s, dtype, mask, T = ctx.state, ctx.dtype, ctx.mask, ctx.T
        losses = ctx.losses.astype(dtype)
        theta = s.learned.astype(dtype)
        everyone = jnp.ones((T,), bool)
        z: Any = _softmax(theta, everyone) if softmax else None
        w = T * z if softmax else theta  # this step's weights: before the learning

        # L_t(0): the mean of the task's first max(warmup_steps, 1) losses.
        need = jnp.maximum(jnp.asarray(warmup_steps).astype(jnp.int32), 1)
        take = mask & (s.loss_steps < need)
        k = (s.loss_steps + 1).astype(dtype)
        L0_old = s.initial_losses.astype(dtype)
        L0 = jnp.where(take, L0_old + (losses - L0_old) / k, L0_old)
        steps = jnp.where(take, s.loss_steps + 1, s.loss_steps)
        ok = jnp.all(jnp.where(mask, losses >= 0, True))
        ok &= jnp.all(jnp.where(take, losses > 0, True))
        # Learning from the first step (warmup_steps=0), or once every active task has had
        # its warm-up steps before this one.
        W = jnp.asarray(warmup_steps).astype(jnp.int32)
        learn = jnp.any(mask) & jnp.all(jnp.where(mask, s.loss_steps >= W, True))

        # The relative inverse training rates and the targets, over the active tasks.
        active = jnp.maximum(jnp.sum(mask), 1).astype(dtype)
        ratio = jnp.where(mask & (L0 > 0), losses / jnp.where(L0 > 0, L0, 1.0), 0.0)
        mean_ratio = jnp.sum(ratio) / active
        r = jnp.where(mean_ratio > 0, ratio / jnp.where(mean_ratio > 0, mean_ratio, 1.0), 1.0)
        n = jnp.where(mask, jnp.sqrt(jnp.maximum(ctx.gram, 0.0)), 0.0)  # pre-scaled units
        G = w * n
        G_bar = jnp.sum(jnp.where(mask, G, 0.0)) / active
        target = G_bar * jnp.power(r, jnp.asarray(alpha).astype(dtype))
        dL_dw = jnp.where(mask, jnp.sign(G - target) * n * ctx.gram_scale, 0.0)

        # Through w = T softmax(p) for the softmax parameterization.
        grad = T * z * (dL_dw - jnp.sum(z * dL_dw)) if softmax else dL_dw
        value, opt_state = learned.step(opt, grad, s.learned, s.opt_state, mask)
        if not softmax:
            kept = s.learned.astype(dtype)
            value = jnp.where(mask, jnp.maximum(value.astype(dtype), _GRADNORM_FLOOR), kept)
            budget = T - jnp.sum(jnp.where(mask, 0.0, kept))
            total = jnp.sum(jnp.where(mask, value, 0.0))
            value = jnp.where(mask, value * (budget / jnp.where(total > 0, total, 1.0)), kept)
        value = value.astype(s.learned.dtype)
        moved = learn & jnp.all(jnp.isfinite(value)) & _finite(opt_state)
        value = jnp.where(moved, value, s.learned)
        opt_state = jax.tree.map(lambda a, o: jnp.where(moved, a, o), opt_state, s.opt_state)

        extras = {
            "learned": value,
            "opt_state": opt_state,
            "initial_losses": L0,
            "loss_steps": steps,
        }
        return jnp.where(ok, w, jnp.nan), extras

    method = build.Method(
        name,
        GradNormState,
        weights_fn,
        init_extra=init_extra,
        gram="diag",
        needs_losses=True,
        head_scales=lambda ctx, w: w,
        gram_leaves=None if layer is None else ("layer", layer),
    )
    return build.aggregator(
        method, num_tasks=num_tasks, task_specific=task_specific, nonfinite=nonfinite
    )
