"""Gambler's ruin (docs/problems.md, P5): exact answer by dynamic programming, importance sampling in JAX.

A gambler starts with `start`, bets 1 per game, wins a game with probability `p`, and stops at
0, at `target`, or after `games` games. We want P = P(reach `target`); at the course's
(100, 200, 18/37, 600) P = 2.38838345e-6, so plain Monte Carlo has a relative error of
sqrt(1/P - 1) = 647 per path.

Importance sampling plays every game with a win probability q (a constant, or q(t, x) for a
path at balance x after t games) and weights a path that reaches `target` by its likelihood
ratio over the games played,

    W = prod_games (p / q)^win ((1 - p) / (1 - q))^loss,    E_q[W 1{reach target}] = P.

Why the likelihood ratio stops at absorption. The games after absorption cannot change the
indicator, so weighting them as well (the "all games" estimator) multiplies W by independent
mean-one factors L_s: the mean is unchanged, but the second moment grows by
E_q[L_s^2] = p^2/q + (1-p)^2/(1-q) > 1 (Cauchy-Schwarz; equality only at q = p) for every extra
game. Equivalently, the stopped weight is the conditional expectation of the all-games weight
given the path up to absorption, so by Rao-Blackwell its variance can only be smaller. At
q = 0.55 a winning path stops after ~530 of the 600 games on average and the relative error per
path is 3.86 stopped against 6.75 with all 600 games weighted.

Everything is exact for the proposal actually simulated: `second_moment` runs the same dynamic
program on E_q[W^2 1{reach target}], so the relative error per path sqrt(M / P^2 - 1) of every
estimator is known (3.86 at q = 0.55, 1.34 at the best constant q ~ 0.588, 0.71 for `Tilt`,
the state-dependent tilt toward the straight line to the target).

Simulation (`estimate`), built for throughput:
- Random bits. q is rounded to k / 2^bits and a game is won when a `bits`-bit uniform integer
  is < k; the comparison runs bit-sliced, 32 games per 32-bit word per plane. The likelihood
  ratio uses the rounded q, so the estimator stays exactly unbiased. The words are a
  murmur3-style 32-bit finalizer of a Weyl sequence over lanes, offset by fresh
  `jax.random.bits` (threefry) for every (4096-path tile, block of games, plane), with the
  tile key `fold_in(key, tile)`: a path's draws depend on (key, path index) only, never on the
  chunk size or the number of devices, and each path's bits are exactly uniform given the
  threefry offsets.
- Walk. Balance and games played are packed in one int16, x + 2^k * (steps this block), so a
  block of 64 games is one fused integer loop with a single range check per step. When start
  and target are even a path can only be absorbed after an even number of games, so games are
  walked two at a time. Blocks run under `lax.while_loop`, which stops as soon as every path
  of a chunk is absorbed; the masks of block j + 1 are drawn while block j is walked, so the
  hashing and the walk are separate fusions (XLA would otherwise recompute the hash).
- State-dependent q(t, x): every game draws `bits` bits (8: four games per word) compared
  with k(t, x) = round(q(t, x) 2^bits), and log W accumulates per game.
- Streaming and devices. Paths run in chunks with constant memory; the chunks are dealt to
  the devices of a 1-D `Mesh` by `jax.shard_map` (one code path for 1 or many devices), each
  chunk returns (max log-weight, sum of weights, sum of squared weights, hits) relative to its
  max, and the host combines them in float64. On CPU, one XLA device per core
  (XLA_FLAGS=--xla_force_host_platform_device_count=N, as `experiments.gamblers_ruin` sets)
  puts every core to work.

Speed on a 2-core CPU at the course's parameters (q = 0.55): about 6e6 paths/s, some 3000x the
course-style Python loop and 50x vectorized NumPy (benchmarks/peers/gamblers_ruin_*.py).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdnn.distributed import gather

__all__ = [
    "COURSE",
    "TILE",
    "AdaptResult",
    "Estimate",
    "Tilt",
    "adapt_q",
    "best_constant_q",
    "default_chunk_size",
    "estimate",
    "exact_probability",
    "quantize",
    "relative_error_per_path",
    "second_moment",
    "straight_line_q",
    "tilt",
    "validate",
]

COURSE = {"start": 100, "target": 200, "p": 18 / 37, "games": 600}
TILE = 4096  # paths per randomness tile: the unit of `fold_in(key, tile)`
_AXIS = "paths"
_WEYL = 0x9E3779B9
_MAX_CHUNKS = 128  # chunks per device per program call (the output buffer is (devices, 128, 4))
_CPU_OPTIONS = {"xla_backend_optimization_level": 1}


# ----------------------------------------------------------------------------- validation


def _integer(name: str, v) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real) and math.isfinite(v) and float(v).is_integer():
        return int(v)
    raise ValueError(f"{name} must be an integer, got {v!r}")


def _probability(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a probability in (0, 1), got {v!r}") from None
    if not (math.isfinite(f) and 0.0 < f < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {v!r}")
    return f


def validate(start=100, target=200, p=18 / 37, games=600) -> tuple[int, int, float, int]:
    """Checks a problem; returns (start, target, p, games) as (int, int, float, int).

    Raises ValueError naming the bad argument: need integers 0 < start < target, games >= 1,
    0 < p < 1.
    """
    start, target, games = _integer("start", start), _integer("target", target), _integer(
        "games", games)
    if not 0 < start < target:
        raise ValueError(f"need 0 < start < target, got start={start}, target={target}")
    if games < 1:
        raise ValueError(f"games must be >= 1, got {games}")
    return start, target, _probability("p", p), games


# ----------------------------------------------------------------------------- proposals


class Tilt(NamedTuple):
    """State-dependent proposal q(t, x) = clip((1 + (target - x) / (games - t)) / 2, lo, hi).

    Aims each path at the straight line from (t, x) to (games, target) (the large-deviations
    tilt of the remaining walk). t: games played so far (int scalar or array), x: balance
    (int array); returns float32 q broadcast to the shapes of t and x. Hashable, so it can be
    a static argument of `estimate`; any hashable callable with this signature also works
    (an optional `quantized(t, x, bits)` method gives the int32 k of q = k / 2^bits).
    """

    target: int
    games: int
    lo: float
    hi: float = 0.99

    def __call__(self, t, x):
        r = (self.target - x) / (self.games - t)
        return jnp.clip(0.5 + 0.5 * r, self.lo, self.hi)

    def quantized(self, t, x, bits: int):
        """int32 k = round(q(t, x) 2^bits), halves up, clipped in integers (cheap in the
        simulation's inner loop; the exact DP uses the same k)."""
        half = float(1 << (bits - 1))
        kf = half + jnp.asarray(self.target - x, jnp.float32) * (half / (self.games - t))
        k = jnp.floor(kf + 0.5).astype(jnp.int32)
        full = 1 << bits
        k_lo = min(max(round(self.lo * full), 1), full - 1)
        k_hi = min(max(round(self.hi * full), 1), full - 1)
        return jnp.clip(k, k_lo, k_hi)


def tilt(target=200, p=18 / 37, games=600, hi=0.99) -> Tilt:
    """The course's state tilt: `Tilt` with lower clip max(p, 1 - p) (19/37 at the course)."""
    return Tilt(int(target), int(games), max(float(p), 1.0 - float(p)), float(hi))


def straight_line_q(start=100, target=200, p=18 / 37, games=600) -> float:
    """Constant q whose mean drift 2q - 1 reaches `target` exactly at the last game, clipped
    to [max(p, 1 - p), 0.99]: 0.5833 at the course, a good start for `adapt_q`."""
    start, target, p, games = validate(start, target, p, games)
    return float(np.clip(0.5 + 0.5 * (target - start) / games, max(p, 1 - p), 0.99))


def quantize(q, bits: int = 8) -> tuple[int, float]:
    """Rounds a constant q to the simulation's grid: (k, k / 2**bits), k = round(q 2^bits).

    Raises ValueError if q is not in (0, 1), bits is not in [1, 24], or q rounds to 0 or 1.
    """
    q = _probability("q", q)
    bits = _integer("bits", bits)
    if not 1 <= bits <= 24:
        raise ValueError(f"bits must be in [1, 24], got {bits}")
    k = round(q * (1 << bits))
    if not 0 < k < (1 << bits):
        raise ValueError(f"q={q} rounds to {k}/2^{bits}; use more bits")
    return k, k / (1 << bits)


def _proposal_k(proposal, t, x, bits: int):
    """int32 k of a state proposal rounded to k / 2^bits (its `quantized` method if any)."""
    if hasattr(proposal, "quantized"):
        return proposal.quantized(t, x, bits)
    return _quantize_k(proposal(t, x), bits)


def _quantize_k(q, bits: int):
    """int32 k = clip(round(q 2^bits), 1, 2^bits - 1) of a float array q (state proposals)."""
    s = float(1 << bits)
    return jnp.clip(jnp.round(q * s), 1.0, s - 1.0).astype(jnp.int32)


# ----------------------------------------------------------------------------- exact (DP)


def _dp(start, target, games, up, down, top):
    """V_t(x) = up(t) V_{t+1}(x+1) + down(t) V_{t+1}(x-1) for 0 < x < target, V_t(0) = 0,
    V_t(target) = top[t], V_games(x < target) = 0; returns V_0(start) (float64).

    up/down: t -> scalar or (target - 1,) array over x = 1..target-1; top: (games + 1,).
    """
    v = np.zeros(target + 1)
    v[target] = top[games]
    with np.errstate(over="ignore"):  # extreme q in a search: inf is the right answer
        for t in range(games - 1, -1, -1):
            new = np.empty_like(v)
            new[1:-1] = up(t) * v[2:] + down(t) * v[:-2]
            new[0], new[-1] = 0.0, top[t]
            v = new
    return float(v[start])


def exact_probability(start=100, target=200, p=18 / 37, games=600) -> float:
    """P(reach `target` within `games` games) by dynamic programming over balances (float64).

    O(games * target) time, O(target) memory. 2.38838345e-6 at the course's parameters.
    """
    start, target, p, games = validate(start, target, p, games)
    return _dp(start, target, games, lambda t: p, lambda t: 1.0 - p, np.ones(games + 1))


def _q_table(q, target, games, bits):
    """(games, target + 1) float64 q(t, x) of a callable proposal, rounded to the bits grid."""
    t = np.arange(games, dtype=np.int32)[:, None]
    x = np.arange(target + 1, dtype=np.int32)[None, :]
    if bits is not None:
        k = _proposal_k(q, t, x, bits)
        qt = jnp.broadcast_to(k, (games, target + 1)) / float(1 << bits)
    else:
        qt = jnp.broadcast_to(jnp.asarray(q(t, x), jnp.float32), (games, target + 1))
    qt = np.asarray(qt, np.float64)
    if not np.all((qt > 0) & (qt < 1)):
        raise ValueError("proposal q(t, x) must lie in (0, 1)")
    return qt


def second_moment(q, start=100, target=200, p=18 / 37, games=600, *, stopped=True,
                  bits=None) -> float:
    """Exact E_q[W^2 1{reach target}] of the importance-sampling estimator (float64 DP).

    q: constant win probability, or callable q(t, x) (e.g. `Tilt`). stopped: weight only the
    games played until absorption (True) or all `games` games (False). bits: round q to the
    k / 2^bits grid the simulation uses (None: use q as given).
    """
    start, target, p, games = validate(start, target, p, games)
    if callable(q):
        qt = _q_table(q, target, games, bits)
        up = lambda t: p * p / qt[t, 1:-1]
        down = lambda t: (1 - p) ** 2 / (1 - qt[t, 1:-1])
        qtop = qt[:, target]
    else:
        qc = quantize(q, bits)[1] if bits is not None else _probability("q", q)
        up, down = (lambda t: p * p / qc), (lambda t: (1 - p) ** 2 / (1 - qc))
        qtop = np.full(games, qc)
    top = np.ones(games + 1)
    if not stopped:  # every game after absorption multiplies W^2's mean by E_q[L^2]
        c = p * p / qtop + (1 - p) ** 2 / (1 - qtop)
        top[:games] = np.cumprod(c[::-1])[::-1]
    return _dp(start, target, games, up, down, top)


def relative_error_per_path(q, start=100, target=200, p=18 / 37, games=600, *, stopped=True,
                            bits=None) -> float:
    """sqrt(M / P^2 - 1): the relative error of one weighted path (divide by sqrt(N) for N).

    q as in `second_moment`; q = p gives plain Monte Carlo. nan when P = 0 (the estimator is
    then exactly 0).
    """
    prob = exact_probability(start, target, p, games)
    if prob == 0.0:
        return math.nan
    m = second_moment(q, start, target, p, games, stopped=stopped, bits=bits)
    return math.sqrt(max(m / (prob * prob) - 1.0, 0.0))


def best_constant_q(start=100, target=200, p=18 / 37, games=600, *, bits=None,
                    tol=1e-7) -> tuple[float, float]:
    """The constant q minimizing the exact second moment: (q, relative error per path).

    M is convex in logit(q) (a sum of exp of convex functions), so golden-section search on
    log M is exact; with `bits` the best point of the k / 2^bits grid is returned.
    About (0.588, 1.34) at the course's parameters. Raises ValueError if P = 0.
    """
    start, target, p, games = validate(start, target, p, games)
    if exact_probability(start, target, p, games) == 0.0:
        raise ValueError(f"target={target} is unreachable from start={start} in {games} games")
    f = lambda th: math.log(second_moment(1 / (1 + math.exp(-th)), start, target, p, games))
    a, b = -9.0, 9.0
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    q = 1 / (1 + math.exp(-(a + b) / 2))
    if bits is not None:
        s = 1 << bits
        ks = range(max(1, math.floor(q * s) - 1), min(s - 1, math.ceil(q * s) + 1) + 1)
        grid = [k / s for k in ks]
        q = min(grid, key=lambda v: second_moment(v, start, target, p, games))
    return q, relative_error_per_path(q, start, target, p, games)


# ----------------------------------------------------------------------------- random bits


def _mix32(x):
    """murmur3-style 32-bit finalizer (lowbias32 constants): a bijection with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _lane_weyl(width: int):
    """(1, width) uint32 Weyl sequence lane * golden ratio: the per-lane hash input."""
    return (jnp.arange(width, dtype=jnp.uint32) * jnp.uint32(_WEYL))[None, :]


def _k_planes(k: int, bits: int) -> np.ndarray:
    """(bits,) uint32 all-ones where bit (bits - 1 - i) of k is set (MSB first)."""
    return np.array([0xFFFFFFFF if (k >> (bits - 1 - i)) & 1 else 0 for i in range(bits)],
                    np.uint32)


def _bernoulli_words(lanes, offsets, planes):
    """32 independent Bernoulli(k / 2^b) bits per word: bit-sliced `b-bit uniform < k`.

    lanes: (..., 1, W) uint32 Weyl inputs; offsets: (..., nt, b) uint32 random plane
    offsets; planes: (b,) uint32 from `_k_planes`. Returns (..., nt, W) uint32.
    """
    lt = jnp.zeros(jnp.broadcast_shapes(lanes.shape, offsets.shape[:-1] + (1,)), jnp.uint32)
    eq = ~lt
    for i in range(planes.shape[0]):
        u = _mix32(lanes + offsets[..., i:i + 1])
        lt = lt | (eq & ~u & planes[i])
        eq = eq & ~(u ^ planes[i])
    return lt


def _tile_keys(key, tile0, n_tiles):
    tiles = tile0 + jnp.arange(n_tiles, dtype=jnp.int32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, tiles)


def _block_offsets(tkeys, nblocks, shape):
    """(nblocks, n_tiles, *shape) uint32 threefry offsets, bits(tile_key, (nblocks, *shape))
    per tile, drawn up front so the block loop runs no threefry."""
    draw = lambda k: jax.random.bits(k, (nblocks, *shape), jnp.uint32)
    return jax.vmap(draw, out_axes=1)(tkeys)


# ----------------------------------------------------------------------------- kernels


class _Constant(NamedTuple):
    """Static configuration of the constant-q kernel (hashable: a jit/cache key)."""

    start: int
    target: int
    games: int
    bits: int
    stopped: bool
    pair: bool  # walk two games per step (start and target even)
    xb_log: int  # balance field width: x < 2^xb_log
    wide: bool  # int32 packing (targets too large for int16)
    masks: int  # 16-game masks per block

    @staticmethod
    def make(start, target, games, bits, stopped):
        pair = start % 2 == 0 and target % 2 == 0
        unit = 2 if pair else 1
        xb_log = int(target).bit_length()
        for wide, limit in ((False, 2**15 - 1), (True, 2**31 - 1)):
            for masks in (4, 2, 1):
                if (16 * masks // unit + 1) << xb_log <= limit:
                    return _Constant(start, target, games, bits, stopped, pair, xb_log, wide,
                                     masks)
        raise ValueError(f"target={target} is too large for the simulation kernel")

    def walk_lanes(self, key, tile0, n_tiles, planes):
        """Simulates n_tiles * TILE paths from tile index tile0.

        Returns (x, n, wins): (n_tiles, TILE) int32 final balance, games played until
        absorption, and wins over all `games` games (zeros when stopped).
        """
        xb, unit = 1 << self.xb_log, 2 if self.pair else 1
        dt = jnp.int32 if self.wide else jnp.int16
        never = jnp.iinfo(dt).max
        block = 16 * self.masks
        nblocks = -(-self.games // block)
        offsets = _block_offsets(_tile_keys(key, tile0, n_tiles), nblocks + 1,
                                 (self.masks, self.bits))
        lanes = _lane_weyl(TILE // 2)[None]

        def masks(j):  # (masks, n_tiles, TILE / 2) uint32: two lanes' 16-game masks per word
            # one fusion that stores whole words; splitting them here would hash twice
            return _bernoulli_words(lanes, jnp.swapaxes(offsets[j], 0, 1), planes)

        def halves(ms):  # (n_tiles, TILE) uint16 masks, lanes 2i and 2i + 1 from word i
            return [lax.bitcast_convert_type(ms[i], jnp.uint16).reshape(n_tiles, TILE)
                    for i in range(self.masks)]

        def walk(x, ms, units):  # packed st = x + xb * (steps survived); `units` steps
            st, per, field = x, 16 // unit, ((1 << unit) - 1) << 1
            ms = halves(ms)
            for s in range(block // unit):
                m, pos = ms[s // per], (s % per) * unit
                if self.pair:
                    m = (m & 0x5555) + ((m >> 1) & 0x5555)  # wins per pair, 2-bit fields
                two_wins = (m << 1 if pos == 0 else m >> (pos - 1)) & field
                inc = two_wins.astype(dt) + (xb - unit)
                # alive <=> 0 < x < target <=> lo < st < hi; steps past `units` never run
                lo = jnp.where(s < units, xb * s, never).astype(dt)
                hi = xb * s + self.target
                st = st + jnp.where((st > lo) & (st < hi), inc, 0).astype(dt)
            return st

        def unpack(st, n):
            return st & (xb - 1), n + unit * (st >> self.xb_log).astype(jnp.int32)

        def count(ms, rem):  # wins among the first `rem` games of the block
            keep = [((jnp.uint32(1) << jnp.clip(rem - 16 * i, 0, 16).astype(jnp.uint32)) - 1)
                    .astype(jnp.uint16) for i in range(self.masks)]
            return sum(lax.population_count(m & kp).astype(jnp.int32)
                       for m, kp in zip(halves(ms), keep, strict=True))

        def body(c):  # walks block j (none for j = -1) and draws the masks of block j + 1
            j, st, n, wins, ms = c
            x, n = unpack(st, n)
            rem = jnp.where(j < 0, 0, jnp.clip(self.games - j * block, 0, block))
            if not self.stopped:
                wins = wins + count(ms, rem)
            return j + 1, walk(x, ms, rem // unit), n, wins, masks(j + 1)

        def cond(c):
            j, st = c[0], c[1]
            if not self.stopped:
                return j < nblocks
            x = st & (xb - 1)
            return (j < nblocks) & jnp.any((x > 0) & (x < self.target))

        zeros = jnp.zeros((n_tiles, TILE), jnp.int32)
        wins0 = jnp.zeros((), jnp.int32) if self.stopped else zeros
        ms0 = jnp.zeros((self.masks, n_tiles, TILE // 2), jnp.uint32)
        st0 = jnp.full((n_tiles, TILE), self.start, dt)
        _, st, n, wins, _ = lax.while_loop(cond, body, (-1, st0, zeros, wins0, ms0))
        x, n = unpack(st, n)
        return x.astype(jnp.int32), n, wins

    def log_weights(self, key, tile0, n_tiles, params):
        """(n_tiles, TILE) float32 log W - offset of paths reaching target, -inf otherwise.

        params = (planes, slope): log W = offset + a * slope with a = (n - d) / 2 (stopped)
        or a = wins - games // 2 (all games); offset is added on the host in float64.
        """
        planes, slope = params
        x, n, wins = self.walk_lanes(key, tile0, n_tiles, planes)
        a = (n - (self.target - self.start)) // 2 if self.stopped else wins - self.games // 2
        return jnp.where(x == self.target, a.astype(jnp.float32) * slope, -jnp.inf)


def _constant_params(q, p, bits, start, target, games, stopped):
    """Traced kernel parameters and the float64 log-weight offset for a constant q."""
    k, qr = quantize(q, bits)
    d = target - start
    if stopped:  # a = (n - d)/2 losses beyond the minimum: w = d + a, l = a
        slope = math.log(p * (1 - p) / (qr * (1 - qr)))
        offset = d * math.log(p / qr)
    else:  # wins over all games: w = h + a, l = games - h - a
        h = games // 2
        slope = math.log(p * (1 - qr) / (qr * (1 - p)))
        offset = h * math.log(p / qr) + (games - h) * math.log((1 - p) / (1 - qr))
    return (_k_planes(k, bits), np.float32(slope)), offset, qr


class _State(NamedTuple):
    """Static configuration of the state-dependent kernel: q(t, x) = proposal(t, x)."""

    start: int
    target: int
    games: int
    bits: int  # 8 or 16 bits per game
    proposal: Callable

    def log_weights(self, key, tile0, n_tiles, params):
        """(n_tiles, TILE) float32 log W of paths reaching target, -inf otherwise.

        params = (p 2^bits, (1 - p) 2^bits) as float32: the win / loss numerators of W.
        """
        num_win, num_loss = params
        b = self.bits
        per_word, full = 32 // b, 1 << b
        block = 16
        nwords = block // per_word
        nblocks = -(-self.games // block)
        offsets = _block_offsets(_tile_keys(key, tile0, n_tiles), nblocks + 1, (nwords,))
        lanes = _lane_weyl(TILE)

        def words(j):  # (nwords, n_tiles, TILE) uint32 uniform words
            return _mix32(lanes[None] + jnp.swapaxes(offsets[j], 0, 1)[:, :, None])

        def steps(x, acc, ws, t0, rem):  # the first `rem` games of the block starting at t0
            prod = jnp.ones(x.shape, jnp.float32)
            for g in range(block):
                u = ((ws[g // per_word] >> (b * (g % per_word))) & (full - 1)).astype(jnp.int32)
                k = _proposal_k(self.proposal, t0 + g, x, b)
                win = u < k
                alive = (x > 0) & (x < jnp.where(g < rem, self.target, 0))
                x = x + jnp.where(alive, jnp.where(win, 1, -1), 0)
                f = jnp.where(win, num_win, num_loss) / jnp.where(win, k, full - k).astype(
                    jnp.float32)
                prod = prod * jnp.where(alive, f, 1.0)
                if g % 8 == 7:  # 8 factors stay far from float32 limits
                    acc, prod = acc + jnp.log(prod), jnp.ones_like(prod)
            return x, acc

        def body(c):  # plays block j (none for j = -1) and draws the words of block j + 1
            j, x, acc, ws = c
            rem = jnp.where(j < 0, 0, jnp.clip(self.games - j * block, 0, block))
            x, acc = steps(x, acc, ws, j * block, rem)
            return j + 1, x, acc, words(j + 1)

        def cond(c):
            j, x = c[0], c[1]
            return (j < nblocks) & jnp.any((x > 0) & (x < self.target))

        x0 = jnp.full((n_tiles, TILE), self.start, jnp.int32)
        acc0 = jnp.zeros((n_tiles, TILE), jnp.float32)
        ws0 = jnp.zeros((nwords, n_tiles, TILE), jnp.uint32)
        _, x, acc, _ = lax.while_loop(cond, body, (-1, x0, acc0, ws0))
        return jnp.where(x == self.target, acc, -jnp.inf)


# ----------------------------------------------------------------------------- streaming


def _chunk_stats(lr, valid):
    """(4,) float32 (m, sum exp(lr - m), sum exp(2 (lr - m)), hits), m = max valid lr."""
    lr = jnp.where(valid, lr, -jnp.inf)
    m = jnp.max(lr)
    e = jnp.exp(lr - jnp.where(jnp.isfinite(m), m, 0.0))
    hits = jnp.sum(jnp.isfinite(lr).astype(jnp.float32))
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

    buf = jnp.tile(jnp.array([-jnp.inf, 0.0, 0.0, 0.0], jnp.float32), (_MAX_CHUNKS, 1))
    buf = lax.fori_loop(0, (n_chunks - d + ndev - 1) // ndev, body, buf)
    return buf[None]


@functools.lru_cache(maxsize=32)
def _program(kernel, tiles: int, devices: tuple):
    mesh = Mesh(np.array(devices), (_AXIS,))
    fn = functools.partial(_device_program, kernel=kernel, tiles=tiles, ndev=len(devices))
    # check_vma=False: the loop carries start replicated and become device-varying.
    program = jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(_AXIS), check_vma=False)
    # On CPU, LLVM at level 1 compiles these integer kernels ~3x faster, to the same speed.
    options = _CPU_OPTIONS if devices[0].platform == "cpu" else None
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


def estimate(key, paths: int, proposal=0.55, *, start=100, target=200, p=18 / 37, games=600,
             stopped: bool = True, bits: int = 8, chunk_size: int | None = None,
             devices: Sequence | None = None) -> Estimate:
    """Importance-sampling estimate of P(reach target) from `paths` simulated paths.

    key: a `jax.random.key`. proposal: a constant win probability q (q = p is plain Monte
    Carlo), or a hashable callable q(t, x) such as `tilt(...)`. stopped: weight the games
    until absorption (True, lower variance) or all games (constant q only). bits: q is rounded
    to k / 2^bits (constant: 1..24; state: 8 or 16) and the weights use the rounded q, so the
    estimate is unbiased. chunk_size: paths per chunk (a multiple of TILE; memory is
    O(chunk_size) whatever `paths` is). devices: where to shard the chunks (default: all of
    the default backend's). The result depends on (key, paths, proposal, problem, bits) only.
    """
    start, target, p, games = validate(start, target, p, games)
    paths = _integer("paths", paths)
    if paths < 1:
        raise ValueError(f"paths must be >= 1, got {paths}")
    if callable(proposal):
        if not stopped:
            raise ValueError("stopped=False is only implemented for a constant q")
        if bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16 for a state-dependent proposal, got {bits}")
        kernel = _State(start, target, games, bits, proposal)
        s = float(1 << bits)
        params, offset = (np.float32(p * s), np.float32((1 - p) * s)), 0.0
    else:
        params, offset, _ = _constant_params(proposal, p, bits, start, target, games, stopped)
        kernel = _Constant.make(start, target, games, bits, stopped)
    devices = tuple(devices) if devices is not None else tuple(jax.devices())
    chunk = chunk_size if chunk_size is not None else default_chunk_size(
        paths, devices[0].platform)
    chunk = _integer("chunk_size", chunk)
    if chunk < TILE or chunk % TILE:
        raise ValueError(f"chunk_size must be a positive multiple of {TILE}, got {chunk}")
    tiles = chunk // TILE
    per_call = min(_MAX_CHUNKS * len(devices), (2**31 - 1) // chunk)  # int32 path indices
    if per_call < 1:
        raise ValueError(f"chunk_size must be < 2^31, got {chunk}")
    program = _program(kernel, tiles, devices)
    n_chunks = -(-paths // chunk)
    outs = []
    for c0 in range(0, n_chunks, per_call):  # async dispatch: calls queue up on the devices
        k = min(per_call, n_chunks - c0)
        outs.append(program(key, np.int32(c0), np.int32(k),
                            np.int32(min(paths - c0 * chunk, k * chunk)), params))
    return _summarize(np.concatenate([gather(o) for o in outs]), offset, paths)  # spans processes: gather


# ----------------------------------------------------------------------------- adaptive q


class AdaptResult(NamedTuple):
    """q: the adapted constant q (mean of the second half of the iterates for "sgd");
    history: (steps + 1,) the iterates, starting at q0."""

    q: float
    history: np.ndarray


@functools.lru_cache(maxsize=8)
def _sampler(kernel: _Constant, tiles: int):
    def run(key, planes):
        x, n, _ = kernel.walk_lanes(key, 0, tiles, planes)
        return (x == kernel.target).reshape(-1), n.reshape(-1)

    return jax.jit(run, compiler_options=_CPU_OPTIONS if jax.default_backend() == "cpu" else None)


def adapt_q(key, start=100, target=200, p=18 / 37, games=600, *, method: str = "ce",
            steps: int = 10, paths: int = 1 << 14, q0: float | None = None, bits: int = 8,
            learning_rate: float = 0.05) -> AdaptResult:
    """Adapts a constant q by simulation, for problems too large for the DP.

    Every step simulates `paths` paths with the current q (rounded to bits) and key
    fold_in(key, step), then
    - "ce" (cross-entropy): q <- sum W w / sum W n over hits (w wins, n games until
      absorption), the Bernoulli q closest in KL to the zero-variance proposal;
    - "sgd": one Adam step (cosine-decayed learning rate) on logit q along jax.grad of the log
      of the importance-sampled second moment M(q') = E_q[1{hit} L_p^2 / (L_q' L_q)]
      (L: path likelihoods); the result averages the second half of the iterates.
    q0 defaults to `straight_line_q`. Returns `AdaptResult`.
    """
    start, target, p, games = validate(start, target, p, games)
    if method not in ("ce", "sgd"):
        raise ValueError(f"method must be 'ce' or 'sgd', got {method!r}")
    q = straight_line_q(start, target, p, games) if q0 is None else _probability("q0", q0)
    kernel = _Constant.make(start, target, games, bits, True)
    sample = _sampler(kernel, -(-_integer("paths", paths) // TILE))
    d = target - start
    lo, hi = 1.0 / (1 << bits), 1.0 - 1.0 / (1 << bits)

    def log_m2(theta, n, hit, qr):  # log E_q[1{hit} L_p^2 / (L_theta L_q)] up to log N
        w, l = (n + d) / 2.0, (n - d) / 2.0
        lp = w * math.log(p) + l * math.log(1 - p)
        lq = w * jnp.log(qr) + l * jnp.log1p(-qr)
        lt = -w * jax.nn.softplus(-theta) - l * jax.nn.softplus(theta)
        return jax.nn.logsumexp(jnp.where(hit, 2 * lp - lt - lq, -jnp.inf))

    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))

    @jax.jit
    def sgd_step(theta, state, n, hit, qr):
        updates, state = opt.update(jax.grad(log_m2)(theta, n, hit, qr), state)
        return optax.apply_updates(theta, updates), state

    theta = jnp.float32(math.log(q / (1 - q)))
    state = opt.init(theta)
    history = [q]
    for i in range(steps):
        k, qr = quantize(min(max(q, lo), hi), bits)
        hit, n = sample(jax.random.fold_in(key, i), _k_planes(k, bits))
        nh = np.asarray(n, np.float64)[np.asarray(hit)]
        if nh.size == 0:  # no path reached the target: push q up
            q = 0.5 * (q + 1.0)
            theta = jnp.float32(math.log(q / (1 - q)))
        elif method == "ce":
            w, l = (nh + d) / 2, (nh - d) / 2
            lw = w * math.log(p / qr) + l * math.log((1 - p) / (1 - qr))
            wt = np.exp(lw - lw.max())
            q = float(np.sum(wt * w) / np.sum(wt * nh))
        else:
            theta, state = sgd_step(theta, state, n, hit, np.float32(qr))
            q = float(1 / (1 + math.exp(-float(theta))))
        history.append(q)
    if method == "sgd":
        q = float(np.mean(history[len(history) // 2:]))
    return AdaptResult(min(max(q, lo), hi), np.asarray(history))
