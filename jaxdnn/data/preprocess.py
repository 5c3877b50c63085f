"""Pure preprocessing: dequantization, the logit transform with its log-det, bits/dim."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOGIT_ALPHA = 1e-6


def to_unit_interval(pixels: jax.Array) -> jax.Array:
    """uint8 pixels (..., 28, 28) -> float32 (..., 28, 28, 1) in [0, 1] (pixel centres: (p + 0.5)/256)."""
    return ((jnp.asarray(pixels, jnp.float32) + 0.5) / 256.0)[..., None]


def to_pixels(x: jax.Array) -> jax.Array:
    """The bin of each value: float (..., 28, 28, 1) in [0, 1] -> uint8 (..., 28, 28), floor(256 x)
    clipped to 0..255; inverts `to_unit_interval` and every dequantization."""
    return jnp.clip(jnp.floor(jnp.asarray(x)[..., 0] * 256.0), 0, 255).astype(jnp.uint8)


def dequantize(key: jax.Array, pixels: jax.Array) -> jax.Array:
    """Uniform dequantization: uint8 (..., 28, 28) -> (pixels + u) / 256, u ~ U[0,1), shape (..., 28, 28, 1)."""
    pixels = jnp.asarray(pixels, jnp.float32)[..., None]
    return (pixels + jax.random.uniform(key, pixels.shape)) / 256.0


def logit_transform(x: jax.Array, alpha: float = LOGIT_ALPHA) -> tuple[jax.Array, jax.Array]:
    """y = logit(alpha + (1 - 2 alpha) x) elementwise; returns (y, log|det dy/dx|) with log_det (B,)."""
    s = alpha + (1.0 - 2.0 * alpha) * x
    y = jnp.log(s) - jnp.log1p(-s)
    log_det = math.log1p(-2.0 * alpha) - jnp.log(s) - jnp.log1p(-s)
    return y, log_det.reshape(x.shape[0], -1).sum(-1)


def inverse_logit_transform(y: jax.Array, alpha: float = LOGIT_ALPHA) -> tuple[jax.Array, jax.Array]:
    """Inverse of `logit_transform`: returns (x, log|det dx/dy|)."""
    s = jax.nn.sigmoid(y)
    x = (s - alpha) / (1.0 - 2.0 * alpha)
    log_det = jax.nn.log_sigmoid(y) + jax.nn.log_sigmoid(-y) - math.log1p(-2.0 * alpha)
    return x, log_det.reshape(y.shape[0], -1).sum(-1)


def bits_per_dim(log_prob: jax.Array, num_dims: int = 784) -> jax.Array:
    """bpd of x = (pixels + u)/256 from log p(x) in nats on [0,1]^D: (-log p + D ln 256) / (D ln 2)."""
    return (-log_prob + num_dims * math.log(256.0)) / (num_dims * math.log(2.0))
