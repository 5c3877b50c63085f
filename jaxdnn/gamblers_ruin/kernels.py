"""The simulation kernels: n_tiles * TILE paths in, one float32 log-weight per path out
(-inf for a path that misses the target). Both are hashable NamedTuples of static
configuration, so a kernel is a jit and cache key; the traced parameters come separately.

- `ConstantKernel` (constant q). Balance and games played are packed in one int16,
  x + 2^k * (steps this block), so a block of 64 games is one fused integer loop with a single
  range check per step. When start and target are even a path can only be absorbed after an
  even number of games, so games are walked two at a time. Blocks run under `lax.while_loop`,
  which stops as soon as every path of a chunk is absorbed; the masks of block j + 1 are drawn
  while block j is walked, so the hashing and the walk are separate fusions (XLA would
  otherwise recompute the hash). `constant_params` gives its parameters and the float64
  log-weight offset added on the host.
- `StateKernel` (state-dependent q(t, x)): every game draws `bits` bits (8: four games per word)
  compared with k(t, x) = round(q(t, x) 2^bits), and log W accumulates per game.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdnn.gamblers_ruin.bits import (
    TILE,
    bernoulli_words,
    block_offsets,
    k_planes,
    lane_weyl,
    mix32,
    tile_keys,
)
from jaxdnn.gamblers_ruin.exact import proposal_k, quantize

# On CPU, LLVM at level 1 compiles these integer kernels ~3x faster, to the same speed.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


class ConstantKernel(NamedTuple):
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
        """The kernel for a problem: pairs of games when possible, the narrowest packing."""
        pair = start % 2 == 0 and target % 2 == 0
        unit = 2 if pair else 1
        xb_log = int(target).bit_length()
        for wide, limit in ((False, 2**15 - 1), (True, 2**31 - 1)):
            for masks in (4, 2, 1):
                if (16 * masks // unit + 1) << xb_log <= limit:
                    return ConstantKernel(start, target, games, bits, stopped, pair, xb_log,
                                          wide, masks)
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
        offsets = block_offsets(tile_keys(key, tile0, n_tiles), nblocks + 1,
                                 (self.masks, self.bits))
        lanes = lane_weyl(TILE // 2)[None]

        def masks(j):  # (masks, n_tiles, TILE / 2) uint32: two lanes' 16-game masks per word
            # one fusion that stores whole words; splitting them here would hash twice
            return bernoulli_words(lanes, jnp.swapaxes(offsets[j], 0, 1), planes)

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


def constant_params(q, p, bits, start, target, games, stopped):
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
    return (k_planes(k, bits), np.float32(slope)), offset, qr


class StateKernel(NamedTuple):
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
        offsets = block_offsets(tile_keys(key, tile0, n_tiles), nblocks + 1, (nwords,))
        lanes = lane_weyl(TILE)

        def words(j):  # (nwords, n_tiles, TILE) uint32 uniform words
            return mix32(lanes[None] + jnp.swapaxes(offsets[j], 0, 1)[:, :, None])

        def steps(x, acc, ws, t0, rem):  # the first `rem` games of the block starting at t0
            prod = jnp.ones(x.shape, jnp.float32)
            for g in range(block):
                u = ((ws[g // per_word] >> (b * (g % per_word))) & (full - 1)).astype(jnp.int32)
                k = proposal_k(self.proposal, t0 + g, x, b)
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
