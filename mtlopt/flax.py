"""Flax glue: task grads of an ``nnx.Module``, and a linen ``TrainState`` that forwards extras.

The one module of mtlopt that imports Flax (``pip install "mtlopt[examples]"``); ``import
mtlopt`` never does. What Flax cannot do as it is:

* ``nnx``: :func:`task_value_and_grad` is ``nnx.value_and_grad`` for a function that returns
  the ``(T,)`` task losses: one forward pass (which updates BatchNorm statistics, Dropout's RNG
  counts and any other non-differentiated state of the module once, as ``nnx.value_and_grad``
  does) and T backward passes. The task grads it returns go straight into
  ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, task_grads, task_losses=losses)``,
  which already forwards extra arguments to ``tx.update``.
* linen: ``flax.training.train_state.TrainState.apply_gradients`` calls ``tx.update`` without
  extra arguments, so methods that read ``task_losses`` (DB-MTL, FAMO, ...) or ``task_mask``
  cannot run through it. :class:`TrainState` adds :meth:`TrainState.apply_task_gradients`.

Heads chosen by path for ``task_specific=``: :func:`mtlopt.by_path` (no Flax needed; it reads
``nnx.State`` and linen params alike).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

try:
    from flax import nnx
    from flax.training import train_state as _train_state
except ImportError as e:  # pragma: no cover - exercised by tests/test_flax_glue.py
    raise ImportError(
        "mtlopt.flax needs Flax, which is not installed (it is an optional extra of mtlopt): "
        'pip install "mtlopt[examples]" (or pip install flax).'
    ) from e

import jax
import jax.numpy as jnp
import optax

from mtlopt._src import grad as _grad

try:  # Flax's fp8 training keeps its scales in this collection (see TrainState)
    from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
except ImportError:  # pragma: no cover - older Flax
    OVERWRITE_WITH_GRADIENT = "_overwrite_with_gradient"

__all__ = ["TrainState", "task_value_and_grad"]

# In Flax 0.12 a State holds the module's Variable objects themselves, and nnx.merge reuses
# them: a forward pass inside the backward pass's trace then cannot write to them (BatchNorm:
# TraceContextError), so merge copies them, where it has ``copy=``.
_COPY = {"copy": True} if "copy" in inspect.signature(nnx.merge).parameters else {}


def task_value_and_grad(
    fun: Callable[..., Any], *, wrt: Any = nnx.Param, has_aux: bool = False
) -> Callable[..., Any]:
    """``nnx.value_and_grad`` for a ``fun(module, *args)`` that returns the ``(T,)`` task losses.

    The returned function takes the same arguments as ``fun`` and gives ``(losses,
    task_grads)`` (``((losses, aux), task_grads)`` with ``has_aux``): ``task_grads`` is an
    ``nnx.State`` of the module's variables selected by ``wrt`` (its ``nnx.Param``s by default),
    every leaf with a leading task axis of size T, row t the gradient of ``losses[t]``. Pass it
    to ``nnx.Optimizer(model, tx, wrt=...).update(model, task_grads, task_losses=losses)``.

    It is :func:`mtlopt.task_value_and_grad` (one forward pass, T backward passes batched with
    ``jax.vmap``) on the module split by ``nnx.split(module, wrt, ...)``. The rest of the
    module's state (BatchNorm's running statistics, Dropout's and other RNG counts, sown
    intermediates) is what the one forward pass left, written back into the module once, as
    ``nnx.value_and_grad`` does. (Calling :func:`mtlopt.task_value_and_grad` on the module
    itself differentiates every variable and drops those updates: the batch statistics never
    move and Dropout draws the same mask every step.)

    Only the first argument is treated as a module; the others are passed through as they are.
    Works under ``nnx.jit``, and under ``jax.jit`` on the module's split state.

    Args:
      fun: ``fun(module, *args, **kwargs)`` returning a 1-D array of task losses (and an aux
        value with ``has_aux``).
      wrt: an ``nnx`` filter: the variables to differentiate (``nnx.Param`` by default; the
        same filter as the optimizer's ``wrt``).
      has_aux: whether ``fun`` returns ``(losses, aux)``.

    Returns:
      A function of ``(module, *args, **kwargs)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import mtlopt.flax
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> def task_losses(m, x):
      ...     return jnp.mean(m(x) ** 2, axis=0)  # output t is task t
      >>> losses, task_grads = mtlopt.flax.task_value_and_grad(task_losses)(model, jnp.ones((4, 3)))
      >>> losses.shape, task_grads["kernel"].shape
      ((2,), (2, 3, 2))
    """

    # (nnx.split's result is typed as a variadic tuple: its three parts, unpacked, are not.)
    def wrapped(module: Any, *args: Any, **kwargs: Any) -> Any:
        graphdef, diff, rest = nnx.split(module, wrt, ...)  # type: ignore[misc]

        def pure(diff_state: Any) -> Any:
            # Fresh Variables, made inside the backward pass's trace (it may write to them).
            inner = nnx.merge(graphdef, diff_state, rest, **_COPY)
            out = fun(inner, *args, **kwargs)
            losses, aux = out if has_aux else (out, None)
            _, _, new_rest = nnx.split(inner, wrt, ...)  # type: ignore[misc]
            return losses, (aux, new_rest)

        (losses, (aux, new_rest)), task_grads = _grad.task_value_and_grad(pure, has_aux=True)(diff)
        nnx.update(module, new_rest)
        return ((losses, aux), task_grads) if has_aux else (losses, task_grads)

    return wrapped


class TrainState(_train_state.TrainState):
    """``flax.training.train_state.TrainState`` with :meth:`apply_task_gradients`.

    Flax's ``apply_gradients(grads=...)`` calls ``tx.update(grads, opt_state, params)`` with no
    extra arguments, so a method that reads ``task_losses`` (DB-MTL, FAMO, UW, ...), a
    ``task_mask`` or another signal cannot run through it. This subclass is created and used
    as Flax's (``TrainState.create(apply_fn=..., params=..., tx=...)``; ``apply_gradients`` is
    unchanged) and adds :meth:`apply_task_gradients`.

    Examples:
      >>> import jax.numpy as jnp, optax, mtlopt
      >>> import mtlopt.flax
      >>> tx = optax.chain(mtlopt.db_mtl(num_tasks=2), optax.sgd(0.1))
      >>> state = mtlopt.flax.TrainState.create(
      ...     apply_fn=None, params={"w": jnp.ones(3)}, tx=tx)
      >>> state = state.apply_task_gradients(
      ...     task_grads={"w": jnp.ones((2, 3))}, task_losses=jnp.array([1.0, 2.0]))
      >>> int(state.step)
      1
    """

    def apply_task_gradients(self, *, task_grads: Any, **extra_args: Any) -> TrainState:
        """One step from task grads: ``tx.update(task_grads, opt_state, params, **extra_args)``.

        Every keyword argument besides ``task_grads`` goes to ``tx.update`` (``task_losses``,
        ``task_mask``, ``losses_after``, ...). Like ``apply_gradients``, it applies the update,
        counts the step and returns a new state; change other fields (e.g. ``batch_stats``)
        with ``.replace(...)`` on the result. Pure: works under ``jax.jit`` with the state
        donated.

        Flax's fp8 layers keep their scales and amax histories in the params' collection
        ``OVERWRITE_WITH_GRADIENT``, whose "gradient" is their new value. With task grads each
        task's backward pass gives its own (the input side's rows are equal; the gradient
        side's amax differs per task), so as in ``apply_gradients`` that collection bypasses
        ``tx`` and takes the largest over the tasks: the amax of every task's gradient, which
        the one scale shared by the T backward passes of the next step must cover (Flax's fp8
        meta dtype sums cotangents by the same max).

        Args:
          task_grads: the task grads (every leaf ``(T, *param_shape)``), as
            :func:`mtlopt.task_value_and_grad` gives them for ``self.params``.
          **extra_args: the extra arguments of ``tx.update``.

        Returns:
          The new state: ``step + 1``, new ``params`` and ``opt_state``.
        """
        owg = _has_owg(task_grads)
        grads, params = task_grads, self.params
        if owg:
            grads, params = task_grads["params"], self.params["params"]
        updates, opt_state = self.tx.update(grads, self.opt_state, params, **extra_args)
        new_params = optax.apply_updates(params, updates)
        if owg:
            meta = jax.tree.map(lambda g: jnp.max(g, axis=0), task_grads[OVERWRITE_WITH_GRADIENT])
            new_params = {"params": new_params, OVERWRITE_WITH_GRADIENT: meta}
        return self.replace(step=self.step + 1, params=new_params, opt_state=opt_state)


def _has_owg(tree: Any) -> bool:
    return isinstance(tree, Mapping) and OVERWRITE_WITH_GRADIENT in tree
