"""The simulation's random bits: a bit-sliced generator of Bernoulli(k / 2^b) game outcomes.

q is rounded to k / 2^bits and a game is won when a `bits`-bit uniform integer is < k; the
comparison runs bit-sliced, 32 games per 32-bit word per plane (`bernoulli_words`). The words
are a murmur3-style 32-bit finalizer (`mix32`) of a Weyl sequence over lanes (`lane_weyl`),
offset by fresh `jax.random.bits` (threefry) for every (TILE-path tile, block of games, plane)
(`block_offsets`), with the tile key `fold_in(key, tile)` (`tile_keys`): a path's draws depend
on (key, path index) only, never on the chunk size or the number of devices, and each path's
bits are exactly uniform given the threefry offsets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TILE = 4096  # paths per randomness tile: the unit of `fold_in(key, tile)`
_WEYL = 0x9E3779B9


def mix32(x):
    """murmur3-style 32-bit finalizer (lowbias32 constants): a bijection with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def lane_weyl(width: int):
    """(1, width) uint32 Weyl sequence lane * golden ratio: the per-lane hash input."""
    return (jnp.arange(width, dtype=jnp.uint32) * jnp.uint32(_WEYL))[None, :]


def k_planes(k: int, bits: int) -> np.ndarray:
    """(bits,) uint32 all-ones where bit (bits - 1 - i) of k is set (MSB first)."""
    return np.array([0xFFFFFFFF if (k >> (bits - 1 - i)) & 1 else 0 for i in range(bits)],
                    np.uint32)


def bernoulli_words(lanes, offsets, planes):
    """32 independent Bernoulli(k / 2^b) bits per word: bit-sliced `b-bit uniform < k`.

    lanes: (..., 1, W) uint32 Weyl inputs; offsets: (..., nt, b) uint32 random plane
    offsets; planes: (b,) uint32 from `k_planes`. Returns (..., nt, W) uint32.
    """
    lt = jnp.zeros(jnp.broadcast_shapes(lanes.shape, offsets.shape[:-1] + (1,)), jnp.uint32)
    eq = ~lt
    for i in range(planes.shape[0]):
        u = mix32(lanes + offsets[..., i:i + 1])
        lt = lt | (eq & ~u & planes[i])
        eq = eq & ~(u ^ planes[i])
    return lt


def tile_keys(key, tile0, n_tiles):
    """(n_tiles,) keys fold_in(key, tile) for tiles tile0, ..., tile0 + n_tiles - 1."""
    tiles = tile0 + jnp.arange(n_tiles, dtype=jnp.int32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, tiles)


def block_offsets(tkeys, nblocks, shape):
    """(nblocks, n_tiles, *shape) uint32 threefry offsets, bits(tile_key, (nblocks, *shape))
    per tile, drawn up front so the block loop runs no threefry."""
    draw = lambda k: jax.random.bits(k, (nblocks, *shape), jnp.uint32)
    return jax.vmap(draw, out_axes=1)(tkeys)
