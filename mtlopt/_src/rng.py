"""PRNG keys for random methods: an int seed or a key array, stored as raw key data."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtlopt._src import checks


def key_data(name: str, seed: Any) -> jax.Array:
    """Raw uint32 key data from an int seed, a typed key or raw key data (vmap-friendly)."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return jax.random.key_data(jax.random.key(seed))
    if isinstance(seed, (jax.Array,)) or hasattr(seed, "dtype"):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            if seed.shape != ():
                raise checks.fail(name, f"seed must be a single PRNG key; got shape {seed.shape}.")
            return jax.random.key_data(seed)
        if seed.dtype == jnp.uint32 and seed.shape == (2,):
            return jnp.asarray(seed)
        if jnp.issubdtype(seed.dtype, jnp.integer) and seed.shape == ():
            return jax.random.key_data(jax.random.key(seed))
    raise checks.fail(name, f"seed must be an int or a PRNG key; got {seed!r}.")


def wrap(data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(data)
