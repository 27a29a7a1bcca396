"""Gradient diagnostics a training loop can log every step: per-task gradient norms, pairwise
cosines and the number of conflicting pairs, from the Gramian.

:func:`with_diagnostics` keeps them in the state of any transformation. An mtlopt aggregator
hands over the Gramian of pass 1 when it has one of the task grads as they came (CAGrad, MGDA,
UPGrad, ...): no extra pass. Otherwise (loss weightings, DB-MTL, whose Gramian is that of its
EMA, per-coordinate methods, steps between periodic refreshes) the aggregator computes the
Gramian once more over its shared leaves (one read of the task grads), and a transformation
that is not an mtlopt aggregator gets the Gramian of all leaves from the wrapper itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mtlopt._src import build, checks, inspect, tree


class Diagnostics(NamedTuple):
    """Per-step gradient diagnostics.

    Attributes:
      norms: ``(T,)`` the norm of each task's gradient.
      cosines: ``(T, T)`` the cosine of every pair of task gradients (1 on the diagonal; 0
        where either gradient is zero).
      conflicts: int32 scalar, the number of pairs ``s < t`` whose cosine is negative.
    """

    norms: jax.Array
    cosines: jax.Array
    conflicts: jax.Array


class DiagnosticsState(NamedTuple):
    """The state of :func:`with_diagnostics`: the wrapped state and the last diagnostics."""

    inner_state: Any
    diagnostics: Diagnostics


def diagnostics(gramian: jax.Array, scale: Any = 1.0) -> Diagnostics:
    """Norms, cosines and the conflict count of task gradients, from their ``(T, T)`` Gramian.

    Args:
      gramian: ``G[s, t] = <g_s, g_t>`` (:func:`mtlopt.gramian`), or a pre-scaled one.
      scale: the true Gramian is ``gramian * scale**2`` (for Gramians pre-scaled against over-
        or underflow; the norms are multiplied by ``scale``, the cosines do not change).

    Returns:
      a :class:`Diagnostics`. A non-finite Gramian gives non-finite entries (NaN gradients
      show as NaN), never an error.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]])}
      >>> d = mtlopt.diagnostics(mtlopt.gramian(g))
      >>> d.norms
      Array([1.       , 1.4142135, 2.       ], dtype=float32)
      >>> d.cosines[0]
      Array([ 1.        , -0.70710677,  0.        ], dtype=float32)
      >>> d.conflicts
      Array(1, dtype=int32)
    """
    gramian = jnp.asarray(gramian)
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise checks.fail("diagnostics", f"expected a (T, T) Gramian; got shape {gramian.shape}.")
    if not jnp.issubdtype(gramian.dtype, jnp.floating):
        gramian = gramian.astype(jnp.float32)
    root = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0))
    # Where the diagonal is not finite, the norm shows it (NaN or inf), not a clamped value.
    root = jnp.where(jnp.isfinite(jnp.diagonal(gramian)), root, jnp.diagonal(gramian))
    pos = root > 0
    inv = jnp.where(pos, 1.0 / jnp.where(pos, root, 1.0), 0.0)
    cos = jnp.clip(gramian * inv[:, None] * inv[None, :], -1.0, 1.0)
    cos = jnp.where(jnp.isnan(gramian), jnp.nan, cos)
    T = gramian.shape[0]
    cos = jnp.where(jnp.eye(T, dtype=bool), jnp.where(pos, 1.0, 0.0), cos)
    cos = jnp.where(jnp.isfinite(jnp.diagonal(gramian))[:, None], cos, jnp.nan)
    upper = jnp.triu(jnp.ones((T, T), dtype=bool), k=1)
    conflicts = jnp.sum(upper & (cos < 0)).astype(jnp.int32)
    norms = root * jnp.asarray(scale, root.dtype)
    return Diagnostics(lax.stop_gradient(norms), lax.stop_gradient(cos), conflicts)


def with_diagnostics(
    tx: optax.GradientTransformation, num_tasks: int
) -> optax.GradientTransformationExtraArgs:
    """Wraps a transformation so that its state keeps the diagnostics of the last task grads.

    ``tx`` is an mtlopt aggregator or a chain that holds one (``optax.chain(mtlopt.cagrad(),
    optax.adam(1e-3))``); the updates are those of ``tx``, unchanged. After each update the
    state holds a :class:`Diagnostics` of the task grads it received (over the shared leaves:
    task-specific heads are left out), read with :func:`task_diagnostics`.

    Cost: none where the aggregator's own Gramian is that of the task grads as they came (the
    Gramian methods); one more read of the task grads otherwise (loss weightings, DB-MTL,
    per-coordinate methods, periodic refreshes). Task transforms in front (``log_transform``)
    do not change the diagnostics: they describe the gradients of the losses themselves.

    Where ``tx`` is not an mtlopt aggregator, or runs one under control flow (as
    :func:`mtlopt.accumulate` does), the wrapper computes the Gramian itself, over every leaf
    (heads included): put ``with_diagnostics`` inside ``accumulate``, around the method's chain,
    to describe the accumulated task grads from the method's own Gramian. (The aggregator hands
    its Gramian over at trace time; a wrapper of your own that calls it under ``lax.cond`` or
    ``lax.scan`` must not pass on the private extra argument ``_mtlopt_diagnostics``.)

    Masked tasks (``task_mask``) show zero norms and cosines. On a step that the aggregator
    skips for non-finite inputs, the diagnostics show the bad values (NaN); the next good step
    overwrites them. In the loss-only mode (:func:`mtlopt.loss_weights`) there are no task
    grads: the diagnostics are kept as they were.

    Args:
      tx: the transformation to wrap.
      num_tasks: T (the diagnostics' shapes are fixed at ``init``).

    Examples:
      >>> import jax.numpy as jnp, optax, mtlopt
      >>> tx = mtlopt.with_diagnostics(optax.chain(mtlopt.mgda(), optax.sgd(0.1)), num_tasks=2)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([[3.0, 0.0], [-1.0, 1.0]])}, state)
      >>> d = mtlopt.task_diagnostics(state)
      >>> d.norms, d.conflicts
      (Array([3.       , 1.4142135], dtype=float32), Array(1, dtype=int32))
    """
    name = "with_diagnostics"
    T = checks.positive_int(name, "num_tasks", num_tasks)
    if T is None:
        raise checks.fail(name, "num_tasks is required (it fixes the diagnostics' shapes).")
    tx = optax.with_extra_args_support(tx)

    def init_fn(params: Any) -> DiagnosticsState:
        dtype = tree.acc_dtype(*(jnp.result_type(x) for x in jax.tree.leaves(params)))
        empty = Diagnostics(
            jnp.zeros((T,), dtype), jnp.zeros((T, T), dtype), jnp.zeros((), jnp.int32)
        )
        return DiagnosticsState(tx.init(params), empty)

    def update_fn(
        updates: Any, state: DiagnosticsState, params: Any = None, **extra: Any
    ) -> tuple[Any, DiagnosticsState]:
        box: dict = {}
        new_updates, inner = tx.update(
            updates, state.inner_state, params, **extra, **{build.CAPTURE: box}
        )
        grads, _ = tree.unwrap(updates)
        if grads is None:
            return new_updates, DiagnosticsState(inner, state.diagnostics)
        n = checks.num_tasks(name, grads, expected=T)
        del n
        d = None
        if "gramian" in box:
            d = diagnostics(*box["gramian"])
        if d is None:
            d = diagnostics(*_gramian(grads, extra.get("task_mask")))
        d = jax.tree.map(lambda new, old: new.astype(old.dtype), d, state.diagnostics)
        return new_updates, DiagnosticsState(inner, d)

    # (update_fn's state is typed as this state class; optax's protocol types it as any pytree.)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # type: ignore[arg-type]


def _gramian(grads: Any, task_mask: Any) -> tuple[jax.Array, jax.Array]:
    """The Gramian of every leaf (a transformation that is not an mtlopt aggregator), with a
    power-of-two pre-scale where float32 would over- or underflow; masked rows zeroed."""
    leaves = [tree.as_matrix(x) for x in jax.tree.leaves(grads)]
    if task_mask is not None:
        leaves = tree.select_tasks(jnp.asarray(task_mask, bool), leaves)
    T = leaves[0].shape[0]
    cdt = tree.acc_dtype(*(x.dtype for x in leaves))
    gram, scale = build._pass_one("full", [leaves], T, cdt)
    return gram[0], scale[0]


def task_diagnostics(opt_state: Any) -> Diagnostics | None:
    """The :class:`Diagnostics` kept by :func:`with_diagnostics`, found anywhere in a state.

    Searches ``opt_state`` (a chain, a wrapper, a Flax ``nnx.Optimizer``'s ``opt_state``)
    breadth-first, as :func:`mtlopt.task_weights` does; ``None`` where no state keeps them.

    Args:
      opt_state: an optimizer state that holds a :func:`with_diagnostics` state anywhere.
    """
    for node in inspect.nodes(opt_state):
        if isinstance(node, DiagnosticsState):
            return Diagnostics(*(inspect._unwrap(x) for x in node.diagnostics))
    return None
