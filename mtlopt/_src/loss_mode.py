"""``loss_weights``: a loss-weighting method's weights before the backward pass."""

from __future__ import annotations

from typing import Any, cast

import jax
import optax


def loss_weights(
    tx: optax.GradientTransformationExtraArgs,
    task_losses: jax.Array,
    state: Any,
    **extra_args: Any,
) -> tuple[jax.Array, Any]:
    """The ``(T,)`` weights of a loss-weighting method, and its new state, from the losses alone.

    For methods whose weights depend only on the losses (``mean``, ``linear``, ``dwa``, ...):
    compute them before the backward pass and differentiate ``sum_t w_t l_t`` once, instead of
    running T backward passes for the task grads. The same method as a transformation over
    task grads gives the same update (heads included: each gets its task's weight). ``tx`` is
    the method itself (not a chain); ``state`` is its state (``tx.init(params)`` or
    ``tx.init(None)``). The weights are constants (``stop_gradient``); on a step with non-finite
    losses they are zeros (``nonfinite="skip"``) or NaN, and the state is left as it was.

    Methods that need the task gradients (the Gramian methods) raise a ``ValueError``: for them
    see :func:`mtlopt.weights_from_gramian`.

    Args:
      tx: the loss-weighting method (not a chain).
      task_losses: ``(T,)``, this step's task losses (pass them through
        ``jax.lax.stop_gradient`` inside a differentiated function).
      state: ``tx``'s state (from ``tx.init`` or the previous call).
      **extra_args: the method's extra arguments (``task_mask``, ``new_epoch``, ...).

    Returns:
      ``(weights, new_state)``.

    Examples:
      >>> import jax, jax.numpy as jnp, mtlopt
      >>> tx = mtlopt.linear([1.0, 0.5])
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> def task_losses(p):
      ...     return jnp.stack([jnp.sum(p["w"] ** 2), jnp.sum(p["w"])])
      >>> def total(p, state):
      ...     losses = task_losses(p)
      ...     w, state = mtlopt.loss_weights(tx, jax.lax.stop_gradient(losses), state)
      ...     return w @ losses, state
      >>> grads, state = jax.grad(total, has_aux=True)(params, tx.init(params))
      >>> grads["w"]  # 1.0 * 2w + 0.5 * 1: one backward pass
      Array([2.5, 4.5], dtype=float32)
    """
    # optax's update protocol has no None for the updates (mtlopt's loss-only mode), and it
    # types what comes back as pytrees: here the weights and the state.
    out = tx.update(None, state, task_losses=task_losses, **extra_args)  # type: ignore[arg-type]
    return cast("tuple[jax.Array, Any]", out)
