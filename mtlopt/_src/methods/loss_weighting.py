"""Loss weighting: weights from the losses alone, usable with one backward pass."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlopt._src import build, checks, rng


class DWAState(NamedTuple):
    """State of :func:`dwa`: per task, the running sum and count of this epoch's losses, and
    the mean losses of the last two finished epochs; ``epochs`` counts the finished ones and
    ``epoch_length`` the steps of the running one (steps where a task took part)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array
    epoch_sum: jax.Array
    epoch_steps: jax.Array
    last: jax.Array
    before: jax.Array
    epochs: jax.Array
    epoch_length: jax.Array


_NEW_EPOCH = build.Signal(
    "new_epoch",
    "flag",
    required=False,
    why=" (a bool scalar, True on the first step of every epoch: DWA's weights change only "
    "when an epoch ends), or build it with window=k (an epoch of k steps)",
)


def dwa(
    temperature: float = 2.0,
    *,
    window: int | None = None,
    num_tasks: int,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Dynamic Weight Average: weights from how fast each task's loss fell over the last epochs.

    Task → params, or the loss weights alone with one backward pass
    (:func:`mtlopt.loss_weights`). Scale: sums (the weights add up to T).

    .. math::
       w_t = \frac{T \exp(r_t / \tau)}{\sum_i \exp(r_i / \tau)}, \qquad
       r_t = \frac{L_t(e - 1)}{L_t(e - 2)}

    where :math:`L_t(e)` is task t's mean loss over epoch e (the ``task_losses`` of its steps);
    during the first two epochs ``w_t = 1``. The weights move only when an epoch ends and stay
    fixed within one. Two ways to say where epochs end:

    * **epoch form** (the paper's): pass ``new_epoch=True`` on the first step of every epoch
      (``False`` on the others); the epoch before is then closed.
    * **step form**: ``window=k``: an epoch is k consecutive steps and closes by itself at the
      start of the step after its k-th; no extra argument is needed. Only steps where some
      task took part count towards the k (not an all-masked step, nor a skipped one).

    With both (``window=k`` and a ``new_epoch`` argument), either closes the running epoch:
    ``new_epoch=True`` closes it early, and the next window of k steps starts there. With
    neither, ``update`` raises a ``ValueError`` at trace time.

    Args:
      temperature: :math:`\tau > 0`; large values flatten the weights towards 1.
      window: the epoch length in steps (a positive int; a traced int is accepted too), or
        None (default): epochs end only where ``new_epoch=True`` says so.
      num_tasks: T (required: the state keeps per-task losses).
      task_specific: heads get their task's weight, as the trunk does (the gradient of
        ``sum_t w_t l_t``).
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`). A step
        skipped for a non-finite loss does not count into the epoch's mean (nor close an epoch).

    Masked tasks (``task_mask``) add nothing to their epoch sums and get weight 0; the others
    share ``n_active * softmax`` over the active tasks. A task whose mean loss of the epoch
    before was 0 gets ``r_t = 1``.

    Cost:
      O(T): no pass over the task grads beyond the combination (none in the loss-only mode).

    Deviations:
      The rule is the paper's, as in the authors' code, LibMTL and TorchJD (which average the
      losses over each whole epoch, as the epoch form here). TorchJD's ``DWA.step()`` at the
      end of an epoch is ``new_epoch=True`` on the next step; calling it after every batch is
      ``window=1``. Where a task's mean loss of the epoch before was 0, TorchJD divides by it
      (inf or NaN weights); here its ratio is 1.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.dwa(num_tasks=2)
      >>> state = tx.init(None)
      >>> for epoch_losses in ([4.0, 4.0], [2.0, 4.0], [1.0, 4.0]):
      ...     w, state = mtlopt.loss_weights(
      ...         tx, jnp.array(epoch_losses), state, new_epoch=jnp.array(True))
      >>> w.round(4)  # task 0's loss halved, task 1's did not move: task 1 weighs more
      Array([0.8756, 1.1244], dtype=float32)
      >>> tx = mtlopt.dwa(window=1, num_tasks=2)  # the same, one step an epoch
      >>> state = tx.init(None)
      >>> for losses in ([4.0, 4.0], [2.0, 4.0], [1.0, 4.0]):
      ...     w, state = mtlopt.loss_weights(tx, jnp.array(losses), state)
      >>> w.round(4)
      Array([0.8756, 1.1244], dtype=float32)

    References:
      Liu, Johns & Davison, `End-to-End Multi-Task Learning with Attention
      <https://arxiv.org/abs/1803.10704>`_, CVPR 2019.
    """
    name = "dwa"
    if num_tasks is None:
        raise checks.fail(
            name,
            "num_tasks is required (the state keeps per-task epoch losses); e.g. "
            "mtlopt.dwa(num_tasks=3).",
        )
    temperature = checks.positive(name, "temperature", temperature)
    if window is not None:
        window = checks.count(name, "window", window, 1)

    def init_extra(T: int | None, shared: Any) -> dict:
        del shared
        zeros = lambda: jnp.zeros((T,), jnp.float32)
        return {
            "epoch_sum": zeros(),
            "epoch_steps": zeros(),
            "last": zeros(),
            "before": zeros(),
            "epochs": jnp.zeros((), jnp.int32),
            "epoch_length": jnp.zeros((), jnp.int32),
        }

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        s, dtype, mask = ctx.state, ctx.dtype, ctx.mask
        flag = ctx.signals["new_epoch"]
        if flag is None and window is None:
            raise checks.fail(
                name,
                "this method needs the extra argument new_epoch (a bool scalar, True on the "
                "first step of every epoch), or window=k at construction (an epoch of k "
                "steps); pass it as tx.update(task_grads, state, params, new_epoch=...).",
            )
        losses = ctx.losses.astype(dtype)
        # Close the epoch that just ended (if any step was seen in it).
        steps = s.epoch_steps.astype(dtype)
        close = jnp.asarray(False) if flag is None else flag
        if window is not None:
            close = close | (s.epoch_length >= jnp.asarray(window, s.epoch_length.dtype))
        close = close & jnp.any(steps > 0)
        mean = s.epoch_sum.astype(dtype) / jnp.maximum(steps, 1.0)
        ended = jnp.where(steps > 0, mean, s.last.astype(dtype))
        last = jnp.where(close, ended, s.last.astype(dtype))
        before = jnp.where(close, s.last.astype(dtype), s.before.astype(dtype))
        epochs = s.epochs + close.astype(jnp.int32)
        epoch_sum = jnp.where(close, 0.0, s.epoch_sum.astype(dtype))
        epoch_steps = jnp.where(close, 0.0, steps)
        # This step's losses count into the epoch now running.
        epoch_sum = epoch_sum + jnp.where(mask, losses, 0.0)
        epoch_steps = epoch_steps + mask.astype(dtype)
        length = jnp.where(close, 0, s.epoch_length) + jnp.any(mask).astype(jnp.int32)

        ratio = jnp.where(before > 0, last / jnp.where(before > 0, before, 1.0), 1.0)
        logits = jnp.where(mask, ratio / jnp.asarray(temperature).astype(dtype), -jnp.inf)
        active = jnp.sum(mask).astype(dtype)
        soft = active * jax.nn.softmax(logits)
        w = jnp.where(epochs >= 2, jnp.where(mask, soft, 0.0), mask.astype(dtype))
        extras = {
            "epoch_sum": epoch_sum,
            "epoch_steps": epoch_steps,
            "last": last,
            "before": before,
            "epochs": epochs,
            "epoch_length": length,
        }
        return w, extras

    return build.loss_weighting(
        name,
        DWAState,
        weights_fn,
        init_extra=init_extra,
        signals=(_NEW_EPOCH,),
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
    )


# ---------------------------------------------------------------------------------------------
# RLW


class RLWState(NamedTuple):
    """State of :func:`rlw`. ``key`` is raw PRNG key data (uint32), split every step;
    ``spread`` (``distribution="random_normal"`` only, else None) is the raw key data from
    which the fixed per-task means and standard deviations are drawn (never split)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    skipped: jax.Array
    weights: jax.Array | None
    key: jax.Array
    spread: jax.Array | None


RLW_DISTRIBUTIONS = (
    "normal",
    "uniform",
    "dirichlet",
    "random_normal",
    "bernoulli",
    "constrained_bernoulli",
)


def _masked_softmax(z: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax over the active entries, 0 elsewhere (all 0 when none is active)."""
    top = jnp.max(jnp.where(mask, z, -jnp.inf))
    top = jnp.where(jnp.any(mask), top, 0.0)
    e = jnp.where(mask, jnp.exp(jnp.where(mask, z - top, 0.0)), 0.0)
    total = jnp.sum(e)
    return e / jnp.where(total > 0, total, 1.0)


def rlw_draw(
    distribution: str,
    key: jax.Array,
    mask: jax.Array,
    dtype: Any = jnp.float32,
    spread: Any = None,
) -> jax.Array:
    """One draw of RLW's ``(T,)`` weights over the active tasks (``mask``), 0 on the others.

    Every task has its own draw (task t's raw value does not depend on the mask); the
    normalisation runs over the active tasks, so the active weights have the distribution of
    RLW on the active tasks alone.
    """
    T = mask.shape[0]
    if distribution in ("normal", "uniform", "random_normal"):
        if distribution == "uniform":
            z = jax.random.uniform(key, (T,), dtype)
        else:
            z = jax.random.normal(key, (T,), dtype)
        if distribution == "random_normal":
            mean, std = jax.random.uniform(jax.random.wrap_key_data(spread), (2, T), dtype)
            z = mean + std * z
        return _masked_softmax(z, mask)
    if distribution == "dirichlet":
        # Dir(1, ..., 1) over the active tasks: Gamma(1) (exponential) draws, normalised.
        e = jnp.where(mask, jax.random.exponential(key, (T,), dtype), 0.0)
        total = jnp.sum(e)
        flat = mask.astype(dtype) / jnp.maximum(jnp.sum(mask), 1).astype(dtype)
        return jnp.where(total > 0, e / jnp.where(total > 0, total, 1.0), flat)
    idx = jnp.arange(T)
    if distribution == "constrained_bernoulli":
        # One active task, uniformly: a one-hot vector.
        j = jax.random.categorical(key, jnp.where(mask, 0.0, -jnp.inf))
        return (mask & (idx == j)).astype(dtype)
    # "bernoulli": iid Bernoulli(1/2) bits over the active tasks, given that one is 1, without
    # a rejection loop: the first active 1 sits at active position j with probability
    # 2^-(j+1) / (1 - 2^-n); the bits before it are 0 and those after it are fresh.
    k_first, k_bits = jax.random.split(key)
    rank = jnp.cumsum(mask) - 1
    logits = jnp.where(mask, -(rank + 1).astype(jnp.float32) * float(np.log(2.0)), -jnp.inf)
    first = jax.random.categorical(k_first, logits)
    bits = jax.random.bernoulli(k_bits, 0.5, (T,))
    return (mask & ((idx == first) | ((idx > first) & bits))).astype(dtype)


def rlw(
    seed: int | jax.Array = 0,
    distribution: str = "normal",
    *,
    num_tasks: int | None = None,
    task_specific: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Random Loss Weighting: fresh random task weights at every step.

    Task → params, or the loss weights alone with one backward pass
    (:func:`mtlopt.loss_weights`). Scale: averages (the weights add up to 1, each 1/T on
    average) for every distribution but ``"bernoulli"``, which sums a random non-empty subset
    of the tasks.

    .. math::
       d = \sum_t \tilde\lambda_t g_t, \qquad \tilde\lambda = f(\lambda), \quad
       \lambda \sim p(\lambda)

    drawn afresh at every step, where ``distribution`` chooses :math:`p` and the normalisation
    :math:`f`:

    * ``"normal"`` (default): :math:`\lambda_t \sim \mathcal N(0, 1)`, softmax;
    * ``"uniform"``: :math:`\lambda_t \sim \mathcal U(0, 1)`, softmax;
    * ``"random_normal"``: :math:`\lambda_t \sim \mathcal N(\mu_t, \sigma_t^2)` with
      :math:`\mu_t, \sigma_t \sim \mathcal U(0, 1)` drawn once (from the seed) and kept,
      softmax;
    * ``"dirichlet"``: :math:`\lambda \sim \mathrm{Dir}(1, \dots, 1)` (uniform on the
      simplex), used as drawn;
    * ``"bernoulli"``: :math:`\lambda_t \sim \mathrm{Bernoulli}(1/2)`, redrawn while all are
      0, used as drawn (0/1 weights: the update sums a random non-empty subset of the tasks);
    * ``"constrained_bernoulli"``: one task, chosen uniformly, gets 1 and the others 0 (one
      task trained per step).

    Args:
      seed: an int or a PRNG key; the key lives in the state and is split every step; a
        skipped step keeps it. Works under ``jax.vmap`` over keys.
      distribution: one of the six above.
      num_tasks: optional; given, the state keeps the last weights (``task_weights``). The
        loss-only mode takes T from the losses.
      task_specific: heads get their task's weight, as the trunk does (the gradient of
        ``sum_t w_t l_t``).
      nonfinite: ``"skip"`` (default) or ``"propagate"`` (see :func:`mtlopt.cagrad`).

    The weights do not use the losses: over task grads ``task_losses`` is not needed (given,
    a non-finite active loss skips the step, as for every method). Masked tasks
    (``task_mask``) get weight 0 and the draw is normalised over the active tasks only: every
    task draws its own :math:`\lambda_t` (whatever the mask), the softmax (or the Dirichlet's
    normalisation) runs over the active ones, a Bernoulli draw is conditioned on an active 1,
    the constrained Bernoulli picks among the active tasks. So the active tasks' weights have
    the distribution of RLW on those tasks alone.

    Cost:
      O(T) to draw; one pass over the task grads (the combination), none in the loss-only
      mode.

    Deviations:
      The six distributions and their normalisations are those the authors compare (their
      code for the paper; their first LibMTL release had five of them as ``dist=``); LibMTL
      and TorchJD (``Random``) now offer only ``"normal"``, the default here as there. That
      early LibMTL also put its Dirichlet draw through a softmax, which flattens it towards
      1/T; here it is used as drawn.
      Keys instead of a global generator: the draws are reproducible given the seed. A
      Bernoulli draw of all zeros is redrawn in the authors' code (a loop); here the same
      conditional distribution is sampled in one go (the first active 1 from a truncated
      geometric law, fresh bits after it).

    Examples:
      >>> import jax, jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.rlw(seed=0)
      >>> state = tx.init(None)
      >>> w, state = mtlopt.loss_weights(tx, jnp.array([1.0, 2.0, 3.0]), state)
      >>> w.shape, bool(jnp.isclose(w.sum(), 1.0)), bool(jnp.all(w > 0))
      ((3,), True, True)

    References:
      Lin, Ye, Zhang & Tsang, `Reasonable Effectiveness of Random Weighting: A Litmus Test for
      Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
    """
    name = "rlw"
    checks.choice(name, "distribution", distribution, RLW_DISTRIBUTIONS)
    seed_data = rng.key_data(name, seed)  # checked now
    spread = None
    if distribution == "random_normal":
        spread = jax.random.key_data(jax.random.fold_in(rng.wrap(seed_data), 1))

    def init_extra(T: int | None, shared: Any) -> dict:
        del T, shared
        return {"spread": None if spread is None else jnp.array(spread, copy=True)}

    def weights_fn(ctx: build.Context) -> tuple[jax.Array, dict]:
        w = rlw_draw(distribution, ctx.key, ctx.mask, ctx.dtype, ctx.state.spread)
        return w, {}

    return build.loss_weighting(
        name,
        RLWState,
        weights_fn,
        init_extra=init_extra,
        random=True,
        num_tasks=num_tasks,
        task_specific=task_specific,
        nonfinite=nonfinite,
        seed=seed,
        needs_losses=False,
    )
