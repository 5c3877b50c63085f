"""A flow with its parameters as distrax objects: `FlowBijector` and `FlowDistribution`.

`FlowBijector(model, params)` maps a latent array z (..., 28, 28, 1) to an image x: its
forward is the model's `decode` (with log|det dx/dz|), its inverse `encode` (with log|det dz/dx|).
The multi-scale latents are packed into one image-shaped array (each level's latents flattened
and concatenated, 784 numbers in all), so it chains with any distrax bijector on that event.
`FlowDistribution(model, params)` is the flow's density over images in [0, 1]^(28x28x1):
`log_prob` is the model's own log-density (nats, every preprocessing log-det included),
`sample` decodes prior noise and clips it into [0, 1]. All three are jitted (one compilation
per model and batch shape) and take any batch shape in front of the event.
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
    """The flow's density over images (event shape (28, 28, 1), values in [0, 1])."""

    def __init__(self, model, params):
        self.model, self.params = model, params

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

    def _sample_n(self, key, n: int) -> jax.Array:
        return self._sample_n_and_log_prob(key, n)[0]

    def _sample_n_and_log_prob(self, key, n: int):
        """Samples clipped into [0, 1] and their log-density under the model (`log_prob`)."""
        fns = _jitted(self.model)
        x = jnp.clip(fns["forward"](self.params, self._prior_sample(key, n))[0], 0.0, 1.0)
        return x, fns["log_prob"](self.params, x)

    def log_prob(self, value) -> jax.Array:
        """log p(x) in nats, shape value.shape[:-3]."""
        return _jitted(self.model)["log_prob"](self.params, _check_event(value, "value"))
