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

Simulation (`estimate`), built for throughput: q is rounded to k / 2^bits and the likelihood
ratio uses the rounded q, so the estimator stays exactly unbiased; the games are drawn
bit-sliced, 32 per 32-bit word, and a path's draws depend on (key, path index) only, never on
the chunk size or the number of devices. The modules, one concern each:

- `exact`: problem checks (`validate`), the proposals (`quantize`, `Tilt` / `tilt`,
  `straight_line_q`) and the dynamic programs (`exact_probability`, `second_moment`,
  `relative_error_per_path`, `best_constant_q`);
- `bits`: the bit-sliced random generator (murmur3-style hash of a Weyl sequence over lanes,
  offset by threefry bits per (TILE-path tile, block of games, plane));
- `kernels`: `ConstantKernel` (balance and games played packed in one int16, games walked two
  at a time when start and target are even, blocks under `lax.while_loop` until every path is
  absorbed) and `StateKernel` (q(t, x) per game, log W accumulated per game);
- `streaming`: `estimate`, chunks of constant memory dealt to the devices of a 1-D `Mesh` by
  `jax.shard_map` and combined on the host in float64 (`Estimate`, `default_chunk_size`);
- `adapt`: `adapt_q`, cross-entropy or SGD adaptation of a constant q when the DP is too large.

Speed: `python -m benchmarks --only gamblers_ruin` measures it against the course-style Python
loop and vectorized NumPy in the same run (docs/performance.md).
"""

from jaxdnn.gamblers_ruin.adapt import AdaptResult, adapt_q
from jaxdnn.gamblers_ruin.bits import TILE
from jaxdnn.gamblers_ruin.exact import (
    COURSE,
    Tilt,
    best_constant_q,
    exact_probability,
    quantize,
    relative_error_per_path,
    second_moment,
    straight_line_q,
    tilt,
    validate,
)
from jaxdnn.gamblers_ruin.streaming import PROPOSALS, Estimate, default_chunk_size, estimate, proposal_by_name

__all__ = [
    "COURSE",
    "PROPOSALS",
    "TILE",
    "AdaptResult",
    "Estimate",
    "Tilt",
    "adapt_q",
    "best_constant_q",
    "default_chunk_size",
    "estimate",
    "exact_probability",
    "proposal_by_name",
    "quantize",
    "relative_error_per_path",
    "second_moment",
    "straight_line_q",
    "tilt",
    "validate",
]
