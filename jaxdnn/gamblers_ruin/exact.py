"""The problem and everything exact about it: argument checks, the proposals (constant q rounded
to the simulation's grid, the state tilt q(t, x)), and the dynamic programs for P, for the
second moment of the importance-sampling weight, and for the best constant q (float64, NumPy).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

COURSE = {"start": 100, "target": 200, "p": 18 / 37, "games": 600}


# ----------------------------------------------------------------------------- validation


def check_integer(name: str, v) -> int:
    """v as an int (integral floats accepted); ValueError naming `name` otherwise."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real) and math.isfinite(v) and float(v).is_integer():
        return int(v)
    raise ValueError(f"{name} must be an integer, got {v!r}")


def check_probability(name: str, v) -> float:
    """v as a float in (0, 1); ValueError naming `name` otherwise."""
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
    start, target, games = check_integer("start", start), check_integer(
        "target", target), check_integer("games", games)
    if not 0 < start < target:
        raise ValueError(f"need 0 < start < target, got start={start}, target={target}")
    if games < 1:
        raise ValueError(f"games must be >= 1, got {games}")
    return start, target, check_probability("p", p), games


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
        steps_left = jnp.asarray(self.games - t, jnp.float32)  # float32 also under enable_x64
        kf = half + jnp.asarray(self.target - x, jnp.float32) * (half / steps_left)
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
    q = check_probability("q", q)
    bits = check_integer("bits", bits)
    if not 1 <= bits <= 24:
        raise ValueError(f"bits must be in [1, 24], got {bits}")
    k = round(q * (1 << bits))
    if not 0 < k < (1 << bits):
        raise ValueError(f"q={q} rounds to {k}/2^{bits}; use more bits")
    return k, k / (1 << bits)


def proposal_k(proposal, t, x, bits: int):
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
        k = proposal_k(q, t, x, bits)
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
        qc = quantize(q, bits)[1] if bits is not None else check_probability("q", q)
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
