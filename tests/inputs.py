"""Task-grad inputs for the shared suite: pytrees with a leading task axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"a": (3, 4), "b": (5,), "c": {"d": (2,), "e": ()}}
SIZE = 12 + 5 + 2 + 1


def params(dtype=jnp.float32):
    return jax.tree.map(
        lambda s: jnp.zeros(s, dtype), SHAPES, is_leaf=lambda x: isinstance(x, tuple)
    )


def from_matrix(J, dtype=jnp.float32):
    """Splits a (T, SIZE) matrix into the SHAPES pytree (rows = tasks)."""
    J = jnp.asarray(J)
    T = J.shape[0]
    leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    out, start = [], 0
    for shape in leaves:
        n = int(np.prod(shape))
        out.append(J[:, start : start + n].reshape((T, *shape)).astype(dtype))
        start += n
    return jax.tree.unflatten(treedef, out)


def host_tree(J, dtype=np.float32):
    """``from_matrix`` on the host: numpy leaves (no eager JAX op, so nothing compiles)."""
    J = np.asarray(J)
    leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    out, start = [], 0
    for shape in leaves:
        n = int(np.prod(shape))
        out.append(J[:, start : start + n].reshape((J.shape[0], *shape)).astype(dtype))
        start += n
    return jax.tree.unflatten(treedef, out)


def to_matrix(tree):
    """Flattens an update (params-shaped) or task grads (leading T) pytree to a vector/matrix."""
    leaves = jax.tree.leaves(tree)
    if leaves[0].ndim == len(jax.tree.leaves(SHAPES, is_leaf=lambda x: isinstance(x, tuple))[0]):
        return jnp.concatenate([x.reshape(-1) for x in leaves])
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)


def flat(update):
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(update)])


def random_matrix(T, seed=0, size=SIZE, conflict=True):
    rng = np.random.default_rng(seed)
    J = rng.normal(size=(T, size)).astype(np.float32)
    if conflict and T >= 2:
        J[1] = -0.7 * J[0] + 0.3 * J[1]
    return J


def losses(T, seed=0):
    return jnp.asarray(np.random.default_rng(seed + 100).uniform(0.5, 2.0, T), jnp.float32)
