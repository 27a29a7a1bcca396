"""The Gramian route: a method's weights from a ``(T, T)`` Gramian, without the task grads.

For large models, holding T full gradients may not fit. Every Gramian method's weights depend
on the task gradients only through their Gramian, so any Gramian can stand in: e.g. that of
the gradients with respect to the shared representation (Sener & Koltun's MGDA-UB), or one
accumulated over chunks of the parameters. Then one weighted backward pass,
``grad(sum_t w_t * loss_t)``, updates the whole model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtlopt._src import checks
from mtlopt._src.inspect import task_weights


def weights_from_gramian(
    tx: optax.GradientTransformationExtraArgs,
    gramian: jax.Array,
    state: Any = None,
    **extra_args: Any,
) -> tuple[jax.Array, Any]:
    """The weights that aggregator ``tx`` gives task gradients with this Gramian.

    ``tx`` must be a Gramian method (``mean``, ``linear``, ``cagrad``, ``mgda``, ``pcgrad``,
    ``upgrad``, ``dualproj``, ``imtl_g``, ``nash_mtl``, ``aligned_mtl``, ``config``,
    ``gradvac``, ``krum``, ``ntkmtl``) built with ``num_tasks``, so that its state keeps the
    weights. It is run on a ``(T, T)``
    factor ``L`` with ``L L^T = gramian`` (from an eigendecomposition, negative eigenvalues
    of a noisy Gramian clamped to 0): same Gramian, same weights.

    Args:
      tx: the aggregator.
      gramian: ``(T, T)`` symmetric positive semi-definite.
      state: ``tx``'s state from the previous call (warm starts, PRNG key); ``None`` builds a
        fresh one. Not the state of ``tx`` used on real task grads (its shapes differ).
      **extra_args: passed to ``tx.update`` (``task_losses``, ``task_mask``).

    Returns:
      ``(weights, new_state)``: use ``weights`` in ``sum_t weights[t] * loss_t`` (with
      ``jax.lax.stop_gradient``) and differentiate once.

    Examples:
      >>> import jax.numpy as jnp, mtlopt
      >>> G = jnp.array([[1.0, 0.0], [0.0, 4.0]])
      >>> w, state = mtlopt.weights_from_gramian(mtlopt.mgda(num_tasks=2), G)
      >>> w.round(3)
      Array([0.8, 0.2], dtype=float32)
    """
    G = jnp.asarray(gramian, jnp.float32)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise checks.fail(
            "weights_from_gramian", f"gramian must be a square (T, T) matrix; got shape {G.shape}."
        )
    T = G.shape[0]
    G = 0.5 * (G + G.T)
    # Factored as D L_u with L_u L_u^T the unit-diagonal G / (n n^T) (n the norms): eigh of G
    # itself loses the small entries of badly scaled Gramians (measured: 6% of them with one
    # task 1000x larger; 2e-7 this way).
    n = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
    inv = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
    lam, V = jnp.linalg.eigh((G * inv[:, None]) * inv[None, :])
    factor = {"gramian_factor": n[:, None] * (V * jnp.sqrt(jnp.maximum(lam, 0.0))[None, :])}
    if state is None:
        state = tx.init({"gramian_factor": jnp.zeros((T,), jnp.float32)})
    _, new_state = tx.update(factor, state, **extra_args)
    w = task_weights(new_state)
    if w is None:
        raise checks.fail(
            "weights_from_gramian",
            "tx keeps no weights: build it with "
            f"num_tasks={T} (e.g. mtlopt.cagrad(num_tasks={T})).",
        )
    return w, new_state
