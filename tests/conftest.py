"""Settings the whole suite relies on.

- XLA compiles with `--xla_backend_optimization_level=0` (appended to XLA_FLAGS, inherited
  by the CLI subprocesses): the suite is dominated by compiling many small programs once,
  and this halves compile time on CPU; results are the same computations.

- Implicit rank promotion raises, so a (B,) + (B, 1) broadcasting slip fails loudly.
- Tests use float32 (the library's dtype) and typed keys from `jax.random.key`.
- Pattern for later tests: property tests are parametrized over a registry, assert
  shapes and finiteness with chex (`chex.assert_shape`, `chex.assert_tree_all_finite`),
  and run both jitted and not with `chex.variants(with_jit=True, without_jit=True)`.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):  # read when the backend starts, not at import
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)
