"""More than one process: start JAX's multi-controller runtime, read results on the host, and
let process 0 alone speak. One code path for 1 or N processes: without a coordinator nothing is
started and every helper is the single-process identity.

    python -m experiments.gamblers_ruin ... --coordinator HOST:PORT --num-processes N --process-id I

or the same from the environment (JAXDNN_COORDINATOR, JAXDNN_NUM_PROCESSES, JAXDNN_PROCESS_ID,
JAXDNN_INIT_TIMEOUT), or `--cluster auto` for the cluster detection `jax.distributed.initialize`
has (SLURM, Open MPI). `initialize` must run before anything touches a JAX backend. A peer that
never comes ends the process with one clear line and exit status 1 when `--init-timeout`
seconds are up (JAX itself would abort with a core dump after its own timeout). Once started,
native code's output on stdout goes to stderr, so `--json` still prints one object on stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading

import jax
import numpy as np

__all__ = ["add_arguments", "from_every_process", "gather", "initialize", "initialize_from_args", "is_main",
           "process_share"]

ENV = {"coordinator": "JAXDNN_COORDINATOR", "num_processes": "JAXDNN_NUM_PROCESSES",
       "process_id": "JAXDNN_PROCESS_ID", "init_timeout": "JAXDNN_INIT_TIMEOUT"}
DEFAULT_TIMEOUT = 300
_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags every experiment CLI takes (all optional)."""
    g = parser.add_argument_group("more than one process (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help=f"process 0's address (env {ENV['coordinator']})")
    g.add_argument("--num-processes", type=int, metavar="N", help=f"processes in all (env {ENV['num_processes']})")
    g.add_argument("--process-id", type=int, metavar="I", help=f"this process, 0..N-1 (env {ENV['process_id']})")
    g.add_argument("--init-timeout", type=float, metavar="SECONDS",
                   help=f"wait this long for every peer (default {DEFAULT_TIMEOUT}; env {ENV['init_timeout']})")
    g.add_argument("--cluster", choices=("auto",), help="let JAX detect a SLURM / Open MPI job")


def _setting(value, name: str, cast):
    if value is None and os.environ.get(ENV[name], "") != "":
        text = os.environ[ENV[name]]
        try:
            value = cast(text)
        except ValueError:
            raise ValueError(f"{ENV[name]}={text!r} is not a valid {cast.__name__}") from None
    return value


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               init_timeout: float | None = None, cluster: str | None = None, *,
               native_stdout_to_stderr: bool = False) -> bool:
    """Starts the multi-process runtime when a coordinator (argument or environment) or
    `cluster="auto"` is given; returns whether it did. Raises ValueError for bad values.
    `native_stdout_to_stderr` (the CLIs ask for it, so `--json` stays one object on stdout)
    sends what native code prints on file descriptor 1 to stderr for the rest of the process.
    A peer that never joins ends the process with exit status 1 after `init_timeout` (JAX
    would abort with a core dump)."""
    coordinator = _setting(coordinator, "coordinator", str)
    num_processes = _setting(num_processes, "num_processes", int)
    process_id = _setting(process_id, "process_id", int)
    timeout = _setting(init_timeout, "init_timeout", float)
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if coordinator is None and cluster is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT (or --cluster auto)")
        return False
    if not timeout > 0:
        raise ValueError(f"--init-timeout must be > 0 seconds, got {timeout}")
    if coordinator is not None:
        if not _ADDRESS.match(coordinator):
            raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num-processes N and --process-id I")
        if num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    if jax._src.xla_bridge.backends_are_initialized():  # noqa: SLF001 - no public way to ask
        raise RuntimeError("jaxdnn.distributed.initialize must run before anything uses a JAX backend")

    def give_up():  # JAX would abort with a core dump after its own timeout: leave cleanly first
        print(f"error: not every process joined within {timeout:g} s (coordinator {coordinator or 'auto'}, "
              f"{num_processes or '?'} processes); start them all, or raise --init-timeout", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)

    if native_stdout_to_stderr:
        _native_output_to_stderr()
    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(timeout) + 60)
    except ValueError as e:
        if coordinator is None:
            raise ValueError(f"--cluster auto found no SLURM or Open MPI job to join ({e})") from None
        raise
    finally:
        watchdog.cancel()
    return True


def _native_output_to_stderr() -> None:
    """The CPU collectives (gloo) print connection notes on the C-level stdout, which would break
    `--json`'s one object on stdout: from here on, file descriptor 1 is stderr's, and Python's
    `sys.stdout` writes to the original stdout."""
    sys.stdout.flush()
    original = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(original, "w", buffering=1)


def initialize_from_args(args: argparse.Namespace, prog: str) -> bool:
    """`initialize` from the flags of `add_arguments`; a bad value exits 2 with one line."""
    try:
        return initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout, args.cluster,
                          native_stdout_to_stderr=True)
    except (ValueError, RuntimeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def is_main() -> bool:
    """True in process 0 (the one that prints and writes files), and when there is one process."""
    return jax.process_index() == 0


def gather(x) -> np.ndarray:
    """A result as a host NumPy array, on every process. Only an array that spans processes is
    gathered (`process_allgather`); a per-process array is read as it is (gathering it would
    stack N copies)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def process_share(n: int) -> tuple[int, int]:
    """This process's contiguous share [lo, hi) of n items (numpy.array_split's sizes: the first
    n % P processes take one more). Raises ValueError when some process would get none."""
    count, index = jax.process_count(), jax.process_index()
    if n < count:
        raise ValueError(f"{n} items cannot be shared by {count} processes (each needs one)")
    size, extra = divmod(n, count)
    lo = index * size + min(index, extra)
    return lo, lo + size + (index < extra)


def from_every_process(x) -> np.ndarray:
    """Every process's value of the host array `x` (same shape on all), stacked: (P, *x.shape),
    on every process (a collective: all processes call it together); (1, *x.shape) for one."""
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    raw = np.asarray(multihost_utils.process_allgather(x.reshape(-1).view(np.uint8)))  # bytes: float64 stays
    return raw.reshape(jax.process_count(), -1).view(x.dtype).reshape(-1, *x.shape)
