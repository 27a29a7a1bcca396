"""Loss weighting: weights from the losses alone, usable with one backward pass."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtlopt._src import build, checks


class DWAState(NamedTuple):
    """State of :func:`dwa`: per task, the running sum and count of this epoch's losses, and
    the mean losses of the last two finished epochs; ``epochs`` counts the finished ones."""

    count: jax.Array
    skipped: jax.Array
    weights: jax.Array
    epoch_sum: jax.Array
    epoch_steps: jax.Array
    last: jax.Array
    before: jax.Array
    epochs: jax.Array


_NEW_EPOCH = build.Signal(
    "new_epoch",
    "flag",
    why=" (a bool scalar, True on the first step of every epoch: DWA's weights change only "
    "when an epoch ends)",
)


def dwa(
    temperature: float = 2.0,
    *,
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
    during the first two epochs ``w_t = 1``. Pass ``new_epoch=True`` on the first step of every
    epoch: the epoch before is then closed and the weights move; they stay fixed within an
    epoch.

    Args:
      temperature: :math:`\tau > 0`; large values flatten the weights towards 1.
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

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.dwa(num_tasks=2)
      >>> state = tx.init(None)
      >>> for epoch_losses in ([4.0, 4.0], [2.0, 4.0], [1.0, 4.0]):
      ...     w, state = mtlopt.loss_weights(
      ...         tx, jnp.array(epoch_losses), state, new_epoch=jnp.array(True))
      >>> w.round(4)  # task 0's loss halved, task 1's did not move: task 1 weighs more
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

    def init_extra(T, shared):
        del shared
        zeros = lambda: jnp.zeros((T,), jnp.float32)
        return {
            "epoch_sum": zeros(),
            "epoch_steps": zeros(),
            "last": zeros(),
            "before": zeros(),
            "epochs": jnp.zeros((), jnp.int32),
        }

    def weights_fn(ctx: build.Context):
        s, dtype, mask = ctx.state, ctx.dtype, ctx.mask
        losses = ctx.losses.astype(dtype)
        # Close the epoch that just ended (if any step was seen in it).
        steps = s.epoch_steps.astype(dtype)
        close = ctx.signals["new_epoch"] & jnp.any(steps > 0)
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
        }
        return w, extras

    method = build.Method(
        name,
        DWAState,
        weights_fn,
        init_extra=init_extra,
        gram=None,
        needs_losses=True,
        loss_weighting=True,
        head_scales=lambda ctx, w: w,
        signals=(_NEW_EPOCH,),
    )
    return build.aggregator(
        method, num_tasks=num_tasks, task_specific=task_specific, nonfinite=nonfinite
    )
