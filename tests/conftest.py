"""Settings the whole suite relies on.

- XLA skips most optimizations (`JAX_DISABLE_MOST_OPTIMIZATIONS=1`: backend optimization
  level 0, as `--xla_backend_optimization_level=0`, and no expensive LLVM passes; set in the
  environment, so the CLI subprocesses inherit it): the suite is dominated by compiling many
  small programs once, and this halves compile time on CPU; results are the same
  computations. Unlike the XLA flag it is read at each compilation, so a test dominated by
  running what it compiled (thousands of steps) asks for the `optimized_xla` fixture instead:
  optimized code runs about 5x faster (the Langevin posterior-mean test: 3 s instead of 15 s
  per 800-step run).

- Implicit rank promotion raises, so a (B,) + (B, 1) broadcasting slip fails loudly.
- Tests use float32 (the library's dtype) and typed keys from `jax.random.key`.
- Pattern for later tests: property tests are parametrized over a registry, assert
  shapes and finiteness with chex (`chex.assert_shape`, `chex.assert_tree_all_finite`),
  and run both jitted and not with `chex.variants(with_jit=True, without_jit=True)`.

- Marks: `slow` (more than a few seconds; `python -m pytest -m "not slow"` is the fast loop) and
  `mnist` (needs the real MNIST files; skipped with a note where they are not fetched).

- Two workers (`-n 2 --dist loadfile --no-loadscope-reorder` in pyproject.toml, pytest-xdist):
  each test file runs whole on one worker (its module fixtures are built once), handed out in
  collection order, which `LONGEST_FIRST` sets: the longest files start first and the short ones
  fill in at the end (xdist's own order, by test count, left the one-test end-to-end files for
  last: 321 s instead of ~260). `-n 0` runs everything in this process (for a debugger or `--pdb`).
"""

import os
from pathlib import Path

FAST_COMPILE = "JAX_DISABLE_MOST_OPTIMIZATIONS"  # read by jax at import; a flag of each compilation
os.environ.setdefault(FAST_COMPILE, "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # on a GPU, the two workers share it

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def optimized_xla():
    """XLA optimizes what the test compiles (the suite's default skips most optimizations)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def compilation_cache_env(cache_dir: Path) -> dict[str, str]:
    """Environment for subprocesses that share a persistent JAX compilation cache in
    `cache_dir` (a fresh directory of this test): a program that one process compiled is
    loaded by the next instead of compiled again. Only for processes that run one after the
    other (a cache entry is written in place, so a concurrent reader could see half of it)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def mnist_available() -> bool:
    from jaxdnn.data.mnist import FILES, default_data_dir

    return all((default_data_dir() / name).is_file() for name in FILES)


# Files by their summed test seconds on 2 cores (`python -m pytest --durations=0`, the whole suite,
# measured beside a background job that took about one core): 300, 245, 235, 202, 185, 160, 130,
# 128, 91, 84, 69, 64.
LONGEST_FIRST = ("test_flows.py", "test_hw10.py", "test_conditional_mean.py", "test_inpainting.py", "test_train.py",
                 "test_benchmarks.py", "test_distributed.py", "test_posterior.py", "test_inpaint_outputs.py",
                 "test_readme.py", "test_gamblers_ruin.py", "test_notebook.py")


def pytest_collection_modifyitems(config, items):
    """Tests marked `mnist` skip, saying how to fetch it, where MNIST is not fetched (CI fetches it
    first, so there they run). The longest files come first: the workers take files in this order
    (`--no-loadscope-reorder`; xdist's default order, by test count, put the one-test end-to-end
    files last), so the short ones fill in at the end and both finish together."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if not mnist_available():
        skip = pytest.mark.skip(reason="needs MNIST: run `python -m jaxdnn.data fetch` first")
        for item in items:
            if item.get_closest_marker("mnist"):
                item.add_marker(skip)
