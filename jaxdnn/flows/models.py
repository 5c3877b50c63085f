"""NICE, RealNVP and Glow for (B, 28, 28, 1) images in [0, 1].

Every model is a multi-scale flow: `preprocess` (logit or identity), then `levels`, each a
bijector; after every level but the last, the channels from `kept_channels` on are factored out as a
latent. `encode(x) -> (latents, log_det)` returns every latent, `decode(latents)` takes them
all back, so the round trip is exact. Latents have a fixed prior (standard normal, or logistic
for NICE); Glow's learned prior for split latents is a zero-initialized conditional affine
layer at the end of each level, so sampling is `decode(temperature * prior noise)`.

Density convention (docs/problems.md, "Conventions"): `log_prob(x)` is in nats w.r.t. Lebesgue measure on
[0, 1]^784 and includes the preprocessing log-det. `pixel_log_prob(pixels, key)` is what training
maximizes: one dequantization of 8-bit pixels, uniform or (config `dequantization="variational"`)
learned (`jaxdnn.flows.dequantization`), minus its log q.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import ClassVar

import distrax
import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdnn.data.preprocess import dequantize as uniform_dequantize
from jaxdnn.data.preprocess import to_pixels
from jaxdnn.flows.dequantization import VariationalDequantizer
from jaxdnn.flows.layers import (
    ActNorm,
    Chain,
    Coupling,
    InvConv1x1,
    Logit,
    Repeat,
    Reshape,
    Scaling,
    Squeeze,
    checkerboard_mask,
    half_mask,
)

IMAGE_SHAPE = (28, 28, 1)


class MultiScaleFlow(nn.Module):
    """Base class: subclasses implement `build() -> (preprocess, levels, kept_channels, latent_shapes)`."""

    prior: str = "normal"
    dequantization: str = "uniform"  # or "variational": a learned q(u | pixels) (Flow++)
    dequantizer_hidden: int = 32  # the variational dequantizer's channels ...
    dequantizer_couplings: int = 4  # ... and couplings (unused with uniform noise)
    CHOICES: ClassVar[dict] = {"dequantization": ("uniform", "variational")}  # allowed values of str keys
    RANGES: ClassVar[dict] = {"levels_count": (1, 2)}  # (low, high) of int keys other than ">= 1"

    def setup(self):
        self.preprocess, self.levels, self.kept_channels, self.shapes = self.build()
        self.dequantizer = (VariationalDequantizer(self.dequantizer_hidden, self.dequantizer_couplings)
                            if self.dequantization == "variational" else None)

    def build(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _prior(self):
        if self.prior == "logistic":
            return distrax.Logistic(0.0, 1.0)
        return distrax.Normal(0.0, 1.0)

    def __call__(self, x):
        """log p(x) (B,) of x (B, 28, 28, 1); `init` through here also creates the dequantizer."""
        if self.dequantizer is not None and self.is_initializing():
            self.dequantizer(to_pixels(x)[..., None].astype(jnp.float32), jnp.zeros_like(x))
        return self.log_prob(x)

    def encode(self, x):
        """x (B, 28, 28, 1) in [0, 1] -> (list of latents, log_det (B,))."""
        h, log_det = self.preprocess(x) if self.preprocess is not None else (x, 0.0)
        latents = []
        for i, level in enumerate(self.levels):
            h, ld = level(h)
            log_det = log_det + ld
            if i < len(self.levels) - 1:
                latents.append(h[..., self.kept_channels[i]:])
                h = h[..., : self.kept_channels[i]]
        latents.append(h)
        return latents, log_det

    def decode_and_log_det(self, latents: Sequence[jax.Array]):
        """The inverse of `encode`: latents -> (x (B, 28, 28, 1), log|det dx/dz| (B,))."""
        h, log_det = latents[-1], 0.0
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                h = jnp.concatenate([h, latents[i]], -1)
            h, ld = self.levels[i](h, inverse=True)
            log_det = log_det + ld
        if self.preprocess is not None:
            h, ld = self.preprocess(h, inverse=True)
            log_det = log_det + ld
        return h, log_det

    def decode(self, latents: Sequence[jax.Array]):
        """The inverse of `encode`: latents -> x (B, 28, 28, 1) (XLA drops the unused log-det)."""
        return self.decode_and_log_det(latents)[0]

    def prior_log_prob(self, latents: Sequence[jax.Array]):
        """log p_Z of every latent under the prior, summed per example, shape (B,)."""
        prior = self._prior()
        return sum(prior.log_prob(z).reshape(z.shape[0], -1).sum(-1) for z in latents)

    def log_prob(self, x):
        """log p(x) in nats, shape (B,)."""
        latents, log_det = self.encode(x)
        return log_det + self.prior_log_prob(latents)

    def dequantize(self, pixels, key):
        """uint8 pixels (B, 28, 28) -> (x = (pixels + u) / 256 (B, 28, 28, 1), log q(u | pixels) (B,)):
        u uniform (log q = 0) or drawn from the variational dequantizer, with noise from `key`."""
        if self.dequantizer is None:
            return uniform_dequantize(key, pixels), jnp.zeros(pixels.shape[:1])
        pixels = jnp.asarray(pixels, jnp.float32)[..., None]
        u, log_q = self.dequantizer(pixels, jax.random.logistic(key, pixels.shape))
        return (pixels + u) / 256.0, log_q

    def pixel_log_prob(self, pixels, key):
        """One-sample bound (B,): log p(x) - log q(u | pixels) at x = (pixels + u) / 256 (`dequantize`);
        its expectation is at most log P(pixels) + 784 log 256 (`bits_per_dim` turns it into bits/dim)."""
        x, log_q = self.dequantize(pixels, key)
        return self.log_prob(x) - log_q

    def latent_shapes(self):
        """Per-example shapes of the latents `encode` returns."""
        return self.shapes

    def sample(self, key, n: int, temperature: float = 1.0):
        """n images (n, 28, 28, 1) from the prior scaled by `temperature`."""
        keys = jax.random.split(key, len(self.shapes))
        prior = self._prior()
        latents = [temperature * prior.sample(seed=k, sample_shape=(n, *s))
                   for k, s in zip(keys, self.shapes, strict=True)]
        return self.decode(latents)


class NICE(MultiScaleFlow):
    """NICE (Dinh et al. 2015) as in the course: additive couplings on the flat image
    (alternating even/odd halves), MLP conditioners, diagonal scaling, logistic prior."""

    couplings: int = 4
    hidden: int = 1000
    depth: int = 5
    preprocessing: str = "none"  # "none" (the course: x in [0, 1]) or "logit"
    prior: str = "logistic"
    CHOICES: ClassVar[dict] = {**MultiScaleFlow.CHOICES, "preprocessing": ("none", "logit")}

    def build(self):
        d = 784
        layers = [partial(Reshape, in_shape=IMAGE_SHAPE, out_shape=(d,))]
        for i in range(self.couplings):
            layers.append(partial(Coupling, mask=tuple(range(i % 2, d, 2)), affine=False,
                                  conditioner="mlp", hidden=self.hidden, depth=self.depth))
        layers.append(Scaling)
        pre = Logit() if self.preprocessing == "logit" else None
        return pre, [Chain(tuple(layers))], (), [(d,)]


class RealNVP(MultiScaleFlow):
    """RealNVP (Dinh et al. 2017) for 28x28x1. Each level: squeeze, `pairs` pairs of
    checkerboard affine couplings (a checkerboard mask of the unsqueezed image is a channel
    mask after squeezing, so the conditioner runs at half resolution), `pairs` pairs of
    channel-wise couplings, then half the channels are factored out. A final stage of
    `final_pairs` pairs of channel-wise couplings at 7x7. ResNet conditioners."""

    levels_count: int = 2
    pairs: int = 1
    final_pairs: int = 2
    hidden: int = 48
    blocks: int = 1

    def build(self):
        coupling = partial(Coupling, affine=True, conditioner="resnet", hidden=self.hidden,
                           depth=self.blocks)
        levels, kept_channels, shapes = [], [], []
        h, w, c = IMAGE_SHAPE
        for _ in range(self.levels_count):
            checker = partial(Chain, layers=(partial(coupling, mask=checkerboard_mask(c, 0)),
                                             partial(coupling, mask=checkerboard_mask(c, 1))))
            h, w, c = h // 2, w // 2, 4 * c
            channel = partial(Chain, layers=(partial(coupling, mask=half_mask(c, True)),
                                             partial(coupling, mask=half_mask(c, False))))
            levels.append(Chain((Squeeze, partial(Repeat, make=checker, num=self.pairs),
                                 partial(Repeat, make=channel, num=self.pairs))))
            kept_channels.append(c // 2)
            shapes.append((h, w, c - c // 2))
            c = c // 2
        final = partial(Chain, layers=(partial(coupling, mask=half_mask(c, True)),
                                       partial(coupling, mask=half_mask(c, False))))
        levels.append(Repeat(make=final, num=self.final_pairs))
        shapes.append((h, w, c))
        return Logit(), levels, tuple(kept_channels), shapes


class Glow(MultiScaleFlow):
    """Glow (Kingma & Dhariwal 2018): `levels_count` levels of squeeze then `steps_per_level` steps of
    ActNorm -> invertible 1x1 conv (LU) -> affine coupling; after every level but the last,
    a learned conditional prior (zero-initialized conv) standardizes the factored-out half."""

    levels_count: int = 2
    steps_per_level: int = 8
    hidden: int = 96

    def build(self):
        levels, kept_channels, shapes = [], [], []
        h, w, c = IMAGE_SHAPE
        for i in range(self.levels_count):
            h, w, c = h // 2, w // 2, 4 * c
            mask = half_mask(c, True)
            coupling = partial(Coupling, mask=mask, affine=True, conditioner="glow",
                               hidden=self.hidden)
            step = partial(Chain, layers=(ActNorm, InvConv1x1, coupling))
            layers = [Squeeze, partial(Repeat, make=step, num=self.steps_per_level)]
            if i < self.levels_count - 1:
                layers.append(partial(Coupling, mask=mask, affine=True, conditioner="conv"))
                kept_channels.append(c // 2)
                shapes.append((h, w, c - c // 2))
                c = c // 2
            levels.append(Chain(tuple(layers)))
        shapes.append((h, w, c))
        return Logit(), levels, tuple(kept_channels), shapes
