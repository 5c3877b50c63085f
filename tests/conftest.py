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

- `@pytest.mark.early_start(command=...)` (see `EarlyRun`): the long end-to-end commands (the
  main job, the benchmark harness) start in the background as soon as collection ends, one
  after the other, and run beside the in-process tests (which keep about one of the
  machine's cores busy); their tests run last, wait for the command and check its outputs.
  The commands and the assertions are the same as running them in the test.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

FAST_COMPILE = "JAX_DISABLE_MOST_OPTIMIZATIONS"  # read by jax at import; a flag of each compilation
os.environ.setdefault(FAST_COMPILE, "1")

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


# ----------------------------------------------------------------------------- early starts


def compilation_cache_env(cache_dir: Path) -> dict[str, str]:
    """Environment for subprocesses that share a persistent JAX compilation cache in
    `cache_dir` (a fresh directory of this session): a program that one process compiled is
    loaded by the next instead of compiled again. Only for processes that run one after the
    other (a cache entry is written in place, so a concurrent reader could see half of it)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


class EarlyRun:
    """One command of an `early_start` test: `command(tmp)` returns the keyword arguments of
    `subprocess.Popen` (args, and optionally env, cwd) plus an optional `timeout` in seconds,
    for a fresh directory `tmp` the command may write to. stdout and stderr go to files in
    `tmp`; `result()` waits for the command and returns them as a `CompletedProcess`."""

    def __init__(self, command):
        self.tmp = Path(tempfile.mkdtemp(prefix="jaxdnn-early-"))
        spec = dict(command(self.tmp))
        self.timeout = spec.pop("timeout", None)
        self.spec = spec
        self.proc = None
        self.timed_out = False
        self.error = None  # what Popen raised, if it did
        self.scheduled = False  # handed to the background thread
        self.done = threading.Event()

    def run(self) -> None:
        """Runs the command to completion (or its timeout), unless the session is stopping."""
        try:
            with open(self.tmp / "stdout", "w") as out, open(self.tmp / "stderr", "w") as err:
                with _EARLY_LOCK:
                    if _EARLY_STOPPING.is_set():
                        return
                    try:  # a process group of its own: stop() ends the command's children too
                        self.proc = subprocess.Popen(**self.spec, stdin=subprocess.DEVNULL,
                                                     stdout=out, stderr=err, text=True,
                                                     process_group=0)
                    except OSError as e:
                        self.error = e
                        return
                try:
                    self.proc.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    self.timed_out = True
                    self.stop()
        finally:
            self.done.set()

    def result(self) -> subprocess.CompletedProcess:
        if not self.scheduled and not self.done.is_set():
            self.run()  # not started in the background: run it now
        self.done.wait()
        if self.error is not None:
            raise self.error
        if self.proc is None:
            raise RuntimeError(f"{self.spec['args']} was not started (session stopping)")
        stdout, stderr = ((self.tmp / name).read_text() for name in ("stdout", "stderr"))
        if self.timed_out:
            raise subprocess.TimeoutExpired(self.spec["args"], self.timeout, stdout, stderr)
        return subprocess.CompletedProcess(self.spec["args"], self.proc.returncode, stdout, stderr)

    def stop(self) -> None:
        """Kills the command and whatever it started (its process group), if still running."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


_EARLY: dict[str, EarlyRun] = {}  # nodeid -> its run
_EARLY_THREADS: list[threading.Thread] = []
_EARLY_LOCK = threading.Lock()  # no command starts once the session is stopping
_EARLY_STOPPING = threading.Event()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "early_start(command=...): start `command(tmp)` (Popen keyword arguments) in the "
                   "background when collection ends; the test runs last and gets it as the "
                   "`early_run` fixture")


def mnist_available() -> bool:
    from jaxdnn.data.mnist import FILES, default_data_dir

    return all((default_data_dir() / name).is_file() for name in FILES)


def pytest_collection_modifyitems(config, items):
    """Tests marked `mnist` skip, saying how to fetch it, where MNIST is not fetched (CI fetches it
    first, so there they run). Tests of early-started commands run last, in their start order,
    so the rest of the suite runs while the commands do."""
    if not mnist_available():
        skip = pytest.mark.skip(reason="needs MNIST: run `python -m jaxdnn.data fetch` first")
        for item in items:
            if item.get_closest_marker("mnist"):
                item.add_marker(skip)
    early = [item for item in items if item.get_closest_marker("early_start")]
    if early:
        items[:] = [item for item in items if item not in early] + early


def pytest_collection_finish(session):
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return  # nothing to run; or a pytest-xdist worker, which runs its commands when it gets their tests
    runs = []
    for item in session.items:
        marker = item.get_closest_marker("early_start")
        if marker is not None:
            _EARLY[item.nodeid] = EarlyRun(marker.kwargs["command"])
            _EARLY[item.nodeid].scheduled = True
            runs.append(_EARLY[item.nodeid])
    if runs:
        def run_all():
            for run in runs:
                run.run()

        thread = threading.Thread(target=run_all, name="early_start", daemon=True)
        _EARLY_THREADS.append(thread)
        thread.start()


def pytest_sessionfinish(session, exitstatus):
    with _EARLY_LOCK:
        _EARLY_STOPPING.set()
    for run in _EARLY.values():  # an interrupted session does not leave them running
        run.stop()
    for thread in _EARLY_THREADS:
        thread.join(timeout=30)
    if exitstatus == pytest.ExitCode.OK:  # otherwise kept for a look at what they wrote
        for run in _EARLY.values():
            shutil.rmtree(run.tmp, ignore_errors=True)


@pytest.fixture
def early_run(request) -> EarlyRun:
    run = _EARLY.get(request.node.nodeid)
    if run is None:
        marker = request.node.get_closest_marker("early_start")
        if marker is None:
            raise RuntimeError("the early_run fixture needs @pytest.mark.early_start(command=...)")
        run = _EARLY[request.node.nodeid] = EarlyRun(marker.kwargs["command"])
    return run
