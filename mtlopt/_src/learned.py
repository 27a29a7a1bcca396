"""Per-task parameters learned inside ``update``: UW's log-variances, IMTL-L's scales,
GradNorm's weights, FAMO's logits.

The papers train these beside the model, with the model's optimizer (UW, IMTL-L, GradNorm) or
one of their own (FAMO: Adam, lr 0.025, weight decay 1e-3). Here each method owns an optax
optimizer for its ``(T,)`` parameters and keeps the optimizer's state in its own state, so the
whole step stays in the jitted ``update``: nothing on the host, nothing for the user to wire.

Usage in a method (see ``mtlopt/_src/methods/``)::

    opt = learned.optimizer(name, learning_rate, optimizer)   # at construction
    init_extra: {"log_vars": v0, "opt_state": opt.init(v0)}   # learned.init(opt, v0)
    weights_fn: v, os = learned.step(opt, grad, state.log_vars, state.opt_state, ctx.mask)

Masked tasks keep their value and their entries of the optimizer's state (every leaf whose
leading axis is T: Adam's moments); scalar leaves (Adam's step count) advance. On a skipped step
the skeleton restores the whole state, the optimizer's included.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import optax

from mtlopt._src import checks


def optimizer(
    name: str, learning_rate: Any, optimizer: Any, default: Any = None
) -> optax.GradientTransformation:
    """The optimizer of a method's learned parameters: ``optimizer`` if given (any optax
    transformation, e.g. ``optax.sgd(0.1)``), else ``default(learning_rate)`` (``optax.adam``
    unless the method says otherwise). ``learning_rate`` may be traced
    (``optax.inject_hyperparams``)."""
    if optimizer is not None:
        if not isinstance(optimizer, optax.GradientTransformation):
            raise checks.fail(
                name,
                "optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-3)); got "
                f"{type(optimizer).__name__}.",
            )
        return optimizer
    learning_rate = checks.nonnegative(name, "learning_rate", learning_rate)
    return (optax.adam if default is None else default)(learning_rate)


def init(opt: optax.GradientTransformation, value: jax.Array) -> tuple[jax.Array, Any]:
    """``(value, opt.init(value))`` as fresh float32 arrays."""
    value = jnp.array(value, jnp.float32, copy=True)
    return value, opt.init(value)


def step(
    opt: optax.GradientTransformation,
    grad: jax.Array,
    value: jax.Array,
    opt_state: Any,
    mask: jax.Array,
) -> tuple[jax.Array, Any]:
    """One step of ``opt`` on the ``(T,)`` parameters ``value`` from the gradient ``grad`` of
    the method's objective: ``(new value, new optimizer state)``. Masked tasks (``mask``
    False) keep their value and their rows of the optimizer's state; with no task active the
    optimizer's state is left as it was."""
    T = value.shape[0]
    grad = jnp.where(mask, grad, 0.0).astype(value.dtype)
    # optax's transformations (Adam's bias correction: a float to an int power) are written
    # for the standard promotion rules: trace them so under jax_numpy_dtype_promotion="strict".
    with jax.numpy_dtype_promotion("standard"):
        updates, new_state = opt.update(grad, opt_state, value)
    new_value = jnp.where(mask, value + cast(jax.Array, updates).astype(value.dtype), value)

    def keep(new: Any, old: Any) -> jax.Array:
        new = jnp.asarray(new).astype(jnp.result_type(old))
        if jnp.ndim(old) >= 1 and jnp.shape(old)[0] == T:
            return jnp.where(mask.reshape((T,) + (1,) * (jnp.ndim(old) - 1)), new, old)
        return new

    new_state = jax.tree.map(keep, new_state, opt_state)
    # A step with no active task is no step (Adam's count does not advance).
    anyone = jnp.any(mask)
    new_state = jax.tree.map(lambda n, o: jnp.where(anyone, n, o), new_state, opt_state)
    return new_value, new_state
