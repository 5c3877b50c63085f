"""The simulation kernels: n_tiles * TILE paths in, one float64 log-weight per path out
(-inf for a path that misses the target). Weights are float64 from their constants on: the
estimator's expectation with the factors the kernel really multiplies equals the probability to
~1e-13 (float32 factors carried a systematic relative error of ~2e-6 per winning path, one
standard error of the state tilt near 1.3e11 paths; tests/test_gamblers_ruin.py runs that
expectation by dynamic programming). The kernels are traced under `jax.enable_x64` (streaming).
Both are hashable NamedTuples of static configuration, so a kernel is a jit and cache key; the
traced parameters come separately.

- `ConstantKernel` (constant q). Balance and games played are packed in one int16,
  x + 2^k * (steps this block), so a block of 64 games is one fused integer loop with a single
  range check per step. When start and target are even a path can only be absorbed after an
  even number of games, so games are walked two at a time. Blocks run under `lax.while_loop`,
  which stops as soon as every path of a chunk is absorbed; the masks of block j + 1 are drawn
  while block j is walked, so the hashing and the walk are separate fusions (XLA would
  otherwise recompute the hash). `constant_params` gives its parameters and the float64
  log-weight offset added on the host.
- `StateKernel` (state-dependent q(t, x)): every game draws `bits` bits (8: four games per word)
  compared with k(t, x) = round(q(t, x) 2^bits); the likelihood ratio's denominators are
  multiplied as exact integers, its numerators come from the win and loss counts.
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
        _, st, n, wins, _ = lax.while_loop(cond, body, (jnp.int32(-1), st0, zeros, wins0, ms0))
        x, n = unpack(st, n)
        return x.astype(jnp.int32), n, wins

    def log_weights(self, key, tile0, n_tiles, params):
        """(n_tiles, TILE) float64 log W - offset of paths reaching target, -inf otherwise.

        params = (planes, slope): log W = offset + a * slope with a = (n - d) / 2 (stopped)
        or a = wins - games // 2 (all games), slope float64; offset is added on the host.
        """
        planes, slope = params
        x, n, wins = self.walk_lanes(key, tile0, n_tiles, planes)
        a = (n - (self.target - self.start)) // 2 if self.stopped else wins - self.games // 2
        return jnp.where(x == self.target, a.astype(jnp.float64) * slope, -jnp.inf)


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
    return (k_planes(k, bits), np.float64(slope)), offset, qr


def state_params(p: float, bits: int) -> tuple[np.float64, np.float64]:
    """The traced parameters of `StateKernel`: the win and loss numerators p 2^bits and
    (1 - p) 2^bits of the likelihood-ratio factors, float64."""
    s = float(1 << bits)
    return np.float64(p * s), np.float64((1 - p) * s)


def state_factors(params, k, bits: int):
    """The factors `StateKernel` multiplies for a game played with win probability k / 2^bits:
    (p 2^bits / k for a win, (1 - p) 2^bits / (2^bits - k) for a loss), in the dtype of params."""
    num_win, num_loss = params
    return num_win / k.astype(num_win.dtype), num_loss / ((1 << bits) - k).astype(num_loss.dtype)


def _split_exponent(v):
    """float32 v > 0 (normal) -> (m, e) with v = m 2^e exactly, m in [1, 2), e int32 (bit operations)."""
    bits = lax.bitcast_convert_type(v, jnp.uint32)
    e = ((bits >> 23) & 0xFF).astype(jnp.int32) - 127
    m = lax.bitcast_convert_type((bits & jnp.uint32((1 << 23) - 1)) | jnp.uint32(127 << 23), jnp.float32)
    return m, e


class StateKernel(NamedTuple):
    """Static configuration of the state-dependent kernel: q(t, x) = proposal(t, x)."""

    start: int
    target: int
    games: int
    bits: int  # 8 or 16 bits per game
    proposal: Callable

    def log_weights(self, key, tile0, n_tiles, params):
        """(n_tiles, TILE) float64 log W of paths reaching target, -inf otherwise.

        params = `state_params(p, bits)`. W = prod over games of `state_factors`, computed as
        the numerators (p 2^bits)^wins ((1 - p) 2^bits)^losses from the counts (float64, at the
        end) over the product of the integer denominators k or 2^bits - k: exact in float32
        over 3 games of 8 bits (1 of 16), scaled by an exact power of two and multiplied into a
        float32 mantissa (one round-to-nearest per multiplication: mean-zero, no systematic
        error) whose exponent moves into an int32 at each block of 16 games.

        Layout, for speed: the balance and the games played while alive share one int32,
        st = x + xb n (xb = 2^bitlen(target)); a path alive at game t has n = t, so
        0 < x < target <=> xb t < st < xb t + target. A block's outputs are st and the
        mantissa (each output of the block's fusion recomputes the walk, so there are two).
        """
        b, xb = self.bits, 1 << int(self.target).bit_length()
        per_word, full = 32 // b, 1 << b
        block = 16
        nwords = block // per_word
        nblocks = -(-self.games // block)
        per_exact = 3 if b == 8 else 1  # denominators whose product float32 holds exactly (< 2^24)
        # each multiplication's factor den 2^-s lies in [2^-s, 2^(b per_exact - s)]: 8 bits, 6 a
        # block, s = 16: [2^-96, 2^48]; 16 bits, 8 between renormalizations, s = 8: [2^-64, 2^64]
        scale_log2 = 16 if b == 8 else 8
        renormalize = () if b == 8 else (block // 2 - 1,)  # games after which 16 bits split again
        mults = [g for g in range(block) if g % per_exact == per_exact - 1 or g == block - 1]
        offsets = block_offsets(tile_keys(key, tile0, n_tiles), nblocks + 1, (nwords,))
        lanes = lane_weyl(TILE)

        def words(j):  # (nwords, n_tiles, TILE) uint32 uniform words
            return mix32(lanes[None] + jnp.swapaxes(offsets[j], 0, 1)[:, :, None])

        def steps(st, mant, ws, t0, rem):  # the first `rem` games of the block starting at t0
            den, e_mid = jnp.ones(st.shape, jnp.float32), 0
            for g in range(block):
                t = t0 + g
                u = ((ws[g // per_word] >> (b * (g % per_word))) & (full - 1)).astype(jnp.int32)
                k = proposal_k(self.proposal, t, st - xb * t, b)
                win = u < k
                lo = xb * t
                alive = (st > lo) & (st < jnp.where(g < rem, lo + self.target, lo))
                st = st + jnp.where(alive, jnp.where(win, xb + 1, xb - 1), 0)
                den = den * jnp.where(alive, jnp.where(win, k, full - k), 1).astype(jnp.float32)
                if g in mults:
                    mant, den = mant * (den * 2.0 ** -scale_log2), jnp.ones_like(den)
                if g in renormalize:
                    mant, e_mid = _split_exponent(mant)
            return st, mant, e_mid

        def body(c):  # plays block j (none for j = -1) and draws the words of block j + 1
            j, st, mant, expo, ws = c
            m, e = _split_exponent(mant)  # exact: a power of two moves into the integer exponent
            rem = jnp.where(j < 0, 0, jnp.clip(self.games - j * block, 0, block))
            st, mant, e_mid = steps(st, m, ws, j * block, rem)
            return j + 1, st, mant, expo + e + e_mid + scale_log2 * len(mults), words(j + 1)

        def cond(c):
            j, st = c[0], c[1]
            x = st - xb * jnp.clip(j * block, 0, self.games)  # games played so far
            return (j < nblocks) & jnp.any((x > 0) & (x < self.target))

        st0 = jnp.full((n_tiles, TILE), self.start, jnp.int32)
        mant0 = jnp.ones((n_tiles, TILE), jnp.float32)
        ws0 = jnp.zeros((nwords, n_tiles, TILE), jnp.uint32)
        expo0 = jnp.zeros((n_tiles, TILE), jnp.int32)
        _, st, mant, expo, _ = lax.while_loop(cond, body, (jnp.int32(-1), st0, mant0, expo0, ws0))
        n = st >> (xb.bit_length() - 1)
        x = st & (xb - 1)
        wins = (x - self.start + n) // 2  # wins - losses = x - start, wins + losses = n
        log_num = wins * jnp.log(params[0]) + (n - wins) * jnp.log(params[1])
        m, e = _split_exponent(mant)
        log_den = jnp.log(m.astype(jnp.float64)) + (expo + e) * math.log(2.0)  # the product, m 2^(expo + e)
        return jnp.where(x == self.target, log_num - log_den, -jnp.inf)
