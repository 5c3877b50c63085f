"""Settings the whole suite relies on.

- Implicit rank promotion raises, so a (B,) + (B, 1) broadcasting slip fails loudly.
- Tests use float32 (the library's dtype) and typed keys from `jax.random.key`.
- Pattern for later tests: property tests are parametrized over a registry, assert
  shapes and finiteness with chex (`chex.assert_shape`, `chex.assert_tree_all_finite`),
  and run both jitted and not with `chex.variants(with_jit=True, without_jit=True)`.
"""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)
