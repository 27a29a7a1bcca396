"""Strict JAX settings for the whole suite, and hypothesis profiles (derandomized in CI)."""

import os

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

try:
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40)
    settings.register_profile("dev", deadline=None, max_examples=40)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # hypothesis is in the test extra; tests that need it import it
    pass


@pytest.fixture(autouse=True)
def _no_x64_leak():
    yield
    assert not jax.config.jax_enable_x64, "a test left jax_enable_x64 on"
