"""Variational dequantization (Ho et al. 2019, Flow++): a learned noise q(u | pixels) on (0, 1)^784.

A flow p on [0, 1]^784 bounds the probability of 8-bit pixels (Jensen) by
    log P(pixels) >= E_{u ~ q} [log p((pixels + u) / 256) - log q(u | pixels)] - 784 log 256.
Uniform dequantization is q = 1; a learned q closes the gap (the bound is exact when q is the
flow's own conditional of u). Here eps ~ Logistic(0, 1) per pixel, h = g(eps; pixels) through
conditional affine couplings (checkerboard masks on the squeezed 14x14x4 noise; each conditioner
reads the fixed half of the noise and features of the image), u = sigmoid(h). The conditioners'
last layers start at zero, so g starts as the identity and u = sigmoid(eps) is exactly uniform:
log q = 0, the bound of uniform dequantization, also for a flow trained with uniform noise.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from jaxdnn.flows.layers import Coupling, checkerboard_mask, squeeze, unsqueeze


def log_sigmoid_derivative(h: jax.Array) -> jax.Array:
    """log sigmoid'(h) = log sigmoid(h) + log sigmoid(-h), elementwise: also the logistic log-density."""
    return jax.nn.log_sigmoid(h) + jax.nn.log_sigmoid(-h)


class VariationalDequantizer(nn.Module):
    """q(u | pixels) as a conditional flow from logistic noise; `couplings` affine couplings whose
    Glow-style conditioners (`hidden` channels) also read `hidden` channels of image features."""

    hidden: int = 32
    couplings: int = 4

    @nn.compact
    def __call__(self, pixels: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels (B, 28, 28, 1) as floats in {0, ..., 255}, eps (B, 28, 28, 1) logistic noise ->
        (u (B, 28, 28, 1) in (0, 1), log q(u | pixels) (B,) in nats on the unit cube); any even
        height and width work the same."""
        context = nn.relu(nn.Conv(self.hidden, (3, 3))(squeeze(pixels / 127.5 - 1.0)))  # (B, 14, 14, hidden)
        h, log_det = squeeze(eps), 0.0
        for i in range(self.couplings):
            coupling = Coupling(checkerboard_mask(1, i % 2), affine=True, conditioner="glow", hidden=self.hidden)
            h, ld = coupling(h, context=context)
            log_det = log_det + ld
        h = unsqueeze(h)
        per_pixel = log_sigmoid_derivative(eps) - log_sigmoid_derivative(h)  # log base density - log du/dh
        log_q = per_pixel.reshape(per_pixel.shape[0], -1).sum(-1) - log_det
        return jax.nn.sigmoid(h), log_q
