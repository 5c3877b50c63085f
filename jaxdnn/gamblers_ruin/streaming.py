"""Streaming the paths: chunks of constant memory dealt to the devices, combined on the host.

The chunks are dealt to the devices of a 1-D `Mesh` by `jax.shard_map` (one code path for 1 or
many devices), each chunk returns (max log-weight, sum of weights, sum of squared weights,
hits) relative to its max, and the host combines them in float64. On CPU, one XLA device per
core (XLA_FLAGS=--xla_force_host_platform_device_count=N, as `experiments.gamblers_ruin` sets)
puts every core to work. With more than one process the per-device rows are read through
`jaxdnn.distributed.gather`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from jaxdnn.distributed import gather
from jaxdnn.gamblers_ruin.bits import TILE
from jaxdnn.gamblers_ruin.exact import (
    best_constant_q,
    check_integer,
    check_probability,
    exact_probability,
    straight_line_q,
    tilt,
    validate,
)
from jaxdnn.gamblers_ruin.kernels import (
    CPU_COMPILER_OPTIONS,
    ConstantKernel,
    StateKernel,
    constant_params,
    state_params,
)

_AXIS = "paths"
_MAX_CHUNKS = 128  # chunks per device per program call (the output buffer is (devices, 128, 4))


def _chunk_stats(lr, valid):
    """(4,) float64 (m, sum exp(lr - m), sum exp(2 (lr - m)), hits), m = max valid lr."""
    lr = jnp.where(valid, lr, -jnp.inf)
    m = jnp.max(lr)
    e = jnp.exp(lr - jnp.where(jnp.isfinite(m), m, 0.0))
    hits = jnp.sum(jnp.isfinite(lr).astype(lr.dtype))
    return jnp.stack([m, jnp.sum(jnp.sum(e, 1)), jnp.sum(jnp.sum(e * e, 1)), hits])


def _device_program(key, c0, n_chunks, n_valid, params, *, kernel, tiles, ndev):
    """One device's share: chunks d, d + ndev, ... of [c0, c0 + n_chunks); (1, 128, 4)."""
    d = lax.axis_index(_AXIS)
    chunk = tiles * TILE
    lane = jnp.arange(chunk, dtype=jnp.int32).reshape(tiles, TILE)

    def body(i, buf):
        local = i * ndev + d
        lr = kernel.log_weights(key, (c0 + local) * tiles, tiles, params)
        return buf.at[i].set(_chunk_stats(lr, local * chunk + lane < n_valid))

    buf = jnp.tile(jnp.array([-jnp.inf, 0.0, 0.0, 0.0], jnp.float64), (_MAX_CHUNKS, 1))
    buf = lax.fori_loop(0, (n_chunks - d + ndev - 1) // ndev, body, buf)
    return buf[None]


@functools.lru_cache(maxsize=32)
def _program(kernel, tiles: int, devices: tuple):
    """The jitted program of `kernel` sharded over `devices`, chunks of `tiles` tiles (cached)."""
    mesh = Mesh(np.array(devices), (_AXIS,))
    fn = functools.partial(_device_program, kernel=kernel, tiles=tiles, ndev=len(devices))
    # check_vma=False: the loop carries start replicated and become device-varying.
    program = jax.shard_map(fn, mesh=mesh, in_specs=PartitionSpec(),
                            out_specs=PartitionSpec(_AXIS), check_vma=False)
    options = CPU_COMPILER_OPTIONS if devices[0].platform == "cpu" else None
    return jax.jit(program, compiler_options=options)


class Estimate(NamedTuple):
    """Result of `estimate` (a pytree of Python scalars).

    estimate: mean weight; std_error: its standard error; ci95_lo/hi: estimate -/+ 1.96 se
    (lo clipped at 0); relative_error: std_error / estimate (nan if estimate = 0);
    ess: Kish effective sample size (sum W)^2 / sum W^2; paths: N.
    """

    estimate: float
    std_error: float
    ci95_lo: float
    ci95_hi: float
    relative_error: float
    ess: float
    paths: int


def _summarize(rows: np.ndarray, offset: float, paths: int) -> Estimate:
    rows = rows.reshape(-1, 4).astype(np.float64)
    ok = np.isfinite(rows[:, 0]) & (rows[:, 3] > 0)
    if not ok.any():
        return Estimate(0.0, 0.0, 0.0, 0.0, math.nan, 0.0, paths)
    m, s1, s2 = rows[ok, 0], rows[ok, 1], rows[ok, 2]
    top = m.max()
    s1, s2 = np.sum(s1 * np.exp(m - top)), np.sum(s2 * np.exp(2 * (m - top)))
    scale = math.exp(offset + top)
    mean = scale * s1 / paths
    if paths > 1:
        var = scale * scale * max(s2 / paths - (s1 / paths) ** 2, 0.0) * paths / (paths - 1)
        se = math.sqrt(var / paths)
    else:
        se = math.nan
    rel = se / mean if mean > 0 else math.nan
    return Estimate(float(mean), float(se), float(max(mean - 1.96 * se, 0.0)),
                    float(mean + 1.96 * se), float(rel), float(s1 * s1 / s2), paths)


def default_chunk_size(paths: int, platform: str | None = None) -> int:
    """Paths per chunk: 2^16 on CPU, 2^21 on accelerators, at most `paths` rounded up to TILE."""
    platform = platform or jax.default_backend()
    size = 1 << 16 if platform == "cpu" else 1 << 21
    return min(size, -(-paths // TILE) * TILE)


PROPOSALS = ("naive", "optimal", "state")


def proposal_by_name(name: str, start=100, target=200, p=18 / 37, games=600, bits: int = 8):
    """The proposal the command line calls `name`: "naive" -> p, "optimal" -> the best constant
    q on the k / 2^bits grid (exact DP), "state" -> `tilt(target, p, games)`."""
    if name == "naive":
        return p
    if name == "optimal":
        if exact_probability(start, target, p, games) == 0:
            return straight_line_q(start, target, p, games)
        return best_constant_q(start, target, p, games, bits=bits)[0]
    if name == "state":
        return tilt(target, p, games)
    hint = "; a constant proposal is its q, a number" if name == "constant" else ""
    raise ValueError(f"proposal must be a number q, a callable q(t, x) or one of {', '.join(PROPOSALS)}; "
                     f"got {name!r}{hint}")


def estimate(key, paths: int, proposal=0.55, *, start=100, target=200, p=18 / 37, games=600,
             stopped: bool = True, bits: int = 8, chunk_size: int | None = None,
             devices: Sequence | None = None) -> Estimate:
    """Importance-sampling estimate of P(reach target) from `paths` simulated paths.

    key: a `jax.random.key`. proposal: a constant win probability q (q = p is plain Monte
    Carlo), a hashable callable q(t, x) such as `tilt(...)`, or a name as the command line
    takes it: "naive" (q = p), "optimal" (the best constant q on the bits grid, by the exact
    DP: `best_constant_q`) or "state" (`tilt` of this problem). stopped: weight the games
    until absorption (True, lower variance) or all games (constant q only). bits: q is rounded
    to k / 2^bits (constant: 1..24; state: 8 or 16) and the weights use the rounded q, so the
    estimate is unbiased. chunk_size: paths per chunk (a multiple of TILE; memory is
    O(chunk_size) whatever `paths` is). devices: where to shard the chunks (default: all of
    the default backend's). The result depends on (key, paths, proposal, problem, bits) only.
    """
    start, target, p, games = validate(start, target, p, games)
    paths = check_integer("paths", paths)
    if paths < 1:
        raise ValueError(f"paths must be >= 1, got {paths}")
    if isinstance(proposal, str):
        proposal = proposal_by_name(proposal, start, target, p, games, bits)
    elif not callable(proposal):
        proposal = check_probability("q", proposal)
    if callable(proposal):
        if not stopped:
            raise ValueError("stopped=False is only implemented for a constant q")
        if bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16 for a state-dependent proposal, got {bits}")
        kernel = StateKernel(start, target, games, bits, proposal)
        params, offset = state_params(p, bits), 0.0
    else:
        params, offset, _ = constant_params(proposal, p, bits, start, target, games, stopped)
        kernel = ConstantKernel.make(start, target, games, bits, stopped)
    devices = tuple(devices) if devices is not None else tuple(jax.devices())
    chunk = chunk_size if chunk_size is not None else default_chunk_size(
        paths, devices[0].platform)
    chunk = check_integer("chunk_size", chunk)
    if chunk < TILE or chunk % TILE:
        raise ValueError(f"chunk_size must be a positive multiple of {TILE}, got {chunk}")
    tiles = chunk // TILE
    per_call = min(_MAX_CHUNKS * len(devices), (2**31 - 1) // chunk)  # int32 path indices
    if per_call < 1:
        raise ValueError(f"chunk_size must be < 2^31, got {chunk}")
    n_chunks = -(-paths // chunk)
    outs = []
    with jax.enable_x64(True):  # float64 weights (kernels); the walks stay int16/int32
        program = _program(kernel, tiles, devices)
        for c0 in range(0, n_chunks, per_call):  # async dispatch: calls queue up on the devices
            k = min(per_call, n_chunks - c0)
            outs.append(program(key, np.int32(c0), np.int32(k),
                                np.int32(min(paths - c0 * chunk, k * chunk)), params))
        rows = np.concatenate([gather(o) for o in outs])  # spans processes: gather
    return _summarize(rows, offset, paths)
