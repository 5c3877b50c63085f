"""A flow with its parameters as distrax objects: `FlowBijector` and `FlowDistribution`.

`FlowBijector(model, params)` maps a latent array z (..., 28, 28, 1) to an image x: its
forward is the model's `decode` (with log|det dx/dz|), its inverse `encode` (with log|det dz/dx|).
The multi-scale latents are packed into one image-shaped array (each level's latents flattened
and concatenated, 784 numbers in all), so it chains with any distrax bijector on that event.
`FlowDistribution(model, params, temperature=1.0)` is the flow's density over images:
`log_prob` is the model's own log-density (nats, every preprocessing log-det included) at that
temperature, `sample` decodes scaled prior noise (unclipped), `sample_and_log_prob` returns the
draws with their exact log-density. All are jitted (one compilation per model and batch shape)
and take any batch shape in front of the event.
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

    return {name: jax.jit(_flat_batch(f)) for name, f in
            (("forward", forward), ("inverse", inverse), ("log_prob", log_prob), ("prior_log_prob", prior_log_prob))}


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
    or divide by 255 first). `sample` returns draws unclipped, and `sample_and_log_prob` their
    exact log-density, read off the decode's own log-det (no second pass): clip for display."""

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
        """Draws (unclipped) and the log-density of exactly those draws."""
        z = self.temperature * self._prior_sample(key, n)
        x, log_det = _jitted(self.model)["forward"](self.params, z)  # log|det dx/dz|
        return x, self._tempered_prior_log_prob(z) - log_det

    def log_prob(self, value) -> jax.Array:
        """log p(x) in nats, shape value.shape[:-3]; -inf outside the support."""
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
