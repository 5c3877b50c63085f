"""A flow with its parameters as distrax objects: `FlowBijector` and `FlowDistribution`.

`FlowBijector(model, params)` maps a latent array z (..., 28, 28, 1) to an image x: its
forward is the model's `decode` (with log|det dx/dz|), its inverse `encode` (with log|det dz/dx|).
The multi-scale latents are packed into one image-shaped array (each level's latents flattened
and concatenated, 784 numbers in all), so it chains with any distrax bijector on that event.
`FlowDistribution(model, params, temperature=1.0)` is the flow's density over images:
`log_prob` is the model's own log-density (nats, every preprocessing log-det included) at that
temperature: a continuous density of x in [0, 1]^784, not a likelihood of 8-bit images;
`bits_per_dim(pixels, key)` is that likelihood (the bound with the model's own dequantizer, the
figure its card reports); `sample` decodes scaled prior noise (unclipped), `sample_and_log_prob`
returns the draws with `log_prob` of exactly those draws. All are jitted (one compilation per
model and batch shape) and take any batch shape in front of the event.
"""

from __future__ import annotations

import functools
import math

import distrax
import jax
import jax.numpy as jnp

__all__ = ["EVENT_SHAPE", "FlowBijector", "FlowDistribution"]

EVENT_SHAPE = (28, 28, 1)


def _check_event(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape[x.ndim - 3:] != EVENT_SHAPE:
        raise ValueError(f"{name} must end in the event shape {EVENT_SHAPE} (one image (28, 28, 1) or a "
                         f"batch (..., 28, 28, 1)), got shape {x.shape}")
    return x


def _flat_batch(fn):
    """Applies fn on (N, 28, 28, 1) to (..., 28, 28, 1) and restores the batch shape."""
    def apply(params, x):
        batch = x.shape[:-3]
        out = fn(params, x.reshape(-1, *EVENT_SHAPE))
        return jax.tree.map(lambda a: a.reshape(*batch, *a.shape[1:]), out)
    return apply


@functools.cache
def _jitted(model):
    """Jitted (params, x) functions of one model, cached so every instance shares compilations."""

    def latent_shapes(params, dtype):
        out = jax.eval_shape(lambda p, x: model.apply(p, x, method=model.encode)[0], params,
                             jax.ShapeDtypeStruct((1, *EVENT_SHAPE), dtype))
        return [o.shape[1:] for o in out]

    def pack(latents):
        return jnp.concatenate([z.reshape(z.shape[0], -1) for z in latents], -1).reshape(-1, *EVENT_SHAPE)

    def unpack(params, z):
        flat, out, start = z.reshape(z.shape[0], -1), [], 0
        for shape in latent_shapes(params, z.dtype):
            size = math.prod(shape)
            out.append(flat[:, start:start + size].reshape(-1, *shape))
            start += size
        return out

    def forward(params, z):
        return model.apply(params, unpack(params, z), method=model.decode_and_log_det)

    def inverse(params, x):
        latents, log_det = model.apply(params, x, method=model.encode)
        return pack(latents), log_det

    def log_prob(params, x):
        return model.apply(params, x, method=model.log_prob)

    def prior_log_prob(params, z):
        return model.apply(params, unpack(params, z), method=model.prior_log_prob)

    jitted = {name: jax.jit(_flat_batch(f)) for name, f in
              (("forward", forward), ("inverse", inverse), ("log_prob", log_prob), ("prior_log_prob", prior_log_prob))}
    # uint8 (N, 28, 28), key -> (x (N, 28, 28, 1), log q(u | pixels) (N,)): the model's own dequantizer
    jitted["dequantize"] = jax.jit(lambda params, pixels, key: model.apply(params, pixels, key,
                                                                           method=model.dequantize))
    return jitted


class FlowBijector(distrax.Bijector):
    """z (..., 28, 28, 1) (packed latents) <-> x (..., 28, 28, 1); see the module docstring."""

    def __init__(self, model, params):
        super().__init__(event_ndims_in=3, event_ndims_out=3)
        self.model, self.params = model, params

    def forward_and_log_det(self, z):
        return _jitted(self.model)["forward"](self.params, _check_event(z, "z"))

    def inverse_and_log_det(self, x):
        return _jitted(self.model)["inverse"](self.params, _check_event(x, "x"))


class FlowDistribution(distrax.Distribution):
    """The flow's density over images (event shape (28, 28, 1)), at a `temperature` T > 0: the
    prior scaled by T (T = 1: the trained model; flows are often sampled at T ~ 0.7), so
    log_prob(x) = log p_Z(z / T) - 784 log T + log|det dz/dx| with z = encode(x).

    Support: the model's own. A logit flow lives on (-e, 1 + e)^784 with e = alpha / (1 - 2 alpha)
    ~ 1e-6 (its decode can land a hair outside [0, 1]); NICE without preprocessing on R^784.
    `log_prob` is -inf outside the support (never NaN) and refuses integer pixels (dequantize
    or divide by 255 first). `sample` returns draws unclipped, and `sample_and_log_prob` them with
    `log_prob` of exactly the returned (float32) draws: clip for display.

    Likelihood of real images: `bits_per_dim(pixels, key)`, never `log_prob` at pixel centres. A
    flow trained with variational dequantization (the shipped RealNVP and Glow) spreads each
    pixel's mass unevenly over its bin, so its density at the centres (p + 0.5) / 256 is no
    likelihood: bits/dim from it read ~3 where the card's bound reads 1.08."""

    def __init__(self, model, params, temperature: float = 1.0):
        if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.model, self.params, self.temperature = model, params, float(temperature)

    @property
    def event_shape(self):
        return EVENT_SHAPE

    @property
    def bijector(self) -> FlowBijector:
        """The flow as a distrax bijector from packed latents to images."""
        return FlowBijector(self.model, self.params)

    def _prior_sample(self, key, n: int) -> jax.Array:
        if getattr(self.model, "prior", "normal") == "logistic":
            return jax.random.logistic(key, (n, *EVENT_SHAPE))
        return jax.random.normal(key, (n, *EVENT_SHAPE))

    def _tempered_prior_log_prob(self, z) -> jax.Array:
        t = self.temperature
        return _jitted(self.model)["prior_log_prob"](self.params, z / t) - math.prod(EVENT_SHAPE) * math.log(t)

    def _sample_n(self, key, n: int) -> jax.Array:
        return self._sample_n_and_log_prob(key, n)[0]

    def _sample_n_and_log_prob(self, key, n: int):
        """Draws (unclipped) and `log_prob` of exactly those draws: a second (encode) pass. The
        decode's own log-det is the density of the unrounded draw, which differs by up to tens of
        nats from that of the float32 draw returned where the logit saturates (|y| > ~16)."""
        z = self.temperature * self._prior_sample(key, n)
        x = _jitted(self.model)["forward"](self.params, z)[0]
        return x, self.log_prob(x)

    def log_prob(self, value) -> jax.Array:
        """log p(x) in nats, shape value.shape[:-3]; -inf outside the support: the continuous
        density of x in [0, 1]^784 (w.r.t. Lebesgue measure, every preprocessing log-det
        included). Not the likelihood of 8-bit images: for that, `bits_per_dim(pixels, key)`."""
        value = _check_event(value, "value")
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"log_prob takes images in [0, 1] as floats, got dtype {value.dtype}: dequantize "
                             "integer pixels ((p + u) / 256) or divide by 255 first")
        if self.temperature == 1.0:
            out = _jitted(self.model)["log_prob"](self.params, value)
        else:
            z, log_det = _jitted(self.model)["inverse"](self.params, value)
            out = self._tempered_prior_log_prob(z) + log_det
        return jnp.where(jnp.isnan(out), -jnp.inf, out)

    def bits_per_dim(self, pixels, key, samples: int = 1, batch_size: int = 500) -> jax.Array:
        """Bits/dim of 8-bit images under the flow, per image (shape pixels.shape[:-2]): the bound
        the model trains on and its card reports, with the model's own dequantizer q (uniform, or
        the learned one of `dequantization="variational"`),
            bpd = -(log (1/K) sum_k p((pixels + u_k) / 256) / q(u_k | pixels)) / (784 ln 2) + 8,
        u_k ~ q, K = `samples` (K = 1: the usual bound; larger K tightens it; Burda et al.).
        pixels: integers 0..255, (..., 28, 28) or (..., 28, 28, 1) (what `load_mnist` returns);
        key: the dequantization noise (batch i of `batch_size` images uses fold_in(key, i), noise
        k of it fold_in of that key by k > 0). At `temperature` T != 1 the tempered density.
        The mean over the test set is the card's "test_bpd" up to the noise: per-image values
        spread ~0.1-0.2, so their mean's standard error over n images is ~0.15 / sqrt(n)."""
        from jaxdnn.data import bits_per_dim  # jaxdnn.data imports nothing of the flows

        pixels = jnp.asarray(pixels)
        if not jnp.issubdtype(pixels.dtype, jnp.integer):
            raise ValueError(f"pixels must be integers 0..255 (uint8 MNIST images), got dtype {pixels.dtype}: "
                             "for images in [0, 1] use log_prob")
        if pixels.shape[pixels.ndim - 3:] == EVENT_SHAPE:
            pixels = pixels[..., 0]
        if pixels.shape[pixels.ndim - 2:] != EVENT_SHAPE[:2]:
            raise ValueError(f"pixels must end in (28, 28) or (28, 28, 1), got shape {pixels.shape}")
        if pixels.size and (int(pixels.min()) < 0 or int(pixels.max()) > 255):
            raise ValueError(f"pixels must lie in 0..255, got {int(pixels.min())}..{int(pixels.max())}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        batch, flat = pixels.shape[:-2], pixels.reshape(-1, 28, 28).astype(jnp.uint8)
        n, size = flat.shape[0], min(batch_size, max(flat.shape[0], 1))
        dequantize, out = _jitted(self.model)["dequantize"], []
        for i, start in enumerate(range(0, n, size)):
            chunk = flat[start:start + size]
            padded = jnp.concatenate([chunk, jnp.zeros((size - len(chunk), 28, 28), jnp.uint8)])  # one shape
            key_i = jax.random.fold_in(key, i)
            logs = []
            for k in range(samples):
                x, log_q = dequantize(self.params, padded, key_i if k == 0 else jax.random.fold_in(key_i, k))
                logs.append(self.log_prob(x) - log_q)
            bound = jax.nn.logsumexp(jnp.stack(logs), axis=0) - math.log(samples)
            out.append(bits_per_dim(bound)[: len(chunk)])
        return (jnp.concatenate(out) if out else jnp.zeros((0,))).reshape(batch)
